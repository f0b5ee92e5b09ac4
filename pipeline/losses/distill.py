"""The distillation loss: EasyDeL 0.3's ``distillation_loss`` and its sparse-targets sibling.

They only compose: check the inputs (pipeline/losses/checks.py), take the per-token terms
(pipeline/losses/token_losses.py), reduce them with the token mask (pipeline/losses/reduce.py).
"""

from __future__ import annotations

import jax

from pipeline.losses.checks import check_loss_inputs
from pipeline.losses.reduce import loss_mask, masked_token_mean
from pipeline.losses.targets import DenseTargets, Targets
from pipeline.losses.token_losses import TokenLosses, token_losses


def combine_token_losses(terms: TokenLosses, mask: jax.Array | None, use_hard_labels: bool,
                         temperature, alpha) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""Reduces per-token terms to the scalar loss and its metrics.

    .. math::
        \mathrm{kl\_loss} = T^2 \operatorname{reduce}(\mathrm{div}), \quad
        \mathrm{loss} = \alpha\,\mathrm{kl\_loss} + (1-\alpha)\operatorname{reduce}(\mathrm{ce})

    the CE term only when ``use_hard_labels`` (and ``terms.cross_entropy`` exists), else
    ``loss = α · kl_loss``. ``reduce`` is :func:`masked_token_mean`.
    """
    kl_loss = temperature ** 2 * masked_token_mean(terms.divergence, mask)
    metrics = {
        "kl_loss": kl_loss,
        "teacher_entropy": masked_token_mean(terms.teacher_entropy, mask),
        "top1_agreement": masked_token_mean(terms.top1_agreement, mask),
    }
    loss = alpha * kl_loss
    if terms.cross_entropy is not None:
        metrics["ce_loss"] = masked_token_mean(terms.cross_entropy, mask)
        if use_hard_labels:
            loss = loss + (1.0 - alpha) * metrics["ce_loss"]
    return loss, metrics


def targets_distillation_loss(student_logits, targets: Targets, attention_mask=None, labels=None,
                              use_hard_labels=False, temperature=4.0, alpha=0.9, *,
                              divergence="forward_kl", beta=0.5, valid_vocab_size=None):
    r"""Distillation loss against dense, top-k or sampled teacher targets.

    Same parameters, mask and α semantics as :func:`distillation_loss`; the per-token
    divergence for each kind of targets is the one of :func:`token_losses`:

    .. math::
        \mathrm{loss} = \alpha\, T^2 \operatorname{reduce}(\mathrm{div})
            + (1-\alpha) \operatorname{reduce}(\mathrm{ce}), \quad
        \operatorname{reduce}(x) = \frac{\sum x \cdot m}{\max(\sum m, 1)}

    with the CE term only when ``use_hard_labels``. Sparse targets were computed at the cache
    temperature, which must equal ``temperature``; ``SampledTargets`` support only
    ``divergence="forward_kl"`` (the estimator is unbiased for the forward KL alone).
    ``valid_vocab_size`` restricts the divergence (not the CE) to the real ids, as in
    :func:`token_losses`.

    Args:
      student_logits: ``[batch, seq, vocab]``.
      targets: :class:`DenseTargets`, :class:`TopKTargets` or :class:`SampledTargets`.
      attention_mask: ``[batch, seq]`` or ``None``; labels: ``[batch, seq]`` aligned, or None.
      valid_vocab_size: the tokenizer's vocabulary size n (a Python int) when the head is
        padded past it; ``None`` (or n >= vocab): every id is real.
    Returns:
      ``(loss, metrics)``: scalar float32 and a dict with ``kl_loss``, ``teacher_entropy``,
      ``top1_agreement`` and, when labels are given, ``ce_loss``.
    """
    check_loss_inputs(student_logits, targets, attention_mask, labels, use_hard_labels,
                      temperature, alpha, divergence, beta, valid_vocab_size=valid_vocab_size)
    terms = token_losses(student_logits, targets, labels, temperature=temperature,
                         divergence=divergence, beta=beta, valid_vocab_size=valid_vocab_size)
    mask = loss_mask(attention_mask, labels, student_logits.shape[:-1])
    return combine_token_losses(terms, mask, use_hard_labels, temperature, alpha)


def distillation_loss(student_logits, teacher_logits, attention_mask=None, labels=None,
                      use_hard_labels=False, temperature=4.0, alpha=0.9, *,
                      divergence="forward_kl", beta=0.5, valid_vocab_size=None):
    r"""Knowledge-distillation loss (Hinton et al., 2015), EasyDeL 0.3's signature and semantics.

    With :math:`p = \operatorname{softmax}(t/T)` (teacher, no gradient),
    :math:`\log q = \operatorname{log\_softmax}(s/T)`, mask
    :math:`m = \mathrm{attention\_mask} \cdot [\mathrm{labels} \ne -100]` (each factor when
    given) and :math:`N = \max(\sum m, 1)`:

    .. math::
        \mathrm{kl}_i &= \sum_v p_{iv} (\log p_{iv} - \log q_{iv})
            \quad\text{(or another divergence: pipeline/losses/divergences.py)} \\
        \mathrm{kl\_loss} &= T^2 \, \tfrac{1}{N} \textstyle\sum_i m_i\, \mathrm{kl}_i \\
        \mathrm{ce\_loss} &= \tfrac{1}{N} \textstyle\sum_i m_i
            \bigl(\operatorname{logsumexp}(s_i) - s_{i,y_i}\bigr) \\
        \mathrm{loss} &= \alpha\, \mathrm{kl\_loss} + (1-\alpha)\, \mathrm{ce\_loss}
            \ \text{if use\_hard\_labels, else } \alpha\, \mathrm{kl\_loss}

    With neither mask nor labels the means are plain means. The KL is summed directly (never
    as cross-entropy minus entropy), in float32 fused with the upcast of bf16/f16 inputs.
    With ``valid_vocab_size`` = n, p and q are the softmaxes over the real ids v < n only
    (:func:`restrict_to_vocab`), so a padded head's columns (a full-mode cache's −1e9
    logits) neither enter the divergence nor get its gradient; the CE stays over all ids.

    Args:
      student_logits: ``[batch, seq, vocab]``.
      teacher_logits: ``[batch, seq, vocab]``, same shape.
      attention_mask: ``[batch, seq]``, 1 = real token, 0 = padding; or ``None``.
      labels: ``[batch, seq]`` int, aligned with the logits (labels[:, t] is the target of
        logits[:, t]); -100 = no loss; or ``None``.
      use_hard_labels: add the CE on ``labels`` (which must then be given).
      temperature: T > 0. alpha: α in [0, 1].
      divergence: a name of ``DIVERGENCES`` (pipeline/losses/divergences.py):
        ``"forward_kl"`` (default, the seed's), ``"reverse_kl"`` or ``"jsd"``.
      beta: the generalized-JSD β in [0, 1] (0.5 symmetric; 0 = forward KL, 1 = reverse KL).
      valid_vocab_size: the tokenizer's vocabulary size (a Python int) when the heads are
        padded past it; ``None`` (default, EasyDeL's semantics) or >= vocab: all ids are real.
    Returns:
      ``(loss, metrics)``: scalar float32 and ``kl_loss``, ``teacher_entropy`` (of p at T),
      ``top1_agreement`` (masked fraction of tokens where the argmaxes agree), and ``ce_loss``
      when labels are given.

    >>> import jax.numpy as jnp
    >>> s = jnp.array([[[2.0, 0.0, -1.0]]]); t = jnp.array([[[1.0, 0.5, -1.0]]])
    >>> loss, metrics = distillation_loss(s, t, temperature=1.0, alpha=1.0)
    >>> round(float(loss), 4)
    0.2149
    """
    return targets_distillation_loss(student_logits, DenseTargets(teacher_logits),
                                     attention_mask, labels, use_hard_labels, temperature,
                                     alpha, divergence=divergence, beta=beta,
                                     valid_vocab_size=valid_vocab_size)

"""Per-token terms of a distillation loss for each kind of teacher targets.

The one place where dense, top-k and sampled targets part ways; the divergence itself comes
from the table in pipeline/losses/divergences.py.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pipeline.losses.dense import clamp_rounding, dense_divergence
from pipeline.losses.divergences import DEFINITIONS, resolve
from pipeline.losses.softmax import F32, logsumexp, restrict_to_vocab, scaled, token_entropy
from pipeline.losses.sparse import logprobs_at, token_cross_entropy, topk_bucket_logprobs
from pipeline.losses.targets import DenseTargets, Targets, TopKTargets


class TokenLosses(NamedTuple):
    """Per-token terms of a distillation loss, each ``[batch, seq]`` float32.

    ``divergence`` and ``cross_entropy`` carry the gradient; the other two are metrics.
    """

    divergence: jax.Array  # unscaled (no T²)
    cross_entropy: jax.Array | None  # at temperature 1; None when labels are not used
    teacher_entropy: jax.Array
    top1_agreement: jax.Array  # 1.0 where the student's argmax is the teacher's top id


def token_losses(student_logits: jax.Array, targets: Targets, labels=None, *,
                 temperature, divergence: str = "forward_kl", beta: float = 0.5,
                 valid_vocab_size: int | None = None) -> TokenLosses:
    r"""Per-token divergence, cross-entropy and metrics for any kind of teacher targets.

    With :math:`n` = ``valid_vocab_size`` (``None``: every id is real), the ids :math:`v \ge n`
    are padding columns of the model's head, and every distribution below is over the real
    ids alone: :math:`\tilde s` = :func:`restrict_to_vocab` (s, n) (−inf at padding),
    :math:`z = \tilde s/T`, :math:`\log q = \operatorname{log\_softmax}(z)`, so
    :math:`q_v = e^{s_v/T} / \sum_{u<n} e^{s_u/T}` for :math:`v < n` and 0 at padding (the
    teacher's likewise; a teacher's −inf or −1e9 logits at padding are ignored). Padding
    columns thus get no gradient from the divergence, and top-1 agreement uses the student's
    argmax over the real ids. The hard-label cross-entropy stays over the full logits at
    T = 1: it is the language-modelling loss of the model as it will be used, and it keeps
    pushing the padded logits down.

    - ``DenseTargets``: :math:`\log p = \operatorname{log\_softmax}(t/T)`; the divergence
      (a name of the table in pipeline/losses/divergences.py) over the vocabulary, its
      gradient in closed form (:func:`~pipeline.losses.dense.dense_divergence`); entropy of p;
      top id = argmax t.
    - ``TopKTargets``: the same divergences over the k+1 buckets of
      :func:`topk_bucket_logprobs` (exact, no renormalisation of the top k); entropy of the
      k+1-bucket distribution (a lower bound of the teacher's entropy); top id = the id of
      highest log-prob.
    - ``SampledTargets`` (the divergences with ``from_samples``: the forward KL): with
      :math:`c_j` the draw counts of ids :math:`y_j` and :math:`H` the stored teacher entropy,

      .. math::
          \widehat{\mathrm{kl}} = -\sum_j \frac{c_j}{\sum_k c_k} \log q_{y_j} - H

      whose expectation over the draws is the forward KL, in value and in gradient
      (:math:`\mathbb{E}[c_j/n] = p_{y_j}`); entropy = the stored one; top id = the most drawn.
      Unlike the exact divergences (clamped at 0 against float32 rounding), one draw's
      estimate can be negative.

    Student logits must be finite; teacher logits may be −inf (p = 0: those terms count 0;
    the reverse KL is then +inf where the student has mass, as its definition says).
    Teacher terms are under ``stop_gradient``. Returns a :class:`TokenLosses`; its
    ``cross_entropy`` is ``None`` when ``labels`` is ``None``.
    """
    divergence = resolve(divergence, beta)
    definition = DEFINITIONS[divergence]
    temperature = jnp.asarray(temperature, F32)
    student_top = jnp.argmax(restrict_to_vocab(student_logits, valid_vocab_size), axis=-1)
    if isinstance(targets, DenseTargets):
        teacher_logits = jax.lax.stop_gradient(targets.logits)
        div = clamp_rounding(dense_divergence(student_logits, teacher_logits, temperature,
                                              divergence, beta, valid_vocab_size))
        z_t = scaled(teacher_logits, temperature, valid_vocab_size)
        entropy = token_entropy(z_t - logsumexp(z_t)[..., None])
        teacher_top = jnp.argmax(restrict_to_vocab(teacher_logits, valid_vocab_size), axis=-1)
    elif isinstance(targets, TopKTargets):
        targets = jax.lax.stop_gradient(targets)
        student_buckets, teacher_buckets = topk_bucket_logprobs(
            student_logits, targets, temperature, valid_vocab_size=valid_vocab_size)
        div = jnp.maximum(definition.value(teacher_buckets, student_buckets, beta)[0], 0.0)
        entropy = token_entropy(teacher_buckets)
        teacher_top = _id_of_max(targets.ids, targets.logprobs)
    else:
        targets = jax.lax.stop_gradient(targets)
        counts = targets.counts.astype(F32)
        total = jnp.sum(counts, axis=-1, keepdims=True)
        weights = jnp.where(total > 0, counts / jnp.maximum(total, 1e-30), 0.0)
        at_ids = logprobs_at(student_logits, targets.ids.astype(jnp.int32), None, temperature,
                             valid_vocab_size)
        entropy = targets.entropy.astype(F32)
        div = definition.from_samples(weights, at_ids, entropy)
        teacher_top = _id_of_max(targets.ids, counts)
    ce = None if labels is None else token_cross_entropy(student_logits, labels)
    agreement = (student_top == teacher_top).astype(F32)
    return TokenLosses(div, ce, entropy, agreement)


def _id_of_max(ids: jax.Array, values: jax.Array) -> jax.Array:
    """The id whose value is largest (the first one on ties), ``[..., n]`` → ``[...]``."""
    pick = jnp.argmax(values, axis=-1)
    return jnp.take_along_axis(ids, pick[..., None], axis=-1)[..., 0]


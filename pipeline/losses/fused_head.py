"""Output head and distillation loss fused, chunk by chunk over tokens.

The student's logits ``hidden @ head.T`` are ``[tokens, vocab]``: 4 GiB in float32 at 8192
tokens and a 128k vocabulary, and autodiff keeps them (and their gradient) alive for the
backward pass. Here the head is applied to ``chunk_size`` tokens at a time and the loss of the
chunk *and its gradient* are computed at once (the loss is a sum over tokens with weights known
before the loop, so each chunk's share of the gradient is final when the chunk is done). The
backward pass only scales the stored gradients by the incoming cotangent, so the logits are
computed once (three matmuls per chunk, as many as the unfused forward and backward), and
nothing ``[tokens, vocab]``-sized is ever live: only one chunk's logits, their gradient, the
``[vocab, hidden]`` head-gradient accumulator and the ``[tokens, hidden]`` hidden gradient.

A token count that ``chunk_size`` does not divide is handled by letting the last chunk overlap
the previous one and masking the overlapped rows out, so nothing is padded or copied.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pipeline.losses.checks import check_loss_inputs
from pipeline.losses.distill import combine_token_losses
from pipeline.losses.reduce import loss_mask
from pipeline.losses.token_losses import TokenLosses, token_losses
from pipeline.errors import ConfigError, KdpipeError

_F32 = jnp.float32


def fused_head_distillation_loss(hidden, head, targets, attention_mask=None, labels=None,
                                 use_hard_labels=False, temperature=4.0, alpha=0.9, *,
                                 divergence="forward_kl", beta=0.5, valid_vocab_size=None,
                                 chunk_size=1024):
    r"""``targets_distillation_loss(hidden @ head.T, ...)`` without ever holding the logits.

    Same loss, metrics and semantics as :func:`pipeline.losses.targets_distillation_loss` on
    the student logits :math:`s = h W^\top`, for dense, top-k and sampled targets:

    .. math::
        \mathrm{loss} = \alpha\, T^2 \frac{\sum_i m_i\,\mathrm{div}_i}{N}
            + (1-\alpha) \frac{\sum_i m_i\,\mathrm{ce}_i}{N},
        \qquad N = \max(\textstyle\sum_i m_i, 1)

    (CE only when ``use_hard_labels``), with the gradient w.r.t. ``hidden`` and ``head``
    accumulated chunk by chunk in float32. The logits of a chunk are computed in float32 from
    bf16 inputs (``preferred_element_type``), so with bf16 inputs this is slightly *more*
    precise than materialising bf16 logits. Only ``loss`` is differentiable; the metrics are
    constants to autodiff.

    Args:
      hidden: ``[batch, seq, hidden]`` final hidden states of the student.
      head: ``[vocab, hidden]`` output projection (Hugging Face layout).
      targets: ``DenseTargets`` (``[batch, seq, vocab]`` teacher logits), ``TopKTargets`` or
        ``SampledTargets``.
      attention_mask, labels, use_hard_labels, temperature, alpha, divergence, beta,
        valid_vocab_size: as in :func:`pipeline.losses.distillation_loss` (with
        ``valid_vocab_size`` = n, the divergence is over the real ids v < n of each chunk's
        logits, whose padding columns get only the CE's gradient).
      chunk_size: tokens per chunk (a Python int); memory per chunk is about
        ``3 · chunk_size · vocab · 4`` bytes.
    Returns:
      ``(loss, metrics)`` as :func:`pipeline.losses.targets_distillation_loss`.
    """
    if hidden.ndim != 3 or head.ndim != 2:
        raise KdpipeError(f"hidden/head: expected [batch, seq, hidden] and [vocab, hidden], got "
                          f"{tuple(hidden.shape)} and {tuple(head.shape)}")
    if hidden.shape[-1] != head.shape[-1]:
        raise KdpipeError(f"head: hidden width {head.shape[-1]} != the hidden states' width "
                          f"{hidden.shape[-1]} (head must be [vocab, hidden])")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    logits_shape = jax.ShapeDtypeStruct((*hidden.shape[:-1], head.shape[0]), hidden.dtype)
    check_loss_inputs(logits_shape, targets, attention_mask, labels, use_hard_labels,
                      temperature, alpha, divergence, beta, valid_vocab_size=valid_vocab_size)

    tokens = hidden.shape[0] * hidden.shape[1]
    mask = loss_mask(attention_mask, labels, hidden.shape[:-1]).reshape(tokens)
    denominator = jnp.maximum(jnp.sum(mask), 1.0)
    temperature = jnp.asarray(temperature, _F32)
    div_weight = alpha * temperature ** 2 * mask / denominator
    ce_weight = (1.0 - alpha) * mask / denominator if use_hard_labels else jnp.zeros_like(mask)
    flat_targets = type(targets)(*(x.reshape(tokens, *x.shape[2:]) for x in targets))
    flat_labels = None if labels is None else labels.reshape(tokens)
    config = (divergence, beta, valid_vocab_size, min(chunk_size, tokens))
    loss, div, ce, entropy, agreement = _fused_loss(
        hidden.reshape(tokens, hidden.shape[-1]), head,
        (flat_targets, flat_labels, div_weight, ce_weight, temperature),
        config)
    terms = TokenLosses(div, None if labels is None else ce, entropy, agreement)
    _, metrics = combine_token_losses(
        jax.lax.stop_gradient(terms), mask, use_hard_labels, temperature, alpha)
    return loss, metrics


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_loss(hidden, head, aux, config):
    return _chunk_loop(hidden, head, aux, config, with_grad=False)[0]


def _fused_loss_fwd(hidden, head, aux, config):
    outputs, grads = _chunk_loop(hidden, head, aux, config, with_grad=True)
    return outputs, grads


def _fused_loss_bwd(config, grads, cotangents):
    # Only the loss is differentiable (the per-token metric outputs are constants).
    d_hidden, d_head = grads
    scale = cotangents[0]
    return ((scale * d_hidden).astype(d_hidden.dtype), (scale * d_head).astype(d_head.dtype),
            None)


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)


def _chunk_loop(hidden, head, aux, config, *, with_grad):
    """One pass over token chunks: the loss, per-token terms and (optionally) the gradients."""
    targets, labels, div_weight, ce_weight, temperature = aux
    divergence, beta, valid_vocab_size, chunk = config
    tokens = hidden.shape[0]
    num_chunks = -(-tokens // chunk)
    vocab_block = min(_VOCAB_BLOCK, head.shape[0])
    hidden_bits = _to_bits(hidden)
    targets_bits = tuple(_to_bits(x) for x in targets)
    target_dtypes = tuple(x.dtype for x in targets)

    def chunk_loss(logits, targets_c, labels_c, div_w, ce_w):
        terms = token_losses(logits, targets_c, labels_c, temperature=temperature,
                             divergence=divergence, beta=beta, valid_vocab_size=valid_vocab_size)
        ce = terms.cross_entropy
        if ce is None:
            ce = jnp.zeros_like(terms.divergence)
        loss = jnp.sum(div_w * terms.divergence) + jnp.sum(ce_w * ce)
        return loss, (terms.divergence, ce, terms.teacher_entropy, terms.top1_agreement)

    def body(i, carry):
        # The last chunk may overlap its predecessor; `fresh` masks the rows already done.
        start = jnp.minimum(i * chunk, tokens - chunk)
        fresh = (start + jnp.arange(chunk)) >= i * chunk

        def take(x):
            return jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=0)

        h_c = _from_bits(take(hidden_bits), hidden.dtype)
        targets_c = type(targets)(*(_from_bits(take(x), dtype)
                                    for x, dtype in zip(targets_bits, target_dtypes)))
        labels_c = None if labels is None else take(labels)
        div_w = jnp.where(fresh, take(div_weight), 0.0)
        ce_w = jnp.where(fresh, take(ce_weight), 0.0)
        logits = jnp.dot(h_c, head.T, preferred_element_type=_F32)  # [chunk, vocab]
        args = (logits, targets_c, labels_c, div_w, ce_w)
        if with_grad:
            (loss_c, per_token), d_logits = jax.value_and_grad(chunk_loss, has_aux=True)(*args)
        else:
            loss_c, per_token = chunk_loss(*args)
        loss, per_token_all, grads = carry
        per_token_all = tuple(jax.lax.dynamic_update_slice_in_dim(acc, x, start, axis=0)
                              for acc, x in zip(per_token_all, per_token))
        if with_grad:
            d_hidden, d_head = grads
            d_h_c = jnp.dot(d_logits, head, preferred_element_type=_F32)
            d_h_c = jnp.where(fresh[:, None], d_h_c, take(d_hidden))
            d_hidden = jax.lax.dynamic_update_slice_in_dim(d_hidden, d_h_c, start, axis=0)
            d_head = _add_outer_product(d_head, d_logits, h_c, vocab_block)
            grads = (d_hidden, d_head)
        return loss + loss_c, per_token_all, grads

    per_token = tuple(jnp.zeros((tokens,), _F32) for _ in range(4))
    grads = (jnp.zeros(hidden.shape, _F32), jnp.zeros(head.shape, _F32)) if with_grad else ()
    loss, per_token, grads = jax.lax.fori_loop(0, num_chunks, body,
                                               (jnp.zeros((), _F32), per_token, grads))
    if with_grad:
        grads = (grads[0].astype(hidden.dtype), grads[1].astype(head.dtype))
    return (loss, *per_token), grads


# Rows of the head gradient updated per step: XLA cannot add a matmul into an existing buffer,
# so each update's [rows, hidden] product is a temporary; a whole [vocab, hidden] one per chunk
# would cost as much as the accumulator itself.
_VOCAB_BLOCK = 8192


def _add_outer_product(acc, d_logits, h_c, block):
    """``acc + d_logits.T @ h_c``, ``block`` rows of ``acc`` ``[vocab, hidden]`` at a time.

    A vocab size that ``block`` does not divide gets a last block overlapping the previous
    one, its already-updated rows masked out.
    """
    vocab = acc.shape[0]

    def body(j, acc):
        start = jnp.minimum(j * block, vocab - block)
        fresh = (start + jnp.arange(block)) >= j * block
        d_block = jax.lax.dynamic_slice_in_dim(d_logits, start, block, axis=1)
        update = jnp.dot(jnp.where(fresh[None, :], d_block, 0.0).T, h_c,
                         preferred_element_type=_F32)
        rows = jax.lax.dynamic_slice_in_dim(acc, start, block, axis=0)
        return jax.lax.dynamic_update_slice_in_dim(acc, rows + update, start, axis=0)

    return jax.lax.fori_loop(0, -(-vocab // block), body, acc)


# XLA on CPU computes in f32 what it cannot do in bf16, and its loop-invariant code motion
# then upcasts a whole bf16 loop input (the [tokens, vocab] teacher logits, the hidden states)
# once before the loop, recreating the big array this module avoids. Passing 16-bit floats
# into the loop as raw bits and reinterpreting each chunk inside keeps the upcast per chunk.
# Bitcasts are free on every backend.


def _to_bits(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16)
    return x


def _from_bits(x: jax.Array, dtype) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x

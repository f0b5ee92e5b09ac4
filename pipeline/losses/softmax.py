"""Softmax pieces over the vocabulary: scaling, a padded head's real ids, logsumexp, x log x/y.

Every distribution a kdpipe loss compares is a softmax of ``logits / T`` over the real ids of
the head; this module is where that softmax is taken apart into the pieces the divergences'
forward and backward passes share. Shapes: ``[..., vocab]`` in, ``[...]`` or ``[..., vocab]``
out. The math runs in float32 whatever the input dtype, elementwise, so XLA fuses the upcast
into its consumers instead of copying a bf16 ``[tokens, vocab]`` input whole.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

F32 = jnp.float32


def restrict_to_vocab(logits: jax.Array, valid_vocab_size: int | None) -> jax.Array:
    r"""A padded head's logits over the real ids: the one definition of padding in kdpipe.

    Qwen-family models pad the head past the tokenizer's vocabulary (model vocab V > tokenizer
    vocab n = ``valid_vocab_size``); ids :math:`v \ge n` are no tokens. Restricted logits are

    .. math::
        \tilde s_v = s_v \ (v < n), \qquad \tilde s_v = -\infty \ (v \ge n)

    so :math:`\operatorname{softmax}(\tilde s / T)` is the model's distribution renormalised
    over the real ids, :math:`\log q_v = s_v/T - \operatorname{logsumexp}_{u<n} s_u/T`.

    Args:
      logits: ``[..., vocab]``, any float dtype (kept).
      valid_vocab_size: n, a Python int; ``None`` or n >= vocab restricts nothing.
    Returns:
      ``[..., vocab]``, the input itself when nothing is restricted.
    """
    if valid_vocab_size is None or valid_vocab_size >= logits.shape[-1]:
        return logits
    real = jnp.arange(logits.shape[-1]) < valid_vocab_size
    return jnp.where(real, logits, jnp.asarray(-jnp.inf, logits.dtype))


def scaled(logits: jax.Array, temperature, valid_vocab_size: int | None = None) -> jax.Array:
    """``restrict_to_vocab(logits / T)`` in float32, ``[..., vocab]``."""
    # Elementwise, so XLA fuses the f32 upcast and the restriction to the real ids into their
    # consumers instead of materialising an f32 (or masked) copy of the logits.
    return restrict_to_vocab(logits.astype(F32) / temperature, valid_vocab_size)


class Softmax(NamedTuple):
    r"""``softmax(z)`` over the last axis, kept as its pieces.

    :math:`\operatorname{logsumexp}(z) = \mathrm{shift} + \log \mathrm{total}` with
    :math:`\mathrm{total} = \sum_v e^{z_v - \mathrm{shift}}`. A backward pass rebuilds it from
    ``z`` and the two per-token residuals (:func:`softmax_parts`), so its ``exp(z - shift)``
    terms are the forward's and XLA computes them once.
    """

    z: jax.Array  # [..., n] float32
    shift: jax.Array  # [...]
    total: jax.Array  # [...]

    def logsumexp(self) -> jax.Array:
        return self.shift + jnp.log(self.total)

    def log_probs(self) -> jax.Array:
        return self.z - self.logsumexp()[..., None]

    def probs(self) -> jax.Array:
        return shifted_exp(self.z, self.shift) / self.total[..., None]


def softmax_parts(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(shift, Σ_v exp(z_v − shift))`` over the last axis (see :class:`Softmax`)."""
    # jax.nn.logsumexp's shift is the row max selected by isfinite; here the max is clamped
    # from below instead: XLA's CPU backend fuses no select into its YNNPACK kernels, so the
    # select split the dense loss's gradient into pieces with [tokens, vocab] temporaries
    # between them (tests/test_loss_memory.py). An all −inf row still gives −inf; logits are
    # finite (student) or −inf (teacher), so a +inf max does not occur.
    shift = jax.lax.stop_gradient(jnp.maximum(jnp.max(z, axis=-1), jnp.finfo(z.dtype).min))
    return shift, jnp.sum(shifted_exp(z, shift), axis=-1)


def shifted_exp(z: jax.Array, shift: jax.Array) -> jax.Array:
    return jnp.exp(z - shift[..., None])


def logsumexp(z: jax.Array) -> jax.Array:
    """``log Σ_v exp(z_v)`` over the last axis, ``[..., n]`` → ``[...]``."""
    return Softmax(z, *softmax_parts(z)).logsumexp()


def xlogx_ratio(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """``a (log a − log b)`` elementwise, 0 where ``a = 0``, with finite gradients there
    (a nan stays nan)."""
    present = log_a != -jnp.inf
    log_a = jnp.where(present, log_a, 0.0)
    log_b = jnp.where(present, log_b, 0.0)
    return jnp.where(present, jnp.exp(log_a) * (log_a - log_b), 0.0)


def token_entropy(logprobs: jax.Array) -> jax.Array:
    r"""Per-token entropy :math:`H = -\sum_v p_v \log p_v`, ``[..., n]`` log-probs → ``[...]``."""
    return -jnp.sum(xlogx_ratio(logprobs, jnp.zeros_like(logprobs)), axis=-1)

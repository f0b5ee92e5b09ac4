"""Distillation losses: pure functions of arrays, with their math in the docstrings.

The semantics follow EasyDeL 0.3's ``distillation_loss`` (names, parameters, defaults, the
T²-scaled forward KL, the token mean over ``attention_mask × (labels != -100)``, CE at
temperature 1, α mixing), with these differences in *how*, never in *what* (and one opt-in
extension, the last):

- the KL is computed directly as ``Σ p_t (log p_t − log p_s)``, never as a difference of two
  large cross-entropies (that difference goes negative in bf16, EasyDeL issue #267);
- all math runs in float32 whatever the input dtype, but the upcast is elementwise inside the
  reductions, so XLA fuses it and a bf16 ``[tokens, vocab]`` input is never copied whole;
- besides the forward KL there are the reverse KL and the generalized Jensen-Shannon
  divergence of GKD (Agarwal et al., 2024), and sparse teacher targets (``TopKTargets``,
  ``SampledTargets``) read from the teacher-output cache; the student's top-k tail mass is
  summed over the tail ids, never as ``1 − Σ_top-k q`` (which cancels in float32 once the
  student is sure of its top ids), and its backward pass is written to avoid cancellation;
- ``valid_vocab_size`` (``None`` = EasyDeL's semantics) marks the ids of a
  padded head (Qwen-family models) from the tokenizer's vocabulary size on as padding
  (:func:`restrict_to_vocab`): the divergences are taken between the distributions over the
  real ids only; the hard-label CE stays over the full logits.

Shapes: ``[..., vocab]`` logits with any leading token shape (usually ``[batch, seq]``);
per-token functions return the leading shape. Every function is traceable under ``jax.jit``;
the scalar settings (``temperature``, ``alpha``, ``divergence``, ``beta``,
``valid_vocab_size``, layer indices) are checked at trace time and must be Python values when
they select code (``divergence``, ``beta``, ``valid_vocab_size``, layers). ``temperature`` and
``alpha`` may be traced, then they are not range-checked.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pipeline.errors import ConfigError, KdpipeError

IGNORE_INDEX = -100
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
_F32 = jnp.float32


# --------------------------------------------------------------------------- teacher targets


class DenseTargets(NamedTuple):
    """The teacher's full logits."""

    logits: jax.Array  # [batch, seq, vocab], any float dtype


class TopKTargets(NamedTuple):
    """The teacher's k most likely ids per token and the log of the mass outside them.

    The log-probabilities were taken at the cache temperature ``T_cache``; the loss must run at
    ``temperature == T_cache`` (the boundary refuses other temperatures).
    """

    ids: jax.Array  # [batch, seq, k] int32
    logprobs: jax.Array  # [batch, seq, k] log softmax(teacher_logits / T_cache) at ids
    tail_logmass: jax.Array  # [batch, seq] log(1 − Σ exp(logprobs)); −inf when k = vocab


class SampledTargets(NamedTuple):
    """Ids drawn from the teacher distribution at ``T_cache`` (Anshumann et al., 2025).

    Unique ids per token with how often each was drawn (unused slots have count 0), and the
    teacher's entropy at ``T_cache`` so that the KL *value* estimate is unbiased too.
    """

    ids: jax.Array  # [batch, seq, n] int32
    counts: jax.Array  # [batch, seq, n] float32, sums to the number of draws
    entropy: jax.Array  # [batch, seq] float32


Targets = DenseTargets | TopKTargets | SampledTargets

_BATCH_KEYS = {
    DenseTargets: ("teacher_logits",),
    TopKTargets: ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logmass"),
    SampledTargets: ("teacher_sample_ids", "teacher_sample_counts", "teacher_entropy"),
}


def targets_from_batch(batch: Mapping[str, jax.Array]) -> Targets:
    """The teacher targets a batch carries (``_BATCH_KEYS`` above lists the keys of each kind).

    Raises:
      KdpipeError: the batch holds no kind of targets, several kinds, or a kind only in part.
    """
    found = [kind for kind, keys in _BATCH_KEYS.items() if any(k in batch for k in keys)]
    if len(found) != 1:
        raise KdpipeError(
            "batch: expected the teacher targets of exactly one kind "
            f"({', '.join(k[0] for k in _BATCH_KEYS.values())}, ...), "
            f"got {len(found)} kinds among keys {sorted(batch)}"
        )
    kind = found[0]
    missing = [k for k in _BATCH_KEYS[kind] if k not in batch]
    if missing:
        raise KdpipeError(f"batch: {kind.__name__} needs keys {list(_BATCH_KEYS[kind])}, "
                          f"missing {missing}")
    return kind(*(batch[k] for k in _BATCH_KEYS[kind]))


# --------------------------------------------------------------------------- checks


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_settings(temperature, alpha, divergence, beta) -> None:
    if _is_concrete(temperature) and not float(temperature) > 0:
        raise ConfigError(f"temperature: expected > 0, got {temperature}")
    if _is_concrete(alpha) and not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"alpha: expected in [0, 1], got {alpha}")
    if divergence not in DIVERGENCES:
        raise ConfigError(f"divergence: expected one of {DIVERGENCES}, got {divergence!r}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ConfigError(f"beta: expected in [0, 1], got {beta}")


def _check_token_shape(name: str, array, token_shape: tuple[int, ...]) -> None:
    if array is not None and tuple(array.shape) != token_shape:
        raise KdpipeError(f"{name}: expected shape {token_shape} (the logits' token shape), "
                          f"got {tuple(array.shape)}")


def _check_valid_vocab_size(valid_vocab_size) -> None:
    # A Python int: it selects code (which columns are padding) at trace time.
    if valid_vocab_size is not None and (isinstance(valid_vocab_size, bool)
                                         or not isinstance(valid_vocab_size, int)
                                         or valid_vocab_size < 1):
        raise ConfigError(f"valid_vocab_size: expected None or an int >= 1 (the tokenizer's "
                          f"vocabulary size), got {valid_vocab_size!r}")


def _check_labels(use_hard_labels: bool, labels) -> None:
    if use_hard_labels and labels is None:
        raise KdpipeError("labels: use_hard_labels=True needs labels, got labels=None")


def check_targets(student_logits: jax.Array, targets: Targets) -> None:
    """Checks that ``targets`` fit ``student_logits`` ``[..., vocab]`` (shapes only)."""
    tokens, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    if isinstance(targets, DenseTargets):
        if targets.logits.shape != student_logits.shape:
            raise KdpipeError(
                f"teacher_logits: expected the student logits' shape {tuple(student_logits.shape)}"
                f" (tokens {tokens}, vocab {vocab}), got {tuple(targets.logits.shape)}")
        return
    ids, values, per_token = targets
    for name, array in (("ids", ids), ("values", values)):
        if tuple(array.shape[:-1]) != tokens:
            raise KdpipeError(f"{type(targets).__name__}.{name}: expected leading shape {tokens}"
                              f" (the student logits' tokens), got {tuple(array.shape)}")
    if ids.shape != values.shape:
        raise KdpipeError(f"{type(targets).__name__}: ids {tuple(ids.shape)} and values "
                          f"{tuple(values.shape)} must have the same shape")
    if ids.shape[-1] > vocab:
        raise KdpipeError(f"{type(targets).__name__}.ids: {ids.shape[-1]} ids per token exceed "
                          f"the student vocab {vocab}")
    _check_token_shape(f"{type(targets).__name__}.{targets._fields[2]}", per_token, tokens)


# --------------------------------------------------------------------------- masks, reduction


def loss_mask(attention_mask, labels, batch_shape: Sequence[int]) -> jax.Array:
    """The token mask ``m = attention_mask × (labels != -100)``, ``[batch, seq]`` float32.

    Each factor is used when given; all ones when both are ``None``.
    """
    mask = jnp.ones(tuple(batch_shape), _F32)
    if attention_mask is not None:
        mask = mask * attention_mask.astype(_F32)
    if labels is not None:
        mask = mask * (labels != IGNORE_INDEX).astype(_F32)
    return mask


def masked_token_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    r"""Token mean over a mask: the one reducer of every kdpipe loss.

    .. math::
        \operatorname{reduce}(x) = \frac{\sum_i x_i m_i}{\max(\sum_i m_i, 1)}

    Args:
      x: ``[batch, seq]`` per-token values.
      mask: ``[batch, seq]`` weights (usually 0/1), or ``None`` for a plain mean.
    Returns:
      A float32 scalar.
    """
    x = x.astype(_F32)
    if mask is None:
        return jnp.mean(x)
    mask = mask.astype(_F32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# --------------------------------------------------------------------------- per-token terms
#
# The student-side functions below carry closed-form VJPs. Autodiff of the plain formulas
# leaves XLA a chain of [tokens, vocab] intermediates (a GiB or more at 8192 x 32768); each VJP
# here is one elementwise pass over the logits (plus a k-sized scatter for sparse ids), so
# forward and backward need only per-token temporaries.


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


def _scaled(logits: jax.Array, temperature, valid_vocab_size: int | None = None) -> jax.Array:
    # Elementwise, so XLA fuses the f32 upcast and the restriction to the real ids into their
    # consumers instead of materialising an f32 (or masked) copy of the logits.
    return restrict_to_vocab(logits.astype(_F32) / temperature, valid_vocab_size)


def _softmax_parts(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(shift, Σ_v exp(z_v − shift))`` over the last axis: logsumexp = shift + log Σ and
    softmax = ``_shifted_exp(z, shift) / Σ``."""
    # jax.nn.logsumexp's shift is the row max selected by isfinite; here the max is clamped
    # from below instead: XLA's CPU backend fuses no select into its YNNPACK kernels, so the
    # select split the dense loss's gradient into pieces with [tokens, vocab] temporaries
    # between them (tests/test_loss_memory.py). An all −inf row still gives −inf; logits are
    # finite (student) or −inf (teacher), so a +inf max does not occur.
    shift = jax.lax.stop_gradient(jnp.maximum(jnp.max(z, axis=-1), jnp.finfo(z.dtype).min))
    return shift, jnp.sum(_shifted_exp(z, shift), axis=-1)


def _shifted_exp(z: jax.Array, shift: jax.Array) -> jax.Array:
    return jnp.exp(z - shift[..., None])


def _logsumexp(z: jax.Array) -> jax.Array:
    shift, total = _softmax_parts(z)
    return shift + jnp.log(total)


@jax.custom_jvp
def _clamp_rounding(divergence: jax.Array) -> jax.Array:
    """``max(div, 0)`` in value, the identity in derivative.

    An exact divergence is ≥ 0; the clamp only removes float32 rounding below 0, so the
    gradient stays the divergence's own, and a gradient-only program (``jax.grad``) need not
    compute the divergence's value at all.
    """
    return jnp.maximum(divergence, 0.0)


@_clamp_rounding.defjvp
def _clamp_rounding_jvp(primals, tangents):
    return _clamp_rounding(*primals), tangents[0]


def _resolve_divergence(divergence: str, beta: float) -> str:
    # GKD's convention (its reference code special-cases the endpoints the same way).
    if divergence == "jsd" and beta == 0.0:
        return "forward_kl"
    if divergence == "jsd" and beta == 1.0:
        return "reverse_kl"
    return divergence


def _xlogx_ratio(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """``a (log a − log b)`` elementwise, 0 where ``a = 0``, with finite gradients there
    (a nan stays nan)."""
    present = log_a != -jnp.inf
    log_a = jnp.where(present, log_a, 0.0)
    log_b = jnp.where(present, log_b, 0.0)
    return jnp.where(present, jnp.exp(log_a) * (log_a - log_b), 0.0)


def token_divergence(student_logprobs: jax.Array, teacher_logprobs: jax.Array,
                     divergence: str = "forward_kl", beta: float = 0.5) -> jax.Array:
    r"""Per-token divergence between two distributions given as log-probabilities.

    With :math:`p` the teacher, :math:`q` the student, over the last axis (the vocabulary, or
    the k+1 buckets of top-k targets):

    .. math::
        \mathrm{forward\_kl} &= \sum_v p_v (\log p_v - \log q_v) \\
        \mathrm{reverse\_kl} &= \sum_v q_v (\log q_v - \log p_v) \\
        \mathrm{jsd}_\beta &= \beta \sum_v p_v (\log p_v - \log m_v)
            + (1-\beta) \sum_v q_v (\log q_v - \log m_v), \quad m = \beta p + (1-\beta) q

    ``jsd`` is the generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024);
    β = 0.5 is the symmetric JSD. At the endpoints the mixture degenerates (the formula tends to
    0 like β·KL(p‖q) as β→0 and (1−β)·KL(q‖p) as β→1), so, as in GKD's reference code,
    **β = 0 is the forward KL** KL(p‖q) and **β = 1 the reverse KL** KL(q‖p).
    Terms of zero probability count 0 (with finite gradients).

    Args:
      student_logprobs: ``[..., n]`` float32 log q (normalised over the last axis).
      teacher_logprobs: ``[..., n]`` float32 log p.
      divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
      beta: the JSD weight in [0, 1]; a Python float.
    Returns:
      ``[...]`` float32.
    """
    divergence = _resolve_divergence(divergence, beta)
    if divergence == "forward_kl":
        return jnp.sum(_xlogx_ratio(teacher_logprobs, student_logprobs), axis=-1)
    if divergence == "reverse_kl":
        return jnp.sum(_xlogx_ratio(student_logprobs, teacher_logprobs), axis=-1)
    log_mix = jnp.logaddexp(math.log(beta) + teacher_logprobs,
                            math.log1p(-beta) + student_logprobs)
    return jnp.sum(beta * _xlogx_ratio(teacher_logprobs, log_mix)
                   + (1.0 - beta) * _xlogx_ratio(student_logprobs, log_mix), axis=-1)


def _dense_terms(z_s, z_t, lse_s, lse_t, divergence, beta):
    """Elementwise pieces shared by the dense forward and backward passes."""
    log_q = z_s - lse_s[..., None]
    log_p = z_t - lse_t[..., None]
    if divergence == "forward_kl":
        return log_q, log_p, None
    if divergence == "reverse_kl":
        return log_q, log_p, log_p
    return log_q, log_p, jnp.logaddexp(math.log(beta) + log_p, math.log1p(-beta) + log_q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _dense_divergence(student_logits, teacher_logits, temperature, divergence, beta,
                      valid_vocab_size):
    return _dense_divergence_fwd(student_logits, teacher_logits, temperature, divergence,
                                 beta, valid_vocab_size)[0]


def _dense_divergence_fwd(student_logits, teacher_logits, temperature, divergence, beta,
                          valid_vocab_size):
    # Zero-probability terms (padding columns, -inf teacher logits) count 0 via _xlogx_ratio.
    z_s = _scaled(student_logits, temperature, valid_vocab_size)
    z_t = _scaled(teacher_logits, temperature, valid_vocab_size)
    parts = _softmax_parts(z_s), _softmax_parts(z_t)
    lse_s, lse_t = (shift + jnp.log(total) for shift, total in parts)
    log_q, log_p, log_ref = _dense_terms(z_s, z_t, lse_s, lse_t, divergence, beta)
    if divergence == "forward_kl":
        div = jnp.sum(_xlogx_ratio(log_p, log_q), axis=-1)
        student_side = None
    else:
        # Σ q (log q − log r), r = p (reverse KL) or the mixture m (JSD); the backward needs it.
        student_side = jnp.sum(_xlogx_ratio(log_q, log_ref), axis=-1)
        div = student_side
        if divergence == "jsd":
            teacher_side = jnp.sum(_xlogx_ratio(log_p, log_ref), axis=-1)
            div = beta * teacher_side + (1.0 - beta) * student_side
    residuals = (student_logits, teacher_logits, temperature, parts, student_side)
    return div, residuals


def _dense_divergence_bwd(divergence, beta, valid_vocab_size, residuals, cotangent):
    # d/dz_v for z = s/T, with q = softmax(z):
    #   forward KL:  q_v − p_v
    #   reverse KL:  q_v (log q_v − log p_v − KL(q‖p))
    #   JSD_β:       (1−β) q_v (log q_v − log m_v − KL(q‖m))
    # all 0 where q_v = p_v = 0 (padding columns: their logits are constants, −inf).
    student_logits, teacher_logits, temperature, parts, student_side = residuals
    z_s = _scaled(student_logits, temperature, valid_vocab_size)
    z_t = _scaled(teacher_logits, temperature, valid_vocab_size)
    if divergence == "forward_kl":
        # The forward's exp(z − shift) terms again (XLA merges them): no third and fourth exp.
        (shift_s, total_s), (shift_t, total_t) = parts
        grad = (_shifted_exp(z_s, shift_s) / total_s[..., None]
                - _shifted_exp(z_t, shift_t) / total_t[..., None])
    else:
        lse_s, lse_t = (shift + jnp.log(total) for shift, total in parts)
        log_q, log_p, log_ref = _dense_terms(z_s, z_t, lse_s, lse_t, divergence, beta)
        q = jnp.exp(log_q)
        grad = jnp.where(log_q != -jnp.inf, q * (log_q - log_ref - student_side[..., None]), 0.0)
        if divergence == "jsd":
            grad = (1.0 - beta) * grad
    grad = grad * (cotangent / temperature)[..., None]
    return grad.astype(student_logits.dtype), None, jnp.zeros_like(temperature)


_dense_divergence.defvjp(_dense_divergence_fwd, _dense_divergence_bwd)


def _scatter_last(dense: jax.Array, ids: jax.Array, updates: jax.Array, how: str) -> jax.Array:
    """``dense[..., ids] += updates`` (``how="add"``, duplicate ids accumulate) or
    ``= updates`` (``how="set"``) along the last axis."""
    lead = dense.shape[:-1]
    flat = jax.vmap(lambda row, i, u: getattr(row.at[i], how)(u))(
        dense.reshape(-1, dense.shape[-1]), ids.reshape(-1, ids.shape[-1]),
        updates.reshape(-1, updates.shape[-1]))
    return flat.reshape(*lead, dense.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _logprobs_at(logits, ids, has_tail, temperature, valid_vocab_size):
    return _logprobs_at_fwd(logits, ids, has_tail, temperature, valid_vocab_size)[0]


def _logprobs_at_fwd(logits, ids, has_tail, temperature, valid_vocab_size):
    z = _scaled(logits, temperature, valid_vocab_size)
    if has_tail is None:
        lse = _logsumexp(z)
        at_ids = jnp.take_along_axis(z, ids, axis=-1) - lse[..., None]
        return at_ids, (logits, ids, temperature, lse, at_ids, None)
    z_ids, tail_lse = _ids_and_tail(logits, z, ids, temperature, valid_vocab_size)
    # The ids and the tail partition the (real) vocabulary: lse needs no pass of its own.
    lse = _logsumexp(jnp.concatenate([z_ids, tail_lse[..., None]], axis=-1))
    at_ids = z_ids - lse[..., None]
    tail = jnp.where(has_tail, tail_lse - lse, -jnp.inf)
    out = jnp.concatenate([at_ids, tail[..., None]], axis=-1)
    return out, (logits, ids, temperature, lse, at_ids, tail)


def _ids_and_tail(logits, z, ids, temperature, valid_vocab_size):
    r"""``(z at ids [..., k], logsumexp of z over the real ids outside ids [...])``, for
    distinct ids; the tail is −inf when no real id is outside them.

    The tail is summed over the ids outside ``ids`` directly: :math:`\log(1 - \sum_j q_j)`
    loses it once it is below float32 epsilon of the mass (a confident student). With
    :math:`c = \max_{v \notin K} z_v` every tail term is :math:`e^{z_v - c} \le 1`, and

    .. math::
        \sum_{v \notin K} e^{z_v - c} = \sum_v e^{-|z_v - c|} - \sum_{j \in K} e^{-|z_j - c|}

    (an id above c enters both sums as :math:`e^{c - z_j}`). The left side is at least 1 (the
    term at c) and the subtracted sum at most k, so the difference loses at most a factor
    k + 1 of float32 precision, never all of it; and the first sum is one elementwise pass
    over the logits with no membership mask, which XLA's CPU backend fuses into its
    reduction (a [tokens, vocab] mask and the select on it made it materialise the masked
    logits: benchmarks/bench_topk_memory.py). c is exact: among the student's k + 1 largest
    real logits at least one lies outside the k ids, and none outside is larger.
    """
    # On [tokens, vocab]: XLA's CPU top_k is two-dimensional (else a reshaped copy of z).
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    logits, z, ids = (x.reshape(-1, x.shape[-1]) for x in (logits, z, ids))
    real = vocab if valid_vocab_size is None else min(valid_vocab_size, vocab)
    if logits.dtype == _F32:
        ranked, scale = logits, temperature  # XLA fuses the scaling into each consumer
    else:
        ranked, scale = z, 1.0  # XLA's CPU top_k is native for float32 only (else a sort)
    # Padding ids may be among the largest logits: k + 1 real ones are among the top
    # k + 1 + (vocab - real).
    values, candidates = jax.lax.top_k(ranked, min(vocab, ids.shape[-1] + 1 + vocab - real))
    outside = ~_is_among(candidates, ids) & (candidates < real)
    tail_max = jnp.max(jnp.where(outside, values / scale, -jnp.inf), axis=-1)
    c = jnp.where(tail_max == -jnp.inf, 0.0, tail_max)[..., None]  # a nan max stays nan
    z_ids = jnp.take_along_axis(logits, ids, axis=-1).astype(_F32) / temperature
    z_ids = jnp.where(ids < real, z_ids, -jnp.inf)
    padding = jnp.where(jnp.arange(vocab) < real, 0.0, jnp.inf)  # e^-inf = 0 there
    mirrored = jnp.sum(jnp.exp(-jnp.abs(ranked / scale - (c + padding))), axis=-1)
    tail_sum = mirrored - jnp.sum(jnp.exp(-jnp.abs(z_ids - c)), axis=-1)
    tail_lse = jnp.log(jnp.maximum(tail_sum, 1.0)) + c[..., 0]
    tail_lse = jnp.where(tail_max == -jnp.inf, -jnp.inf, tail_lse)
    return z_ids.reshape(*lead, -1), tail_lse.reshape(lead)


def _is_among(values: jax.Array, ids: jax.Array) -> jax.Array:
    """``[tokens, n]`` bool: whether each of ``values`` ``[tokens, n]`` is one of ``ids``
    ``[tokens, k]`` (a binary search in the sorted ids, no ``[tokens, n, k]`` comparison)."""
    ordered = jnp.sort(ids, axis=-1)
    at = jnp.minimum(jax.vmap(jnp.searchsorted)(ordered, values), ids.shape[-1] - 1)
    return jnp.take_along_axis(ordered, at, axis=-1) == values


def _sum_of_others(x: jax.Array) -> jax.Array:
    """``Σ_{b≠j} x_b`` for each j of the last axis, never as ``Σ_b x_b − x_j`` (which cancels
    when x_j dominates): an exclusive prefix sum plus an exclusive suffix sum."""
    zero = jnp.zeros_like(x[..., :1])
    before = jnp.concatenate([zero, jnp.cumsum(x[..., :-1], axis=-1)], axis=-1)
    after = jnp.concatenate([jnp.flip(jnp.cumsum(jnp.flip(x[..., 1:], -1), axis=-1), -1), zero],
                            axis=-1)
    return before + after


def _logprobs_at_bwd(valid_vocab_size, residuals, cotangent):
    # log q_j = z_{id_j} − lse, so d/dz_v = δ(v = id_j) − q_v; the tail log q_tail =
    # logsumexp_{u ∉ ids} z_u − lse has d/dz_v = [v ∉ ids] q_v / q_tail − q_v. With a the
    # cotangent over the k+1 buckets b (ids, then tail) and A = Σ_b a_b:
    #   v = id_j:  a_j − q_j A = a_j Σ_{b≠j} q_b − q_j Σ_{b≠j} a_b
    #   otherwise: a_tail exp(z_v − lse − log q_tail) − q_v A
    # written so that nothing cancels when the student is sure of its top ids: q_v / q_tail is
    # formed in log space, 1 − q_j is the mass of the other buckets, A − a_j the sum of the
    # others, and the ids' values are *set* from these, not corrected by subtracting a large
    # a_tail q_v / q_tail from the dense term. Top-k ids are distinct; sampled ids (no tail)
    # may repeat in unused slots, whose cotangent is 0.
    logits, ids, temperature, lse, at_ids, tail = residuals
    z = _scaled(logits, temperature, valid_vocab_size)
    q = jnp.exp(z - lse[..., None])
    if tail is None:
        total = jnp.sum(cotangent, axis=-1)
        dense = q * (-total / temperature)[..., None]
        grad = _scatter_last(dense, ids, cotangent / temperature, "add")
        return grad.astype(logits.dtype), None, None, jnp.zeros_like(temperature)
    live = tail != -jnp.inf  # a tail bucket that holds mass (not k = vocab); nan stays nan
    a_ids = cotangent[..., :-1]
    a_tail = jnp.where(live, cotangent[..., -1], 0.0)
    total = jnp.sum(a_ids, axis=-1) + a_tail
    # min(·, 0): exact outside the ids (q_v <= q_tail there); the ids' entries are replaced.
    log_share = jnp.minimum(z - (lse + jnp.where(live, tail, 0.0))[..., None], 0.0)
    dense = (a_tail[..., None] * jnp.exp(log_share) - q * total[..., None]) / temperature
    buckets_q = jnp.exp(jnp.concatenate([at_ids, tail[..., None]], axis=-1))
    others_q = _sum_of_others(buckets_q)[..., :-1]
    others_a = _sum_of_others(jnp.concatenate([a_ids, a_tail[..., None]], axis=-1))[..., :-1]
    at_ids_grad = (a_ids * others_q - buckets_q[..., :-1] * others_a) / temperature
    grad = _scatter_last(dense, ids, at_ids_grad, "set")
    return grad.astype(logits.dtype), None, None, jnp.zeros_like(temperature)


_logprobs_at.defvjp(_logprobs_at_fwd, _logprobs_at_bwd)


def token_entropy(logprobs: jax.Array) -> jax.Array:
    r"""Per-token entropy :math:`H = -\sum_v p_v \log p_v`, ``[..., n]`` log-probs → ``[...]``."""
    return -jnp.sum(_xlogx_ratio(logprobs, jnp.zeros_like(logprobs)), axis=-1)


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    r"""Per-token cross-entropy at temperature 1, 0 where ``label == -100``.

    .. math::
        \mathrm{ce}_i = \log \sum_v e^{s_{iv}} - s_{i, y_i}

    Args:
      logits: ``[batch, seq, vocab]``, any float dtype (math in float32).
      labels: ``[batch, seq]`` int, already aligned with the logits; -100 = no loss.
    Returns:
      ``[batch, seq]`` float32.
    """
    ignored = labels == IGNORE_INDEX
    safe = jnp.where(ignored, 0, labels).astype(jnp.int32)
    log_q = _logprobs_at(logits, safe[..., None], None, jnp.float32(1.0), None)[..., 0]
    return jnp.where(ignored, 0.0, -log_q)


def topk_bucket_logprobs(student_logits: jax.Array, targets: TopKTargets, temperature, *,
                         valid_vocab_size: int | None = None) -> tuple[jax.Array, jax.Array]:
    r"""Student and teacher log-probabilities over the k+1 buckets of top-k targets.

    Buckets are the k (distinct) teacher ids and the tail (every other real id). With
    :math:`\log q = \operatorname{log\_softmax}(\tilde s/T)` (:math:`\tilde s` = the
    logits restricted to the real ids, :func:`restrict_to_vocab`) and :math:`K` the ids:

    .. math::
        \log q_{\mathrm{tail}} = \log \sum_{v \notin K} q_v
            = \operatorname{logsumexp}_{v \notin K} (\tilde s_v / T)
              - \operatorname{logsumexp}_{v} (\tilde s_v / T)

    summed over the tail ids directly (never as :math:`1 - \sum_{j\in K} q_j`, which cancels
    in float32 once the student is sure of its top ids), so a tail of any size, and its
    gradient, keep float32 precision. When the ids cover the whole (real) vocabulary the tail
    bucket is empty on both sides (a teacher tail of −inf, or a finite one, which is then
    rounding residue, is dropped) and the loss equals the dense one.

    Args:
      student_logits: ``[..., vocab]``.
      targets: ``TopKTargets`` with ``[..., k]`` ids/log-probs and ``[...]`` tail log-mass.
      temperature: T, which must equal the cache temperature.
      valid_vocab_size: ids from it on are padding (see :func:`token_losses`); ``None``: none.
    Returns:
      ``(student, teacher)`` log-probabilities, each ``[..., k+1]`` float32 (tail last).
    """
    tail_logmass = targets.tail_logmass.astype(_F32)
    student = _logprobs_at(student_logits, targets.ids.astype(jnp.int32),
                           tail_logmass != -jnp.inf, jnp.asarray(temperature, _F32),
                           valid_vocab_size)
    # No id outside the k (k = the real vocabulary): the teacher's tail is rounding residue.
    tail_logmass = jnp.where(student[..., -1] != -jnp.inf, tail_logmass, -jnp.inf)
    teacher = jnp.concatenate([targets.logprobs.astype(_F32), tail_logmass[..., None]], axis=-1)
    return student, teacher


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

    - ``DenseTargets``: :math:`\log p = \operatorname{log\_softmax}(t/T)`; divergence as in
      :func:`token_divergence` over the vocabulary; entropy of p; top id = argmax t.
    - ``TopKTargets``: the same divergences over the k+1 buckets of
      :func:`topk_bucket_logprobs` (exact, no renormalisation of the top k); entropy of the
      k+1-bucket distribution (a lower bound of the teacher's entropy); top id = the id of
      highest log-prob.
    - ``SampledTargets`` (forward KL only): with :math:`c_j` the draw counts of ids
      :math:`y_j` and :math:`H` the stored teacher entropy,

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
    divergence = _resolve_divergence(divergence, beta)
    temperature = jnp.asarray(temperature, _F32)
    student_top = jnp.argmax(restrict_to_vocab(student_logits, valid_vocab_size), axis=-1)
    if isinstance(targets, DenseTargets):
        teacher_logits = jax.lax.stop_gradient(targets.logits)
        div = _clamp_rounding(_dense_divergence(student_logits, teacher_logits, temperature,
                                                divergence, beta, valid_vocab_size))
        z_t = _scaled(teacher_logits, temperature, valid_vocab_size)
        entropy = token_entropy(z_t - _logsumexp(z_t)[..., None])
        teacher_top = jnp.argmax(restrict_to_vocab(teacher_logits, valid_vocab_size), axis=-1)
    elif isinstance(targets, TopKTargets):
        targets = jax.lax.stop_gradient(targets)
        student_buckets, teacher_buckets = topk_bucket_logprobs(
            student_logits, targets, temperature, valid_vocab_size=valid_vocab_size)
        div = jnp.maximum(token_divergence(student_buckets, teacher_buckets, divergence, beta),
                          0.0)
        entropy = token_entropy(teacher_buckets)
        teacher_top = _id_of_max(targets.ids, targets.logprobs)
    else:
        targets = jax.lax.stop_gradient(targets)
        counts = targets.counts.astype(_F32)
        total = jnp.sum(counts, axis=-1, keepdims=True)
        weights = jnp.where(total > 0, counts / jnp.maximum(total, 1e-30), 0.0)
        at_ids = _logprobs_at(student_logits, targets.ids.astype(jnp.int32), None, temperature,
                              valid_vocab_size)
        entropy = targets.entropy.astype(_F32)
        div = -jnp.sum(weights * at_ids, axis=-1) - entropy
        teacher_top = _id_of_max(targets.ids, counts)
    ce = None if labels is None else token_cross_entropy(student_logits, labels)
    agreement = (student_top == teacher_top).astype(_F32)
    return TokenLosses(div, ce, entropy, agreement)


def _id_of_max(ids: jax.Array, values: jax.Array) -> jax.Array:
    """The id whose value is largest (the first one on ties), ``[..., n]`` → ``[...]``."""
    pick = jnp.argmax(values, axis=-1)
    return jnp.take_along_axis(ids, pick[..., None], axis=-1)[..., 0]


# --------------------------------------------------------------------------- composed losses


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


def check_loss_inputs(student_logits, targets: Targets, attention_mask, labels, use_hard_labels,
                      temperature, alpha, divergence, beta, *, valid_vocab_size=None) -> None:
    """All trace-time checks of a distillation loss call; raises ``KdpipeError``/``ConfigError``."""
    _check_settings(temperature, alpha, divergence, beta)
    _check_valid_vocab_size(valid_vocab_size)
    if isinstance(targets, SampledTargets) and divergence != "forward_kl":
        raise ConfigError(f"divergence: sampled teacher targets support only 'forward_kl' "
                          f"(their estimator is unbiased for it alone), got {divergence!r}")
    check_targets(student_logits, targets)
    _check_labels(use_hard_labels, labels)
    tokens = tuple(student_logits.shape[:-1])
    _check_token_shape("attention_mask", attention_mask, tokens)
    _check_token_shape("labels", labels, tokens)


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
            \quad\text{(or reverse\_kl, jsd: see token\_divergence)} \\
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
      divergence: ``"forward_kl"`` (default, the seed's), ``"reverse_kl"`` or ``"jsd"``.
      beta: the generalized-JSD β in [0, 1] (0.5 symmetric; 0 = forward KL, 1 = reverse KL).
      valid_vocab_size: the tokenizer's vocabulary size (a Python int) when the heads are
        padded past it; ``None`` (default, EasyDeL's semantics) or >= vocab: all ids are real.
    Returns:
      ``(loss, metrics)``: scalar float32 and ``kl_loss``, ``teacher_entropy`` (of p at T),
      ``top1_agreement`` (masked fraction of tokens where the argmaxes agree), and ``ce_loss``
      when labels are given.

    >>> s = jnp.array([[[2.0, 0.0, -1.0]]]); t = jnp.array([[[1.0, 0.5, -1.0]]])
    >>> loss, metrics = distillation_loss(s, t, temperature=1.0, alpha=1.0)
    >>> round(float(loss), 4)
    0.2149
    """
    return targets_distillation_loss(student_logits, DenseTargets(teacher_logits),
                                     attention_mask, labels, use_hard_labels, temperature,
                                     alpha, divergence=divergence, beta=beta,
                                     valid_vocab_size=valid_vocab_size)


# --------------------------------------------------------------------------- intermediate layers


def _select_layers(name: str, student: Sequence[jax.Array], teacher: Sequence[jax.Array],
                   layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        if len(student) != len(teacher):
            raise KdpipeError(f"{name}: with layers=None both models need as many entries, got "
                              f"student {len(student)} and teacher {len(teacher)}; pass layers")
        return list(range(len(student)))
    if len(layers) == 0:
        raise KdpipeError(f"{name} layers: expected at least one index, got {tuple(layers)}")
    for i in layers:
        for side, states in (("student", student), ("teacher", teacher)):
            if not -len(states) <= i < len(states):
                raise KdpipeError(f"{name} layers: index {i} out of range for the {side}'s "
                                  f"{len(states)} entries "
                                  f"(valid -{len(states)}..{len(states) - 1})")
    return list(layers)


def hidden_state_loss(student_hidden_states, teacher_hidden_states, attention_mask=None,
                      layers=None, loss="mse"):
    r"""Intermediate-representation loss over selected hidden states.

    Layer indices (negatives allowed) select from both tuples, which follow transformers
    (embeddings, each layer, the final norm). With mask :math:`m` = ``attention_mask``
    (all ones if ``None``), :math:`N = \max(\sum m, 1)` and :math:`\mathcal{L}` the selected
    layers:

    .. math::
        \mathrm{mse} &= \frac{1}{|\mathcal{L}|}\sum_{l\in\mathcal{L}} \frac{1}{N}
            \sum_{b,i} \sum_d \bigl((s^l_{bid} - t^l_{bid})\, m_{bi}\bigr)^2 \\
        \mathrm{cosine} &= \frac{1}{|\mathcal{L}|}\sum_{l\in\mathcal{L}} \frac{1}{N}
            \sum_{b,i} m_{bi}\Bigl(1 - \frac{s^l_{bi}\cdot t^l_{bi}}
            {\max(\lVert s^l_{bi}\rVert \lVert t^l_{bi}\rVert, 10^{-8})}\Bigr)

    Args:
      student_hidden_states, teacher_hidden_states: tuples of ``[batch, seq, hidden]``
        (teacher under ``stop_gradient``); the widths must match.
      attention_mask: ``[batch, seq]`` or ``None``.
      layers: indices into both tuples, or ``None`` for all (then the tuples must have the
        same length).
      loss: ``"mse"`` or ``"cosine"``.
    Returns:
      A float32 scalar.
    """
    if loss not in ("mse", "cosine"):
        raise ConfigError(f"hidden_state_loss: expected 'mse' or 'cosine', got {loss!r}")
    selected = _select_layers("hidden_state", student_hidden_states, teacher_hidden_states, layers)
    per_layer = []
    for i in selected:
        s = student_hidden_states[i].astype(_F32)
        t = jax.lax.stop_gradient(teacher_hidden_states[i]).astype(_F32)
        if s.shape[-1] != t.shape[-1]:
            raise KdpipeError(f"hidden_state layers[{i}]: student hidden width {s.shape[-1]} != "
                              f"teacher hidden width {t.shape[-1]}; project one first or set "
                              f"hidden_state_weight=0")
        if s.shape != t.shape:
            raise KdpipeError(f"hidden_state layers[{i}]: student shape {tuple(s.shape)} != "
                              f"teacher shape {tuple(t.shape)}")
        _check_token_shape("attention_mask", attention_mask, tuple(s.shape[:-1]))
        mask = loss_mask(attention_mask, None, s.shape[:-1])
        if loss == "mse":
            per_token = jnp.sum(jnp.square((s - t) * mask[..., None]), axis=-1)
        else:
            norms = jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1)
            per_token = 1.0 - jnp.sum(s * t, axis=-1) / jnp.maximum(norms, 1e-8)
        per_layer.append(masked_token_mean(per_token, mask))
    return jnp.mean(jnp.stack(per_layer))


def attention_loss(student_attentions, teacher_attentions, attention_mask=None, layers=None,
                   normalize=False):
    r"""Mean squared error between selected attention maps, over valid (query, key) pairs.

    With :math:`m` = ``attention_mask`` (all ones if ``None``), pair weight
    :math:`w_{bij} = m_{bi} m_{bj}` and :math:`P = \max(H \sum_{b,i,j} w_{bij}, 1)`:

    .. math::
        \frac{1}{|\mathcal{L}|}\sum_{l\in\mathcal{L}} \frac{1}{P}
            \sum_{b,h,i,j} w_{bij} (a^l_{bhij} - \hat a^l_{bhij})^2

    With ``normalize=True`` each map's rows are first renormalised over the valid keys,
    :math:`a_{bhij} \leftarrow a_{bhij} m_{bj} / \max(\sum_j a_{bhij} m_{bj}, 10^{-9})`.

    Args:
      student_attentions, teacher_attentions: tuples of ``[batch, heads, seq, seq]``
        (teacher under ``stop_gradient``); selected maps must have the same shape.
      attention_mask: ``[batch, seq]`` or ``None``.
      layers: indices into both tuples (negatives allowed), or ``None`` for all.
      normalize: renormalise rows first.
    Returns:
      A float32 scalar.
    """
    selected = _select_layers("attention", student_attentions, teacher_attentions, layers)
    per_layer = []
    for i in selected:
        s = student_attentions[i].astype(_F32)
        t = jax.lax.stop_gradient(teacher_attentions[i]).astype(_F32)
        if s.shape != t.shape:
            raise KdpipeError(f"attention layers[{i}]: student shape {tuple(s.shape)} != "
                              f"teacher shape {tuple(t.shape)} (heads and sequence must match)")
        batch, heads, seq, _ = s.shape
        _check_token_shape("attention_mask", attention_mask, (batch, seq))
        mask = loss_mask(attention_mask, None, (batch, seq))
        keys = mask[:, None, None, :]
        if normalize:
            s = s * keys / jnp.maximum(jnp.sum(s * keys, axis=-1, keepdims=True), 1e-9)
            t = t * keys / jnp.maximum(jnp.sum(t * keys, axis=-1, keepdims=True), 1e-9)
        pairs = mask[:, None, :, None] * keys
        total = jnp.sum(jnp.square(s - t) * pairs)
        per_layer.append(total / jnp.maximum(heads * jnp.sum(pairs), 1.0))
    return jnp.mean(jnp.stack(per_layer))

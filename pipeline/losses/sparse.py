r"""The student's log-probabilities at a few ids, and at the rest of the vocabulary (the tail).

Sparse teacher targets compare the student with the teacher at a few ids per token: the top
k (plus the tail bucket of every other real id) or ids sampled from the teacher; the
hard-label cross-entropy is the one-id case. :func:`topk_bucket_logprobs` and
:func:`token_cross_entropy` are built on one gather, ``logprobs_at``, whose closed-form
backward pass is one elementwise pass over the logits plus a k-sized scatter, so nothing
``[tokens, vocab]``-sized outlives the call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pipeline.losses.reduce import IGNORE_INDEX
from pipeline.losses.softmax import F32, logsumexp, scaled
from pipeline.losses.targets import TopKTargets


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

    Adaptive top-k targets keep :math:`k_t \le k` ids per token: the unused slots (id −1,
    teacher log-prob −inf) are empty buckets on both sides (student −inf, no gradient), so the
    result is the :math:`k_t+1`-bucket distribution with :math:`K` the :math:`k_t` ids.

    Args:
      student_logits: ``[..., vocab]``.
      targets: ``TopKTargets`` with ``[..., k]`` ids/log-probs (unused slots: id −1, log-prob
        −inf) and ``[...]`` tail log-mass.
      temperature: T, which must equal the cache temperature.
      valid_vocab_size: ids from it on are padding (see :func:`token_losses`); ``None``: none.
    Returns:
      ``(student, teacher)`` log-probabilities, each ``[..., k+1]`` float32 (tail last).
    """
    tail_logmass = targets.tail_logmass.astype(F32)
    ids = targets.ids.astype(jnp.int32)
    # An unused slot points past the vocabulary: its gather is masked to −inf and its
    # gradient scatter dropped (out-of-range indices), and it matches no id.
    ids = jnp.where(ids < 0, student_logits.shape[-1], ids)
    student = logprobs_at(student_logits, ids,
                          tail_logmass != -jnp.inf, jnp.asarray(temperature, F32),
                          valid_vocab_size)
    # No id outside the k (k = the real vocabulary): the teacher's tail is rounding residue.
    tail_logmass = jnp.where(student[..., -1] != -jnp.inf, tail_logmass, -jnp.inf)
    teacher = jnp.concatenate([targets.logprobs.astype(F32), tail_logmass[..., None]], axis=-1)
    return student, teacher


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
    log_q = logprobs_at(logits, safe[..., None], None, jnp.float32(1.0), None)[..., 0]
    return jnp.where(ignored, 0.0, -log_q)


def _scatter_last(dense: jax.Array, ids: jax.Array, updates: jax.Array, how: str) -> jax.Array:
    """``dense[..., ids] += updates`` (``how="add"``, duplicate ids accumulate) or
    ``= updates`` (``how="set"``) along the last axis."""
    lead = dense.shape[:-1]
    flat = jax.vmap(lambda row, i, u: getattr(row.at[i], how)(u))(
        dense.reshape(-1, dense.shape[-1]), ids.reshape(-1, ids.shape[-1]),
        updates.reshape(-1, updates.shape[-1]))
    return flat.reshape(*lead, dense.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def logprobs_at(logits, ids, has_tail, temperature, valid_vocab_size):
    r"""``log_softmax(restrict_to_vocab(logits) / T)`` at ``ids``, and at the tail if asked.

    Args:
      logits: ``[..., vocab]``, any float dtype (math in float32).
      ids: ``[..., k]`` int32; distinct when ``has_tail`` is given.
      has_tail: ``None`` (no tail bucket), or ``[...]`` bool: whether the tail holds mass.
      temperature: T, a float32 scalar.
      valid_vocab_size: ids from it on are padding; ``None``: none.
    Returns:
      ``[..., k]`` float32, or ``[..., k+1]`` with the tail's log-mass last (−inf where
      ``has_tail`` is False or no real id is outside the k).
    """
    return _logprobs_at_fwd(logits, ids, has_tail, temperature, valid_vocab_size)[0]


def _logprobs_at_fwd(logits, ids, has_tail, temperature, valid_vocab_size):
    z = scaled(logits, temperature, valid_vocab_size)
    if has_tail is None:
        lse = logsumexp(z)
        at_ids = jnp.take_along_axis(z, ids, axis=-1) - lse[..., None]
        return at_ids, (logits, ids, temperature, lse, at_ids, None)
    z_ids, tail_lse = _ids_and_tail(logits, z, ids, temperature, valid_vocab_size)
    # The ids and the tail partition the (real) vocabulary: lse needs no pass of its own.
    lse = logsumexp(jnp.concatenate([z_ids, tail_lse[..., None]], axis=-1))
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
    if logits.dtype == F32:
        ranked, scale = logits, temperature  # XLA fuses the scaling into each consumer
    else:
        ranked, scale = z, 1.0  # XLA's CPU top_k is native for float32 only (else a sort)
    # Padding ids may be among the largest logits: k + 1 real ones are among the top
    # k + 1 + (vocab - real).
    values, candidates = jax.lax.top_k(ranked, min(vocab, ids.shape[-1] + 1 + vocab - real))
    outside = ~_is_among(candidates, ids) & (candidates < real)
    tail_max = jnp.max(jnp.where(outside, values / scale, -jnp.inf), axis=-1)
    c = jnp.where(tail_max == -jnp.inf, 0.0, tail_max)[..., None]  # a nan max stays nan
    z_ids = jnp.take_along_axis(logits, ids, axis=-1).astype(F32) / temperature
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
    z = scaled(logits, temperature, valid_vocab_size)
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


logprobs_at.defvjp(_logprobs_at_fwd, _logprobs_at_bwd)

r"""The writer's fidelity audit of a top-k cache: what the stored targets lose, per shard.

On a fixed sample of positions of every sequence (:func:`audit_positions`) the writer still
holds the teacher's full logits, so it measures, against the teacher's p = softmax(logits /
T_cache) over the real ids, the reconstruction r that the k+1-bucket loss stands for: the
stored probabilities at the k_t stored ids (as decoded: quantised values renormalised) and the
stored tail mass spread evenly over the other n - k_t real ids:

.. math::
    \mathrm{KL}(p \| r) = \sum_{v \in K} p_v (\log p_v - \log r_v)
        + \sum_{v \notin K} p_v \Big(\log p_v - \log \frac{m_{\mathrm{tail}}}{n - k_t}\Big)

summed term by term in log space (never as a difference of two large sums), and the captured
mass :math:`\sum_{v \in K} p_v`. A shard's commit record carries their mean and the KL's 99th
percentile over its sampled tokens, and the mean k over all of its tokens
(:func:`shard_audit`); ``kdpipe inspect`` prints them.

A ``bytes_per_token`` cache is cut on the host after the logits are gone
(pipeline/cache/budget.py), so its audit (:func:`candidate_audit`) is computed from what the
encoder kept of them instead, at **every** token: the k candidates' exact log-probs and, for the
other ids O (mass :math:`m_O`, n - k of them), :math:`S = \sum_{v \in O} p_v (\log p_v - c)`
with :math:`c = \log(m_O / (n - k))`, summed term by term by the encoder (``cand_tail_kl``).
Whatever the cut, O's part of the sum above is then :math:`S + m_O (c - \log s)`, s the stored
tail's share of each id outside K, exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pipeline.cache import compress
from pipeline.cache.spec import TargetSpec
from pipeline.losses.softmax import xlogx_ratio

# Positions audited per sequence: evenly spaced, the same in every sequence and every run.
AUDIT_POSITIONS = 16


def audit_positions(seq_len: int, count: int = AUDIT_POSITIONS) -> np.ndarray:
    """The audited positions of a sequence of ``seq_len``: ``count`` evenly spaced, sorted."""
    return np.unique(np.linspace(0, seq_len - 1, min(count, seq_len)).round().astype(np.int32))


@functools.partial(jax.jit, static_argnames="spec")
def reconstruction_kl(logits: jax.Array, decoded: dict[str, jax.Array],
                      spec: TargetSpec) -> tuple[jax.Array, jax.Array]:
    """KL(teacher || reconstruction) and the captured mass per token, ``[T]`` float32 each.

    logits: the teacher's ``[T, V]``; decoded: ``compress.decode``'s top-k keys of the same
    tokens (``teacher_topk_ids`` ``[T, k]``, -1 in unused slots, ...).
    """
    log_p = jax.nn.log_softmax(compress.scaled_logits(logits, spec), axis=-1)
    ids = decoded["teacher_topk_ids"]
    rows = jnp.arange(ids.shape[0])[:, None]
    ids = jnp.where(ids < 0, spec.vocab_size, ids)  # unused slots: dropped by the scatters
    kept = jnp.zeros(log_p.shape, bool).at[rows, ids].set(True, mode="drop")
    others = spec.tokenizer_vocab_size - jnp.sum(kept, axis=-1)
    log_tail_share = decoded["teacher_tail_logmass"] - jnp.log(jnp.maximum(others, 1))
    log_r = jnp.broadcast_to(log_tail_share[:, None], log_p.shape)
    log_r = log_r.at[rows, ids].set(decoded["teacher_topk_logprobs"], mode="drop")
    kl = jnp.sum(xlogx_ratio(log_p, log_r), axis=-1)
    mass = jnp.sum(jnp.where(kept, jnp.exp(log_p), 0.0), axis=-1)
    return kl, mass


@functools.partial(jax.jit, static_argnames="spec")
def _audit_row(logits, encoded, positions, row, spec):
    at = {name: a[row][positions] for name, a in encoded.items()}
    decoded = compress.decode({n: a[None] for n, a in at.items()}, spec)
    return reconstruction_kl(logits[row][positions], {n: a[0] for n, a in decoded.items()},
                             spec)


def audit_batch(logits: jax.Array, encoded: dict[str, jax.Array],
                spec: TargetSpec) -> tuple[jax.Array, jax.Array]:
    """(KL, captured mass) ``[B, n]`` at the :func:`audit_positions` of each row of teacher
    logits ``[B, L, V]`` and their ``compress.encode`` output; one compiled call per row, so a
    row's figures do not depend on the batch it came in."""
    positions = jnp.asarray(audit_positions(logits.shape[1]))
    per_row = [_audit_row(logits, encoded, positions, np.int32(b), spec)
               for b in range(logits.shape[0])]
    return jnp.stack([kl for kl, _ in per_row]), jnp.stack([m for _, m in per_row])


@functools.partial(jax.jit, static_argnames="spec")
def _candidate_audit(candidates, stored, spec):
    count = stored["id_count"].astype(jnp.int32)
    logp = candidates["cand_relative"] - candidates["cand_log_total"][..., None]
    kept = jnp.arange(spec.k) < count[..., None]
    decoded = compress.decode(stored, spec)
    order = compress.kept_order(candidates["cand_ids"], kept, spec)
    # the kept candidates in the order the stored slots hold them, beside their decoded values
    in_stored = logp if order is None else jnp.take_along_axis(logp, order, axis=-1)
    log_r = decoded["teacher_topk_logprobs"]
    kept_kl = jnp.sum(jnp.where(kept, xlogx_ratio(in_stored, jnp.where(kept, log_r, 0.0)), 0.0),
                      axis=-1)
    # outside K: the dropped candidates and O, each id at the stored tail's share
    log_share = decoded["teacher_tail_logmass"] - jnp.log(
        jnp.maximum(spec.tokenizer_vocab_size - count, 1).astype(jnp.float32))
    dropped_kl = jnp.sum(jnp.where(kept, 0.0, xlogx_ratio(logp, log_share[..., None])), axis=-1)
    log_mass_o = jnp.log(candidates["cand_tail_mass"]) - candidates["cand_log_total"]
    shift = log_mass_o - jnp.log(float(spec.tokenizer_vocab_size - spec.k))
    other_kl = candidates["cand_tail_kl"] + jnp.where(
        jnp.isfinite(log_mass_o), jnp.exp(log_mass_o) * (shift - log_share), 0.0)
    mass = jnp.sum(jnp.where(kept, jnp.exp(logp), 0.0), axis=-1)
    return kept_kl + dropped_kl + other_kl, mass


def candidate_audit(candidates: dict[str, np.ndarray], stored: dict[str, np.ndarray],
                    spec: TargetSpec) -> tuple[np.ndarray, np.ndarray]:
    """KL(teacher || reconstruction) and the captured mass at every token ``[S, L]`` float32
    of a ``bytes_per_token`` spec's stored arrays ``{name: [S, L, ...]}`` (padded), from the
    candidates they were cut from (the module docstring); on the host's CPU, as the cut."""
    with jax.default_device(jax.devices("cpu")[0]):
        kl, mass = _candidate_audit(candidates, stored, spec)
        return np.asarray(kl), np.asarray(mass)


def shard_audit(kl: np.ndarray | None, mass: np.ndarray | None, counts: np.ndarray) -> dict:
    """A shard's audit record: mean k over its tokens (``counts``: ids per token), and, when
    audited (``kl``/``mass`` of its sampled tokens), the KL's mean and 99th percentile and the
    mean captured mass (float64 reductions of the float32 per-token figures)."""
    record = {"k_mean": float(np.mean(counts, dtype=np.float64))}
    if kl is not None:
        kl = np.asarray(kl, np.float64).ravel()
        record.update(tokens=int(kl.size), kl_mean=float(kl.mean()),
                      kl_p99=float(np.percentile(kl, 99)),
                      mass_mean=float(np.mean(mass, dtype=np.float64)))
    return record

"""The teacher's output head and the encoding of its targets, fused, chunk by chunk over positions.

The teacher's logits ``hidden @ head.T`` are ``[batch, seq, vocab]`` float32: 34 GB at batch 32,
seq 2048 and a 128k vocabulary. The cache stores far less per token (top-k with the tail mass,
sampled draws), so here the head is applied to ``chunk`` positions of every row at a time and
each chunk is encoded at once (``pipeline.cache.compress.encode_positions``, the encoder of
``compress.encode``); only one chunk's ``[batch, chunk, vocab]`` logits are ever live. The
student's counterpart is pipeline/losses/fused_head.py.

Every position's code depends only on its own logits, its sequence and its position (sampled
draws are keyed per (seed, sequence, position)), so the stored bytes equal those of
``compress.encode`` on the whole logits, whatever the chunk. A ``chunk`` that does not divide
the sequence gets a last chunk overlapping the previous one: its overlapped positions are
computed again, to the same bytes, so nothing is padded. (One caveat, measured with jax 0.10.2:
XLA:CPU sums the rows of an array of fewer than 4096 elements in another order than those of a
larger one, so with a vocabulary that small the last bit of a float32 value may depend on the
chunk; tests/test_teacher_head.py checks the bytes with a vocabulary past that.)

Full mode stores the logits themselves (``[batch, seq, vocab]`` in its value dtype): fusing
saves only the float32 copy there. ``cache.bytes_per_token`` gives each token's k candidates,
chunk by chunk like the rest; the budget is applied to them later, on the host
(pipeline/cache/budget.py), which also audits them. Another top-k cache's fidelity audit
(``pipeline.cache.audit``) needs the teacher's logits at a few positions of every sequence: the
head is applied again to those positions only.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pipeline.cache import audit, compress
from pipeline.cache.format import TargetSpec
from pipeline.cache.writer import first_flagged

# Tokens (rows x positions) per chunk by default: [tokens, vocab] float32 logits of 256 MiB at
# a 128k vocabulary, and the encoder's temporaries of about twice that (bench_scale.py
# --teacher, Llama-3.1-8B on 4 devices, one row each: 2048 tokens needed 16.1 GiB a device,
# 1 GiB more than the unfused forward; 512 need 15.2).
CHUNK_TOKENS = 512


def chunk_positions(batch: int, seq_len: int, tokens: int = CHUNK_TOKENS) -> int:
    """Positions per chunk for about ``tokens`` tokens of ``batch`` rows (at least 1, at most
    ``seq_len``)."""
    return max(1, min(seq_len, tokens // max(batch, 1)))


class FusedTargets(NamedTuple):
    """What :func:`encode_from_hidden` gives, as ``CacheWriter.write_encoded`` takes it."""

    encoded: dict[str, jax.Array]  # {name: [batch, seq, *trailing]}, as compress.encode
    check: jax.Array  # [2] int32: the logits' first_nonfinite (pipeline.cache.writer)
    # top-k but bytes_per_token: audit.audit_batch's (KL, mass) [B, n]
    fidelity: tuple[jax.Array, jax.Array] | None


@functools.partial(jax.jit, static_argnames=("spec", "chunk"))
def encode_from_hidden(hidden: jax.Array, head: jax.Array, sequence_indices: jax.Array,
                       spec: TargetSpec, *, chunk: int) -> FusedTargets:
    """``compress.encode(hidden @ head.T, sequence_indices, spec)`` without the whole logits.

    The logits of a chunk are ``einsum("bld,vd->blv")`` with float32 accumulation, as the
    model's own head computes them (``pipeline.models.llama.Llama``).

    Args:
      hidden: ``[batch, seq, hidden]`` final (normed) hidden states of the teacher.
      head: ``[vocab, hidden]`` output projection (``model.output_head()``).
      sequence_indices: ``[batch]`` int, the rows' sequence numbers in their split.
      spec: what is stored (static).
      chunk: positions per chunk (static, ``1 <= chunk``; capped at ``seq``).
    Returns:
      :class:`FusedTargets`: the stored arrays as ``compress.encode`` gives them, the logits'
      non-finite check, and (top-k) the audit's figures as the writer computes them from the
      whole logits.
    """
    if hidden.ndim != 3 or head.ndim != 2 or hidden.shape[-1] != head.shape[-1]:
        raise ValueError(f"hidden/head: expected [batch, seq, hidden] and [vocab, hidden], got "
                         f"{tuple(hidden.shape)} and {tuple(head.shape)}")
    if head.shape[0] != spec.vocab_size:
        raise ValueError(f"head: expected {spec.vocab_size} rows (the spec's vocab_size), got "
                         f"{head.shape[0]}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: expected a positive int, got {chunk!r}")
    batch, seq_len, _ = hidden.shape
    chunk = min(chunk, seq_len)
    sequence_indices = jnp.asarray(sequence_indices, jnp.int32)

    def logits_of(h):
        return jnp.einsum("bld,vd->blv", h, head, preferred_element_type=jnp.float32)

    def encode_chunk(start):
        logits = logits_of(jax.lax.dynamic_slice_in_dim(hidden, start, chunk, axis=1))
        # the encoder then reads a finished [batch, chunk, vocab] buffer, as compress.encode
        # reads its input: nothing of it is fused into the matmul, so the bytes are the same
        logits = jax.lax.optimization_barrier(logits)
        stored = jax.vmap(lambda x, s: compress.encode_positions(x, s, spec, start))(
            logits, sequence_indices)
        flags = (~jnp.isfinite(logits).all(axis=-1), jnp.isnan(logits).any(axis=-1))
        return stored, flags

    def body(i, outputs):
        start = jnp.minimum(i * chunk, seq_len - chunk)
        return jax.tree.map(
            lambda acc, x: jax.lax.dynamic_update_slice_in_dim(acc, x, start, axis=1),
            outputs, encode_chunk(start))

    shapes = jax.eval_shape(encode_chunk, 0)
    outputs = jax.tree.map(
        lambda s: jnp.zeros((batch, seq_len, *s.shape[2:]), s.dtype), shapes)
    stored, flags = jax.lax.fori_loop(0, -(-seq_len // chunk), body, outputs)
    fidelity = None
    if spec.mode == "topk" and not spec.cut_on_host:
        # audit_batch on the audited positions alone audits all of them: the same figures
        positions = audit.audit_positions(seq_len)
        fidelity = audit.audit_batch(logits_of(hidden[:, positions]),
                                     {name: a[:, positions] for name, a in stored.items()}, spec)
    return FusedTargets(stored, first_flagged(*flags), fidelity)

"""The teacher targets a distillation loss compares the student with: dense, top-k or sampled.

Array containers (``pipeline/cache/compress.py`` makes the sparse kinds) and the batch keys
that carry each kind; shapes in the field comments.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax

from pipeline.errors import KdpipeError


class DenseTargets(NamedTuple):
    """The teacher's full logits."""

    logits: jax.Array  # [batch, seq, vocab], any float dtype


class TopKTargets(NamedTuple):
    """The teacher's k most likely ids per token and the log of the mass outside them.

    The log-probabilities were taken at the cache temperature ``T_cache``; the loss must run at
    ``temperature == T_cache`` (the boundary refuses other temperatures). Adaptive top-k keeps
    ``k_t <= k`` ids per token, padded to k: its unused slots hold id -1 and log-prob -inf.
    """

    ids: jax.Array  # [batch, seq, k] int32; -1 in the unused slots of adaptive top-k
    logprobs: jax.Array  # [batch, seq, k] log softmax(teacher_logits / T_cache) at ids; -inf unused
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

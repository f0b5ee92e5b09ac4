"""``cache.bytes_per_token``: which of the teacher's top-k candidates a byte budget keeps.

The encoder gives every token's k candidates (``compress.candidate_layout``); :func:`cut` picks
how many each token keeps and cuts them (``compress.cut``), on the host. A **group** of
sequences shares one budget: every token keeps ``min_k`` ids, the group's other candidates are
ranked by probability over the whole group (ties: the earlier sequence, then position, then
slot; :func:`candidate_ranks`) and the first ``extra`` of them are kept too, so bytes go where
the teacher is unsure, across tokens and across sequences.

- **Format 5** (written today): the group is a **shard** of the cache, and ``extra`` is one
  whose shard, written as the cache writes it (:func:`stored_bytes`: the ragged packing, each
  array's codecs and the shard index, in a memory kvstore), takes at most ``B * S * L`` bytes
  and at least 0.999 of that, or all that fits (:func:`largest_fitting`): B bounds exactly
  what a user reads off the disk. Sharing over a shard's S sequences rather than one lets a
  sequence the teacher is sure of lend bytes to one it is not (``bench_cache.py --real``
  measures what it gains on a real teacher's outputs). The shard is a fixed set of
  sequences, so its bytes never depend on the batching, the devices or which host wrote it.
  The writer holds a shard's candidates until it is complete: ``shard_sequences * L * k * 8``
  bytes (256 sequences of 2,048 tokens at k = 64: 268 MB).
- **Formats 3 and 4**, and **live scoring** (a remote teacher's targets for rows no cache
  holds, ``pipeline.teacher.encode_targets``, where no shard exists): the group is one
  sequence, measured the same way as a one-sequence shard.
- **Formats 1 and 2** capped raw bytes before compression, per sequence: ``extra`` =
  floor(L (B - c_t) / c_id) - L min_k, with (c_t, c_id) = ``spec.raw_token_bytes``; that
  stored about half of B.

``extra`` = 0 is kept even when ``min_k`` ids alone take more than B (short sequences, where
each chunk's codec headers weigh most).
"""

from __future__ import annotations

import numpy as np

from pipeline.cache import compress, ragged
from pipeline.cache.format import CacheManifest, array_layout, open_array, shard_file_key
from pipeline.cache.spec import TargetSpec, raw_token_bytes


# The share of a group's budget :func:`largest_fitting` may leave unused: zstd's bytes are not
# monotone in the ids kept at the scale of a few bytes, so the last probes of an exact search
# gain nothing.
SLACK = 1 / 1024


def candidate_ranks(logprobs: np.ndarray, min_k: int) -> np.ndarray:
    """Rank of each candidate beyond the first ``min_k`` of its token over the whole group
    (0: the most probable), ``[..., k - min_k]`` int64. logprobs: ``[..., k]`` the group's
    candidates' log-probs, descending per token; ties rank in row-major order."""
    candidates = logprobs[..., min_k:]
    order = np.argsort(-candidates.reshape(-1), kind="stable")
    ranks = np.empty(order.size, np.int64)
    ranks[order] = np.arange(order.size)
    return ranks.reshape(candidates.shape)


def counts_with_extra(ranks: np.ndarray, extra: int, min_k: int) -> np.ndarray:
    """Ids kept per token: ``min_k`` plus its candidates among the group's ``extra`` most
    probable (``ranks`` from :func:`candidate_ranks`), ``[...]`` int32."""
    return (min_k + np.sum(ranks < extra, axis=-1)).astype(np.int32)


def stored_bytes(stored: dict[str, np.ndarray], spec: TargetSpec, *, shard_sequences: int,
                 chunk_sequences: int = 1) -> int:
    """Bytes that sequences' stored arrays ``{name: [S, L, ...]}`` (padded, as
    ``compress.cut`` or ``compress.encode`` give them) take as one shard of a cache of
    ``shard_sequences`` and ``chunk_sequences`` (S <= shard_sequences: a short last shard):
    written with the cache's own layout (``pipeline.cache.format.zarr3_spec``) to a memory
    kvstore, the files' sizes."""
    sequences, seq_len = next(iter(stored.values())).shape[:2]
    manifest = CacheManifest(spec, "", "", "", seq_len=seq_len, num_sequences=sequences,
                             shard_sequences=shard_sequences, chunk_sequences=chunk_sequences)
    packed = ragged.pack(stored, spec)
    root = {"driver": "memory", "path": ""}
    total = 0
    for layout in array_layout(spec):
        array = open_array(root, manifest, layout, create=True)
        array.write(packed[layout.name]).result()
        # the array's kvstore is rooted at its own directory
        key = shard_file_key(layout, 0).removeprefix(layout.name + "/")
        total += len(array.kvstore.read(key).result().value)
    return total


def _cut_group(candidates: dict[str, np.ndarray], spec: TargetSpec, shard_sequences: int,
               chunk_sequences: int) -> dict[str, np.ndarray]:
    """The stored arrays of one group's candidates ``{name: [S, L, ...]}``: cut at the
    ``extra`` :func:`largest_fitting` finds for a limit of ``B * S * L`` stored bytes (the
    group measured as one shard of ``shard_sequences`` and ``chunk_sequences``), or at formats
    1 and 2's raw ``extra``."""
    logprobs = candidates["cand_relative"] - candidates["cand_log_total"][..., None]
    ranks = candidate_ranks(logprobs, spec.min_k)
    tokens = logprobs.shape[0] * logprobs.shape[1]
    most = tokens * (spec.k - spec.min_k)

    def cut_at(extra: int) -> dict[str, np.ndarray]:
        return compress.cut(candidates, counts_with_extra(ranks, extra, spec.min_k), spec)

    if not spec.stored_budget:
        per_token, per_id = raw_token_bytes(spec)
        extra = int(tokens * (spec.bytes_per_token - per_token) // per_id) - tokens * spec.min_k
        return cut_at(min(extra, most))
    limit = int(spec.bytes_per_token * tokens)
    fitted: dict = {}  # the largest extra that fitted so far, and its cut: what is returned

    def stored_size(extra: int) -> int:
        stored = cut_at(extra)
        size = stored_bytes(stored, spec, shard_sequences=shard_sequences,
                            chunk_sequences=chunk_sequences)
        if size <= limit and extra >= fitted.get("extra", -1):
            fitted.update(extra=extra, stored=stored)
        return size

    extra = largest_fitting(stored_size, limit, most)
    return fitted["stored"] if fitted.get("extra") == extra else cut_at(extra)


def largest_fitting(size, limit: int, most: int) -> int:
    """An ``extra`` in [0, most] with ``size(extra) <= limit``, and either within
    :data:`SLACK` of it or with ``size(extra + 1) > limit`` (``most`` if it fits; 0 if nothing
    does). ``size`` is about linear in ``extra``: a bracket is shrunk by linear interpolation
    between its ends (with the Illinois rule against an end that does not move), and halved
    whenever two probes did not halve it, so it takes at most about twice bisection's
    log2(most) probes, and far fewer on real shards (benchmarks/bench_budget.py: 6 to 9 on
    bench_cache.py --real's teacher, where bisection takes about 19)."""
    low, size_low = 0, size(0)
    if size_low > limit or most == 0:
        return 0
    high, size_high = most, size(most)
    if size_high <= limit:
        return most
    # invariant: size(low) <= limit < size(high); the guesses interpolate between at_low and
    # at_high, which start as those sizes and are moved to limit by the Illinois rule
    at_low, at_high = size_low, size_high
    widths, kept_end = [high - low], None
    while high - low > 1 and size_low < limit * (1 - SLACK):
        if len(widths) >= 3 and widths[-1] > widths[-3] / 2:
            probe = (low + high) // 2
        else:
            step = (limit - at_low) / (at_high - at_low) * (high - low)
            probe = min(max(low + int(step), low + 1), high - 1)
        size_probe = size(probe)
        if size_probe <= limit:
            low, size_low, at_low = probe, size_probe, size_probe
            if kept_end == "high":  # the end kept twice pulls the next guess towards it
                at_high = limit + (at_high - limit) / 2
            kept_end = "high"
        else:
            high, at_high = probe, size_probe
            if kept_end == "low":
                at_low = limit - (limit - at_low) / 2
            kept_end = "low"
        widths.append(high - low)
    return low


def cut(candidates: dict[str, np.ndarray], spec: TargetSpec, *,
        shard: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """The stored arrays ``{name: [S, L, ...]}`` (padded) of S sequences' candidates
    ``{name: [S, L, ...]}`` under ``spec.bytes_per_token`` (the module docstring).

    shard: ``(shard_sequences, chunk_sequences)`` of the cache whose one shard the S sequences
    are: a format-5 spec then shares the budget over them. None (live scoring), or a spec of
    format 4 or before: each sequence has its own.
    """
    by_shard = shard is not None and spec.shard_budget
    sequences = len(candidates["cand_ids"])
    groups = [slice(None)] if by_shard else [slice(s, s + 1) for s in range(sequences)]
    shard_sequences, chunk_sequences = shard if by_shard else (1, 1)
    # each group cut in a program of its own size, as it was measured
    out = [_cut_group({name: a[group] for name, a in candidates.items()}, spec,
                      shard_sequences, chunk_sequences) for group in groups]
    return {name: np.concatenate([o[name] for o in out]) for name in out[0]}

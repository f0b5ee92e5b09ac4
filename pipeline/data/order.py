"""Which rows host h reads at step s, for training and evaluation, and the order a teacher cache
is filled in: the one definition that the student's reads (``pipeline.data.dataset``), the
targets it asks for (``pipeline.train.evaluate``, the remote teacher's requests made ahead) and
the cache's fill order all use, so a target always belongs to the row the student reads.

Training: the order of a split of N rows is a permutation fixed by ``(seed, epoch)``. A run's
position is ONE integer, the global sample offset o: global sample o is row
``permutation(seed, o // N)[o % N]``. The step with offset o consumes global samples
``[o, o + G)``; host h of H takes the h-th contiguous block of ``G / H`` of them. The global
batches therefore do not depend on H, and a run resumed at offset o on any number of hosts sees
each example exactly once per epoch.

Evaluation: the split in row order, B rows per global batch, host h of H reading the h-th block
of ``B / H``; the samples past the last row of a short last batch are padding and read row
``N - 1`` (the batch reader blanks them: ``attention_mask`` 0, labels -100).

Only integers in, row ids out: no I/O.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from pipeline.config import DataConfig, EvalConfig
from pipeline.errors import DataError


@lru_cache(maxsize=4)
def _permutation(num_rows: int, seed: int, epoch: int, window: int) -> np.ndarray:
    rng = np.random.default_rng([seed, epoch])
    if not window or window >= num_rows:
        return rng.permutation(num_rows)
    starts = rng.permutation(np.arange(0, num_rows, window))
    return np.concatenate([start + rng.permutation(min(window, num_rows - start))
                           for start in starts])


def global_order(num_rows: int, seed: int, offsets: np.ndarray, window: int = 0) -> np.ndarray:
    """Row ids of global samples ``offsets``: ``permutation(seed, o // N)[o % N]``.

    ``window`` 0: each epoch is a uniform permutation of all ``N`` rows. ``window`` W > 0: each
    epoch visits the blocks of W consecutive rows (the last may be shorter) in a random order,
    and the rows of each block in a random order, so consecutive samples come from one block.
    A cache of teacher targets being written in the order the samples need it (``kdpipe run``)
    then serves the first steps after its first few shards, not nearly all of them.
    """
    offsets = np.asarray(offsets, np.int64)
    rows = np.empty_like(offsets)
    epochs = offsets // num_rows
    for epoch in np.unique(epochs):
        where = epochs == epoch
        rows[where] = _permutation(num_rows, seed, int(epoch), window)[offsets[where] % num_rows]
    return rows


def host_offsets(offset: int, global_batch: int, host_index: int, host_count: int) -> np.ndarray:
    """Global sample offsets that host ``host_index`` of ``host_count`` reads for the step that
    starts at ``offset``: the host's contiguous block of the global batch. ``[G / H]`` int64."""
    if host_count <= 0 or global_batch % host_count:
        raise DataError(f"global batch size ({global_batch}) must be divisible by the host "
                        f"count ({host_count})")
    if not 0 <= host_index < host_count:
        raise DataError(f"host_index: expected 0 <= host_index < {host_count}, got {host_index}")
    per_host = global_batch // host_count
    return offset + host_index * per_host + np.arange(per_host, dtype=np.int64)


def train_rows(num_rows: int, offset: int, *, seed: int, shuffle_window: int, global_batch: int,
               host_index: int = 0, host_count: int = 1) -> np.ndarray:
    """The row ids ``[G/H]`` host ``host_index`` of ``host_count`` reads for the train step that
    starts at global sample ``offset``."""
    offsets = host_offsets(offset, global_batch, host_index, host_count)
    return global_order(num_rows, seed, offsets, shuffle_window)


def train_schedule(num_rows: int, offset: int, *, seed: int, shuffle_window: int,
                   global_batch: int, host_index: int = 0,
                   host_count: int = 1) -> Iterator[np.ndarray]:
    """``train_rows`` of the steps from global sample ``offset`` on, batch after batch."""
    for step in itertools.count():
        yield train_rows(num_rows, offset + step * global_batch, seed=seed,
                         shuffle_window=shuffle_window, global_batch=global_batch,
                         host_index=host_index, host_count=host_count)


class EvalRows(NamedTuple):
    """One eval batch of one host: ``rows`` ``[B/H]`` int64 row ids to read (padding reads row
    N - 1) and ``real`` ``[B/H]`` bool, False where the sample is padding."""

    rows: np.ndarray
    real: np.ndarray


def eval_rows(num_rows: int, batch_size: int, *, host_index: int = 0, host_count: int = 1,
              max_batches: int | None = None) -> list[EvalRows]:
    """The eval batches host ``host_index`` of ``host_count`` reads at each evaluation:
    ``ceil(N / batch_size)`` of them (at most ``max_batches``), in row order."""
    count = -(-num_rows // batch_size)
    if max_batches is not None:
        count = min(count, max_batches)
    batches = []
    for step in range(count):
        offsets = host_offsets(step * batch_size, batch_size, host_index, host_count)
        batches.append(EvalRows(np.minimum(offsets, num_rows - 1), offsets < num_rows))
    return batches


def eval_schedule(num_rows: int, eval_config: EvalConfig, *, host_index: int = 0,
                  host_count: int = 1) -> Iterator[np.ndarray]:
    """The eval rows a host reads (``eval_rows(...).rows``), evaluation after evaluation."""
    return itertools.cycle([batch.rows for batch in eval_rows(
        num_rows, eval_config.batch_size, host_index=host_index, host_count=host_count,
        max_batches=eval_config.max_batches)])


def fill_order(num_rows: Mapping[str, int], pending: Mapping[str, set[int]], *,
               data: DataConfig, eval_config: EvalConfig, global_batch: int, steps: int,
               shard_rows: int, start: tuple[int, int] = (0, 0)) -> list[tuple[str, int]]:
    """The pending ``(split, shard)`` pairs of a teacher cache in the order the student first
    reads them (shard s holds rows ``[s * shard_rows, (s + 1) * shard_rows)``); ties, such as
    the shards never read, keep the order of ``num_rows``' splits and of the shard ids.

    A train shard is due at the first global sample (from ``start``, the ``(step, global sample
    offset)`` the student resumes from) that is one of its rows (``global_order``, over at most
    one epoch of the ``steps`` left); the eval shards the evaluation reads (``eval_rows``) are
    due just before the first eval step's samples; shards the run never reads come last.
    """
    step, offset = start
    due: dict[tuple[str, int], float] = {}
    remaining = (steps - step) * global_batch
    offsets = np.arange(offset, offset + min(max(remaining, 0), num_rows["train"]), dtype=np.int64)
    if len(offsets):
        rows = global_order(num_rows["train"], data.seed, offsets, data.shuffle_window)
        shards = rows // shard_rows
        first_shards, first_index = np.unique(shards, return_index=True)
        due.update({("train", int(s)): int(i) for s, i in zip(first_shards, first_index)})
    if num_rows.get("eval"):
        every = eval_config.every_steps
        eval_step = (every - step % every if every else steps - step)
        read = eval_rows(num_rows["eval"], eval_config.batch_size,
                         max_batches=eval_config.max_batches)
        for s in np.unique(np.concatenate([batch.rows for batch in read]) // shard_rows):
            due[("eval", int(s))] = eval_step * global_batch - 0.5  # before the next step's samples
    jobs = [(split, s) for split in num_rows for s in sorted(pending.get(split, ()))]
    return sorted(jobs, key=lambda job: due.get(job, float("inf")))

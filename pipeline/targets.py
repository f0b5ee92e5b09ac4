"""Where a student host's teacher targets come from: one reader per split, picked by the run's
teacher source (``cluster.teacher_source``) in ``SOURCES``, the only place that knows them.

==========  ========================================================================
source      reader of a split
==========  ========================================================================
``live``    none: the teacher runs inside the step (``pipeline.step``)
``offline`` the cache: ``CacheReader`` of a complete cache (``kdpipe train``), or
            ``CommittedCacheReader`` while teacher hosts still write it (``kdpipe run``)
``remote``  teacher hosts answer each batch: ``actors.remote.RemoteTargets``, which needs Ray
            and so is handed in as ``Openers.remote``
``hybrid``  ``HybridTargets``: the cache where a batch's shards are committed, remote otherwise
==========  ========================================================================

A new source is one reader (class) here plus one entry of ``SOURCES`` and its value in
``pipeline.config.TeacherSource``; the config's checks (``RunConfig``), ``kdpipe train`` and
``kdpipe run`` ask ``SOURCES`` what a source needs. Nothing here imports Ray, and nothing
heavier than numpy at import: the config's checks read ``SOURCES``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    import jax

    from pipeline.cache import CacheReader
    from pipeline.config import CacheConfig, RunConfig
    from pipeline.data import DatasetInfo

# A student waiting for a shard lists the commit records this often.
SHARD_POLL_S = 0.2
# Long enough for any teacher to commit a shard; a dead teacher group ends the run sooner
# (the driver tears the student group down).
SHARD_WAIT_TIMEOUT_S = 6 * 3600.0
# Hybrid: the commit records are listed at most this often (each listing reads them all).
COMMIT_REFRESH_S = 1.0


class TargetReader(Protocol):
    """Teacher targets of one split by row, as ``CacheReader`` serves them: ``read(rows [B])``
    returns the teacher keys of pipeline/losses/targets.py (``[B, L, ...]``), on the device
    when they are decoded there."""

    def read(self, rows: np.ndarray) -> Mapping[str, jax.Array | np.ndarray]: ...


# (split, the rows this host reads batch after batch, whether a batch is wanted) -> a reader
# asking teacher hosts (actors.remote.remote_readers makes one: it needs Ray).
RemoteReaders = Callable[[str, Iterator[np.ndarray], Callable[[np.ndarray], bool]], TargetReader]


# --------------------------------------------------------------------------------------------
# Caches
# --------------------------------------------------------------------------------------------

def open_cache(cache: CacheConfig, info: DatasetInfo, split: str, vocab_size: int, *,
               temperature: float, teacher_fp: str | None = None) -> CacheReader:
    """The cache reader of ``split``, checked against what a run with ``loss.temperature``
    ``temperature`` and a student of ``vocab_size`` logits declares (CacheError on any
    mismatch, naming the field)."""
    from pipeline.cache import CacheReader, RunDeclaration, split_location

    declaration = RunDeclaration(
        tokenizer_fingerprint=info.tokenizer_fingerprint,
        dataset_fingerprint=info.fingerprint(split),
        vocab_size=vocab_size,
        seq_len=info.seq_len,
        temperature=temperature,
        tokenizer_vocab_size=info.vocab_size,
        teacher_fingerprint=teacher_fp,
    )
    return CacheReader(split_location(cache.path, split), declaration)


def require_complete(reader: CacheReader, split: str) -> CacheReader:
    """``reader`` when all its shards are committed; ConfigError naming ``cache.path`` else."""
    missing = reader.manifest.num_shards - len(reader.committed_shards)
    if missing:
        raise ConfigError(
            f"cache.path: the {split} cache at {reader.location} has {missing} of "
            f"{reader.manifest.num_shards} shards not written yet; run `kdpipe cache` to finish it "
            f"(or `kdpipe run`, which trains while the teacher group writes)")
    return reader


class CommittedCacheReader:
    """A cache that teacher hosts may still be writing, read where committed only.

    ``read(rows)`` first waits for the shards of ``rows`` to be committed (telling
    ``on_wait(split, missing_shards)``, then ``on_wait(split, [])``), so the student never reads
    a shard being written. Opens the cache once a teacher host has created it.
    """

    def __init__(self, open_reader: Callable[[], CacheReader], location: str, split: str,
                 on_wait: Callable[[str, list], None]):
        self._open_reader, self.location, self.split = open_reader, location, split
        self._on_wait = on_wait
        self._reader: CacheReader | None = None
        self._listed_at = 0.0
        self.waited_s = 0.0
        self.first_read: dict[int, float] = {}  # shard -> time.time() of its first read

    def _cache(self, wait: bool = True) -> CacheReader | None:
        """The reader, once the cache exists; waits for a teacher host to create it, or
        returns None at once when not ``wait``."""
        if self._reader is None:
            from pipeline.cache.format import is_created
            from pipeline.cache.store import open_kvstore

            deadline = time.monotonic() + SHARD_WAIT_TIMEOUT_S
            store = open_kvstore(self.location)
            if not is_created(store, self.location):
                if not wait:
                    return None
                self._on_wait(self.split, ["manifest"])
                start = time.monotonic()
                while not is_created(store, self.location):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"cache {self.location}: no teacher host created it "
                                           f"within {SHARD_WAIT_TIMEOUT_S:g} s")
                    time.sleep(SHARD_POLL_S)
                self.waited_s += time.monotonic() - start
                self._on_wait(self.split, [])
            self._reader = self._open_reader()
        return self._reader

    def has(self, rows: np.ndarray) -> bool:
        """Whether every shard of ``rows`` is committed (commits listed at most every
        COMMIT_REFRESH_S)."""
        reader = self._cache(wait=False)
        if reader is None:
            return False
        shards = set(reader.manifest.shards_of(rows))
        stale = time.monotonic() - self._listed_at > COMMIT_REFRESH_S
        if not shards <= reader.committed_shards and stale:
            reader.refresh()
            self._listed_at = time.monotonic()
        return shards <= reader.committed_shards

    def read(self, rows: np.ndarray):
        reader = self._cache()
        shards = reader.manifest.shards_of(rows)
        missing = [s for s in shards if s not in reader.committed_shards]
        if missing and not set(missing) <= reader.refresh():
            self._on_wait(self.split, [s for s in missing if s not in reader.committed_shards])
            start = time.monotonic()
            reader.wait_for_shards(missing, timeout_s=SHARD_WAIT_TIMEOUT_S, poll_s=SHARD_POLL_S)
            self.waited_s += time.monotonic() - start
            self._on_wait(self.split, [])
        now = time.time()
        for s in shards:
            self.first_read.setdefault(s, now)
        return reader.read(rows)


class HybridTargets:
    """The cache where all shards of a batch are committed, a remote teacher otherwise.

    ``remote`` has asked ahead for the batches the cache did not hold when they came up
    (``take``); ``fetch`` collects such an answer, or asks on the spot."""

    def __init__(self, cache: CommittedCacheReader, remote: Any):
        self.cache, self.remote = cache, remote
        self.cached_batches = 0

    def read(self, rows: np.ndarray):
        ref = self.remote.take(rows)
        if self.cache.has(rows):
            self.cached_batches += 1
            return self.cache.read(rows)
        return self.remote.fetch(rows, ref)


# --------------------------------------------------------------------------------------------
# The reader of each source
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Openers:
    """What a host can open readers of a split with: ``cache(split)`` (None: no cache here),
    ``remote(split, wanted)`` (None: no teacher hosts, as in ``kdpipe train``)."""

    cache: Callable[[str], Any] | None = None
    remote: Callable[[str, Callable[[np.ndarray], bool]], TargetReader] | None = None


def _hybrid(split: str, openers: Openers) -> HybridTargets:
    cache = openers.cache(split)
    return HybridTargets(cache, openers.remote(split, lambda rows: not cache.has(rows)))


@dataclasses.dataclass(frozen=True)
class Source:
    """A teacher source: how a split's reader is opened (None: the teacher runs in the step)
    and what that needs: a ``cache:`` section, teacher hosts answering requests."""

    open: Callable[[str, Openers], TargetReader | None] | None
    reads_cache: bool = False
    asks_teacher_hosts: bool = False

    @property
    def teacher_in_step(self) -> bool:
        return self.open is None

    @property
    def scores_sequences(self) -> bool:
        """Whether the teacher can score sequences the student wrote (``train.on_policy``):
        it runs in the step or on teacher hosts; a cache holds the dataset's rows only."""
        return self.teacher_in_step or self.asks_teacher_hosts

    @property
    def fills_cache(self) -> bool:
        """Whether ``kdpipe run``'s teacher hosts write the shards it reads (a cache alone
        serves it, so nothing else would)."""
        return self.reads_cache and not self.asks_teacher_hosts


SOURCES: dict[str, Source] = {
    "live": Source(None),
    # without a cache (a hard-label run) there is nothing to read: held-out CE only
    "offline": Source(lambda split, o: o.cache(split) if o.cache else None, reads_cache=True),
    "remote": Source(lambda split, o: o.remote(split, lambda rows: True), asks_teacher_hosts=True),
    "hybrid": Source(_hybrid, reads_cache=True, asks_teacher_hosts=True),
}


def pick_readers(source: str, splits: Iterable[str], openers: Openers
                 ) -> dict[str, TargetReader] | None:
    """split -> reader of teacher targets for ``source`` (a ``SOURCES`` key), for each of
    ``splits``; None for a source whose teacher runs in the step.

    Raises:
      ConfigError: ``source`` asks teacher hosts and ``openers`` has none (``kdpipe train``).
    """
    kind = SOURCES[source]
    if kind.teacher_in_step:
        return None
    if kind.asks_teacher_hosts and openers.remote is None:
        raise ConfigError(f"cluster.teacher_source: '{source}' needs teacher actors; run it with "
                          f"`kdpipe run`, which starts them (`kdpipe train` runs offline or live)")
    readers = {split: kind.open(split, openers) for split in splits}
    return {split: reader for split, reader in readers.items() if reader is not None}


def run_targets(config: RunConfig, source: str, *, teacher_fp: str | None, offset: int,
                host_index: int, host_count: int, remote: RemoteReaders | None,
                on_wait: Callable[[str, list], None]) -> dict[str, TargetReader] | None:
    """split -> reader for student host ``host_index`` of ``host_count`` in ``kdpipe run``,
    whose train rows start at global sample ``offset``: caches read where committed (teacher
    hosts may still write them; ``on_wait(split, missing)`` hears of each wait), teacher hosts
    asked through ``remote`` on this host's row schedules. None: the teacher runs in the step,
    or a hard-label run (no ``teacher_fp``) reads a finished cache as ``kdpipe train`` does."""
    from pipeline.cache import split_location
    from pipeline.data import read_info
    from pipeline.data.dataset import SPLITS
    from pipeline.data.order import eval_schedule, train_schedule

    if teacher_fp is None:
        return None
    info = read_info(config.data.prepared_dir)
    vocab_size = config.model.student.vocab_size or info.vocab_size
    rows = {split: info.splits.get(split, {}).get("num_rows", 0) for split in SPLITS}

    def cache(split: str) -> CommittedCacheReader:
        return CommittedCacheReader(
            lambda: open_cache(config.cache, info, split, vocab_size,
                               temperature=config.loss.temperature, teacher_fp=teacher_fp),
            split_location(config.cache.path, split), split, on_wait)

    def train_rows() -> Iterator[np.ndarray]:
        schedule = train_schedule(
            rows["train"], offset, seed=config.data.seed, shuffle_window=config.data.shuffle_window,
            global_batch=config.train.global_batch_size, host_index=host_index,
            host_count=host_count)
        if config.train.on_policy is None:
            return schedule
        from pipeline.onpolicy import offline_rows, rollout_count

        # on-policy: a host's rollouts get their targets from the scorer; the rest from here
        count = rollout_count(config.train.global_batch_size // host_count,
                              config.train.on_policy.fraction)
        return (offline_rows(batch, count) for batch in schedule)

    schedules = {
        "train": train_rows,
        "eval": lambda: eval_schedule(rows["eval"], config.eval, host_index=host_index,
                                      host_count=host_count)}

    def ask(split: str, wanted: Callable[[np.ndarray], bool]) -> TargetReader:
        return remote(split, schedules[split](), wanted)

    openers = Openers(cache=cache if config.cache is not None else None,
                      remote=ask if remote is not None else None)
    return pick_readers(source, [split for split in SPLITS if rows[split]], openers)

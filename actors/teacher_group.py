"""The teacher group's work: the teacher loaded on every host, then cache shards from a queue.

Offline, teacher hosts fill the cache from ``ShardQueue``, one shard per host at a time, in the
order the students first read them (``pipeline.data.order.fill_order``): a host that finishes
a shard takes the next, so a faster host writes more. Remote and hybrid, the hosts load the
teacher and then answer the students' requests (``actors.remote``); nothing is queued.

``TeacherWork`` keeps the jobs in flight and carries out what the driver decides about a lost
host (``lose``: its shard back on the queue and a new host in its place; ``replace``: a new
host, for a teacher that died under the students' requests). It never decides whether to
retry: that is ``actors.policy.FailurePolicy``'s.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

from actors.groups import HostGroup, HostGroupError, HostTimeoutError
from actors.work import fill_shard, load_teacher
from pipeline.config import CacheConfig, RunConfig
from pipeline.errors import ConfigError

SPLITS = ("train", "eval")


def pending_shards(cache: CacheConfig, num_rows: Mapping[str, int],
                   teacher_fp: str) -> dict[str, set[int]]:
    """split -> shards of ``cache`` not committed yet. A cache written by another teacher is
    refused (``ConfigError`` naming ``cache.path``)."""
    from pipeline.cache import num_shards, read_manifest, split_location
    from pipeline.errors import CacheError

    pending = {}
    for split in SPLITS:
        if not num_rows.get(split):
            continue
        total = set(range(num_shards(num_rows[split], cache.shard_sequences)))
        location = split_location(cache.path, split)
        try:
            manifest = read_manifest(location)
        except CacheError:  # no manifest yet: nothing written
            pending[split] = total
            continue
        if manifest.teacher_fingerprint != teacher_fp:
            raise ConfigError(f"cache.path: the {split} cache at {location} was written by another "
                              f"teacher ({manifest.teacher_fingerprint}, model.teacher.path gives "
                              f"{teacher_fp}); point cache.path elsewhere or remove it")
        pending[split] = total - manifest.committed
    return pending


class ShardQueue:
    """The driver's queue of cache shards: each teacher host holds one shard at a time and takes
    the next when it finishes (dynamic assignment: a faster host writes more shards)."""

    def __init__(self, order: list[tuple[str, int]]):
        self._todo = collections.deque(order)
        self.running: dict[int, tuple[str, int]] = {}
        self.done: list[tuple[str, int, int]] = []  # (split, shard, rank)

    def take(self, rank: int) -> tuple[str, int] | None:
        if not self._todo:
            return None
        self.running[rank] = self._todo.popleft()
        return self.running[rank]

    def finish(self, rank: int) -> tuple[str, int]:
        split, shard = self.running.pop(rank)
        self.done.append((split, shard, rank))
        return split, shard

    def requeue(self, rank: int) -> tuple[str, int] | None:
        """Put the shard ``rank`` held (its host died) first in line: it was the most due."""
        job = self.running.pop(rank, None)
        if job is not None:
            self._todo.appendleft(job)
        return job

    @property
    def empty(self) -> bool:
        return not self._todo and not self.running


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A teacher host loaded the teacher."""

    rank: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class ShardWritten:
    """A teacher host committed a shard (``pipeline.teacher.FillResult``)."""

    rank: int
    result: Any


class TeacherWork:
    """The teacher group's work in flight: the teacher loaded on every host, then shards from
    ``queue``, one per host at a time (a host that finishes one takes the next).

    The driver waits on ``refs`` with ``ray.wait`` and hands each finished one to ``collect``.

    Args:
      group: the teacher hosts.
      config: the run, as the hosts' work functions take it.
      queue: the shards to write (empty: remote, hybrid).
      teacher_fp: the teacher's fingerprint, recorded in the cache's manifest.
      fill: the shard function, ``fill(host, config, split, shard, teacher_fp)``.
    """

    def __init__(self, group: HostGroup, config: RunConfig, queue: ShardQueue, teacher_fp: str,
                 fill: Callable[..., Any] = fill_shard):
        self.group, self.config, self.queue = group, config, queue
        self.teacher_fp, self.fill = teacher_fp, fill
        self.load_seconds: list[float] = []
        self.results: list = []  # pipeline.teacher.FillResult, in commit order
        self.fill_started: float | None = None  # time.monotonic() of the first shard handed out
        self.fill_ended: float | None = None
        self.retired: set[int] = set()  # ranks lost and not replaced
        self._jobs = {ref: (rank, "load") for rank, ref in group.submit(load_teacher, config).items()}

    @property
    def refs(self) -> list:
        return list(self._jobs)

    @property
    def busy(self) -> bool:
        return bool(self._jobs)

    @property
    def stalled(self) -> bool:
        """No host at work and shards still to write: every host was lost, none replaced."""
        return not self._jobs and not self.queue.empty

    @property
    def fill_seconds(self) -> float | None:
        """From the first shard handed out to the last one committed."""
        if self.fill_started is None or self.fill_ended is None:
            return None
        return self.fill_ended - self.fill_started

    def collect(self, ref) -> Loaded | ShardWritten:
        """Collect a finished job and give its host the next shard.

        Raises:
          HostGroupError: the job failed (the host died, or the work raised); the driver asks
            ``actors.policy.FailurePolicy`` what to do, and ``lose`` carries a retry out.
        """
        rank, kind = self._jobs.pop(ref)
        result = self.group.gather({rank: ref}, call=kind)[rank]
        if kind == "load":
            self.load_seconds.append(result)
            event = Loaded(rank, result)
        else:
            self.queue.finish(rank)
            self.results.append(result)
            self.fill_ended = time.monotonic()
            event = ShardWritten(rank, result)
        self._feed(rank)
        return event

    def _feed(self, rank: int) -> None:
        job = self.queue.take(rank)
        if job is not None:
            if self.fill_started is None:
                self.fill_started = time.monotonic()
            ref = self.group.submit(self.fill, self.config, *job, self.teacher_fp, ranks=[rank])[rank]
            self._jobs[ref] = (rank, "fill")

    def handles(self) -> tuple:
        """The teacher host actors, by rank (what remote and hybrid students send requests to)."""
        return tuple(self.group.actor(r) for r in range(self.group.num_hosts))

    def unhealthy(self) -> list[int]:
        """Ranks that do not answer a health check (dead or hung)."""
        return self.group.unhealthy()

    def replace(self, rank: int) -> None:
        """A new host in ``rank``'s bundle, loading the teacher.

        Raises:
          HostGroupError, HostTimeoutError: the new host could not start.
        """
        self.group.replace_host(rank)
        ref = self.group.submit(load_teacher, self.config, ranks=[rank])[rank]
        self._jobs[ref] = (rank, "load")

    def lose(self, rank: int) -> None:
        """Host ``rank`` died: its unfinished shard goes back to the front of the queue (the
        cache writer rewrites an uncommitted shard from scratch) and a new host takes the
        rank's bundle, or the surviving hosts carry on without it (see ``stalled``)."""
        self.queue.requeue(rank)
        try:
            self.replace(rank)
        except (HostGroupError, HostTimeoutError):
            self.retired.add(rank)
        busy = {r for r, _ in self._jobs.values()}
        for idle in sorted(set(range(self.group.num_hosts)) - busy - self.retired):
            self._feed(idle)  # a survivor that found the queue empty takes the shard back

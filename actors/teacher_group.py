"""The teacher group's work: the teacher loaded on every replica, then cache shards from a queue.

The teacher group is ``cluster.teacher.hosts / hosts_per_replica`` replicas, each one JAX
program over its hosts with the teacher laid out over all of their devices
(``pipeline.teacher.teacher_mesh``); one host per replica is the default. Offline, replicas
fill the cache from ``ShardQueue``, one shard per replica at a time, in the order the students
first read them (``pipeline.data.order.fill_order``): a replica that finishes a shard takes
the next, so a faster one writes more. Every host of a replica runs the shard; the replica's
first host writes it (``pipeline.teacher.fill_cache``), so each shard keeps one writer and its
exactly-once commit. Remote and hybrid, the hosts (one per replica) load the teacher and then
answer the students' requests (``actors.remote``); nothing is queued.

``TeacherWork`` keeps the jobs in flight and carries out what the driver decides about a lost
host (``lose``: its replica's shard back on the queue and the replica formed again on new
hosts, since a JAX program cannot take in a new process; ``replace``: the same for a teacher
that died under the students' requests). It never decides whether to retry: that is
``actors.policy.FailurePolicy``'s, with the one budget of the run.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from actors.group_errors import HostGroupError, HostTimeoutError
from actors.groups import HostGroup
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
    """The driver's queue of cache shards: each teacher replica holds one shard at a time and
    takes the next when it finishes (dynamic assignment: a faster replica writes more shards)."""

    def __init__(self, order: list[tuple[str, int]]):
        self._todo = collections.deque(order)
        self.running: dict[int, tuple[str, int]] = {}
        self.done: list[tuple[str, int, int]] = []  # (split, shard, replica)

    def take(self, replica: int) -> tuple[str, int] | None:
        if not self._todo:
            return None
        self.running[replica] = self._todo.popleft()
        return self.running[replica]

    def finish(self, replica: int) -> tuple[str, int]:
        split, shard = self.running.pop(replica)
        self.done.append((split, shard, replica))
        return split, shard

    def requeue(self, replica: int) -> tuple[str, int] | None:
        """Put the shard ``replica`` held (a host of it died) first in line: it was the most due."""
        job = self.running.pop(replica, None)
        if job is not None:
            self._todo.appendleft(job)
        return job

    @property
    def empty(self) -> bool:
        return not self._todo and not self.running


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A teacher replica loaded the teacher."""

    replica: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class ShardWritten:
    """A teacher replica committed a shard (``pipeline.teacher.FillResult``)."""

    replica: int
    result: Any


class TeacherWork:
    """The teacher group's work in flight: the teacher loaded on every replica, then shards
    from ``queue``, one per replica at a time (a replica that finishes one takes the next).

    Replica ``r`` is the group's ``r``-th JAX program, hosts ``r*H .. r*H+H-1`` (H hosts per
    program, as ``HostGroup.setup_jax(hosts_per_program=H)`` formed them, H =
    ``cluster.teacher.hosts_per_replica``): each job runs on all of its hosts, and is done
    when all of them are.

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
        # replicas are the group's JAX programs (setup_jax(hosts_per_program=...))
        self.hosts_per_replica = group.hosts_per_program
        self.load_seconds: list[float] = []
        self.results: list = []  # pipeline.teacher.FillResult, in commit order
        self.fill_started: float | None = None  # time.monotonic() of the first shard handed out
        self.fill_ended: float | None = None
        self.retired: set[int] = set()  # replicas lost and not replaced
        self._jobs: dict = {}  # reference -> (replica, "load" | "fill", host rank)
        for replica in range(self.replicas):
            self._submit(replica, "load", load_teacher, config)

    @property
    def replicas(self) -> int:
        return self.group.num_hosts // self.hosts_per_replica

    @property
    def refs(self) -> list:
        return list(self._jobs)

    @property
    def busy(self) -> bool:
        return bool(self._jobs)

    @property
    def stalled(self) -> bool:
        """No replica at work and shards still to write: every replica was lost, none replaced."""
        return not self._jobs and not self.queue.empty

    @property
    def fill_seconds(self) -> float | None:
        """From the first shard handed out to the last one committed."""
        if self.fill_started is None or self.fill_ended is None:
            return None
        return self.fill_ended - self.fill_started

    def _submit(self, replica: int, kind: str, fn: Callable[..., Any], *args) -> None:
        ranks = self.group.program_ranks(replica * self.hosts_per_replica)
        for rank, ref in self.group.submit(fn, *args, ranks=ranks).items():
            self._jobs[ref] = (replica, kind, rank)

    def collect(self, ref) -> Loaded | ShardWritten:
        """Collect a finished job (waiting for the rest of its replica's hosts) and give the
        replica the next shard.

        Raises:
          HostGroupError: the job failed (a host died, or the work raised), ranked by teacher
            host; the driver asks ``actors.policy.FailurePolicy`` what to do, and ``lose``
            carries a retry out.
        """
        replica, kind, _ = self._jobs[ref]
        mine = {rank: job for job, (r, _, rank) in self._jobs.items() if r == replica}
        for job in mine.values():
            del self._jobs[job]
        result = self.group.gather(mine, call=kind)[min(mine)]  # the replica's first process
        if kind == "load":
            self.load_seconds.append(result)
            event = Loaded(replica, result)
        else:
            self.queue.finish(replica)
            self.results.append(result)
            self.fill_ended = time.monotonic()
            event = ShardWritten(replica, result)
        self._feed(replica)
        return event

    def _feed(self, replica: int) -> None:
        job = self.queue.take(replica)
        if job is not None:
            if self.fill_started is None:
                self.fill_started = time.monotonic()
            self._submit(replica, "fill", self.fill, self.config, *job, self.teacher_fp)

    def handles(self) -> tuple:
        """The teacher host actors, by rank (what remote and hybrid students send requests to)."""
        return tuple(self.group.actor(r) for r in range(self.group.num_hosts))

    def unhealthy(self) -> list[int]:
        """Ranks that do not answer a health check (dead or hung)."""
        return self.group.unhealthy()

    def replace(self, rank: int) -> None:
        """New hosts for the replica of host ``rank``, loading the teacher.

        Raises:
          HostGroupError, HostTimeoutError: the new hosts could not start.
        """
        self.group.replace_hosts(rank)
        self._submit(rank // self.hosts_per_replica, "load", load_teacher, self.config)

    def lose(self, ranks: Iterable[int]) -> None:
        """Hosts ``ranks`` died: each of their replicas loses its unfinished shard to the front
        of the queue (the cache writer rewrites an uncommitted shard from scratch) and is
        formed again on new hosts, or the surviving replicas carry on without it (see
        ``stalled``)."""
        for replica in sorted({rank // self.hosts_per_replica for rank in ranks}):
            self.queue.requeue(replica)
            try:
                self.replace(replica * self.hosts_per_replica)
            except (HostGroupError, HostTimeoutError):
                self.retired.add(replica)
        busy = {replica for replica, _, _ in self._jobs.values()}
        for idle in sorted(set(range(self.replicas)) - busy - self.retired):
            self._feed(idle)  # a survivor that found the queue empty takes the shard back

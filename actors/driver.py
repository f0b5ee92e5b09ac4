"""The driver of ``kdpipe run``: both host groups, the teacher source, one progress view.

``run(config, address=None)`` connects to Ray (an embedded local Ray, or the cluster at
``address``, RAY_ADDRESS or ``cluster.address``), starts the student group (one JAX program over its hosts, each host
calling ``pipeline.train.train`` with its ``Host``) and, as the config's
``cluster.teacher_source`` asks, the teacher group:

- ``offline``: teacher hosts fill the cache (train and eval splits) from a work queue of shards
  held here: a host that finishes a shard takes the next, in the order the student first needs
  them. The student starts at once and reads committed shards only; a batch whose shards are
  not committed yet waits for them (the view shows which). A cache already complete is reused
  and no teacher host starts.
- ``live``: no teacher group; each student host loads the teacher and runs it inside the step.
- ``remote``: teacher hosts compute the targets of the batches each student host reads next,
  encoded as the cache would store them, and hand them over Ray's object store a few batches
  ahead of need.
- ``hybrid``: the cache where the batch's shards are committed, a remote teacher otherwise (a
  cache partly written by an interrupted fill, or one ``kdpipe cache`` is still writing). The
  teacher hosts only serve requests here: a shard they were writing would hold a student's
  request up for as long as the shard takes.

Work functions (``fn(host, ...)``, run by ``actors.hosts.HostActor``) keep per-host objects in
``host.state``: the teacher is loaded once per host. Host failures surface here as
``HostGroupError`` (ranks grouped), and the driver owns the retries, each counted against
``cluster.max_failures`` (a dead process, a node lost) or ``cluster.max_preemptions`` (a
preemption notice, a node preempted); past either budget the run ends with ``HostLossesError``.

- An offline teacher host that dies is survived: its unfinished shard goes back on the queue
  and a new host takes its place (``HostGroup.replace_host``).
- A remote or hybrid teacher host that dies under the students' requests is replaced the same
  way, and the student group restarts from its latest checkpoint with the new hosts' handles.
- The student group is one JAX program, which cannot take in a new process: when a student
  host dies, or gets a preemption notice (SIGTERM: all hosts save a checkpoint at the same
  step and stop), the driver tears the group down and forms a new one with as many hosts as
  the cluster now holds, up to the size it had (the counts of ``cluster.student.min_hosts`` ..
  ``max_hosts`` that divide the global batch). The new group restores the latest checkpoint
  onto its own mesh and goes on from its global sample offset with the same global batch:
  the steps after that checkpoint are redone, none is skipped or seen twice. Fewer than
  ``min_hosts`` placeable ends the run with ``InsufficientResourcesError``.
- When nodes join the cluster and a bigger student group fits, the students stop after their
  next checkpoint and the group is re-formed bigger (up to ``max_hosts``).
- Rerunning a killed driver resumes both: committed shards are skipped and the students
  restore their latest checkpoint. A driver sent SIGTERM or SIGINT (``ray job stop``,
  Ctrl-C) first has the students save a checkpoint at the step they agree on, then raises
  ``pipeline.train.Preempted`` (``kdpipe run`` exits 143); a second signal stops it at once.
"""

from __future__ import annotations

import collections
import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group_table

from actors.cluster import connect
from actors.groups import (LOCAL_HOST_CPU, PLACEMENT_TIMEOUT_S, GroupSpec, HostGroup,
                           HostGroupError, HostTimeoutError, InsufficientResourcesError,
                           cluster_census)
from actors.hosts import HostEnv
from actors.remote import SERVICE, RemoteTargets, TargetService, remote_readers
from actors.view import ProgressView
from pipeline.config import GroupConfig, RunConfig
from pipeline.data.order import fill_order
from pipeline.errors import ConfigError

# The driver loop's turn: how long it waits for finished work before refreshing the view.
POLL_S = 0.5
# A re-formed student group gets this long to be placed at one size before a smaller one is
# tried (Ray notices a lost node, the old reservation is released).
REFORM_PLACEMENT_S = 120.0
# How often the driver looks for joined nodes that a bigger student group could use.
GROW_CHECK_S = 5.0

SPLITS = ("train", "eval")


# --------------------------------------------------------------------------------------------
# Config -> group specs
# --------------------------------------------------------------------------------------------

def absolute_paths(config: RunConfig, base: Path) -> RunConfig:
    """``config`` with relative paths made absolute against ``base`` (the driver's directory):
    host actors run in other working directories. URLs (``gs://``) are left as they are."""
    def fix(path: str | None) -> str | None:
        if path is None or "://" in path:
            return path
        return str((base / path).absolute())

    data = dataclasses.replace(config.data, tokenizer=fix(config.data.tokenizer),
                               prepared_dir=fix(config.data.prepared_dir),
                               sources=tuple(fix(s) for s in config.data.sources))
    model = dataclasses.replace(
        config.model, teacher=dataclasses.replace(config.model.teacher, path=fix(config.model.teacher.path)),
        student=dataclasses.replace(config.model.student, path=fix(config.model.student.path)))
    cache = (None if config.cache is None
             else dataclasses.replace(config.cache, path=fix(config.cache.path)))
    return dataclasses.replace(config, run_dir=fix(config.run_dir), data=data, model=model,
                               cache=cache)


def group_spec(name: str, group: GroupConfig, *, one_machine: bool) -> GroupSpec:
    """The placement of a group: ``group.resources`` per host, one host per node on a cluster
    (STRICT_SPREAD), side by side (PACK) on a one-node Ray such as the embedded one. Hosts that
    reserve nothing (all resources 0) take a sliver of a CPU, as ``GroupSpec.local``."""
    resources = {k: v for k, v in group.resources.items() if v > 0}
    platform = "tpu" if "TPU" in resources else "cuda" if "GPU" in resources else "cpu"
    return GroupSpec(name, group.hosts, resources or {"CPU": LOCAL_HOST_CPU},
                     strategy="PACK" if one_machine else "STRICT_SPREAD", env=HostEnv(platform))


def check_embedded_fit(specs: list[GroupSpec]) -> None:
    """Refuse groups that an embedded local Ray can never hold, before reserving anything.

    The embedded Ray (started by this driver) never grows, so a placement it cannot hold
    would only wait out PLACEMENT_TIMEOUT_S. The groups run at the same time: each is checked
    on top of the ones before it. Hosts that reserve nothing count with their sliver of a CPU
    (LOCAL_HOST_CPU).

    Raises:
      InsufficientResourcesError: naming the group, its hosts x resources and what Ray has.
    """
    have = ray.cluster_resources()
    held: collections.Counter = collections.Counter()
    for spec in specs:
        ask: collections.Counter = collections.Counter()
        for bundle in spec.bundles():
            ask.update(bundle)
        short = sorted(k for k, v in ask.items() if held[k] + v > have.get(k, 0) + 1e-9)
        if short:
            before = {k: held[k] for k in ask if held[k]}
            raise InsufficientResourcesError(
                f"cluster.{spec.name}: {spec.num_hosts} host(s) x "
                f"{dict(spec.resources_per_host)} ask for {dict(ask)}"
                + (f" on top of {before} held by the groups started before it" if before else "")
                + f", but the embedded local Ray has {{{', '.join(f'{k!r}: {have.get(k, 0):g}' for k in ask)}}} "
                f"in all (short of {', '.join(short)}) and never grows; lower "
                f"cluster.{spec.name}.hosts or cluster.{spec.name}.resources, or join a cluster "
                f"with --address, RAY_ADDRESS or cluster.address")
        held.update(ask)


# --------------------------------------------------------------------------------------------
# The shard work queue
# --------------------------------------------------------------------------------------------

def start_position(config: RunConfig) -> tuple[int, int]:
    """``(step, global sample offset)`` the student resumes from: its latest checkpoint's, or
    (0, 0)."""
    from pipeline.checkpoint import read_checkpoint_metas

    metas = read_checkpoint_metas(config.checkpoint_dir)
    if not metas:
        return 0, 0
    position = metas[max(metas)]["position"]
    return int(position["step"]), int(position["global_sample_offset"])


class HostLossesError(RuntimeError):
    """More hosts were lost than ``cluster.max_failures`` / ``max_preemptions`` allow."""


def _exceeded(losses: dict[str, int], budget: str, config: RunConfig) -> int | None:
    """Count one more loss in ``losses[budget]`` ("failures" or "preemptions"); returns the
    limit (``cluster.max_<budget>``) when the count now exceeds it, else None."""
    losses[budget] += 1
    limit = getattr(config.cluster, f"max_{budget}")
    return limit if losses[budget] > limit else None


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


# --------------------------------------------------------------------------------------------
# Teacher hosts' work
# --------------------------------------------------------------------------------------------

def load_teacher(host, config: RunConfig) -> float:
    """Load the teacher into this host's state (once); returns the seconds it took."""
    from pipeline.models.hf_io import load_pretrained
    from pipeline.step import TrainState

    start = time.perf_counter()
    if "teacher" not in host.state:
        spec = config.model.teacher
        model = load_pretrained(spec.path, dtype=spec.dtype)
        host.state["teacher"] = (model, TrainState.create(model))
        host.state[SERVICE] = TargetService.of(config, model.config.vocab_size)
    return time.perf_counter() - start


def fill_shard(host, config: RunConfig, split: str, shard: int, teacher_fp: str):
    """Write one shard of ``split`` into the cache (``pipeline.teacher.fill_cache``)."""
    from pipeline.teacher import fill_cache

    load_teacher(host, config)
    return fill_cache(config, host.state["teacher"][0], split, teacher_fp=teacher_fp,
                      shards=[shard])


class TeacherWork:
    """The teacher group's work in flight: the teacher loaded on every host, then shards from
    ``queue``, one per host at a time (a host that finishes one takes the next).

    The driver waits on ``refs`` with ``ray.wait`` and hands each finished one to ``handle``.
    """

    def __init__(self, teachers: HostGroup, config: RunConfig, queue: ShardQueue,
                 teacher_fp: str, fill: Callable[..., Any] = fill_shard, *, recover: bool = True):
        self.teachers, self.config, self.queue = teachers, config, queue
        self.teacher_fp, self.fill, self.recover = teacher_fp, fill, recover
        self.load_seconds: list[float] = []
        self.results: list = []  # pipeline.teacher.FillResult, in commit order
        self.fill_started: float | None = None  # time.monotonic() of the first shard handed out
        self.fill_ended: float | None = None
        # hosts lost so far, against cluster.max_failures / cluster.max_preemptions
        self.losses = {"failures": 0, "preemptions": 0}
        self.retired: set[int] = set()  # ranks lost and not replaced
        self._jobs = {ref: (rank, "load") for rank, ref in teachers.submit(load_teacher, config).items()}

    @property
    def refs(self) -> list:
        return list(self._jobs)

    @property
    def busy(self) -> bool:
        return bool(self._jobs)

    @property
    def fill_seconds(self) -> float | None:
        """From the first shard handed out to the last one committed."""
        if self.fill_started is None or self.fill_ended is None:
            return None
        return self.fill_ended - self.fill_started

    def handle(self, ref) -> tuple[str, Any]:
        """Collect a finished job, give its host the next shard; returns ``("load", seconds)``,
        ``("fill", FillResult)`` or ``("lost", rank)`` (see ``_lost``).

        Raises:
          HostGroupError: the work raised on a live host (retrying would fail the same way),
            or a host died in a run that does not recover (``recover`` False).
          HostLossesError: more hosts lost than the config's budget allows.
        """
        rank, kind = self._jobs.pop(ref)
        try:
            result = self.teachers.gather({rank: ref}, call=kind)[rank]
        except HostGroupError as err:
            if not self.recover or rank not in err.lost_ranks:
                raise
            self._lost(rank, err)
            return "lost", rank
        if kind == "load":
            self.load_seconds.append(result)
        else:
            self.queue.finish(rank)
            self.results.append(result)
            self.fill_ended = time.monotonic()
        self._feed(rank)
        return kind, result

    def _feed(self, rank: int) -> None:
        job = self.queue.take(rank)
        if job is not None:
            if self.fill_started is None:
                self.fill_started = time.monotonic()
            ref = self.teachers.submit(self.fill, self.config, *job, self.teacher_fp, ranks=[rank])[rank]
            self._jobs[ref] = (rank, "fill")

    def _count_loss(self, budget: str, err: BaseException) -> None:
        if (limit := _exceeded(self.losses, budget, self.config)) is not None:
            raise HostLossesError(
                f"teacher group: {self.losses[budget]} host(s) lost to {budget}, more than "
                f"cluster.max_{budget}={limit} allows; the last loss:\n{err}") from err

    def handles(self) -> tuple:
        """The teacher host actors, by rank (what remote and hybrid students send requests to)."""
        return tuple(self.teachers.actor(r) for r in range(self.teachers.num_hosts))

    def replace_dead(self, err: BaseException) -> list[int]:
        """Remote, hybrid: the teacher hosts that died under the students' requests (``err``,
        the students' failure), found by a health check, each counted and replaced in its
        bundle; returns their ranks (none: the students failed for another reason).

        Raises:
          HostLossesError: past the budget. HostGroupError, HostTimeoutError: a new host
            could not start.
        """
        dead = self.teachers.unhealthy()
        for rank in dead:
            self._count_loss("failures", err)
            self.teachers.replace_host(rank)
            ref = self.teachers.submit(load_teacher, self.config, ranks=[rank])[rank]
            self._jobs[ref] = (rank, "load")
        return dead

    def _lost(self, rank: int, err: HostGroupError) -> None:
        """Host ``rank`` died: its unfinished shard goes back to the front of the queue (the
        cache writer rewrites an uncommitted shard from scratch), the loss is counted, and a
        new host takes the rank's bundle, or the surviving hosts carry on without it."""
        preempted = getattr(err.failures[rank], "preempted", False)
        self._count_loss("preemptions" if preempted else "failures", err)
        self.queue.requeue(rank)
        try:
            self.teachers.replace_host(rank)
        except (HostGroupError, HostTimeoutError):
            self.retired.add(rank)
        else:
            ref = self.teachers.submit(load_teacher, self.config, ranks=[rank])[rank]
            self._jobs[ref] = (rank, "load")
        busy = {r for r, _ in self._jobs.values()}
        for idle in sorted(set(range(self.teachers.num_hosts)) - busy - self.retired):
            self._feed(idle)  # a survivor that found the queue empty takes the shard back
        if not self._jobs and not self.queue.empty:
            raise HostLossesError(f"teacher group: all {self.teachers.num_hosts} host(s) lost and "
                                  f"none could be started again; the last loss:\n{err}") from err


# --------------------------------------------------------------------------------------------
# Student hosts' teacher targets
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StudentPlan:
    """What every student host needs to find its teacher targets."""

    source: str
    teacher_fp: str | None
    teachers: tuple = ()  # teacher host actor handles (remote, hybrid)


@dataclasses.dataclass(frozen=True)
class StudentReport:
    """How one student host's run went."""

    rank: int
    result: Any  # pipeline.train.TrainResult; None when the host stopped early
    waited_s: float  # waiting for shards to be committed
    first_read: dict[str, dict[int, float]]  # split -> shard -> time.time() of its first read
    remote_batches: int
    cached_batches: int
    seconds: float
    stopped_step: int | None = None  # stopped early after saving this step's checkpoint
    preempted: bool = False  # ... because this host got a preemption notice (SIGTERM)


def train_student(host, config: RunConfig, plan: StudentPlan) -> StudentReport:
    """One student host's part of the run: ``pipeline.train.train`` as process ``host.rank``
    of the group's JAX program, with the plan's teacher targets."""
    from pipeline.targets import CommittedCacheReader, run_targets
    from pipeline.train import Host, Preempted, train

    start = time.perf_counter()

    def on_wait(split: str, missing: list) -> None:
        host.report(waiting=f"{split} shards {missing}" if missing else None)

    remote = remote_readers(plan.teachers, config, host.rank, host.num_hosts) if plan.teachers else None
    targets = run_targets(config, plan.source, teacher_fp=plan.teacher_fp,
                          offset=start_position(config)[1], host_index=host.rank,
                          host_count=host.num_hosts, remote=remote, on_wait=on_wait)

    def on_step(step: int, metrics: dict) -> None:
        host.report(step=step, **{k: metrics[k] for k in ("loss", "tokens_per_s") if k in metrics})

    result, stopped_step = None, None
    try:
        result = train(config, host=Host(host.rank, host.num_hosts), stop=host.stop_event,
                       pause=host.pause_event, on_step=on_step, targets=targets)
    except Preempted as stop:
        stopped_step = stop.step
    readers = (targets or {}).values()
    caches = [getattr(r, "cache", r) for r in readers]
    caches = [c for c in caches if isinstance(c, CommittedCacheReader)]
    remotes = [getattr(r, "remote", r) for r in readers]
    remotes = [r for r in remotes if isinstance(r, RemoteTargets)]
    return StudentReport(
        rank=host.rank, result=result, waited_s=sum(c.waited_s for c in caches),
        first_read={c.split: dict(c.first_read) for c in caches},
        remote_batches=sum(r.batches for r in remotes),
        cached_batches=sum(getattr(r, "cached_batches", 0) for r in readers),
        seconds=time.perf_counter() - start, stopped_step=stopped_step, preempted=host.preempted)


# --------------------------------------------------------------------------------------------
# The student group: formed, re-formed after losses, grown when nodes join
# --------------------------------------------------------------------------------------------

def _alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node.get("Alive")]


def _fits(have: Mapping[str, float], bundle: Mapping[str, float]) -> bool:
    return all(have.get(k, 0) >= v - 1e-9 for k, v in bundle.items())


def _hosts_by_total(spec: GroupSpec) -> int:
    """How many hosts of ``spec`` the alive nodes could hold by their total resources (one per
    node under STRICT_SPREAD): an upper bound, other groups may hold some of them."""
    bundle = spec.bundles()[0]
    if spec.strategy != "STRICT_SPREAD":
        return sum(int(min(node["Resources"].get(k, 0) / v for k, v in bundle.items()) + 1e-9)
                   for node in _alive_nodes())
    return sum(_fits(node["Resources"], bundle) for node in _alive_nodes())


def _free_nodes(spec: GroupSpec, held: set[str]) -> int:
    """Alive nodes other than ``held`` (node ids) with room for one more host of ``spec``."""
    # Ray's public per-node view (ray.util.state) needs the dashboard, which an embedded or
    # test cluster may not run; this is what `ray status` reads.
    from ray._private.state import available_resources_per_node

    available = available_resources_per_node()
    bundle = spec.bundles()[0]
    return sum(1 for node in _alive_nodes() if node["NodeID"] not in held
               and _fits(available.get(node["NodeID"], {}), bundle))


@dataclasses.dataclass
class StudentRestart:
    """One re-formation of the student group.

    Attributes:
      reason: "failure" (a host's process or node died), "preemption" (a notice, a preempted
        node), "teacher lost" (remote, hybrid: a teacher host the students asked died and was
        replaced) or "grow" (nodes joined; the group stopped at a checkpoint to take them in).
      hosts_before, hosts_after: the group's sizes.
      last_step: the last step the group reported before it stopped (None: none reported).
      resumed_step: the checkpoint step the new group restored.
      recover_s: from the moment the driver saw the loss to the new group's first step
        (None until that step).
      detail: what happened, as the group reported it (one line per kind of failure, with
        the ranks; no tracebacks).
    """

    reason: str
    hosts_before: int
    hosts_after: int
    last_step: int | None
    resumed_step: int
    recover_s: float | None = None
    detail: str = ""


class StudentWork:
    """The student group in flight; the driver hands it each finished student reference
    (``handle``) and each status poll (``observe``). See the module docstring for the rules.

    Attributes:
      group: the current ``HostGroup``.
      refs: rank -> reference of its ``student_fn`` call.
      reports: the hosts' ``StudentReport`` once the run is done (None until then).
      restarts: every re-formation, in order.
    """

    def __init__(self, config: RunConfig, plan: StudentPlan, spec_for: Callable[[int], GroupSpec],
                 student_fn: Callable[..., Any], teachers: TeacherWork | None = None):
        self.config, self.plan, self.student_fn = config, plan, student_fn
        self._teachers = teachers  # remote, hybrid: replaced when they die under requests
        self._spec_for = spec_for
        self.losses = {"failures": 0, "preemptions": 0}
        self.restarts: list[StudentRestart] = []
        self.group: HostGroup | None = None
        self.refs: dict[int, Any] = {}
        self.reports: list[StudentReport] | None = None
        self.last_step: int | None = None
        self._recovering_since: float | None = None
        self._grow_to: int | None = None
        self._next_grow_check = 0.0
        self._nodes = 0
        self.stopping = False  # the driver was asked to stop: the next outcome ends the run

    @property
    def done(self) -> bool:
        return self.reports is not None

    @property
    def stopped_step(self) -> int | None:
        """The checkpoint step the students stopped at after ``stop`` (None: they finished)."""
        steps = [r.stopped_step for r in self.reports or () if r.stopped_step is not None]
        return steps[0] if steps else None

    def stop(self) -> None:
        """Have the students save a checkpoint at the step they agree on and return."""
        self.stopping = True
        self.group.request_stop()

    def start(self, hosts: int, *, placement_timeout_s: float = PLACEMENT_TIMEOUT_S) -> None:
        """Form a group of ``hosts`` (one JAX program) and start the students on it."""
        group = HostGroup.create(self._spec_for(hosts), placement_timeout_s=placement_timeout_s)
        try:
            group.setup_jax(distributed=True)
        except BaseException:
            group.shutdown()
            raise
        self.group, self._grow_to = group, None
        self._nodes = len(_alive_nodes())
        self._next_grow_check = time.monotonic() + GROW_CHECK_S
        self.refs = group.submit(self.student_fn, self.config, self.plan)

    def handle(self) -> None:
        """Collect the students' outcome (one of ``refs`` is ready): the reports when they
        finished, else re-form the group.

        Raises:
          HostGroupError: the work raised on live hosts (a retry would fail the same way).
          HostLossesError: more losses than the config's budget.
          InsufficientResourcesError: fewer than ``min_hosts`` could be placed again.
        """
        try:
            reports = list(self.group.gather(self.refs).values())
        except HostGroupError as err:
            if self.stopping:
                raise
            if not err.lost_ranks:
                if self._teacher_replaced(err):
                    self._restart("teacher lost", f"a teacher host died under the students' "
                                  f"requests and was replaced:\n{err}", err)
                    return
                raise
            preempted = any(getattr(err.failures[r], "preempted", False) for r in err.lost_ranks)
            self._restart("preemption" if preempted else "failure", str(err), err)
            return
        stopped = [r for r in reports if r.stopped_step is not None]
        if not stopped or self.stopping:
            self.reports = reports
        elif any(r.preempted for r in stopped):
            ranks = [r.rank for r in stopped if r.preempted]
            self._restart("preemption", f"student group: preemption notice (SIGTERM) to rank(s) "
                          f"{ranks}; all hosts saved the checkpoint of step "
                          f"{stopped[0].stopped_step} and stopped")
        else:
            self._restart("grow", f"student group: stopped at the checkpoint of step "
                          f"{stopped[0].stopped_step} to grow to {self._grow_to} hosts")

    def _teacher_replaced(self, err: HostGroupError) -> bool:
        """Whether the students failed on a dead teacher actor (remote, hybrid), now replaced;
        the students then get the new handles."""
        if self.plan.source not in ("remote", "hybrid") or self._teachers is None or not any(
                isinstance(getattr(e, "cause", None), ray.exceptions.RayActorError)
                for e in err.failures.values()):
            return False
        if not self._teachers.replace_dead(err):
            return False
        self.plan = dataclasses.replace(self.plan, teachers=self._teachers.handles())
        return True

    def _restart(self, reason: str, detail: str, err: BaseException | None = None) -> None:
        seen = time.monotonic()
        if reason in ("failure", "preemption"):  # a teacher's loss counts in the teacher group
            budget = "preemptions" if reason == "preemption" else "failures"
            if (limit := _exceeded(self.losses, budget, self.config)) is not None:
                raise HostLossesError(
                    f"student group: {self.losses[budget]} restart(s) after {budget}, more than "
                    f"cluster.max_{budget}={limit} allows; the last:\n{detail}") from err
        before = self.group.num_hosts
        self.group.shutdown(graceful=err is None)  # hosts that stopped by themselves leave cleanly
        resumed_step, _ = start_position(self.config)
        counts = self.config.student_host_counts()
        most = self._grow_to if reason == "grow" else before
        # the largest sizes first, skipping those the alive nodes cannot hold at all
        bound = _hosts_by_total(self._spec_for(1))
        candidates = [n for n in sorted(counts, reverse=True) if n <= min(most, bound)]
        what = (f"student group: after a {reason} ({detail.splitlines()[0]}), the group could "
                f"not be formed again")
        sizes = (f"(cluster.student.min_hosts={self.config.cluster.student.fewest_hosts}; sizes "
                 f"that divide train.global_batch_size: {list(counts)})")
        if not candidates:
            raise InsufficientResourcesError(
                f"{what}: the alive nodes can hold {bound} student host(s), fewer than any size "
                f"allowed {sizes}; add nodes or lower cluster.student.min_hosts;\n"
                f"{cluster_census(self._spec_for(1))}")
        for hosts in candidates:
            try:
                self.start(hosts, placement_timeout_s=REFORM_PLACEMENT_S)
                break
            except InsufficientResourcesError as error:
                last_error = error
        else:
            raise InsufficientResourcesError(
                f"{what} with any of {candidates} host(s) {sizes} within {REFORM_PLACEMENT_S:g} s "
                f"each;\n{last_error}")
        # the ranks and what happened to them; a survivor's traceback (a collective whose peer
        # died) says nothing more
        summary = "\n".join(line for line in detail.splitlines() if not line.startswith("    "))
        self.restarts.append(StudentRestart(reason, before, self.group.num_hosts, self.last_step,
                                            resumed_step, detail=summary))
        self._recovering_since = seen

    def observe(self, statuses: Mapping[int, dict]) -> None:
        """A status poll of the current group: note the steps, time a recovery, and ask the
        hosts to pause at their next checkpoint when joined nodes let the group grow."""
        steps = [s["step"] for s in statuses.values() if "step" in s]
        if steps:
            self.last_step = max(steps)
            if self._recovering_since is not None and self.last_step > self.restarts[-1].resumed_step:
                self.restarts[-1].recover_s = time.monotonic() - self._recovering_since
                self._recovering_since = None
        now = time.monotonic()
        if self._grow_to is not None or now < self._next_grow_check:
            return
        self._next_grow_check = now + GROW_CHECK_S
        nodes = len(_alive_nodes())
        if nodes <= self._nodes:
            self._nodes = nodes
            return
        self._nodes = nodes
        current = self.group.num_hosts
        spec = self._spec_for(current)
        held = set(placement_group_table(self.group.placement_group)["bundles_to_node_id"].values())
        room = current + (_free_nodes(spec, held) if spec.strategy == "STRICT_SPREAD" else 0)
        bigger = [n for n in self.config.student_host_counts() if current < n <= room]
        if bigger:
            self._grow_to = max(bigger)
            self.group.request_pause()


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunOutcome:
    """What ``run`` did.

    Attributes:
      result: process 0's ``pipeline.train.TrainResult``.
      teacher_hosts: teacher hosts started (0: live, or a complete cache reused).
      shards_written: ``(split, shard, teacher rank)`` in commit order.
      students: each student host's report, by rank.
      teacher_hosts_lost: teacher hosts that died during the fill (each replaced, or the
        others carried on without it).
      student_restarts: each re-formation of the student group (losses, preemption notices,
        growth), with the time each took to recover.
      seconds: wall times: ``startup`` (Ray, groups, JAX), ``teacher load`` (slowest host),
        ``cache fill`` (first shard submitted to last committed), ``student`` (slowest host's
        train call, waits included), ``student waiting`` (longest wait for shards), ``total``.
    """

    source: str
    result: Any
    teacher_hosts: int
    student_hosts: int
    shards_written: tuple[tuple[str, int, int], ...]
    students: tuple[StudentReport, ...]
    seconds: dict[str, float]
    teacher_hosts_lost: int = 0
    student_restarts: tuple[StudentRestart, ...] = ()


def _pending_shards(config: RunConfig, num_rows: Mapping[str, int], teacher_fp: str) -> dict[str, set[int]]:
    """split -> shards not committed yet. A cache written by another teacher is refused."""
    from pipeline.cache import num_shards, read_manifest, split_location
    from pipeline.errors import CacheError

    pending = {}
    for split in SPLITS:
        if not num_rows.get(split):
            continue
        total = set(range(num_shards(num_rows[split], config.cache.shard_sequences)))
        location = split_location(config.cache.path, split)
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


def run(config: RunConfig, *, address: str | None = None, console=None,
        fill: Callable[..., Any] = fill_shard,
        student: Callable[..., StudentReport] = train_student) -> RunOutcome:
    """Run ``config`` on Ray; see the module docstring.

    Args:
      config: the run (relative paths are taken from the current directory).
      address: a Ray cluster to join; None: RAY_ADDRESS, else ``cluster.address``, else an
        embedded local Ray. A Ray already initialised in this process is used as it is.
      console: a ``rich.console.Console`` for the view (default: stdout).
      fill: the teacher hosts' shard function, ``fill(host, config, split, shard, teacher_fp)``
        (``fill_shard``; tests slow it down).
      student: the student hosts' function, ``student(host, config, plan)``
        (``train_student``; tests kill hosts from inside it).

    Raises:
      ConfigError: the config cannot run this way (e.g. no teacher path for teacher hosts).
      InsufficientResourcesError: an embedded Ray cannot hold the groups (at once), a
        cluster could not place them within actors.groups.PLACEMENT_TIMEOUT_S, or the student
        group could not be formed again with at least cluster.student.min_hosts after a loss.
      HostGroupError: hosts failed (grouped by rank and error).
      pipeline.train.Preempted: the driver got SIGTERM or SIGINT; the students saved a
        checkpoint first.
      HostLossesError: more hosts were lost (or student restarts needed) than
        cluster.max_failures (max_preemptions) allow; a lost teacher host's shard is written
        again, by a new host in its place when one starts, else by the others.
    """
    from rich.console import Console

    from pipeline.cache import num_shards
    from pipeline.data import read_info
    from pipeline.models.hf_io import teacher_fingerprint
    from pipeline.train import check_model_context

    started = time.monotonic()
    console = console or Console()
    config = absolute_paths(config, Path.cwd())
    # the driver's view replaces the per-host progress bars
    config = dataclasses.replace(config, logging=dataclasses.replace(config.logging, progress=False))
    source = config.teacher_source
    needs_teacher_hosts = source in ("offline", "remote", "hybrid") and not config.hard_labels_only
    if (needs_teacher_hosts or source == "live") and not config.model.teacher.from_pretrained:
        raise ConfigError(f"model.teacher.path: teacher source '{source}' loads the teacher from a "
                          f"Hugging Face directory (config.json + *.safetensors); none is given")
    info = read_info(config.data.prepared_dir)
    check_model_context(config.model.student, "student", info.seq_len)
    if needs_teacher_hosts or source == "live":
        check_model_context(config.model.teacher, "teacher", info.seq_len)
    num_rows = {split: info.splits.get(split, {}).get("num_rows", 0) for split in SPLITS}
    teacher_fp = teacher_fingerprint(config.model.teacher.path) if needs_teacher_hosts else None
    pending = (_pending_shards(config, num_rows, teacher_fp)
               if needs_teacher_hosts and source == "offline" else {})
    start = start_position(config)
    queue = ShardQueue(fill_order(num_rows, pending, data=config.data, eval_config=config.eval,
                                  global_batch=config.train.global_batch_size,
                                  steps=config.train.steps,
                                  shard_rows=config.cache.shard_sequences, start=start)
                       if pending else [])
    start_teachers = source in ("remote", "hybrid") or (source == "offline" and not queue.empty)

    own_ray = not ray.is_initialized()
    embedded = own_ray and connect(address, configured=config.cluster.address).address is None
    teachers = students = None
    seconds: dict[str, float] = {}
    try:
        # one node (an embedded Ray, a laptop's `ray start`): the hosts of a group side by side
        one_machine = len(_alive_nodes()) == 1

        def student_spec(hosts: int) -> GroupSpec:
            return group_spec("student", dataclasses.replace(config.cluster.student, hosts=hosts),
                              one_machine=one_machine)

        specs = {"student": student_spec(config.cluster.student.hosts)}
        if start_teachers:
            specs["teacher"] = group_spec("teacher", config.cluster.teacher, one_machine=one_machine)
        if embedded:
            check_embedded_fit(list(specs.values()))
        if start_teachers:
            teachers = HostGroup.create(specs["teacher"])
            teachers.setup_jax(distributed=False)
        work = (TeacherWork(teachers, config, queue, teacher_fp, fill, recover=source == "offline")
                if teachers else None)
        plan = StudentPlan(source, teacher_fp, work.handles() if work else ())
        students = StudentWork(config, plan, student_spec, student, work)
        students.start(config.cluster.student.hosts)
        seconds["startup"] = time.monotonic() - started
        cache_total = {split: num_shards(num_rows[split], config.cache.shard_sequences)
                       for split in SPLITS if num_rows[split]} if pending else {}
        view = ProgressView(
            console, source=source, steps=config.train.steps, start_step=start[0],
            shards_total=cache_total,
            shards_done={s: n - len(pending.get(s, ())) for s, n in cache_total.items()},
            teacher_hosts=teachers.num_hosts if teachers else 0,
            student_hosts=config.cluster.student.hosts, every_s=config.logging.progress_every_s)
        with _StopSignals() as signals, view:
            _supervise(students, work, view, signals)
        if students.stopped_step is not None:
            from pipeline.train import Preempted

            raise Preempted(students.stopped_step, signals.received or "a stop request")
        reports = students.reports
        if work is not None and work.load_seconds:
            seconds["teacher load"] = max(work.load_seconds)
        if work is not None and work.fill_seconds is not None:
            seconds["cache fill"] = work.fill_seconds
        seconds["student"] = max(r.seconds for r in reports)
        seconds["student waiting"] = max(r.waited_s for r in reports)
    finally:
        for group in (students.group if students else None, teachers):
            if group is not None:
                group.shutdown()
        if own_ray:
            ray.shutdown()
    seconds["total"] = time.monotonic() - started
    return RunOutcome(source=source, result=reports[0].result,
                      teacher_hosts=teachers.num_hosts if teachers else 0,
                      student_hosts=students.group.num_hosts, shards_written=tuple(queue.done),
                      students=tuple(reports), seconds=seconds,
                      teacher_hosts_lost=sum(work.losses.values()) if work is not None else 0,
                      student_restarts=tuple(students.restarts))


class _StopSignals:
    """SIGTERM and SIGINT to the driver, noted (``received``) rather than acted on, while
    installed (main thread only); a second one gets the handler from before."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def _note(self, signum, frame) -> None:
        if self.received is not None:
            previous = self._previous[signum]
            if callable(previous):
                previous(signum, frame)
            else:  # SIG_DFL
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)
            return
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._note) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def _supervise(students: StudentWork, work: TeacherWork | None, view: ProgressView,
               signals: _StopSignals) -> None:
    """The driver loop: collect teacher work (each finished shard hands its host the next),
    watch the students (re-forming their group as needed), refresh the view; returns when the
    students are done and the shard queue is empty, or when they stopped on a signal."""
    if work is not None:
        view.teacher_state = "loading the teacher"
    while not students.done or (work is not None and work.busy and not students.stopping):
        if signals.received and not students.stopping:
            students.stop()
            view.console.print(f"{signals.received}: the students save a checkpoint at their next "
                               f"step and stop (again to stop at once)")
        waiting_on = (work.refs if work is not None else []) + (
            [] if students.done else list(students.refs.values()))
        ready, _ = ray.wait(waiting_on, num_returns=1, timeout=POLL_S)
        for ref in ready:
            if not students.done and ref in students.refs.values():
                restarts = len(students.restarts)
                students.handle()
                if len(students.restarts) > restarts:
                    view.student_restarted(students.restarts[-1])
                continue
            if work is None or ref not in work.refs:
                continue  # a reference of a student group torn down since
            kind, result = work.handle(ref)
            if kind == "fill":
                view.shard_written(result.split, result.tokens)
            elif kind == "lost":
                view.teacher_state = f"host {result} lost, its shard queued again"
            elif students.plan.source != "offline":
                view.teacher_state = "serving targets"
        if work is not None and students.plan.source == "offline":
            view.fill_started = work.fill_started
            writing = ", ".join(f"{split} {shard}" for split, shard in work.queue.running.values())
            view.teacher_state = f"writing {writing}" if writing else (
                "cache complete" if not work.busy else view.teacher_state)
        statuses = None
        if not students.done:
            statuses = students.group.poll_status(timeout_s=POLL_S)
            students.observe(statuses)
        view.refresh(statuses)
    view.refresh(final=True)

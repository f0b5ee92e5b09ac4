"""The driver of ``kdpipe run``: both host groups, the teacher source, one progress view, and
the one place that decides what happens after a failure.

``run(config, address=None)`` connects to Ray (an embedded local Ray, or the cluster at
``address``, RAY_ADDRESS or ``cluster.address``), starts the student group (one JAX program over
its hosts, each host calling ``pipeline.train.train`` through ``actors.work.train_student``)
and, as the config's ``cluster.teacher_source`` asks, the teacher group:

- ``offline``: teacher replicas (``cluster.teacher.hosts_per_replica`` hosts each, one JAX
  program) fill the cache (train and eval splits) from a work queue of shards
  (``actors.teacher_group``): a replica that finishes a shard takes the next, in the order the
  student first needs them. The student starts at once and reads committed shards only; a
  batch whose shards are not committed yet waits for them (the view shows which). A cache
  already complete is reused and no teacher host starts.
- ``live``: no teacher group; each student host loads the teacher and runs it inside the step.
- ``remote``: teacher hosts compute the targets of the batches each student host reads next,
  encoded as the cache would store them, and hand them over Ray's object store a few batches
  ahead of need (``actors.remote``).
- ``hybrid``: the cache where the batch's shards are committed, a remote teacher otherwise (a
  cache partly written by an interrupted fill, or one ``kdpipe cache`` is still writing). The
  teacher hosts only serve requests here: a shard they were writing would hold a student's
  request up for as long as the shard takes.

Host failures surface here as ``HostGroupError`` (ranks grouped). ``actors.policy.FailurePolicy``
classifies each and decides retry or raise, against one budget for the run
(``cluster.max_failures``, ``cluster.max_preemptions``); this module carries the decision out:

- An offline teacher host that dies: its replica's unfinished shard goes back on the queue and
  the replica is formed again on new hosts (or the other replicas carry on without it).
- A remote or hybrid teacher host that dies under the students' requests: a new host takes
  its place, and the student group restarts from its latest checkpoint with the new handles.
- A student host that dies, or gets a preemption notice (SIGTERM: all hosts save a checkpoint
  at the same step and stop): the student group is re-formed with as many hosts as the
  cluster now holds (``actors.student_group``), and grown when nodes join.
- Rerunning a killed driver resumes both: committed shards are skipped and the students
  restore their latest checkpoint. A driver sent SIGTERM or SIGINT (``ray job stop``,
  Ctrl-C) first has the students save a checkpoint at the step they agree on, then raises
  ``pipeline.train.Preempted`` (``kdpipe run`` exits 143); a second signal stops it at once.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from actors.cluster import check_embedded_fit, connect, group_spec
from actors.group_errors import HostGroupError
from actors.groups import GroupSpec, HostGroup
from actors.policy import Decision, FailurePolicy, HostPreempted, NoHostsLeft, Raise, TeacherLost
from actors.student_group import StudentRestart, StudentWork, alive_nodes
from actors.teacher_group import SPLITS, ShardQueue, ShardWritten, TeacherWork, pending_shards
from actors.view import ProgressView
from actors.work import StudentPlan, StudentReport, fill_shard, start_position, train_student
from pipeline.config import RunConfig
from pipeline.data.order import fill_order
from pipeline.errors import ConfigError
from pipeline.targets import SOURCES

# The driver loop's turn: how long it waits for finished work before refreshing the view.
POLL_S = 0.5


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


@dataclasses.dataclass(frozen=True)
class RunOutcome:
    """What ``run`` did.

    Attributes:
      result: process 0's ``pipeline.train.TrainResult``.
      teacher_hosts: teacher hosts started (0: live, or a complete cache reused).
      shards_written: ``(split, shard, teacher replica)`` in commit order.
      students: each student host's report, by rank.
      teacher_hosts_lost: teacher hosts that died (each replaced, or the others carried on
        without it).
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
      HostGroupError: hosts failed in a way no retry mends (grouped by rank and error).
      pipeline.train.Preempted: the driver got SIGTERM or SIGINT; the students saved a
        checkpoint first.
      actors.policy.HostLossesError: more losses than cluster.max_failures (max_preemptions)
        allow, one budget for the run; or every teacher host was lost and none could start.
    """
    from rich.console import Console

    from pipeline.cache import num_shards
    from pipeline.data import read_info
    from pipeline.models.hf_io import teacher_fingerprint
    from pipeline.models.build import check_model_context

    started = time.monotonic()
    console = console or Console()
    config = absolute_paths(config, Path.cwd())
    # the driver's view replaces the per-host progress bars
    config = dataclasses.replace(config, logging=dataclasses.replace(config.logging, progress=False))
    source = config.teacher_source
    kind = SOURCES[source]
    needs_teacher_hosts = not kind.teacher_in_step and not config.hard_labels_only
    if (needs_teacher_hosts or kind.teacher_in_step) and not config.model.teacher.from_pretrained:
        raise ConfigError(f"model.teacher.path: teacher source '{source}' loads the teacher from a "
                          f"Hugging Face directory (config.json + *.safetensors); none is given")
    info = read_info(config.data.prepared_dir)
    check_model_context(config.model.student, "student", info.seq_len)
    if needs_teacher_hosts or kind.teacher_in_step:
        check_model_context(config.model.teacher, "teacher", info.seq_len)
    num_rows = {split: info.splits.get(split, {}).get("num_rows", 0) for split in SPLITS}
    teacher_fp = teacher_fingerprint(config.model.teacher.path) if needs_teacher_hosts else None
    pending = (pending_shards(config.cache, num_rows, teacher_fp)
               if needs_teacher_hosts and kind.fills_cache else {})
    start = start_position(config.checkpoint_dir)
    queue = ShardQueue(fill_order(num_rows, pending, data=config.data, eval_config=config.eval,
                                  global_batch=config.train.global_batch_size,
                                  steps=config.train.steps,
                                  shard_rows=config.cache.shard_sequences, start=start)
                       if pending else [])
    start_teachers = kind.asks_teacher_hosts or (kind.fills_cache and not queue.empty)

    own_ray = not ray.is_initialized()
    embedded = own_ray and connect(address, configured=config.cluster.address,
                                   dashboard=config.cluster.dashboard).address is None
    teachers = students = None
    policy = FailurePolicy(config.cluster, source)
    seconds: dict[str, float] = {}
    try:
        # one node (an embedded Ray, a laptop's `ray start`): the hosts of a group side by side
        one_machine = len(alive_nodes()) == 1

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
            teachers.setup_jax(distributed=True,
                               hosts_per_program=config.cluster.teacher.hosts_per_replica)
        work = TeacherWork(teachers, config, queue, teacher_fp, fill) if teachers else None
        plan = StudentPlan(source, teacher_fp, work.handles() if work else ())
        students = StudentWork(config, plan, student_spec, student)
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
            _supervise(students, work, policy, view, signals)
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
                      teacher_hosts_lost=policy.count("teacher"),
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


def _supervise(students: StudentWork, work: TeacherWork | None, policy: FailurePolicy,
               view: ProgressView, signals: _StopSignals) -> None:
    """The driver loop: collect teacher work (each finished shard hands its host the next),
    watch the students (re-forming their group as needed), refresh the view; returns when the
    students are done and the shard queue is empty, or when they stopped on a signal."""
    if work is not None:
        view.teacher_state = "loading the teacher"
    while not students.done or (work is not None and work.busy and not students.stopping):
        if signals.received and not students.stopping:
            students.stop()
            policy.stopping = True
            view.console.print(f"{signals.received}: the students save a checkpoint at their next "
                               f"step and stop (again to stop at once)")
        waiting_on = (work.refs if work is not None else []) + (
            [] if students.done else list(students.refs.values()))
        ready, _ = ray.wait(waiting_on, num_returns=1, timeout=POLL_S)
        for ref in ready:
            if not students.done and ref in students.refs.values():
                _students_returned(students, work, policy, view)
            elif work is not None and ref in work.refs:  # else: a torn-down student group's
                _teacher_returned(ref, work, policy, view, students.plan.source)
        if work is not None and SOURCES[students.plan.source].fills_cache:
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


def _carry_out(decision: Decision) -> None:
    if isinstance(decision, Raise):
        raise decision.error


def _students_returned(students: StudentWork, work: TeacherWork | None, policy: FailurePolicy,
                       view: ProgressView) -> None:
    """The students returned: done, or stopped at a checkpoint (a notice, to grow), or failed;
    the policy decides whether the group is re-formed (a dead teacher first replaced)."""
    try:
        stop = students.collect()
    except HostGroupError as err:
        outcome = policy.classify(err, dead_teachers=work.unhealthy if work is not None else None)
        _carry_out(policy.decide(outcome))
        if isinstance(outcome, TeacherLost):
            for rank in outcome.ranks:
                work.replace(rank)
            students.set_teachers(work.handles())
        restart = students.reform(outcome.REASON, outcome.detail, graceful=False)
    else:
        if stop is None:
            return
        if isinstance(stop, HostPreempted):
            _carry_out(policy.decide(stop))
        restart = students.reform(stop.REASON, stop.detail, graceful=True)
    view.student_restarted(restart)


def _teacher_returned(ref, work: TeacherWork, policy: FailurePolicy, view: ProgressView,
                      source: str) -> None:
    """A teacher job returned: the view notes it; a lost host is replaced if the policy says so."""
    try:
        event = work.collect(ref)
    except HostGroupError as err:
        outcome = policy.classify(err)
        _carry_out(policy.decide(outcome))
        work.lose(outcome.ranks)
        if work.stalled:
            _carry_out(policy.decide(NoHostsLeft("teacher", work.group.num_hosts, err)))
        view.teacher_state = f"host {', '.join(map(str, outcome.ranks))} lost, its shard queued again"
        return
    if isinstance(event, ShardWritten):
        view.shard_written(event.result.split, event.result.tokens)
    elif not SOURCES[source].fills_cache:
        view.teacher_state = "serving targets"

"""What host actors run: plain functions ``fn(host, ...)``, each a few lines around pipeline/.

``actors.hosts.HostActor.run`` calls them in the host's process; per-host objects live in
``host.state`` (the teacher is loaded once per host). They hold no retry logic and no view:
a failure travels back to the driver as the exception it is (``actors.policy`` decides).
Like Ray Train v2's worker functions, jax is imported inside them, after the host set its
platform.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from actors.remote import (SERVICE, RemoteTargets, TargetService, remote_readers,
                           teacher_hosts)
from pipeline.config import RunConfig


def start_position(checkpoint_dir: str) -> tuple[int, int]:
    """``(step, global sample offset)`` the student resumes from: the latest checkpoint's in
    ``checkpoint_dir``, or (0, 0)."""
    from pipeline.checkpoint import read_checkpoint_metas

    metas = read_checkpoint_metas(checkpoint_dir)
    if not metas:
        return 0, 0
    position = metas[max(metas)]["position"]
    return int(position["step"]), int(position["global_sample_offset"])


def load_teacher(host, config: RunConfig) -> float:
    """Load the teacher into this host's state (once), laid out over every device of the
    host's JAX program (``pipeline.teacher.teacher_mesh``: the host's own devices, or all of a
    teacher replica's, each host reading only its slices); returns the seconds it took."""
    from pipeline.models.build import build_model
    from pipeline.step import TrainState
    from pipeline.teacher import teacher_mesh

    start = time.perf_counter()
    if "teacher" not in host.state:
        model = build_model(config.model.teacher, frozen=True, mesh=teacher_mesh(config.mesh))
        host.state["teacher"] = (model, TrainState.create(model))
        host.state[SERVICE] = TargetService.of(config, model.config.vocab_size)
    return time.perf_counter() - start


def fill_shard(host, config: RunConfig, split: str, shard: int, teacher_fp: str):
    """Write one shard of ``split`` into the cache (``pipeline.teacher.fill_cache``); every
    host of a teacher replica calls it with the same shard, the replica's first writes."""
    from pipeline.teacher import fill_cache

    load_teacher(host, config)
    return fill_cache(config, host.state["teacher"][0], split, teacher_fp=teacher_fp,
                      shards=[shard])


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
    # on-policy rollouts go to the teacher hosts too (a live teacher scores them in the step)
    scorer = (teacher_hosts(plan.teachers, config, host.rank, host.num_hosts)
              if plan.teachers and config.train.on_policy is not None else None)
    targets = run_targets(config, plan.source, teacher_fp=plan.teacher_fp,
                          offset=start_position(config.checkpoint_dir)[1], host_index=host.rank,
                          host_count=host.num_hosts, remote=remote, on_wait=on_wait)

    def on_step(step: int, metrics: dict) -> None:
        host.report(step=step, **{k: metrics[k] for k in ("loss", "tokens_per_s") if k in metrics})

    result, stopped_step = None, None
    try:
        result = train(config, host=Host(host.rank, host.num_hosts), stop=host.stop_event,
                       pause=host.pause_event, on_step=on_step, targets=targets, scorer=scorer)
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

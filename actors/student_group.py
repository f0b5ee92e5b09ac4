"""The student group: formed, re-formed after a loss, grown when nodes join.

The student group is one JAX program over its hosts, which cannot take in a new process: when
the driver decides to go on after a loss (``actors.policy``), ``StudentWork.reform`` tears the
group down and forms a new one with as many hosts as the cluster now holds, up to the size it
had (the counts of ``cluster.student.min_hosts`` .. ``max_hosts`` that divide the global batch).
The new group restores the latest checkpoint onto its own mesh and goes on from its global
sample offset with the same global batch: the steps after that checkpoint are redone, none is
skipped or seen twice. When joined nodes let a bigger group fit, the students stop after their
next checkpoint and the group is re-formed bigger (``observe``, then ``reform`` on ``Grown``).

This module knows nothing of the teacher group: remote and hybrid students get the teacher
hosts' handles in their ``StudentPlan``, which the driver renews (``set_teachers``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import ray
from ray.util.placement_group import placement_group_table

from actors.group_errors import InsufficientResourcesError
from actors.groups import PLACEMENT_TIMEOUT_S, GroupSpec, HostGroup, cluster_census
from actors.policy import HostPreempted
from actors.work import StudentPlan, StudentReport, start_position
from pipeline.config import RunConfig

# A re-formed student group gets this long to be placed at one size before a smaller one is
# tried (Ray notices a lost node, the old reservation is released).
REFORM_PLACEMENT_S = 120.0
# How often the driver looks for joined nodes that a bigger student group could use.
GROW_CHECK_S = 5.0


# --------------------------------------------------------------------------------------------
# The node census
# --------------------------------------------------------------------------------------------

def alive_nodes() -> list[dict]:
    """The alive nodes of the cluster (``ray.nodes()`` entries)."""
    return [node for node in ray.nodes() if node.get("Alive")]


def _fits(have: Mapping[str, float], bundle: Mapping[str, float]) -> bool:
    return all(have.get(k, 0) >= v - 1e-9 for k, v in bundle.items())


def _hosts_by_total(spec: GroupSpec) -> int:
    """How many hosts of ``spec`` the alive nodes could hold by their total resources (one per
    node under STRICT_SPREAD): an upper bound, other groups may hold some of them."""
    bundle = spec.bundles()[0]
    if spec.strategy != "STRICT_SPREAD":
        return sum(int(min(node["Resources"].get(k, 0) / v for k, v in bundle.items()) + 1e-9)
                   for node in alive_nodes())
    return sum(_fits(node["Resources"], bundle) for node in alive_nodes())


def _free_nodes(spec: GroupSpec, held: set[str]) -> int:
    """Alive nodes other than ``held`` (node ids) with room for one more host of ``spec``."""
    # Ray 2.60 has no public per-node view of the resources still *available*: ray.nodes()
    # and ray.util.state.list_nodes() give each node's totals (and list_nodes needs the
    # dashboard, which an embedded or test cluster may not run), ray.available_resources()
    # sums over the cluster. This private call is the one Ray's own ray.util.tpu uses for it.
    from ray._private.state import available_resources_per_node

    available = available_resources_per_node()
    bundle = spec.bundles()[0]
    return sum(1 for node in alive_nodes() if node["NodeID"] not in held
               and _fits(available.get(node["NodeID"], {}), bundle))


# --------------------------------------------------------------------------------------------
# The group
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Grown:
    """The students stopped at a checkpoint so that the group can grow to ``hosts`` (no loss)."""

    REASON: ClassVar[str] = "grow"
    hosts: int
    detail: str


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
    (``collect``) and each status poll (``observe``), and re-forms it (``reform``).

    Attributes:
      group: the current ``HostGroup``.
      refs: rank -> reference of its ``student_fn`` call.
      reports: the hosts' ``StudentReport`` once the run is done (None until then).
      restarts: every re-formation, in order.
    """

    def __init__(self, config: RunConfig, plan: StudentPlan, spec_for: Callable[[int], GroupSpec],
                 student_fn: Callable[..., Any]):
        self.config, self.plan, self.student_fn = config, plan, student_fn
        self._spec_for = spec_for
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

    def set_teachers(self, handles: tuple) -> None:
        """Remote, hybrid: the teacher host actors the next group sends its requests to."""
        self.plan = dataclasses.replace(self.plan, teachers=handles)

    def start(self, hosts: int, *, placement_timeout_s: float = PLACEMENT_TIMEOUT_S) -> None:
        """Form a group of ``hosts`` (one JAX program) and start the students on it."""
        group = HostGroup.create(self._spec_for(hosts), placement_timeout_s=placement_timeout_s)
        try:
            group.setup_jax(distributed=True)
        except BaseException:
            group.shutdown()
            raise
        self.group, self._grow_to = group, None
        self._nodes = len(alive_nodes())
        self._next_grow_check = time.monotonic() + GROW_CHECK_S
        self.refs = group.submit(self.student_fn, self.config, self.plan)

    def collect(self) -> HostPreempted | Grown | None:
        """Collect the students' outcome (one of ``refs`` is ready). None: the run is done
        (``reports`` set). Else why all hosts stopped at a checkpoint: a preemption notice to
        some (``HostPreempted``), or to let the group grow (``Grown``).

        Raises:
          HostGroupError: some hosts failed; the driver asks ``actors.policy.FailurePolicy``.
        """
        reports = list(self.group.gather(self.refs).values())
        stopped = [r for r in reports if r.stopped_step is not None]
        if not stopped or self.stopping:
            self.reports = reports
            return None
        if any(r.preempted for r in stopped):
            ranks = tuple(r.rank for r in stopped if r.preempted)
            return HostPreempted("student", ranks, None, (
                f"student group: preemption notice (SIGTERM) to rank(s) {list(ranks)}; all hosts "
                f"saved the checkpoint of step {stopped[0].stopped_step} and stopped"))
        return Grown(self._grow_to, f"student group: stopped at the checkpoint of step "
                     f"{stopped[0].stopped_step} to grow to {self._grow_to} hosts")

    def reform(self, reason: str, detail: str, *, graceful: bool) -> StudentRestart:
        """Tear the group down and form a new one, as big as the alive nodes allow up to its
        size (``Grown``: up to the size it grows to), from the latest checkpoint.

        Args:
          reason: why (``StudentRestart.reason``).
          detail: what happened, as the group reported it.
          graceful: the hosts stopped by themselves (at a checkpoint) and leave cleanly.

        Raises:
          InsufficientResourcesError: fewer than ``cluster.student.min_hosts`` could be placed.
        """
        seen = time.monotonic()
        before = self.group.num_hosts
        self.group.shutdown(graceful=graceful)
        resumed_step, _ = start_position(self.config.checkpoint_dir)
        counts = self.config.student_host_counts()
        most = self._grow_to if reason == Grown.REASON else before
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
        return self.restarts[-1]

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
        nodes = len(alive_nodes())
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

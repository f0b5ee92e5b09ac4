"""The one failure policy of ``kdpipe run``: what went wrong, and whether to retry or raise.

A host group's failure arrives as a ``HostGroupError`` (ranks grouped). ``FailurePolicy.classify``
turns it into one typed outcome, ``FailurePolicy.decide`` turns an outcome into ``Retry`` or
``Raise``, and the driver carries the decision out (replace a teacher host, re-form the student
group, or raise). Adding a retry rule means editing this module only.

Outcomes:

- ``HostLost``: hosts whose process or node died (killed, out of memory, node lost).
- ``HostPreempted``: hosts whose node was preempted, or a student host that got a preemption
  notice (SIGTERM) and stopped at a checkpoint with the others.
- ``TeacherLost``: (remote, hybrid) the students failed on a teacher host that died under
  their requests; ``ranks`` are the teacher hosts found dead.
- ``WorkFailed``: the work itself raised on live hosts (a user or code error): a retry would
  fail the same way.
- ``NoHostsLeft``: every host of a group was lost and none could be started again.

Decisions, in order (the first that applies):

==========================================================  ==========================================
outcome                                                     decision
==========================================================  ==========================================
a student call's outcome once the driver asked to stop      raise its error
``WorkFailed``                                              raise its error
``NoHostsLeft``                                             raise ``HostLossesError``
``TeacherLost`` with no teacher host found dead             raise the students' error
``HostLost``/``HostPreempted`` of a teacher host that       raise its error (such hosts are replaced
serves requests (remote, hybrid)                            when the students fail on them)
``HostLost``, ``TeacherLost``                               count against ``cluster.max_failures``
``HostPreempted``                                           count against ``cluster.max_preemptions``
==========================================================  ==========================================

A counted outcome is retried while its budget's count stays within the limit, else it raises
``HostLossesError`` naming the budget field. **One budget for the whole run**: teacher and
student losses count against the same ``cluster.max_failures`` and the same
``cluster.max_preemptions``. A teacher host lost counts one per host (the other hosts of its
replica, replaced with it, count nothing); a student group re-formed counts one per
re-formation, however many of its hosts were lost. Growing the student group when nodes join
is no failure and counts nothing.

How the driver carries a ``Retry`` out: the ``ranks`` of a teacher outcome get new hosts
(offline: their shards first back on the queue); a student outcome re-forms the student group
(``TeacherLost``: the dead teacher hosts replaced first), recorded with the outcome's ``REASON``
and ``detail``. Every outcome but ``NoHostsLeft`` carries those, so a new rule, such as
retrying some ``WorkFailed``, is a change to ``decide`` alone.

The shape follows Ray Train v2's ``FailurePolicy.make_decision`` (ray-project/ray:
python/ray/train/v2/_internal/execution/failure_handling/default.py): one place decides, and
its message gives the count and the limit.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from typing import ClassVar

import ray

from actors.group_errors import HostGroupError
from pipeline.config import ClusterConfig
from pipeline.targets import SOURCES


class HostLossesError(RuntimeError):
    """More hosts were lost than ``cluster.max_failures`` / ``max_preemptions`` allow (one budget
    for the run), or a group lost every host."""


@dataclasses.dataclass(frozen=True)
class HostLost:
    """Hosts of ``group`` whose process or node died (killed, out of memory, node lost)."""

    BUDGET: ClassVar[str] = "failures"
    REASON: ClassVar[str] = "failure"
    group: str  # "teacher" or "student"
    ranks: tuple[int, ...]
    error: BaseException | None
    detail: str  # what happened, one line per kind of failure with the ranks


@dataclasses.dataclass(frozen=True)
class HostPreempted:
    """Hosts of ``group`` whose node was preempted, or that got a preemption notice (SIGTERM)."""

    BUDGET: ClassVar[str] = "preemptions"
    REASON: ClassVar[str] = "preemption"
    group: str
    ranks: tuple[int, ...]
    error: BaseException | None  # None: a notice, the hosts saved a checkpoint and stopped
    detail: str


@dataclasses.dataclass(frozen=True)
class TeacherLost:
    """The students failed on teacher hosts that died under their requests (remote, hybrid).

    ``ranks``: the teacher hosts found dead (none: the students failed for another reason)."""

    BUDGET: ClassVar[str] = "failures"
    REASON: ClassVar[str] = "teacher lost"
    group: ClassVar[str] = "teacher"  # the hosts lost are the teacher group's
    ranks: tuple[int, ...]
    error: HostGroupError

    @property
    def detail(self) -> str:
        return (f"a teacher host died under the students' requests (teacher rank(s) "
                f"{list(self.ranks)}):\n{self.error}")


@dataclasses.dataclass(frozen=True)
class WorkFailed:
    """The work raised on live hosts of ``group`` (a user or code error): ``ranks``, those that
    failed. Raised today; a rule that retried it would be carried out as for ``HostLost``."""

    BUDGET: ClassVar[str] = "failures"
    REASON: ClassVar[str] = "work failed"
    group: str
    ranks: tuple[int, ...]
    error: BaseException

    @property
    def detail(self) -> str:
        return str(self.error)


@dataclasses.dataclass(frozen=True)
class NoHostsLeft:
    """Every host of ``group`` was lost and none could be started again."""

    group: str
    num_hosts: int
    error: BaseException


Outcome = HostLost | HostPreempted | TeacherLost | WorkFailed | NoHostsLeft


@dataclasses.dataclass(frozen=True)
class Retry:
    """Carry on: replace the lost hosts, or re-form the group."""


@dataclasses.dataclass(frozen=True)
class Raise:
    """End the run with ``error``."""

    error: BaseException


Decision = Retry | Raise


class FailurePolicy:
    """Classifies host failures and decides retry or raise, against one budget for the run.

    Args:
      cluster: ``cluster.max_failures`` and ``cluster.max_preemptions`` are the budgets.
      source: the run's teacher source (``RunConfig.teacher_source``).

    Attributes:
      stopping: set by the driver when it was asked to stop: the students are not re-formed.
    """

    def __init__(self, cluster: ClusterConfig, source: str):
        self._limits = {"failures": cluster.max_failures, "preemptions": cluster.max_preemptions}
        # the teacher hosts answer the students' requests (rather than fill a cache)
        self._serving = SOURCES[source].asks_teacher_hosts
        self._counts: collections.Counter = collections.Counter()  # (group, budget) -> retries
        self.stopping = False

    def count(self, group: str) -> int:
        """Retries counted for ``group`` so far (teacher: hosts replaced; student: re-formations)."""
        return sum(n for (g, _), n in self._counts.items() if g == group)

    def classify(self, err: HostGroupError, *,
                 dead_teachers: Callable[[], Sequence[int]] | None = None) -> Outcome:
        """The outcome of a failed call of ``err.group``.

        Args:
          err: the group's failure, ranks grouped.
          dead_teachers: the teacher hosts that do not answer a health check, asked only when
            students of a remote or hybrid run failed on an actor that died.
        """
        lost = tuple(err.lost_ranks)
        if lost:
            if any(err.failures[r].preempted for r in lost):
                return HostPreempted(err.group, lost, err, str(err))
            return HostLost(err.group, lost, err, str(err))
        if (err.group == "student" and self._serving and dead_teachers is not None
                and any(isinstance(getattr(e, "cause", None), ray.exceptions.RayActorError)
                        for e in err.failures.values())):
            return TeacherLost(tuple(dead_teachers()), err)
        return WorkFailed(err.group, tuple(err.failures), err)

    def decide(self, outcome: Outcome) -> Decision:
        """``Retry`` or ``Raise`` (see the module docstring's table); counts a retried loss."""
        if self.stopping and (outcome.group == "student" or isinstance(outcome, TeacherLost)):
            return Raise(outcome.error)
        if isinstance(outcome, WorkFailed):
            return Raise(outcome.error)
        if isinstance(outcome, NoHostsLeft):
            return self._raise(outcome.error, f"{outcome.group} group: all {outcome.num_hosts} "
                               f"host(s) lost and none could be started again; the last loss:\n"
                               f"{outcome.error}")
        if isinstance(outcome, TeacherLost) and not outcome.ranks:
            return Raise(outcome.error)
        if (isinstance(outcome, (HostLost, HostPreempted)) and outcome.group == "teacher"
                and self._serving):
            return Raise(outcome.error)
        budget = outcome.BUDGET
        self._counts[outcome.group, budget] += 1 if outcome.group == "student" else len(outcome.ranks)
        total = self._counts["teacher", budget] + self._counts["student", budget]
        if total <= self._limits[budget]:
            return Retry()
        return self._raise(outcome.error, self._over_budget(outcome, total))

    def _over_budget(self, outcome: HostLost | HostPreempted | TeacherLost, total: int) -> str:
        budget, group = outcome.BUDGET, outcome.group
        own = self._counts[group, budget]
        other = "student" if group == "teacher" else "teacher"
        others = self._counts[other, budget]

        def counted(g: str, n: int) -> str:
            return (f"{n} host(s) lost to {budget}" if g == "teacher"
                    else f"{n} restart(s) after {budget}")

        also = (f" and {other} group: {counted(other, others)} ({total} in all: one budget for "
                f"the whole run)" if others else "")
        last = "the last loss" if group == "teacher" else "the last"
        return (f"{group} group: {counted(group, own)}{also}, more than cluster.max_{budget}="
                f"{self._limits[budget]} allows; {last}:\n{outcome.detail}")

    @staticmethod
    def _raise(cause: BaseException | None, message: str) -> Raise:
        error = HostLossesError(message)
        error.__cause__ = cause
        return Raise(error)

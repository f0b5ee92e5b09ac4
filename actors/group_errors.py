"""How a host group's failures are told: the error types of ``actors.groups``, and one message
per kind of failure with the ranks that failed that way (the remote traceback once per kind).

Identical errors from many ranks print once, with their ranks, as Ray Train v2 reports a
worker group's failures (ray-project/ray:
python/ray/train/v2/_internal/execution/worker_group/poll.py).
"""

from __future__ import annotations

import collections
import re

import ray

from pipeline.errors import KdpipeError


class InsufficientResourcesError(KdpipeError):
    """The cluster could not place the requested hosts within the timeout."""


class HostTimeoutError(TimeoutError):
    """Some hosts did not finish a call within its timeout."""


class HostGroupError(RuntimeError):
    """A call failed on some hosts of a group.

    Attributes:
      group, call: which group, which call ("run", "setup", "start", ...).
      failures: rank -> the exception (RayTaskError wrapping the host's exception, or
        RayActorError when the host's process or node died).
      unfinished: ranks that were still busy when the group stopped waiting.
    """

    def __init__(self, group: str, call: str, failures: dict[int, BaseException],
                 unfinished: list[int], num_hosts: int):
        self.group = group
        self.call = call
        self.failures = dict(sorted(failures.items()))
        self.unfinished = sorted(unfinished)
        super().__init__(_describe_failures(group, call, self.failures, self.unfinished, num_hosts))

    @property
    def lost_ranks(self) -> list[int]:
        """Ranks whose actor is gone (process killed, node lost or preempted), as opposed to
        ranks where the work function or the actor's start raised: ``actors.policy`` may retry
        the former and raises the latter."""
        return [r for r, e in self.failures.items() if _is_lost(e)]

    @property
    def user_error(self) -> KdpipeError | None:
        """The lowest rank's error when every failed rank raised a ``KdpipeError`` (a problem
        with what the user gave, such as a teacher whose logits are NaN), else None. Such a
        failure is no lost host and a retry would fail the same way: the CLI reports it as
        it does on one host (exit 2)."""
        causes = [getattr(e, "cause", None) if isinstance(e, ray.exceptions.RayTaskError) else None
                  for e in self.failures.values()]
        if causes and all(isinstance(c, KdpipeError) for c in causes):
            return causes[0]
        return None


def _is_lost(err: BaseException) -> bool:
    # A work function that raised RayActorError itself (another actor it called died) comes
    # back as a RayTaskError that is also an instance of its cause's class: not this host.
    return (isinstance(err, ray.exceptions.RayActorError) and not err.actor_init_failed
            and not isinstance(err, ray.exceptions.RayTaskError))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the task name in its tracebacks


def _remote_traceback(err: BaseException) -> list[str]:
    """The remote traceback lines of a RayTaskError or of an actor whose __init__ raised."""
    lines = _ANSI.sub("", str(err)).splitlines()
    # lines[0] ends with "ray::HostActor.run() (pid=.., ip=..)"; caret-only lines are left over
    # from the Ray-internal frames that Ray drops.
    return [line for line in lines[1:] if line.strip(" ^")]


def _error_summary(err: BaseException) -> str:
    """One line per kind of failure, the same for every rank that failed the same way."""
    if isinstance(err, ray.exceptions.RayTaskError):
        cause = err.cause if err.cause is not None else err
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    if isinstance(err, ray.exceptions.RayActorError):
        if err.actor_init_failed:
            return f"the host failed to start: {_remote_traceback(err)[-1].strip()}"
        reason = "its node was preempted" if err.preempted else \
            "killed, out of memory, or its node was lost"
        return f"{type(err).__name__}: the host's actor process died ({reason})"
    return f"{type(err).__name__}: {err}".splitlines()[0]


def _describe_failures(group: str, call: str, failures: dict[int, BaseException],
                       unfinished: list[int], num_hosts: int) -> str:
    by_kind: dict[str, list[int]] = collections.defaultdict(list)
    for rank, err in failures.items():
        by_kind[_error_summary(err)].append(rank)
    lines = [f"{group} group: {call} failed on {len(failures)} of {num_hosts} hosts"
             + (f"; ranks {unfinished} had not finished" if unfinished else "")]
    for summary, ranks in by_kind.items():
        label = "rank" if len(ranks) == 1 else "ranks"
        lines.append(f"  {label} {', '.join(map(str, ranks))}: {summary}")
        first = failures[ranks[0]]
        if not _is_lost(first) and isinstance(
                first, (ray.exceptions.RayTaskError, ray.exceptions.RayActorError)):
            # The remote traceback once per kind of failure, not once per rank.
            lines.extend("    " + line for line in _remote_traceback(first))
    return "\n".join(lines)

"""actors.policy: classify a group's failure, decide retry or raise against one budget for the run.

No Ray cluster: the errors are Ray's exception classes built by hand, as a host group reports
them (``HostGroupError``, rank -> the exception).
"""

import pytest
import ray.exceptions

from actors.groups import HostGroupError
from actors.policy import (FailurePolicy, HostLossesError, HostLost, HostPreempted, NoHostsLeft,
                           Raise, Retry, TeacherLost, WorkFailed)
from pipeline.config import ClusterConfig


def died(*, preempted: bool = False) -> ray.exceptions.RayActorError:
    """A host whose actor process (or node) is gone."""
    return ray.exceptions.RayActorError(preempted=preempted)


def raised(cause: BaseException) -> ray.exceptions.RayTaskError:
    """A host whose work function raised ``cause`` (Ray's wrapping, instance of the cause)."""
    return ray.exceptions.RayTaskError("run", "Traceback ...", cause).as_instanceof_cause()


def group_error(group: str, failures: dict, num_hosts: int = 2) -> HostGroupError:
    return HostGroupError(group, "run", failures, [], num_hosts)


def policy(source: str = "offline", max_failures: int = 3, max_preemptions: int = 10) -> FailurePolicy:
    return FailurePolicy(ClusterConfig(max_failures=max_failures, max_preemptions=max_preemptions),
                         source)


def test_classify_a_dead_host_a_preempted_node_and_a_work_error():
    p = policy()
    lost = p.classify(group_error("student", {1: died(), 0: raised(RuntimeError("peer gone"))}))
    assert isinstance(lost, HostLost) and lost.group == "student" and lost.ranks == (1,)
    preempted = p.classify(group_error("teacher", {0: died(preempted=True)}, 1))
    assert isinstance(preempted, HostPreempted) and preempted.ranks == (0,)
    failed = p.classify(group_error("student", {0: raised(ValueError("bad")),
                                                1: raised(ValueError("bad"))}))
    assert isinstance(failed, WorkFailed) and failed.group == "student"
    # an actor that failed in __init__ is no lost host: starting it again fails the same way
    init = ray.exceptions.RayActorError(error_msg="start\nTraceback\nImportError: no jax",
                                        actor_init_failed=True)
    assert isinstance(p.classify(group_error("teacher", {0: init}, 1)), WorkFailed)


def test_a_work_error_raises_itself_and_counts_nothing():
    p = policy(max_failures=0)
    err = group_error("student", {0: raised(ValueError("bad"))})
    assert p.decide(p.classify(err)) == Raise(err)
    assert p.count("student") == 0


def test_one_budget_for_the_run_teacher_and_student_losses_add_up():
    """One teacher host lost and max_failures student restarts exceed cluster.max_failures
    (with a budget per group, as before, this run would have gone on)."""
    p = policy(max_failures=2)
    teacher = group_error("teacher", {0: died()}, 1)
    assert p.decide(p.classify(teacher)) == Retry()
    student = group_error("student", {1: died()})
    assert p.decide(p.classify(student)) == Retry()
    decision = p.decide(p.classify(student))
    assert isinstance(decision, Raise) and isinstance(decision.error, HostLossesError)
    message = str(decision.error)
    assert message.startswith("student group: 2 restart(s) after failures and teacher group: 1 "
                              "host(s) lost to failures (3 in all: one budget for the whole run), "
                              "more than cluster.max_failures=2 allows; the last:\nstudent group")
    assert decision.error.__cause__ is student
    assert (p.count("teacher"), p.count("student")) == (1, 2)


def test_failures_and_preemptions_are_two_budgets():
    p = policy(max_failures=0, max_preemptions=1)
    preempted = group_error("student", {0: died(preempted=True), 1: died()})
    assert p.decide(p.classify(preempted)) == Retry()  # any preempted rank: a preemption
    decision = p.decide(p.classify(group_error("teacher", {0: died(preempted=True)}, 1)))
    assert isinstance(decision, Raise)
    assert "more than cluster.max_preemptions=1 allows; the last loss:\nteacher group" in str(decision.error)
    decision = p.decide(p.classify(group_error("teacher", {0: died()}, 1)))
    assert str(decision.error).startswith("teacher group: 1 host(s) lost to failures, more than "
                                          "cluster.max_failures=0 allows; the last loss:\n")


def test_a_preemption_notice_counts_as_a_preemption():
    p = policy(max_preemptions=0)
    notice = HostPreempted("student", (1,), None, "preemption notice (SIGTERM) to rank(s) [1]")
    decision = p.decide(notice)
    assert isinstance(decision, Raise)
    assert str(decision.error) == ("student group: 1 restart(s) after preemptions, more than "
                                   "cluster.max_preemptions=0 allows; the last:\n"
                                   "preemption notice (SIGTERM) to rank(s) [1]")


@pytest.mark.parametrize("source", ["remote", "hybrid"])
def test_students_failing_on_a_dead_teacher(source):
    p = policy(source, max_failures=1)
    # the student's work raised RayActorError: the teacher actor it asked died
    err = group_error("student", {0: raised(ray.exceptions.ActorDiedError()),
                                  1: raised(ray.exceptions.ActorDiedError())})
    outcome = p.classify(err, dead_teachers=lambda: [1])
    assert outcome == TeacherLost((1,), err) and outcome.group == "teacher"
    assert p.decide(outcome) == Retry()
    assert p.count("teacher") == 1 and p.count("student") == 0
    # no teacher found dead: the students failed for another reason
    assert p.decide(p.classify(err, dead_teachers=lambda: [])) == Raise(err)
    decision = p.decide(p.classify(err, dead_teachers=lambda: [0]))
    assert str(decision.error).startswith("teacher group: 2 host(s) lost to failures, more than "
                                          "cluster.max_failures=1 allows")


def test_a_dead_teacher_counts_only_where_teachers_serve_requests():
    err = group_error("student", {0: raised(ray.exceptions.ActorDiedError())})
    asked = []
    outcome = policy("offline").classify(err, dead_teachers=lambda: asked.append(1) or [0])
    assert isinstance(outcome, WorkFailed) and not asked


def test_a_serving_teacher_host_lost_on_its_own_work_raises():
    p = policy("remote")
    err = group_error("teacher", {0: died()}, 1)
    assert p.decide(p.classify(err)) == Raise(err)
    assert p.count("teacher") == 0


def test_no_hosts_left_and_stopping_raise():
    p = policy()
    err = group_error("teacher", {0: died()}, 1)
    decision = p.decide(NoHostsLeft("teacher", 2, err))
    assert str(decision.error).startswith("teacher group: all 2 host(s) lost and none could be "
                                          "started again; the last loss:\nteacher group")
    p.stopping = True
    student = group_error("student", {1: died()})
    assert p.decide(p.classify(student)) == Raise(student)
    assert p.decide(p.classify(err)) == Retry()  # a teacher host is still replaced

"""The student group as nodes leave and join (ray.cluster_utils.Cluster: one node per host).

Student hosts need the custom resource ``student``, which only the student nodes have, so the
group's size follows the nodes. Each run is the tiny 20-step distillation (checkpoints at 10
and 20, ``logging.example_ids`` on), slowed down so that nodes can come and go mid-run:

- a node lost after the step-10 checkpoint: the group goes on with the one host left
  (``min_hosts: 1``), the loss curve continues the uninterrupted 2-host run's within 1e-4;
- a node joining: the group grows from 1 to 2 hosts at the next checkpoint;
- a node lost when ``min_hosts`` is 2: a clear error naming the sizes it tried.

Every run trains on every example exactly once.
"""

from __future__ import annotations

import functools
import sys
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

import actors.student_group
from actors.cluster import connect
from actors.work import train_student
from actors.groups import InsufficientResourcesError
from pipeline.config import load_config
from pipeline.metrics import read_example_logs
from tiny_run import TINY, assert_same_curves, checked_example_logs, make_tiny_run, quiet_run

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

STEPS = 20
BATCH = 4
STUDENT = "{hosts: %d, min_hosts: %d, max_hosts: %d, resources: {student: 1}}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    work = tmp_path_factory.mktemp("elastic-nodes")
    overrides = make_tiny_run(work) + [
        f"cache.path={work / 'cache'}", f"train.steps={STEPS}", f"train.global_batch_size={BATCH}",
        "checkpoint.every_steps=10", "eval.every_steps=10", "logging.example_ids=true"]
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    connect(c.address)
    yield c, work, overrides, []
    ray.shutdown()
    c.shutdown()


def with_student_nodes(cluster, count: int):
    """Add or remove student nodes until exactly ``count`` are up."""
    c, _, _, nodes = cluster
    while len(nodes) > count:
        c.remove_node(nodes.pop())
    while len(nodes) < count:
        nodes.append(c.add_node(num_cpus=0, resources={"student": 1}))
    c.wait_for_nodes()


def config_of(cluster, name: str, student: str):
    _, work, overrides, _ = cluster
    return load_config(TINY, [*overrides, f"run_dir={work / name}", f"cluster.student={student}"])


def slow_student(host, config, plan, *, seconds: float):
    """``train_student`` taking ``seconds`` more per step, so that nodes can come and go."""
    report = host.report

    def report_slowly(**values):
        report(**values)
        if "step" in values:
            time.sleep(seconds)

    host.report = report_slowly
    return train_student(host, config, plan)


def run_while(config, *, at_step: int, action, seconds_per_step: float):
    """``kdpipe run`` of ``config`` (students slowed down) on a thread, while this thread (the
    only one that may start Ray nodes) calls ``action()`` once some host has logged ``at_step``
    in its example log. Returns the run's outcome or raises its error."""
    done: dict = {}

    def target():
        try:
            done["outcome"] = quiet_run(config, student=functools.partial(
                slow_student, seconds=seconds_per_step))
        except BaseException as error:  # handed to the test's thread
            done["error"] = error

    runner = threading.Thread(target=target, daemon=True)
    runner.start()
    deadline = time.monotonic() + 300
    while runner.is_alive() and time.monotonic() < deadline:
        if any(r["step"] >= at_step for r in read_example_logs(config.run_dir)):
            action()
            break
        time.sleep(0.1)
    runner.join(600)
    if "error" in done:
        raise done["error"]
    return done["outcome"]


def assert_each_example_once(config, hosts_per_step):
    """Every example once (``checked_example_logs``), each step logged by the hosts given."""
    records = checked_example_logs(config, STEPS * BATCH)
    per_step = {s: sorted(r["file"] for r in records if r["step"] == s) for s in range(1, STEPS + 1)}
    assert per_step == hosts_per_step


def files(count: int) -> list[str]:
    return [f"host-{i}-of-{count}.jsonl" for i in range(count)]


@pytest.fixture(scope="module")
def uninterrupted(cluster):
    """The 2-host reference run; it also fills the cache the others reuse."""
    with_student_nodes(cluster, 2)
    config = config_of(cluster, "uninterrupted", STUDENT % (2, 2, 2))
    outcome = quiet_run(config)
    assert outcome.student_restarts == () and outcome.student_hosts == 2
    return config


def assert_loss_continues(config, reference):
    assert_same_curves(config.run_dir, reference.run_dir, rel=1e-4,
                       names=("loss", "kl_loss", "ce_loss"))


def test_lost_node_shrinks_the_group_and_training_continues(cluster, uninterrupted):
    with_student_nodes(cluster, 2)
    config = config_of(cluster, "shrink", STUDENT % (2, 1, 2))
    c, _, _, nodes = cluster
    outcome = run_while(config, at_step=12, action=lambda: c.remove_node(nodes.pop()),
                        seconds_per_step=0.3)
    (restart,) = outcome.student_restarts
    assert restart.reason in ("failure", "preemption")
    assert (restart.hosts_before, restart.hosts_after, restart.resumed_step) == (2, 1, 10)
    assert outcome.student_hosts == 1 and outcome.result.step == STEPS
    print(f"\nrecovered from a lost node (2 -> 1 hosts) in {restart.recover_s:.1f} s")
    assert_loss_continues(config, uninterrupted)
    assert_each_example_once(config, {s: files(2) if s <= 10 else files(1)
                                      for s in range(1, STEPS + 1)})


def test_group_grows_at_the_next_checkpoint_when_a_node_joins(cluster, uninterrupted, monkeypatch):
    monkeypatch.setattr(actors.student_group, "GROW_CHECK_S", 0.5)
    with_student_nodes(cluster, 1)
    config = config_of(cluster, "grow", STUDENT % (1, 1, 2))
    outcome = run_while(config, at_step=2, action=lambda: with_student_nodes(cluster, 2),
                        seconds_per_step=0.5)
    (restart,) = outcome.student_restarts
    assert (restart.reason, restart.hosts_before, restart.hosts_after, restart.resumed_step) == (
        "grow", 1, 2, 10)
    assert outcome.student_hosts == 2 and outcome.result.step == STEPS
    assert_loss_continues(config, uninterrupted)
    assert_each_example_once(config, {s: files(1) if s <= 10 else files(2)
                                      for s in range(1, STEPS + 1)})


def test_fewer_hosts_left_than_min_hosts_is_a_clear_error(cluster, uninterrupted):
    with_student_nodes(cluster, 2)
    config = config_of(cluster, "too-few", STUDENT % (2, 2, 2))
    c, _, _, nodes = cluster
    with pytest.raises(InsufficientResourcesError,
                       match=r"student group: after a (failure|preemption) .*, the group could not "
                             r"be formed again: the alive nodes can hold 1 student host\(s\), "
                             r"fewer than any size allowed \(cluster.student.min_hosts=2"):
        run_while(config, at_step=3, action=lambda: c.remove_node(nodes.pop()),
                  seconds_per_step=0.3)

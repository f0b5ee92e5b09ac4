"""Student hosts lost and the driver killed, on an embedded Ray: nothing lost, nothing twice.

One tiny dataset, teacher and (top-k) cache per module; every run is the same 20-step, 2-host
distillation (checkpoints at 10 and 20) with ``logging.example_ids`` on, in its own run
directory, compared with the uninterrupted run:

- a student host SIGKILLed after step 12, then, in the same run, a preemption notice (SIGTERM)
  to a student host of the re-formed group after step 15: the group is re-formed (2 hosts) and
  restores the step-10 checkpoint; then all hosts save a checkpoint at the same step and stop,
  and the group is re-formed again from it; the run ends with parameters equal to the
  uninterrupted run's, every example trained on exactly once;
- restarts past ``cluster.max_failures``: a clear error;
- the driver process itself SIGKILLed while the teacher still writes the eval cache: the same
  command again writes only the missing shards and resumes training from the checkpoint;
- `kdpipe run` sent SIGTERM: the students save a checkpoint where they stop, the CLI exits 143,
  and the same command again finishes the run as if uninterrupted;
- a remote (and a hybrid) teacher host SIGKILLed under the students' requests: replaced, the
  students restarted from their checkpoint, the training the same.

Losing nodes (2 -> 1 hosts), nodes joining, and too few nodes left are in
test_elastic_nodes.py (a multi-node Ray).
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from actors.cluster import connect
from actors.policy import HostLossesError
from actors.work import train_student
from pipeline.checkpoint import read_checkpoint_metas
from pipeline.config import load_config
from pipeline.metrics import read_example_logs
from tiny_run import (TINY, assert_same_curves, checked_example_logs, config_of,
                      make_tiny_run, quiet_run)

# The student functions below travel to the host actors by value: this module is not
# importable in Ray's worker processes.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

STEPS = 20
BATCH = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    work = tmp_path_factory.mktemp("elastic")
    overrides = make_tiny_run(work) + [
        f"cache.path={work / 'cache'}", f"train.steps={STEPS}", f"train.global_batch_size={BATCH}",
        "checkpoint.every_steps=10", "eval.every_steps=10", "cluster.student.hosts=2",
        "logging.example_ids=true"]
    connect(num_cpus=2, dashboard=False)
    yield work, overrides
    ray.shutdown()


@pytest.fixture(scope="module")
def uninterrupted(tiny):
    """The reference run; it also fills the cache the other runs reuse."""
    config = config_of(tiny, "uninterrupted")
    return config, quiet_run(config)


def signalled_student(host, config, plan, *, signals: tuple[tuple[int, int], ...], rank: int,
                      markers: str):
    """``train_student``, but host ``rank`` sends its own process each ``(signum, at_step)`` of
    ``signals`` in turn, right after step ``at_step``, each once in the run (a marker file per
    signal under ``markers``: the re-formed group's host carries on). After a SIGTERM it waits
    until the host's handler has seen it, so the stop is voted at that step."""
    if host.rank == rank:
        report = host.report

        def report_then_signal(**values):
            report(**values)
            sent = [Path(markers, str(i)).exists() for i in range(len(signals))]
            if all(sent):
                return
            signum, at_step = signals[sent.index(False)]
            if values.get("step") == at_step:
                Path(markers, str(sent.index(False))).write_text(str(os.getpid()))
                os.kill(os.getpid(), signum)
                deadline = time.monotonic() + 30
                while not host.stop_requested() and time.monotonic() < deadline:
                    time.sleep(0.01)

        host.report = report_then_signal
    return train_student(host, config, plan)


def student_params(run_dir) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    params = {}
    for path in sorted((Path(run_dir) / "student").glob("*.safetensors")):
        params.update(load_file(path))
    return params


def assert_same_params(got_dir, want_dir):
    got, want = student_params(got_dir), student_params(want_dir)
    assert got.keys() == want.keys() and got
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def assert_each_example_once(config):
    """Every example once (``checked_example_logs``), each step logged by both hosts."""
    records = checked_example_logs(config, STEPS * BATCH)
    steps = sorted(r["step"] for r in records)
    assert steps == sorted(list(range(1, STEPS + 1)) * 2)  # each step on both hosts
    return records


def assert_same_metrics(got_dir, want_dir, rel: float = 1e-6):
    assert_same_curves(got_dir, want_dir, rel=rel, names=("loss", "kl_loss", "ce_loss", "grad_norm"))


def test_uninterrupted_run_logs_each_example_once(uninterrupted):
    config, outcome = uninterrupted
    assert outcome.result.step == STEPS and outcome.student_restarts == ()
    assert_each_example_once(config)


def test_student_host_killed_then_preempted_is_reformed_and_ends_as_if_uninterrupted(
        tiny, uninterrupted, tmp_path):
    """One run, both re-formations (one run rather than two: each costs CI a group's start-up
    and 20 steps). ``cluster.max_failures=1``: the kill spends the whole failure budget, so the
    run goes on after the notice only because a notice counts as a preemption, not a failure."""
    reference, _ = uninterrupted
    config = config_of(tiny, "killed-preempted", "cluster.max_failures=1")
    outcome = quiet_run(config, student=functools.partial(
        signalled_student, signals=((signal.SIGKILL, 12), (signal.SIGTERM, 15)), rank=1,
        markers=str(tmp_path)))
    assert outcome.result.step == STEPS and outcome.teacher_hosts == 0  # the cache was complete
    killed, preempted = outcome.student_restarts
    assert (killed.reason, killed.hosts_before, killed.hosts_after) == ("failure", 2, 2)
    assert killed.resumed_step == 10
    assert "rank 1: ActorDiedError" in killed.detail or "rank 1: RayActorError" in killed.detail
    assert not [line for line in killed.detail.splitlines() if line.startswith("    ")]
    assert killed.recover_s is not None and killed.recover_s > 0
    assert (preempted.reason, preempted.hosts_before, preempted.hosts_after) == ("preemption", 2, 2)
    assert "preemption notice (SIGTERM) to rank(s) [1]" in preempted.detail
    # the notice came after step 15; two hosts read their votes one step later
    assert preempted.resumed_step == 16
    print(f"\nrecovered from a SIGKILLed student host in {killed.recover_s:.1f} s")
    assert_same_params(config.run_dir, reference.run_dir)
    assert_same_metrics(config.run_dir, reference.run_dir)
    records = assert_each_example_once(config)
    # the killed host had logged steps past the checkpoint; they were dropped and redone
    assert max(r["step"] for r in records if r["file"] == "host-1-of-2.jsonl") == STEPS


def teacher_killing_student(host, config, plan, *, at_step: int, marker: str):
    """``train_student``, but student host 0 SIGKILLs teacher host 0's process right after step
    ``at_step``, once per ``marker`` file."""
    if host.rank == 0 and not Path(marker).exists():
        report = host.report

        def report_then_kill(**values):
            report(**values)
            if values.get("step") == at_step:
                Path(marker).write_text("")
                os.kill(ray.get(plan.teachers[0].info.remote()).pid, signal.SIGKILL)

        host.report = report_then_kill
    return train_student(host, config, plan)


@pytest.mark.parametrize("source", ["remote", "hybrid"])
def test_remote_teacher_killed_is_replaced_and_students_restart(tiny, uninterrupted, tmp_path,
                                                                source):
    reference, _ = uninterrupted
    # hybrid on a cache nobody writes: every batch goes to the teacher hosts
    config = config_of(tiny, f"{source}-killed", f"cluster.teacher_source={source}",
                       "cluster.max_failures=1", f"cache.path={tmp_path / 'no-cache'}")
    outcome = quiet_run(config, student=functools.partial(
        teacher_killing_student, at_step=12, marker=str(tmp_path / "k")))
    (restart,) = outcome.student_restarts
    assert (restart.reason, restart.hosts_before, restart.hosts_after) == ("teacher lost", 2, 2)
    assert restart.resumed_step == 10 and outcome.result.step == STEPS
    assert "teacher host died" in restart.detail
    # the remote teacher encodes targets as the cache stores them: the same training
    assert_same_metrics(config.run_dir, reference.run_dir, rel=1e-4)
    assert_each_example_once(config)


def test_student_restarts_past_the_budget_end_the_run(tiny, uninterrupted, tmp_path):
    config = config_of(tiny, "no-budget", "cluster.max_failures=0")
    with pytest.raises(HostLossesError, match=r"student group: 1 restart\(s\) after failures, more "
                       r"than cluster.max_failures=0 allows; the last:\nstudent group: run failed"):
        quiet_run(config, student=functools.partial(
            signalled_student, signals=((signal.SIGKILL, 3),), rank=0, markers=str(tmp_path)))


def test_kdpipe_run_stopped_by_sigterm_checkpoints_then_resumes(tiny, uninterrupted, tmp_path):
    reference, _ = uninterrupted
    work, overrides = tiny
    config = config_of(tiny, "driver-sigterm")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    sets = [arg for override in [*overrides, f"run_dir={config.run_dir}"]
            for arg in ("--set", override)]
    driver = subprocess.Popen([sys.executable, "-m", "actors.cli", "run", str(TINY), *sets],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not any(r["step"] >= 3 for r in read_example_logs(config.run_dir)):
            assert driver.poll() is None and time.monotonic() < deadline, "no step 3"
            time.sleep(0.1)
        driver.send_signal(signal.SIGTERM)
        output, _ = driver.communicate(timeout=300)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert driver.returncode == 143, output[-3000:]
    stopped = max(read_checkpoint_metas(config.checkpoint_dir))  # where the hosts stopped
    assert 3 <= stopped < STEPS
    assert f"stopped by SIGTERM after saving the checkpoint of step {stopped}" in output
    assert max(r["step"] for r in read_example_logs(config.run_dir)) == stopped

    outcome = quiet_run(config)
    assert outcome.result.step == STEPS and outcome.student_restarts == ()
    assert_same_params(config.run_dir, reference.run_dir)
    assert_each_example_once(config)


def uncommitted_shards(config) -> set[tuple[str, int]]:
    from pipeline.cache import read_manifest
    from pipeline.data import read_info
    from pipeline.errors import CacheError

    splits = read_info(config.data.prepared_dir).splits
    pending = set()
    for split in ("train", "eval"):
        try:
            committed = read_manifest(f"{config.cache.path}/{split}").committed
        except CacheError:  # no manifest yet: nothing committed
            committed = set()
        shards = -(-splits[split]["num_rows"] // config.cache.shard_sequences)
        pending |= {(split, n) for n in range(shards) if n not in committed}
    return pending


DRIVER = textwrap.dedent("""
    import sys, time
    from actors.driver import run
    from actors.work import fill_shard
    from pipeline.config import load_config

    def eval_waits(host, config, split, shard, teacher_fp):
        if split == "eval":
            time.sleep(600)  # the driver is killed meanwhile
        return fill_shard(host, config, split, shard, teacher_fp)

    run(load_config(sys.argv[1], sys.argv[2:]), fill=eval_waits)
""")


def test_driver_killed_then_rerun_resumes_the_fill_and_the_training(tiny, uninterrupted, tmp_path):
    reference, _ = uninterrupted
    work, overrides = tiny
    more = [f"run_dir={work / 'driver-killed'}", f"cache.path={work / 'cache-driver-killed'}",
            "eval.every_steps=20"]
    config = load_config(TINY, [*overrides, *more])
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen([sys.executable, str(script), str(TINY), *overrides, *more],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while 10 not in read_checkpoint_metas(config.checkpoint_dir):
            assert driver.poll() is None and time.monotonic() < deadline, "no step-10 checkpoint"
            time.sleep(0.2)
        driver.kill()  # the driver alone: its embedded Ray goes down with it
        driver.wait()
    finally:
        time.sleep(2)
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # whatever it left behind, for the next test
        except ProcessLookupError:
            pass
    pending = uncommitted_shards(config)
    assert pending >= {("eval", 0)}  # the fill was cut short

    outcome = quiet_run(config)
    assert {(split, shard) for split, shard, _ in outcome.shards_written} == pending
    assert outcome.result.step == STEPS
    assert_same_params(config.run_dir, reference.run_dir)
    assert_each_example_once(config)

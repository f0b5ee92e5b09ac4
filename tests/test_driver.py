"""`kdpipe run` (actors.driver) on an embedded Ray at a tiny size.

One Ray and one tiny dataset/teacher per module; seven runs of the same 20-step distillation
(cache in full mode, float32; teacher and student heads padded 24 ids past the tokenizer's
vocabulary, as Qwen-family checkpoints are), each with its own run directory:

- offline, 2 student hosts, a teacher held back until the student has taken its first step:
  the student waits for shards and never reads one before its commit record exists;
- offline again, 1 host, on the now complete cache: no teacher host starts, and the loss
  trajectory equals the 2-host run's (1e-4 relative);
- live, remote and hybrid (on a cache missing some shards), 1 host each: the same training
  (the padded ids are outside the teacher's distribution whatever the source);
- offline with the teacher host SIGKILLed after writing a shard's files, before its commit
  record: a new host takes its place, redoes the shard, and the cache equals the uninterrupted
  one (every stored array, every commit record's crc32); with cluster.max_failures=0 the same
  kill ends the run with an error naming the count and the limit.

Groups kept apart by custom resources are covered in test_groups.py.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from actors.cluster import connect
from actors.driver import absolute_paths
from actors.teacher_group import ShardQueue
from actors.work import fill_shard
from pipeline.config import load_config
from pipeline.data.order import eval_schedule, fill_order, train_schedule
from pipeline.metrics import read_metrics
from tiny_run import TINY, config_of, make_tiny_run, quiet_run

# The gated fill below travels to the teacher actors by value: this module is not importable
# in Ray's worker processes.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

STEPS = 20
SHARD_SEQUENCES = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    work = tmp_path_factory.mktemp("driver")
    overrides = make_tiny_run(work, padded_vocab=24) + [
        "cache.mode=full", "cache.value_dtype=float32", f"cache.shard_sequences={SHARD_SEQUENCES}",
        f"cache.path={work / 'cache'}", f"train.steps={STEPS}", "checkpoint.every_steps=10",
        "eval.every_steps=10"]
    connect(num_cpus=2, dashboard=False)
    yield work, overrides
    ray.shutdown()


def curves(run_dir) -> dict[tuple[str, int], dict]:
    return {(r["split"], r["step"]): r for r in read_metrics(run_dir)}


def assert_same_training(got_dir, want_dir, rel: float):
    got, want = curves(got_dir), curves(want_dir)
    assert got.keys() == want.keys()
    assert [k for k in want if k[0] == "train"] == [("train", s) for s in range(1, STEPS + 1)]
    for key, record in want.items():
        for name in ("loss", "kl_loss", "ce_loss", "grad_norm", "top1_agreement"):
            if name in record:
                assert got[key][name] == pytest.approx(record[name], rel=rel, abs=1e-6), (key, name)


def _first_step_shards(config) -> set[int]:
    from pipeline.data import global_order, read_info

    rows = read_info(config.data.prepared_dir).splits["train"]["num_rows"]
    first = global_order(rows, config.data.seed, np.arange(config.train.global_batch_size))
    return set((first // config.cache.shard_sequences).tolist())


def gated_fill(host, config, split, shard, teacher_fp):
    """The shards of the student's first step at once; every other one only once the student's
    first step is logged, 2 s apart: the student has to catch up with the teacher."""
    if not (split == "train" and shard in _first_step_shards(config)):
        metrics = Path(config.run_dir) / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)
    return fill_shard(host, config, split, shard, teacher_fp)


@pytest.fixture(scope="module")
def offline_two_hosts(tiny):
    config = config_of(tiny, "offline-2", "cluster.student.hosts=2")
    return config, quiet_run(config, fill=gated_fill)


@pytest.fixture(scope="module")
def offline_reused(tiny, offline_two_hosts):
    config = config_of(tiny, "offline-1")
    return config, quiet_run(config)


def test_offline_student_waits_for_and_reads_only_committed_shards(offline_two_hosts):
    config, outcome = offline_two_hosts
    assert outcome.teacher_hosts == 1 and outcome.student_hosts == 2
    assert outcome.result.step == STEPS
    cache = Path(config.cache.path)
    num_shards = {"train": 5, "eval": 2}  # 150 and 34 rows in shards of 32
    assert sorted((s, n) for s, n, _ in outcome.shards_written) == sorted(
        (s, n) for s in num_shards for n in range(num_shards[s]))
    committed = {split: {int(p.stem.split("-")[1]): p.stat().st_mtime
                         for p in (cache / split / "commits").iterdir()} for split in num_shards}
    assert {s: len(c) for s, c in committed.items()} == num_shards
    reads = [(split, shard, when) for report in outcome.students
             for split, first in report.first_read.items() for shard, when in first.items()]
    # every train shard; eval reads its first 2 batches of 4 rows only (shard 0)
    assert {(s, n) for s, n, _ in reads} == {("train", n) for n in range(5)} | {("eval", 0)}
    for split, shard, when in reads:
        assert when >= committed[split][shard], (split, shard)
    # the fill overlapped the training: shards were committed after the student's first read
    first_read = min(when for _, _, when in reads)
    assert max(max(c.values()) for c in committed.values()) > first_read
    assert max(report.waited_s for report in outcome.students) > 0.5


def test_complete_cache_is_reused_without_teachers_and_two_hosts_match_one(
        offline_two_hosts, offline_reused):
    two, _ = offline_two_hosts
    one, outcome = offline_reused
    assert outcome.teacher_hosts == 0 and outcome.shards_written == ()
    assert outcome.students[0].waited_s == 0
    assert_same_training(two.run_dir, one.run_dir, rel=1e-4)
    assert (Path(two.run_dir) / "student" / "model.safetensors").exists()


@pytest.mark.parametrize("source", ["live", "remote", "hybrid"])
def test_teacher_sources_give_the_same_training(tiny, offline_reused, source):
    reference, _ = offline_reused
    more = [f"cluster.teacher_source={source}"]
    if source == "hybrid":
        # a cache with train shards 1 and 3 and eval shard 1 missing: those batches come from
        # the teacher hosts
        partial = Path(tiny[0]) / "partial-cache"
        shutil.copytree(reference.cache.path, partial)
        for split, shard in (("train", 1), ("train", 3), ("eval", 1)):
            (partial / split / "commits" / f"shard-{shard:08d}.json").unlink()
        more.append(f"cache.path={partial}")
    config = config_of(tiny, source, *more)
    outcome = quiet_run(config)
    assert outcome.source == source and outcome.result.step == STEPS
    report = outcome.students[0]
    if source == "live":
        assert outcome.teacher_hosts == 0
    if source == "remote":
        assert report.remote_batches >= STEPS and report.cached_batches == 0
    if source == "hybrid":
        assert report.remote_batches > 0 and report.cached_batches > 0
        assert outcome.shards_written == ()
    assert_same_training(config.run_dir, reference.run_dir, rel=1e-4)


# ---- a teacher host killed mid-shard ---------------------------------------------------------

def killing_fill(host, config, split, shard, teacher_fp):
    """``fill_shard``; but the first train shard of the run kills its host's process with
    SIGKILL once the shard's array files are written and before its commit record: a partial
    shard on disk that the replacement host must write again. A marker file in the run
    directory (``killed``: the shard) makes it happen once, whichever process runs it."""
    marker = Path(config.run_dir) / "killed"
    if split == "train" and not marker.exists():
        import pipeline.cache.writer as writer

        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(shard))

        def die(shard):  # stands in for the commit record's key, the writer's last step
            os.kill(os.getpid(), signal.SIGKILL)

        writer.commit_key = die
    return fill_shard(host, config, split, shard, teacher_fp)


def stored_cache(location: str):
    """Every sequence's stored arrays and the crc32s of the commit records of one split."""
    from pipeline.cache import read_manifest
    from pipeline.cache.format import RunDeclaration
    from pipeline.cache.reader import CacheReader

    m = read_manifest(location)
    reader = CacheReader(location, RunDeclaration(
        tokenizer_fingerprint=m.tokenizer_fingerprint, dataset_fingerprint=m.dataset_fingerprint,
        vocab_size=m.target.vocab_size, seq_len=m.seq_len, temperature=m.target.temperature or 1.0))
    commits = {c.shard: c.files for c in m.commits}
    return reader.read_stored(np.arange(m.num_sequences)), commits


def test_teacher_host_killed_mid_shard_is_replaced_and_the_cache_matches(tiny, offline_reused):
    reference, _ = offline_reused
    config = config_of(tiny, "killed", f"cache.path={tiny[0] / 'cache-killed'}",
                       "cluster.max_failures=1")
    outcome = quiet_run(config, fill=killing_fill)
    killed = int((Path(config.run_dir) / "killed").read_text())
    assert outcome.teacher_hosts_lost == 1 and outcome.result.step == STEPS
    written = [(split, shard) for split, shard, _ in outcome.shards_written]
    # the killed shard was committed once, afterwards, by the replacement host
    assert sorted(written) == sorted({("train", n) for n in range(5)} | {("eval", 0), ("eval", 1)})
    assert written.count(("train", killed)) == 1
    for split in ("train", "eval"):
        got, got_commits = stored_cache(f"{config.cache.path}/{split}")
        want, want_commits = stored_cache(f"{reference.cache.path}/{split}")
        assert got_commits == want_commits, split  # sizes and crc32s of every file
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{split} {name}")
    assert_same_training(config.run_dir, reference.run_dir, rel=1e-4)


def test_teacher_host_losses_past_the_budget_end_the_run(tiny):
    from actors.policy import HostLossesError

    config = config_of(tiny, "killed-no-budget", f"cache.path={tiny[0] / 'cache-no-budget'}",
                       "cluster.max_failures=0")
    with pytest.raises(HostLossesError, match=r"teacher group: 1 host\(s\) lost to failures, more "
                       r"than cluster.max_failures=0 allows; the last loss:\nteacher group: fill"):
        quiet_run(config, fill=killing_fill)


# ---- pure parts of the driver ---------------------------------------------------------------

def fill_args(config) -> dict:
    """``fill_order``'s keyword arguments for the run ``config``."""
    return dict(data=config.data, eval_config=config.eval, global_batch=config.train.global_batch_size,
                steps=config.train.steps, shard_rows=config.cache.shard_sequences)


def test_fill_order_follows_the_students_first_reads(tiny):
    from pipeline.data import global_order

    config = config_of(tiny, "order")
    rows = {"train": 150, "eval": 34}
    order = fill_order(rows, {"train": set(range(5)), "eval": {0, 1}}, **fill_args(config))
    assert sorted(order) == [("eval", 0), ("eval", 1)] + [("train", s) for s in range(5)]
    first = global_order(150, config.data.seed, np.arange(4)) // SHARD_SEQUENCES
    assert order[0] == ("train", int(first[0]))
    train_due = [s for split, s in order if split == "train"]
    reads = list(dict.fromkeys((global_order(150, config.data.seed, np.arange(150)) // 32).tolist()))
    assert train_due == [s for s in reads if s in train_due]
    # the eval shards come before the train shards first read at the eval step (10) or later
    due_eval = order.index(("eval", 0))
    offsets = np.arange(10 * 4, 150)
    later = set((global_order(150, config.data.seed, offsets) // 32).tolist()) - set(
        (global_order(150, config.data.seed, np.arange(10 * 4)) // 32).tolist())
    assert all(order.index(("train", s)) > due_eval for s in later)
    # resumed at step 12: order from the checkpoint's offset; committed shards are not queued
    resumed = fill_order(rows, {"train": {0, 2}}, start=(12, 48), **fill_args(config))
    assert sorted(resumed) == [("train", 0), ("train", 2)]


def test_windowed_shuffle_lets_the_fill_serve_the_first_steps_after_two_shards(tiny):
    from pipeline.data import global_order

    config = config_of(tiny, "order-window", f"data.shuffle_window={2 * SHARD_SEQUENCES}")
    order = fill_order({"train": 150, "eval": 34}, {"train": set(range(5))}, **fill_args(config))
    # the first 16 steps (64 samples) read a block of two shards (three if the short last
    # block comes first), and those are written first
    first = set((global_order(150, config.data.seed, np.arange(64), 64) // SHARD_SEQUENCES).tolist())
    assert len(first) <= 3 and {s for _, s in order[:len(first)]} == first
    # with the uniform shuffle, the same steps need every shard
    assert len(set((global_order(150, config.data.seed, np.arange(64)) // SHARD_SEQUENCES).tolist())) == 5


def test_shard_queue_hands_the_next_shard_to_whichever_host_is_free():
    queue = ShardQueue([("train", 3), ("train", 0), ("eval", 1)])
    assert queue.take(0) == ("train", 3) and queue.take(1) == ("train", 0)
    assert queue.finish(1) == ("train", 0) and queue.take(1) == ("eval", 1)
    assert queue.running == {0: ("train", 3), 1: ("eval", 1)} and not queue.empty
    queue.finish(0)
    queue.finish(1)
    assert queue.empty and queue.done == [("train", 0, 1), ("train", 3, 0), ("eval", 1, 1)]
    # a host lost mid-shard: its shard goes first in line for whichever host is free next
    queue = ShardQueue([("train", 0), ("train", 1)])
    queue.take(0)
    assert queue.requeue(0) == ("train", 0) and queue.requeue(0) is None
    assert queue.running == {} and queue.take(1) == ("train", 0)


def test_schedules_match_what_train_and_evaluate_read(tiny):
    from pipeline.data import HostBatches, TokenDataset

    config = config_of(tiny, "schedule")
    dataset = TokenDataset(config.data.prepared_dir, "train")
    for host in range(2):
        batches = HostBatches(dataset, seed=config.data.seed, global_batch=4, host_index=host,
                              host_count=2, offset=8)
        schedule = train_schedule(dataset.num_rows, 8, seed=config.data.seed,
                                  shuffle_window=config.data.shuffle_window, global_batch=4,
                                  host_index=host, host_count=2)
        for _ in range(40):  # past the end of the first epoch
            np.testing.assert_array_equal(next(schedule), next(batches)[0])
    evals = eval_schedule(34, config.eval, host_index=1, host_count=2)
    assert [next(evals).tolist() for _ in range(3)] == [[2, 3], [6, 7], [2, 3]]


def test_relative_paths_become_absolute_urls_stay(tmp_path):
    config = load_config(TINY, ["cache.path=gs://bucket/cache"])
    fixed = absolute_paths(config, tmp_path)
    assert fixed.run_dir == str(tmp_path / "runs" / "tiny-test")
    assert fixed.data.prepared_dir == str(tmp_path / "runs" / "tiny-test" / "data")
    assert fixed.cache.path == "gs://bucket/cache"
    assert dataclasses.replace(fixed, run_dir=config.run_dir, data=config.data) == config


def test_run_verb_refuses_a_teacher_without_weights(tmp_path, capsys):
    """`kdpipe run` with a teacher given as an architecture only: exit 2, one line naming the
    field, before any Ray or host starts."""
    from actors.cli import main

    code = main(["run", str(TINY), "--set", f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "model.teacher.path" in err and "offline" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def _report_then_wait(host):
    host.report(step=3, waiting="train shards [1]")
    while not host.stop_requested():
        time.sleep(0.05)
    return host.status()


def test_one_core_host_starts_jax_and_answers_status_polls_while_busy(tiny):
    """A host pinned to one core (the fill benchmark's teacher hosts) starts JAX; what its work
    reports reaches the driver's poll while the work runs."""
    from actors.groups import GroupSpec, HostGroup
    from actors.hosts import HostEnv

    with HostGroup.create(GroupSpec.local("pinned", 1, HostEnv(cores_per_host=1))) as group:
        [info] = group.setup_jax(distributed=False)
        assert info.platform == "cpu"
        refs = group.submit(_report_then_wait)
        deadline = time.monotonic() + 60
        while group.poll_status() != {0: {"step": 3, "waiting": "train shards [1]"}}:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        group.request_stop()
        assert group.gather(refs, timeout_s=60) == {0: {"step": 3, "waiting": "train shards [1]"}}

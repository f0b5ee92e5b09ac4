"""On-policy rollouts scored by remote teacher hosts (``actors.remote``), and the faults.

- ``TeacherHosts.score``: the student's sequences travel (token ids and masks, nothing else),
  and the top-k targets that come back are the teacher's, against a float64 numpy top-k of the
  teacher's logits on random tokens (plain Python: a fake teacher actor, no Ray cluster).
- One 2-host on-policy run (``cluster.teacher_source: remote``, ``logging.example_ids``) on an
  embedded Ray, in which a student host is SIGKILLed and later a teacher host is SIGKILLed under
  the scoring requests: the group is re-formed, the teacher host replaced (one budget,
  ``cluster.max_failures``), the run finishes, and every prompt is trained on exactly once in
  the epoch the run covers (the example logs).
"""

from __future__ import annotations

import functools
import os
import pickle
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import ray

import actors.remote
from actors.cluster import connect
from actors.remote import SCORED_KEYS, SERVICE, TargetService, TeacherHosts, score
from actors.work import train_student
from pipeline.config import load_config
from pipeline.data import prepare_dataset, read_info
from tiny_run import TINY, checked_example_logs, make_tiny_run, quiet_run

# The student functions below travel to the host actors by value: this module is not
# importable in Ray's worker processes.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

BATCH = 8
NEW_TOKENS = 8


class LocalTeacher:
    """A teacher host actor in this process: ``run.remote(call)`` runs ``call`` on ``host``
    (what ``actors.hosts.HostActor.run`` does) after a pickle round trip, and keeps the bytes."""

    def __init__(self, host):
        self.host, self.sent = host, []
        self.run = self

    def remote(self, call):
        self.sent.append(pickle.dumps(call))
        fn, args, kwargs = pickle.loads(self.sent[-1])
        return fn(self.host, *args, **kwargs)


def float64_log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_scored_sequences_travel_alone_and_come_back_as_the_teachers_top_k(monkeypatch):
    from types import SimpleNamespace

    from pipeline.cache import TargetSpec
    from pipeline.step import TrainState
    from toy_model import ToyDecoder

    vocab, k, (batch, seq) = 96, 6, (3, 16)
    teacher = ToyDecoder(vocab, hidden=24, seed=3)
    spec = TargetSpec(mode="topk", vocab_size=vocab, tokenizer_vocab_size=vocab, k=k,
                      value_dtype="float32", temperature=1.0)
    host = SimpleNamespace(rank=0, state={"teacher": (teacher, TrainState.create(teacher)),
                                          SERVICE: TargetService("unused", spec)})
    actor = LocalTeacher(host)
    monkeypatch.setattr(actors.remote.ray, "get", lambda answer: answer)  # answers are values

    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    mask = (np.arange(seq)[None] < np.array([[16], [11], [5]])).astype(np.int32)
    rows = np.array([7, 2, 40])
    sent = {"input_ids": ids, "attention_mask": mask,
            "labels": np.full((batch, seq), -100, np.int32)}  # the student's alone: not sent
    got = TeacherHosts([actor], spec, vocab).score(sent, rows)

    fn, args, _ = pickle.loads(actor.sent[0])
    assert fn is score and sorted(args[0]) == sorted(k for k in SCORED_KEYS if k in sent)
    np.testing.assert_array_equal(args[1], rows)
    log_p = float64_log_softmax(teacher(ids, mask).logits)  # [b, seq, vocab]
    want_ids = np.sort(np.argsort(-log_p, axis=-1)[..., :k], axis=-1)
    got_ids = np.asarray(got["teacher_topk_ids"])
    order = np.argsort(got_ids, axis=-1)
    got_lp = np.take_along_axis(np.asarray(got["teacher_topk_logprobs"]), order, axis=-1)
    real = mask == 1
    np.testing.assert_array_equal(np.sort(got_ids, axis=-1)[real], want_ids[real])
    want_lp = np.take_along_axis(log_p, want_ids, axis=-1)
    np.testing.assert_allclose(got_lp[real], want_lp[real], atol=2e-5)
    tail = np.log1p(-np.exp(want_lp).sum(axis=-1))
    np.testing.assert_allclose(np.asarray(got["teacher_tail_logmass"])[real], tail[real],
                               atol=2e-5)


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny run's data prepared again in rows of 64 tokens (half as many rows: the run
    covers an epoch in a few steps), rollouts of NEW_TOKENS after a prefix of each row."""
    work = tmp_path_factory.mktemp("onpolicy-remote")
    overrides = make_tiny_run(work) + ["data.seq_len=64", f"data.prepared_dir={work / 'data64'}"]
    prepare_dataset(load_config(TINY, [*overrides, f"data.sources=[{work / 'docs.jsonl'}]"]).data,
                    progress=False)
    rows = read_info(work / "data64").splits["train"]["num_rows"]
    steps = -(-rows // BATCH)  # one epoch, at least
    overrides += [
        f"cache.path={work / 'no-cache'}", "cluster.teacher_source=remote",
        f"train.steps={steps}", f"train.global_batch_size={BATCH}", "checkpoint.every_steps=3",
        "eval.every_steps=0", "cluster.student.hosts=2", "cluster.max_failures=2",
        "logging.example_ids=true", "optimizer.warmup_steps=1", "loss.use_hard_labels=false",
        "loss.alpha=1.0", "loss.divergence=reverse_kl",
        f"train.on_policy={{fraction: 0.5, max_new_tokens: {NEW_TOKENS}, "
        f"prompt_source: prefix}}"]
    connect(num_cpus=2, dashboard=False)
    yield work, overrides, steps
    ray.shutdown()


def faulty_student(host, config, plan, *, student_at: int, teacher_at: int, markers: str):
    """``train_student``, but student host 1 SIGKILLs its own process right after step
    ``student_at``, then (in the re-formed group) student host 0 SIGKILLs teacher host 0's
    process right after step ``teacher_at``; each once (marker files under ``markers``)."""
    student_mark, teacher_mark = Path(markers, "student"), Path(markers, "teacher")
    report = host.report

    def report_then_kill(**values):
        report(**values)
        step = values.get("step")
        if host.rank == 1 and step == student_at and not student_mark.exists():
            student_mark.write_text("")
            os.kill(os.getpid(), signal.SIGKILL)
        if (host.rank == 0 and step == teacher_at and student_mark.exists()
                and not teacher_mark.exists()):
            teacher_mark.write_text("")
            os.kill(ray.get(plan.teachers[0].info.remote()).pid, signal.SIGKILL)

    host.report = report_then_kill
    return train_student(host, config, plan)


def test_student_and_teacher_hosts_killed_during_on_policy_training(tiny, tmp_path):
    work, overrides, steps = tiny
    config = load_config(TINY, [*overrides, f"run_dir={work / 'killed'}"])
    outcome = quiet_run(config, student=functools.partial(
        faulty_student, student_at=4, teacher_at=7, markers=str(tmp_path)))
    assert outcome.result.step == steps
    lost, teacher = outcome.student_restarts
    assert (lost.reason, lost.hosts_after, lost.resumed_step) == ("failure", 2, 3)
    assert (teacher.reason, teacher.hosts_after, teacher.resumed_step) == ("teacher lost", 2, 6)
    assert "teacher host died" in teacher.detail
    assert outcome.teacher_hosts_lost == 1
    # every prompt once: each global sample offset of the run once, on the row the global
    # order puts there, and the run covers the train split's first epoch
    rows = read_info(config.data.prepared_dir).splits["train"]["num_rows"]
    records = checked_example_logs(config, steps * BATCH)
    first_epoch = np.concatenate([np.asarray(r["rows"])[np.asarray(r["offsets"]) < rows]
                                  for r in records])
    np.testing.assert_array_equal(np.sort(first_epoch), np.arange(rows))
    assert sorted(r["step"] for r in records) == sorted(list(range(1, steps + 1)) * 2)

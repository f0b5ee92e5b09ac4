"""On-policy distillation (``train.on_policy``, pipeline/onpolicy.py): rollout rows carry the
loss on their generated tokens only, the batch mixes rollouts and dataset rows as configured,
a scorer's targets land on the rollout rows (keyed by row and step), a stopped and resumed run
reproduces the uninterrupted one bit for bit, and the rollout metrics (every host's, the reverse
KL at temperature 1) reach the log and the report."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import jax
import numpy as np
import pytest

from pipeline.data import HostBatches, TokenDataset, read_info
from pipeline.metrics import REPORT_FILE, read_metrics
from pipeline.onpolicy import (METRIC_SUMS, Rollouts, continuation_rows, left_padded_prompts,
                               prompt_lengths, rollout_count, rollout_metrics,
                               rollout_sequence_ids)
from pipeline.step import DistillLossConfig, TrainState, distillation_step
from pipeline.train import Preempted, train
from tiny_run import config_of, make_tiny_run
from toy_model import ToyDecoder

VOCAB, SEQ = 32, 12
ON_POLICY = ("cache=null", "cluster.teacher_source=live", "loss.use_hard_labels=false",
             "loss.divergence=reverse_kl", "eval.every_steps=0", "logging.every_steps=2",
             "checkpoint.every_steps=4", "train.steps=4")
# one generation shape for the whole module (one compile)
ROLLOUTS = "fraction: 0.5, max_new_tokens: 8, prompt_source: prefix, prefix_tokens: 8"


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_rollout_rows_carry_the_loss_on_generated_tokens_only():
    rng = np.random.default_rng(0)
    n, width, new = 4, 5, 6
    prompts = rng.integers(1, VOCAB, (n, SEQ))
    p = np.array([5, 1, 3, 2])  # prompt tokens of each row
    lengths = np.array([6, 2, 4, 1])  # generated tokens (through eos)
    ids, mask = left_padded_prompts(prompts, p, width, pad_id=0)
    tokens = rng.integers(1, VOCAB, (n, new))
    batch = continuation_rows(ids, p, tokens, lengths, SEQ, segment_ids=False)

    for i in range(n):  # the row: prompt, then the generated tokens, then padding
        row = np.concatenate([prompts[i, :p[i]], tokens[i, :lengths[i]]])
        np.testing.assert_array_equal(batch["input_ids"][i, :len(row)], row)
        assert batch["attention_mask"][i].sum() == len(row)
    teacher_logits = rng.standard_normal((n, SEQ, VOCAB)).astype(np.float32) * 3
    student = TrainState.create(ToyDecoder(VOCAB, 16, 1, seed=3))
    temperature = 2.0
    _, metrics = jax.jit(distillation_step, static_argnames=("loss_config", "is_training",
                                                             "temperature", "alpha"))(
        student, {**batch, "teacher_logits": teacher_logits}, None,
        loss_config=DistillLossConfig(divergence="reverse_kl"), is_training=False,
        temperature=temperature, alpha=1.0)

    # float64 reference: KL(student || teacher) at T on the positions that predict a generated
    # token (p - 1 .. p + len - 2), whatever the labels say
    student_logits = np.asarray(student.model()(batch["input_ids"], batch["attention_mask"]).logits,
                                np.float64)
    log_q = _log_softmax(student_logits / temperature)
    log_p = _log_softmax(teacher_logits.astype(np.float64) / temperature)
    kl = (np.exp(log_q) * (log_q - log_p)).sum(-1)
    chosen = [kl[i, p[i] - 1:p[i] + lengths[i] - 1] for i in range(n)]
    expected = temperature ** 2 * np.concatenate(chosen).mean()
    assert int(metrics.num_tokens) == lengths.sum()
    np.testing.assert_allclose(float(metrics.kl_loss), expected, rtol=2e-5)


def test_prompts_of_each_source():
    from pipeline.config import OnPolicyConfig

    labels = np.full((3, SEQ), -100)
    labels[0, 4:9] = 7  # first label at 4: the prompt is tokens 0..4
    labels[2, 0:] = 7  # a row without prompt: its first token alone
    batch = {"attention_mask": (np.arange(SEQ) < np.array([[9], [6], [SEQ]])).astype(int),
             "labels": labels, "segment_ids": np.array([[1] * 9 + [0] * 3, [1, 1, 2, 2, 2, 2] +
                                                        [0] * 6, [1] * SEQ])}
    prompt = OnPolicyConfig(max_new_tokens=4, prompt_source="prompt")
    # row 1 has no label: its whole real part (6 tokens)
    np.testing.assert_array_equal(prompt_lengths(batch, prompt, SEQ), [5, 6, 1])
    prefix = OnPolicyConfig(max_new_tokens=4, prompt_source="prefix", prefix_tokens=3)
    # row 1's first document has 2 tokens
    np.testing.assert_array_equal(prompt_lengths(batch, prefix, SEQ), [3, 2, 3])
    assert [rollout_count(8, f) for f in (0.0, 0.3, 0.5, 1.0)] == [0, 2, 4, 8]


def test_the_prompt_check_reads_the_longest_prompt_prepare_recorded(tiny, tmp_path, monkeypatch):
    from pipeline.config import OnPolicyConfig
    from pipeline.data import prepare_dataset
    from pipeline.errors import DataError
    from pipeline.onpolicy import check_split_prompts

    rng = np.random.default_rng(3)
    words = np.array(["alpha", "beta", "gamma", "delta", "wrap"])
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(
        json.dumps({"prompt": " ".join(rng.choice(words, rng.integers(1, 6))),
                    "completion": " done"}) + "\n" for _ in range(60)))
    config = config_of(tiny, "pairs", f"data.sources=[{source}]", "data.pack=false",
                       f"data.prepared_dir={tmp_path / 'data'}")
    prepare_dataset(config.data, progress=False)
    data = TokenDataset(config.data.prepared_dir, "train")
    scanned = prompt_lengths(data.read_rows(np.arange(data.num_rows)), OnPolicyConfig(),
                             data.seq_len)
    longest = read_info(config.data.prepared_dir).splits["train"]["max_prompt_tokens"]
    assert longest == scanned.max() > scanned.min()
    monkeypatch.setattr(TokenDataset, "read_rows", lambda *_: pytest.fail("read rows"))
    check_split_prompts(data, OnPolicyConfig(max_new_tokens=data.seq_len - longest))
    monkeypatch.undo()  # a prompt too long: rows are read to name the first
    with pytest.raises(DataError, match=r"max_new_tokens: \d+ prompt\(s\) .* \(row \d+: "
                                        f"{longest} tokens"):
        check_split_prompts(data, OnPolicyConfig(max_new_tokens=data.seq_len - longest + 1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    work = tmp_path_factory.mktemp("onpolicy")
    return work, make_tiny_run(work)


class RecordingScorer:
    """A stand-in for teacher hosts: random top-k targets of the sequences it is sent."""

    def __init__(self, k: int, vocab: int):
        self.k, self.vocab, self.calls = k, vocab, []

    def score(self, batch, rows):
        self.calls.append(({key: np.array(v) for key, v in batch.items()}, np.array(rows)))
        rng = np.random.default_rng(int(rows[0]))
        n, length = batch["input_ids"].shape
        ids = np.argsort(rng.random((n, length, self.vocab)), axis=-1)[..., :self.k]
        return {"teacher_topk_ids": ids.astype(np.int32),
                "teacher_topk_logprobs": np.full((n, length, self.k), -3.0, np.float32),
                "teacher_tail_logmass": np.full((n, length), -0.2, np.float32)}


def test_a_batch_mixes_scored_rollouts_and_dataset_rows(tiny):
    from pipeline.student_state import student_state

    config = config_of(tiny, "mix", *ON_POLICY, f"train.on_policy={{{ROLLOUTS}}}")
    info = read_info(config.data.prepared_dir)
    data = TokenDataset(config.data.prepared_dir, "train")
    state, mesh = student_state(config, info.vocab_size)
    scorer = RecordingScorer(4, info.vocab_size)
    batches = HostBatches(data, seed=0, global_batch=4)
    rollouts = Rollouts(config.train.on_policy, batches, seed=0, steps=1, mesh=mesh,
                        scorer=scorer)
    rows = np.array([11, 3, 25, 7])
    local = data.read_rows(rows)
    stored = scorer.score({"input_ids": local["input_ids"][2:]}, rows[2:])  # the offline part
    scorer.calls.clear()
    batch = rollouts.batch(state, 1, rows, local, stored)

    assert rollouts.count == 2 and len(scorer.calls) == 1
    sent, sent_ids = scorer.calls[0]
    # a sampled encoding's draws are keyed by (row, step): a row's next rollout draws apart
    np.testing.assert_array_equal(sent_ids, rollout_sequence_ids(0, 1, rows[:2]))
    assert sent_ids.dtype == np.int32 and (sent_ids >= 0).all()
    assert (rollout_sequence_ids(0, 2, rows[:2]) != sent_ids).all()
    for key in ("input_ids", "attention_mask", "labels"):  # rows 2, 3: the dataset's
        np.testing.assert_array_equal(batch[key][2:], local[key][2:])
        np.testing.assert_array_equal(batch[key][:2], sent[key])
    for key, value in stored.items():
        np.testing.assert_array_equal(np.asarray(batch[key][2:]), value)
    # rows 0, 1: the prefix of their dataset row (8 tokens of its first document), then the
    # generated tokens; labels from the prompt's last token on
    first = {key: value[:2] for key, value in local.items()}
    for i, p in enumerate(prompt_lengths(first, config.train.on_policy, info.seq_len)):
        assert 1 <= p <= 8
        np.testing.assert_array_equal(batch["input_ids"][i, :p], local["input_ids"][i, :p])
        assert (batch["labels"][i, :p - 1] == -100).all() and batch["labels"][i, p - 1] != -100
    assert batch["teacher_topk_ids"].shape == (4, info.seq_len, 4)
    # the same (seed, step, row) draws the same rollout, in any batch
    again = rollouts.batch(state, 1, rows[[1, 0, 3, 2]], data.read_rows(rows[[1, 0, 3, 2]]),
                           {k: np.asarray(v)[[1, 0]] for k, v in stored.items()})
    np.testing.assert_array_equal(again["input_ids"][[1, 0]], batch["input_ids"][:2])
    metrics = rollouts.take_metrics()
    assert 1 <= metrics["rollout_length"] <= 8 and metrics["rollout_tokens_per_s"] > 0
    assert metrics["rollout_staleness"] == 0


def test_rollout_metrics_pool_every_hosts_rollouts():
    rng = np.random.default_rng(2)
    steps, hosts = 3, 2
    lengths = [rng.integers(1, 9, (steps, n)) for n in (3, 5)]  # [step, rollout] per host
    stopped = [rng.random((steps, n)) < 0.5 for n in (3, 5)]
    seconds = rng.gamma(2.0, size=(hosts, steps, 3))  # rollout_s, score_s, step_s
    per_host = np.array([[steps, lengths[h].sum(), *seconds[h].sum(axis=0),
                          lengths[h][-1].sum(), stopped[h][-1].sum(), lengths[h].shape[1], 1]
                         for h in range(hosts)])
    assert per_host.shape == (hosts, len(METRIC_SUMS))
    got = rollout_metrics(per_host)
    last = np.concatenate([x[-1] for x in lengths])  # the last step, all hosts' rollouts
    assert np.isclose(got["rollout_length"], last.mean())
    assert np.isclose(got["rollout_eos_fraction"], np.concatenate([x[-1] for x in stopped]).mean())
    for i, key in enumerate(("rollout_s", "score_s", "step_s")):
        assert np.isclose(got[key], seconds[..., i].mean())  # per step and host
    all_tokens = sum(x.sum() for x in lengths)
    assert np.isclose(got["rollout_tokens_per_s"], all_tokens / seconds[..., 0].sum(axis=1).mean())
    assert got["rollout_staleness"] == 1


def test_rollout_reverse_kl_is_at_temperature_1_on_the_generated_tokens(tiny):
    from pipeline.train import _sample_divergence, prepare_run

    config = config_of(tiny, "kl1", *ON_POLICY, "loss.temperature=2.0",
                       f"train.on_policy={{{ROLLOUTS}}}")
    setup = prepare_run(config)
    rollouts = Rollouts(config.train.on_policy, HostBatches(setup.train_data, seed=0,
                                                            global_batch=4),
                        seed=0, steps=1, mesh=setup.sharding.mesh, scorer=None)
    rows = np.array([11, 3, 25, 7])
    batch = rollouts.batch(setup.state, 1, rows, setup.train_data.read_rows(rows), {})
    got = _sample_divergence(config, setup.state, batch, rollouts, setup.sharding,
                             setup.teacher_state, setup.vocab_size)["rollout_reverse_kl"]

    def log_probs(state):  # float64, temperature 1, the tokenizer's ids
        logits = state.model()(batch["input_ids"], batch["attention_mask"],
                               segment_ids=batch.get("segment_ids")).logits
        return _log_softmax(np.asarray(logits, np.float64)[..., :setup.vocab_size])

    log_q, log_p = log_probs(setup.state), log_probs(setup.teacher_state)
    kl = (np.exp(log_q) * (log_q - log_p)).sum(-1)
    generated = batch["labels"] != -100
    generated[rollouts.count:] = False  # the rollouts' tokens alone
    assert generated.any()
    np.testing.assert_allclose(got, kl[generated].mean(), rtol=2e-5)
    # a scorer's targets hold the teacher at loss.temperature 2: no KL at 1 from them
    assert _sample_divergence(config, setup.state, batch, rollouts, setup.sharding, None,
                              setup.vocab_size) == {}


def test_a_stopped_and_resumed_run_reproduces_the_uninterrupted_one(tiny):
    lag = 1  # rollouts one update behind: the checkpoint holds the next step's (lag 0 holds none)
    on_policy = f"train.on_policy={{{ROLLOUTS}, lag: {lag}}}"
    whole = config_of(tiny, f"whole{lag}", *ON_POLICY, on_policy, "logging.report=true",
                      "logging.tensorboard=true")
    train(whole)
    parted = config_of(tiny, f"parted{lag}", *ON_POLICY, on_policy)
    stop = threading.Event()
    with pytest.raises(Preempted):
        train(parted, stop=stop, on_step=lambda step, _: step == 1 and stop.set())
    train(parted)

    def export(config):
        return (Path(config.run_dir) / "student" / "model.safetensors").read_bytes()

    assert export(parted) == export(whole)  # the parameters, bit for bit
    logged = [r for r in read_metrics(whole.run_dir) if r["split"] == "train"]
    same = ("loss", "kl_loss", "grad_norm", "rollout_reverse_kl", "rollout_length",
            "rollout_eos_fraction", "rollout_staleness")
    assert [[r[k] for k in same] for r in logged] == [
        [r[k] for k in same] for r in read_metrics(parted.run_dir) if r["split"] == "train"]
    for record in logged:
        assert 1 <= record["rollout_length"] <= 8
        assert 0 <= record["rollout_eos_fraction"] <= 1
        assert record["rollout_reverse_kl"] >= 0
        for key in ("rollout_tokens_per_s", "rollout_s", "score_s", "step_s"):
            assert record[key] >= 0, key
    # the rollouts of logging steps 2 and 4 were written one update before the step's
    assert [r["rollout_staleness"] for r in logged] == [lag, lag]
    run_dir = Path(whole.run_dir)
    report = (run_dir / REPORT_FILE).read_text()
    assert "onpolicy_curves.png" in report and "rollout_reverse_kl" in report
    assert list((run_dir / "tensorboard").iterdir())

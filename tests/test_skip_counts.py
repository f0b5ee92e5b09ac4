"""Skipped updates in the training loop: every non-finite update and every batch without loss
tokens is counted, not only those of logging steps, and the counts carry on across a resume."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from pipeline.checkpoint import read_checkpoint_metas
from pipeline.data import global_order, read_info
from pipeline import hardware
from pipeline.metrics import REPORT_FILE, read_metrics
from pipeline.models.registry import config_from_hf
from pipeline.train import Preempted, train
from tiny_run import config_of, make_tiny_run

NON_FINITE_STEPS = (2, 3, 6)  # none of them a logging step (4, 8)
EMPTY_STEPS = (1, 7)


class InjectedTargets:
    """Dense random teacher logits for the rows asked, NaN for the rows of NON_FINITE_STEPS;
    for the rows of EMPTY_STEPS it also hands over labels that are all -100 (they replace the
    data's labels in the batch), so those batches have no loss token."""

    def __init__(self, config, vocab_size: int):
        info = read_info(config.data.prepared_dir)
        self.seq_len, self.vocab_size = info.seq_len, vocab_size
        batch = config.train.global_batch_size

        def rows_of(steps):
            offsets = np.concatenate([np.arange((s - 1) * batch, s * batch) for s in steps])
            return set(global_order(info.splits["train"]["num_rows"], config.data.seed, offsets,
                                    config.data.shuffle_window).tolist())

        self.non_finite, self.empty = rows_of(NON_FINITE_STEPS), rows_of(EMPTY_STEPS)
        assert not self.non_finite & self.empty  # one epoch: no row is read twice

    def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(int(rows[0]))
        logits = rng.standard_normal((len(rows), self.seq_len, self.vocab_size)).astype(np.float32)
        if self.non_finite & set(rows.tolist()):
            logits[:] = np.nan
        out = {"teacher_logits": logits}
        if self.empty & set(rows.tolist()):
            out["labels"] = np.full((len(rows), self.seq_len), -100, np.int32)
        return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    work = tmp_path_factory.mktemp("counts")
    return work, make_tiny_run(work)


def test_every_skip_is_counted_and_the_count_survives_a_resume(tiny, monkeypatch):
    # A chip with a known peak, so that the run logs MFU (on the CPU it is n/a)
    chip = hardware.Chip("test chip", 3e9)
    monkeypatch.setattr(hardware, "chip_of", lambda kind: chip)
    config = config_of(tiny, "run", "logging.every_steps=4", "eval.every_steps=0",
                       "logging.report=true", "checkpoint.every_steps=4", "train.steps=8")
    vocab_size = read_info(config.data.prepared_dir).vocab_size
    targets = {"train": InjectedTargets(config, vocab_size)}
    stop = threading.Event()
    with pytest.raises(Preempted):
        train(config, targets=targets, stop=stop, on_step=lambda step, _: step == 4 and stop.set())
    position = read_checkpoint_metas(config.checkpoint_dir)[4]["position"]
    assert (position["skipped_updates"], position["empty_batches"]) == (2, 1)

    result = train(config, targets=targets)
    assert result.step == 8
    assert (result.skipped_updates, result.empty_batches) == (3, 2)
    report = (Path(config.run_dir) / REPORT_FILE).read_text()
    assert "skipped non-finite updates: 3" in report
    assert "skipped batches without loss tokens: 2" in report

    # MFU: the student's 6N + 12LHQT per token x tokens/s / the chip's peak, on logging steps
    seq_len = read_info(config.data.prepared_dir).seq_len
    spec = config.model.student
    flops = hardware.train_flops_per_token(config_from_hf(spec.hf_config(vocab_size)), seq_len)
    logged = [r for r in read_metrics(config.run_dir) if r["split"] == "train"]
    assert [r["step"] for r in logged] == [4, 8]
    for record in logged:
        assert record["mfu"] == pytest.approx(flops * record["tokens_per_s"] / 3e9)
    assert f"MFU: {flops:.4g} model FLOPs per token" in report
    assert f"| {hardware.format_mfu(logged[-1]['mfu'])} |" in report

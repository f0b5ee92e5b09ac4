import json

import numpy as np
import pytest

from pipeline.metrics import MetricsLogger, read_metrics, write_report


def _log_steps(run_dir, steps, **kwargs):
    with MetricsLogger(run_dir, **kwargs) as log:
        for step in steps:
            log.log(step, {"loss": np.float32(1.0 / step), "kl_loss": 2.0 / step})
            if step % 2 == 0:
                log.log(step, {"ce_loss": 3.0 / step}, split="eval")


def test_records_round_trip_and_tensorboard(tmp_path):
    _log_steps(tmp_path, range(1, 5))
    records = read_metrics(tmp_path)
    assert [(r["step"], r["split"]) for r in records] == [
        (1, "train"), (2, "train"), (2, "eval"), (3, "train"), (4, "train"), (4, "eval")]
    assert records[0]["loss"] == pytest.approx(1.0)
    assert records[-1]["ce_loss"] == pytest.approx(0.75)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    _log_steps(tmp_path, range(1, 7))
    _log_steps(tmp_path, range(5, 9), resume_step=4)
    steps = [r["step"] for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert steps == list(range(1, 9))


def test_disabled_logger_writes_nothing(tmp_path):
    _log_steps(tmp_path / "run", range(1, 3), enabled=False)
    assert not (tmp_path / "run").exists()


def test_report_has_table_and_plots(tmp_path):
    _log_steps(tmp_path, range(1, 9))
    path = write_report(tmp_path, "Demo", [{"student": "distilled", "ce": 1.23456},
                                           {"student": "hard labels", "ce": 2.5}],
                        notes=["cache: 12.0 bytes/token"])
    text = path.read_text()
    assert "| student | ce |" in text and "| distilled | 1.235 |" in text
    assert "- cache: 12.0 bytes/token" in text
    for name in ("train_curves.png", "eval_curves.png"):
        assert f"({name})" in text
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_overlays_named_runs(tmp_path):
    _log_steps(tmp_path / "a", range(1, 5))
    _log_steps(tmp_path / "b", range(1, 7))
    path = write_report(tmp_path, "Two runs", [{"run": "a"}, {"run": "b"}],
                        runs={"a": tmp_path / "a", "b": tmp_path / "b"})
    assert "(eval_curves.png)" in path.read_text()
    assert (tmp_path / "train_curves.png").stat().st_size > 0

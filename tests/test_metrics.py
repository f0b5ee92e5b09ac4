import numpy as np
import pytest

from pipeline.metrics import ExampleLog, MetricsLogger, read_example_logs, read_metrics, write_report


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


def _log_examples(run_dir, index, count, steps, resume_step):
    log = ExampleLog(run_dir, index, count, resume_step=resume_step)
    for step in steps:
        offsets = np.arange(step * 4 + index * 2, step * 4 + index * 2 + 2)
        log.log(step, offsets, offsets[::-1] + 100)
    log.close()


def test_example_log_drops_steps_past_the_checkpoint_of_every_layout(tmp_path):
    # two hosts ran steps 1-7; the run resumes from the step-5 checkpoint on one host
    for index in (0, 1):
        _log_examples(tmp_path, index, 2, range(1, 8), resume_step=0)
    _log_examples(tmp_path, 0, 1, range(6, 9), resume_step=5)
    records = read_example_logs(tmp_path)
    assert sorted({(r["file"], r["step"]) for r in records}) == sorted(
        [("host-0-of-2.jsonl", s) for s in range(1, 6)] + [("host-1-of-2.jsonl", s) for s in range(1, 6)]
        + [("host-0-of-1.jsonl", s) for s in range(6, 9)])
    first = next(r for r in records if r["file"] == "host-1-of-2.jsonl" and r["step"] == 3)
    assert first["offsets"] == [14, 15] and first["rows"] == [115, 114]


def test_example_log_of_a_non_primary_host_leaves_other_layouts_alone(tmp_path):
    _log_examples(tmp_path, 0, 1, range(1, 5), resume_step=0)
    _log_examples(tmp_path, 1, 2, range(3, 5), resume_step=2)  # host 1 may start writing first
    assert sorted({r["step"] for r in read_example_logs(tmp_path) if r["file"] == "host-0-of-1.jsonl"}) \
        == [1, 2, 3, 4]
    _log_examples(tmp_path, 0, 1, [], resume_step=0)  # a fresh start empties its own layout
    assert [r for r in read_example_logs(tmp_path) if r["file"] == "host-0-of-1.jsonl"] == []

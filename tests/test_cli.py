"""The kdpipe CLI end to end at a tiny size: the demo, resume after a kill, inspect, eval,
export, and --debug. The corpus of user errors (exit code 2, one paragraph naming the culprit,
nothing touched) is tests/test_bad_inputs.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DEMO_OUTPUT, TINY
from pipeline.metrics import read_metrics

# The demo's rows and the run directory each row's figures come from.
DEMO_RUNS = {"teacher": "teacher", "student (distilled)": "distilled",
             "student (hard-labels)": "hard-labels"}


def _last(run_dir: Path, split: str) -> dict:
    return [record for record in read_metrics(run_dir) if record["split"] == split][-1]


def _shown(value) -> str:
    """A figure as the demo's tables show it; the teacher has no KL or agreement to itself."""
    return "—" if value is None else f"{value:.4g}"


def test_demo_writes_comparison_report_and_exports(demo_dir):
    """Every figure the demo returns, saves and prints is the final record of the metrics.jsonl
    of the run it names."""
    run = demo_dir / "runs" / "tiny-test"
    comparison = json.loads((run / "comparison.json").read_text())
    expected = []
    for model, name in DEMO_RUNS.items():
        final_eval, final_train = _last(run / name, "eval"), _last(run / name, "train")
        assert final_eval["step"] == final_train["step"] == 8
        expected.append({"model": model, "held-out CE": final_eval["ce_loss"],
                         "KL to teacher": final_eval.get("kl_loss"),
                         "top-1 agreement": final_eval.get("top1_agreement"),
                         "train tokens/s": final_train["tokens_per_s"]})
    assert comparison["rows"] == expected
    assert all(row["KL to teacher"] is not None for row in expected[1:])
    gain = expected[2]["held-out CE"] - expected[1]["held-out CE"]
    assert comparison["distilled_beats_hard_labels"] == (gain > 0)
    assert comparison["cache"]["mode"] == "topk" and comparison["cache"]["k"] == 8

    report = (run / "report.md").read_text()
    table = [line.strip("|").split("|") for line in report.splitlines() if line.startswith("| ")]
    assert [[cell.strip() for cell in line] for line in table[1:]] == [
        [row["model"], *map(_shown, list(row.values())[1:])] for row in expected]
    verdict = "below" if gain > 0 else "ABOVE"
    assert f"student is {abs(gain):.4f} nats {verdict} the hard-label" in report
    assert f"{comparison['cache']['bytes_per_token']:.1f} bytes/token" in report

    # The table printed on the console: a row's first line holds its figures.
    printed = [[cell.strip() for cell in line.split("│")[1:-1]]
               for line in (demo_dir / DEMO_OUTPUT).read_text().splitlines() if "│" in line]
    assert [cells[1:] for cells in printed if cells[1]] == [
        list(map(_shown, list(row.values())[1:])) for row in expected]
    for name in ("teacher", "distilled", "hard-labels"):
        export = run / name / "student"
        assert (export / "config.json").exists() and (export / "model.safetensors").exists()


def test_inspect_cache_and_run(demo_dir, cli):
    run = demo_dir / "runs" / "tiny-test"
    code, out, _ = cli(["inspect", run / "cache"], demo_dir)
    assert code == 0
    assert "top-8 log-probs" in out and "INCOMPLETE" not in out
    # the demo's figure for the train split (the first one described), as inspect computes it
    bytes_per_token = json.loads((run / "comparison.json").read_text())["cache"]["bytes_per_token"]
    train_split = out.split("\ncache ")[0]
    assert "cache/train" in train_split and f"{bytes_per_token:.1f} bytes/token" in train_split
    code, out, _ = cli(["inspect", run / "distilled"], demo_dir)
    assert code == 0 and "latest      step 8" in out
    code, _, err = cli(["inspect", demo_dir], demo_dir)
    assert code == 2 and "is not a cache" in err


def _distill_config(demo_dir: Path, run_dir: Path) -> list[str]:
    run = demo_dir / "runs" / "tiny-test"
    return [TINY, "--set", f"run_dir={run_dir}", "--set", f"data.tokenizer={run / 'tokenizer.json'}",
            "--set", f"data.prepared_dir={run / 'data'}", "--set", f"cache.path={run / 'cache'}",
            "--set", f"model.teacher={{path: {run / 'teacher' / 'student'}}}"]


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), proc.communicate()[0].decode()[-3000:]


def test_train_survives_sigkill_and_sigterm_with_the_same_result(demo_dir, tmp_path):
    """SIGKILL after the step-4 checkpoint; rerun, SIGTERM after step 5 (a checkpoint is saved,
    exit 143); rerun to the end: the same metrics as the demo's uninterrupted distilled run
    (same config, data, cache and teacher)."""
    run_dir = tmp_path / "resumed"
    args = [sys.executable, "-m", "actors.cli", "train", *map(str, _distill_config(demo_dir, run_dir))]
    popen = lambda: subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
    proc = popen()
    _wait_for(run_dir / "checkpoints" / "4" / "commit_success.txt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # The killed run may have logged past step 4; wait for the resumed run's own records (it
    # first drops those after its checkpoint) reaching step 5.
    killed_log = (run_dir / "metrics.jsonl").read_text()
    proc = popen()
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        log = (run_dir / "metrics.jsonl").read_text()
        if log != killed_log and any(json.loads(line)["step"] >= 5 for line in log.splitlines()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 143, output[-3000:]
    assert "stopped by SIGTERM after saving the checkpoint of step" in output
    saved = [int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(saved) >= 5

    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    resumed = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(l) for l in
                 (demo_dir / "runs" / "tiny-test" / "distilled" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in resumed] == [(r["step"], r["split"]) for r in reference]
    for got, want in zip(resumed, reference):
        assert got.keys() == want.keys()
        for key in want.keys() - {"split", "tokens_per_s"}:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["step"], key)


def test_eval_and_export_a_checkpoint(demo_dir, tmp_path, cli):
    run = demo_dir / "runs" / "tiny-test"
    config = _distill_config(demo_dir, run / "distilled")
    code, out, err = cli(["eval", *config, "--step", "4"], tmp_path)
    assert code == 0, err
    values = json.loads(out)
    # the same figures as the run's own evaluation of that checkpoint
    logged = [r for r in read_metrics(run / "distilled") if r["split"] == "eval" and r["step"] == 4]
    assert values["step"] == 4 and len(logged) == 1
    for key in ("ce_loss", "kl_loss", "top1_agreement", "teacher_entropy", "num_tokens"):
        assert values[key] == pytest.approx(logged[0][key], rel=1e-5, abs=1e-7), key
    code, out, err = cli(["export", *config, "--out", tmp_path / "export"], tmp_path)
    assert code == 0, err
    assert "step 8" in out and (tmp_path / "export" / "model.safetensors").exists()


def test_debug_shows_the_traceback(tmp_path, cli):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError):
        cli(["--debug", "train", TINY, "--set", "loss.alpha=1.5"], tmp_path)

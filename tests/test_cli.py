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

import numpy as np
import pytest

from conftest import ROOT, TINY


def test_demo_writes_comparison_report_and_exports(demo_dir):
    run = demo_dir / "runs" / "tiny-test"
    comparison = json.loads((run / "comparison.json").read_text())
    names = [row["model"] for row in comparison["rows"]]
    assert names == ["teacher", "student (distilled)", "student (hard-labels)"]
    for row in comparison["rows"][1:]:
        assert np.isfinite(row["held-out CE"]) and row["KL to teacher"] >= 0
        assert 0 <= row["top-1 agreement"] <= 1
    assert comparison["cache"]["mode"] == "topk" and comparison["cache"]["bytes_per_token"] > 0
    assert "| model |" in (run / "report.md").read_text()
    for name in ("teacher", "distilled", "hard-labels"):
        export = run / name / "student"
        assert (export / "config.json").exists() and (export / "model.safetensors").exists()


def test_inspect_cache_and_run(demo_dir, cli):
    run = demo_dir / "runs" / "tiny-test"
    code, out, _ = cli(["inspect", run / "cache"], demo_dir)
    assert code == 0
    assert "top-8 log-probs" in out and "bytes/token" in out and "INCOMPLETE" not in out
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
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    popen = lambda: subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
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

    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
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
    assert values["step"] == 4 and np.isfinite(values["ce_loss"]) and values["kl_loss"] >= 0
    code, out, err = cli(["export", *config, "--out", tmp_path / "export"], tmp_path)
    assert code == 0, err
    assert "step 8" in out and (tmp_path / "export" / "model.safetensors").exists()


def test_debug_shows_the_traceback(tmp_path, cli):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError):
        cli(["--debug", "train", TINY, "--set", "loss.alpha=1.5"], tmp_path)

"""The kdpipe CLI end to end at a tiny size: the demo, resume after a kill, inspect, eval,
export, and user errors (exit code 2, one paragraph naming the culprit, nothing touched)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from actors.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny-test.yaml"


def run_cli(args, cwd, capsys):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        code = main([str(a) for a in args])
    finally:
        os.chdir(old)
    out = capsys.readouterr()
    return code, out.out, out.err


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """One whole tiny demo through the CLI (tokenizer, teacher, cache, two students)."""
    work = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "actors.cli", "demo", "--config", str(TINY)],
                          cwd=work, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work


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


def test_inspect_cache_and_run(demo_dir, capsys):
    run = demo_dir / "runs" / "tiny-test"
    code, out, _ = run_cli(["inspect", run / "cache"], demo_dir, capsys)
    assert code == 0
    assert "top-8 log-probs" in out and "bytes/token" in out and "INCOMPLETE" not in out
    code, out, _ = run_cli(["inspect", run / "distilled"], demo_dir, capsys)
    assert code == 0 and "latest      step 8" in out
    code, _, err = run_cli(["inspect", demo_dir], demo_dir, capsys)
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

    proc = popen()
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not any(
            json.loads(line)["step"] >= 5 for line in (run_dir / "metrics.jsonl").read_text().splitlines()):
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


def test_eval_and_export_a_checkpoint(demo_dir, tmp_path, capsys):
    run = demo_dir / "runs" / "tiny-test"
    config = _distill_config(demo_dir, run / "distilled")
    code, out, err = run_cli(["eval", *config, "--step", "4"], tmp_path, capsys)
    assert code == 0, err
    values = json.loads(out)
    assert values["step"] == 4 and np.isfinite(values["ce_loss"]) and values["kl_loss"] >= 0
    code, out, err = run_cli(["export", *config, "--out", tmp_path / "export"], tmp_path, capsys)
    assert code == 0, err
    assert "step 8" in out and (tmp_path / "export" / "model.safetensors").exists()


BAD_CONFIGS = [
    ("unknown key", ["--set", "loss.temprature=2"], "loss.temprature: unknown key"),
    ("did you mean", ["--set", "loss.temprature=2"], "temperature"),
    ("wrong type", ["--set", "train.steps=many"], "train.steps"),
    ("negative learning rate", ["--set", "optimizer.learning_rate=-0.1"], "optimizer.learning_rate"),
    ("temperature 0", ["--set", "loss.temperature=0"], "loss.temperature"),
    ("alpha 1.5", ["--set", "loss.alpha=1.5"], "loss.alpha"),
    ("no cache and no live teacher", ["--set", "cache=null", "--set", "cluster.teacher_source=null"],
     "neither a cache nor a live teacher"),
    ("batch not divisible", ["--set", "train.grad_accum_steps=3"], "grad_accum_steps"),
]


@pytest.mark.parametrize("name,overrides,expected", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_exits_2_naming_the_field(name, overrides, expected, tmp_path, capsys):
    code, out, err = run_cli(["train", TINY, *overrides], tmp_path, capsys)
    assert code == 2
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_bad_input_leaves_existing_run_untouched(demo_dir, tmp_path, capsys):
    """A checkpoint from another config is refused; cache, checkpoints and export unchanged."""
    run = demo_dir / "runs" / "tiny-test"
    before = tree_digest(run)
    config = _distill_config(demo_dir, run / "distilled")
    code, _, err = run_cli(["train", *config, "--set", "loss.alpha=0.7"], tmp_path, capsys)
    assert code == 2 and "another config" in err and "loss.alpha" in err
    code, _, err = run_cli(["train", *config, "--set", "loss.temperature=2.0"], tmp_path, capsys)
    assert code == 2 and "temperature" in err
    assert tree_digest(run) == before


def test_debug_shows_the_traceback(tmp_path, capsys):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError):
        run_cli(["--debug", "train", TINY, "--set", "loss.alpha=1.5"], tmp_path, capsys)

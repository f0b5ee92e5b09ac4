"""Fixtures shared by the CLI tests: ONE tiny demo run per test session, and an in-process
runner of the ``kdpipe`` command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny-test.yaml"
# What the session's demo printed, kept in its directory.
DEMO_OUTPUT = "demo-output.txt"


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """One whole tiny demo through the CLI (tokenizer, teacher, cache, two students), shared by
    every test of the session: read it, or copy it before changing anything."""
    work = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "actors.cli", "demo", "--config", str(TINY)],
                          cwd=work, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (work / DEMO_OUTPUT).write_text(proc.stdout)
    return work


@pytest.fixture
def cli(capsys):
    """``cli(args, cwd) -> (exit code, stdout, stderr)``: ``actors.cli.main`` in this process,
    run from ``cwd``."""
    from actors.cli import main

    def run(args, cwd):
        old = os.getcwd()
        os.chdir(cwd)
        try:
            code = main([str(a) for a in args])
        finally:
            os.chdir(old)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run

"""Fixtures shared by the CLI tests: ONE tiny demo run per test session, and an in-process
runner of the ``kdpipe`` command line; one XLA compilation cache per session for the
processes the tests start; and the ``heavy`` mark that .ci/run runs apart."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny-test.yaml"
# What the session's demo printed, kept in its directory.
DEMO_OUTPUT = "demo-output.txt"
# The directory of the cache made below, for the processes that inherit it.
SESSION_CACHE = "KDPIPE_TEST_COMPILATION_CACHE"

# Every Ray host actor and every `kdpipe` subprocess starts with empty in-memory JAX caches,
# and the integration tests start dozens of them on the same tiny shapes (test_elastic.py
# alone forms a 2-host student group over a dozen times), each compiling the same train and
# eval steps. They inherit this environment, so they share JAX's persistent compilation cache
# (https://docs.jax.dev/en/latest/persistent_compilation_cache.html) in a directory of this
# session, removed at its end: the first process compiles, the others load the executable.
# This process itself keeps only its in-memory caches, as before.
# Under pytest-xdist (`pytest -n 2`, as .ci/run runs the light tests) the workers inherit this
# environment from the main process, which made the cache: one cache for all of them.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _COMPILATION_CACHE = tempfile.mkdtemp(prefix="kdpipe-test-xla-cache-")
    os.environ[SESSION_CACHE] = _COMPILATION_CACHE
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILATION_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # tiny steps compile fast
    # a size limit (never reached) turns on JAX's file lock around each read and write: without
    # one, a host could read an entry that another process is still writing
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(4 << 30)
if os.environ.get(SESSION_CACHE) == os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", None)
# The tests' programs are tiny: compiling them costs far more than running them, and XLA:CPU's
# LLVM optimisations are most of the compile. Every process of the session (this one, xdist
# workers, host actors and subprocesses, which inherit XLA_FLAGS and append theirs) compiles
# without them. The HLO, and so every memory and cost analysis, is unchanged, and LLVM keeps
# float operations in order without fast-math: the tiny demo printed the same losses at both
# levels, in about 0.7x the CPU time, and three compile-bound modules took 53 CPU-s vs 102.
_FAST_COMPILE = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
if _FAST_COMPILE[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join([*_FAST_COMPILE, os.environ.get("XLA_FLAGS", "")]).strip()


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a subprocess: the session's (fast compile, above) without any host device
    count, plus ``devices`` host devices when given."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join(flags + ([f"--xla_force_host_platform_device_count={devices}"]
                             if devices else []))


# The processes the tests start (host actors, `kdpipe` subprocesses) import the project from
# this checkout and session_site/sitecustomize.py at start-up, which lets every process of a
# multi-host JAX program use that cache (rank 0 alone does, as jax ships).
_SITE = [str(ROOT), str(ROOT / "tests" / "session_site")]
if not os.environ.get("PYTHONPATH", "").startswith(os.pathsep.join(_SITE)):
    os.environ["PYTHONPATH"] = os.pathsep.join(_SITE + [p for p in [os.environ.get("PYTHONPATH")] if p])


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: the module runs the session's demo or starts Ray")


def pytest_collection_modifyitems(config, items):
    """Marks ``heavy`` the tests of every module that uses the session's demo or starts Ray:
    minutes each, in several processes whose multi-host runs fail when a host is starved past
    JAX's 30 s gloo set-up deadline. .ci/run runs them in one process, alone, and the others
    on two pytest-xdist workers (`-m "not heavy" -n 2 --dist loadfile`)."""
    heavy = {item.module for item in items
             if "demo_dir" in item.fixturenames or "ray" in vars(item.module)}
    for item in items:
        if item.module in heavy:
            item.add_marker(pytest.mark.heavy)


def pytest_sessionfinish(session, exitstatus):
    if "_COMPILATION_CACHE" in globals():
        shutil.rmtree(_COMPILATION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """One whole tiny demo through the CLI (tokenizer, teacher, cache, two students), shared by
    every test of the session: read it, or copy it before changing anything."""
    work = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "actors.cli", "demo", "--config", str(TINY)],
                          cwd=work, capture_output=True, text=True, timeout=600)
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

"""Checkpoints: round trip, keep N, restore onto another mesh, refusals that touch nothing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipeline.checkpoint import (Checkpoints, RunIdentity, TrainPosition,
                                 _unreport_orbax_reads, read_checkpoint_metas,
                                 tree_signature)
from pipeline.errors import CheckpointError

ROOT = Path(__file__).resolve().parent.parent
IDENTITY = RunIdentity(config_hash="c0ffee", config={"loss": {"temperature": 4.0, "alpha": 0.9},
                                                     "train": {"steps": 10}},
                       model_fingerprint="student-a", dataset_fingerprint="data-a")


def make_state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"params": {"w": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32),
                       "b": jnp.asarray(rng.normal(size=(6,)), jnp.bfloat16)},
            "opt": {"count": jnp.asarray(seed, jnp.int32)}}


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def saved(tmp_path) -> Path:
    """A directory with checkpoints of steps 2, 4, 6 (keep 2: only 4 and 6 remain)."""
    directory = tmp_path / "ckpt"
    with Checkpoints(directory, IDENTITY, keep=2) as checkpoints:
        assert checkpoints.latest_step() is None
        for step in (2, 4, 6):
            position = TrainPosition(step, step * 8, 17, skipped_updates=step // 2,
                                     empty_batches=step // 4)
            checkpoints.save(position, make_state(step))
        checkpoints.wait()
        assert checkpoints.all_steps() == [4, 6]
    return directory


def test_round_trip_of_state_and_position(saved):
    with Checkpoints(saved, IDENTITY) as checkpoints:
        assert checkpoints.latest_step() == 6
        state, position = checkpoints.restore(make_state(0))
        assert position == TrainPosition(6, 48, 17, skipped_updates=3, empty_batches=1)
        old_state, old_position = checkpoints.restore(make_state(0), step=4)
    assert old_position.global_sample_offset == 32
    for got, want in ((state, make_state(6)), (old_state, make_state(4))):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@dataclasses.dataclass(frozen=True)
class PositionBeforeCounts:
    """TrainPosition as checkpoints of an earlier version hold it: a key, no skip counts."""

    step: int
    global_sample_offset: int
    rng_seed: int
    rng_key_data: tuple[int, ...] = (0, 42)


def test_checkpoint_of_an_earlier_version_restores_with_zero_counts(tmp_path):
    with Checkpoints(tmp_path / "ckpt", IDENTITY) as checkpoints:
        checkpoints.save(PositionBeforeCounts(5, 40, 17), make_state(5))
        checkpoints.wait()
        assert "rng_key_data" in checkpoints.read_meta(5)["position"]
        _, position = checkpoints.restore(make_state(0))
    assert position == TrainPosition(5, 40, 17, skipped_updates=0, empty_batches=0)


def test_saving_an_existing_step_is_refused(saved):
    before = snapshot(saved)
    with Checkpoints(saved, IDENTITY) as checkpoints:
        with pytest.raises(CheckpointError, match="step 6 already exists; it is not overwritten"):
            checkpoints.save(TrainPosition(6, 0, 0), make_state(1))
        with pytest.raises(CheckpointError, match=r"no checkpoint of step 5 \(have \[4, 6\]\)"):
            checkpoints.restore(make_state(0), step=5)
    assert snapshot(saved) == before


def test_empty_directory_has_nothing_to_restore(tmp_path):
    with Checkpoints(tmp_path / "none", IDENTITY) as checkpoints:
        with pytest.raises(CheckpointError, match="no checkpoint to restore"):
            checkpoints.restore(make_state(0))
    assert not (tmp_path / "none").exists()  # opening creates nothing


@pytest.mark.parametrize("change, message", [
    (dict(config_hash="bad", config={"loss": {"temperature": 2.0, "alpha": 0.9},
                                     "train": {"steps": 10}}),
     "checkpoint is from another config (hash 'c0ffee', this run's is 'bad'): loss.temperature: "
     "checkpoint has 4.0, this run has 2.0"),
    (dict(model_fingerprint="student-b"),
     "checkpoint is from another model (model fingerprint 'student-a', this run's is 'student-b')"),
    (dict(dataset_fingerprint="data-b"), "checkpoint was trained on another dataset"),
])
def test_checkpoint_of_another_run_is_refused_untouched(saved, change, message):
    before = snapshot(saved)
    identity = RunIdentity(**{**IDENTITY.__dict__, **change})
    with pytest.raises(CheckpointError) as info:
        Checkpoints(saved, identity)
    assert message in str(info.value)
    assert snapshot(saved) == before


def test_target_of_another_shape_names_the_leaf(saved):
    target = make_state(0)
    target["params"]["w"] = jnp.zeros((4, 7))
    with Checkpoints(saved, IDENTITY) as checkpoints:
        with pytest.raises(CheckpointError, match=r"\['params'\]\['w'\]: checkpoint \(\[4, 6\], "
                                                  r"'float32'\), target \(\[4, 7\], 'float32'\)"):
            checkpoints.restore(target)
    assert tree_signature(make_state(0))[0] == ["['opt']['count']", [], "int32"]


def test_looped_layers_restored_as_stacked_name_scan_layers(tmp_path):
    w = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    looped = {"params": {"layers": [{"w": jnp.asarray(w[0])}, {"w": jnp.asarray(w[1])}]}}
    with Checkpoints(tmp_path / "ckpt", IDENTITY) as checkpoints:
        checkpoints.save(TrainPosition(1, 8, 0), looped)
        checkpoints.wait()
        with pytest.raises(CheckpointError, match=r"model.student.scan_layers: the checkpoint was "
                                                  r"saved with scan_layers=false, this run has true"):
            checkpoints.restore({"params": {"layers": {"w": jnp.asarray(w)}}})
        with pytest.raises(CheckpointError) as error:  # another mismatch: no such hint
            checkpoints.restore({"params": {"layers": [{"w": jnp.asarray(w[0])}]}})
        assert "scan_layers" not in str(error.value)


def _corrupt_state(step_dir: Path) -> None:
    """Flip bytes in the middle of every data file of the state item."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for path in files:
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 16] = bytes(b ^ 0x5A for b in data[middle:middle + 16])
        path.write_bytes(bytes(data))


def test_corrupt_state_is_an_error_not_a_fresh_start(saved, monkeypatch):
    def hook(unraisable):
        sys.__unraisablehook__(unraisable)

    monkeypatch.setattr(sys, "unraisablehook", hook)
    _corrupt_state(saved / "6")
    before = snapshot(saved)
    with Checkpoints(saved, IDENTITY) as checkpoints:
        assert checkpoints.latest_step() == 6
        with pytest.raises(CheckpointError, match=r"ckpt/6: corrupt checkpoint, its state cannot be "
                                                  r"read"):
            checkpoints.restore(make_state(0))
    assert snapshot(saved) == before
    # From the failure on, Orbax's abandoned reads are filtered, in front of the hook there was
    assert sys.unraisablehook is not hook and sys.unraisablehook.drops_orbax_reads


def _suspended_coroutine(filename: str):
    """A coroutine compiled as if from ``filename``, suspended inside a ``try`` whose
    ``finally`` raises: when it is collected, Python reports an unraisable RuntimeError, as it
    does for Orbax's failed reads."""
    namespace = {}
    exec(compile(textwrap.dedent("""
        import types

        @types.coroutine
        def pause():
            yield

        async def read():
            try:
                await pause()
            finally:
                raise RuntimeError("failed read")
        """), filename, "exec"), namespace)
    coroutine = namespace["read"]()
    coroutine.send(None)
    return coroutine


def test_reading_metas_quiets_orbax_and_leaves_the_absl_level_as_it_was(saved):
    absl = logging.getLogger("absl")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    level = absl.level
    absl.addHandler(handler)
    absl.setLevel(logging.INFO)
    try:
        metas = read_checkpoint_metas(saved)
        after = absl.level
    finally:
        absl.removeHandler(handler)
        absl.setLevel(level)
    assert sorted(metas) == [4, 6] and metas[6]["position"]["step"] == 6
    assert after == logging.INFO
    # Orbax's warnings that a read-only manager saves nothing are not shown
    assert not [r.getMessage() for r in records if r.levelno >= logging.WARNING]


def test_after_a_failed_restore_only_orbax_reads_are_unreported(monkeypatch):
    reported = []
    monkeypatch.setattr(sys, "unraisablehook",
                        lambda unraisable: reported.append(unraisable.object.cr_code.co_filename))
    orbax_file = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "reads.py")
    _suspended_coroutine(orbax_file)  # before any failure every report goes through
    assert reported == [orbax_file]
    _unreport_orbax_reads()
    filtering = sys.unraisablehook
    _unreport_orbax_reads()  # a second failure installs no second filter
    assert sys.unraisablehook is filtering
    _suspended_coroutine(orbax_file)
    _suspended_coroutine("elsewhere.py")  # not Orbax's: reported
    assert reported == [orbax_file, "elsewhere.py"]


def test_corrupt_metadata_is_refused_at_open(saved):
    meta = next(p for p in (saved / "4" / "meta").iterdir() if p.name != "commit_success.txt")
    meta.write_text("{not json")
    before = snapshot(saved)
    with pytest.raises(CheckpointError, match=r"ckpt/4: corrupt checkpoint, its metadata cannot"):
        Checkpoints(saved, IDENTITY)
    meta.write_text(json.dumps({"unrelated": 1}))
    with pytest.raises(CheckpointError, match="ckpt/4: corrupt checkpoint or not a kdpipe"):
        Checkpoints(saved, IDENTITY)
    assert set(snapshot(saved)) == set(before)


_RESHARD = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                        "--xla_force_host_platform_device_count=" + sys.argv[2]]).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from pipeline.checkpoint import Checkpoints, RunIdentity, TrainPosition
    identity = RunIdentity("h", {}, "m")
    devices = np.array(jax.devices())
    w = np.arange(48, dtype=np.float32).reshape(8, 6)
    if sys.argv[3] == "save":  # 4 devices: rows split 4 ways
        mesh = Mesh(devices, ("data",))
        state = {"w": jax.device_put(w, NamedSharding(mesh, P("data", None))),
                 "b": jax.device_put(np.ones(6, np.float32), NamedSharding(mesh, P()))}
        with Checkpoints(sys.argv[1], identity) as c:
            c.save(TrainPosition(3, 96, 0), state)
    else:  # 2x1 devices, columns split: another mesh and another layout
        mesh = Mesh(devices.reshape(2, 1), ("fsdp", "tensor"))
        target = {"w": jax.ShapeDtypeStruct((8, 6), jnp.float32,
                                            sharding=NamedSharding(mesh, P(None, "fsdp"))),
                  "b": jax.ShapeDtypeStruct((6,), jnp.float32, sharding=NamedSharding(mesh, P()))}
        with Checkpoints(sys.argv[1], identity) as c:
            state, position = c.restore(target)
        assert position.global_sample_offset == 96
        assert state["w"].sharding == target["w"].sharding
        shards = sorted((s.index[1].start, np.asarray(s.data).shape) for s in state["w"].addressable_shards)
        assert shards == [(0, (8, 3)), (3, (8, 3))], shards
        np.testing.assert_array_equal(np.asarray(state["w"]), w)
        print("RESHARD OK")
""")


def test_restore_onto_another_mesh(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    directory = str(tmp_path / "ckpt")
    for devices, mode in (("4", "save"), ("2", "restore")):
        result = subprocess.run([sys.executable, "-c", _RESHARD, directory, devices, mode],
                                env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "RESHARD OK" in result.stdout

"""Sharding rules and mesh; loading onto a 2-device CPU mesh runs in a subprocess (the device
count is fixed when JAX starts)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import xla_flags
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from pipeline.config import MESH_AXES
from pipeline.errors import ConfigError
from pipeline.models.hf_io import load_pretrained, read_config
from pipeline.models.llama import Llama
from pipeline.models.sharding import DEFAULT_RULES, make_mesh, param_path, spec_for

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
MESH = AbstractMesh((2, 2, 4), MESH_AXES)  # data, fsdp, tensor


@pytest.mark.parametrize("path, shape, spec", [
    ("embedder/embedding_vd", (128, 32), P("tensor", "fsdp")),
    ("lm_head_vd", (128, 32), P("tensor", "fsdp")),
    ("layers/0/attn/q_dnh", (32, 8, 16), P("fsdp", "tensor", None)),
    ("layers/11/attn/k_dkh", (32, 4, 16), P("fsdp", "tensor", None)),
    # 2 key/value heads cannot be split 4 ways: that dimension is replicated
    ("layers/11/attn/v_dkh", (32, 2, 16), P("fsdp", None, None)),
    ("layers/3/attn/q_bias_nh", (8, 16), P("tensor", None)),
    ("layers/3/attn/o_nhd", (8, 16, 32), P("tensor", None, "fsdp")),
    ("layers/0/mlp/gate_df", (32, 64), P("fsdp", "tensor")),
    ("layers/0/mlp/up_df", (31, 64), P(None, "tensor")),
    ("layers/0/mlp/down_fd", (64, 32), P("tensor", "fsdp")),
    ("layers/0/attn/q_norm/scale", (16,), P()),
    ("final_norm/scale", (32,), P()),
])
def test_default_rules(path, shape, spec):
    assert spec_for(path, shape, MESH) == spec


@pytest.mark.parametrize("name", NAMES)
def test_rules_cover_every_parameter_of_every_variant(name):
    model = nnx.eval_shape(lambda: Llama(read_config(FIXTURES / name), rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(model)):
        spec = spec_for(param_path(path), var.shape, MESH)  # raises if no rule matches
        # every matrix is split on some axis; only 1-D parameters (norm scales) are replicated
        assert (len(var.shape) == 1) == (spec == P()), (path, spec)


def test_bad_rules():
    with pytest.raises(ConfigError, match="no rule matches parameter 'layers/0/attn/w'"):
        spec_for("layers/0/attn/w", (4, 4), MESH)
    rules = ((r"q_dnh$", P("fsdp", "tensor")),) + DEFAULT_RULES
    with pytest.raises(ConfigError, match=r"rule 'q_dnh\$' gives .* of rank 2 for parameter "
                                          r"'layers/0/attn/q_dnh' of shape \(32, 8, 16\)"):
        spec_for("layers/0/attn/q_dnh", (32, 8, 16), MESH, rules)


def test_load_refuses_rules_that_miss_a_parameter():
    rules = tuple(rule for rule in DEFAULT_RULES if "mlp" not in rule[0])
    with pytest.raises(ConfigError, match="no rule matches parameter 'layers/0/mlp/"):
        load_pretrained(FIXTURES / "llama_gqa_tied", mesh=make_mesh(), rules=rules)


def test_one_device_mesh_load_matches_plain_load():
    plain = load_pretrained(FIXTURES / "qwen2_bias")
    sharded = load_pretrained(FIXTURES / "qwen2_bias", mesh=make_mesh())
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(plain)),
                                 nnx.to_flat_state(nnx.state(sharded))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()),
                                      err_msg=str(path))


def test_make_mesh_checks_sizes():
    mesh = make_mesh()  # one CPU device here
    assert mesh.axis_names == MESH_AXES and mesh.devices.shape == (1, 1, 1)
    with pytest.raises(ConfigError, match=r"data\*fsdp\*tensor \(2\*-1\*1\) must equal the number "
                                          "of devices, 1"):
        make_mesh(data=2)
    with pytest.raises(ConfigError, match="at most one -1"):
        make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ConfigError, match="expected positive axis sizes"):
        make_mesh(tensor=0)


_TWO_DEVICES = textwrap.dedent("""
    import json, sys, tempfile
    from pathlib import Path
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding
    from pipeline.models.hf_io import load_pretrained, save_pretrained
    from pipeline.models.llama import Llama
    from pipeline.models.sharding import BATCH_SPEC, make_mesh, param_path, shard_model, spec_for

    fixtures = Path(sys.argv[1])
    report = {"devices": jax.device_count(), "results": []}

    def check_layout(model, mesh):
        wrong, split = [], 0
        for path, var in nnx.to_flat_state(nnx.state(model)):
            value = var.get_value()
            spec = spec_for(param_path(path), value.shape, mesh)
            local = value.sharding.shard_shape(value.shape)
            if value.sharding.spec != spec or value.sharding.mesh != mesh or any(
                    shard.data.shape != local for shard in value.addressable_shards):
                wrong.append(param_path(path))
            split += local != value.shape
        return wrong, split

    @jax.jit
    def logits(graphdef, state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask).logits

    for name in sys.argv[2:]:
        ref = np.load(fixtures / f"{name}.npz")
        for axes in ({"fsdp": 2, "tensor": 1}, {"fsdp": 1, "tensor": 2}):
            mesh = make_mesh(data=1, **axes)
            model = load_pretrained(fixtures / name, mesh=mesh)
            wrong, split = check_layout(model, mesh)
            batch = NamedSharding(mesh, BATCH_SPEC)
            ids = jax.device_put(ref["input_ids"], batch)
            mask = jax.device_put(ref["attention_mask"], batch)
            out = np.asarray(logits(*nnx.split(model), ids, mask))
            real = ref["attention_mask"].astype(bool)
            report["results"].append(dict(
                name=name, axes=axes, wrong=wrong, split=int(split),
                max_diff=float(np.abs(out - ref["logits"])[real].max())))

    # A fresh model sharded in place, saved (gathered) and loaded back without a mesh.
    mesh = make_mesh(data=1, fsdp=1, tensor=2)
    model = load_pretrained(fixtures / sys.argv[2])
    fresh = Llama(model.config, rngs=nnx.Rngs(1))
    shard_model(fresh, mesh)
    wrong, split = check_layout(fresh, mesh)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(fresh, tmp)
        back = load_pretrained(tmp)
    same = all(np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
               for (_, a), (_, b) in zip(nnx.to_flat_state(nnx.state(fresh)),
                                         nnx.to_flat_state(nnx.state(back))))
    report["fresh"] = dict(wrong=wrong, split=int(split), round_trip_identical=same)
    print("REPORT" + json.dumps(report))
""")


_TWO_PROCESSES = textwrap.dedent("""
    import sys
    from pathlib import Path
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding
    from safetensors.numpy import load_file
    from pipeline.models.hf_io import load_pretrained, save_pretrained
    from pipeline.models.sharding import BATCH_SPEC, make_mesh

    coordinator, process_id, fixture, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=2, process_id=process_id,
                               initialization_timeout=120)
    mesh = make_mesh(fsdp=2)  # one device per process
    model = load_pretrained(fixture, mesh=mesh)
    ref = np.load(fixture + ".npz")
    batch = NamedSharding(mesh, BATCH_SPEC)
    ids, mask = (jax.make_array_from_callback(ref[key].shape, batch, lambda i, key=key: ref[key][i])
                 for key in ("input_ids", "attention_mask"))
    logits = jax.jit(lambda g, s, i, m: nnx.merge(g, s)(i, m).logits)(*nnx.split(model), ids, mask)
    (shard,) = logits.addressable_shards  # this process's row of the batch
    real = ref["attention_mask"][shard.index[0]].astype(bool)
    diff = np.abs(np.asarray(shard.data) - ref["logits"][shard.index])[real].max()
    assert diff <= 1e-4, diff
    save_pretrained(model, out_dir)  # gathers across both processes; process 0 writes
    if process_id == 0:
        ours, theirs = load_file(Path(out_dir) / "model.safetensors"), load_file(Path(fixture) / "model.safetensors")
        assert ours.keys() == theirs.keys()
        for key in ours:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    print("OK", process_id, diff)
""")


def test_two_processes_load_and_save(tmp_path):
    """Two JAX processes (as two hosts): each builds only its own slices of the parameters,
    runs its row of the batch, and the save gathers the whole model into one checkpoint."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{sock.getsockname()[1]}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}  # one device each
    fixture = str(FIXTURES / "llama_gqa_tied")
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, coordinator, str(i), fixture,
                               str(tmp_path / "saved")], env=env, cwd=Path(__file__).parents[1],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr[-3000:]
        assert stdout.splitlines()[-1].startswith("OK")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["config.json",
                                                                      "model.safetensors"]


def test_two_device_mesh_loads_sharded_and_matches_transformers():
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": xla_flags(2)}
    proc = subprocess.run([sys.executable, "-c", _TWO_DEVICES, str(FIXTURES), *NAMES],
                          env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT", 1)[1])
    assert report["devices"] == 2
    assert len(report["results"]) == 2 * len(NAMES)
    for result in report["results"]:
        assert result["wrong"] == [], result
        # the matrices are split (k/v stay whole on the tensor axis when there is one kv head)
        assert result["split"] >= 12, result
        assert result["max_diff"] <= 1e-4, result
    assert report["fresh"] == dict(wrong=[], split=report["fresh"]["split"],
                                   round_trip_identical=True)
    assert report["fresh"]["split"] >= 12

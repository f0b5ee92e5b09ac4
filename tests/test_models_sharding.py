"""Sharding rules and mesh; loading onto a 2-device CPU mesh runs in a subprocess (the device
count is fixed when JAX starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from pipeline.errors import ConfigError
from pipeline.models.hf_io import read_config
from pipeline.models.llama import Llama
from pipeline.models.sharding import (DEFAULT_RULES, MESH_AXES, make_mesh, param_path,
                                      spec_for)

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
        spec = spec_for(param_path(path), var.shape, MESH)
        assert len(spec) in (0, len(var.shape))


def test_bad_rules():
    with pytest.raises(ConfigError, match="no rule matches parameter 'layers/0/attn/w'"):
        spec_for("layers/0/attn/w", (4, 4), MESH)
    rules = ((r"q_dnh$", P("fsdp", "tensor")),) + DEFAULT_RULES
    with pytest.raises(ConfigError, match=r"rule 'q_dnh\$' gives .* of rank 2 for parameter "
                                          r"'layers/0/attn/q_dnh' of shape \(32, 8, 16\)"):
        spec_for("layers/0/attn/q_dnh", (32, 8, 16), MESH, rules)


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


def test_two_device_mesh_loads_sharded_and_matches_transformers():
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run([sys.executable, "-c", _TWO_DEVICES, str(FIXTURES), *NAMES],
                          env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT", 1)[1])
    assert report["devices"] == 2
    assert len(report["results"]) == 2 * len(NAMES)
    for result in report["results"]:
        assert result["wrong"] == [], result
        # every matrix and the embedding are split on either axis (norms stay replicated)
        assert result["split"] >= 12, result
        assert result["max_diff"] <= 1e-4, result
    assert report["fresh"] == dict(wrong=[], split=report["fresh"]["split"],
                                   round_trip_identical=True)
    assert report["fresh"]["split"] >= 12

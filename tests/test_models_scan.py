"""Scanned layers and rematerialisation (pipeline.models.stack): the same numbers as the looped
model without checkpointing, the same Hugging Face checkpoint on disk, less compiled memory."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors import safe_open

from pipeline.errors import ConfigError
from pipeline.models.hf_io import INDEX_FILE, SINGLE_FILE, load_pretrained, save_pretrained
from pipeline.models.llama import Llama, LlamaConfig
from pipeline.models.sharding import make_mesh, spec_for
from pipeline.models.stack import REMAT_POLICIES
from pipeline.step import TrainState, jit_distillation_step

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
CPU_REMAT = [r for r in REMAT_POLICIES if r != "offload"]  # offload is refused on CPU


def _tiny(**overrides) -> LlamaConfig:
    fields = dict(model_type="llama", vocab_size=48, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  tie_word_embeddings=False)
    return LlamaConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def looped_dir(tmp_path_factory) -> Path:
    """A random tiny looped model saved as a Hugging Face checkpoint."""
    path = tmp_path_factory.mktemp("looped")
    save_pretrained(Llama(_tiny(), rngs=nnx.Rngs(3)), path)
    return path


def _inputs(seed=0, batch=2, seq=7, vocab=48):
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int32)
    mask[1, :2] = 0  # a left-padded row
    return jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32), jnp.asarray(mask)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _forward(graphdef, state, ids, mask, attentions):
    return nnx.merge(graphdef, state)(ids, mask, output_hidden_states=True,
                                      output_attentions=attentions)


def _run(model, ids, mask, attentions=True):
    return _forward(*nnx.split(model), ids, mask, attentions)


def _max_diff(a, b) -> float:
    return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_scanned_parameters_are_stacked_and_match_the_loop(looped_dir):
    looped = load_pretrained(looped_dir)
    scanned = load_pretrained(looped_dir, scan_layers=True)
    q = nnx.state(scanned)["layers"]["attn"]["q_dnh"]
    assert q.shape == (3, 32, 4, 8)
    for i in range(3):
        np.testing.assert_array_equal(q[...][i], looped.layers[i].attn.q_dnh[...])
    ids, mask = _inputs()
    ours, theirs = _run(scanned, ids, mask), _run(looped, ids, mask)
    assert len(ours.hidden_states) == 4 and len(ours.attentions) == 3
    assert _max_diff(ours.logits, theirs.logits) <= 1e-6
    assert _max_diff(ours.hidden_states, theirs.hidden_states) <= 1e-6
    assert _max_diff(ours.attentions, theirs.attentions) <= 1e-6
    np.testing.assert_array_equal(ours.hidden_states[-1], ours.last_hidden_state)


def test_a_scanned_model_initialises_each_layer_apart():
    down = nnx.state(Llama(_tiny(), scan_layers=True, rngs=nnx.Rngs(0)))["layers"]["mlp"]["down_fd"]
    assert down.shape == (3, 64, 32)
    layers = np.asarray(down[...])
    assert not np.allclose(layers[0], layers[1]) and np.isfinite(layers).all()
    assert abs(layers.std() - _tiny().initializer_range) < 0.005


@pytest.mark.parametrize("name", ["llama_gqa_tied", "mistral_sliding_window"])
def test_scanned_fixture_matches_transformers(name):
    ref = dict(np.load(FIXTURES / f"{name}.npz"))
    model = load_pretrained(FIXTURES / name, scan_layers=True, remat="full")
    out = _run(model, jnp.asarray(ref["input_ids"]), jnp.asarray(ref["attention_mask"]),
               attentions=False)
    real = ref["attention_mask"].astype(bool)
    assert np.abs(np.asarray(out.logits) - ref["logits"])[real].max() <= 1e-4
    for ours, theirs in zip(out.hidden_states, ref["hidden_states"], strict=True):
        assert np.abs(np.asarray(ours) - theirs)[real].max() <= 1e-4


def _tensors(path: Path) -> dict[str, np.ndarray]:
    files = sorted(path.glob("*.safetensors"))
    out = {}
    for file in files:
        with safe_open(file, framework="numpy") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


def test_scanned_save_writes_the_looped_checkpoint(looped_dir, tmp_path):
    scanned = load_pretrained(looped_dir, scan_layers=True)
    save_pretrained(scanned, tmp_path / "one")
    save_pretrained(scanned, tmp_path / "sharded", max_shard_bytes=20_000)
    save_pretrained(load_pretrained(looped_dir), tmp_path / "looped", max_shard_bytes=20_000)
    expected = _tensors(looped_dir)
    for saved in (tmp_path / "one", tmp_path / "sharded"):
        got = _tensors(saved)
        assert sorted(got) == sorted(expected)
        for name, value in expected.items():
            np.testing.assert_array_equal(got[name], value, err_msg=name)
    assert (tmp_path / "one" / SINGLE_FILE).is_file()
    # the same tensors in the same files, in the same order
    assert ((tmp_path / "sharded" / INDEX_FILE).read_text()
            == (tmp_path / "looped" / INDEX_FILE).read_text())
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    # and a scanned model loads what it wrote, on a mesh too
    again = load_pretrained(tmp_path / "sharded", scan_layers=True,
                            mesh=make_mesh(devices=jax.devices()[:1]))
    assert _max_diff(nnx.state(again), nnx.state(scanned)) == 0


def test_stacked_parameters_keep_their_layer_axis_unsharded():
    mesh = make_mesh(devices=jax.devices()[:1])
    looped = spec_for("layers/0/attn/q_dnh", (32, 4, 8), mesh)
    assert spec_for("layers/attn/q_dnh", (3, 32, 4, 8), mesh) == jax.sharding.PartitionSpec(
        None, *looped)
    assert spec_for("layers/input_norm/scale", (3, 32), mesh) == jax.sharding.PartitionSpec()
    with pytest.raises(ConfigError, match="rank"):
        spec_for("layers/attn/q_dnh", (32, 4, 8), mesh)


def _loss(graphdef, params, ids, mask):
    out = nnx.merge(graphdef, params)(ids, mask, output_hidden_states=True)
    return jnp.mean(out.logits ** 2) + jnp.mean(out.hidden_states[1] ** 2)


def _stacked(grads, scan_layers):
    """Per-layer gradients stacked as a scanned model's, for comparison."""
    layers = grads["layers"]
    if not scan_layers:
        layers = jax.tree.map(lambda *g: jnp.stack(g), *[layers[i] for i in sorted(layers)])
    return {**grads, "layers": layers}


def test_every_remat_policy_gives_the_same_gradients(looped_dir):
    ids, mask = _inputs(1)
    grads = {}
    # each policy once, scanned and looped: (scan_layers, remat)
    for key in ((False, "none"), (False, "save_dots"), (True, "full"), (True, "none")):
        graphdef, params = nnx.split(load_pretrained(looped_dir, scan_layers=key[0],
                                                     remat=key[1]))
        grads[key] = _stacked(nnx.to_pure_dict(jax.jit(jax.grad(_loss, argnums=1),
                                                       static_argnums=0)(
            graphdef, params, ids, mask)), key[0])
    assert {remat for _, remat in grads} == set(CPU_REMAT)
    for key, value in grads.items():
        assert _max_diff(value, grads[False, "none"]) <= 1e-6, key


def test_offload_is_refused_on_cpu_naming_the_field():
    with pytest.raises(ConfigError, match=r"remat: 'offload'.*cpu"):
        Llama(_tiny(), remat="offload", rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="remat: expected one of"):
        Llama(_tiny(), remat="some", rngs=nnx.Rngs(0))


def test_full_remat_compiles_to_less_temporary_memory():
    config = _tiny(vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=4, head_dim=32)
    ids = jax.ShapeDtypeStruct((4, 256), jnp.int32)
    temp = {}
    for remat in ("none", "full"):
        graphdef, params = nnx.split(nnx.eval_shape(
            lambda: Llama(config, scan_layers=True, remat=remat, attention="xla",
                          rngs=nnx.Rngs(0))))
        loss = lambda params, ids: jnp.mean(nnx.merge(graphdef, params)(ids).logits ** 2)
        compiled = jax.jit(jax.grad(loss)).lower(params, ids).compile()
        temp[remat] = compiled.memory_analysis().temp_size_in_bytes
    assert temp["full"] < 0.7 * temp["none"], temp


def test_a_train_step_gives_the_same_loss_scanned(looped_dir):
    ids, mask = _inputs(2)
    rng = np.random.default_rng(2)
    labels = np.where(rng.random(ids.shape) < 0.2, -100, rng.integers(0, 48, ids.shape))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": jnp.asarray(labels, jnp.int32)}
    results = {}
    teacher = TrainState.create(Llama(_tiny(), rngs=nnx.Rngs(9)))
    for scan_layers, remat in ((False, "none"), (True, "full")):
        state = TrainState.create(load_pretrained(looped_dir, scan_layers=scan_layers,
                                                  remat=remat), optax.sgd(0.1))
        new_state, metrics = jit_distillation_step(
            state, batch, teacher, temperature=2.0, hidden_state_weight=0.5,
            hidden_state_layers=(1, -1), attention_weight=1.0, attention_layers=(0,))
        results[scan_layers, remat] = (metrics, new_state.model())
    base_metrics, base_model = results[False, "none"]
    for key, (metrics, model) in results.items():
        for name, value in base_metrics.as_dict().items():
            assert abs(float(metrics.as_dict()[name]) - float(value)) <= 1e-6 * max(
                1.0, abs(float(value))), (key, name)
        assert float(metrics.grad_norm) > 1e-3
        for i in range(3):
            layer = model.layers if key[0] else model.layers[i]
            q = layer.attn.q_dnh[...][i] if key[0] else layer.attn.q_dnh[...]
            np.testing.assert_allclose(q, base_model.layers[i].attn.q_dnh[...], atol=1e-6)

"""Mixed precision: float32 master weights (parameters and optimizer state, ``param_dtype``)
under bfloat16 computation (``dtype``), in training, Hugging Face loading and export."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

from pipeline.config import ModelConfig, ModelSpec
from pipeline.errors import ConfigError
from pipeline.models.build import build_model
from pipeline.models.hf_io import SINGLE_FILE, load_pretrained, save_pretrained
from pipeline.models.sharding import make_mesh
from pipeline.step import TrainState, jit_distillation_step

VOCAB, SEQ, STEPS = 48, 8, 4
FIXTURES = Path(__file__).parent / "fixtures" / "hf"
# AdamW's first updates are about lr * sign(gradient) per parameter: 1e-5 is far below half
# the bfloat16 spacing of the RMSNorm scales (1.0: 2^-8 below, 2^-7 above) and of most
# matrix entries (std 0.02: spacing 2^-13 ~ 1.2e-4), so bfloat16 parameters round it away.
TX = optax.adamw(1e-5)


def spec(**dtypes) -> ModelSpec:
    return ModelSpec(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, max_position_embeddings=SEQ, **dtypes)


def batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, VOCAB, (4, SEQ)).astype(np.int32),
            "teacher_logits": (3 * rng.standard_normal((4, SEQ, VOCAB))).astype(np.float32)}


def movement(model_spec: ModelSpec) -> tuple[TrainState, dict[str, np.ndarray]]:
    """The state after STEPS AdamW steps from the same initial weights, and how far each
    parameter moved (float64)."""
    state = TrainState.create(build_model(model_spec, VOCAB, 0, make_mesh()), TX)
    start = {k: np.asarray(v, np.float64) for k, v in nnx.to_flat_state(state.params)}
    for step in range(STEPS):
        state, metrics = jit_distillation_step(state, batch(step), None)
        assert int(metrics.skipped_updates) == 0
    end = {k: np.asarray(v, np.float64) for k, v in nnx.to_flat_state(state.params)}
    return state, {k: end[k] - start[k] for k in start}


def relative_error(got: dict, want: dict) -> float:
    diff = np.sqrt(sum(np.sum((got[k] - want[k]) ** 2) for k in want))
    return float(diff / np.sqrt(sum(np.sum(want[k] ** 2) for k in want)))


@pytest.fixture(scope="module")
def float32_run():
    return movement(spec(dtype="float32"))


def test_bfloat16_student_keeps_float32_master_weights_and_follows_the_float32_run(float32_run):
    state, moved = movement(spec(dtype="bfloat16"))  # param_dtype unset: float32
    assert {v.dtype for v in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
    assert {v.dtype for v in jax.tree.leaves(state.opt_state) if v.ndim} == {jnp.dtype("float32")}
    out = state.model()(jnp.asarray(batch(0)["input_ids"]))
    assert out.last_hidden_state.dtype == jnp.bfloat16 and out.logits.dtype == jnp.float32
    # Every parameter moved, by a fair share of lr per step (the batches, and so the
    # gradients' signs, differ from step to step: 1.6e-5 to 2.9e-5 medians measured over 4 steps).
    _, want = float32_run
    assert all(np.median(np.abs(m)) > STEPS * 1e-5 / 4 for m in moved.values())
    # Adam normalises each coordinate's step to ~lr·sign(gradient); bfloat16 computation (8
    # significant bits) changes a gradient's sign only where it is tiny next to its rounding
    # error, so the two runs' movements agree up to a few percent (0.038 measured; bfloat16
    # parameters: 0.95, nearly every update lost).
    assert relative_error(moved, want) < 0.15


def test_bfloat16_parameters_lose_the_same_updates(float32_run):
    """The control: the same run with bfloat16 parameters (the teacher's layout) drops the
    updates, so the test above would catch master weights that are not float32."""
    state, moved = movement(spec(dtype="bfloat16", param_dtype="bfloat16"))
    assert {v.dtype for v in jax.tree.leaves(state.params)} == {jnp.dtype("bfloat16")}
    assert relative_error(moved, float32_run[1]) > 0.5


def test_hf_weights_load_into_float32_params_compute_and_export_in_bfloat16(tmp_path):
    save_pretrained(load_pretrained(FIXTURES / "qwen2_bias", dtype="bfloat16"), tmp_path / "bf16")
    stored = load_file(tmp_path / "bf16" / SINGLE_FILE)
    master = load_pretrained(tmp_path / "bf16", dtype="bfloat16", param_dtype="float32")
    plain = load_pretrained(tmp_path / "bf16", dtype="bfloat16")
    for (path, var), (_, bf16) in zip(nnx.to_flat_state(nnx.state(master)),
                                      nnx.to_flat_state(nnx.state(plain))):
        assert var.get_value().dtype == jnp.float32, path
        np.testing.assert_array_equal(var.get_value(), np.asarray(bf16.get_value(), np.float32))
    # Storage only: bfloat16 weights held in float32 give the same bfloat16 computation.
    ids = jnp.asarray(batch(1)["input_ids"]) % master.config.vocab_size
    np.testing.assert_array_equal(master(ids).logits, plain(ids).logits)
    save_pretrained(master, tmp_path / "export")
    hf = json.loads((tmp_path / "export" / "config.json").read_text())
    assert hf["dtype"] == hf["torch_dtype"] == "bfloat16"
    exported = load_file(tmp_path / "export" / SINGLE_FILE)
    assert exported.keys() == stored.keys()
    for name, tensor in stored.items():
        assert exported[name].dtype == tensor.dtype, name
        np.testing.assert_array_equal(exported[name].view(np.uint16), tensor.view(np.uint16))


def test_teacher_param_dtype_is_refused():
    student = spec()
    assert student.param_dtype is None
    with pytest.raises(ConfigError, match=r"model\.teacher\.param_dtype: .*never updated"):
        ModelConfig(teacher=spec(param_dtype="float32"), student=student)
    with pytest.raises(ConfigError, match=r"param_dtype: expected one of"):
        load_pretrained(FIXTURES / "qwen2_bias", param_dtype="int8")

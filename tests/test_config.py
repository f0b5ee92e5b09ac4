"""Config loading, checking, hashing, reference doc, and the optimizer built from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipeline.config import (MESH_AXES, LossConfig, MeshConfig, OptimizerConfig, RunConfig,
                             config_from_dict, config_hash, config_to_dict, load_config,
                             render_reference)
from pipeline.errors import ConfigError
from pipeline.optim import build_optimizer, build_schedule

ROOT = Path(__file__).resolve().parent.parent
STUDENT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4}
BASE = {"model": {"student": STUDENT}, "cache": {"path": "c"}}


def make(*overrides: str) -> RunConfig:
    return config_from_dict(BASE, overrides)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.train.steps > 0
    assert config_hash(config) == config_hash(load_config(path))


def test_defaults_and_types():
    config = make("optimizer.learning_rate=1e-3", "loss.hidden_state_layers=[1, -1]",
                  "loss.temperature=2", "loss.hidden_state_loss=cosine")
    assert config.optimizer.learning_rate == 1e-3  # YAML 1.1 reads 1e-3 as a string
    assert config.loss.hidden_state_layers == (1, -1)
    assert config.loss.hidden_state_loss == "cosine"
    assert isinstance(config.loss.temperature, float)
    assert config.teacher_source == "offline"
    assert config.cache_temperature == config.loss.temperature == 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.loss.temperature = 3.0


@pytest.mark.parametrize("overrides, message", [
    (["loss.temprature=2"], "loss.temprature: unknown key; did you mean 'temperature'?"),
    (["trian.steps=3"], "trian: unknown key; did you mean 'train'?"),
    (["cluster.student.hots=2"], "cluster.student.hots: unknown key; did you mean 'hosts'?"),
    (["train.steps=ten"], "train.steps: expected an integer, got str 'ten'"),
    (["train.steps=2.5"], "train.steps: expected an integer, got 2.5"),
    (["train.steps=true"], "train.steps: expected an integer, got True"),
    (["loss.use_hard_labels=1"], "loss.use_hard_labels: expected true or false, got 1"),
    (["data.sources=a.txt"], "data.sources: expected a list"),
    (["loss=3"], "loss: expected a section"),
    (["optimizer.learning_rate=-0.001"], "optimizer.learning_rate: expected > 0, got -0.001"),
    (["loss.temperature=0"], "loss.temperature: expected > 0, got 0"),
    (["loss.alpha=1.5"], "loss.alpha: expected <= 1, got 1.5"),
    (["data.seq_len=0"], "data.seq_len: expected > 0, got 0"),
    (["data.eval_fraction=1"], "data.eval_fraction: expected < 1, got 1"),
    (["loss.divergence=forward_kld"], "loss.divergence: expected one of 'forward_kl', "
                                      "'reverse_kl', 'jsd', got str 'forward_kld'; did you mean "
                                      "'forward_kl'?"),
    (["loss.hidden_state_loss=l1"], "loss.hidden_state_loss: expected one of 'mse', 'cosine', "
                                    "got str 'l1'"),
    (["cache=null"], "neither a cache nor a live teacher is configured"),
    (["cluster.teacher_source=hybrid", "cache=null"], "cluster.teacher_source 'hybrid' reads"),
    (["cluster.teacher_source=live"], "model.teacher: cluster.teacher_source 'live' runs the "
                                      "teacher, but model.teacher has neither"),
    (["train.grad_accum_steps=3"], "train.grad_accum_steps (3) must divide "
                                   "train.global_batch_size (32)"),
    (["cluster.student.hosts=3"], "train.global_batch_size (32) must be divisible by "
                                  "train.grad_accum_steps * cluster.student.hosts"),
    (["cluster.student.hosts=2", "eval.batch_size=3"], "eval.batch_size (3) must be divisible"),
    (["cluster.student.min_hosts=2"], "cluster.student: expected min_hosts <= hosts <= max_hosts"),
    (["cluster.teacher.resources={CPU: -1}"], "cluster.teacher.resources.CPU: expected >= 0"),
    (["cache.temperature=2"], "cache.temperature (2.0) must equal loss.temperature (4.0)"),
    (["model.student.path=/x"], "model.student.hidden_size: set together with model.student.path"),
    (["model.student.num_attention_heads=5"], "model.student.num_attention_heads (5) must divide"),
    (["model.student.num_key_value_heads=3"], "model.student.num_key_value_heads (3) must divide"),
    (["model.teacher.hidden_size=8"], "model.teacher.intermediate_size: required to initialise"),
    (["cache.mode=sampled", "cache.value_dtype=q8"], "cache.value_dtype: must be null in mode "
                                                     "sampled"),
    (["cache.mode=full", "cache.value_dtype=q8"], "cache.value_dtype: q8 is for mode topk"),
    (["cache.n_draws=256"], "cache.n_draws: expected <= 255, got 256"),
    (["cache.chunk_sequences=3"], "cache.chunk_sequences (3) must divide cache.shard_sequences"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "mesh: at most one axis may be -1"),
    (["mesh.tensor=0"], "mesh.tensor: expected >= 1 or -1"),
    (["optimizer.warmup_steps=2000"], "optimizer.warmup_steps (2000) must not exceed"),
    (["train.steps"], "override 'train.steps': expected KEY.PATH=VALUE"),
])
def test_bad_values_are_refused_with_their_path(overrides, message):
    with pytest.raises(ConfigError) as info:
        make(*overrides)
    assert message in str(info.value)


def test_missing_model_section_and_bad_top_level():
    with pytest.raises(ConfigError, match="model: required key is missing"):
        config_from_dict({"cache": {}})
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        config_from_dict([1, 2])


def test_yaml_file_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty.yaml: the config file is empty"):
        load_config(empty)
    broken = tmp_path / "broken.yaml"
    broken.write_text("loss: {temperature: [1\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(broken)
    typo = tmp_path / "typo.yaml"
    typo.write_text("model: {student: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,"
                    " num_attention_heads: 4}}\ncache: {}\nlos: {temperature: 2}\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: los: unknown key; did you mean 'loss'\?"):
        load_config(typo)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "missing.yaml")


def test_sections_check_themselves_when_built_directly():
    with pytest.raises(ConfigError, match="loss.temperature: expected > 0, got 0"):
        LossConfig(temperature=0)
    with pytest.raises(ConfigError, match="loss.alpha: expected <= 1, got 1.5"):
        LossConfig(alpha=1.5)
    assert LossConfig(temperature=2).temperature == 2.0


def test_config_hash_covers_semantics_not_layout():
    base = config_hash(make())
    for same in (["run_dir=elsewhere"], ["logging.every_steps=1"], ["data.prepared_dir=/x"],
                 ["cluster.student.hosts=2"], ["mesh.data=2"], ["train.grad_accum_steps=2"],
                 ["checkpoint.keep=7"], ["cache.path=/other"]):
        assert config_hash(make(*same)) == base, same
    for different in (["loss.temperature=2"], ["train.steps=500"], ["data.seq_len=8"],
                      ["optimizer.learning_rate=1e-3"], ["model.student.hidden_size=64"],
                      ["cache.k=8"]):
        assert config_hash(make(*different)) != base, different
    view = config_to_dict(make(), hashed_only=True)
    assert "cluster" not in view and "run_dir" not in view and "path" not in view["cache"]


def test_cache_target_fields_follow_the_mode():
    topk = make("loss.temperature=2").cache_target_fields()
    assert topk == {"mode": "topk", "k": 64, "n_draws": None, "value_dtype": None,
                    "id_encoding": "gap", "temperature": 2.0, "seed": 0}
    sampled = make("cache.mode=sampled", "cache.n_draws=32").cache_target_fields()
    assert (sampled["k"], sampled["n_draws"], sampled["temperature"]) == (None, 32, 4.0)
    full = make("cache.mode=full", "cache.temperature=1").cache_target_fields()
    assert full["temperature"] is None and full["k"] is None
    with pytest.raises(ConfigError, match="cache: no cache section"):
        make("cache=null", "cluster.teacher_source=remote",
             "model.teacher.path=/t").cache_target_fields()


def test_student_host_counts_and_mesh_shape():
    config = make("train.global_batch_size=12", "cluster.student.min_hosts=1",
                  "cluster.student.max_hosts=5")
    assert config.student_host_counts() == (1, 2, 3, 4)
    # one size field per mesh axis, in mesh order: shape() returns them in MESH_AXES order
    assert tuple(f.name for f in dataclasses.fields(MeshConfig)) == MESH_AXES
    assert MeshConfig(data=-1, tensor=2).shape(8) == (4, 1, 2)
    assert MeshConfig(data=2, fsdp=2).shape(4) == (2, 2, 1)
    with pytest.raises(ConfigError, match="multiply to 4 but 8 devices"):
        MeshConfig(data=2, fsdp=2).shape(8)
    with pytest.raises(ConfigError, match="do not divide"):
        MeshConfig(data=-1, tensor=3).shape(8)


def test_hf_config_of_an_initialised_model():
    spec = make("model.student.num_key_value_heads=2").model.student
    hf = spec.hf_config(tokenizer_vocab_size=300)
    assert hf["vocab_size"] == 300 and hf["num_key_value_heads"] == 2
    assert hf["num_hidden_layers"] == 2 and hf["architectures"] == ["LlamaForCausalLM"]


def test_reference_doc_is_current_and_complete():
    text = render_reference()
    assert (ROOT / "docs" / "config-reference.md").read_text() == text, (
        "docs/config-reference.md is stale: run `python -m pipeline.config docs/config-reference.md`")
    for key in ("loss.temperature", "cluster.student.min_hosts", "cluster.teacher_source",
                "train.logits_chunk_size", "cache.mode", "optimizer.warmup_steps"):
        assert f"| `{key}` |" in text


def _numpy_schedule(step, peak, warmup, decay, end):
    if step < warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / (decay - warmup))
    return end + (peak - end) * 0.5 * (1.0 + np.cos(np.pi * progress))


def test_schedule_matches_float64_reference():
    rng = np.random.default_rng(0)
    for _ in range(5):
        opt = OptimizerConfig(learning_rate=float(rng.uniform(1e-4, 1e-2)),
                              warmup_steps=int(rng.integers(1, 20)),
                              min_lr_ratio=float(rng.uniform(0, 0.5)))
        total = int(rng.integers(40, 100))
        schedule = build_schedule(opt, total)
        for step in rng.integers(0, total + 10, size=8):
            want = _numpy_schedule(int(step), opt.learning_rate, opt.warmup_steps, total,
                                   opt.learning_rate * opt.min_lr_ratio)
            np.testing.assert_allclose(float(schedule(int(step))), want, rtol=1e-5, atol=1e-9)


def test_adamw_matches_float64_reference():
    """Three steps of clip + AdamW (decay on matrices only) against a numpy re-derivation."""
    opt = OptimizerConfig(learning_rate=1e-2, warmup_steps=2, b1=0.8, b2=0.9, eps=1e-6,
                          weight_decay=0.3, clip_grad_norm=0.5, min_lr_ratio=0.2)
    total = 6
    rng = np.random.default_rng(1)
    params = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,))}
    grads = [{"w": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,))} for _ in range(3)]

    tx = build_optimizer(opt, total)
    jparams = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = tx.init(jparams)
    for g in grads:
        updates, state = jax.jit(tx.update)(jax.tree.map(jnp.float32, g), state, jparams)
        jparams = jax.tree.map(lambda p, u: p + u, jparams, updates)

    ref = {k: v.copy() for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in params.items()}
    nu = {k: np.zeros_like(v) for k, v in params.items()}
    for t, g in enumerate(grads, start=1):
        norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
        scale = min(1.0, opt.clip_grad_norm / norm)
        lr = _numpy_schedule(t - 1, opt.learning_rate, opt.warmup_steps, total,
                             opt.learning_rate * opt.min_lr_ratio)
        for k in ref:
            gk = g[k] * scale
            mu[k] = opt.b1 * mu[k] + (1 - opt.b1) * gk
            nu[k] = opt.b2 * nu[k] + (1 - opt.b2) * gk ** 2
            step = (mu[k] / (1 - opt.b1 ** t)) / (np.sqrt(nu[k] / (1 - opt.b2 ** t)) + opt.eps)
            if ref[k].ndim >= 2:
                step = step + opt.weight_decay * ref[k]
            ref[k] = ref[k] - lr * step
    for k in ref:
        np.testing.assert_allclose(np.asarray(jparams[k]), ref[k], rtol=2e-5, atol=1e-6)

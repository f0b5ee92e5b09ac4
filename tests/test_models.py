"""The Llama-family model against transformers (committed fixtures) and a float64 numpy reference.

The fixtures under tests/fixtures/hf/ are tiny random checkpoints that transformers wrote, with
transformers' outputs on fixed padded inputs (tests/fixtures/make_hf_fixtures.py). No torch here.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from pipeline.errors import ConfigError, DataError, ModelLoadError
from pipeline.models import ModelOutput
from pipeline.models.hf_io import load_pretrained
from pipeline.models.llama import (Llama, Llama3RopeScaling, LlamaConfig, RMSNorm,
                                   rope_inverse_frequencies)

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def test_all_five_variants_have_fixtures():
    assert NAMES == ["llama3_rope_scaling", "llama_gqa_tied", "mistral_sliding_window",
                     "qwen2_bias", "qwen3_qk_norm"]


def _reference(name):
    return dict(np.load(FIXTURES / f"{name}.npz"))


@functools.partial(jax.jit, static_argnums=4)
def _forward(graphdef, state, input_ids, attention_mask, output_attentions):
    model = nnx.merge(graphdef, state)
    return model(input_ids, attention_mask, output_hidden_states=True,
                 output_attentions=output_attentions)


def _run(model, ref, output_attentions=True):
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, jnp.asarray(ref["input_ids"]),
                    jnp.asarray(ref["attention_mask"]), output_attentions)


# Attention probabilities always come from the dense (xla) path: blockwise runs without them.
ATTENTION = ["xla", "blockwise"]


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("name", NAMES)
def test_matches_transformers(name, attention):
    ref = _reference(name)
    out = _run(load_pretrained(FIXTURES / name, attention=attention), ref,
               output_attentions=attention == "xla")
    real = ref["attention_mask"].astype(bool)  # padding positions carry no meaning
    assert out.logits.dtype == jnp.float32
    assert np.abs(np.asarray(out.logits) - ref["logits"])[real].max() <= 1e-4
    assert len(out.hidden_states) == len(ref["hidden_states"])
    for ours, theirs in zip(out.hidden_states, ref["hidden_states"]):
        assert np.abs(np.asarray(ours) - theirs)[real].max() <= 1e-4
    np.testing.assert_array_equal(out.hidden_states[-1], out.last_hidden_state)
    if attention != "xla":
        return
    assert len(out.attentions) == len(ref["attentions"])
    for ours, theirs in zip(out.attentions, ref["attentions"]):
        # [batch, heads, query, key]; rows of padding queries are meaningless
        diff = np.abs(np.asarray(ours) - theirs).transpose(0, 2, 1, 3)[real]
        assert diff.max() <= 1e-5


# ---- an independent float64 numpy reference, straight from the checkpoint's tensors ----

def _np_inverse_frequencies(head_dim, theta, scaling):
    """RoPE frequencies, element by element (llama3 scaling as Meta's reference describes)."""
    out = []
    for i in range(head_dim // 2):
        freq = theta ** (-2.0 * i / head_dim)
        if scaling is not None:
            factor, low, high, context = scaling
            wavelength = 2 * math.pi / freq
            if wavelength > context / low:
                freq = freq / factor
            elif wavelength >= context / high:
                t = (context / wavelength - low) / (high - low)
                freq = (1 - t) * freq / factor + t * freq
        out.append(freq)
    return np.array(out)


def _np_forward(model_dir: Path, input_ids, attention_mask):
    """Logits ``[b, l, v]`` and hidden states, float64, from the HF tensors and config."""
    hf = json.loads((model_dir / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(model_dir / "model.safetensors").items()}
    d, n, kv = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"]
    h = hf.get("head_dim") or d // n
    eps = hf["rms_norm_eps"]
    rope = hf["rope_parameters"]
    scaling = None
    if rope["rope_type"] == "llama3":
        scaling = (rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
                   rope["original_max_position_embeddings"])
    b, l = input_ids.shape
    angles = np.arange(l)[:, None] * _np_inverse_frequencies(h, rope["rope_theta"], scaling)
    cos, sin = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]

    def rotate(t):  # [b, l, heads, h]: rotate each pair (i, i + h/2) by its angle
        a, c = t[..., : h // 2], t[..., h // 2:]
        return np.concatenate([a * cos - c * sin, c * cos + a * sin], axis=-1)

    def rms(x, scale):
        return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * scale

    query, key = np.arange(l)[:, None], np.arange(l)[None, :]
    allowed = (key <= query)[None] & attention_mask.astype(bool)[:, None, :]
    if hf["model_type"] == "mistral" and hf.get("sliding_window"):
        allowed &= (query - key < hf["sliding_window"])[None]

    x = w["model.embed_tokens.weight"][input_ids]
    hidden = [x]
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        y = rms(x, w[p + "input_layernorm.weight"])
        qkv = []
        for proj, heads in (("q", n), ("k", kv), ("v", kv)):
            t = y @ w[p + f"self_attn.{proj}_proj.weight"].T
            if p + f"self_attn.{proj}_proj.bias" in w:
                t = t + w[p + f"self_attn.{proj}_proj.bias"]
            qkv.append(t.reshape(b, l, heads, h))
        q, k, v = qkv
        if p + "self_attn.q_norm.weight" in w:
            q = rms(q, w[p + "self_attn.q_norm.weight"])
            k = rms(k, w[p + "self_attn.k_norm.weight"])
        q, k = rotate(q), rotate(k)
        heads_out = []
        for head in range(n):
            group = head // (n // kv)
            scores = np.einsum("bqh,bkh->bqk", q[:, :, head], k[:, :, group]) / math.sqrt(h)
            scores = np.where(allowed, scores, -1e30)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            heads_out.append(np.einsum("bqk,bkh->bqh", probs, v[:, :, group]))
        x = x + np.concatenate(heads_out, axis=-1) @ w[p + "self_attn.o_proj.weight"].T
        y = rms(x, w[p + "post_attention_layernorm.weight"])
        gate = y @ w[p + "mlp.gate_proj.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (y @ w[p + "mlp.up_proj.weight"].T)) \
            @ w[p + "mlp.down_proj.weight"].T
        hidden.append(x)
    hidden[-1] = rms(x, w["model.norm.weight"])
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return hidden[-1] @ head.T, hidden


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("name", NAMES)
def test_matches_float64_numpy_reference(name, attention):
    ref = _reference(name)
    real = ref["attention_mask"].astype(bool)
    logits64, hidden64 = _np_forward(FIXTURES / name, ref["input_ids"], ref["attention_mask"])
    with_probs = attention == "xla"
    out = _run(load_pretrained(FIXTURES / name, attention=attention), ref, with_probs)
    assert np.abs(np.asarray(out.logits) - logits64)[real].max() <= 1e-4
    for ours, theirs in zip(out.hidden_states, hidden64):
        assert np.abs(np.asarray(ours) - theirs)[real].max() <= 1e-4

    # bfloat16 parameters and activations: logits still float32, close to the reference
    out16 = _run(load_pretrained(FIXTURES / name, dtype=jnp.bfloat16, attention=attention), ref,
                 with_probs)
    assert out16.logits.dtype == jnp.float32
    assert out16.last_hidden_state.dtype == jnp.bfloat16
    error = np.abs(np.asarray(out16.logits) - logits64)[real]
    assert error.max() <= 0.03 * np.abs(logits64[real]).max()


def test_llama3_rope_frequencies_match_reference():
    rng = np.random.default_rng(0)
    for _ in range(5):
        head_dim = int(rng.choice([16, 32, 64]))
        theta = float(rng.uniform(1e3, 1e6))
        scaling = Llama3RopeScaling(factor=float(rng.uniform(2, 32)),
                                    low_freq_factor=float(rng.uniform(0.5, 2)),
                                    high_freq_factor=float(rng.uniform(3, 8)),
                                    original_max_position_embeddings=int(rng.integers(16, 8192)))
        config = _config(head_dim=head_dim, num_attention_heads=2, hidden_size=2 * head_dim,
                         rope_theta=theta, rope_scaling=scaling)
        expected = _np_inverse_frequencies(head_dim, theta, (
            scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor,
            scaling.original_max_position_embeddings))
        np.testing.assert_allclose(rope_inverse_frequencies(config), expected, rtol=1e-6)
        plain = _np_inverse_frequencies(head_dim, theta, None)
        assert not np.allclose(expected, plain)  # the scaling did something
        np.testing.assert_allclose(
            rope_inverse_frequencies(_config(head_dim=head_dim, num_attention_heads=2,
                                             hidden_size=2 * head_dim, rope_theta=theta)),
            plain, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rms_norm_matches_reference(dtype):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 5, 16)) * 3
    scale = 1 + 0.3 * rng.normal(size=16)
    norm = RMSNorm(16, 1e-5, param_dtype=dtype)
    norm.scale[...] = jnp.asarray(scale, dtype)
    expected = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-5) * scale
    out = norm(jnp.asarray(x, dtype))
    assert out.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=tol, atol=tol)


def _config(**overrides):
    fields = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return LlamaConfig(**{**fields, **overrides})


@pytest.mark.parametrize("tied", [True, False])
def test_head_without_logits_and_gradients(tied):
    model = Llama(_config(tie_word_embeddings=tied), rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 6)))
    mask = jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1]])
    full = nnx.jit(lambda m: m(ids, mask))(model)
    bare = nnx.jit(lambda m: m(ids, mask, compute_logits=False))(model)
    assert isinstance(bare, ModelOutput) and bare.logits is None
    assert bare.hidden_states is None and bare.attentions is None
    assert model.output_head().shape == (64, 32)
    np.testing.assert_allclose(bare.last_hidden_state @ model.output_head().T, full.logits,
                               atol=1e-5)

    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        return jnp.mean(nnx.merge(graphdef, p)(ids, mask).logits ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    for path, grad in nnx.to_flat_state(grads):
        value = np.asarray(grad.get_value())
        assert np.isfinite(value).all() and np.abs(value).max() > 0, path


def test_tied_head_is_the_embedding():
    model = Llama(_config(tie_word_embeddings=True), rngs=nnx.Rngs(0))
    assert model.lm_head_vd is None
    np.testing.assert_array_equal(model.output_head(), model.embedder.embedding_vd[...])


def test_bad_call_inputs():
    model = Llama(_config(), rngs=nnx.Rngs(0))
    with pytest.raises(DataError, match=r"input_ids: expected \[batch, seq\]"):
        model(jnp.zeros((4,), jnp.int32))
    with pytest.raises(DataError, match="attention_mask: expected shape"):
        model(jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 5), jnp.int32))


# ---- config.json <-> LlamaConfig ----

@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip(name):
    hf = json.loads((FIXTURES / name / "config.json").read_text())
    config = LlamaConfig.from_hf_config(hf)
    assert LlamaConfig.from_hf_config(config.to_hf_config()) == config
    assert config.to_hf_config()["bos_token_id"] == hf["bos_token_id"]  # kept, not interpreted
    hash(config)  # static module attribute: must be hashable for jit


def test_config_variant_flags():
    configs = {name: LlamaConfig.from_hf_config(
        json.loads((FIXTURES / name / "config.json").read_text())) for name in NAMES}
    assert configs["qwen2_bias"].qkv_bias and not configs["qwen2_bias"].qk_norm
    assert configs["qwen3_qk_norm"].qk_norm and configs["qwen3_qk_norm"].head_dim == 16
    assert configs["mistral_sliding_window"].sliding_window == 3
    assert configs["llama_gqa_tied"].tie_word_embeddings
    assert configs["llama3_rope_scaling"].rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 32)


def test_transformers_v4_config_layout_reads_the_same():
    """Hub checkpoints written by transformers 4 keep rope_theta and rope_scaling ("type")."""
    v5 = json.loads((FIXTURES / "llama3_rope_scaling" / "config.json").read_text())
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    rope = dict(v5["rope_parameters"])
    v4["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    v4["rope_scaling"] = rope
    assert LlamaConfig.from_hf_config(v4) == LlamaConfig.from_hf_config(v5)


def _hf_config(**changes):
    hf = json.loads((FIXTURES / "llama_gqa_tied" / "config.json").read_text())
    hf.update(changes)
    return {k: v for k, v in hf.items() if v is not _DROP}


_DROP = object()


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (dict(model_type=_DROP), "missing required field 'model_type'"),
    (dict(hidden_size=_DROP, vocab_size=None), "missing required field.*'vocab_size', 'hidden_size'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(attention_bias=True), "attention_bias=True is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_type='yarn' is not supported"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0}),
     "missing 'low_freq_factor', 'high_freq_factor'"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                           "high_freq_factor": 1.0}),
     "rope_scaling: expected factor > 0, 0 < low_freq_factor < high_freq_factor"),
    (dict(num_key_value_heads=3), r"num_key_value_heads \(3\) must divide num_attention_heads"),
    (dict(num_hidden_layers="2"), "num_hidden_layers: expected a positive integer, got '2'"),
])
def test_bad_configs_name_the_field(changes, message):
    with pytest.raises(ModelLoadError, match=message):
        LlamaConfig.from_hf_config(_hf_config(**changes))


def test_qwen_sliding_window_is_refused():
    hf = json.loads((FIXTURES / "qwen2_bias" / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="use_sliding_window=True is not supported"):
        LlamaConfig.from_hf_config({**hf, "use_sliding_window": True})
    with pytest.raises(ModelLoadError, match="layer_types=.* is not supported"):
        LlamaConfig.from_hf_config({**hf, "layer_types": ["full_attention", "sliding_attention"]})


def test_direct_construction_is_checked():
    with pytest.raises(ConfigError, match="sliding_window: only model_type 'mistral'"):
        _config(sliding_window=4)
    with pytest.raises(ConfigError, match="sliding_window: expected a positive integer or None"):
        _config(model_type="mistral", sliding_window=0)
    with pytest.raises(ConfigError, match="head_dim: RoPE needs an even head_dim"):
        _config(head_dim=7)
    with pytest.raises(ConfigError, match="rope_theta: expected > 0"):
        _config(rope_theta=0.0)

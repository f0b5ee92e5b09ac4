"""The Llama-family decoder in flax.nnx: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 and Qwen3.

One module covers the family; ``LlamaConfig.model_type`` picks the variant's details:

- ``llama``: grouped-query attention (GQA), RoPE with an optional ``llama3`` frequency scaling.
- ``mistral``: as llama, plus an optional sliding attention window on every layer.
- ``qwen2``: as llama, plus a bias on the q, k and v projections.
- ``qwen3``: as llama, plus an RMSNorm over ``head_dim`` on each query and key head, and a
  ``head_dim`` that need not equal ``hidden_size / num_attention_heads``.

Numerics follow transformers' eager implementation: RMSNorm normalises in float32 and casts
back before the scale; attention scores and softmax are float32; logits come back in float32.
Two dtypes, as MaxText's ``weight_dtype`` and ``dtype``: parameters are stored in
``param_dtype`` and computation runs in ``dtype`` (each parameter is cast where it is used, so
the embeddings, activations and matmuls are ``dtype``). A bfloat16 student with float32
parameters keeps float32 master weights: updates far below bfloat16's spacing (2^-8 at 1.0)
are not rounded away, and optax keeps its moments in the parameters' dtype.

Parameter names carry their axes as a suffix (``q_dnh`` is ``[hidden, heads, head_dim]``), which
is what ``pipeline.models.sharding``'s rules and ``pipeline.models.hf_io``'s name table key on.
Shape letters: b batch, l/m query/key position, d hidden, v vocab, n query heads, k key/value
heads, g query heads per key/value head, h head_dim, f intermediate (MLP) size.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pipeline.errors import ConfigError, DataError, ModelLoadError
from pipeline.models import ModelOutput

# model_type -> the transformers class that loads it (written into config.json's "architectures").
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

_REQUIRED_HF_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)

# config.json keys that describe the file rather than the model: regenerated on save, not kept.
_REGENERATED_HF_FIELDS = frozenset(
    {"architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path"}
)


@dataclasses.dataclass(frozen=True, slots=True)
class Llama3RopeScaling:
    """The ``llama3`` RoPE frequency scaling (Llama 3.1/3.2 ``rope_scaling``).

    Wavelengths shorter than ``original_max_position_embeddings / high_freq_factor`` keep their
    frequency, those longer than ``original_max_position_embeddings / low_freq_factor`` are
    divided by ``factor``, and the band between interpolates smoothly (Meta's Llama 3.1
    reference code; transformers ``_compute_llama3_parameters``).
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True, slots=True)
class LlamaConfig:
    """Architecture of a Llama-family decoder; field names follow Hugging Face's config.json.

    Attributes:
      model_type: ``llama``, ``mistral``, ``qwen2`` or ``qwen3`` (see the module docstring).
      vocab_size, hidden_size, intermediate_size, num_hidden_layers: as in transformers.
      num_attention_heads: query heads; num_key_value_heads: key/value heads (GQA), a divisor.
      head_dim: size of one head (``hidden_size // num_attention_heads`` unless set).
      rms_norm_eps: epsilon of every RMSNorm.
      rope_theta: RoPE base; rope_scaling: ``Llama3RopeScaling`` or ``None`` (plain RoPE).
      tie_word_embeddings: the output head is the embedding table.
      sliding_window: mistral only: a query attends to the last ``sliding_window`` positions.
      max_position_embeddings: the context length the model was trained for (informative).
      initializer_range: standard deviation of the random initialisation of weights.
      extra_hf_fields: config.json entries kdpipe does not interpret (token ids, ...), as
        ``(key, json text)`` pairs, written back unchanged by ``to_hf_config``.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    extra_hf_fields: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise ConfigError(
                f"model_type: expected one of {sorted(ARCHITECTURES)}, got {self.model_type!r}"
            )
        for name in (*_REQUIRED_HF_FIELDS, "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim: RoPE needs an even head_dim, got {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: expected > 0, got {getattr(self, name)!r}")
        scaling = self.rope_scaling
        if scaling is not None and not (
                scaling.factor > 0 and 0 < scaling.low_freq_factor < scaling.high_freq_factor
                and _is_positive_int(scaling.original_max_position_embeddings)):
            raise ConfigError(
                f"rope_scaling: expected factor > 0, 0 < low_freq_factor < high_freq_factor and "
                f"a positive original_max_position_embeddings, got {scaling}"
            )
        if self.sliding_window is not None:
            if self.model_type != "mistral":
                raise ConfigError(
                    f"sliding_window: only model_type 'mistral' has one here, got "
                    f"{self.sliding_window!r} for {self.model_type!r}"
                )
            if not _is_positive_int(self.sliding_window):
                raise ConfigError(
                    f"sliding_window: expected a positive integer or None, got "
                    f"{self.sliding_window!r}"
                )

    @property
    def qkv_bias(self) -> bool:
        """Qwen2 adds a bias to the q, k and v projections."""
        return self.model_type == "qwen2"

    @property
    def qk_norm(self) -> bool:
        """Qwen3 RMS-normalises each query and key head before RoPE."""
        return self.model_type == "qwen3"

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> LlamaConfig:
        """Reads a transformers ``config.json`` dict (v4 ``rope_theta``/``rope_scaling`` or v5
        ``rope_parameters``). Absent optional fields take transformers' defaults.

        Raises:
          ModelLoadError: unsupported ``model_type`` or option, or a missing required field.
        """
        if "model_type" not in hf:
            raise ModelLoadError("config.json: missing required field 'model_type'")
        model_type = hf["model_type"]
        if model_type not in ARCHITECTURES:
            raise ModelLoadError(
                f"config.json: model_type {model_type!r} is not supported; kdpipe loads "
                f"{', '.join(sorted(ARCHITECTURES))}"
            )
        missing = [name for name in _REQUIRED_HF_FIELDS if hf.get(name) is None]
        if missing:
            raise ModelLoadError(
                f"config.json: missing required field(s) {', '.join(map(repr, missing))} "
                f"for model_type {model_type!r}"
            )
        for name in _REQUIRED_HF_FIELDS:  # checked here too: the defaults below compute with them
            if not _is_positive_int(hf[name]):
                raise ModelLoadError(
                    f"config.json: {name}: expected a positive integer, got {hf[name]!r}")
        consumed = {"model_type", *_REQUIRED_HF_FIELDS}

        def read(key, default):
            consumed.add(key)
            value = hf.get(key)
            return default if value is None else value

        def refuse_if(key, unsupported, default):
            value = read(key, default)
            if unsupported(value):
                raise ModelLoadError(
                    f"config.json: {key}={value!r} is not supported for model_type {model_type!r}"
                )

        refuse_if("hidden_act", lambda act: act != "silu", "silu")
        refuse_if("attention_bias", bool, False)
        refuse_if("mlp_bias", bool, False)
        sliding_window = None
        if model_type == "mistral":
            sliding_window = read("sliding_window", 4096)
        else:
            # Qwen's optional sliding window covers only some layers; no released Qwen2/2.5/3
            # checkpoint turns it on, so kdpipe refuses it rather than half-support it.
            refuse_if("use_sliding_window", bool, False)
            refuse_if("layer_types", lambda kinds: set(kinds) - {"full_attention"}, ())
            consumed.update({"sliding_window", "max_window_layers"})

        num_heads = hf["num_attention_heads"]
        default_head_dim = 128 if model_type == "qwen3" else hf["hidden_size"] // num_heads
        max_positions = read("max_position_embeddings", 2048)
        rope_theta, rope_scaling = _read_rope(hf, max_positions, consumed)
        fields = dict(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=read("num_key_value_heads", num_heads),
            head_dim=read("head_dim", default_head_dim),
            rms_norm_eps=read("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=read("tie_word_embeddings", False),
            sliding_window=sliding_window,
            max_position_embeddings=max_positions,
            initializer_range=read("initializer_range", 0.02),
        )
        extra = tuple(
            (key, json.dumps(value))
            for key, value in sorted(hf.items())
            if key not in consumed and key not in _REGENERATED_HF_FIELDS
        )
        try:
            return cls(**fields, extra_hf_fields=extra)
        except ConfigError as err:
            raise ModelLoadError(f"config.json: {err}") from err

    def to_hf_config(self) -> dict[str, Any]:
        """The transformers ``config.json`` dict for this architecture (without ``dtype``).

        RoPE is written both the transformers v4 way (``rope_theta`` + ``rope_scaling``) and the
        v5 way (``rope_parameters``), so either version, and vLLM, read it unchanged.
        """
        hf: dict[str, Any] = {key: json.loads(text) for key, text in self.extra_hf_fields}
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta,
                    **dataclasses.asdict(self.rope_scaling)}
        hf.update(
            architectures=[ARCHITECTURES[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=None if self.rope_scaling is None else dict(rope),
            rope_parameters=rope,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=self.initializer_range,
        )
        if self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        else:
            hf.update(use_sliding_window=False, sliding_window=None)
        if self.model_type in ("llama", "qwen3"):
            hf["attention_bias"] = False
        if self.model_type == "llama":
            hf["mlp_bias"] = False
        return hf


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _read_rope(hf, max_positions, consumed) -> tuple[float, Llama3RopeScaling | None]:
    """``(rope_theta, rope_scaling)`` from either config.json convention (see to_hf_config)."""
    consumed.update({"rope_parameters", "rope_scaling", "rope_theta"})
    field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = dict(hf.get(field) or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError(
            f"config.json: {field}.partial_rotary_factor={rope['partial_rotary_factor']!r} is not "
            f"supported (kdpipe rotates the whole head)"
        )
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ModelLoadError(
            f"config.json: {field}.rope_type={rope_type!r} is not supported; kdpipe supports "
            f"'default' and 'llama3'"
        )
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in rope]
    if missing:
        raise ModelLoadError(
            f"config.json: {field} of rope_type 'llama3' is missing {', '.join(map(repr, missing))}"
        )
    return theta, Llama3RopeScaling(
        factor=rope["factor"],
        low_freq_factor=rope["low_freq_factor"],
        high_freq_factor=rope["high_freq_factor"],
        original_max_position_embeddings=rope.get(
            "original_max_position_embeddings", max_positions),
    )


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """RoPE inverse frequencies ``[head_dim // 2]`` float32, after any ``llama3`` scaling.

    ``inv_freq[i] = rope_theta ** (-2i / head_dim)`` (Su et al. 2021, RoFormer); with
    ``Llama3RopeScaling`` each is then scaled by wavelength band as that class describes.
    """
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    scaling = config.rope_scaling
    if scaling is not None:
        context = scaling.original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        low_freq_wavelen = context / scaling.low_freq_factor
        high_freq_wavelen = context / scaling.high_freq_factor
        smooth = (context / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        inv_freq = np.where(
            wavelen > low_freq_wavelen,
            inv_freq / scaling.factor,
            np.where(wavelen < high_freq_wavelen, inv_freq, interpolated),
        )
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x`` ``[b, l, heads, h]`` by position; ``cos``/``sin`` are ``[l, h]`` float32.

    Half-split convention of transformers' Llama (``rotate_half``), not interleaved pairs:
    ``x * cos + concat(-x2, x1) * sin`` with ``x1, x2`` the two halves of the head.
    """
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


def _normal(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def _used(param: nnx.Param, dtype) -> jax.Array:
    """A parameter's value in the compute dtype (its gradient flows back in its own dtype)."""
    return param[...].astype(dtype)


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis, normalised in float32 and cast
    back to ``x``'s dtype before the scale (as transformers' LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float, *, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))  # [dim]
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * _used(self.scale, x.dtype)


class Embedder(nnx.Module):
    """Token embedding table ``embedding_vd`` ``[vocab, hidden]``; its output is in ``dtype``,
    the compute dtype every later layer follows."""

    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        shape = (config.vocab_size, config.hidden_size)
        self.embedding_vd = nnx.Param(_normal(rngs, shape, config.initializer_range, param_dtype))
        self.dtype = dtype

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """``[b, l]`` int ids -> ``[b, l, d]`` embeddings."""
        # Gather, then cast: only the rows used are converted, not the whole table.
        return jnp.take(self.embedding_vd[...], input_ids, axis=0).astype(self.dtype)


class Attention(nnx.Module):
    """Causal grouped-query self-attention with RoPE (and Qwen2 biases / Qwen3 q,k norms)."""

    def __init__(self, config: LlamaConfig, *, param_dtype, rngs: nnx.Rngs):
        d, n, k, h = (config.hidden_size, config.num_attention_heads,
                      config.num_key_value_heads, config.head_dim)
        std = config.initializer_range
        self.q_dnh = nnx.Param(_normal(rngs, (d, n, h), std, param_dtype))
        self.k_dkh = nnx.Param(_normal(rngs, (d, k, h), std, param_dtype))
        self.v_dkh = nnx.Param(_normal(rngs, (d, k, h), std, param_dtype))
        self.o_nhd = nnx.Param(_normal(rngs, (n, h, d), std, param_dtype))
        self.q_bias_nh = nnx.Param(jnp.zeros((n, h), param_dtype)) if config.qkv_bias else None
        self.k_bias_kh = nnx.Param(jnp.zeros((k, h), param_dtype)) if config.qkv_bias else None
        self.v_bias_kh = nnx.Param(jnp.zeros((k, h), param_dtype)) if config.qkv_bias else None
        eps = config.rms_norm_eps
        self.q_norm = RMSNorm(h, eps, param_dtype=param_dtype) if config.qk_norm else None
        self.k_norm = RMSNorm(h, eps, param_dtype=param_dtype) if config.qk_norm else None
        self.scale = h**-0.5

    def __call__(self, x, cos, sin, mask_bklm):
        """Self-attention of ``x`` ``[b, l, d]``.

        Args:
          cos, sin: ``[l, h]`` float32 RoPE tables.
          mask_bklm: ``[b, 1, 1, l, l]`` bool, True where query l may attend key m.

        Returns:
          ``([b, l, d] output, [b, n, l, l] attention probabilities in x's dtype)``.
        """
        q = jnp.einsum("bld,dnh->blnh", x, _used(self.q_dnh, x.dtype))
        k = jnp.einsum("bld,dkh->blkh", x, _used(self.k_dkh, x.dtype))
        v = jnp.einsum("bld,dkh->blkh", x, _used(self.v_dkh, x.dtype))
        if self.q_bias_nh is not None:
            q = q + _used(self.q_bias_nh, x.dtype)
            k = k + _used(self.k_bias_kh, x.dtype)
            v = v + _used(self.v_bias_kh, x.dtype)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        b, l, n, h = q.shape
        num_kv = k.shape[2]
        # Query head n uses key/value head n // g (transformers' repeat_kv order).
        q = q.reshape(b, l, num_kv, n // num_kv, h)
        scores = jnp.einsum("blkgh,bmkh->bkglm", q, k, preferred_element_type=jnp.float32)
        # A finite minimum, not -inf: a fully masked row (a left-padding query) becomes a uniform
        # average instead of NaN; its output is padding and ignored downstream.
        scores = jnp.where(mask_bklm, scores * self.scale, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("bkglm,bmkh->blkgh", probs, v).reshape(b, l, n, h)
        out = jnp.einsum("blnh,nhd->bld", out, _used(self.o_nhd, x.dtype))
        return out, probs.reshape(b, n, l, l)


class MLP(nnx.Module):
    """SwiGLU feed-forward: ``down(silu(x @ gate) * (x @ up))``."""

    def __init__(self, config: LlamaConfig, *, param_dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        std = config.initializer_range
        self.gate_df = nnx.Param(_normal(rngs, (d, f), std, param_dtype))
        self.up_df = nnx.Param(_normal(rngs, (d, f), std, param_dtype))
        self.down_fd = nnx.Param(_normal(rngs, (f, d), std, param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[b, l, d]`` -> ``[b, l, d]``."""
        gate = jax.nn.silu(x @ _used(self.gate_df, x.dtype))
        return (gate * (x @ _used(self.up_df, x.dtype))) @ _used(self.down_fd, x.dtype)


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``h = x + attn(norm(x))``, ``out = h + mlp(norm(h))``."""

    def __init__(self, config: LlamaConfig, *, param_dtype, rngs: nnx.Rngs):
        eps = config.rms_norm_eps
        self.input_norm = RMSNorm(config.hidden_size, eps, param_dtype=param_dtype)
        self.attn = Attention(config, param_dtype=param_dtype, rngs=rngs)
        self.post_attn_norm = RMSNorm(config.hidden_size, eps, param_dtype=param_dtype)
        self.mlp = MLP(config, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask_bklm):
        """``[b, l, d]`` -> ``([b, l, d], [b, n, l, l] attention probabilities)``."""
        attn_out, probs = self.attn(self.input_norm(x), cos, sin, mask_bklm)
        h = x + attn_out
        return h + self.mlp(self.post_attn_norm(h)), probs


class Llama(nnx.Module):
    """A Llama-family causal LM following the protocol of ``pipeline.models``.

    Args:
      config: the architecture.
      dtype: compute dtype (float32 or bfloat16) of the embeddings, activations and matmuls;
        a Hugging Face export is written in it (``torch_dtype``).
      param_dtype: dtype the parameters are stored (and trained) in; ``None``: ``dtype``.
      rngs: random initialisation (``nnx.Rngs(seed)``).
    """

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=None,
                 rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        param_dtype = self.dtype if param_dtype is None else jnp.dtype(param_dtype)
        self.embedder = Embedder(config, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
        head_shape = (config.vocab_size, config.hidden_size)
        self.lm_head_vd = None if config.tie_word_embeddings else nnx.Param(
            _normal(rngs, head_shape, config.initializer_range, param_dtype))

    def output_head(self) -> jax.Array:
        """The output projection ``[vocab, hidden]`` in the compute dtype (the embedding table
        when tied)."""
        if self.lm_head_vd is None:
            return _used(self.embedder.embedding_vd, self.dtype)
        return _used(self.lm_head_vd, self.dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        compute_logits: bool = True,
    ) -> ModelOutput:
        """Runs the decoder over positions ``0..seq-1``.

        Args:
          input_ids: ``[batch, seq]`` integer token ids.
          attention_mask: ``[batch, seq]``, 1 (or True) for real tokens, 0 for padding; combined
            with the causal mask (and mistral's sliding window). ``None``: no padding.
          output_hidden_states, output_attentions, compute_logits: see ``ModelOutput``.

        Returns:
          ``ModelOutput``; ``logits`` ``[batch, seq, vocab]`` float32. Outputs at padding
          positions are finite but meaningless.
        """
        if input_ids.ndim != 2:
            raise DataError(f"input_ids: expected [batch, seq], got shape {input_ids.shape}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise DataError(
                f"attention_mask: expected shape {input_ids.shape} (as input_ids), got "
                f"{attention_mask.shape}"
            )
        seq = input_ids.shape[1]
        mask_bklm = self._mask(attention_mask, input_ids.shape[0], seq)
        freqs = np.arange(seq, dtype=np.float32)[:, None] * rope_inverse_frequencies(self.config)
        angles = np.concatenate([freqs, freqs], axis=-1)  # [l, h]
        cos, sin = jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))

        x = self.embedder(input_ids)
        hidden_states = [x]
        attentions = []
        for layer in self.layers:
            x, probs = layer(x, cos, sin, mask_bklm)
            hidden_states.append(x)
            attentions.append(probs)
        x = self.final_norm(x)
        # transformers' convention: the last entry is the final-normed state, not the raw one.
        hidden_states[-1] = x
        logits = None
        if compute_logits:
            logits = jnp.einsum("bld,vd->blv", x, self.output_head(),
                                preferred_element_type=jnp.float32)
        return ModelOutput(
            last_hidden_state=x,
            logits=logits,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )

    def _mask(self, attention_mask, batch: int, seq: int) -> jax.Array:
        """``[batch, 1, 1, seq, seq]`` bool: causal, sliding window, padding of the keys."""
        query = np.arange(seq)[:, None]
        key = np.arange(seq)[None, :]
        allowed = key <= query
        if self.config.sliding_window is not None:
            allowed &= query - key < self.config.sliding_window
        mask = jnp.broadcast_to(jnp.asarray(allowed), (batch, seq, seq))
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, :]
        return mask[:, None, None]

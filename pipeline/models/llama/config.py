"""The architecture of a Llama-family decoder and its Hugging Face ``config.json``.

``LlamaConfig`` holds what ``pipeline.models.llama.model`` builds; ``from_hf_config`` reads a
transformers ``config.json`` dict (refusing what the model does not implement, naming the key)
and ``to_hf_config`` writes one that transformers and vLLM read unchanged. ``model_type`` picks
the variant (see ``pipeline.models.llama``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from pipeline.errors import ConfigError, ModelLoadError

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
                f"config.json: model_type {model_type!r} is not supported by the Llama family "
                f"({', '.join(sorted(ARCHITECTURES))})"
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

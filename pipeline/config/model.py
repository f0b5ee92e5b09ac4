"""The ``model`` section: the teacher and the student, each loaded from a path or initialised."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from pipeline.config.fields import Section, field
from pipeline.errors import ConfigError

Dtype = Literal["float32", "bfloat16"]

_ARCH_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclasses.dataclass(frozen=True)
class ModelSpec(Section):
    """One model: a Hugging Face directory to load, or an architecture to initialise."""

    PATH: ClassVar[str] = "model.<teacher|student>"
    path: str | None = field(None, "Hugging Face checkpoint (config.json + *.safetensors): a "
                             "local directory, a gs://, s3:// or http(s):// URL (each host reads "
                             "only its own slices), or hf://org/name[@revision] (fetched into the "
                             "huggingface_hub cache; HF_HUB_OFFLINE=1 reads only the cache). "
                             "When set, the architecture comes from its config.json and the size "
                             "fields below must stay unset.", hashed=False)
    vocab_size: int | None = field(None, "Vocabulary size; unset: the tokenizer's size.", gt=0)
    hidden_size: int | None = field(None, "Width of the residual stream.", gt=0)
    intermediate_size: int | None = field(None, "Width of the MLP's hidden layer.", gt=0)
    num_hidden_layers: int | None = field(None, "Number of decoder layers.", gt=0)
    num_attention_heads: int | None = field(None, "Query heads per layer.", gt=0)
    num_key_value_heads: int | None = field(None, "Key/value heads (grouped-query attention); "
                                            "unset: num_attention_heads.", gt=0)
    max_position_embeddings: int = field(2048, "Longest sequence the model is built for; "
                                         "data.seq_len may not exceed it (nor, for a model "
                                         "loaded from path, its config.json's).", gt=0)
    rope_theta: float = field(10000.0, "Rotary embedding base.", gt=0)
    rms_norm_eps: float = field(1e-5, "Epsilon of the RMS norms.", gt=0)
    tie_word_embeddings: bool = field(True, "Share the embedding table with the output head.")
    dtype: Dtype = field("float32", "Compute dtype: embeddings, activations and matmuls "
                         "(logits are float32); an exported student is written in it.")
    param_dtype: Dtype | None = field(
        None, "Student only: dtype of the parameters and optimizer state (master weights), cast "
        "to dtype where used. null: float32, so that updates far below bfloat16's spacing "
        "(2^-8 at 1.0) are kept. The teacher, never updated, keeps its parameters in dtype.")
    attention: Literal["auto", "xla", "blockwise"] = field(
        "auto", "How attention is computed (pipeline.models.attention). xla: dense [batch, "
        "heads, seq, seq] scores, memory quadratic in seq; blockwise: plain JAX, memory linear "
        "in seq; auto: cuDNN on GPU (16-bit dtype), the splash kernel on a single TPU device, "
        "else xla up to 512 tokens and blockwise beyond. Attention maps (loss.attention_weight > 0) are always "
        "computed the xla way.", hashed=False)
    scan_layers: bool = field(
        False, "Stack the layers' parameters (a leading [layers] axis) and run one compiled "
        "layer body over them (pipeline.models.stack): compile time and program size no longer "
        "grow with depth. Turn it on for deep models and long compiles (the 1B-8B configs on "
        "TPU/GPU); Hugging Face checkpoints load and export the same either way, but a training "
        "checkpoint resumes only with the setting it was written with.", hashed=False)
    remat: Literal["none", "full", "save_dots", "offload"] = field(
        "none", "What each layer's backward pass recomputes instead of keeping "
        "(jax.checkpoint policies, pipeline.models.stack). none: keep everything; full: keep "
        "only each layer's input (least memory, about one more forward pass of compute); "
        "save_dots: keep the matmul outputs, recompute the rest; offload: as save_dots with "
        "them in host memory (TPU/GPU only; refused on CPU). Same results whatever the choice. "
        "Use it with scan_layers: on looped layers XLA keeps the activations anyway "
        "(benchmarks/bench_scale.py).",
        hashed=False)

    @property
    def from_pretrained(self) -> bool:
        """True when the model is loaded from ``path`` rather than initialised."""
        return self.path is not None

    def hf_config(self, tokenizer_vocab_size: int) -> dict[str, Any]:
        """The architecture as a Hugging Face ``config.json`` dict of model_type ``llama`` (the
        family an initialised model belongs to), for a model that is initialised rather than
        loaded; ``vocab_size`` falls back to the tokenizer's. ``pipeline.models.registry``
        names its transformers class and reads it back."""
        # Imported here: the models import JAX, which loading a config does not need.
        from pipeline.models.registry import family_of

        if self.from_pretrained:
            raise ValueError("hf_config() describes an initialised model; this one is loaded from path")
        heads = self.num_attention_heads
        model_type = "llama"
        return {
            "architectures": [family_of(model_type).architectures[model_type]],
            "model_type": model_type,
            "vocab_size": self.vocab_size or tokenizer_vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": self.num_key_value_heads or heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.dtype,
        }


def check_context(seq_len: int, model: str, max_position_embeddings: int, *,
                  origin: str = "") -> None:
    """Refuse sequences of ``seq_len`` tokens (``data.seq_len``) past the context of ``model``
    ("model.student" / "model.teacher"), its ``max_position_embeddings`` (``origin``: where
    that value comes from when not from the config, e.g. ", in <dir>/config.json"). A teacher
    run past its context gives garbage targets; a student trained past it exports a config that
    claims a context it was trained beyond."""
    if seq_len > max_position_embeddings:
        raise ConfigError(
            f"data.seq_len ({seq_len}) exceeds {model}.max_position_embeddings "
            f"({max_position_embeddings}{origin}): positions past a model's context are not "
            f"what it was built for (a teacher gives garbage targets there, and a student "
            f"trained there exports a config claiming a context it was trained beyond); lower "
            f"data.seq_len (and prepare the data again) or use a model with a longer context")


def _check_model_spec(spec: ModelSpec, path: str, required: bool) -> None:
    given = [name for name in _ARCH_FIELDS + ("vocab_size", "num_key_value_heads")
             if getattr(spec, name) is not None]
    if spec.path is not None:
        if given:
            raise ConfigError(f"{path}.{given[0]}: set together with {path}.path; a loaded model's "
                              f"architecture comes from its config.json, so remove one of them")
        return
    missing = [name for name in _ARCH_FIELDS if getattr(spec, name) is None]
    if not given and not required:
        return
    if missing:
        raise ConfigError(f"{path}.{missing[0]}: required to initialise the model when {path}.path "
                          f"is not set (give all of {', '.join(_ARCH_FIELDS)}, or a path)")
    if spec.hidden_size % spec.num_attention_heads:
        raise ConfigError(f"{path}.num_attention_heads ({spec.num_attention_heads}) must divide "
                          f"{path}.hidden_size ({spec.hidden_size})")
    kv = spec.num_key_value_heads
    if kv is not None and spec.num_attention_heads % kv:
        raise ConfigError(f"{path}.num_key_value_heads ({kv}) must divide "
                          f"{path}.num_attention_heads ({spec.num_attention_heads})")


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
    """The teacher and the student."""

    PATH: ClassVar[str] = "model"
    teacher: ModelSpec = field(doc="The teacher: loaded from a path, or initialised (and "
                               "pretrained by the demo).", factory=ModelSpec)
    student: ModelSpec = field(doc="The student: loaded from a path, or initialised from "
                               "train.seed.", factory=ModelSpec)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_model_spec(self.teacher, "model.teacher", required=False)
        _check_model_spec(self.student, "model.student", required=True)
        if self.teacher.param_dtype is not None:
            raise ConfigError(f"model.teacher.param_dtype: the teacher is never updated, so its "
                              f"parameters stay in model.teacher.dtype; remove it (got "
                              f"{self.teacher.param_dtype!r}; it applies to the student)")

    @property
    def has_teacher(self) -> bool:
        """True when the teacher is described (a path or an architecture)."""
        return self.teacher.path is not None or self.teacher.hidden_size is not None

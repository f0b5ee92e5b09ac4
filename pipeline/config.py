"""Typed run configuration: frozen dataclasses per concern, loaded from YAML and checked.

A run is described by one ``RunConfig`` composed of sections (``model``, ``data``, ``cache``,
``loss``, ``optimizer``, ``train``, ``mesh``, ``checkpoint``, ``eval``, ``logging``,
``cluster``). ``load_config("configs/demo.yaml")`` reads a YAML file and returns it; every key
is checked on the way in:

- an unknown key is refused with the closest known one (``loss.temprature: unknown key; did
  you mean 'temperature'?``);
- a value of the wrong type or out of range is refused with its path
  (``loss.temperature: expected > 0, got 0``);
- fields that depend on each other are checked together (``train.global_batch_size (10) must
  be divisible by train.grad_accum_steps * cluster.student.hosts (4)``).

All of these raise ``pipeline.errors.ConfigError``. A config is never mutated after loading;
derived values are methods. Each section documents its fields in ``dataclasses.field``
metadata, from which ``render_reference()`` generates ``docs/config-reference.md``
(``python -m pipeline.config docs/config-reference.md`` rewrites it; a test keeps it current).

``config_hash(cfg)`` identifies the fields that change what a run computes (not paths, logging,
checkpoint cadence or the cluster layout), so a checkpoint can refuse to resume under another
config while a run may still move to other hosts or another directory.

``build_schedule`` / ``build_optimizer`` turn the ``optimizer`` section into optax objects.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from pipeline.errors import ConfigError

Dtype = Literal["float32", "bfloat16"]
TeacherSource = Literal["offline", "live", "remote", "hybrid"]


def _field(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = dataclasses.MISSING,
           gt: float | None = None, ge: float | None = None, lt: float | None = None,
           le: float | None = None, hashed: bool = True) -> Any:
    """A documented config field with optional bounds.

    ``hashed=False`` keeps the field out of ``config_hash``: it changes where or how often
    things happen, not what is computed.
    """
    bounds = {name: value for name, value in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le))
              if value is not None}
    metadata = {"doc": doc, "bounds": bounds, "hashed": hashed}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_BOUND_TEXT = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_BOUND_OK = {"gt": lambda v, b: v > b, "ge": lambda v, b: v >= b,
             "lt": lambda v, b: v < b, "le": lambda v, b: v <= b}


def _hint(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        key, value = typing.get_args(tp)
        return f"mapping {_type_name(key)} -> {_type_name(value)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "section"
    return tp.__name__


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if isinstance(value, str) else repr(value)


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form.

    YAML lists become tuples, mappings for a section become that section's dataclass, ints are
    accepted (and converted) where a float is expected.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got null")
        non_null = [a for a in options if a is not type(None)]
        if len(non_null) == 1:
            return _coerce(path, value, non_null[0])
        raise TypeError(f"unsupported annotation {tp}")  # a kdpipe bug, not user input
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool):
            raise ConfigError(f"{path}: expected one of {', '.join(map(repr, choices))}, "
                              f"got {_describe(value)}{_hint(value, choices)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {_describe(value)}")
        item_type = typing.get_args(tp)[0]
        return tuple(_coerce(f"{path}[{i}]", item, item_type) for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {_describe(value)}")
        key_type, value_type = typing.get_args(tp)
        return {_coerce(f"{path} key", k, key_type): _coerce(f"{path}.{k}", v, value_type)
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a section (a mapping of keys), got {_describe(value)}")
        return _build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        # PyYAML follows YAML 1.1, which reads `1e-3` (no dot) as a string: accept numeric
        # strings here rather than make every user write `1.0e-3`.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported annotation {tp}")  # a kdpipe bug, not user input


def _number(value: float) -> str:
    return format(value, "g") if isinstance(value, float) else repr(value)


def _check_bounds(path: str, value: Any, bounds: Mapping[str, float]) -> None:
    if value is None or isinstance(value, (str, bool, tuple, dict)) or dataclasses.is_dataclass(value):
        return
    for kind, bound in bounds.items():
        if not _BOUND_OK[kind](value, bound):
            raise ConfigError(f"{path}: expected {_BOUND_TEXT[kind]} {_number(bound)}, "
                              f"got {_number(value)}")


def _check_fields(section: Any, prefix: str) -> None:
    """Coerce and bound-check every field of ``section`` in place (used by ``__post_init__``)."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        path = f"{prefix}.{f.name}" if prefix else f.name
        value = _coerce(path, getattr(section, f.name), hints[f.name])
        _check_bounds(path, value, f.metadata.get("bounds", {}))
        object.__setattr__(section, f.name, value)


def _build(cls: type, mapping: Mapping[str, Any], path: str) -> Any:
    """Build ``cls`` from a mapping, naming the full key path of any bad key or value."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in mapping.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"{key_path}: unknown key{_hint(key, fields)} "
                              f"(known keys: {', '.join(fields)})")
        # Check here with the full path, so that an error deep inside names e.g.
        # `cluster.student.hosts` and not just `hosts`.
        kwargs[key] = _coerce(key_path, value, hints[key])
        _check_bounds(key_path, kwargs[key], fields[key].metadata.get("bounds", {}))
    missing = [name for name, f in fields.items() if name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{path + '.' if path else ''}{missing[0]}: required key is missing")
    return cls(**kwargs)


class _Section:
    """Base of every config section: fields are checked however the section is built."""

    PATH: ClassVar[str] = ""

    def __post_init__(self) -> None:
        _check_fields(self, self.PATH)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------

_ARCH_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclasses.dataclass(frozen=True)
class ModelSpec(_Section):
    """One model: a Hugging Face directory to load, or an architecture to initialise."""

    PATH: ClassVar[str] = "model.<teacher|student>"
    path: str | None = _field(None, "Hugging Face model directory (config.json + *.safetensors). "
                              "When set, the architecture comes from its config.json and the size "
                              "fields below must stay unset.", hashed=False)
    vocab_size: int | None = _field(None, "Vocabulary size; unset: the tokenizer's size.", gt=0)
    hidden_size: int | None = _field(None, "Width of the residual stream.", gt=0)
    intermediate_size: int | None = _field(None, "Width of the MLP's hidden layer.", gt=0)
    num_hidden_layers: int | None = _field(None, "Number of decoder layers.", gt=0)
    num_attention_heads: int | None = _field(None, "Query heads per layer.", gt=0)
    num_key_value_heads: int | None = _field(None, "Key/value heads (grouped-query attention); "
                                             "unset: num_attention_heads.", gt=0)
    max_position_embeddings: int = _field(2048, "Longest sequence the model is built for; "
                                          "data.seq_len may not exceed it (nor, for a model "
                                          "loaded from path, its config.json's).", gt=0)
    rope_theta: float = _field(10000.0, "Rotary embedding base.", gt=0)
    rms_norm_eps: float = _field(1e-5, "Epsilon of the RMS norms.", gt=0)
    tie_word_embeddings: bool = _field(True, "Share the embedding table with the output head.")
    dtype: Dtype = _field("float32", "Compute dtype: embeddings, activations and matmuls "
                          "(logits are float32); an exported student is written in it.")
    param_dtype: Dtype | None = _field(
        None, "Student only: dtype of the parameters and optimizer state (master weights), cast "
        "to dtype where used. null: float32, so that updates far below bfloat16's spacing "
        "(2^-8 at 1.0) are kept. The teacher, never updated, keeps its parameters in dtype.")

    @property
    def from_pretrained(self) -> bool:
        """True when the model is loaded from ``path`` rather than initialised."""
        return self.path is not None

    def hf_config(self, tokenizer_vocab_size: int) -> dict[str, Any]:
        """The architecture as a Hugging Face ``config.json`` dict (Llama family), for a model
        that is initialised rather than loaded; ``vocab_size`` falls back to the tokenizer's."""
        if self.from_pretrained:
            raise ValueError("hf_config() describes an initialised model; this one is loaded from path")
        heads = self.num_attention_heads
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
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
class ModelConfig(_Section):
    """The teacher and the student."""

    PATH: ClassVar[str] = "model"
    teacher: ModelSpec = _field(doc="The teacher: loaded from a path, or initialised (and "
                                "pretrained by the demo).", factory=ModelSpec)
    student: ModelSpec = _field(doc="The student: loaded from a path, or initialised from "
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


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
    """Raw inputs, tokenizer, packing, the prepared token dataset and the sample order."""

    PATH: ClassVar[str] = "data"
    sources: tuple[str, ...] = _field((), "Input files, directories or glob patterns (`**` "
                                      "recurses), read in this order. By extension: .jsonl "
                                      "(one JSON object a line), .parquet, .arrow (Hugging Face "
                                      "`datasets` files); any other file is one UTF-8 text "
                                      "document. A directory stands for its .jsonl/.parquet/"
                                      ".arrow/.txt files.", hashed=False)
    tokenizer: str = _field("tokenizer.json", "Hugging Face `tokenizer.json` file (or a "
                            "directory holding one).", hashed=False)
    prepared_dir: str = _field("data/prepared", "Directory of the prepared token dataset "
                               "(written by prepare-data, read by cache/train/eval).", hashed=False)
    seq_len: int = _field(512, "Tokens per training sequence; at most the student's and the "
                          "teacher's max_position_embeddings.", gt=0)
    pack: bool = _field(True, "Concatenate documents (each followed by eos_token) and cut the "
                        "stream into seq_len windows; false: every document starts a new row.")
    eos_token: str | None = _field("<|endoftext|>", "Token appended after every document; must "
                                   "exist in the tokenizer. null: none.")
    text_field: str = _field("text", "JSONL key / column holding a plain document (loss on "
                             "every token).")
    prompt_field: str = _field("prompt", "JSONL key / column of a prompt (no loss on its tokens).")
    completion_field: str = _field("completion", "JSONL key / column of the completion that "
                                   "follows the prompt (loss only on these tokens).")
    eval_fraction: float = _field(0.05, "Share of documents held out for eval. A document is held "
                                  "out when the first 8 bytes of the SHA-256 of its text, read "
                                  "as a fraction of 2^64, fall below this value: stable under "
                                  "reordering, renaming and appending data.", ge=0.0, lt=1.0)
    seed: int = _field(0, "Seed of the sample order; (seed, epoch) fix each epoch's permutation.")
    shuffle_window: int = _field(
        0, "0: each epoch is a uniform shuffle of all rows. N > 0: each epoch visits blocks of N "
        "consecutive rows in a random order and the rows of each block in a random order, so "
        "the first steps of `kdpipe run` (offline) need only the first cache shards, not nearly "
        "all of them. Use a multiple of cache.shard_sequences, and blocks of many documents.",
        ge=0)
    rows_per_shard: int = _field(8192, "Rows per parquet shard file of the prepared dataset.",
                                 gt=0, hashed=False)


@dataclasses.dataclass(frozen=True)
class CacheConfig(_Section):
    """The teacher-output cache (omit the section for a live or remote teacher only). Field names
    follow ``pipeline.cache.format.TargetSpec`` and ``CacheManifest``."""

    PATH: ClassVar[str] = "cache"
    path: str = _field("cache", "Cache location: a local directory or a TensorStore kvstore URL "
                       "(gs://bucket/prefix/).", hashed=False)
    mode: Literal["full", "topk", "sampled"] = _field("topk", "What is stored per token: all "
                                                      "logits, the top k log-probabilities plus "
                                                      "the tail mass, or n_draws sampled ids with "
                                                      "counts and the teacher entropy.")
    k: int = _field(64, "Top-k size (mode topk).", gt=0)
    n_draws: int = _field(64, "Draws per token (mode sampled).", gt=0, le=255)
    value_dtype: Literal["q8", "bfloat16", "float32"] | None = _field(
        None, "Stored values: q8 (8-bit log-probs with a per-token scale; topk only), bfloat16 or "
        "float32. null: q8 for topk, float32 for full; must stay null for sampled.")
    id_encoding: Literal["gap", "packed"] = _field("gap", "Token ids as sorted gaps (smaller) or "
                                                   "fixed-width packed bits.")
    temperature: float | None = _field(None, "T_cache: the teacher temperature the topk/sampled "
                                       "targets are taken at; such a cache only serves "
                                       "loss.temperature == T_cache. null: loss.temperature.",
                                       gt=0.0)
    seed: int = _field(0, "Seed of the sampled draws (mode sampled).")
    shard_sequences: int = _field(256, "Sequences per cache shard: the unit one teacher host "
                                  "writes and commits.", gt=0, hashed=False)
    chunk_sequences: int = _field(1, "Sequences per inner chunk: the unit a reader fetches; must "
                                  "divide shard_sequences.", gt=0, hashed=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode == "sampled" and self.value_dtype is not None:
            raise ConfigError(f"cache.value_dtype: must be null in mode sampled (it stores counts), "
                              f"got {self.value_dtype!r}")
        if self.mode == "full" and self.value_dtype == "q8":
            raise ConfigError("cache.value_dtype: q8 is for mode topk; use bfloat16 or float32 "
                              "in mode full")
        if self.shard_sequences % self.chunk_sequences:
            raise ConfigError(f"cache.chunk_sequences ({self.chunk_sequences}) must divide "
                              f"cache.shard_sequences ({self.shard_sequences})")


@dataclasses.dataclass(frozen=True)
class LossConfig(_Section):
    """The distillation loss (``pipeline.losses.targets_distillation_loss`` and friends)."""

    PATH: ClassVar[str] = "loss"
    temperature: float = _field(4.0, "Softmax temperature T of teacher and student; the KL term "
                                "is scaled by T^2.", gt=0.0)
    alpha: float = _field(0.9, "Weight of the KL term; (1 - alpha) weighs the hard-label CE.",
                          ge=0.0, le=1.0)
    use_hard_labels: bool = _field(False, "Add the cross-entropy on the dataset's labels.")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = _field(
        "forward_kl", "KL(teacher || student), KL(student || teacher), or the generalised "
        "Jensen-Shannon divergence with weight beta.")
    beta: float = _field(0.5, "Mixture weight of the generalised JSD.", ge=0.0, le=1.0)
    hidden_state_weight: float = _field(0.0, "Weight of the hidden-state loss (0: off).", ge=0.0)
    hidden_state_layers: tuple[int, ...] | None = _field(None, "Indices into hidden_states "
                                                         "(negatives count from the end); null: all.")
    hidden_state_loss: Literal["mse", "cosine"] = _field(
        "mse", "Hidden-state distance: mse (summed over features) or cosine (1 - cosine similarity).")
    attention_weight: float = _field(0.0, "Weight of the attention-map MSE (0: off).", ge=0.0)
    attention_layers: tuple[int, ...] | None = _field(None, "Layer indices for the attention "
                                                      "loss; null: all.")
    attention_normalize: bool = _field(False, "Row-normalise attention maps before the MSE.")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(_Section):
    """AdamW with linear warmup then cosine decay (``build_optimizer``)."""

    PATH: ClassVar[str] = "optimizer"
    learning_rate: float = _field(3e-4, "Peak learning rate, reached after warmup_steps.", gt=0.0)
    warmup_steps: int = _field(100, "Steps of linear warmup from 0 to learning_rate.", ge=0)
    decay_steps: int | None = _field(None, "Step at which the cosine decay reaches its end "
                                     "(counted from step 0); null: train.steps.", gt=0)
    min_lr_ratio: float = _field(0.1, "Final learning rate as a fraction of learning_rate.",
                                 ge=0.0, le=1.0)
    b1: float = _field(0.9, "Adam beta1.", ge=0.0, lt=1.0)
    b2: float = _field(0.95, "Adam beta2.", ge=0.0, lt=1.0)
    eps: float = _field(1e-8, "Adam epsilon.", gt=0.0)
    weight_decay: float = _field(0.1, "Decoupled weight decay, applied to matrices only (not to "
                                 "norm scales or biases).", ge=0.0)
    clip_grad_norm: float | None = _field(1.0, "Clip gradients to this global norm; null: no "
                                          "clipping.", gt=0.0)


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Section):
    """Steps, batch sizes and gradient accumulation."""

    PATH: ClassVar[str] = "train"
    steps: int = _field(1000, "Optimizer steps of the run.", gt=0)
    global_batch_size: int = _field(32, "Sequences per optimizer step, over all student hosts.", gt=0)
    grad_accum_steps: int = _field(1, "Microbatches per step on each host (token-weighted "
                                   "accumulation). Not in the config hash: a resumed run may "
                                   "change it to fit fewer hosts.", gt=0, hashed=False)
    seed: int = _field(0, "Seed of the student's initialisation and of the step's RNG.")
    logits_chunk_size: int = _field(0, "Tokens per chunk of the fused output head + loss "
                                    "(pipeline.fused_head); 0: materialise the full logits.",
                                    ge=0, hashed=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.global_batch_size % self.grad_accum_steps:
            raise ConfigError(f"train.grad_accum_steps ({self.grad_accum_steps}) must divide "
                              f"train.global_batch_size ({self.global_batch_size})")

    def micro_batch_size(self, hosts: int) -> int:
        """Sequences per microbatch on each of ``hosts`` hosts."""
        return self.global_batch_size // (hosts * self.grad_accum_steps)


@dataclasses.dataclass(frozen=True)
class MeshConfig(_Section):
    """Device mesh of the student group: axis sizes; -1 takes the remaining devices."""

    PATH: ClassVar[str] = "mesh"
    AXES: ClassVar[tuple[str, ...]] = ("data", "fsdp", "tensor")
    data: int = _field(-1, "Data-parallel axis (batch split, parameters replicated).", ge=-1)
    fsdp: int = _field(1, "Fully sharded data-parallel axis (batch and parameters split).", ge=-1)
    tensor: int = _field(1, "Tensor-parallel axis (heads and MLP width split).", ge=-1)

    def __post_init__(self) -> None:
        super().__post_init__()
        sizes = [getattr(self, axis) for axis in self.AXES]
        for axis, size in zip(self.AXES, sizes):
            if size == 0:
                raise ConfigError(f"mesh.{axis}: expected >= 1 or -1 (the remaining devices), got 0")
        if sizes.count(-1) > 1:
            raise ConfigError("mesh: at most one axis may be -1 (the remaining devices); got "
                              + ", ".join(f"{a}={s}" for a, s in zip(self.AXES, sizes)))

    def shape(self, num_devices: int) -> tuple[int, ...]:
        """Axis sizes for ``num_devices`` devices, in the order of ``AXES``."""
        fixed = 1
        for axis in self.AXES:
            fixed *= max(getattr(self, axis), 1)
        sizes = [getattr(self, axis) for axis in self.AXES]
        if -1 in sizes:
            if num_devices % fixed:
                raise ConfigError(f"mesh: the fixed axes ({fixed} devices) do not divide the "
                                  f"{num_devices} devices available")
            sizes[sizes.index(-1)] = num_devices // fixed
        elif fixed != num_devices:
            raise ConfigError(f"mesh: axis sizes multiply to {fixed} but {num_devices} devices "
                              f"are available")
        return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(_Section):
    """Orbax checkpoints in ``<run_dir>/checkpoints``."""

    PATH: ClassVar[str] = "checkpoint"
    every_steps: int = _field(100, "Save every this many steps (and at the end, and on SIGTERM).",
                              gt=0, hashed=False)
    keep: int = _field(3, "Newest checkpoints kept; older ones are deleted.", gt=0, hashed=False)
    async_save: bool = _field(True, "Write in the background while training continues.",
                              hashed=False)


@dataclasses.dataclass(frozen=True)
class EvalConfig(_Section):
    """Held-out evaluation: student CE, KL to the teacher, top-1 agreement."""

    PATH: ClassVar[str] = "eval"
    every_steps: int = _field(100, "Evaluate every this many steps (and at the end); 0: never.",
                              ge=0, hashed=False)
    batch_size: int = _field(16, "Sequences per eval batch, over all hosts.", gt=0, hashed=False)
    max_batches: int | None = _field(None, "Stop after this many batches; null: the whole "
                                     "held-out split.", gt=0, hashed=False)


@dataclasses.dataclass(frozen=True)
class LoggingConfig(_Section):
    """Metrics and progress output (``<run_dir>/metrics.jsonl``, TensorBoard, report.md)."""

    PATH: ClassVar[str] = "logging"
    every_steps: int = _field(10, "Log training metrics every this many steps.", gt=0, hashed=False)
    tensorboard: bool = _field(True, "Also write TensorBoard event files.", hashed=False)
    progress: bool = _field(True, "Show progress: a live bar on a terminal, plain lines "
                            "otherwise.", hashed=False)
    progress_every_s: float = _field(10.0, "Without a terminal (output to a file, a Ray job's "
                                     "log), print a plain progress line (done/total, rate, ETA) "
                                     "this often, in seconds, besides the start and end of each "
                                     "phase.", gt=0, hashed=False)
    report: bool = _field(True, "Write report.md with plots at the end.", hashed=False)
    example_ids: bool = _field(False, "Test mode: each host appends the rows every step trained "
                               "on to <run_dir>/examples/host-<i>-of-<n>.jsonl (records past the "
                               "checkpoint are dropped on resume), to check that every example is "
                               "seen exactly once across restarts.", hashed=False)


@dataclasses.dataclass(frozen=True)
class GroupConfig(_Section):
    """A host group: one Ray actor per host."""

    PATH: ClassVar[str] = "cluster.<teacher|student>"
    hosts: int = _field(1, "Hosts to start with.", gt=0, hashed=False)
    min_hosts: int | None = _field(None, "Fewest hosts the group may shrink to after a loss and "
                                   "keep going; null: hosts.", gt=0, hashed=False)
    max_hosts: int | None = _field(None, "Most hosts the group may grow to when nodes join; "
                                   "null: hosts.", gt=0, hashed=False)
    resources: dict[str, float] = _field(doc="Ray resources each host's actor reserves, e.g. "
                                         "{TPU: 4} on a v4 host or {CPU: 1} on a laptop; custom "
                                         "resources keep the groups on separate nodes.",
                                         factory=lambda: {"CPU": 1.0}, hashed=False)

    @property
    def fewest_hosts(self) -> int:
        return self.hosts if self.min_hosts is None else self.min_hosts

    @property
    def most_hosts(self) -> int:
        return self.hosts if self.max_hosts is None else self.max_hosts


def _check_group(group: GroupConfig, path: str) -> None:
    for name, value in group.resources.items():
        if value < 0:
            raise ConfigError(f"{path}.resources.{name}: expected >= 0, got {value!r}")
    if not group.fewest_hosts <= group.hosts <= group.most_hosts:
        raise ConfigError(f"{path}: expected min_hosts <= hosts <= max_hosts, got "
                          f"min_hosts={group.fewest_hosts}, hosts={group.hosts}, "
                          f"max_hosts={group.most_hosts}")


@dataclasses.dataclass(frozen=True)
class ClusterConfig(_Section):
    """Where the run executes: the Ray address, the two host groups and the teacher source."""

    PATH: ClassVar[str] = "cluster"
    address: str | None = _field(None, "Ray address to join; null: start an embedded local Ray "
                                 "(RAY_ADDRESS or --address override it).", hashed=False)
    teacher_source: TeacherSource | None = _field(
        None, "offline: the teacher group fills the cache and the student reads it; live: the "
        "teacher runs inside the student step; remote: teacher actors send targets ahead of need; "
        "hybrid: cached where committed, remote otherwise. null: offline when a cache section "
        "exists.", hashed=False)
    teacher: GroupConfig = _field(doc="Teacher hosts (offline, remote, hybrid).", factory=GroupConfig,
                                  hashed=False)
    student: GroupConfig = _field(doc="Student hosts: one JAX program across them.",
                                  factory=GroupConfig, hashed=False)
    max_failures: int = _field(3, "Restarts after failures (errors, dead actors) before the run "
                               "gives up.", ge=0, hashed=False)
    max_preemptions: int = _field(10, "Restarts after preemptions (SIGTERM, lost nodes) before "
                                  "the run gives up.", ge=0, hashed=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_group(self.teacher, "cluster.teacher")
        _check_group(self.student, "cluster.student")


@dataclasses.dataclass(frozen=True)
class DemoConfig(_Section):
    """What only ``kdpipe demo`` uses: its corpus, tokenizer and teacher pretraining."""

    PATH: ClassVar[str] = "demo"
    max_files: int = _field(80, "Python standard-library .py files of the running interpreter, "
                            "taken evenly spaced from the sorted list (a fixed selection).", gt=0)
    tokenizer_vocab_size: int = _field(2048, "Vocabulary of the byte-level BPE tokenizer trained "
                                       "on the selection.", gt=256)
    teacher_steps: int = _field(400, "Hard-label pretraining steps of the teacher.", gt=0)
    teacher_learning_rate: float = _field(3e-3, "Peak learning rate of the teacher pretraining "
                                          "(same schedule shape as optimizer).", gt=0.0)


@dataclasses.dataclass(frozen=True)
class RunConfig(_Section):
    """A whole run."""

    model: ModelConfig = _field(doc="Teacher and student models (required: at least the student).")
    run_dir: str = _field("runs/run", "Directory of checkpoints, metrics, report and export.",
                          hashed=False)
    data: DataConfig = _field(doc="Dataset preparation and order.", factory=DataConfig)
    cache: CacheConfig | None = _field(None, "Teacher-output cache; null/absent: no cache (the "
                                       "teacher must then be live or remote).")
    loss: LossConfig = _field(doc="Distillation loss.", factory=LossConfig)
    optimizer: OptimizerConfig = _field(doc="Optimizer and schedule.", factory=OptimizerConfig)
    train: TrainConfig = _field(doc="Steps and batch sizes.", factory=TrainConfig)
    mesh: MeshConfig = _field(doc="Student device mesh.", factory=MeshConfig, hashed=False)
    checkpoint: CheckpointConfig = _field(doc="Checkpointing.", factory=CheckpointConfig, hashed=False)
    eval: EvalConfig = _field(doc="Held-out evaluation.", factory=EvalConfig, hashed=False)
    logging: LoggingConfig = _field(doc="Metrics and progress.", factory=LoggingConfig, hashed=False)
    cluster: ClusterConfig = _field(doc="Hosts and teacher source.", factory=ClusterConfig, hashed=False)
    demo: DemoConfig | None = _field(None, "Settings of `kdpipe demo` (ignored by other verbs).",
                                     hashed=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_teacher_source()
        self._check_context()
        self._check_batch_split()
        self._check_schedule()

    @property
    def teacher_source(self) -> TeacherSource:
        """``cluster.teacher_source``, or ``offline`` when unset (a cache is then configured)."""
        return self.cluster.teacher_source or "offline"

    @property
    def cache_temperature(self) -> float:
        """T_cache of the configured cache: ``cache.temperature``, or ``loss.temperature``."""
        if self.cache is None or self.cache.temperature is None:
            return self.loss.temperature
        return self.cache.temperature

    def cache_target_fields(self) -> dict[str, Any]:
        """Keyword arguments of ``pipeline.cache.format.TargetSpec`` for the configured cache
        (all but ``vocab_size`` and ``tokenizer_vocab_size``, which come from the model and the
        tokenizer); fields of other modes are None, as TargetSpec requires."""
        if self.cache is None:
            raise ConfigError("cache: no cache section is configured")
        cache = self.cache
        return {"mode": cache.mode,
                "k": cache.k if cache.mode == "topk" else None,
                "n_draws": cache.n_draws if cache.mode == "sampled" else None,
                "value_dtype": cache.value_dtype,
                "id_encoding": cache.id_encoding,
                "temperature": None if cache.mode == "full" else self.cache_temperature,
                "seed": cache.seed}

    @property
    def checkpoint_dir(self) -> str:
        return str(Path(self.run_dir) / "checkpoints")

    def student_host_counts(self) -> tuple[int, ...]:
        """Student host counts in [min_hosts, max_hosts] that split the global batch evenly
        into grad_accum_steps microbatches: the sizes the student group may re-form with."""
        group, train = self.cluster.student, self.train
        return tuple(n for n in range(group.fewest_hosts, group.most_hosts + 1)
                     if train.global_batch_size % (n * train.grad_accum_steps) == 0)

    @property
    def hard_labels_only(self) -> bool:
        """True when the loss is the cross-entropy on the labels alone (``loss.alpha == 0`` with
        ``loss.use_hard_labels``): training needs no teacher targets."""
        return self.loss.alpha == 0.0 and self.loss.use_hard_labels

    def _check_teacher_source(self) -> None:
        source = self.cluster.teacher_source
        if source is None and self.cache is None and self.hard_labels_only:
            return  # a plain language-model run (the demo's teacher pretraining and baseline)
        if source is None and self.cache is None:
            raise ConfigError("cache: neither a cache nor a live teacher is configured; add a "
                              "`cache:` section, or set cluster.teacher_source: live (or remote), "
                              "or train on hard labels alone (loss.alpha: 0 with "
                              "loss.use_hard_labels: true)")
        if self.teacher_source in ("offline", "hybrid") and self.cache is None:
            raise ConfigError(f"cache: cluster.teacher_source '{self.teacher_source}' reads teacher "
                              f"targets from a cache, but there is no `cache:` section")
        if self.teacher_source in ("live", "remote", "hybrid") and not self.model.has_teacher:
            raise ConfigError(f"model.teacher: cluster.teacher_source '{self.teacher_source}' runs "
                              f"the teacher, but model.teacher has neither a path nor an architecture")
        cache = self.cache
        if (cache is not None and cache.mode != "full" and cache.temperature is not None
                and cache.temperature != self.loss.temperature):
            raise ConfigError(f"cache.temperature ({cache.temperature}) must equal loss.temperature "
                              f"({self.loss.temperature}) in {cache.mode} mode: the stored targets "
                              f"are taken at that temperature (only mode full serves any)")

    def _check_context(self) -> None:
        # Models loaded from a path are checked when they are loaded (pipeline.train).
        for name in ("student", "teacher"):
            spec = getattr(self.model, name)
            if spec.path is None and spec.hidden_size is not None:
                check_context(self.data.seq_len, f"model.{name}", spec.max_position_embeddings)

    def _check_batch_split(self) -> None:
        train, group = self.train, self.cluster.student
        per_step = group.hosts * train.grad_accum_steps
        if train.global_batch_size % per_step:
            raise ConfigError(f"train.global_batch_size ({train.global_batch_size}) must be "
                              f"divisible by train.grad_accum_steps * cluster.student.hosts "
                              f"({train.grad_accum_steps} * {group.hosts} = {per_step})")
        if self.eval.batch_size % group.hosts:
            raise ConfigError(f"eval.batch_size ({self.eval.batch_size}) must be divisible by "
                              f"cluster.student.hosts ({group.hosts})")

    def _check_schedule(self) -> None:
        opt, steps = self.optimizer, self.train.steps
        decay = opt.decay_steps or steps
        if opt.warmup_steps > decay:
            raise ConfigError(f"optimizer.warmup_steps ({opt.warmup_steps}) must not exceed the decay "
                              f"horizon ({'optimizer.decay_steps' if opt.decay_steps else 'train.steps'}"
                              f" = {decay})")


# --------------------------------------------------------------------------------------------
# Loading, hashing, reference
# --------------------------------------------------------------------------------------------

def _set_override(tree: dict, override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected KEY.PATH=VALUE, e.g. loss.temperature=2.0")
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: cannot set a key inside {part!r}, which is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw)


def config_from_dict(raw: Mapping[str, Any], overrides: tuple[str, ...] | list[str] = ()) -> RunConfig:
    """Build and check a ``RunConfig`` from plain data (a parsed YAML document).

    ``overrides`` are ``"section.key=value"`` strings applied first; the value is parsed as YAML
    (``train.steps=20``, ``cache=null``).
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: expected a mapping of sections at the top level, got "
                          f"{type(raw).__name__}")
    tree = json.loads(json.dumps(raw, default=str))  # a deep, plain copy that overrides may edit
    for override in overrides:
        _set_override(tree, override)
    return _build(RunConfig, tree, "")


def load_config(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> RunConfig:
    """Read a YAML config file, apply ``overrides`` and return the checked ``RunConfig``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file ({e})") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if raw is None:
        raise ConfigError(f"{path}: the config file is empty")
    try:
        return config_from_dict(raw, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def config_to_dict(config: Any, *, hashed_only: bool = False) -> Any:
    """The config as plain JSON-able data (tuples become lists). ``hashed_only`` keeps only the
    fields that ``config_hash`` covers."""
    if not dataclasses.is_dataclass(config):
        if isinstance(config, tuple):
            return list(config)
        return dict(config) if isinstance(config, dict) else config
    out = {}
    for f in dataclasses.fields(config):
        if hashed_only and not f.metadata.get("hashed", True):
            continue
        out[f.name] = config_to_dict(getattr(config, f.name), hashed_only=hashed_only)
    return out


def stable_hash(data: Any) -> str:
    """SHA-256 (hex, 16 characters) of the canonical JSON of ``data``: equal for equal data,
    across processes, machines and Python versions."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_hash(config: RunConfig) -> str:
    """Hash of the fields that change what a run computes (model, data, cache, loss, optimizer,
    steps, batch size, seeds). Paths, cadences, logging and the cluster/mesh layout are left out
    so that a run can resume elsewhere or on another number of hosts."""
    return stable_hash(config_to_dict(config, hashed_only=True))


def _default_text(f: dataclasses.Field) -> str:
    if dataclasses.is_dataclass(f.default_factory):
        return "(section)"
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        value = f.default
    if value is dataclasses.MISSING:
        return "required"
    return "null" if value is None else json.dumps(config_to_dict(value))


def _bound_text(f: dataclasses.Field) -> str:
    return ", ".join(f"{_BOUND_TEXT[k]} {_number(v)}" for k, v in f.metadata.get("bounds", {}).items())


def render_reference() -> str:
    """Markdown reference of every config field: key path, type, default, range and doc."""
    lines = ["# kdpipe config reference", "",
             "Generated by `python -m pipeline.config docs/config-reference.md` from "
             "`pipeline/config.py`; do not edit by hand.", "",
             "Unknown keys, wrong types and out-of-range values are refused with the key's path. "
             "Fields marked *hashed* are part of the config hash that a checkpoint must match "
             "to be resumed. Relative paths are relative to the directory the command runs in.",
             ""]

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    def section(cls: type, path: str, title_doc: str, parent_hashed: bool) -> None:
        hints = typing.get_type_hints(cls)
        lines.extend([f"## `{path or 'top level'}`", "", title_doc.strip(), "",
                      "| key | type | default | range | hashed | description |",
                      "|---|---|---|---|---|---|"])
        nested = []
        for f in dataclasses.fields(cls):
            key = f"{path}.{f.name}" if path else f.name
            tp = hints[f.name]
            inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
            sub = tp if dataclasses.is_dataclass(tp) else (inner[0] if inner else None)
            hashed = parent_hashed and f.metadata.get("hashed", True)
            if sub is not None:
                nested.append((sub, key, f.metadata.get("doc", ""), hashed))
            lines.append(f"| `{key}` | {cell(_type_name(tp))} | `{cell(_default_text(f))}` | "
                         f"{_bound_text(f)} | {'yes' if hashed else 'no'} | "
                         f"{cell(f.metadata.get('doc', ''))} |")
        lines.append("")
        for sub, key, doc, hashed in nested:
            section(sub, key, f"{sub.__doc__.strip()} {doc}", hashed)

    section(RunConfig, "", RunConfig.__doc__, True)
    return "\n".join(lines).rstrip() + "\n"


def build_schedule(optimizer: OptimizerConfig, total_steps: int):
    """Learning rate per step: linear warmup, then cosine decay.

    .. math::
      \\eta(s) = \\eta_{max} s / w                         \\quad s < w \\\\
      \\eta(s) = \\eta_{end} + (\\eta_{max} - \\eta_{end})(1 + \\cos(\\pi \\min(1, (s-w)/(D-w))))/2
      \\quad s \\ge w

    with w = warmup_steps, D = decay_steps (or ``total_steps``) and
    η_end = min_lr_ratio · learning_rate.

    Returns an ``optax.Schedule`` (step -> learning rate).
    """
    import optax

    decay = optimizer.decay_steps or total_steps
    peak = optimizer.learning_rate
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=optimizer.warmup_steps,
        decay_steps=decay, end_value=peak * optimizer.min_lr_ratio)


def _decay_mask(params: Any) -> Any:
    # Decaying norm scales and biases pulls them towards 0 and hurts; only matrices decay.
    import jax
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def build_optimizer(optimizer: OptimizerConfig, total_steps: int):
    """``optax`` AdamW on ``build_schedule``'s learning rate, after global-norm clipping.

    Weight decay applies to parameters with ``ndim >= 2`` only. Returns an
    ``optax.GradientTransformation``.
    """
    import optax

    adamw = optax.adamw(build_schedule(optimizer, total_steps), b1=optimizer.b1, b2=optimizer.b2,
                        eps=optimizer.eps, weight_decay=optimizer.weight_decay, mask=_decay_mask)
    if optimizer.clip_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(optimizer.clip_grad_norm), adamw)


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/config-reference.md")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_reference(), encoding="utf-8")
    print(f"wrote {target}")

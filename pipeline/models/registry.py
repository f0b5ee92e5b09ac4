"""The model families kdpipe reads, builds and writes, keyed by Hugging Face ``model_type``.

A family is one package (``pipeline/models/llama/``: its config class, its model, its tensor
name table) and one ``Family`` row in ``FAMILIES`` below. Everything else dispatches through
here: ``pipeline.models.hf_io`` reads and writes checkpoints with the family's name table,
``pipeline.models.build`` initialises a model of the family, and
``pipeline.config.ModelSpec.hf_config`` names the family's transformers class.

What a family's pieces provide:

- ``config``: a frozen, hashable dataclass with ``from_hf_config(dict)`` (a transformers
  ``config.json`` dict; ``ModelLoadError`` naming the key it refuses), ``to_hf_config()``, and
  the fields ``model_type``, ``vocab_size``, ``num_hidden_layers``, ``tie_word_embeddings``,
  ``max_position_embeddings``, ``initializer_range`` and ``extra_hf_fields`` (the last three
  are bookkeeping, left out of ``hf_io.teacher_fingerprint``).
- ``model``: ``model(config, *, dtype, param_dtype, attention, scan_layers, remat,
  batch_sharding, rngs)`` (``attention``: the implementation name of
  ``pipeline.models.attention``; ``scan_layers``, ``remat``: as ``pipeline.models.stack``'s
  ``make_layers`` and ``run_layers``, with its layers under ``layers``; ``batch_sharding``:
  ``None`` or the ``NamedSharding`` its activations are held split by), a module that follows
  the protocol of ``pipeline.models`` and keeps ``config`` and ``dtype`` as attributes.
- ``hf_names``: rows ``(Hugging Face name, our parameter path, layout)``, ``{i}`` the layer
  index, in transformers' save order (``pipeline.models.layouts``).
- ``ignored_tensor(config, name)``: True for a stored tensor loading skips, as transformers does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from pipeline.errors import ModelLoadError
from pipeline.models import llama
from pipeline.models.layouts import NameRow


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family (see the module docstring for what each piece provides).

    Attributes:
      architectures: ``model_type`` -> the transformers class that loads it (written into
        config.json's ``architectures``); the family serves exactly these model types.
    """

    architectures: Mapping[str, str]
    config: type
    model: Callable[..., Any]
    hf_names: tuple[NameRow, ...]
    ignored_tensor: Callable[[Any, str], bool]


FAMILIES: tuple[Family, ...] = (
    Family(architectures=llama.ARCHITECTURES, config=llama.LlamaConfig, model=llama.Llama,
           hf_names=llama.HF_NAMES, ignored_tensor=llama.ignored_tensor),
)

_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.architectures}
MODEL_TYPES: tuple[str, ...] = tuple(sorted(_BY_MODEL_TYPE))


def family_of(model_type: str, *, where: str = "model_type") -> Family:
    """The family serving ``model_type``.

    Raises:
      ModelLoadError: no family serves it; names ``where`` (the file or field it came from)
        and the supported model types.
    """
    if model_type not in _BY_MODEL_TYPE:
        raise ModelLoadError(f"{where}: model_type {model_type!r} is not supported; kdpipe loads "
                             f"{', '.join(MODEL_TYPES)}")
    return _BY_MODEL_TYPE[model_type]


def config_from_hf(hf: Mapping[str, Any]) -> Any:
    """The config of a transformers ``config.json`` dict, read by the family of its
    ``model_type``.

    Raises:
      ModelLoadError: ``model_type`` missing or unsupported, or the family refuses the config;
        messages start with ``config.json:``.
    """
    if "model_type" not in hf:
        raise ModelLoadError("config.json: missing required field 'model_type'")
    return family_of(hf["model_type"], where="config.json").config.from_hf_config(hf)

"""The model registry (dispatch on Hugging Face model_type) and build_model, the one loader."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pipeline.config import ModelSpec
from pipeline.errors import ConfigError, ModelLoadError
from pipeline.models.build import build_model, check_model_context, model_fingerprint
from pipeline.models.hf_io import load_pretrained, read_config
from pipeline.models.llama import Llama, LlamaConfig
from pipeline.models.registry import FAMILIES, MODEL_TYPES, config_from_hf, family_of

FIXTURES = Path(__file__).parent / "fixtures" / "hf"


def _params(model) -> dict:
    return {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model))}


def test_every_fixture_is_read_by_the_family_of_its_model_type():
    for fixture in sorted(p for p in FIXTURES.iterdir() if p.is_dir()):
        hf = json.loads((fixture / "config.json").read_text())
        config = config_from_hf(hf)
        assert config == LlamaConfig.from_hf_config(hf)
        architectures = family_of(hf["model_type"]).architectures
        assert architectures[hf["model_type"]] == hf["architectures"][0]
    assert MODEL_TYPES == ("llama", "mistral", "qwen2", "qwen3")
    served = [t for family in FAMILIES for t in family.architectures]
    assert len(served) == len(set(served)), "a model_type served by two families"


def test_unknown_model_type_names_where_and_what_is_supported():
    with pytest.raises(ModelLoadError, match=r"^model\.student: model_type 'gpt2' is not "
                                             r"supported; kdpipe loads llama, mistral, qwen2, qwen3$"):
        family_of("gpt2", where="model.student")
    with pytest.raises(ModelLoadError, match="^config.json: model_type 'phi3' is not supported"):
        config_from_hf({"model_type": "phi3", "vocab_size": 8})
    with pytest.raises(ModelLoadError, match="^config.json: missing required field 'model_type'"):
        config_from_hf({"vocab_size": 8})


def test_spec_config_goes_through_the_registry():
    spec = ModelSpec(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2)
    hf = spec.hf_config(tokenizer_vocab_size=40)
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["model_type"] == "llama"
    config = config_from_hf(hf)
    assert (config.vocab_size, config.hidden_size, config.head_dim) == (40, 16, 8)


def test_build_model_loads_a_frozen_teacher_in_its_dtype():
    spec = ModelSpec(path=str(FIXTURES / "qwen2_bias"), dtype="bfloat16")
    teacher = build_model(spec, frozen=True)  # no vocab, seed or mesh: a teacher host's load
    assert teacher.dtype == jnp.bfloat16
    want = _params(load_pretrained(spec.path, dtype="bfloat16"))
    got = _params(teacher)
    assert got.keys() == want.keys()
    for path in want:
        assert got[path].dtype == jnp.bfloat16, path
        np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
    # The same directory as a student to train: float32 master weights of the same values.
    student = _params(build_model(spec))
    for path in want:
        assert student[path].dtype == jnp.float32, path
        np.testing.assert_array_equal(student[path], want[path].astype(np.float32))


def test_build_model_initialises_a_spec():
    spec = ModelSpec(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, dtype="bfloat16")
    model = build_model(spec, 40, seed=3)
    assert isinstance(model, Llama) and model.config.vocab_size == 40
    assert all(v.dtype == jnp.float32 for v in _params(model).values())
    again = _params(build_model(spec, 40, seed=3))
    assert all(np.array_equal(again[k], v) for k, v in _params(model).items())
    assert model_fingerprint(spec, 40, 3) != model_fingerprint(spec, 40, 4)
    with pytest.raises(ValueError, match="needs vocab_size"):
        build_model(spec)


def test_context_check_reads_the_config_json_of_a_loaded_model():
    spec = ModelSpec(path=str(FIXTURES / "llama_gqa_tied"))
    limit = read_config(spec.path).max_position_embeddings
    check_model_context(spec, "teacher", limit)
    with pytest.raises(ConfigError, match=rf"model\.teacher\.max_position_embeddings \({limit}, "
                                        rf"in .*llama_gqa_tied/config\.json\)"):
        check_model_context(spec, "teacher", limit + 1)

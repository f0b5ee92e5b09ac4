"""Hugging Face checkpoint load/save: round trips, sharded files, refused directories, fingerprint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from pipeline.errors import ConfigError, ModelLoadError
from pipeline.models.hf_io import (DEFAULT_MAX_SHARD_BYTES, INDEX_FILE, SINGLE_FILE, load_pretrained,
                                   read_config, save_pretrained, teacher_fingerprint)
from pipeline.models.llama import Llama, LlamaConfig

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def _params(model) -> dict:
    return {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model))}


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for path in pa:
        assert pa[path].dtype == pb[path].dtype, path
        np.testing.assert_array_equal(pa[path], pb[path], err_msg=str(path))


@pytest.mark.parametrize("name", NAMES)
def test_save_then_load_gives_identical_params(name, tmp_path):
    model = load_pretrained(FIXTURES / name)
    save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", SINGLE_FILE]
    reloaded = load_pretrained(tmp_path)
    assert reloaded.config == model.config
    _assert_same_params(model, reloaded)


def test_bfloat16_round_trip(tmp_path):
    model = load_pretrained(FIXTURES / "qwen2_bias", dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.bfloat16 for v in _params(model).values())
    save_pretrained(model, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["dtype"] == hf["torch_dtype"] == "bfloat16"
    _assert_same_params(model, load_pretrained(tmp_path, dtype="bfloat16"))


# ---- our save holds what transformers wrote: the check that needs no torch ----

# The config.json keys transformers' modelling code reads, by model_type: fields of the config
# classes LlamaConfig, MistralConfig, Qwen2Config and Qwen3Config (transformers:
# src/transformers/models/<type>/configuration_<type>.py) that LlamaForCausalLM,
# MistralForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM use. RoPE is checked on its own
# below, in both transformers conventions.
_READ_BY_ALL = ("model_type", "architectures", "dtype", "vocab_size", "hidden_size",
                "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
                "max_position_embeddings", "tie_word_embeddings", "attention_dropout")
_QWEN_WINDOW = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")
TRANSFORMERS_READS = {
    "llama": _READ_BY_ALL + ("attention_bias", "mlp_bias"),
    "mistral": _READ_BY_ALL + ("sliding_window",),
    "qwen2": _READ_BY_ALL + _QWEN_WINDOW,
    "qwen3": _READ_BY_ALL + ("attention_bias",) + _QWEN_WINDOW,
}
# Keys kdpipe's save leaves to transformers: Qwen2Config/Qwen3Config default max_window_layers
# to 28 and derive layer_types from the window fields in __post_init__.
_OMITTED_BY_OUR_SAVE = {"max_window_layers", "layer_types"}


def _as_transformers_reads(hf: dict, key: str):
    """``hf[key]`` as transformers' config class resolves it (its default when absent)."""
    qwen = hf["model_type"] in ("qwen2", "qwen3")
    if key == "sliding_window" and qwen and not hf.get("use_sliding_window", False):
        return None  # Qwen2Config.__post_init__ drops the window unless use_sliding_window
    if key in hf:
        return hf[key]
    if key == "head_dim":  # Qwen2Attention: getattr(config, "head_dim", hidden // heads)
        return 128 if hf["model_type"] == "qwen3" else hf["hidden_size"] // hf["num_attention_heads"]
    if key == "max_window_layers":
        return 28
    if key == "layer_types":
        window = _as_transformers_reads(hf, "sliding_window")
        first_windowed = _as_transformers_reads(hf, "max_window_layers")
        return ["sliding_attention" if window is not None and i >= first_windowed
                else "full_attention" for i in range(hf["num_hidden_layers"])]
    return "<absent>"


def _rope_v5(hf: dict) -> dict:
    return hf["rope_parameters"]


def _rope_v4(hf: dict) -> dict:
    """transformers v4's reading (rope_theta + rope_scaling) in v5's rope_parameters form."""
    scaling = {k: v for k, v in (hf["rope_scaling"] or {"rope_type": "default"}).items()
               if k != "rope_theta"}
    return {**scaling, "rope_theta": hf["rope_theta"]}


def _saved_tensors(path: Path) -> dict:
    """Every tensor of the save in ``path`` (one file or an index), checking that each file
    carries the ``format: pt`` metadata transformers requires of safetensors."""
    if (path / INDEX_FILE).exists():
        files = sorted(set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values()))
    else:
        files = [SINGLE_FILE]
    tensors = {}
    for file in files:
        with safe_open(path / file, framework="numpy") as handle:
            assert handle.metadata() == {"format": "pt"}, file
        tensors.update(load_file(path / file))
    return tensors


@pytest.mark.parametrize("max_shard_bytes", [DEFAULT_MAX_SHARD_BYTES, 30_000],
                         ids=["one-file", "sharded"])
@pytest.mark.parametrize("name", NAMES)
def test_our_save_holds_what_transformers_wrote(name, max_shard_bytes, tmp_path):
    """Loaded in the checkpoint's own dtype and saved again, each fixture gives back the
    tensors transformers wrote (names, shapes, dtypes, bytes) and a config.json that
    transformers reads as the same architecture."""
    theirs_hf = json.loads((FIXTURES / name / "config.json").read_text())
    save_pretrained(load_pretrained(FIXTURES / name, dtype=theirs_hf["dtype"]), tmp_path,
                    max_shard_bytes=max_shard_bytes)
    assert (tmp_path / INDEX_FILE).exists() == (max_shard_bytes < DEFAULT_MAX_SHARD_BYTES)

    ours, theirs = _saved_tensors(tmp_path), load_file(FIXTURES / name / SINGLE_FILE)
    assert sorted(ours) == sorted(theirs)
    for key, array in theirs.items():
        assert (ours[key].dtype, ours[key].shape) == (array.dtype, array.shape), key
        np.testing.assert_array_equal(ours[key], array, err_msg=key)

    ours_hf = json.loads((tmp_path / "config.json").read_text())
    keys = TRANSFORMERS_READS[theirs_hf["model_type"]]
    assert [key for key in keys if key not in ours_hf and key not in _OMITTED_BY_OUR_SAVE] == []
    for key in keys:
        assert _as_transformers_reads(ours_hf, key) == _as_transformers_reads(theirs_hf, key), key
    assert ours_hf["torch_dtype"] == theirs_hf["dtype"]  # v4's name for it
    assert _rope_v5(ours_hf) == _rope_v5(theirs_hf)
    assert _rope_v4(ours_hf) == _rope_v5(theirs_hf)


def test_sharded_save_writes_an_index_and_loads_back(tmp_path):
    model = load_pretrained(FIXTURES / "qwen3_qk_norm")
    save_pretrained(model, tmp_path, max_shard_bytes=30_000)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    stored = {}
    for file in files:
        tensors = load_file(tmp_path / file)
        assert sum(a.nbytes for a in tensors.values()) <= 30_000 or len(tensors) == 1
        stored.update({name: (file, array) for name, array in tensors.items()})
    assert index["weight_map"] == {name: file for name, (file, _) in stored.items()}
    assert index["metadata"]["total_size"] == sum(a.nbytes for _, a in stored.values())
    # transformers' order: embedding first, then layer by layer, final norm last
    assert stored["model.embed_tokens.weight"][0] == files[0]
    assert stored["model.norm.weight"][0] == files[-1]
    first_file_of_layer = [min(file for name, (file, _) in stored.items()
                               if name.startswith(f"model.layers.{i}.")) for i in range(2)]
    last_file_of_layer = [max(file for name, (file, _) in stored.items()
                              if name.startswith(f"model.layers.{i}.")) for i in range(2)]
    assert last_file_of_layer[0] <= first_file_of_layer[1]
    _assert_same_params(model, load_pretrained(tmp_path))

    # Saving again in one file removes the shards and the index, so no stale weights remain.
    save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", SINGLE_FILE]
    _assert_same_params(model, load_pretrained(tmp_path))


def test_fresh_model_saves_and_loads(tmp_path):
    config = LlamaConfig(model_type="mistral", vocab_size=64, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                         head_dim=8, sliding_window=16)
    model = Llama(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(3))
    save_pretrained(model, tmp_path / "a" / "b")
    reloaded = load_pretrained(tmp_path / "a" / "b", dtype=jnp.bfloat16)
    assert reloaded.config == config
    _assert_same_params(model, reloaded)


# ---- directories that must be refused, with a message naming the problem ----

def _copy(name, tmp_path) -> Path:
    target = tmp_path / name
    shutil.copytree(FIXTURES / name, target)
    return target


def _rewrite_weights(model_dir: Path, edit):
    tensors = load_file(model_dir / SINGLE_FILE)
    edit(tensors)
    save_file(tensors, model_dir / SINGLE_FILE, metadata={"format": "pt"})


def _edit_config(model_dir: Path, **changes):
    hf = json.loads((model_dir / "config.json").read_text())
    hf.update(changes)
    (model_dir / "config.json").write_text(json.dumps(hf))


def test_missing_tensors_are_listed(tmp_path):
    model_dir = _copy("qwen2_bias", tmp_path)
    _rewrite_weights(model_dir, lambda t: [t.pop("model.layers.1.self_attn.k_proj.bias"),
                                           t.pop("model.norm.weight")])
    with pytest.raises(ModelLoadError, match="missing tensors: model.layers.1.self_attn.k_proj.bias, "
                                             "model.norm.weight"):
        load_pretrained(model_dir)


def test_unexpected_tensors_are_listed(tmp_path):
    model_dir = _copy("llama3_rope_scaling", tmp_path)
    _rewrite_weights(model_dir, lambda t: t.update({
        "model.layers.0.self_attn.q_proj.bias": np.ones(32, np.float32),  # llama has no bias
        "model.layers.2.mlp.up_proj.weight": np.ones((64, 32), np.float32),  # only 2 layers
    }))
    with pytest.raises(ModelLoadError, match="unexpected tensors: model.layers.0.self_attn.q_proj.bias, "
                                             "model.layers.2.mlp.up_proj.weight"):
        load_pretrained(model_dir)


def test_wrong_shapes_name_tensor_expected_and_found(tmp_path):
    model_dir = _copy("qwen3_qk_norm", tmp_path)
    _rewrite_weights(model_dir, lambda t: t.update({
        "model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}))
    with pytest.raises(ModelLoadError, match=r"model.layers.0.self_attn.q_norm.weight: expected "
                                             r"\(16,\), found \(8,\)"):
        load_pretrained(model_dir)


def test_config_that_disagrees_with_the_weights(tmp_path):
    model_dir = _copy("llama_gqa_tied", tmp_path)
    _edit_config(model_dir, num_key_value_heads=4)
    with pytest.raises(ModelLoadError, match=r"k_proj.weight: expected \(32, 32\), found \(16, 32\)"):
        load_pretrained(model_dir)
    _edit_config(model_dir, num_key_value_heads=2, tie_word_embeddings=False)
    with pytest.raises(ModelLoadError, match="missing tensors: lm_head.weight"):
        load_pretrained(model_dir)


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="gpt_neox"), "model_type 'gpt_neox' is not supported"),
    (dict(intermediate_size=None), "missing required field.*'intermediate_size'"),
])
def test_bad_config_json(tmp_path, changes, message):
    model_dir = _copy("mistral_sliding_window", tmp_path)
    _edit_config(model_dir, **changes)
    with pytest.raises(ModelLoadError, match=message):
        load_pretrained(model_dir)


def test_pickle_only_directory_is_refused_unread(tmp_path):
    model_dir = _copy("llama_gqa_tied", tmp_path)
    (model_dir / SINGLE_FILE).unlink()
    # Not a valid pickle: the loader must refuse it by name, never open it.
    (model_dir / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelLoadError, match=r"only pickle-based weights \(pytorch_model.bin\).*"
                                             "never unpickles"):
        load_pretrained(model_dir)
    (model_dir / "pytorch_model.bin").unlink()
    with pytest.raises(ModelLoadError, match="no model.safetensors and no model.safetensors.index"):
        load_pretrained(model_dir)


def test_unusable_paths_and_files(tmp_path):
    with pytest.raises(ModelLoadError, match="expected a checkpoint directory"):
        load_pretrained(tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json: not valid JSON"):
        read_config(tmp_path)
    model_dir = _copy("llama_gqa_tied", tmp_path)
    (model_dir / SINGLE_FILE).write_bytes(b"\x00" * 16)
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        load_pretrained(model_dir)


def test_bad_shard_indexes(tmp_path):
    model = load_pretrained(FIXTURES / "llama_gqa_tied")
    save_pretrained(model, tmp_path, max_shard_bytes=30_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    # the same tensor in two shards
    second = sorted(tmp_path.glob("model-*.safetensors"))[1]
    tensors = load_file(second)
    tensors["model.norm.weight"] = np.ones(32, np.float32)
    save_file(tensors, second, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="'model.norm.weight' is stored twice"):
        load_pretrained(tmp_path)
    index["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="lists files that do not exist: "
                                             r"\['model-00009-of-00009.safetensors'\]"):
        load_pretrained(tmp_path)


def test_tensors_transformers_also_ignores(tmp_path):
    """Old Llama checkpoints store RoPE caches; tied ones sometimes store the head too."""
    model_dir = _copy("llama_gqa_tied", tmp_path)
    _rewrite_weights(model_dir, lambda t: t.update({
        "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32),
        "lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    _assert_same_params(load_pretrained(model_dir), load_pretrained(FIXTURES / "llama_gqa_tied"))


def test_bad_arguments():
    with pytest.raises(ConfigError, match="dtype: expected one of .*got 'int32'"):
        load_pretrained(FIXTURES / "llama_gqa_tied", dtype=jnp.int32)
    with pytest.raises(ConfigError, match="dtype: expected one of .*got 'half-float'"):
        load_pretrained(FIXTURES / "llama_gqa_tied", dtype="half-float")
    model = nnx.eval_shape(lambda: Llama(read_config(FIXTURES / "llama_gqa_tied"), rngs=nnx.Rngs(0)))
    with pytest.raises(ConfigError, match="max_shard_bytes: expected > 0, got 0"):
        save_pretrained(model, "/nonexistent", max_shard_bytes=0)


# ---- teacher fingerprint ----

def test_fingerprint_follows_weights_and_architecture_only(tmp_path):
    original = teacher_fingerprint(FIXTURES / "qwen3_qk_norm")
    assert original.startswith("sha256:") and len(original) == 7 + 64
    # the same tensors split into shards, with bookkeeping fields changed: same fingerprint
    model_dir = _copy("qwen3_qk_norm", tmp_path)
    model = load_pretrained(model_dir)
    save_pretrained(model, tmp_path / "sharded", max_shard_bytes=30_000)
    _edit_config(tmp_path / "sharded", transformers_version="0.0.1", eos_token_id=7)
    assert teacher_fingerprint(tmp_path / "sharded") == original
    # one weight changed
    _rewrite_weights(model_dir, lambda t: t["model.layers.1.mlp.up_proj.weight"].__setitem__(
        (0, 0), 0.5))
    assert teacher_fingerprint(model_dir) != original
    # the architecture changed, weights identical
    _edit_config(tmp_path / "sharded", rms_norm_eps=1e-3)
    assert teacher_fingerprint(tmp_path / "sharded") != original

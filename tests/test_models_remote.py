"""Checkpoints read where they are kept: over http (a loopback server that honours Range requests
and counts the bytes it serves), from the Hugging Face Hub cache (hf://, offline), slice by
slice, and refused clearly when unreachable or broken."""

from __future__ import annotations

import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from loopback_http import RangeServer

from pipeline.errors import ModelLoadError
from pipeline.models.checkpoint_store import open_checkpoint, read_header, read_slice
from pipeline.models.hf_io import (INDEX_FILE, SINGLE_FILE, load_pretrained, save_pretrained,
                                   teacher_fingerprint)
from pipeline.models.layouts import SAME
from pipeline.models.registry import family_of

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
NAME = "llama_gqa_tied"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The fixture checkpoint, and the same weights saved as 3 shard files, over loopback http."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(FIXTURES / NAME, root / "single")
    save_pretrained(load_pretrained(FIXTURES / NAME), root / "sharded", max_shard_bytes=30_000)
    assert (root / "sharded" / INDEX_FILE).is_file()
    server = RangeServer(root)
    yield server
    server.close()


def _params(model) -> dict:
    return {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model))}


@pytest.fixture(scope="module")
def local():
    """The fixture's parameters, loaded from its local directory."""
    return _params(load_pretrained(FIXTURES / NAME))


def test_http_load_equals_local_and_reads_each_byte_once(served, local):
    file_bytes = {}
    for layout in ("single", "sharded"):
        weights = sorted((served.root / layout).glob("*.safetensors"))
        served.take()
        remote = _params(load_pretrained(f"{served.url}/{layout}/", dtype="bfloat16",
                                         param_dtype="float32"))
        read = served.take()
        assert remote.keys() == local.keys()
        for path in local:
            np.testing.assert_array_equal(remote[path], local[path], err_msg=str(path))
        # config.json, the index, headers, then every tensor's bytes once: no file read twice.
        file_bytes[layout] = sum(f.stat().st_size for f in weights)
        small = sum(f.stat().st_size for f in (served.root / layout).glob("*.json"))
        assert file_bytes[layout] <= read <= file_bytes[layout] + small + 16 * len(weights), layout
    assert (teacher_fingerprint(f"{served.url}/sharded") == teacher_fingerprint(FIXTURES / NAME))


def test_slices_read_only_their_rows(served, local):
    """Any slice of any parameter in our layout equals the whole tensor's slice, and two hosts
    that split each tensor's rows read about half of the file each."""
    store = open_checkpoint(f"{served.url}/single")
    stored = read_header(store, SINGLE_FILE)
    served.take()
    by_name = {"/".join(map(str, path)): value for path, value in local.items()}
    rng = np.random.default_rng(0)
    layouts = set()
    for hf_template, ours, layout in family_of("llama").hf_names:
        hf_name, path = hf_template.format(i=1), ours.format(i=1)
        if hf_name not in stored:
            continue  # the tied head
        layouts.add(layout)
        whole = by_name[path]
        for _ in range(3):
            starts = [int(rng.integers(0, n)) for n in whole.shape]
            index = tuple(slice(s, int(rng.integers(s + 1, n + 1)))
                          for s, n in zip(starts, whole.shape))
            part = read_slice(store, stored[hf_name], layout, whole.shape, index)
            np.testing.assert_array_equal(part, whole[index], err_msg=f"{path} {index}")
    assert len(layouts) == 4  # SAME, LINEAR, HEADS_IN, HEADS_OUT
    served.take()
    halves = []
    for host in range(2):
        for tensor in stored.values():
            rows = tensor.shape[0] // 2
            index = ((slice(host * rows, (host + 1) * rows),)
                     + (slice(None),) * (len(tensor.shape) - 1))
            part = read_slice(store, tensor, SAME, tensor.shape, index)
            assert part.shape == (rows,) + tensor.shape[1:]
        halves.append(served.take())
    data = sum(int(np.prod(t.shape)) * t.dtype.itemsize for t in stored.values())
    assert halves == [data // 2, data // 2], (halves, data)
    print(f"each of 2 row-split hosts read {halves[0]} of the file's "
          f"{(served.root / 'single' / SINGLE_FILE).stat().st_size} bytes")


def test_hub_location_from_the_offline_cache(tmp_path, monkeypatch, local):
    import huggingface_hub.constants as hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--kdpipe-test--tiny"
    shutil.copytree(FIXTURES / NAME, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    remote = _params(load_pretrained("hf://kdpipe-test/tiny"))
    for path in local:
        np.testing.assert_array_equal(remote[path], local[path], err_msg=str(path))
    snapshot = open_checkpoint(f"hf://kdpipe-test/tiny@{commit}")
    assert Path(snapshot.location) == repo / "snapshots" / commit
    assert snapshot.url("config.json") == f"hf://kdpipe-test/tiny@{commit}/config.json"
    for location, message in (
            ("hf://kdpipe-test/absent", "could not be fetched .* HF_HUB_OFFLINE=1"),
            ("hf://kdpipe-test/tiny@v9", "could not be fetched"),
            ("hf://only-a-name", "expected hf://org/name or hf://org/name@revision")):
        with pytest.raises(ModelLoadError, match=f"{re.escape(location)}.*{message}"):
            load_pretrained(location)


def test_unreachable_truncated_and_incomplete_checkpoints(served, tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/model"
    with pytest.raises(ModelLoadError, match=f"{re.escape(closed)}/config.json: could not be read"):
        load_pretrained(closed)
    with pytest.raises(ModelLoadError, match="not a checkpoint location TensorStore reads"):
        load_pretrained("nosuchscheme://bucket/model")
    with pytest.raises(ModelLoadError, match=r"/absent'?: no config.json"):
        load_pretrained(f"{served.url}/absent")

    weights = (FIXTURES / NAME / SINGLE_FILE).read_bytes()
    for name, size in (("header", 100), ("data", len(weights) - 100)):
        broken = served.root / f"truncated-{name}"
        shutil.copytree(FIXTURES / NAME, broken)
        (broken / SINGLE_FILE).write_bytes(weights[:size])
    url = f"{served.url}/truncated-header/{SINGLE_FILE}"
    with pytest.raises(ModelLoadError, match=f"{re.escape(url)}: not a readable safetensors "
                                             r"file \(its 2016-byte header: bytes 8\.\.2024 lie "
                                             r"past the end of the file \(truncated"):
        load_pretrained(f"{served.url}/truncated-header")
    url = f"{served.url}/truncated-data/{SINGLE_FILE}"
    with pytest.raises(ModelLoadError, match=f"{re.escape(url)}: tensor '[^']+': "
                                             "bytes .* lie past the end of the file"):
        load_pretrained(f"{served.url}/truncated-data")


def test_tokenizer_defaults_to_the_teachers(served, tmp_path):
    """data.tokenizer unset: model.teacher.path's tokenizer.json, local or remote; neither: a
    clear error."""
    from tokenizers import Tokenizer, models

    from pipeline.config import config_from_dict
    from pipeline.data import load_tokenizer
    from pipeline.errors import DataError

    words = {"hello": 0, "world": 1, "[UNK]": 2}
    Tokenizer(models.WordLevel(words, unk_token="[UNK]")).save(
        str(served.root / "single" / "tokenizer.json"))
    student = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4}
    for teacher in (str(served.root / "single"), f"{served.url}/single/"):
        config = config_from_dict({"model": {"student": student, "teacher": {"path": teacher}},
                                   "cache": {"path": "c"}})
        assert config.data.tokenizer == teacher
        assert load_tokenizer(config.data.tokenizer).get_vocab() == words
    given = config_from_dict({"model": {"student": student, "teacher": {"path": teacher}},
                              "cache": {"path": "c"}, "data": {"tokenizer": "mine.json"}})
    assert given.data.tokenizer == "mine.json"
    alone = config_from_dict({"model": {"student": student}, "cache": {"path": "c"}})
    with pytest.raises(DataError, match="data.tokenizer: not set, and there is no "
                                        "model.teacher.path"):
        load_tokenizer(alone.data.tokenizer)
    for teacher in (FIXTURES / NAME, f"{served.url}/sharded"):
        with pytest.raises(DataError, match=f"no tokenizer file at {re.escape(str(teacher))}/"
                                            r"tokenizer.json \(.*model.teacher.path's\)"):
            load_tokenizer(teacher)

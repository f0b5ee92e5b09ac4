"""The bad-input corpus: every mistake a user plausibly makes, run through the ``kdpipe`` CLI.

Each case must end with exit code 2 and one paragraph on stderr that names the culprit (the
file, config key or field, and both values where two disagree), without a traceback, and leave
every existing prepared dataset, cache, checkpoint and export byte-for-byte as it was (the
sha256 of every file of the workspace before and after the command).

The workspace is built once per module from the session's tiny demo: a copy of its tokenizer,
prepared data, teacher export, top-k teacher cache and distilled run (checkpoints of steps 4
and 8 plus the export). A case damages a file of the workspace only through
``Workspace.write`` / ``remove``, which keep the original bytes and put them back after the
case (checked against the workspace's first digest); the shared demo itself is only read, and
checked unchanged at the end of the module. New inputs a case needs (a broken config, a
damaged model directory) go to its own scratch directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
# Imported here, not first inside a case: Ray sets its log handler on the sys.stderr of the
# moment it is first imported, and a case's is closed once that case ends (a later case's
# embedded Ray then prints "--- Logging error ---" and a traceback into its stderr).
import ray  # noqa: F401

from conftest import TINY


# A log record of Ray itself ("2026-01-01 09:00:00,123\tINFO worker.py:2029 -- ...").
RAY_LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+[A-Z]+ \S+\.py:\d+ -- ")


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _info(ws: Workspace):
    """The workspace's prepared dataset (``pipeline.data.DatasetInfo``)."""
    from pipeline.data import read_info

    return read_info(ws.root / "data")


def _overrides(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


@dataclasses.dataclass
class Workspace:
    """The module's workspace (``root``, shared by all cases) and this case's ``scratch``."""

    root: Path
    scratch: Path
    edits: list[tuple[Path, bytes]] = dataclasses.field(default_factory=list)  # originals

    def config(self, *overrides: str, run_dir: Path | None = None) -> list:
        """``configs/tiny-test.yaml`` pointed at the workspace, then ``overrides``."""
        root = self.root
        return [str(TINY), *_overrides(f"data.tokenizer={root / 'tokenizer.json'}",
                                       f"data.prepared_dir={root / 'data'}",
                                       f"cache.path={root / 'cache'}",
                                       f"model.teacher={{path: {root / 'teacher'}}}",
                                       f"run_dir={run_dir or self.scratch / 'run'}", *overrides)]

    def write(self, path: Path, data: bytes) -> None:
        """Replace a workspace file's bytes for this case."""
        self.edits.append((path, path.read_bytes()))
        path.write_bytes(data)

    def edit_json(self, path: Path, edit: Callable[[dict], None]) -> None:
        obj = json.loads(path.read_text())
        edit(obj)
        self.write(path, json.dumps(obj).encode())

    def remove(self, path: Path) -> None:
        """Delete a workspace file for this case."""
        self.edits.append((path, path.read_bytes()))
        path.unlink()

    def restore(self) -> None:
        for path, data in reversed(self.edits):
            path.write_bytes(data)
        self.edits.clear()

    def model_copy(self, name: str = "model") -> Path:
        """A copy of the teacher's Hugging Face directory in the scratch space, to damage."""
        return Path(shutil.copytree(self.root / "teacher", self.scratch / name))


@dataclasses.dataclass(frozen=True)
class Expect:
    """What a case runs and what its message must say (each string, whitespace-normalised).
    ``then``: further checks after the command (e.g. that nothing was created); ``patch``:
    ``(object, name, value)`` set for the command, a failure of the machine simulated."""

    args: list
    says: tuple[str, ...]
    then: Callable[[], None] | None = None
    patch: tuple[object, str, object] | None = None


CASES: dict[str, Callable[[Workspace], Expect]] = {}


def case(name: str):
    def register(build: Callable[[Workspace], Expect]):
        assert name not in CASES, name
        CASES[name] = build
        return build
    return register


def _absent(path: Path) -> Callable[[], None]:
    def check():
        assert not path.exists(), f"{path} was created"
    return check


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

@case("config/unknown key")
def _(ws):
    return Expect(["train", *ws.config("loss.temprature=2")],
                  ("loss.temprature: unknown key", "did you mean 'temperature'?"))


@case("config/unknown section")
def _(ws):
    return Expect(["train", *ws.config("los.alpha=0.5")],
                  ("los: unknown key; did you mean 'loss'?",))


@case("config/empty file")
def _(ws):
    empty = ws.scratch / "run.yaml"
    empty.write_text("# nothing yet\n")
    return Expect(["train", empty], (f"{empty}: the config file is empty",))


@case("config/wrong type")
def _(ws):
    return Expect(["train", *ws.config("train.steps=many")],
                  ("train.steps: expected an integer, got str 'many'",))


@case("config/negative learning rate")
def _(ws):
    return Expect(["train", *ws.config("optimizer.learning_rate=-0.1")],
                  ("optimizer.learning_rate: expected > 0, got -0.1",))


@case("config/temperature 0")
def _(ws):
    return Expect(["train", *ws.config("loss.temperature=0")],
                  ("loss.temperature: expected > 0, got 0",))


@case("config/alpha 1.5")
def _(ws):
    return Expect(["train", *ws.config("loss.alpha=1.5")], ("loss.alpha: expected <= 1, got 1.5",))


@case("config/neither cache nor live teacher")
def _(ws):
    return Expect(["train", *ws.config("cache=null", "cluster.teacher_source=null")],
                  ("neither a cache nor a live teacher",))


@case("config/batch not divisible by accumulation")
def _(ws):
    return Expect(["train", *ws.config("train.grad_accum_steps=3")],
                  ("train.grad_accum_steps (3) must divide train.global_batch_size (4)",))


@case("config/batch not divisible by hosts")
def _(ws):
    return Expect(["train", *ws.config("cluster.student.hosts=3")],
                  ("train.global_batch_size (4)", "cluster.student.hosts", "1 * 3 = 3"))


@case("config/unsupported dtype")
def _(ws):
    return Expect(["train", *ws.config("model.student.dtype=float16")],
                  ("model.student.dtype: expected one of 'float32', 'bfloat16', got str 'float16'",))


@case("config/path and architecture both")
def _(ws):
    return Expect(["train", *ws.config(f"model.teacher={{path: {ws.root / 'teacher'}, hidden_size: 64}}")],
                  ("model.teacher.hidden_size: set together with model.teacher.path",))


@case("config/cache temperature differs from loss")
def _(ws):
    return Expect(["train", *ws.config("cache.temperature=2")],
                  ("cache.temperature (2.0) must equal loss.temperature (1.0)",))


@case("config/override without value")
def _(ws):
    return Expect(["train", *ws.config("loss.temperature")],
                  ("override 'loss.temperature': expected KEY.PATH=VALUE",))


@case("config/missing file")
def _(ws):
    missing = ws.scratch / "run.yaml"
    return Expect(["train", missing], (f"{missing}: cannot read the config file",))


@case("config/not YAML")
def _(ws):
    bad = ws.scratch / "run.yaml"
    bad.write_text("model: {student: [hidden_size: 16\n")
    return Expect(["train", bad], (f"{bad}: not valid YAML",))


@case("config/not a mapping")
def _(ws):
    bad = ws.scratch / "run.yaml"
    bad.write_text("- model\n- data\n")
    return Expect(["train", bad], (f"{bad}: config: expected a mapping of sections at the top "
                                   f"level, got list",))


@case("config/remote teacher without kdpipe run")
def _(ws):
    return Expect(["train", *ws.config("cluster.teacher_source=remote")],
                  ("cluster.teacher_source: 'remote' needs teacher actors; run it with `kdpipe run`",))


@case("config/live teacher without a teacher")
def _(ws):
    return Expect(["train", *ws.config("cache=null", "cluster.teacher_source=live",
                                       "model.teacher={}")],
                  ("model.teacher: cluster.teacher_source 'live' runs the teacher, but "
                   "model.teacher has neither a path nor an architecture",))


# train.on_policy: a teacher that scores the student's sequences, live here
_LIVE = ("cache=null", "cluster.teacher_source=live", "loss.use_hard_labels=false")


@case("config/on_policy with an offline-only teacher")
def _(ws):
    return Expect(["train", *ws.config("train.on_policy={fraction: 0.5}",
                                       "loss.use_hard_labels=false")],
                  ("train.on_policy: the teacher must score the student's own sequences, but "
                   "cluster.teacher_source 'offline' only reads stored targets",
                   "use one of live, remote, hybrid"))


@case("config/on_policy fraction outside [0, 1]")
def _(ws):
    return Expect(["train", *ws.config(*_LIVE, "train.on_policy={fraction: 1.5}")],
                  ("train.on_policy.fraction: expected <= 1, got 1.5",))


@case("config/on_policy top_p 0")
def _(ws):
    return Expect(["train", *ws.config(*_LIVE, "train.on_policy={top_p: 0}")],
                  ("train.on_policy.top_p: expected > 0, got 0",))


@case("config/on_policy prefix longer than seq_len - max_new_tokens")
def _(ws):
    return Expect(["train", *ws.config(*_LIVE, "train.on_policy={prompt_source: prefix, "
                                       "prefix_tokens: 20, max_new_tokens: 16}")],
                  ("train.on_policy.prefix_tokens: a prompt of 20 tokens + max_new_tokens 16 > "
                   "data.seq_len 32; expected prefix_tokens <= 16",))


@case("data/on_policy prompt longer than seq_len - max_new_tokens")
def _(ws):
    from pipeline.config import DataConfig
    from pipeline.data import prepare_dataset

    source, prepared = ws.scratch / "prompts.jsonl", ws.scratch / "prepared"
    source.write_text(json.dumps({"prompt": "def " + "long_name_" * 20 + "(x):",
                                  "completion": " return x"}) + "\n")
    prepare_dataset(DataConfig(sources=(str(source),), tokenizer=str(ws.root / "tokenizer.json"),
                               prepared_dir=str(prepared), seq_len=32, pack=False,
                               eval_fraction=0.0), progress=False)
    return Expect(["train", *ws.config(*_LIVE, "train.on_policy={max_new_tokens: 16}",
                                       f"data.prepared_dir={prepared}")],
                  ("train.on_policy.max_new_tokens:", "of the train split",
                   "longer than data.seq_len - max_new_tokens = 32 - 16 = 16"),
                  then=_absent(ws.scratch / "run"))


@case("config/cache verb without a cache section")
def _(ws):
    return Expect(["cache", *ws.config("cache=null", "cluster.teacher_source=live")],
                  ("cache: the config has no `cache:` section to fill",))


@case("config/cache verb with an initialised teacher")
def _(ws):
    return Expect(["cache", *ws.config("model.teacher={hidden_size: 32, intermediate_size: 64, "
                                       "num_hidden_layers: 2, num_attention_heads: 2}")],
                  ("model.teacher.path: this verb needs the teacher's Hugging Face directory",))


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def _prepare(ws: Workspace, source: Path, *overrides: str) -> list:
    out = ws.scratch / "prepared"
    return ["prepare-data", *ws.config(f"data.sources=[{source}]", f"data.prepared_dir={out}",
                                       *overrides)]


@case("data/empty file")
def _(ws):
    source = ws.scratch / "empty.txt"
    source.write_bytes(b"")
    return Expect(_prepare(ws, source), (f"{source}: empty file (no documents)",),
                  then=_absent(ws.scratch / "prepared"))


@case("data/jsonl missing column")
def _(ws):
    source = ws.scratch / "docs.jsonl"
    source.write_text('{"body": "def f(): pass"}\n')
    return Expect(_prepare(ws, source), (f"{source}:1: missing column 'text'", "found ['body']"),
                  then=_absent(ws.scratch / "prepared"))


@case("data/parquet missing column")
def _(ws):
    source = ws.scratch / "docs.parquet"
    pq.write_table(pa.table({"content": ["import os", "import sys"]}), source)
    return Expect(_prepare(ws, source), (f"{source}: missing column 'text'", "found ['content']"),
                  then=_absent(ws.scratch / "prepared"))


@case("data/text field not a string")
def _(ws):
    source = ws.scratch / "docs.jsonl"
    source.write_text('{"text": "x = 1"}\n{"text": 42}\n')
    return Expect(_prepare(ws, source), (f"{source}:2: field 'text' must be a string, got int",))


@case("data/jsonl line not JSON")
def _(ws):
    source = ws.scratch / "docs.jsonl"
    source.write_text('{"text": "x = 1"}\n{"text": "y = \n')
    return Expect(_prepare(ws, source), (f"{source}:2: not valid JSON",))


@case("data/non-UTF-8 text")
def _(ws):
    source = ws.scratch / "latin1.txt"
    source.write_bytes("x = 'café'\n".encode("latin-1"))
    return Expect(_prepare(ws, source), (f"{source}: not UTF-8 text (invalid byte 0xe9 at byte "
                                         f"offset 8)",))


@case("data/sequence length 0")
def _(ws):
    source = ws.scratch / "a.txt"
    source.write_text("x = 1\n")
    return Expect(_prepare(ws, source, "data.seq_len=0"), ("data.seq_len: expected > 0, got 0",))


@case("data/source does not exist")
def _(ws):
    source = ws.scratch / "nowhere.txt"
    return Expect(_prepare(ws, source), (f"data.sources[0]: {source} does not exist",))


@case("data/directory without input files")
def _(ws):
    source = ws.scratch / "corpus"
    source.mkdir()
    (source / "notes.md").write_text("# not a .txt, .jsonl, .parquet or .arrow file\n")
    return Expect(_prepare(ws, source), (f"data.sources[0]: {source} matches no input files",))


@case("data/tokenizer missing")
def _(ws):
    source = ws.scratch / "a.txt"
    source.write_text("x = 1\n")
    tokenizer = ws.scratch / "tokenizer.json"
    return Expect(_prepare(ws, source, f"data.tokenizer={tokenizer}"),
                  (f"data.tokenizer: no tokenizer file at {tokenizer}",))


@case("data/tokenizer not a tokenizer")
def _(ws):
    source = ws.scratch / "a.txt"
    source.write_text("x = 1\n")
    tokenizer = ws.scratch / "tokenizer.json"
    tokenizer.write_text('{"vocab": {}}')
    return Expect(_prepare(ws, source, f"data.tokenizer={tokenizer}"),
                  (f"data.tokenizer: {tokenizer} is not a valid tokenizer.json",))


@case("data/eos token not in tokenizer")
def _(ws):
    source = ws.scratch / "a.txt"
    source.write_text("x = 1\n")
    return Expect(_prepare(ws, source, "data.eos_token=</s>"),
                  ("data.eos_token: '</s>' is not in the tokenizer",))


@case("data/prepared dir exists")
def _(ws):
    source = ws.scratch / "a.txt"
    source.write_text("x = 1\n")
    return Expect(_prepare(ws, source, f"data.prepared_dir={ws.root / 'data'}"),
                  (f"data.prepared_dir: {ws.root / 'data'} already exists and is not empty",
                   "--overwrite"))


@case("data/overwrite with a bad source keeps the old dataset")
def _(ws):
    source = ws.scratch / "empty.txt"
    source.write_bytes(b"")
    args = _prepare(ws, source, f"data.prepared_dir={ws.root / 'data'}")
    return Expect([*args, "--overwrite"], (f"{source}: empty file (no documents)",))


@case("data/not prepared yet")
def _(ws):
    prepared = ws.scratch / "prepared"
    return Expect(["train", *ws.config(f"data.prepared_dir={prepared}")],
                  (f"data.prepared_dir: {prepared / 'metadata.json'} does not exist",
                   "kdpipe prepare-data"))


@case("data/token id >= vocab")
def _(ws):
    return Expect(["train", *ws.config("model.student.vocab_size=300")],
                  (f"{ws.root / 'data'} (train): token id "
                   f"{_info(ws).splits['train']['max_token_id']} >= the model's vocab size 300",),
                  then=_absent(ws.scratch / "run"))


@case("data/truncated token shard")
def _(ws):
    shard = ws.root / "data" / "train" / "part-00001.parquet"
    ws.write(shard, shard.read_bytes()[:200])
    return Expect(["train", *ws.config()], (f"{shard}: cannot read the token shard",),
                  then=_absent(ws.scratch / "run"))


# --------------------------------------------------------------------------------------------
# Model directory (the teacher of `kdpipe cache`, the student of `kdpipe train`)
# --------------------------------------------------------------------------------------------

def _fill_cache(ws: Workspace, model: Path) -> list:
    return ["cache", *ws.config(f"model.teacher={{path: {model}}}",
                                f"cache.path={ws.scratch / 'cache'}")]


def _model_case(ws: Workspace, model: Path, *says: str) -> Expect:
    return Expect(_fill_cache(ws, model), says, then=_absent(ws.scratch / "cache"))


@case("model/directory missing")
def _(ws):
    model = ws.scratch / "no-model"
    return _model_case(ws, model, f"model path '{model}': expected a checkpoint directory")


@case("model/missing weights")
def _(ws):
    model = ws.model_copy()
    (model / "model.safetensors").unlink()
    return _model_case(ws, model, f"'{model}': no model.safetensors and no "
                                  f"model.safetensors.index.json")


@case("model/config.json missing")
def _(ws):
    model = ws.model_copy()
    (model / "config.json").unlink()
    return _model_case(ws, model, f"'{model}': no config.json")


@case("model/index lists a missing file")
def _(ws):
    model = ws.model_copy()
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return _model_case(ws, model, f"{model / 'model.safetensors.index.json'} lists files that do "
                                  f"not exist: ['model-00002-of-00002.safetensors']")


@case("model/config.json not JSON")
def _(ws):
    model = ws.model_copy()
    (model / "config.json").write_text("{'model_type': 'llama'}")
    return _model_case(ws, model, f"{model / 'config.json'}: not valid JSON")


@case("model/shape mismatch")
def _(ws):
    model = ws.model_copy()
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] = 96
    (model / "config.json").write_text(json.dumps(config))
    return _model_case(ws, model, f"'{model}' does not match its config.json",
                       "model.layers.0.mlp.gate_proj.weight: expected (96, 32), found (64, 32)")


@case("model/layer missing")
def _(ws):
    model = ws.model_copy()
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (model / "config.json").write_text(json.dumps(config))
    return _model_case(ws, model, f"'{model}' does not match its config.json", "3 layers",
                       "missing tensors: model.layers.2.")


@case("model/unsupported architecture")
def _(ws):
    model = ws.model_copy()
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (model / "config.json").write_text(json.dumps(config))
    return _model_case(ws, model, "model_type 'gpt2' is not supported")


@case("model/truncated safetensors")
def _(ws):
    model = ws.model_copy()
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return _model_case(ws, model, f"{weights}: not a readable safetensors file")


class _CreatesMarker:
    """Unpickling this calls ``open(path, "w")``: the marker file exists iff it was unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@case("model/pickle-only weights (never unpickled)")
def _(ws):
    model = ws.model_copy()
    (model / "model.safetensors").unlink()
    marker = ws.scratch / "unpickled"
    payload = pickle.dumps(_CreatesMarker(marker))
    (model / "pytorch_model.bin").write_bytes(payload)

    def never_unpickled():
        assert not marker.exists(), "pytorch_model.bin was unpickled"
        assert (model / "pytorch_model.bin").read_bytes() == payload
        assert not (ws.scratch / "cache").exists()
        pickle.loads(payload).close()  # the payload does what the check above looks for
        assert marker.exists()

    return Expect(_fill_cache(ws, model),
                  (f"'{model}' holds only pickle-based weights (pytorch_model.bin)",
                   "never unpickles"), then=never_unpickled)


@case("model/pickle-only student (train)")
def _(ws):
    model = ws.model_copy("student")
    (model / "model.safetensors").unlink()
    marker = ws.scratch / "unpickled"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_CreatesMarker(marker)))
    return Expect(["train", *ws.config(f"model.student={{path: {model}}}")],
                  (f"'{model}' holds only pickle-based weights (pytorch_model.bin)",),
                  then=_absent(marker))


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------

def _train_cache(ws: Workspace) -> Path:
    return ws.root / "cache" / "train"


@case("cache/wrong teacher")
def _(ws):
    other = ws.root / "run" / "student"  # the distilled student, given as the teacher
    return Expect(["train", *ws.config(f"model.teacher={{path: {other}}}")],
                  (f"cache {_train_cache(ws)}: cache does not match the run: teacher_fingerprint "
                   f"is 'sha256:", "in the cache but the run declares 'sha256:"),
                  then=_absent(ws.scratch / "run"))


@case("cache/wrong tokenizer")
def _(ws):
    manifest = _train_cache(ws) / "manifest.json"
    ws.edit_json(manifest, lambda m: m.update(tokenizer_fingerprint="0123456789abcdef"))
    return Expect(["train", *ws.config()],
                  (f"cache {_train_cache(ws)}: cache does not match the run: "
                   f"tokenizer_fingerprint is '0123456789abcdef' in the cache but the run declares "
                   f"'{_info(ws).tokenizer_fingerprint}'",), then=_absent(ws.scratch / "run"))


@case("cache/wrong dataset")
def _(ws):
    manifest = _train_cache(ws) / "manifest.json"
    ws.edit_json(manifest, lambda m: m.update(dataset_fingerprint="fedcba9876543210"))
    return Expect(["train", *ws.config()],
                  (f"cache {_train_cache(ws)}: cache does not match the run: dataset_fingerprint "
                   f"is 'fedcba9876543210' in the cache but the run declares "
                   f"'{_info(ws).fingerprint('train')}'",),
                  then=_absent(ws.scratch / "run"))


@case("cache/wrong vocab")
def _(ws):
    manifest = _train_cache(ws) / "manifest.json"
    ws.edit_json(manifest, lambda m: m["target"].update(vocab_size=512, tokenizer_vocab_size=512))
    return Expect(["train", *ws.config()],
                  (f"cache {_train_cache(ws)}: cache does not match the run: tokenizer_vocab_size "
                   f"is 512 in the cache but the run declares {_info(ws).vocab_size}",),
                  then=_absent(ws.scratch / "run"))


@case("cache/written at another temperature")
def _(ws):
    return Expect(["train", *ws.config("loss.temperature=2.0")],
                  (f"cache {_train_cache(ws)}: cache does not match the run: temperature is 1.0 "
                   f"in the cache but the run declares 2.0",),
                  then=_absent(ws.scratch / "run"))


@case("cache/newer format version")
def _(ws):
    from pipeline.cache.spec import READABLE_VERSIONS

    manifest = _train_cache(ws) / "manifest.json"
    ws.edit_json(manifest, lambda m: m.update(format_version=99))
    readable = ", ".join(map(str, READABLE_VERSIONS))
    return Expect(["train", *ws.config()],
                  (f"cache {_train_cache(ws)}: cache manifest: format_version 99 is not one this "
                   f"kdpipe reads ({readable}); a newer cache needs a newer kdpipe",),
                  then=_absent(ws.scratch / "run"))


@case("cache/manifest not JSON")
def _(ws):
    manifest = _train_cache(ws) / "manifest.json"
    ws.write(manifest, manifest.read_bytes()[:40])
    return Expect(["train", *ws.config()],
                  (f"cache {_train_cache(ws)}: manifest.json is not valid JSON",),
                  then=_absent(ws.scratch / "run"))


@case("cache/missing manifest")
def _(ws):
    ws.remove(_train_cache(ws) / "manifest.json")
    return Expect(["train", *ws.config()],
                  (f"{_train_cache(ws)}", "no manifest.json (not a kdpipe cache"),
                  then=_absent(ws.scratch / "run"))


@case("cache/shard not committed")
def _(ws):
    ws.remove(_train_cache(ws) / "commits" / "shard-00000000.json")
    return Expect(["train", *ws.config()],
                  (f"the train cache at {_train_cache(ws)} has 1 of {_train_shards(ws)} shards not "
                   f"written yet",
                   "kdpipe cache"), then=_absent(ws.scratch / "run"))


SHARD_SEQUENCES = 16  # cache.shard_sequences of tiny-test.yaml


def _train_shards(ws: Workspace) -> int:
    return -(-_info(ws).splits["train"]["num_rows"] // SHARD_SEQUENCES)


def _first_shard(ws: Workspace) -> int:
    """The train cache shard that holds the first sample of the first step."""
    from pipeline.data import global_order

    first_row = int(global_order(_info(ws).splits["train"]["num_rows"], 0, [0])[0])  # data.seed 0
    return first_row // SHARD_SEQUENCES


@case("cache/truncated shard")
def _(ws):
    shard = _first_shard(ws)
    file = _train_cache(ws) / "values" / "c" / str(shard) / "0" / "0"
    ws.write(file, file.read_bytes()[:-100])
    return Expect(["train", *ws.config()],
                  (f"shard {shard} is corrupt: file values/c/{shard}/0/0 is",
                   "its commit record says"))


@case("cache/flipped byte in a shard")
def _(ws):
    shard = _first_shard(ws)
    file = _train_cache(ws) / "id_gaps" / "c" / str(shard) / "0" / "0"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ws.write(file, bytes(data))
    return Expect(["train", *ws.config()], (f"shard {shard} is corrupt: file id_gaps/c/{shard}/0/0 "
                                            f"is", "crc32"))


@case("cache/commit record not JSON")
def _(ws):
    ws.write(_train_cache(ws) / "commits" / "shard-00000000.json", b'{"shard": 0, "fi')
    return Expect(["train", *ws.config()],
                  (str(_train_cache(ws)), "commit record commits/shard-00000000.json is malformed"),
                  then=_absent(ws.scratch / "run"))


@case("cache/fill with another k")
def _(ws):
    return Expect(["cache", *ws.config("cache.k=4")],
                  (f"cache {_train_cache(ws)}: cache does not match the run: target.k is 8 in the "
                   f"cache but the run declares 4", "remove this cache to fill it again"))


@case("cache/fill with another shard size")
def _(ws):
    return Expect(["cache", *ws.config("cache.shard_sequences=32")],
                  (f"cache {_train_cache(ws)}: cache does not match the run: shard_sequences is "
                   f"16 in the cache but the run declares 32",))


@case("cache/fill by another teacher")
def _(ws):
    return Expect(["cache", *ws.config(f"model.teacher={{path: {ws.root / 'run' / 'student'}}}")],
                  ("teacher_fingerprint is 'sha256:", "in the cache but the run declares 'sha256:"))


# --------------------------------------------------------------------------------------------
# Checkpoint
# --------------------------------------------------------------------------------------------

def _run(ws: Workspace) -> Path:
    return ws.root / "run"


@case("checkpoint/from another config")
def _(ws):
    return Expect(["train", *ws.config("loss.alpha=0.7", run_dir=_run(ws))],
                  ("checkpoint is from another config", "loss.alpha: checkpoint has 0.5, this run "
                                                        "has 0.7"))


@case("checkpoint/from another model")
def _(ws):
    return Expect(["train", *ws.config("model.student.hidden_size=32", run_dir=_run(ws))],
                  (f"{_run(ws) / 'checkpoints'}", "checkpoint is from another model (model "
                                                  "fingerprint 'init:"))


@case("checkpoint/corrupt state")
def _(ws):
    data = _run(ws) / "checkpoints" / "8" / "state" / "ocdbt.process_0" / "d"
    file = max(data.iterdir(), key=lambda p: p.stat().st_size)
    ws.write(file, file.read_bytes()[: file.stat().st_size // 2])
    return Expect(["export", *ws.config(run_dir=_run(ws)), "--out", ws.scratch / "export"],
                  (f"{_run(ws) / 'checkpoints' / '8'}: corrupt checkpoint",),
                  then=_absent(ws.scratch / "export"))


@case("checkpoint/corrupt metadata")
def _(ws):
    meta = _run(ws) / "checkpoints" / "4" / "meta" / "metadata"
    ws.write(meta, b"\x00garbage")
    return Expect(["eval", *ws.config(run_dir=_run(ws))],
                  (f"{_run(ws) / 'checkpoints' / '4'}: corrupt checkpoint",))


@case("checkpoint/no such step")
def _(ws):
    return Expect(["eval", *ws.config(run_dir=_run(ws)), "--step", "3"],
                  ("no checkpoint of step 3 (have [4, 8])",))


@case("checkpoint/eval before training")
def _(ws):
    return Expect(["eval", *ws.config()], (f"{ws.scratch / 'run' / 'checkpoints'}: no checkpoint "
                                           f"to restore",), then=_absent(ws.scratch / "run"))


@case("checkpoint/checkpoints is a file")
def _(ws):
    run_dir = ws.scratch / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("not a directory")
    return Expect(["train", *ws.config(run_dir=run_dir)],
                  (f"{run_dir / 'checkpoints'}: exists and is not a directory",))


@case("checkpoint/export onto a file")
def _(ws):
    out = ws.scratch / "export"
    out.write_text("a file")
    return Expect(["export", *ws.config(run_dir=_run(ws)), "--out", out],
                  (f"{out}: exists and is not a directory",))


# --------------------------------------------------------------------------------------------
# kdpipe run (each refused before any host starts)
# --------------------------------------------------------------------------------------------

@case("run/teacher hosts without a teacher directory")
def _(ws):
    return Expect(["run", *ws.config("model.teacher={hidden_size: 32, intermediate_size: 64, "
                                     "num_hidden_layers: 2, num_attention_heads: 2}")],
                  ("model.teacher.path: teacher source 'offline' loads the teacher from a Hugging "
                   "Face directory",))


@case("run/cache written by another teacher")
def _(ws):
    other = ws.root / "run" / "student"
    return Expect(["run", *ws.config(f"model.teacher={{path: {other}}}")],
                  (f"cache.path: the train cache at {_train_cache(ws)} was written by another "
                   f"teacher (sha256:",), then=_absent(ws.scratch / "run"))


@case("run/more hosts than the embedded Ray has")
def _(ws):
    # refused once the embedded Ray is up, before any placement group (no 600 s wait); the
    # cache is complete, so only the student group asks
    return Expect(["run", *ws.config("cluster.student.hosts=4",
                                     "cluster.student.resources={CPU: 4096}")],
                  ("cluster.student: 4 host(s) x {'CPU': 4096.0} ask for {'CPU': 16384.0}",
                   "but the embedded local Ray has {'CPU':", "short of CPU) and never grows",
                   "lower cluster.student.hosts or cluster.student.resources"),
                  then=_absent(ws.scratch / "run"))


@case("run/embedded Ray that does not start")
def _(ws):
    asked = {}

    def timed_out(**kwargs):  # what Ray 2.60 raises when its raylet is not up in 30 s
        asked.update(kwargs)
        raise Exception("The current node timed out during startup. This could happen because "
                        "some of the raylet failed to startup or the GCS has become overloaded.")

    def then():
        _absent(ws.scratch / "run")()
        # an embedded Ray, without the dashboard that configs/tiny-test.yaml turns off
        assert asked["address"] == "local" and asked["include_dashboard"] is False, asked

    return Expect(["run", *ws.config()],
                  ("cluster.address: none given, so kdpipe started an embedded local Ray, which "
                   "failed to start: The current node timed out during startup.",
                   "the GCS has become overloaded. If it timed out, retry when this machine is "
                   "less loaded; Ray's logs are in session_latest/logs under its temp dir",
                   "raylet.out, gcs_server.out", "`ray start --head`"),
                  then=then, patch=(ray, "init", timed_out))


# --------------------------------------------------------------------------------------------
# Inspect
# --------------------------------------------------------------------------------------------

@case("inspect/not a kdpipe directory")
def _(ws):
    return Expect(["inspect", ws.root / "teacher"], (f"path: {ws.root / 'teacher'} is not a cache",))


@case("inspect/damaged cache manifest")
def _(ws):
    manifest = _train_cache(ws) / "manifest.json"
    ws.write(manifest, b"\xff\xfe")
    return Expect(["inspect", ws.root / "cache"],
                  (f"cache {_train_cache(ws)}: manifest.json is not valid JSON",))


# --------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(demo_dir, tmp_path_factory):
    """Copies of the demo's tokenizer, prepared data, teacher export, cache and distilled run;
    yields ``(root, digest of every file)``. The shared demo is checked untouched at the end."""
    demo = demo_dir / "runs" / "tiny-test"
    demo_before = tree_digest(demo_dir)
    root = tmp_path_factory.mktemp("ws")
    shutil.copy(demo / "tokenizer.json", root)
    for source, target in (("data", "data"), ("cache", "cache"), ("teacher/student", "teacher"),
                           ("distilled/checkpoints", "run/checkpoints"),
                           ("distilled/student", "run/student")):
        shutil.copytree(demo / source, root / target)
    yield root, tree_digest(root)
    assert tree_digest(demo_dir) == demo_before


def test_corpus_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_naming_the_culprit(name, workspace, tmp_path, cli, monkeypatch):
    root, pristine = workspace
    ws = Workspace(root, tmp_path)
    try:
        expect = CASES[name](ws)
        if expect.patch is not None:
            monkeypatch.setattr(*expect.patch)
        damaged = bool(ws.edits)
        before = tree_digest(root) if damaged else pristine
        code, out, err = cli(expect.args, tmp_path)
        after = tree_digest(root)
    finally:
        ws.restore()
    if damaged:
        assert tree_digest(root) == pristine, "the workspace could not be restored"
    verb = expect.args[0]
    assert code == 2, f"exit code {code}\n{out}\n{err}"
    assert "Traceback" not in err
    # `kdpipe run` cases refused once the embedded Ray is up follow Ray's own startup records
    message = "\n".join(line for line in err.strip().splitlines()
                        if not RAY_LOG_RECORD.match(line)).strip()
    assert message.startswith(f"kdpipe {verb}: error: ") and message.count("error:") == 1, message
    assert "\n\n" not in message and len(message) < 2000, message
    flat = " ".join(message.split())
    for text in expect.says:
        assert text in flat, f"{text!r} not in: {flat}"
    assert after == before, sorted(k for k in before.keys() | after.keys()
                                   if before.get(k) != after.get(k))
    if expect.then is not None:
        expect.then()


def test_a_real_process_exits_2_without_traceback(workspace, tmp_path):
    """The console entry point, in its own process: Orbax leaves failed reads behind as
    coroutines that Python reports when it collects them; nothing of that may reach the user."""
    root, pristine = workspace
    ws = Workspace(root, tmp_path)
    try:
        expect = CASES["checkpoint/corrupt state"](ws)
        proc = subprocess.run([sys.executable, "-m", "actors.cli", *map(str, expect.args)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
    finally:
        ws.restore()
    assert tree_digest(root) == pristine
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.startswith("kdpipe export: error: ") and "corrupt checkpoint" in proc.stderr
    # No traceback of ours, and none of Orbax's failed reads reported as unraisable coroutines.
    # (TensorStore may still print "Event loop is closed" from its own threads when a read
    # finishes after Orbax closed its loop: library noise we cannot reach; see the issue note.)
    assert "Exception ignored" not in proc.stderr, proc.stderr
    for package in ("pipeline", "actors"):
        assert f"{os.sep}{package}{os.sep}" not in proc.stderr, proc.stderr

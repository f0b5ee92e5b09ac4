"""Commands on reasonable input that used to refuse or crash, through the ``kdpipe`` CLI:

- ``export`` needs the checkpoint and the config's student spec only (no teacher, cache or
  prepared data), whatever ``cluster.teacher_source`` says;
- ``eval`` of a ``remote``/``hybrid`` config takes the teacher's targets from the eval cache
  when it is complete, else from the teacher run on this host, and says which;
- ``cache`` skips an empty split (``data.eval_fraction: 0``), and ``eval`` says there is none;
- ``inspect`` reads a cache at any TensorStore kvstore URL (as ``cache.path`` does) and refuses
  ``--set`` (it reads a path, not a config);
- a ``cache.path`` that is an existing file is refused (exit 2) and left as it was;
- ``data.seq_len`` past a model's ``max_position_embeddings`` is refused, for the student and
  the teacher, initialised from the config or loaded from a Hugging Face directory.

The workspace is the session's tiny demo (tests/conftest.py), only read: its tokenizer,
prepared data, teacher, complete top-k cache and the distilled run's checkpoints (steps 4 and
8) and export. The teacher source is not part of the config hash, so every source's config
opens those checkpoints.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY

STEPS = 8  # the demo's distilled run


def _args(overrides: list[str], *more: str) -> list:
    """configs/tiny-test.yaml with ``--set`` for every override."""
    return [TINY, *[arg for o in [*overrides, *more] for arg in ("--set", o)]]


@pytest.fixture
def demo(demo_dir):
    """``(run, overrides)``: the demo's run directory and the overrides of the config of its
    distilled student (whose checkpoints the tests read)."""
    run = demo_dir / "runs" / "tiny-test"
    return run, [f"run_dir={run / 'distilled'}", f"data.tokenizer={run / 'tokenizer.json'}",
                 f"data.prepared_dir={run / 'data'}", f"cache.path={run / 'cache'}",
                 f"model.teacher={{path: {run / 'teacher' / 'student'}}}"]


def _weights(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {name: value for file in sorted(directory.glob("*.safetensors"))
            for name, value in load_file(file).items()}


def _one_paragraph(err: str) -> str:
    """The message of a refusal, whitespace-normalised, after checking it is one paragraph."""
    assert err.startswith("kdpipe ") and "Traceback" not in err and "\n\n" not in err.strip(), err
    return " ".join(err.split())


# --------------------------------------------------------------------------------------------
# export, eval
# --------------------------------------------------------------------------------------------

def test_export_needs_only_the_checkpoint_and_the_student_spec(demo, cli, tmp_path):
    """No teacher, no cache and no prepared data there: a config of each teacher source that
    used to need one of them (offline: the eval cache; live: the teacher; hybrid and remote
    were refused) exports the weights the training run exported at the same step."""
    run, overrides = demo
    absent = tmp_path / "absent"
    want = _weights(run / "distilled" / "student")
    for source in ("offline", "live", "hybrid"):
        out_dir = tmp_path / source
        code, out, err = cli(["export", *_args(
            overrides, f"cluster.teacher_source={source}", f"cache.path={absent / 'cache'}",
            f"model.teacher={{path: {absent / 'teacher'}}}", f"data.prepared_dir={absent / 'data'}",
            f"data.tokenizer={absent / 'tokenizer.json'}"), "--out", out_dir], tmp_path)
        assert code == 0, (source, err)
        assert f"step {STEPS} exported to {out_dir}" in out
        got = _weights(out_dir)
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{source}: {name}")
        assert json.loads((out_dir / "config.json").read_text()) == json.loads(
            (run / "distilled" / "student" / "config.json").read_text())
    assert not absent.exists()


def test_generate_from_the_checkpoint_and_its_export(demo, cli, tmp_path):
    """kdpipe generate: the latest checkpoint's student and its export (--model) continue a
    prompt with the same greedy text; a prompt past the context is refused, naming it."""
    run, overrides = demo
    said = []
    for model in ([], ["--model", run / "distilled" / "student"]):
        code, out, err = cli(["generate", *_args(overrides), "--prompt", "def main(", *model,
                              "--max-new-tokens", "6"], tmp_path)
        assert code == 0, err
        assert out.startswith("def main(")
        said.append(out)
    assert said[0] == said[1]
    code, _, err = cli(["generate", *_args(overrides), "--prompt", "x " * 80], tmp_path)
    assert code == 2 and "max_position_embeddings 64" in _one_paragraph(err)


def test_eval_of_a_remote_config_takes_a_complete_cache_or_the_teacher_on_this_host(
        demo, cli, tmp_path):
    run, overrides = demo

    def evaluate(*more):
        code, out, err = cli(["eval", *_args(overrides, *more)], tmp_path)
        assert code == 0, err
        return json.loads(out)

    live = evaluate("cluster.teacher_source=live")
    assert live["teacher_targets"] == f"live teacher {run / 'teacher' / 'student'} on this host"
    assert live["step"] == STEPS and live["kl_loss"] >= 0

    # No cache there, or one whose last eval shard is not committed: the teacher runs here.
    assert evaluate("cluster.teacher_source=remote", f"cache.path={tmp_path / 'none'}") == live
    partial = tmp_path / "partial"
    shutil.copytree(run / "cache" / "eval", partial / "eval")
    last = max((partial / "eval" / "commits").iterdir())
    last.unlink()
    assert evaluate("cluster.teacher_source=hybrid", f"cache.path={partial}") == live

    # The complete cache: read, as an offline run reads it (top-8: another KL).
    cached = evaluate("cluster.teacher_source=hybrid")
    assert cached["teacher_targets"] == f"cache {run / 'cache' / 'eval'}"
    assert cached["ce_loss"] == pytest.approx(live["ce_loss"], rel=1e-6)
    assert cached["kl_loss"] != live["kl_loss"]


# --------------------------------------------------------------------------------------------
# An empty split
# --------------------------------------------------------------------------------------------

def test_cache_skips_an_empty_split_and_eval_says_there_is_none(demo, cli, tmp_path):
    from pipeline.data import read_info

    run, overrides = demo
    empty_eval = [f"data.prepared_dir={tmp_path / 'data'}", f"data.sources=[{textwrap.__file__}]",
                  "data.eval_fraction=0", f"cache.path={tmp_path / 'cache'}",
                  f"run_dir={tmp_path / 'run'}"]
    code, _, err = cli(["prepare-data", *_args(overrides, *empty_eval)], tmp_path)
    assert code == 0, err
    code, out, err = cli(["cache", *_args(overrides, *empty_eval)], tmp_path)
    assert code == 0, err
    shards = -(-read_info(tmp_path / "data").splits["train"]["num_rows"] // 16)
    assert f"train: wrote {shards} shards" in out and "eval: no rows, nothing to cache" in out
    assert (tmp_path / "cache" / "train" / "manifest.json").exists()
    assert not (tmp_path / "cache" / "eval").exists()
    code, out, err = cli(["cache", *_args(overrides, *empty_eval), "--split", "eval"], tmp_path)
    assert code == 0 and out == "eval: no rows, nothing to cache\n", err

    for source in ("offline", "remote"):
        code, _, err = cli(["eval", *_args(overrides, *empty_eval,
                                           f"cluster.teacher_source={source}")], tmp_path)
        assert code == 2
        assert (f"data.eval_fraction: the prepared dataset {tmp_path / 'data'} has no held-out "
                f"rows to evaluate on") in _one_paragraph(err)


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------

def test_inspect_reads_a_cache_at_a_kvstore_url(demo, cli, tmp_path):
    run, _ = demo
    url = f"file://{run / 'cache'}"
    code, out, err = cli(["inspect", url], tmp_path)
    assert code == 0, err
    assert out.startswith(f"cache {url}/train\n") and f"cache {url}/eval\n" in out
    assert "INCOMPLETE" not in out
    code, out, err = cli(["inspect", f"{url}/eval/"], tmp_path)
    assert code == 0 and out.startswith(f"cache {url}/eval/\n") and "top-8 log-probs" in out, err

    code, _, err = cli(["inspect", f"file://{tmp_path}"], tmp_path)
    assert code == 2
    assert (f"path: file://{tmp_path} holds no cache (no manifest.json there or under train/ "
            f"or eval/)") in _one_paragraph(err)
    code, _, err = cli(["inspect", "nonsense://bucket/cache"], tmp_path)
    assert code == 2
    assert "'nonsense://bucket/cache' is not a TensorStore kvstore URL" in _one_paragraph(err)


def test_inspect_refuses_set(tmp_path, cli, capsys):
    with pytest.raises(SystemExit) as stop:
        cli(["inspect", tmp_path, "--set", "loss.temperature=2"], tmp_path)
    assert stop.value.code == 2
    assert "unrecognized arguments: --set loss.temperature=2" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# cache.path an existing file
# --------------------------------------------------------------------------------------------

def test_a_cache_path_that_is_a_file_is_refused_and_kept(demo, cli, tmp_path):
    _, overrides = demo
    blocker = tmp_path / "cache.bin"
    blocker.write_bytes(b"not a cache")
    for verb, path in (("cache", blocker), ("train", blocker), ("cache", blocker / "sub")):
        code, _, err = cli([verb, *_args(overrides, f"cache.path={path}",
                                         f"run_dir={tmp_path / 'run'}")], tmp_path)
        assert code == 2, err
        assert (f"cache.path: {blocker} is an existing file, not a directory"
                in _one_paragraph(err)), (verb, path)
        assert blocker.read_bytes() == b"not a cache"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.bin"]


# --------------------------------------------------------------------------------------------
# data.seq_len past a model's context
# --------------------------------------------------------------------------------------------

def test_seq_len_past_a_models_context_is_refused(demo, cli, tmp_path):
    run, overrides = demo
    run_dir = f"run_dir={tmp_path / 'run'}"

    def refused(verb, *more):
        code, _, err = cli([verb, *_args(overrides, run_dir, *more)], tmp_path)
        assert code == 2, err
        assert not (tmp_path / "run").exists()
        return _one_paragraph(err)

    # initialised from the config: refused when the config is loaded
    assert "data.seq_len (128) exceeds model.student.max_position_embeddings (64)" in refused(
        "train", "data.seq_len=128")
    teacher = ("model.teacher={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
               "num_attention_heads: 2, max_position_embeddings: 16}")
    assert "data.seq_len (32) exceeds model.teacher.max_position_embeddings (16)" in refused(
        "train", teacher, "cluster.teacher_source=live")

    # loaded from a Hugging Face directory: refused before its weights are read
    short = Path(shutil.copytree(run / "teacher" / "student", tmp_path / "short"))
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    said = refused("train", f"model.student={{path: {short}}}")
    assert (f"data.seq_len (32) exceeds model.student.max_position_embeddings (16, in "
            f"{short / 'config.json'})") in said
    for verb, source in (("cache", "offline"), ("train", "live")):
        said = refused(verb, f"model.teacher={{path: {short}}}", f"cluster.teacher_source={source}",
                       f"cache.path={tmp_path / 'run' / 'cache'}")
        assert (f"data.seq_len (32) exceeds model.teacher.max_position_embeddings (16, in "
                f"{short / 'config.json'})") in said, verb

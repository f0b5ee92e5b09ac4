"""A tiny run for the driver tests: tokenizer, prepared data and a saved teacher, and a quiet
``kdpipe run``."""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.metrics import read_example_logs, read_metrics

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny-test.yaml"


def make_tiny_run(directory: Path, *, padded_vocab: int = 0) -> list[str]:
    """A tokenizer, a prepared dataset (about 150 train and 30 eval rows of 32 tokens) and a
    randomly initialised teacher saved as a Hugging Face directory, all under ``directory``;
    returns the ``--set`` overrides of configs/tiny-test.yaml that use them. With
    ``padded_vocab``, the teacher's and the student's heads have that many ids past the
    tokenizer's, as Qwen-family checkpoints do."""
    from pipeline.data import prepare_dataset, read_info, train_bpe_tokenizer
    from pipeline.models.build import build_model
    from pipeline.models.hf_io import save_pretrained
    from pipeline.models.sharding import make_mesh

    text = Path(textwrap.__file__).read_text()[:12000]
    docs = directory / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": text[i:i + 400]}) + "\n"
                            for i in range(0, len(text), 400)))
    overrides = [f"data.tokenizer={directory / 'tokenizer.json'}",
                 f"data.prepared_dir={directory / 'data'}",
                 f"model.teacher={{path: {directory / 'teacher'}}}"]
    config = load_config(TINY, overrides[:2] + [f"data.sources=[{docs}]"])
    train_bpe_tokenizer([textwrap.__file__], config.demo.tokenizer_vocab_size,
                        Path(config.data.tokenizer))
    prepare_dataset(config.data, progress=False)
    vocab_size = read_info(config.data.prepared_dir).vocab_size + padded_vocab
    teacher = build_model(config.model.teacher, vocab_size, 1, make_mesh())
    save_pretrained(teacher, directory / "teacher")
    return overrides + ([f"model.student.vocab_size={vocab_size}"] if padded_vocab else [])


def quiet_run(config, **kwargs):
    """``actors.driver.run`` with its view printed into a string, not the test's output."""
    from rich.console import Console

    from actors.driver import run

    return run(config, console=Console(file=io.StringIO(), width=200), **kwargs)


def config_of(tiny: tuple, name: str, *more: str):
    """The tiny config of a module's ``tiny`` fixture, ``(work, overrides)``, with its own run
    directory ``work/name`` and ``more`` overrides."""
    work, overrides = tiny
    return load_config(TINY, [*overrides, f"run_dir={work / name}", *more])


def checked_example_logs(config, samples: int) -> list[dict]:
    """The run's example logs (``logging.example_ids``), checked: every global sample offset
    below ``samples`` exactly once (none lost, none twice), on the rows the global order puts
    there. Returns the records."""
    from pipeline.data import global_order, read_info

    records = read_example_logs(config.run_dir)
    offsets = np.concatenate([r["offsets"] for r in records])
    np.testing.assert_array_equal(np.sort(offsets), np.arange(samples))
    num_rows = read_info(config.data.prepared_dir).splits["train"]["num_rows"]
    np.testing.assert_array_equal(np.concatenate([r["rows"] for r in records]),
                                  global_order(num_rows, config.data.seed, offsets))
    return records


def assert_same_curves(got_dir, want_dir, *, rel: float, names: tuple[str, ...]):
    """The same metric records (split, step) in both runs, ``names`` equal within ``rel``."""
    got = {(r["split"], r["step"]): r for r in read_metrics(got_dir)}
    want = {(r["split"], r["step"]): r for r in read_metrics(want_dir)}
    assert got.keys() == want.keys()
    for key, record in want.items():
        for name in names:
            if name in record:
                assert got[key][name] == pytest.approx(record[name], rel=rel), (key, name)

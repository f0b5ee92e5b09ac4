"""Data preparation (formats, packing, labels, split, fingerprint), global order and bad input."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DataConfig
from pipeline.data import (IGNORE_INDEX, Document, HostBatches, TokenDataset, eval_batches,
                           global_order, host_offsets, is_held_out, load_tokenizer, pack_rows,
                           prepare_dataset, read_info, resolve_sources, tokenizer_fingerprint,
                           train_bpe_tokenizer)
from pipeline.errors import ConfigError, DataError

EOS = "<|endoftext|>"
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega def return class import for while").split()


def random_docs(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 40)))) for _ in range(count)]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(random_docs(200, 0)))
    path = root / "tokenizer.json"
    train_bpe_tokenizer([corpus], 300, path)
    return path


def config(tmp_path: Path, tokenizer_path: Path, sources, **kw) -> DataConfig:
    base = dict(sources=tuple(str(s) for s in sources), tokenizer=str(tokenizer_path),
                prepared_dir=str(tmp_path / "prepared"), seq_len=16, eval_fraction=0.0,
                rows_per_shard=7)
    base.update(kw)
    return DataConfig(**base)


def all_rows(prepared_dir, split="train") -> dict[str, np.ndarray]:
    dataset = TokenDataset(prepared_dir, split)
    return dataset.read_rows(np.arange(dataset.num_rows))


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# packing
# ----------------------------------------------------------------------------------------------

def reference_pack(tokens, targets, seq_len, documents=None):
    """Row r, position t: input tokens[r L + t]; label tokens[r L + t + 1] if it is a target
    (and, with documents, of the same document); segment: 1 + the number of document changes
    since the row's start, 0 on padding."""
    rows = []
    n = len(tokens)
    r = 0
    while r * seq_len + 1 < n:
        ids, mask, labels, segments = [], [], [], []
        for t in range(seq_len):
            i = r * seq_len + t
            ids.append(int(tokens[i]) if i < n else 0)
            mask.append(1 if i < n else 0)
            j = i + 1
            same = documents is None or (j < n and documents[j] == documents[i])
            labels.append(int(tokens[j]) if j < n and targets[j] and same else IGNORE_INDEX)
            if documents is not None:
                segment = 0 if i >= n else 1 if t == 0 else (
                    segments[-1] + (documents[i] != documents[i - 1]))
                segments.append(int(segment))
        rows.append((ids, mask, labels) + ((segments,) if documents is not None else ()))
        r += 1
    return rows


@pytest.mark.parametrize("seed", range(4))
def test_pack_rows_matches_reference_and_streams(seed):
    rng = np.random.default_rng(seed)
    n, seq_len = int(rng.integers(2, 200)), int(rng.integers(1, 12))
    tokens = rng.integers(1, 1000, size=n).astype(np.int32)
    targets = rng.random(n) < 0.7
    documents = np.cumsum(rng.random(n) < 0.2)  # document numbers, non-decreasing
    for streams in ((tokens, targets), (tokens, targets, documents)):
        want = reference_pack(*streams[:2], seq_len, *streams[2:])
        pack = lambda s, final: pack_rows(s[0], s[1], seq_len, final=final,  # noqa: E731
                                          documents=s[2] if len(s) == 3 else None)
        rows, _ = pack(streams, final=True)
        got = list(zip(*(rows[key].tolist() for key in
                         ("input_ids", "attention_mask", "labels", "segment_ids")[:len(want[0])])))
        assert got == want and len(rows) == len(want[0])
        # Fed in random pieces (as prepare_dataset does, document by document): the same rows.
        pieces, rest = [], tuple(stream[:0] for stream in streams)
        cuts = np.sort(rng.integers(0, n, size=5))
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, n]):
            out, rest = pack(tuple(np.concatenate([r, s[a:b]]) for r, s in zip(rest, streams)),
                             final=False)
            pieces.append(out)
        pieces.append(pack(rest, final=True)[0])
        for key in rows:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in pieces]), rows[key])


# ----------------------------------------------------------------------------------------------
# formats, labels, fingerprint
# ----------------------------------------------------------------------------------------------

def write_formats(root: Path, docs: list[str]) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    paths["jsonl"] = root / "docs.jsonl"
    paths["jsonl"].write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)))
    table = pa.table({"text": docs, "id": list(range(len(docs)))})
    paths["parquet"] = root / "docs.parquet"
    pq.write_table(table, paths["parquet"], row_group_size=5)
    paths["arrow"] = root / "data-00000-of-00001.arrow"  # the `datasets` layout: IPC stream
    with pa.OSFile(str(paths["arrow"]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=4)
    paths["arrow_file"] = root / "file-format.arrow"
    with pa.OSFile(str(paths["arrow_file"]), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=4)
    hf_dir = root / "save_to_disk"  # `datasets.Dataset.save_to_disk` layout: JSON beside Arrow
    hf_dir.mkdir()
    (hf_dir / paths["arrow"].name).write_bytes(paths["arrow"].read_bytes())
    (hf_dir / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    (hf_dir / "dataset_info.json").write_text("{}")
    paths["hf_dir"] = hf_dir
    text_dir = root / "text"
    text_dir.mkdir()
    for i, d in enumerate(docs):
        (text_dir / f"doc{i:03d}.txt").write_text(d)
    paths["text"] = text_dir
    return paths


def test_all_formats_give_the_same_rows_and_fingerprint(tmp_path, tokenizer_path):
    docs = random_docs(23, 1)
    paths = write_formats(tmp_path / "in", docs)
    fingerprints = set()
    for name, path in paths.items():
        cfg = config(tmp_path / name, tokenizer_path, [path])
        info = prepare_dataset(cfg, progress=(name == "jsonl"))
        fingerprints.add(info.fingerprint())
    assert len(fingerprints) == 1
    # The content round-trips: the rows' real tokens decode to the documents joined by EOS.
    rows = all_rows(tmp_path / "jsonl" / "prepared")
    tokenizer = load_tokenizer(tokenizer_path)
    stream = rows["input_ids"][rows["attention_mask"] == 1]
    final_position = np.nonzero(rows["attention_mask"][-1])[0][-1]
    if rows["labels"][-1, final_position] != IGNORE_INDEX:  # the final token is only a label
        stream = np.r_[stream, rows["labels"][-1, final_position]]
    texts = tokenizer.decode(stream.tolist(), skip_special_tokens=False).split(EOS)
    assert texts[:-1] == docs and texts[-1] == ""
    # Every token but each document's first is a target exactly once (data.document_mask: a
    # document's last token predicts nothing), and labels are the next input.
    labels = rows["labels"]
    assert (labels != IGNORE_INDEX).sum() == len(stream) - len(docs)
    inner = labels[:, :-1] != IGNORE_INDEX
    np.testing.assert_array_equal(labels[:, :-1][inner], rows["input_ids"][:, 1:][inner])
    across = labels[:-1, -1] != IGNORE_INDEX
    np.testing.assert_array_equal(labels[:-1, -1][across], rows["input_ids"][1:, 0][across])


def test_fingerprint_is_path_independent_and_content_dependent(tmp_path, tokenizer_path):
    docs = random_docs(10, 2)
    a = write_formats(tmp_path / "a", docs)["jsonl"]
    b = tmp_path / "elsewhere" / "renamed.jsonl"
    b.parent.mkdir()
    b.write_bytes(a.read_bytes())
    fa = prepare_dataset(config(tmp_path / "A", tokenizer_path, [a]), progress=False).fingerprint()
    fb = prepare_dataset(config(tmp_path / "B", tokenizer_path, [b], rows_per_shard=3),
                         progress=False).fingerprint()
    assert fa == fb
    c = write_formats(tmp_path / "c", docs[:-1] + [docs[-1] + " omega"])["jsonl"]
    fc = prepare_dataset(config(tmp_path / "C", tokenizer_path, [c]), progress=False).fingerprint()
    assert fc != fa


def test_segment_ids_follow_the_documents_and_change_the_fingerprint(tmp_path, tokenizer_path):
    docs = random_docs(9, 4)
    src = write_formats(tmp_path / "in", docs)["jsonl"]
    tokenizer = load_tokenizer(tokenizer_path)
    encoded = [tokenizer.encode(d).ids + [tokenizer.token_to_id(EOS)] for d in docs]
    tokens = np.concatenate(encoded)
    documents = np.repeat(np.arange(len(docs)), [len(e) for e in encoded])
    targets = np.ones(len(tokens), bool)
    infos = {}
    for mask in (True, False):
        cfg = config(tmp_path / f"mask{mask}", tokenizer_path, [src], document_mask=mask)
        infos[mask] = prepare_dataset(cfg, progress=False)
        assert infos[mask].document_mask is mask and read_info(cfg.prepared_dir) == infos[mask]
        rows = all_rows(cfg.prepared_dir)
        want = reference_pack(tokens, targets, 16, documents if mask else None)
        keys = ("input_ids", "attention_mask", "labels") + (("segment_ids",) if mask else ())
        assert sorted(rows) == sorted(keys)
        assert list(zip(*(rows[key].tolist() for key in keys))) == want
    assert infos[True].fingerprint() != infos[False].fingerprint()
    # A dataset prepared before segment ids (no document_mask in its metadata) reads as before.
    old = tmp_path / "maskFalse" / "prepared"
    metadata = json.loads((old / "metadata.json").read_text())
    del metadata["document_mask"]
    (old / "metadata.json").write_text(json.dumps(metadata))
    assert read_info(old) == infos[False] and "segment_ids" not in all_rows(old)
    # Unpacked, every row is one document (or a piece of one): one segment.
    cfg = config(tmp_path / "unpacked", tokenizer_path, [src], pack=False)
    prepare_dataset(cfg, progress=False)
    rows = all_rows(cfg.prepared_dir)
    np.testing.assert_array_equal(rows["segment_ids"], rows["attention_mask"])


def test_prompt_completion_has_loss_on_completion_only(tmp_path, tokenizer_path):
    pairs = [("alpha beta gamma", " delta epsilon"), ("omega psi", " chi phi upsilon tau"),
             ("def return", " class import")]
    src = tmp_path / "pairs.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": p, "completion": c}) for p, c in pairs))
    for pack in (True, False):
        cfg = config(tmp_path / f"pack{pack}", tokenizer_path, [src], seq_len=8, pack=pack)
        prepare_dataset(cfg, progress=False)
        rows = all_rows(cfg.prepared_dir)
        tokenizer = load_tokenizer(tokenizer_path)
        trained = rows["labels"][rows["labels"] != IGNORE_INDEX].tolist()
        want = []
        for _, completion in pairs:
            want += tokenizer.encode(completion, add_special_tokens=False).ids
            want.append(tokenizer.token_to_id(EOS))
        assert trained == want
        if not pack:  # every pair starts its own row
            starts = [tokenizer.encode(p).ids[0] for p, _ in pairs]
            assert set(starts) <= set(rows["input_ids"][:, 0].tolist())


def test_held_out_split_rule(tmp_path, tokenizer_path):
    docs = random_docs(300, 3)
    held = [is_held_out(Document(d), 0.25) for d in docs]
    assert 0.15 < np.mean(held) < 0.35
    assert held == [is_held_out(Document(d), 0.25) for d in docs]  # deterministic
    assert not any(is_held_out(Document(d), 0.0) for d in docs)
    src = write_formats(tmp_path / "in", docs)["jsonl"]
    cfg = config(tmp_path, tokenizer_path, [src], eval_fraction=0.25, pack=False, seq_len=256)
    info = prepare_dataset(cfg, progress=False)
    assert info.splits["eval"]["num_rows"] == sum(held)
    assert info.splits["train"]["num_rows"] == len(docs) - sum(held)
    # Reordering the input moves no document between splits.
    shuffled = tmp_path / "shuffled.jsonl"
    lines = src.read_text().splitlines()
    shuffled.write_text("\n".join(lines[::-1]))
    cfg2 = config(tmp_path / "again", tokenizer_path, [shuffled], eval_fraction=0.25, pack=False,
                  seq_len=256)
    info2 = prepare_dataset(cfg2, progress=False)
    assert info2.splits["eval"]["num_rows"] == info.splits["eval"]["num_rows"]


def test_tokenizer_training_is_deterministic(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(random_docs(100, 4)))
    a = train_bpe_tokenizer([corpus], 280, tmp_path / "a" / "tokenizer.json")
    b = train_bpe_tokenizer([corpus], 280, tmp_path / "b" / "tokenizer.json")
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    assert a.get_vocab_size() == 280 and a.token_to_id(EOS) == 0
    text = "def omega(x): return 'é…'"
    assert a.decode(a.encode(text).ids) == text  # byte-level: nothing is unknown
    with pytest.raises(DataError, match="vocab_size: expected > 257"):
        train_bpe_tokenizer([corpus], 100, tmp_path / "c.json")


# ----------------------------------------------------------------------------------------------
# global order
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer_path) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    src = root / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": d}) for d in random_docs(60, 5)))
    cfg = DataConfig(sources=(str(src),), tokenizer=str(tokenizer_path),
                     prepared_dir=str(root / "out"), seq_len=8, eval_fraction=0.2, rows_per_shard=50)
    prepare_dataset(cfg, progress=False)
    return root / "out"


def test_resume_on_another_host_count_sees_the_same_global_batches(prepared):
    dataset = TokenDataset(prepared)
    n, global_batch, seed = dataset.num_rows, 12, 7
    assert n > 3 * global_batch

    def run(host_count, offset, steps):
        iters = [HostBatches(dataset, seed=seed, global_batch=global_batch, host_index=h,
                             host_count=host_count, offset=offset) for h in range(host_count)]
        out = []
        for _ in range(steps):
            parts = [next(it) for it in iters]
            out.append((np.concatenate([p[0] for p in parts]),
                        np.concatenate([p[1]["input_ids"] for p in parts])))
        return out, iters[0].offset

    steps = 2 * (n // global_batch) + 3  # crosses two epoch boundaries
    uninterrupted, _ = run(2, 0, steps)
    first, offset = run(3, 0, 5)
    rest, _ = run(4, offset, steps - 5)
    resumed = first + rest
    for (ids_a, tok_a), (ids_b, tok_b) in zip(uninterrupted, resumed):
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(tok_a, tok_b)
    consumed = np.concatenate([ids for ids, _ in uninterrupted])
    # Each epoch is a permutation: every example exactly once, none twice.
    for epoch in range(2):
        assert sorted(consumed[epoch * n:(epoch + 1) * n].tolist()) == list(range(n))
    assert not np.array_equal(consumed[:n], consumed[n:2 * n])  # a new order each epoch
    assert not np.array_equal(global_order(n, seed + 1, np.arange(n)), consumed[:n])
    # The batch rows are the rows with those ids.
    ids, batch = next(HostBatches(dataset, seed=seed, global_batch=4))
    np.testing.assert_array_equal(batch["input_ids"], dataset.read_rows(ids)["input_ids"])
    assert all(v.dtype == np.int32 and v.shape == (4, 8) for v in batch.values())


@pytest.mark.parametrize("num_rows, window", [(100, 16), (97, 10), (30, 30), (30, 64)])
def test_windowed_shuffle_visits_blocks_and_each_row_once_per_epoch(num_rows, window):
    seed, epochs = 3, 3
    order = global_order(num_rows, seed, np.arange(epochs * num_rows), window)
    for epoch in range(epochs):
        rows = order[epoch * num_rows:(epoch + 1) * num_rows]
        assert sorted(rows.tolist()) == list(range(num_rows))  # a permutation of the epoch
        # consecutive samples stay in one block until it is used up: the block ids change
        # once per block, and each block's rows come out in a shuffled order
        blocks = rows // window
        changes = np.flatnonzero(np.diff(blocks)) + 1
        assert len(changes) == -(-num_rows // window) - 1
        for part in np.split(rows, changes):
            assert sorted(part.tolist()) == list(range(part[0] // window * window,
                                                      min(part[0] // window * window + window,
                                                          num_rows)))
    assert not np.array_equal(order[:num_rows], order[num_rows:2 * num_rows])  # a new order
    # window 0 keeps the uniform epoch shuffle of all rows
    np.testing.assert_array_equal(global_order(num_rows, seed, np.arange(num_rows), 0),
                                  np.random.default_rng([seed, 0]).permutation(num_rows))


def test_windowed_batches_resume_on_another_host_count(prepared):
    dataset = TokenDataset(prepared)
    window, batch = 8, 4

    def ids(count: int, offset: int, steps: int) -> list[np.ndarray]:
        """The global batches of ``steps`` steps from ``offset`` on ``count`` hosts."""
        hosts = [HostBatches(dataset, seed=1, global_batch=batch, host_index=h, host_count=count,
                             offset=offset, shuffle_window=window) for h in range(count)]
        return [np.concatenate([next(host)[0] for host in hosts]) for _ in range(steps)]

    whole = ids(1, 0, 6)
    np.testing.assert_array_equal(np.concatenate(whole), np.concatenate(ids(2, 0, 3) + ids(4, 12, 3)))
    assert all(len(set((rows // window).tolist())) <= 2 for rows in whole)  # a block or two


def test_host_offsets_and_eval_batches(prepared):
    assert host_offsets(100, 12, 2, 3).tolist() == [108, 109, 110, 111]
    with pytest.raises(DataError, match=r"global batch size \(10\) must be divisible by the host "
                                        r"count \(3\)"):
        host_offsets(0, 10, 0, 3)
    dataset = TokenDataset(prepared, "eval")
    batches = list(eval_batches(dataset, 4, host_index=1, host_count=2))
    assert len(batches) == -(-dataset.num_rows // 4)
    assert all(b["input_ids"].shape == (2, 8) for b in batches)
    assert all((b["segment_ids"][b["attention_mask"] == 0] == 0).all() for b in batches)
    real = sum(int(b["attention_mask"].any(axis=1).sum()) for b in
               [*eval_batches(dataset, 4, host_index=0, host_count=2), *batches])
    assert real == dataset.num_rows
    assert len(list(eval_batches(dataset, 4, max_batches=1))) == 1


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

def test_bad_inputs_name_the_culprit(tmp_path, tokenizer_path):
    cases = {
        "empty.txt": (b"", "empty.txt: empty file"),
        "blank.jsonl": (b"\n\n", "blank.jsonl: empty file"),
        "latin1.txt": ("caf\u00e9".encode("latin-1"), "latin1.txt: not UTF-8 text (invalid byte "
                                                          "0xe9 at byte offset 3)"),
        "nocol.jsonl": (b'{"text": "a b"}\n{"body": "c"}\n',
                        "nocol.jsonl:2: missing column 'text' (or 'prompt' + 'completion'); "
                        "found ['body']"),
        "badjson.jsonl": (b'{"text": "a"}\n{"text": \n', "badjson.jsonl:2: not valid JSON"),
        "notstr.jsonl": (b'{"text": 3}\n', "notstr.jsonl:1: field 'text' must be a string"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError) as info:
            prepare_dataset(config(tmp_path / name.replace(".", "_"), tokenizer_path, [path]),
                            progress=False)
        assert message in str(info.value)
        assert list((tmp_path / name.replace(".", "_")).iterdir()) == []  # no partial output
    table_path = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"body": ["x"]}), table_path)
    with pytest.raises(DataError, match=r"nocol.parquet: missing column 'text'.*found \['body'\]"):
        prepare_dataset(config(tmp_path / "pq", tokenizer_path, [table_path]), progress=False)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="garbage.parquet: cannot read as parquet"):
        prepare_dataset(config(tmp_path / "g", tokenizer_path, [garbage]), progress=False)
    with pytest.raises(DataError, match=r"data.sources\[0\]: .*nothing.txt does not exist"):
        resolve_sources([str(tmp_path / "nothing.txt")])
    with pytest.raises(DataError, match=r"data.sources\[0\]: .*matches no input files"):
        resolve_sources([str(tmp_path / "*.nothing")])
    good = tmp_path / "good.txt"
    good.write_text("alpha beta")
    with pytest.raises(DataError, match="data.eos_token: '<eos>' is not in the tokenizer"):
        prepare_dataset(config(tmp_path / "e", tokenizer_path, [good], eos_token="<eos>"),
                        progress=False)
    with pytest.raises(DataError, match="data.tokenizer: no tokenizer file"):
        prepare_dataset(config(tmp_path / "t", tmp_path / "none.json", [good]), progress=False)
    with pytest.raises(ConfigError, match="data.seq_len: expected > 0, got 0"):
        config(tmp_path, tokenizer_path, [good], seq_len=0)


def test_token_id_beyond_the_model_vocab_is_refused(prepared):
    top = read_info(prepared).splits["train"]["max_token_id"]
    TokenDataset(prepared, vocab_size=top + 1)
    with pytest.raises(DataError, match=f"token id {top} >= the model's vocab size {top}"):
        TokenDataset(prepared, vocab_size=top)
    with pytest.raises(DataError, match="split: expected one of"):
        TokenDataset(prepared, "test")
    with pytest.raises(DataError, match="does not exist; run `kdpipe prepare-data` first"):
        TokenDataset(prepared.parent / "missing")


def test_existing_output_is_refused_untouched_or_replaced(tmp_path, tokenizer_path):
    src = tmp_path / "a.txt"
    src.write_text("alpha beta gamma " * 20)
    cfg = config(tmp_path, tokenizer_path, [src])
    first = prepare_dataset(cfg, progress=False)
    empty_eval = TokenDataset(cfg.prepared_dir, "eval")  # eval_fraction 0: nothing held out
    assert empty_eval.num_rows == 0 and list(eval_batches(empty_eval, 2)) == []
    with pytest.raises(DataError, match=r"\(eval\): the split has no rows"):
        HostBatches(empty_eval, seed=0, global_batch=2)
    before = snapshot(Path(cfg.prepared_dir))
    src.write_text("omega psi chi " * 20)
    with pytest.raises(DataError, match="already exists and is not empty; pass --overwrite"):
        prepare_dataset(cfg, progress=False)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match="not UTF-8"):
        prepare_dataset(config(tmp_path, tokenizer_path, [src, bad]), overwrite=True,
                        progress=False)
    assert snapshot(Path(cfg.prepared_dir)) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    second = prepare_dataset(cfg, overwrite=True, progress=False)
    assert second.fingerprint() != first.fingerprint()
    assert read_info(cfg.prepared_dir).fingerprint() == second.fingerprint()
    assert os.listdir(tmp_path / "prepared" / "train")  # shards written

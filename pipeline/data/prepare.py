"""Preparing a token dataset from raw text (``prepare_dataset``, what ``kdpipe prepare-data`` runs).

1. Read documents from ``data.sources``: ``.jsonl`` (an object a line with ``text``, or
   ``prompt`` + ``completion``), ``.parquet`` and ``.arrow`` (Hugging Face ``datasets`` files,
   read with pyarrow) with a ``text`` column or ``prompt``/``completion`` columns, and any other
   file as one UTF-8 text document.
2. Tokenize with a local ``tokenizer.json`` (the ``tokenizers`` library) and append ``eos_token``.
3. Send each document to the train or the held-out split by the hash of its text (see
   ``is_held_out``).
4. Pack each split into rows of ``seq_len`` tokens: ``input_ids`` ``[L]``, ``attention_mask``
   ``[L]`` (1 real, 0 padding) and ``labels`` ``[L]`` already aligned, ``labels[t]`` being the
   token after ``input_ids[t]``, or -100 where there is no loss (padding, prompt tokens, the end
   of the stream). Row r holds stream tokens ``[r L, r L + L)`` and their successors, so every
   stream token after the first is a target exactly once.
   With ``data.document_mask`` (the default) each row also gets ``segment_ids`` ``[L]``: the
   number of each token's document within the row, from 1 (a document continued from the row
   before is 1 too), 0 for padding. The model then keeps attention inside a document and
   restarts its positions (``pipeline.models.llama.model.document_positions``), and a
   document's last token gets no label, since its successor starts another document: a packed
   row trains exactly as its documents would alone.
5. Write ``<prepared_dir>/{train,eval}/part-NNNNN.parquet`` and ``metadata.json``, which holds
   each split's fingerprint: the SHA-256 of its rows' contents (segment ids included), so it
   depends on the data and never on paths or on how the rows are split into files.

``pipeline.data.dataset`` reads the result back.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import DataConfig
from pipeline.data.dataset import (FORMAT_NAME, FORMAT_VERSION, IGNORE_INDEX, METADATA_FILE, SPLITS,
                                   DatasetInfo, prompt_tokens, row_columns)
from pipeline.errors import DataError, ModelLoadError
from pipeline.metrics import progress_bar

# A parquet row group is the unit of random access when reading a shuffled batch: small enough
# that a batch scattered over many groups does not read much more than it needs.
ROW_GROUP_ROWS = 256
# Documents tokenized per `encode_batch` call (tokenizers parallelises inside one call).
ENCODE_BATCH_DOCS = 256
_TABLE_EXTENSIONS = (".jsonl", ".parquet", ".arrow")
_DIRECTORY_EXTENSIONS = _TABLE_EXTENSIONS + (".txt",)
TOKENIZER_FILE = "tokenizer.json"


# ------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------

def load_tokenizer(path: str | os.PathLike | None):
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file or a directory holding one: a
    local path, a kvstore URL (``gs://``, ``s3://``, ``http(s)://``: a URL ending in ``.json``
    is the file, any other the directory) or a Hub repository (``hf://org/name[@revision]``,
    read as ``pipeline.models.checkpoint_store`` reads checkpoints). ``None``: no tokenizer
    was configured (``data.tokenizer`` unset and no ``model.teacher.path`` to default to)."""
    from tokenizers import Tokenizer

    if path is None:
        raise DataError("data.tokenizer: not set, and there is no model.teacher.path whose "
                        "tokenizer.json would stand in; set data.tokenizer to a Hugging Face "
                        "tokenizer.json (or a directory holding one)")
    path = os.fspath(path)
    if "://" in path:
        from pipeline.models.checkpoint_store import open_checkpoint

        directory, name = (path.rsplit("/", 1) if path.endswith(".json")
                           else (path, TOKENIZER_FILE))
        try:
            store = open_checkpoint(directory)
            text = store.read(name)
        except ModelLoadError as e:
            raise DataError(f"data.tokenizer: {e}") from e
        file = store.url(name)
    else:
        file = str(Path(path) / TOKENIZER_FILE if Path(path).is_dir() else Path(path))
        text = Path(file).read_bytes() if Path(file).is_file() else None
    if text is None:
        raise DataError(f"data.tokenizer: no tokenizer file at {file} (expected a Hugging Face "
                        f"tokenizer.json; when data.tokenizer is unset, model.teacher.path's)")
    try:
        return Tokenizer.from_str(text.decode())
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise DataError(f"data.tokenizer: {file} is not a valid tokenizer.json ({e})") from e


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 (16 hex characters) of the tokenizer's canonical JSON, so two files with the
    same vocabulary, merges and normalisation compare equal wherever they live."""
    canonical = json.dumps(json.loads(tokenizer.to_str()), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def train_bpe_tokenizer(files: Sequence[str | os.PathLike], vocab_size: int,
                        out_path: str | os.PathLike, *,
                        special_tokens: Sequence[str] = ("<|endoftext|>",),
                        min_frequency: int = 2):
    """Train a byte-level BPE tokenizer (GPT-2 style) on UTF-8 text files; save it to
    ``out_path`` (a ``tokenizer.json``) and return it.

    Byte-level pre-tokenisation means any text can be encoded with no unknown token. Special
    tokens get the first ids, in the order given. Training is deterministic for the same files.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size <= 256 + len(special_tokens):
        raise DataError(f"vocab_size: expected > {256 + len(special_tokens)} (256 byte tokens plus "
                        f"the special tokens), got {vocab_size}")
    if not files:
        raise DataError("files: no text files to train the tokenizer on")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((_read_text_file(Path(f)) for f in files), trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_path))
    return tokenizer


# ------------------------------------------------------------------------------------------
# Reading documents
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Document:
    """One input document. ``prompt`` is None for plain text (loss on every token); otherwise
    the loss covers only ``text``, the completion that follows the prompt."""

    text: str
    prompt: str | None = None

    def key(self) -> bytes:
        """Bytes that identify the document's content (the held-out split hashes them)."""
        if self.prompt is None:
            return self.text.encode()
        return self.prompt.encode() + b"\x00" + self.text.encode()


def is_held_out(document: Document, eval_fraction: float) -> bool:
    """The split rule: held out iff ``int(sha256(content)[:8]) / 2**64 < eval_fraction``.

    It depends on the document's content only, so it survives renaming, reordering and
    appending data, and a document never moves between splits.
    """
    digest = hashlib.sha256(document.key()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < eval_fraction


def resolve_sources(sources: Sequence[str]) -> list[Path]:
    """Expand files, directories and glob patterns into the ordered list of files to read."""
    if not sources:
        raise DataError("data.sources: no input files given")
    files: list[Path] = []
    for i, source in enumerate(sources):
        path = Path(source)
        if any(ch in source for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(source, recursive=True) if Path(m).is_file())
        elif path.is_dir():
            matches = sorted(p for p in path.rglob("*")
                             if p.is_file() and p.suffix in _DIRECTORY_EXTENSIONS)
        elif path.is_file():
            matches = [path]
        else:
            raise DataError(f"data.sources[{i}]: {source} does not exist")
        if not matches:
            raise DataError(f"data.sources[{i}]: {source} matches no input files")
        files.extend(matches)
    return files


def _read_text_file(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (invalid byte {raw[e.start]:#04x} at byte offset "
                        f"{e.start}); convert it to UTF-8 or drop it") from None


def _document_from_fields(record: dict, where: str, data: DataConfig) -> Document:
    def text_of(field: str) -> str:
        value = record[field]
        if not isinstance(value, str):
            raise DataError(f"{where}: field {field!r} must be a string, got "
                            f"{type(value).__name__}")
        return value

    if data.text_field in record:
        return Document(text_of(data.text_field))
    if data.prompt_field in record and data.completion_field in record:
        return Document(text_of(data.completion_field), prompt=text_of(data.prompt_field))
    raise DataError(f"{where}: missing column {data.text_field!r} (or {data.prompt_field!r} + "
                    f"{data.completion_field!r}); found {sorted(record)}")


def _read_jsonl(path: Path, data: DataConfig) -> Iterator[Document]:
    for number, line in enumerate(_read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield _document_from_fields(record, f"{path}:{number}", data)


def _record_batches(path: Path) -> Iterator[pa.RecordBatch]:
    try:
        if path.suffix == ".parquet":
            yield from pq.ParquetFile(path).iter_batches(batch_size=1024)
            return
        # `datasets` writes the IPC streaming format; plain Arrow files use the file format.
        with pa.memory_map(str(path)) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_file(source)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
                return
            yield from reader
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read as {path.suffix[1:]} ({e})") from e


def _read_table_file(path: Path, data: DataConfig) -> Iterator[Document]:
    row = 0
    for batch in _record_batches(path):
        names = batch.schema.names
        if data.text_field in names:
            columns = [data.text_field]
        elif data.prompt_field in names and data.completion_field in names:
            columns = [data.prompt_field, data.completion_field]
        else:
            raise DataError(f"{path}: missing column {data.text_field!r} (or {data.prompt_field!r}"
                            f" + {data.completion_field!r}); found {names}")
        values = [batch.column(name).to_pylist() for name in columns]
        for i in range(batch.num_rows):
            record = {name: column[i] for name, column in zip(columns, values)}
            yield _document_from_fields(record, f"{path} row {row}", data)
            row += 1


def read_documents(path: Path, data: DataConfig) -> Iterator[Document]:
    """The documents of one input file, in file order. Raises ``DataError`` naming the file (and
    line or row) for unreadable, non-UTF-8, empty or malformed input."""
    if path.suffix == ".jsonl":
        documents = _read_jsonl(path, data)
    elif path.suffix in (".parquet", ".arrow"):
        documents = _read_table_file(path, data)
    else:
        text = _read_text_file(path)
        documents = iter([Document(text)] if text.strip() else [])
    count = 0
    for document in documents:
        count += 1
        yield document
    if count == 0:
        raise DataError(f"{path}: empty file (no documents)")


# ------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------

def pack_rows(tokens: np.ndarray, targets: np.ndarray, seq_len: int, *, final: bool,
              documents: np.ndarray | None = None):
    """Cut a token stream into rows with aligned labels (and segment ids).

    Args:
      tokens: ``[n]`` int32 stream.
      targets: ``[n]`` bool, whether a token is trained on when it is the next token.
      seq_len: L.
      final: also emit the last, partial row (padded with ``attention_mask`` 0).
      documents: ``[n]`` integers, the document each token belongs to (non-decreasing), or
        ``None``: no document boundaries.

    Returns ``(rows, rest)``: ``rows`` a dict of ``input_ids``, ``attention_mask``, ``labels``,
    each ``[r, L]`` int32, with ``labels[i, t] = tokens[i L + t + 1]`` where that token is a
    target (and, with ``documents``, of the same document) and -100 elsewhere; with
    ``documents`` also ``segment_ids`` ``[r, L]`` int32, the rank of each token's document
    within its row from 1, 0 for padding. ``rest`` the ``(tokens, targets)`` (and
    ``documents``) still to be packed (the next row's tokens, starting with the previous row's
    last target).
    """
    n = len(tokens)
    full = (n - 1) // seq_len if n > 0 else 0
    take = full
    if final and n - full * seq_len >= 2:
        take += 1
    size = take * seq_len
    padded = np.zeros(size + 1, np.int32)
    flags = np.zeros(size + 1, bool)
    used = min(n, size + 1)
    padded[:used] = tokens[:used]
    flags[:used] = targets[:used]
    real = np.zeros(size, np.int32)
    real[:min(n, size)] = 1
    if documents is not None:
        owner = np.full(size + 1, -1, np.int64)  # padding belongs to no document
        owner[:used] = documents[:used]
        flags[1:] &= owner[1:] == owner[:-1]  # flags[t + 1]: whether token t has a label
        row_owner = owner[:size].reshape(take, seq_len)
        starts = np.ones(row_owner.shape, bool)
        starts[:, 1:] = row_owner[:, 1:] != row_owner[:, :-1]
    labels = np.where(flags[1:], padded[1:], IGNORE_INDEX).astype(np.int32)
    rows = {"input_ids": padded[:size].reshape(take, seq_len),
            "attention_mask": real.reshape(take, seq_len),
            "labels": labels.reshape(take, seq_len)}
    if documents is not None:
        rows["segment_ids"] = (np.cumsum(starts, axis=1) * rows["attention_mask"]).astype(np.int32)
    streams = (tokens, targets) if documents is None else (tokens, targets, documents)
    cut = len(tokens) if final else full * seq_len
    return rows, tuple(stream[cut:] for stream in streams)


class _SplitWriter:
    """Writes one split's rows into parquet shards and hashes their contents."""

    def __init__(self, directory: Path, name: str, seq_len: int, rows_per_shard: int,
                 document_mask: bool):
        self.directory, self.name, self.seq_len = directory, name, seq_len
        self.rows_per_shard = rows_per_shard
        self.columns = row_columns(document_mask)
        self.pending: list[dict[str, np.ndarray]] = []
        self.pending_rows = 0
        self.shards: list[dict] = []
        # Without segment ids the header (and so the fingerprint) is what it was before them.
        header = f"{FORMAT_NAME}/{FORMAT_VERSION}/seq_len={seq_len}"
        self.hasher = hashlib.sha256((header + ("/segment_ids" if document_mask else "")).encode())
        self.num_rows = self.num_tokens = self.num_targets = 0
        self.max_token_id = -1
        self.max_prompt_tokens = 0
        (directory / name).mkdir(parents=True)

    def add(self, rows: dict[str, np.ndarray]) -> None:
        count = len(rows["input_ids"])
        if count == 0:
            return
        for key in self.columns:
            self.hasher.update(np.ascontiguousarray(rows[key], "<i4").tobytes())
        self.num_rows += count
        self.num_tokens += int(rows["attention_mask"].sum())
        self.num_targets += int((rows["labels"] != IGNORE_INDEX).sum())
        self.max_token_id = max(self.max_token_id, int(rows["input_ids"].max()),
                                int(rows["labels"].max()))
        self.max_prompt_tokens = max(self.max_prompt_tokens, int(prompt_tokens(
            rows["labels"], rows["attention_mask"]).max()))
        self.pending.append(rows)
        self.pending_rows += count
        while self.pending_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, count: int) -> None:
        merged = {k: np.concatenate([r[k] for r in self.pending]) for k in self.pending[0]}
        shard = {k: v[:count] for k, v in merged.items()}
        rest = {k: v[count:] for k, v in merged.items()}
        self.pending = [rest] if len(rest["input_ids"]) else []
        self.pending_rows -= count
        relative = f"{self.name}/part-{len(self.shards):05d}.parquet"

        def column(values: np.ndarray, dtype: pa.DataType) -> pa.Array:
            flat = values.ravel().astype(dtype.to_pandas_dtype())
            return pa.FixedSizeListArray.from_arrays(pa.array(flat, dtype), self.seq_len)

        table = pa.table({key: column(shard[key], pa.int8() if key == "attention_mask" else pa.int32())
                          for key in self.columns})
        pq.write_table(table, self.directory / relative, row_group_size=ROW_GROUP_ROWS,
                       compression="zstd")
        self.shards.append({"file": relative, "rows": count})

    def finish(self) -> dict:
        if self.pending_rows:
            self._flush(self.pending_rows)
        return {"num_rows": self.num_rows, "num_tokens": self.num_tokens,
                "num_target_tokens": self.num_targets, "max_token_id": self.max_token_id,
                "max_prompt_tokens": self.max_prompt_tokens,
                "fingerprint": self.hasher.hexdigest()[:16], "shards": self.shards}


# ------------------------------------------------------------------------------------------
# prepare-data
# ------------------------------------------------------------------------------------------

def _document_batches(files: list[Path], data: DataConfig, on_file_done) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for path in files:
        for document in read_documents(path, data):
            batch.append(document)
            if len(batch) == ENCODE_BATCH_DOCS:
                yield batch
                batch = []
        on_file_done()
    if batch:
        yield batch


def _encode(tokenizer, documents: list[Document], eos: list[int]):
    """Per document: (token ids, target flags) with the eos appended; prompt tokens are not
    targets. A completion is encoded without special tokens: any BOS belongs before the prompt."""
    texts = tokenizer.encode_batch([d.prompt if d.prompt is not None else d.text for d in documents])
    paired = [i for i, d in enumerate(documents) if d.prompt is not None]
    completions = dict(zip(paired, tokenizer.encode_batch(
        [documents[i].text for i in paired], add_special_tokens=False)))
    for i, encoding in enumerate(texts):
        if i in completions:
            prompt = encoding.ids
            rest = completions[i].ids + eos
            ids = np.asarray(prompt + rest, np.int32)
            flags = np.concatenate([np.zeros(len(prompt), bool), np.ones(len(rest), bool)])
        else:
            ids = np.asarray(encoding.ids + eos, np.int32)
            flags = np.ones(len(ids), bool)
        yield ids, flags


def prepare_dataset(data: DataConfig, *, overwrite: bool = False, progress: bool = True) -> DatasetInfo:
    """Tokenize, split and pack ``data.sources`` into ``data.prepared_dir`` (see the module doc).

    The dataset is written to a temporary sibling directory and moved into place at the end,
    so a failure leaves no partial output. An existing ``prepared_dir`` is refused (left as it
    is) unless ``overwrite``. Returns the ``DatasetInfo`` also written to ``metadata.json``.
    Raises ``DataError`` for bad input, naming the file and line or row.
    """
    out_dir = Path(data.prepared_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise DataError(f"data.prepared_dir: {out_dir} already exists and is not empty; pass "
                        f"--overwrite to replace it, or choose another directory")
    tokenizer = load_tokenizer(data.tokenizer)
    eos: list[int] = []
    if data.eos_token is not None:
        eos_id = tokenizer.token_to_id(data.eos_token)
        if eos_id is None:
            raise DataError(f"data.eos_token: {data.eos_token!r} is not in the tokenizer "
                            f"{data.tokenizer}; set it to one of its special tokens or null")
        eos = [eos_id]
    files = resolve_sources(data.sources)

    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        writers = {name: _SplitWriter(tmp_dir, name, data.seq_len, data.rows_per_shard,
                                      data.document_mask) for name in SPLITS}
        # A stream: (tokens, target flags[, each token's document number]) still to be packed.
        width = 3 if data.document_mask else 2
        streams = {name: (np.zeros(0, np.int32), np.zeros(0, bool), np.zeros(0, np.int64))[:width]
                   for name in SPLITS}

        def pack(stream, final):
            return pack_rows(stream[0], stream[1], data.seq_len, final=final,
                             documents=stream[2] if width == 3 else None)

        counts = {"docs": 0, "tokens": 0}
        with progress_bar("prepare-data", enabled=progress, unit="files") as bar:
            task = bar.add_task("prepare", total=len(files), status="0 docs, 0 tokens")
            for documents in _document_batches(files, data, lambda: bar.advance(task)):
                for document, (ids, flags) in zip(documents, _encode(tokenizer, documents, eos)):
                    split = "eval" if is_held_out(document, data.eval_fraction) else "train"
                    piece = (ids, flags, np.full(len(ids), counts["docs"], np.int64))[:width]
                    if data.pack:
                        stream = tuple(map(np.concatenate, zip(streams[split], piece)))
                        rows, streams[split] = pack(stream, final=False)
                    else:
                        rows, _ = pack(piece, final=True)
                    writers[split].add(rows)
                    counts["docs"] += 1
                    counts["tokens"] += len(ids)
                bar.update(task, status=f"{counts['docs']} docs, {counts['tokens']} tokens")
        for split, stream in streams.items():
            writers[split].add(pack(stream, final=True)[0])
        splits = {name: writer.finish() for name, writer in writers.items()}
        if splits["train"]["num_rows"] == 0:
            raise DataError("data.sources: no training rows (every document was held out, or "
                            "none has 2 tokens); lower data.eval_fraction or add data")
        info = DatasetInfo(seq_len=data.seq_len, pack=data.pack, document_mask=data.document_mask,
                           vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
                           eos_token_id=eos[0] if eos else None,
                           tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), splits=splits)
        metadata = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **info.__dict__}
        (tmp_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
            tmp_dir.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp_dir.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return info


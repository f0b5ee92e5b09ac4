"""Reading a prepared token dataset: its metadata (``DatasetInfo``) and its rows (``TokenDataset``),
in the order ``pipeline.data.order`` defines (``HostBatches`` for training, ``eval_batches``).

A prepared dataset (written by ``pipeline.data.prepare.prepare_dataset``) is a directory holding
``{train,eval}/part-NNNNN.parquet`` (fixed-size list columns ``input_ids``, ``attention_mask`` and
``labels`` of ``seq_len`` tokens, and ``segment_ids`` when it was prepared with
``data.document_mask``) and ``metadata.json`` (``DatasetInfo``, with each split's shards and
content fingerprint). Datasets prepared before segment ids existed read as they always did:
without them, documents in a row attending to each other.

Typical use::

    train = TokenDataset(cfg.data.prepared_dir, "train", vocab_size=model_vocab)
    batches = HostBatches(train, seed=cfg.data.seed, global_batch=cfg.train.global_batch_size,
                          host_index=jax.process_index(), host_count=jax.process_count(),
                          offset=position.global_sample_offset)   # 0 for a fresh run
    example_ids, batch = next(batches)                     # batches.offset goes in the checkpoint
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.order import eval_rows, host_offsets, train_rows
from pipeline.errors import DataError

IGNORE_INDEX = -100
FORMAT_NAME = "kdpipe-tokens"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
SPLITS = ("train", "eval")


def prompt_tokens(labels: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Each row's prompt length ``[n]`` (at least 1) from its ``labels`` and ``attention_mask``
    ``[n, L]``: the tokens through the one whose label is the first (a prompt/completion row's
    prompt); the row's real tokens when none is labelled."""
    labelled = np.asarray(labels) != IGNORE_INDEX
    lengths = np.where(labelled.any(axis=1), labelled.argmax(axis=1) + 1,
                       (np.asarray(attention_mask) != 0).sum(axis=1))
    return np.maximum(lengths, 1)


def row_columns(document_mask: bool) -> tuple[str, ...]:
    """The ``[L]`` int columns of each row: ``input_ids``, ``attention_mask``, ``labels``, and
    ``segment_ids`` with ``document_mask`` (``pipeline.data.prepare``)."""
    return ("input_ids", "attention_mask", "labels") + (("segment_ids",) if document_mask else ())


@dataclass(frozen=True)
class DatasetInfo:
    """The metadata of a prepared dataset (``metadata.json``).

    ``splits[name]`` holds ``num_rows``, ``num_tokens`` (real tokens), ``num_target_tokens``
    (labels != -100), ``max_token_id``, ``max_prompt_tokens`` (the longest ``prompt_tokens`` of
    a row; absent from datasets prepared before it), ``fingerprint`` and ``shards``.
    ``document_mask``: the rows carry ``segment_ids``.
    """

    seq_len: int
    pack: bool
    vocab_size: int
    eos_token_id: int | None
    tokenizer_fingerprint: str
    splits: dict
    document_mask: bool = False

    def fingerprint(self, split: str = "train") -> str:
        """The split's content fingerprint (what a teacher cache records)."""
        return self.splits[split]["fingerprint"]


def read_info(prepared_dir: str | os.PathLike) -> DatasetInfo:
    """The ``DatasetInfo`` of a prepared dataset; ``DataError`` if missing or not ours."""
    path = Path(prepared_dir) / METADATA_FILE
    try:
        metadata = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"data.prepared_dir: {path} does not exist; run `kdpipe prepare-data` "
                        f"first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"data.prepared_dir: {path} is unreadable or not JSON ({e})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise DataError(f"data.prepared_dir: {path} is not a kdpipe token dataset")
    if metadata.get("version") != FORMAT_VERSION:
        raise DataError(f"data.prepared_dir: {path} has format version {metadata.get('version')}; "
                        f"this kdpipe reads version {FORMAT_VERSION} (prepare the data again)")
    # Datasets prepared before segment ids have no "document_mask": their rows have none.
    metadata.setdefault("document_mask", False)
    fields = DatasetInfo.__dataclass_fields__
    return DatasetInfo(**{k: metadata[k] for k in fields})



class TokenDataset:
    """Random access to the rows of one split of a prepared dataset.

    ``vocab_size`` (the model's) is checked against the dataset's largest token id when given.
    """

    def __init__(self, prepared_dir: str | os.PathLike, split: str = "train", *,
                 vocab_size: int | None = None):
        self.directory = Path(prepared_dir)
        self.info = read_info(self.directory)
        if split not in self.info.splits:
            raise DataError(f"split: expected one of {sorted(self.info.splits)}, got {split!r}")
        self.split = split
        meta = self.info.splits[split]
        self.num_rows: int = meta["num_rows"]
        self.seq_len = self.info.seq_len
        self.fingerprint: str = meta["fingerprint"]
        self.columns = row_columns(self.info.document_mask)
        self.vocab_size = vocab_size
        if vocab_size is not None and meta["max_token_id"] >= vocab_size:
            raise DataError(f"{self.directory} ({split}): token id {meta['max_token_id']} >= the "
                            f"model's vocab size {vocab_size}; the data was tokenized with a "
                            f"larger vocabulary than the model's")
        self._files = [self.directory / shard["file"] for shard in meta["shards"]]
        self._starts = np.cumsum([0] + [shard["rows"] for shard in meta["shards"]])
        self._groups: list[tuple[int, int]] = []  # (file, row group) in row order
        group_starts = []
        for file_index, path in enumerate(self._files):
            try:
                metadata = pq.ParquetFile(path).metadata
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{path}: cannot read the token shard ({e})") from e
            first = self._starts[file_index]
            for g in range(metadata.num_row_groups):
                self._groups.append((file_index, g))
                group_starts.append(first)
                first += metadata.row_group(g).num_rows
            if first != self._starts[file_index + 1]:
                raise DataError(f"{path}: holds {first - self._starts[file_index]} rows, "
                                f"metadata.json says {meta['shards'][file_index]['rows']}")
        self._group_starts = np.asarray(group_starts + [self.num_rows], np.int64)
        self._read_group = lru_cache(maxsize=32)(self._load_group)

    def _load_group(self, group: int) -> dict[str, np.ndarray]:
        file_index, g = self._groups[group]
        path = self._files[file_index]
        try:
            table = pq.ParquetFile(path).read_row_group(g)
            out = {}
            for name in self.columns:
                flat = table.column(name).combine_chunks().flatten().to_numpy()
                out[name] = flat.astype(np.int32).reshape(-1, self.seq_len)
        except (pa.ArrowException, OSError, KeyError, ValueError) as e:
            raise DataError(f"{path}: malformed token shard (row group {g}: {e})") from e
        if self.vocab_size is not None:
            top = max(out["input_ids"].max(), out["labels"].max())
            if top >= self.vocab_size:
                raise DataError(f"{path}: token id {top} >= the model's vocab size {self.vocab_size}")
        return out

    def read_rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Rows by id: ``input_ids``, ``attention_mask``, ``labels`` (and ``segment_ids`` when
        the dataset has them), each ``[len(rows), L]`` int32 (the ``batch`` of
        ``pipeline.step.distillation_step``)."""
        rows = np.asarray(rows, np.int64)
        out = {k: np.empty((len(rows), self.seq_len), np.int32) for k in self.columns}
        groups = np.searchsorted(self._group_starts, rows, side="right") - 1
        for group in np.unique(groups):
            where = np.nonzero(groups == group)[0]
            data = self._read_group(int(group))
            local = rows[where] - self._group_starts[group]
            for key in out:
                out[key][where] = data[key][local]
        return out


class HostBatches:
    """This host's batches in the global order, resumable from one global sample offset.

    ``offset`` is the whole iterator state: save it in the checkpoint, pass it back as
    ``offset=`` (on any number of hosts with the same ``global_batch``) to resume.

    ``next()`` returns ``(example_ids [G/H] int64, batch)``; ``batch`` is the dict of
    ``pipeline.step.distillation_step`` takes, with arrays ``[G/H, L]`` int32.
    """

    def __init__(self, dataset: TokenDataset, *, seed: int, global_batch: int,
                 host_index: int = 0, host_count: int = 1, offset: int = 0,
                 shuffle_window: int = 0):
        host_offsets(0, global_batch, host_index, host_count)  # validates the split
        if dataset.num_rows == 0:
            raise DataError(f"{dataset.directory} ({dataset.split}): the split has no rows")
        if offset < 0:
            raise DataError(f"offset: expected >= 0, got {offset}")
        self.dataset, self.seed, self.global_batch = dataset, seed, global_batch
        self.shuffle_window = shuffle_window
        self.host_index, self.host_count = host_index, host_count
        self.offset = offset

    @property
    def epoch(self) -> int:
        """The epoch the next batch starts in."""
        return self.offset // self.dataset.num_rows

    def __iter__(self) -> HostBatches:
        return self

    def rows_at(self, offset: int) -> np.ndarray:
        """The row ids ``[G/H]`` this host reads for the step that starts at global sample
        ``offset`` (what ``next()`` returns when ``self.offset == offset``), e.g. to fetch a
        batch's teacher targets ahead of time."""
        return train_rows(self.dataset.num_rows, offset, seed=self.seed,
                          shuffle_window=self.shuffle_window, global_batch=self.global_batch,
                          host_index=self.host_index, host_count=self.host_count)

    def __next__(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        rows = self.rows_at(self.offset)
        batch = self.dataset.read_rows(rows)
        self.offset += self.global_batch
        return rows, batch


def eval_batches(dataset: TokenDataset, batch_size: int, *, host_index: int = 0,
                 host_count: int = 1, max_batches: int | None = None
                 ) -> Iterable[dict[str, np.ndarray]]:
    """This host's eval batches (``pipeline.data.order.eval_rows``): the split in row order,
    ``batch_size`` rows per global batch, this host's block of each.

    The last batch is padded with empty rows (``attention_mask`` 0, ``labels`` -100,
    ``segment_ids`` 0) so every batch has the same shape ``[batch_size / host_count, L]`` (one
    compile).
    """
    for rows, real in eval_rows(dataset.num_rows, batch_size, host_index=host_index,
                                host_count=host_count, max_batches=max_batches):
        batch = dataset.read_rows(rows)
        for key, values in batch.items():
            values[~real] = IGNORE_INDEX if key == "labels" else 0
        yield batch

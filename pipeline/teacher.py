"""One teacher host's work: run the teacher over a split and write its targets to the cache.

``fill_cache(config, teacher, split)`` is what ``kdpipe cache`` runs for each split, and what a
teacher actor of a multi-host run calls with the shards the driver hands it. The teacher's
forward pass and the encoding of its targets are one jitted program, which applies the output
head chunk by chunk (``pipeline.teacher_head``), so the ``[batch, seq, vocab]`` logits never
exist whole; the cache writer stores in the background, so the loop here only feeds batches.
Shards already committed are skipped without running the teacher, which makes a fill resumable
after any interruption.

``encode_targets`` is the same computation for a few rows, returned instead of stored: what a
remote teacher host hands a student through Ray's object store.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable

import jax
import numpy as np

from pipeline.cache import CacheManifest, CacheWriter, TargetSpec, split_location
from pipeline.config import RunConfig
from pipeline.data import DatasetInfo, TokenDataset, read_info
from pipeline.metrics import progress_bar
from pipeline.models.llama import Llama
from pipeline.step import TrainState
from pipeline.teacher_head import FusedTargets, chunk_positions, encode_from_hidden


def target_spec(config: RunConfig, info: DatasetInfo, *, vocab_size: int) -> TargetSpec:
    """How teacher targets are encoded: as the configured cache stores them, or, for a run
    without a cache (a remote teacher), as full float32 logits."""
    if config.cache is None:
        fields = {"mode": "full", "value_dtype": "float32", "temperature": None}
    else:
        fields = config.cache_target_fields()
    return TargetSpec(vocab_size=vocab_size, tokenizer_vocab_size=info.vocab_size, **fields)


def cache_manifest(config: RunConfig, info: DatasetInfo, split: str, *, vocab_size: int,
                   teacher_fp: str) -> CacheManifest:
    """The manifest a teacher declares for ``split`` of the prepared dataset."""
    spec = target_spec(config, info, vocab_size=vocab_size)
    return CacheManifest(target=spec, teacher_fingerprint=teacher_fp,
                         tokenizer_fingerprint=info.tokenizer_fingerprint,
                         dataset_fingerprint=info.fingerprint(split), seq_len=info.seq_len,
                         num_sequences=info.splits[split]["num_rows"],
                         shard_sequences=config.cache.shard_sequences,
                         chunk_sequences=config.cache.chunk_sequences)


def teacher_targets(teacher: TrainState, input_ids: jax.Array, attention_mask: jax.Array,
                    rows: jax.Array, spec: TargetSpec, chunk: int,
                    segment_ids: jax.Array | None = None) -> FusedTargets:
    """The teacher's encoded targets for ``input_ids`` [B, L] of rows ``rows`` [B], with the
    logits' non-finite check and audit (``pipeline.teacher_head.encode_from_hidden``, ``chunk``
    positions at a time)."""
    model = teacher.model()
    hidden = model(input_ids, attention_mask=attention_mask, compute_logits=False,
                   segment_ids=segment_ids).last_hidden_state
    return encode_from_hidden(hidden, model.output_head(), rows, spec, chunk=chunk)


_jit_teacher_targets = jax.jit(teacher_targets, static_argnames=("spec", "chunk"))


def _run_teacher(teacher: TrainState, batch: dict[str, np.ndarray], rows: np.ndarray,
                 spec: TargetSpec) -> FusedTargets:
    ids = batch["input_ids"]
    return _jit_teacher_targets(teacher, ids, batch["attention_mask"], np.asarray(rows, np.int32),
                                spec, chunk_positions(*ids.shape),
                                segment_ids=batch.get("segment_ids"))


def encode_targets(teacher: TrainState, batch: dict[str, np.ndarray], rows: np.ndarray,
                   spec: TargetSpec) -> dict[str, np.ndarray]:
    """The teacher's targets for ``batch`` (rows ``rows`` [B] of a split), encoded as a cache
    of ``spec`` stores them: {name: [B, L, *trailing]} (``pipeline.cache.compress.decode``
    turns them into batch keys). Same bytes as the cache holds for these rows."""
    encoded = _run_teacher(teacher, batch, rows, spec).encoded
    return {name: np.asarray(a) for name, a in encoded.items()}


@dataclasses.dataclass(frozen=True)
class FillResult:
    """What one ``fill_cache`` call did."""

    split: str
    shards_written: tuple[int, ...]
    shards_skipped: tuple[int, ...]
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def fill_cache(config: RunConfig, teacher: Llama, split: str, *, teacher_fp: str,
               shards: Iterable[int] | None = None, batch_size: int | None = None,
               progress: bool = False) -> FillResult:
    """Write the teacher targets of ``split``'s ``shards`` (default: all) into the cache.

    Committed shards are skipped; every other shard is computed in full and committed by the
    writer. Rows go through the teacher in batches of ``batch_size`` (default: the student's
    microbatch, ``train.global_batch_size / train.grad_accum_steps``), in row order; the
    stored bytes do not depend on the batch size or on which host writes which shard.

    A split without rows (``data.eval_fraction: 0`` leaves the eval split empty) has nothing to
    cache: nothing is created, and the result lists no shards (readers skip such a split).
    """
    info = read_info(config.data.prepared_dir)
    if not info.splits.get(split, {}).get("num_rows"):
        return FillResult(split=split, shards_written=(), shards_skipped=(), tokens=0, seconds=0.0)
    vocab_size = teacher.config.vocab_size
    dataset = TokenDataset(config.data.prepared_dir, split, vocab_size=vocab_size)
    manifest = cache_manifest(config, info, split, vocab_size=vocab_size, teacher_fp=teacher_fp)
    batch_size = batch_size or config.train.global_batch_size // config.train.grad_accum_steps
    state = TrainState.create(teacher)
    start = time.perf_counter()
    with CacheWriter(split_location(config.cache.path, split), manifest, name=f"split {split}") as writer:
        wanted = range(manifest.num_shards) if shards is None else shards
        pending = writer.pending_shards(wanted)
        skipped = tuple(sorted(set(wanted) - set(pending)))
        rows = [np.arange(*manifest.shard_range(s)) for s in pending]
        rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        with progress_bar(f"cache {split}", enabled=progress, unit="sequences",
                          every_s=config.logging.progress_every_s) as bar:
            task = bar.add_task(split, total=len(rows), status=f"{len(skipped)} shards done before")
            for first in range(0, len(rows), batch_size):
                indices = rows[first:first + batch_size]
                batch = dataset.read_rows(indices)
                targets = _run_teacher(state, batch, indices, manifest.target)
                writer.write_encoded(targets.encoded, indices, targets.check, targets.fidelity)
                bar.update(task, advance=len(indices))
            writer.flush()
    return FillResult(split=split, shards_written=tuple(pending), shards_skipped=skipped,
                      tokens=len(rows) * info.seq_len, seconds=time.perf_counter() - start)

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

The teacher runs on every device of its JAX program (``teacher_mesh``: one process's devices,
or those of a teacher replica's hosts joined by ``jax.distributed``), its weights split by
``pipeline.models.sharding``'s rules and its batch over the data-parallel devices. Every
process of a replica reads the same rows and runs the same batches; the first one writes.
Each device always gets the same number of rows (the last batch is padded with copies of its
last row, dropped before writing), so a row is computed in the same program whatever the
replica's size: on an fsdp mesh (``mesh.tensor`` 1) the stored bytes are the same for any
replica shape (tests/test_teacher_replicas.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pipeline.cache import CacheManifest, CacheWriter, TargetSpec, budget, split_location
from pipeline.config import MeshConfig, RunConfig
from pipeline.data import DatasetInfo, TokenDataset, read_info
from pipeline.metrics import progress_bar
from pipeline.models.llama import Llama
from pipeline.models.sharding import BATCH_SPEC, batch_devices, make_mesh
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


def teacher_mesh(mesh: MeshConfig) -> Mesh:
    """The teacher's mesh over every device of its JAX program: ``mesh.tensor`` devices on the
    tensor axis, the rest on fsdp (a frozen teacher has no optimizer state to replicate:
    splitting its weights and its batch over the same devices is what fits a teacher bigger
    than one host's memory)."""
    return make_mesh(data=1, fsdp=1 if mesh.tensor == -1 else -1, tensor=mesh.tensor)


def _mesh_of(teacher: TrainState) -> Mesh | None:
    """The mesh the teacher's parameters are laid out on (None: one device, no mesh)."""
    return next((leaf.sharding.mesh for leaf in jax.tree.leaves(teacher)
                 if isinstance(leaf.sharding, NamedSharding)), None)


@functools.cache
def _jit_teacher_targets(mesh: Mesh | None):
    # The outputs replicated: every process of a replica holds the whole batch's targets (the
    # first one writes them); on one device this is the plain jit.
    return jax.jit(teacher_targets, static_argnames=("spec", "chunk"),
                   out_shardings=None if mesh is None else NamedSharding(mesh, PartitionSpec()))


def _run_teacher(teacher: TrainState, batch: dict[str, np.ndarray], rows: np.ndarray,
                 spec: TargetSpec, rows_per_device: int | None = None) -> FusedTargets:
    """The targets of ``batch`` (rows ``rows`` [B]), computed ``rows_per_device`` rows to a
    data-parallel device (default: as few as hold B), the batch padded to that with copies of
    its last row (dropped again). Dispatched, not awaited: the writer's thread fetches them."""
    mesh = _mesh_of(teacher)
    ways = 1 if mesh is None else batch_devices(mesh)
    count = len(rows)
    per_device = rows_per_device or -(-count // ways)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "rows": np.asarray(rows, np.int32), "segment_ids": batch.get("segment_ids")}
    padding = per_device * ways - count
    inputs = {k: None if a is None else np.concatenate([a, np.repeat(a[-1:], padding, axis=0)])
              for k, a in inputs.items()}
    if mesh is not None:
        sharding = NamedSharding(mesh, BATCH_SPEC)
        inputs = {k: None if a is None else jax.make_array_from_callback(
            a.shape, sharding, lambda index, a=a: a[index]) for k, a in inputs.items()}
    out = _jit_teacher_targets(mesh)(
        teacher, inputs["input_ids"], inputs["attention_mask"], inputs["rows"], spec,
        chunk_positions(per_device, batch["input_ids"].shape[1]),
        segment_ids=inputs["segment_ids"])
    if not padding:
        return out
    return FusedTargets({name: a[:count] for name, a in out.encoded.items()}, out.check,
                        None if out.fidelity is None else tuple(a[:count] for a in out.fidelity))


def encode_targets(teacher: TrainState, batch: dict[str, np.ndarray], rows: np.ndarray,
                   spec: TargetSpec) -> dict[str, np.ndarray]:
    """The teacher's targets for ``batch`` (rows ``rows`` [B] of a split), encoded as a cache
    of ``spec`` stores them: {name: [B, L, *trailing]} (``pipeline.cache.compress.decode``
    turns them into batch keys). The same ids as the cache holds for these rows (but for a
    format-5 budget, below); the values and tail are the same bytes only when the request has
    the fill's rows per device: XLA compiles another batch size into another program, whose
    float32 results differ in the last one or two ulps (measured on XLA:CPU; a hybrid run's
    uncached rows, requested a few at a time, differ from the cached ones by that much). A
    ``bytes_per_token`` spec's budget applies to each row on its own here
    (``pipeline.cache.budget.cut``): a format-5 cache shares it over a shard, so its rows may
    keep other ids than a live row would."""
    encoded = {name: np.asarray(a) for name, a in _run_teacher(teacher, batch, rows, spec)
               .encoded.items()}
    return budget.cut(encoded, spec) if spec.cut_on_host else encoded


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
    writer. Rows go through the teacher in row order, ``batch_size`` of them to each
    data-parallel device of the teacher's mesh (default: the student's microbatch,
    ``train.global_batch_size / train.grad_accum_steps``); the stored bytes do not depend on
    which host or replica writes which shard.

    In a JAX program of several processes (a teacher replica of several hosts) every process
    calls this with the same shards; the first one decides which are pending and writes them.

    A split without rows (``data.eval_fraction: 0`` leaves the eval split empty) has nothing to
    cache: nothing is created, and the result lists no shards (readers skip such a split).
    """
    info = read_info(config.data.prepared_dir)
    if not info.splits.get(split, {}).get("num_rows"):
        return FillResult(split=split, shards_written=(), shards_skipped=(), tokens=0, seconds=0.0)
    vocab_size = teacher.config.vocab_size
    dataset = TokenDataset(config.data.prepared_dir, split, vocab_size=vocab_size)
    manifest = cache_manifest(config, info, split, vocab_size=vocab_size, teacher_fp=teacher_fp)
    per_device = batch_size or config.train.global_batch_size // config.train.grad_accum_steps
    state = TrainState.create(teacher)
    mesh = _mesh_of(state)
    batch_size = per_device * (1 if mesh is None else batch_devices(mesh))
    writes = jax.process_index() == 0
    start = time.perf_counter()
    with (CacheWriter(split_location(config.cache.path, split), manifest, name=f"split {split}")
          if writes else contextlib.nullcontext()) as writer:
        wanted = list(range(manifest.num_shards) if shards is None else shards)
        is_pending = np.isin(wanted, writer.pending_shards(wanted)) if writes else \
            np.zeros(len(wanted), bool)
        # the first process's view of the commits, so that every process runs the same batches
        is_pending = multihost_utils.broadcast_one_to_all(is_pending.astype(np.int32)) > 0
        pending = [s for s, p in zip(wanted, is_pending) if p]
        skipped = tuple(sorted(set(wanted) - set(pending)))
        rows = [np.arange(*manifest.shard_range(s)) for s in pending]
        rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        with progress_bar(f"cache {split}", enabled=progress and writes, unit="sequences",
                          every_s=config.logging.progress_every_s) as bar:
            task = bar.add_task(split, total=len(rows), status=f"{len(skipped)} shards done before")
            for first in range(0, len(rows), batch_size):
                indices = rows[first:first + batch_size]
                batch = dataset.read_rows(indices)
                targets = _run_teacher(state, batch, indices, manifest.target, per_device)
                if writes:
                    writer.write_encoded(targets.encoded, indices, targets.check,
                                         targets.fidelity)
                bar.update(task, advance=len(indices))
            if writes:
                writer.flush()
    return FillResult(split=split, shards_written=tuple(pending), shards_skipped=skipped,
                      tokens=len(rows) * info.seq_len, seconds=time.perf_counter() - start)

"""Writes teacher targets into a cache, one whole shard at a time, without stalling the teacher.

The teacher calls :meth:`CacheWriter.write` with a batch of logits ``[B, L, V]`` and the
sequence indices ``[B]`` they belong to. ``write`` only dispatches the jitted encoder
(asynchronously on the device) and queues the result; a background thread copies the encoded
rows into per-shard buffers and, once a shard is complete, hands it to one of ``shard_workers``
threads, which writes its arrays, reads their files back for the crc32, and writes the shard's
commit record last. At most ``shard_workers`` complete shards wait or are being written (the
buffering thread waits for one to finish before handing over another), so memory stays bounded
when storing, or a budget's cut on the host, is slower than the teacher.

Exactly-once at shard granularity: a shard is visible only through its commit record, which
exists only after all of its files are durable; a shard being rewritten has its stale files
deleted first. Encoding is deterministic and independent of the batching (sampled draws use a
key per (sequence, position); see ``compress.encode``), so a writer killed at any moment and
re-run produces the same bytes as an uninterrupted one, and disjoint shard sets written by
several processes equal one process writing them all.
A topk shard's commit record also carries the fidelity audit of pipeline/cache/audit.py,
measured on the logits ``write`` sees (deterministic too: the killed-writer guarantee covers it).
A ``cache.bytes_per_token`` shard is buffered as its tokens' candidates and cut once complete
(pipeline/cache/budget.py: format 5 shares the budget over the shard), then audited.
Sequences of shards already committed (or being written) are dropped;
:meth:`CacheWriter.pending_shards` lets the teacher loop skip their forward passes altogether.

Teacher logits that are not finite are refused: ``write`` also dispatches one reduction over
the batch (``first_nonfinite``), read by the background thread with the encoded rows, so the
check costs no extra wait. The rows before the first bad sequence are kept, that sequence's
shard and every later one stay uncommitted, and the writer raises ``TeacherOutputError``
naming the sequence and the position.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import zlib
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from pipeline.cache import audit, budget, compress, ragged
from pipeline.cache.format import (MANIFEST_KEY, CacheManifest, ShardCommit, array_layout,
                                   check_same_header, commit_key, load_manifest, open_array,
                                   read_commits, shard_file_key)
from pipeline.cache.store import kvstore_spec, open_kvstore
from pipeline.errors import CacheError, KdpipeError, TeacherOutputError

_STOP = object()
# Per-row audit figures travel with the encoded arrays to the shard buffers (not stored).
_AUDIT_KEYS = ("audit_kl", "audit_mass")


@jax.jit
def first_nonfinite(logits: jax.Array) -> jax.Array:
    """Where logits ``[B, L, V]`` first hold a value that is not finite, as int32 ``[2]``:
    ``b * L + l`` of the first such position in row-major order (-1 if there is none), and 1
    if that position holds a NaN (0 if only infinities)."""
    return first_flagged(~jnp.isfinite(logits).all(axis=-1), jnp.isnan(logits).any(axis=-1))


def first_flagged(nonfinite: jax.Array, has_nan: jax.Array) -> jax.Array:
    """:func:`first_nonfinite` from per-position flags ``[B, L]`` (bool: a logit is not finite;
    a logit is NaN), for a teacher that never holds all the logits at once."""
    bad_position, has_nan = nonfinite.reshape(-1), has_nan.reshape(-1)  # [B * L]
    first = jnp.argmax(bad_position)
    return jnp.stack([jnp.where(bad_position[first], first, -1),
                      has_nan[first]]).astype(jnp.int32)


def default_shard_workers() -> int:
    """How many complete shards a CacheWriter writes at once by default: one per CPU core,
    up to 4."""
    return min(4, os.cpu_count() or 1)


def create_or_join(location: str | dict, manifest: CacheManifest):
    """Write manifest.json if absent (conditionally, so concurrent creators cannot race);
    otherwise require that the existing header equals ``manifest``'s. Returns the kvstore."""
    kvstore = open_kvstore(location)
    current = kvstore.read(MANIFEST_KEY).result()
    if current.state != "value":
        # if_equal=the "missing" generation: only the first of several creators succeeds
        kvstore.write(MANIFEST_KEY, manifest.header_bytes(),
                      if_equal=current.stamp.generation).result()
    existing = load_manifest(kvstore, str(location))
    try:
        check_same_header(existing, manifest)
    except CacheError as e:
        raise CacheError(f"cache {location}: {e}; write to another location, or remove this "
                         f"cache to fill it again") from None
    return kvstore


class CacheWriter:
    """Background writer of whole shards. Use as a context manager, or call :meth:`close`.

    location: local directory or TensorStore kvstore URL / spec dict. manifest: the header
    this writer declares (commits ignored); an existing cache must have the same header.
    max_queued_batches: encoded batches waiting for the writer thread before ``write`` blocks.
    name: what messages call the sequences' set (e.g. "split train"); default: the location.
    shard_workers: complete shards written at once (default: :func:`default_shard_workers`).
    """

    def __init__(self, location: str | dict, manifest: CacheManifest, *,
                 max_queued_batches: int = 8, name: str | None = None,
                 shard_workers: int | None = None):
        self.location = location
        self.name = name or f"cache {location}"
        self._kvstore = create_or_join(location, manifest)
        self.manifest = manifest
        self._root = kvstore_spec(location)
        self._layout = array_layout(manifest.target)
        self._arrays = {a.name: open_array(self._root, manifest, a, create=True)
                        for a in self._layout}
        self._committed = {c.shard for c in read_commits(self._kvstore)}
        self._committed_lock = threading.Lock()  # shard workers add to it
        workers = shard_workers or default_shard_workers()
        self._workers = ThreadPoolExecutor(workers, thread_name_prefix="kdpipe-cache-shard")
        self._max_writes = workers
        self._writes: list[Future] = []
        self._submitted: set[int] = set()  # handed to a worker: later rows of it are dropped
        self._buffers: dict[int, dict[str, np.ndarray]] = {}
        self._filled: dict[int, np.ndarray] = {}
        self._queue: queue.Queue = queue.Queue(max_queued_batches)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kdpipe-cache-writer", daemon=True)
        self._thread.start()

    @property
    def committed_shards(self) -> frozenset[int]:
        with self._committed_lock:
            return frozenset(self._committed)

    def pending_shards(self, shards: Iterable[int]) -> list[int]:
        """Those of ``shards`` not committed when this writer opened or since."""
        return [s for s in shards if s not in self._committed]

    def write(self, logits, sequence_indices) -> None:
        """Queue teacher logits [B, L, V] of sequences ``sequence_indices`` [B] for caching.

        Returns once the encoder is dispatched; blocks only while ``max_queued_batches``
        batches wait for storage. Rows of committed shards are dropped. Non-finite logits
        raise ``TeacherOutputError`` here or in a later call (see the module docstring).
        """
        indices = self._checked_indices(sequence_indices)
        expected = (len(indices), self.manifest.seq_len, self.manifest.target.vocab_size)
        if tuple(logits.shape) != expected:
            raise CacheError(f"cache write: logits expected shape [batch, seq_len, vocab] = "
                             f"{list(expected)}, got {list(logits.shape)}")
        target = self.manifest.target
        encoded = compress.encode(logits, indices, target)
        if target.mode == "topk" and not target.cut_on_host:
            encoded.update(zip(_AUDIT_KEYS, audit.audit_batch(logits, encoded, target)))
        self._queue.put((encoded, indices, first_nonfinite(logits)))

    def write_encoded(self, encoded: dict[str, jax.Array], sequence_indices,
                      check: jax.Array, fidelity: tuple[jax.Array, jax.Array] | None = None,
                      ) -> None:
        """:meth:`write` for targets already encoded on the device: ``encoded`` {name: [B, L,
        *trailing]} as ``compress.encode`` gives them (``pipeline.teacher_head`` computes them
        without the logits), ``check`` the logits' :func:`first_nonfinite` ([2] int32),
        ``fidelity`` the audit's (KL, mass) ``[B, n]`` (``pipeline.cache.audit.audit_batch``)
        or None (the shards' records then carry the mean k only; a ``bytes_per_token`` cache
        audits its candidates itself)."""
        indices = self._checked_indices(sequence_indices)
        layout = compress.encoded_layout(self.manifest.target)
        expected = {name: (len(indices), self.manifest.seq_len, *trailing)
                    for name, (trailing, _) in layout.items()}
        got = {name: tuple(a.shape) for name, a in encoded.items()}
        if got != expected:
            raise CacheError(f"cache write: encoded arrays expected shapes {expected}, got {got}")
        if fidelity is not None:
            encoded = {**encoded, **dict(zip(_AUDIT_KEYS, fidelity))}
        self._queue.put((encoded, indices, check))

    def _checked_indices(self, sequence_indices) -> np.ndarray:
        self._raise_background_error()
        indices, m = np.asarray(sequence_indices), self.manifest
        if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
            raise CacheError(f"cache write: sequence_indices expected a 1-D int array, got "
                             f"shape {indices.shape} dtype {indices.dtype}")
        if len(indices) and (indices.min() < 0 or indices.max() >= m.num_sequences):
            raise CacheError(f"cache write: sequence_indices expected in [0, "
                             f"{m.num_sequences}), got [{indices.min()}, {indices.max()}]")
        return indices

    def flush(self) -> None:
        """Wait until every queued batch is in a shard buffer or written."""
        self._queue.join()
        self._collect_writes(wait=True)
        self._raise_background_error()

    def close(self) -> None:
        """Finish queued work and stop the threads. Incomplete shards stay uncommitted."""
        self._stop_thread()
        self._raise_background_error()

    def _stop_thread(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._collect_writes(wait=True)
        self._workers.shutdown()

    def _collect_writes(self, *, wait: bool, keep: int = 0) -> None:
        """Forget the finished shard writes (all of them with ``wait``; with ``keep``, wait
        until at most that many are unfinished), keeping the first error."""
        while self._writes and (wait or self._writes[0].done() or len(self._writes) > keep):
            error = self._writes.pop(0).exception()
            if error is not None and self._error is None:
                self._error = error

    @property
    def incomplete_shards(self) -> list[int]:
        """Shards that received some sequences but not all of them (not committed)."""
        return sorted(self._buffers)

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:  # the error on its way out may be the background one: not raised twice
            self._stop_thread()

    def _raise_background_error(self) -> None:
        if isinstance(self._error, KdpipeError):
            raise self._error
        if self._error is not None:
            raise CacheError(f"cache {self.location}: background write failed: "
                             f"{self._error!r}") from self._error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._error is None:
                    self._absorb(*item)
            except BaseException as e:  # surfaced to the teacher on its next call
                self._error = e
            finally:
                self._queue.task_done()

    def _absorb(self, encoded: dict, indices: np.ndarray, check: jax.Array) -> None:
        host = {name: np.asarray(a) for name, a in encoded.items()}
        first_bad, has_nan = (int(v) for v in np.asarray(check))
        good_rows = len(indices) if first_bad < 0 else first_bad // self.manifest.seq_len
        for row, sequence in enumerate(indices[:good_rows].tolist()):
            shard = self.manifest.shard_of(sequence)
            if shard in self._committed or shard in self._submitted:
                continue
            start, stop = self.manifest.shard_range(shard)
            if shard not in self._buffers:
                self._buffers[shard] = {name: np.zeros((stop - start, *a.shape[1:]), a.dtype)
                                        for name, a in host.items()}
                self._filled[shard] = np.zeros(stop - start, bool)
            for name, a in host.items():
                self._buffers[shard][name][sequence - start] = a[row]
            self._filled[shard][sequence - start] = True
            if self._filled[shard].all():
                self._collect_writes(wait=False, keep=self._max_writes - 1)
                self._writes.append(self._workers.submit(self._write_shard, shard,
                                                         self._buffers.pop(shard)))
                self._submitted.add(shard)
                del self._filled[shard]
        if first_bad >= 0:
            sequence = int(indices[good_rows])
            raise TeacherOutputError(
                f"teacher logits hold {'NaN' if has_nan else 'inf'} at {self.name}, sequence "
                f"{sequence}, position {first_bad % self.manifest.seq_len}; a teacher with finite "
                f"weights and a dtype wide enough for its activations gives finite logits: check "
                f"the checkpoint (model.teacher.path) and model.teacher.dtype. Shard "
                f"{self.manifest.shard_of(sequence)} of {self.location} and the later ones are "
                f"not committed; those committed before stay")

    def _write_shard(self, shard: int, data: dict[str, np.ndarray]) -> None:
        start, stop = self.manifest.shard_range(shard)
        keys = {a.name: shard_file_key(a, shard) for a in self._layout}
        target = self.manifest.target
        fidelity = None
        if target.cut_on_host:
            candidates = data
            data = budget.cut(candidates, target, shard=(self.manifest.shard_sequences,
                                                         self.manifest.chunk_sequences))
            fidelity = audit.shard_audit(*audit.candidate_audit(candidates, data, target),
                                         data["id_count"])
        elif target.mode == "topk":
            counts = data["id_count"] if target.adaptive else np.full(1, target.k)
            fidelity = audit.shard_audit(*(data.get(key) for key in _AUDIT_KEYS), counts)
        # a killed earlier run may have left files of this shard: remove them so the new
        # shard never merges with stale inner chunks
        for f in [self._kvstore.write(k, None) for k in keys.values()]:
            f.result()
        if self.manifest.target.adaptive:
            data = ragged.pack(data, self.manifest.target)
        writes = [self._arrays[name][start:stop].write(data[name]) for name in keys]
        for w in writes:
            w.result()
        files = []
        for name, key in keys.items():
            record = self._kvstore.read(key).result()
            files.append((name, len(record.value), zlib.crc32(record.value)))
        commit = ShardCommit(shard, tuple(files), fidelity)
        self._kvstore.write(commit_key(shard), json.dumps(commit.to_json()).encode()).result()
        with self._committed_lock:
            self._committed.add(shard)

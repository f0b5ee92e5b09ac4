"""Reads teacher targets for batches of sequence indices from committed shards only.

``CacheReader(location, run)`` checks the cache against what the run declares
(:func:`pipeline.cache.format.check_compatible`: fingerprints, vocab, sequence length,
temperature rules) and refuses a mismatch naming the field and both values.
``read(indices)`` returns the teacher batch keys of pipeline/losses/targets.py as device arrays;
``prefetch(batches)`` does the same for a stream of index batches on a background thread, a
few batches ahead of the consumer.

Integrity: the first time a process touches a shard, every file of the shard is read whole and
its size and crc32 compared with the commit record (a missing, truncated or rewritten file is a
:class:`CacheError` naming the shard and file); after that each inner chunk still carries a
crc32c that TensorStore checks on every read. A shard without a commit record is never read:
``read`` raises, ``wait_for_shards`` polls until the writers commit it.
"""

from __future__ import annotations

import queue
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from pipeline.cache import compress, ragged
from pipeline.cache.format import (CacheManifest, RunDeclaration, array_layout, check_compatible,
                                   load_manifest, open_array, read_commits, shard_file_key)
from pipeline.cache.store import kvstore_spec, open_kvstore
from pipeline.errors import CacheError


class CacheReader:
    """Reader of one cache for one run. location: local path, kvstore URL or spec dict."""

    def __init__(self, location: str | dict, run: RunDeclaration):
        self.location = location
        self._kvstore = open_kvstore(location)
        self.manifest: CacheManifest = load_manifest(self._kvstore, str(location))
        try:
            check_compatible(self.manifest, run)
        except CacheError as e:  # name the cache: a run opens one per split
            raise CacheError(f"cache {location}: {e}") from None
        self.run = run
        root = kvstore_spec(location)
        self._layout = array_layout(self.manifest.target)
        self._arrays = {a.name: open_array(root, self.manifest, a, create=False)
                        for a in self._layout}
        self._commits = {c.shard: c for c in self.manifest.commits}
        self._verified: set[int] = set()

    @property
    def committed_shards(self) -> frozenset[int]:
        return frozenset(self._commits)

    def refresh(self) -> frozenset[int]:
        """Re-list commit records (shards committed by writers since); returns them all."""
        self._commits = {c.shard: c for c in read_commits(self._kvstore)}
        return self.committed_shards

    def wait_for_shards(self, shards: Iterable[int], *, timeout_s: float,
                        poll_s: float = 1.0) -> None:
        """Block until all ``shards`` are committed; CacheError after ``timeout_s``."""
        wanted = set(shards)
        deadline = time.monotonic() + timeout_s
        while not wanted <= self.committed_shards:
            if time.monotonic() >= deadline:
                missing = sorted(wanted - self.committed_shards)
                raise CacheError(f"cache {self.location}: shards {missing} still not committed "
                                 f"after {timeout_s} s")
            time.sleep(poll_s)
            self.refresh()

    def read_stored(self, sequence_indices: Sequence[int]) -> dict[str, np.ndarray]:
        """The stored (encoded) arrays {name: [B, L, *trailing]} of these sequences, as
        ``compress.encode`` gives them (``compress.cut``'s for a ``bytes_per_token`` cache;
        ragged arrays padded back: pipeline/cache/ragged.py)."""
        indices = np.asarray(sequence_indices, np.int64)
        m = self.manifest
        if indices.ndim != 1 or not len(indices):
            raise CacheError(f"cache read: sequence_indices expected a non-empty 1-D array, "
                             f"got shape {indices.shape}")
        if indices.min() < 0 or indices.max() >= m.num_sequences:
            raise CacheError(f"cache read: sequence_indices expected in [0, {m.num_sequences}), "
                             f"got [{indices.min()}, {indices.max()}]")
        shards = m.shards_of(indices)
        if not set(shards) <= self.committed_shards:
            self.refresh()
        missing = [s for s in shards if s not in self._commits]
        if missing:
            raise CacheError(
                f"cache {self.location}: shards {missing} (sequences "
                f"{[m.shard_range(s) for s in missing]}) are not committed yet; "
                f"wait for them with CacheReader.wait_for_shards")
        for shard in shards:
            if shard not in self._verified:
                self._verify(shard)
        futures = {name: arr[indices].read() for name, arr in self._arrays.items()}
        try:
            stored = {name: f.result() for name, f in futures.items()}
        except ValueError as e:  # TensorStore reports a failed crc32c or decode this way
            raise CacheError(f"cache {self.location}: reading shards {shards} failed: {e}") from e
        return ragged.unpack(stored, m.target) if m.target.adaptive else stored

    def read(self, sequence_indices: Sequence[int]) -> dict:
        """Teacher targets of these sequences, keyed as in pipeline/losses/targets.py
        ([B, L, ...])."""
        stored = self.read_stored(sequence_indices)
        return compress.decode({k: jnp.asarray(v) for k, v in stored.items()},
                               self.manifest.target, self.run.vocab_size)

    def prefetch(self, index_batches: Iterable[Sequence[int]], *, depth: int = 2) -> Iterator[dict]:
        """Yield ``read(b)`` for each batch b, reading up to ``depth`` batches ahead on a
        background thread. Errors surface at the batch that caused them."""
        return prefetch(self.read, index_batches, depth=depth)

    def _verify(self, shard: int) -> None:
        commit = self._commits[shard]
        layout = {a.name: a for a in self._layout}
        for name, size, crc in commit.files:
            key = shard_file_key(layout[name], shard)
            record = self._kvstore.read(key).result()
            got = record.value if record.state == "value" else None
            if got is None or len(got) != size or zlib.crc32(got) != crc:
                seen = "missing" if got is None else f"{len(got)} bytes, crc32 {zlib.crc32(got)}"
                raise CacheError(
                    f"cache {self.location}: shard {shard} is corrupt: file {key} is {seen}, "
                    f"its commit record says {size} bytes, crc32 {crc}")
        self._verified.add(shard)


def prefetch(read: Callable[[Sequence[int]], dict], index_batches: Iterable[Sequence[int]], *,
             depth: int = 2) -> Iterator[dict]:
    """Yield ``read(b)`` for each batch b of ``index_batches``, calling ``read`` up to
    ``depth`` batches ahead on a background thread (any reader: a ``CacheReader``'s, or one
    that waits for shards or asks a remote teacher). Errors surface at the batch that caused
    them; closing the generator stops the thread."""
    out: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        """Hand ``item`` to the consumer; False once the consumer has gone."""
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for batch in index_batches:
                if not put(read(batch)):
                    return
            item = done
        except BaseException as e:  # re-raised in the consumer
            item = e
        put(item)

    thread = threading.Thread(target=produce, name="kdpipe-cache-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()

"""Teacher-output cache: compressed teacher targets in sharded zarr3 arrays (TensorStore).

Write with :class:`CacheWriter` (declare a :class:`CacheManifest` with its :class:`TargetSpec`),
read with :class:`CacheReader` (declare the run as a :class:`RunDeclaration`). The format,
the modes and what may change after caching (temperature) are documented in
:mod:`pipeline.cache.format`; where a cache and its splits live, in :mod:`pipeline.cache.store`.
"""

from pipeline.cache.format import (CacheManifest, RunDeclaration, ShardCommit, TargetSpec,
                                   check_compatible, load_manifest, num_shards, shard_of)
from pipeline.cache import audit, budget, compress, ragged  # noqa: F401  (submodules)
from pipeline.cache.reader import CacheReader
from pipeline.cache.store import open_kvstore, split_location
from pipeline.cache.writer import CacheWriter


def read_manifest(location) -> CacheManifest:
    """The manifest of the cache at ``location`` (header plus current commit states)."""
    return load_manifest(open_kvstore(location), str(location))


__all__ = ["CacheManifest", "CacheReader", "CacheWriter", "RunDeclaration", "ShardCommit",
           "TargetSpec", "check_compatible", "num_shards", "read_manifest", "shard_of",
           "split_location"]

"""Where a cache lives: a local directory or any TensorStore kvstore URL (``gs://bucket/p/``),
one location per split, opened as a TensorStore KvStore. What is stored there, and how, is
``pipeline.cache.format``'s."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import CacheError, ConfigError


def split_location(root: str, split: str) -> str:
    """Where split ``split`` of the cache at ``root`` (a path or kvstore URL) lives:
    ``<root>/<split>``."""
    return f"{root.rstrip('/')}/{split}"


def kvstore_spec(location: str | os.PathLike | dict) -> dict:
    """A cache location (local path, kvstore URL, or kvstore spec dict) as a spec dict whose
    path ends with '/'."""
    import tensorstore as ts

    if isinstance(location, dict):
        spec = dict(location)
    elif isinstance(location, (str, os.PathLike)):
        location = os.fspath(location)
        if "://" in location:
            try:
                spec = ts.KvStore.Spec(location).to_json()
            except ValueError as e:
                raise CacheError(f"cache location {location!r} is not a TensorStore kvstore URL "
                                 f"({e}); expected a local path or a URL such as "
                                 f"gs://bucket/prefix/ or file:///path/") from None
        else:
            spec = {"driver": "file", "path": os.path.abspath(location)}
    else:
        raise CacheError(f"cache location: expected a path, a kvstore URL or a kvstore spec "
                         f"dict, got {type(location).__name__}")
    path = spec.get("path", "")
    if path and not path.endswith("/"):
        spec["path"] = path + "/"
    return spec


def open_kvstore(location: str | os.PathLike | dict):
    """The cache root as a TensorStore KvStore (local path, kvstore URL or spec dict).

    A local cache whose path runs into an existing file is refused (``ConfigError`` naming
    ``cache.path`` and the file) before anything is read or written there."""
    import tensorstore as ts

    spec = kvstore_spec(location)
    if spec.get("driver") == "file":
        _refuse_file_on_path(Path(spec["path"]))
    return ts.KvStore.open(spec).result()


def _refuse_file_on_path(path: Path) -> None:
    """A local cache is a directory: its path, and every parent of it that exists, must be
    a directory. TensorStore would otherwise fail deep inside a write ("Not a directory")."""
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            return
        if candidate.exists():
            raise ConfigError(
                f"cache.path: {candidate} is an existing file, not a directory, so the cache "
                f"{path} can be neither read nor written there (a cache is a directory of "
                f"manifest.json, commit records and arrays); point cache.path at a directory, "
                f"new or holding a kdpipe cache; the file was left as it is")


def ts_key_range(prefix: str):
    import tensorstore as ts

    return ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))

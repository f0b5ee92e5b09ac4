"""The teacher-output cache format: what is stored, where, and when two runs may share it.

A cache is a kvstore prefix (a local directory or any TensorStore kvstore URL such as
``gs://bucket/run/``) holding:

- ``manifest.json``: the header (:class:`CacheManifest` without its commits), written once by
  whichever writer creates the cache (a conditional write, so two writers never race on it);
- one zarr3 array per stored field (:func:`array_layout`), all shaped
  ``[num_sequences, seq_len, *trailing]``, with the ``sharding_indexed`` codec: a shard holds
  ``shard_sequences`` whole sequences (the write unit, owned by one writer) and an inner chunk
  ``chunk_sequences`` of them (the read unit, crc32c-checked on every read);
- ``commits/shard-XXXXXXXX.json``: one commit record per finished shard with the size and
  crc32 of each of its files. A shard exists for readers only once its record does; the
  manifest's commit states are derived from these records, never rewritten in place.

The layout depends only on (sequence index, position), never on how many hosts wrote or read.

Versions (manifest.json's ``format_version``, carried by the target spec): 5 is written; 1 to
4 are read with their own arrays and codecs (:func:`array_layout`, :func:`inner_codecs`); a
newer one is refused. Version 3 stores the gap code's ids as plain gaps, token-major and
byte-shuffled, and bounds ``bytes_per_token`` on stored bytes (pipeline/cache/budget.py).
Version 4 adds the ``q8sqrt`` value code (pipeline/cache/compress.py), topk's default. Version
5 shares ``bytes_per_token`` over each shard instead of each sequence; its arrays are 4's.

Modes (``TargetSpec.mode``), with the batch keys the reader produces (pipeline/losses/targets.py):

- ``topk``: the k largest teacher log-probs at ``temperature`` with their ids, and the log of the
  mass outside them -> ``teacher_topk_ids``, ``teacher_topk_logprobs``, ``teacher_tail_logmass``.
  With ``top_p`` or ``bytes_per_token`` the number of ids varies per token (``min_k`` to ``k``,
  the rule in pipeline/cache/compress.py): each token's count is stored (``id_count``) and the
  per-slot arrays are ragged (:mod:`pipeline.cache.ragged`); the reader gives them back padded
  to ``[..., k]``, unused slots with id -1 and log-prob -inf.
- ``sampled``: ``n_draws`` ids drawn with replacement from the teacher distribution at
  ``temperature`` (Anshumann et al. 2025), stored as unique ids with counts, plus the teacher
  entropy -> ``teacher_sample_ids``, ``teacher_sample_counts``, ``teacher_entropy``.
- ``full``: the dense logits -> ``teacher_logits``.

Temperature after caching (enforced by :func:`check_compatible`):

- ``topk`` and ``sampled`` store log-probs / draws of softmax(logits / T_cache). The tail of a
  top-k target is one number, and draws were made at T_cache, so no other temperature can be
  recovered exactly: a loss temperature T != T_cache is refused.
- ``full`` stores the logits themselves (a per-token constant shift at most), so any loss
  temperature is served exactly; its manifest temperature is ``None``.
- The divergence may change, except that ``sampled`` targets serve the forward KL only
  (``pipeline.losses.check_loss_inputs`` refuses reverse KL and JSD on them). Everything else
  (student model, alpha, hard labels, batch size, host counts) may change freely after caching.

Padded vocabularies: ``vocab_size`` is the teacher's logit width and ``tokenizer_vocab_size``
the real tokenizer's (ids >= it are padding rows of the embedding). The padded ids are given
probability zero before anything is stored, so top-k and sampled ids are always real ids, and
full-mode logits hold :data:`PADDED_LOGIT` there. A run with another padded width (151936 vs
152064) may read the cache when both declare the same real tokenizer vocab; full-mode logits
are then padded with :data:`PADDED_LOGIT` or cut (only padding columns) to the run's width.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from pipeline.cache.spec import (FORMAT_VERSION, ID_ENCODINGS, MAX_ID_BITS,  # noqa: F401
                                 MODES, PADDED_LOGIT, READABLE_VERSIONS, VALUE_DTYPES,
                                 ArrayLayout, TargetSpec, array_layout, id_bits, mantissa_bytes,
                                 raw_token_bytes)
from pipeline.cache.store import ts_key_range
from pipeline.errors import CacheError

MANIFEST_KEY = "manifest.json"
COMMIT_PREFIX = "commits/"


@dataclasses.dataclass(frozen=True)
class ShardCommit:
    """A committed shard: per stored array, the size and crc32 of the shard's file, and the
    writer's fidelity audit of the shard (``pipeline.cache.audit.ShardAudit.to_json``; None
    when the writer did not see the logits, or before format version 2)."""

    shard: int
    files: tuple[tuple[str, int, int], ...]  # (array name, bytes, crc32)
    audit: dict | None = None

    def to_json(self) -> dict:
        obj = {"shard": self.shard,
               "files": [{"array": a, "bytes": b, "crc32": c} for a, b, c in self.files]}
        if self.audit is not None:
            obj["audit"] = self.audit
        return obj

    @classmethod
    def from_json(cls, obj: dict) -> "ShardCommit":
        return cls(int(obj["shard"]),
                   tuple((f["array"], int(f["bytes"]), int(f["crc32"])) for f in obj["files"]),
                   obj.get("audit"))


def num_shards(num_sequences: int, shard_sequences: int) -> int:
    """Shards of a cache of ``num_sequences`` sequences, ``shard_sequences`` to a shard (the
    last one may be short)."""
    return -(-num_sequences // shard_sequences)


def shard_of(sequence_index, shard_sequences: int):
    """The shard of a sequence (of each, for an array of sequence indices)."""
    return sequence_index // shard_sequences


def shards_of(sequence_indices, shard_sequences: int) -> list[int]:
    """The shards holding ``sequence_indices``, sorted, each once."""
    return sorted(set(shard_of(np.asarray(sequence_indices), shard_sequences).ravel().tolist()))


@dataclasses.dataclass(frozen=True)
class CacheManifest:
    """Everything needed to refuse a wrong pairing of cache and run, plus commit states.

    Fingerprints are opaque strings chosen by the caller (teacher: config + weights hash;
    tokenizer; dataset: a path-independent hash of the token ids). ``commits`` is derived
    from the commit records and is not part of manifest.json. The format version is the
    target's (``target.format_version``), written as manifest.json's ``format_version``.
    """

    target: TargetSpec
    teacher_fingerprint: str
    tokenizer_fingerprint: str
    dataset_fingerprint: str
    seq_len: int
    num_sequences: int
    shard_sequences: int
    chunk_sequences: int = 1
    commits: tuple[ShardCommit, ...] = ()

    def __post_init__(self):
        for field in ("seq_len", "num_sequences", "shard_sequences", "chunk_sequences"):
            value = getattr(self, field)
            if not (isinstance(value, int) and value >= 1):
                raise CacheError(f"cache manifest: {field} expected an int >= 1, got {value!r}")
        if self.shard_sequences % self.chunk_sequences:
            raise CacheError(
                f"cache manifest: shard_sequences ({self.shard_sequences}) must be a multiple "
                f"of chunk_sequences ({self.chunk_sequences})")

    @property
    def format_version(self) -> int:
        return self.target.format_version

    @property
    def num_shards(self) -> int:
        return num_shards(self.num_sequences, self.shard_sequences)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Sequence indices [start, stop) of a shard (the last one may be short)."""
        start = shard * self.shard_sequences
        return start, min(start + self.shard_sequences, self.num_sequences)

    def shard_of(self, sequence_index: int) -> int:
        return shard_of(sequence_index, self.shard_sequences)

    def shards_of(self, sequence_indices) -> list[int]:
        """The shards holding ``sequence_indices``, sorted, each once."""
        return shards_of(sequence_indices, self.shard_sequences)

    @property
    def committed(self) -> frozenset[int]:
        return frozenset(c.shard for c in self.commits)

    @property
    def committed_bytes(self) -> int:
        """Bytes of the committed shards' files, as their commit records list them."""
        return sum(size for commit in self.commits for _, size, _ in commit.files)

    def header_json(self) -> dict:
        """manifest.json contents: all fields but the commits."""
        obj = dataclasses.asdict(self)
        del obj["commits"]
        obj["format_version"] = obj["target"].pop("format_version")
        return obj

    @classmethod
    def from_header_json(cls, obj: dict, commits: tuple[ShardCommit, ...] = ()) -> "CacheManifest":
        version = obj.get("format_version")
        if version not in READABLE_VERSIONS:
            raise CacheError(
                f"cache manifest: format_version {version!r} is not one this kdpipe reads "
                f"({', '.join(map(str, READABLE_VERSIONS))}); a newer cache needs a newer kdpipe")
        try:
            fields = dict(obj)
            del fields["format_version"]
            fields["target"] = TargetSpec(**fields["target"], format_version=version)
            return cls(**fields, commits=commits)
        except (KeyError, TypeError) as e:
            raise CacheError(f"cache manifest: malformed {MANIFEST_KEY} ({e!r})") from e

    def header_bytes(self) -> bytes:
        return json.dumps(self.header_json(), indent=1, sort_keys=True).encode()


def _mismatch(field: str, cached: Any, declared: Any) -> CacheError:
    return CacheError(
        f"cache does not match the run: {field} is {cached!r} in the cache but the run "
        f"declares {declared!r}")


def check_same_header(existing: CacheManifest, ours: CacheManifest) -> None:
    """A writer joining an existing cache must declare exactly its header."""
    a, b = existing.header_json(), ours.header_json()
    for field in sorted(a):
        if field == "target":
            for sub in sorted(a["target"]):
                if a["target"][sub] != b["target"][sub]:
                    raise _mismatch(f"target.{sub}", a["target"][sub], b["target"][sub])
        elif a[field] != b[field]:
            raise _mismatch(field, a[field], b[field])


@dataclasses.dataclass(frozen=True)
class RunDeclaration:
    """What a student run declares when it opens a cache (None = not checked).

    temperature is the loss temperature; vocab_size the student's logit width.
    """

    tokenizer_fingerprint: str
    dataset_fingerprint: str
    vocab_size: int
    seq_len: int
    temperature: float
    tokenizer_vocab_size: int | None = None
    teacher_fingerprint: str | None = None


def check_compatible(manifest: CacheManifest, run: RunDeclaration) -> None:
    """Refuse a cache that cannot serve ``run``, naming the field and both values."""
    for field in ("tokenizer_fingerprint", "dataset_fingerprint", "seq_len"):
        if getattr(manifest, field) != getattr(run, field):
            raise _mismatch(field, getattr(manifest, field), getattr(run, field))
    if run.teacher_fingerprint is not None and (
            manifest.teacher_fingerprint != run.teacher_fingerprint):
        raise _mismatch("teacher_fingerprint", manifest.teacher_fingerprint,
                        run.teacher_fingerprint)
    target = manifest.target
    if run.tokenizer_vocab_size is not None and (
            target.tokenizer_vocab_size != run.tokenizer_vocab_size):
        raise _mismatch("tokenizer_vocab_size", target.tokenizer_vocab_size,
                        run.tokenizer_vocab_size)
    if target.vocab_size != run.vocab_size:
        # Only padding may differ, and only when the real vocab is declared equal.
        if run.tokenizer_vocab_size is None or run.vocab_size < run.tokenizer_vocab_size:
            raise CacheError(
                f"cache does not match the run: vocab_size is {target.vocab_size} in the cache "
                f"but the run declares {run.vocab_size}; padded sizes may differ only when the "
                f"run declares tokenizer_vocab_size (cache: {target.tokenizer_vocab_size}) and "
                f"vocab_size >= it")
    if target.mode != "full" and float(run.temperature) != float(target.temperature):
        raise CacheError(
            f"cache does not match the run: temperature is {target.temperature} in the cache "
            f"but the run declares {run.temperature}; a {target.mode} cache holds the teacher "
            f"distribution at its own temperature only (full-mode caches serve any temperature)")


def inner_codecs(array: ArrayLayout, seq_len: int) -> list[dict]:
    """The zarr3 codecs of one inner chunk (a sequence's bytes) of a stored array."""
    ndim = 1 + len(array.stored_trailing(seq_len))
    codecs = []
    if array.codec == "zstd_transposed":
        # Slot-major bytes: each slot's bytes of all tokens sit together (similar statistics,
        # and the unused tail of bit-packed rows becomes one long zero run).
        codecs.append({"name": "transpose",
                       "configuration": {"order": [ndim - 1, *range(ndim - 1)]}})
    codecs.append({"name": "bytes", "configuration": {"endian": "little"}})
    if array.codec == "blosc_shuffle":
        # byte shuffle: the high bytes of all gaps, then the low bytes, each stream zstd-coded
        codecs.append({"name": "blosc", "configuration": {
            "cname": "zstd", "clevel": 5, "shuffle": "shuffle",
            "typesize": np.dtype(array.dtype).itemsize, "blocksize": 0}})
    else:
        codecs.append({"name": "zstd", "configuration": {"level": 5}})
    codecs.append({"name": "crc32c"})
    return codecs


def zarr3_spec(kvstore: dict, manifest: CacheManifest, array: ArrayLayout) -> dict:
    """TensorStore spec of one stored array under the cache's kvstore spec (a dict); its
    codecs follow the manifest's format version (``array_layout(manifest.target)``)."""
    trailing = list(array.stored_trailing(manifest.seq_len))
    shape = [manifest.num_sequences, *trailing]
    inner = [manifest.chunk_sequences, *trailing]
    codecs = inner_codecs(array, manifest.seq_len)
    sub = dict(kvstore)
    sub["path"] = sub.get("path", "") + array.name + "/"
    return {
        "driver": "zarr3",
        "kvstore": sub,
        # every inner chunk is written even when it equals the fill value, so a committed
        # shard always has all of its files and a missing one is an error, not zeros
        "store_data_equal_to_fill_value": True,
        "metadata": {
            "shape": shape,
            "data_type": array.dtype,
            "chunk_grid": {"name": "regular", "configuration": {
                "chunk_shape": [manifest.shard_sequences, *trailing]}},
            "chunk_key_encoding": {"name": "default"},
            "fill_value": 0,
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": inner,
                "codecs": codecs,
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                 {"name": "crc32c"}],
                "index_location": "end",
            }}],
            "dimension_names": (["sequence", "entry"] if array.ragged else
                                ["sequence", "position", *(["slot"] * len(array.trailing))]),
        },
    }


def shard_file_key(array: ArrayLayout, shard: int) -> str:
    """kvstore key (under the cache root) of one array's file for one shard."""
    zeros = "/0" * (1 if array.ragged else 1 + len(array.trailing))
    return f"{array.name}/c/{shard}{zeros}"


def array_metadata_key(array: ArrayLayout) -> str:
    """kvstore key (under the cache root) of one array's zarr3 metadata."""
    return f"{array.name}/zarr.json"


def is_created(kvstore, location: str) -> bool:
    """Whether a writer has created the cache at ``kvstore``: its manifest and then every array
    the manifest declares (``writer.CacheWriter`` writes them in that order), so a reader can
    open it."""
    if kvstore.read(MANIFEST_KEY).result().state != "value":
        return False
    target = load_manifest(kvstore, location).target
    return all(kvstore.read(array_metadata_key(a)).result().state == "value"
               for a in array_layout(target))


def commit_key(shard: int) -> str:
    return f"{COMMIT_PREFIX}shard-{shard:08d}.json"


def read_commits(kvstore) -> tuple[ShardCommit, ...]:
    """All commit records under the cache root, sorted by shard."""
    keys = kvstore.list(ts_key_range(COMMIT_PREFIX)).result()
    records = [f.result() for f in [kvstore.read(key) for key in keys]]  # reads in flight together
    commits = []
    for key, record in zip(keys, records):
        if record.state != "value":
            continue
        try:
            commits.append(ShardCommit.from_json(json.loads(record.value)))
        except (ValueError, KeyError, TypeError) as e:  # JSON and Unicode errors are ValueErrors
            raise CacheError(f"commit record {key.decode()} is malformed ({e!r}); delete it and "
                             f"fill the cache again to rewrite that shard") from None
    return tuple(sorted(commits, key=lambda c: c.shard))


def load_manifest(kvstore, location: str) -> CacheManifest:
    """Header from manifest.json plus the commit states of all committed shards."""
    record = kvstore.read(MANIFEST_KEY).result()
    if record.state != "value":
        raise CacheError(f"cache {location}: no {MANIFEST_KEY} (not a kdpipe cache, or nothing "
                         f"written yet)")
    try:
        header = json.loads(record.value)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise CacheError(f"cache {location}: {MANIFEST_KEY} is not valid JSON ({e}); the cache is "
                         f"damaged: remove it and fill it again") from None
    if not isinstance(header, dict):
        raise CacheError(f"cache {location}: {MANIFEST_KEY} holds a {type(header).__name__}, "
                         f"expected a JSON object")
    try:
        return CacheManifest.from_header_json(header, read_commits(kvstore))
    except CacheError as e:  # name the cache: a run opens several
        raise CacheError(f"cache {location}: {e}") from None


def open_array(root_spec: dict, manifest: CacheManifest, array: ArrayLayout, *, create: bool):
    """Open (or create, if missing) one stored array as a TensorStore."""
    import tensorstore as ts

    spec = zarr3_spec(root_spec, manifest, array)
    try:
        return ts.open(spec, open=True, create=create).result()
    except ValueError as e:  # TensorStore: missing array, or metadata unlike the manifest's
        raise CacheError(f"cache {root_spec.get('path', root_spec)}: array {array.name!r} "
                         f"cannot be opened as the manifest describes it: {e}") from e

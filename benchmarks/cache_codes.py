"""Id and value codes compared on a real cache's top-64 arrays, for ``bench_cache.py --real``
(benchmarks/cache_real.py): each candidate code stores the same sequences as zarr3 arrays in
memory, one chunk per sequence as the cache's inner chunks, and the bytes are counted."""

from __future__ import annotations

import dataclasses

import numpy as np


BYTES = {"name": "bytes", "configuration": {"endian": "little"}}


def zstd(level: int) -> dict:
    return {"name": "zstd", "configuration": {"level": level}}


def blosc(shuffle: str, typesize: int) -> dict:
    """TensorStore's zarr3 blosc codec (zstd level 5 inside)."""
    return {"name": "blosc", "configuration": {"cname": "zstd", "clevel": 5, "shuffle": shuffle,
                                               "typesize": typesize, "blocksize": 0}}


def stored_bytes(a: np.ndarray, codec: dict, slot_major: bool) -> int:
    """Bytes of ``a`` [S, L, m] stored as a zarr3 array in memory, one chunk per sequence (the
    cache's inner chunk), ``codec`` after the ``bytes`` codec; ``slot_major`` puts the
    ``transpose`` codec first, as the cache does for its per-slot arrays."""
    import tensorstore as ts

    codecs = ([{"name": "transpose", "configuration": {"order": [2, 0, 1]}}] if slot_major
              else []) + [BYTES, codec]
    spec = {"driver": "zarr3", "kvstore": "memory://", "metadata": {
        "shape": list(a.shape), "data_type": str(a.dtype),
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, *a.shape[1:]]}},
        "chunk_key_encoding": {"name": "default"}, "fill_value": 0, "codecs": codecs}}
    store = ts.open(spec, create=True).result()
    store.write(a).result()
    kvstore = store.kvstore
    return sum(len(kvstore.read(key).result().value) for key in kvstore.list().result()
               if not key.endswith(b"zarr.json"))


def id_codes(stored: dict[str, np.ndarray], ids: np.ndarray, spec,
             q8: dict[str, np.ndarray]) -> dict[str, float]:
    """Bytes/token of fixed top-k ids and values under several codes. ``stored``: the cache's
    arrays (``CacheReader.read_stored``, format 4 or later, q8sqrt values), ``ids``: the decoded
    sorted ids ``[S, L, k]`` of the same sequences, ``spec`` their TargetSpec; ``q8``: the same
    sequences' arrays in the q8 reference cache."""
    import jax.numpy as jnp

    from pipeline.cache import compress

    tokens = ids.shape[0] * ids.shape[1]
    flat = jnp.asarray(ids.reshape(tokens, -1))
    used = jnp.ones(flat.shape, bool)

    def encoded_ids(**fields):
        return {name: np.asarray(a).reshape(*ids.shape[:2], -1) for name, a in
                compress.encode_ids(flat, used, dataclasses.replace(spec, value_dtype="q8",
                                                                    **fields)).items()}

    v2 = encoded_ids(format_version=2)
    packed = encoded_ids(format_version=2, id_encoding="packed")["id_stream"]
    gaps = stored["id_gaps"]
    wide, size = gaps.dtype.name, gaps.dtype.itemsize
    lengths_bits = (v2["id_gap_lengths"], v2["id_stream"])
    codes = {
        "gap lengths + extra bits, zstd 5 slot-major (format 2)":
            sum(stored_bytes(a, zstd(5), True) for a in lengths_bits),
        "gap lengths + extra bits, zstd 5 token-major":
            sum(stored_bytes(a, zstd(5), False) for a in lengths_bits),
        f"packed {spec.vocab_size.bit_length() - 1}-bit ids, zstd 5 slot-major":
            stored_bytes(packed, zstd(5), True),
        f"gaps {wide}, zstd 5 slot-major": stored_bytes(gaps, zstd(5), True),
        f"gaps {wide}, zstd 5 token-major": stored_bytes(gaps, zstd(5), False),
        f"gaps {wide}, zstd 19 token-major": stored_bytes(gaps, zstd(19), False),
        f"gaps {wide}, blosc bitshuffle token-major": stored_bytes(gaps, blosc("bitshuffle",
                                                                                size), False),
        f"gaps {wide}, blosc byteshuffle slot-major": stored_bytes(gaps, blosc("shuffle", size),
                                                                   True),
        f"gaps {wide}, blosc byteshuffle token-major (format 3)":
            stored_bytes(gaps, blosc("shuffle", size), False),
        "gaps uint32, blosc byteshuffle token-major (format 3 past 65,536 ids)":
            stored_bytes(gaps.astype(np.uint32), blosc("shuffle", 4), False),
        f"ids {wide}, blosc byteshuffle token-major":
            stored_bytes(ids.astype(gaps.dtype), blosc("shuffle", size), False),
    }
    scale = q8["value_scale"].view(np.uint16)[..., None]
    values = {"q8 values + scale, zstd 5 slot-major (formats 2, 3)":
                  stored_bytes(q8["values"], zstd(5), True) + stored_bytes(scale, zstd(5), True),
              "q8sqrt values, zstd 5 slot-major (format 4)":
                  stored_bytes(stored["values"], zstd(5), True),
              "q8sqrt values, zstd 5 token-major": stored_bytes(stored["values"], zstd(5), False),
              "q8sqrt values, blosc bitshuffle token-major":
                  stored_bytes(stored["values"], blosc("bitshuffle", 1), False)}
    return {name: n / tokens for name, n in {**codes, **values}.items()}


def compare_codes(top64, q8, sequences: int) -> dict[str, float]:
    """Prints and returns :func:`id_codes` on the first ``sequences`` sequences of the top-64
    cache read by ``top64`` and of the q8 reference cache read by ``q8`` (``CacheReader``s)."""
    import jax.numpy as jnp

    from pipeline.cache import compress

    sample = np.arange(min(sequences, top64.manifest.num_sequences))
    stored = top64.read_stored(sample)
    ids = np.asarray(compress.decode({k: jnp.asarray(v) for k, v in stored.items()},
                                     top64.manifest.target)["teacher_topk_ids"])
    codes = id_codes(stored, ids, top64.manifest.target, q8.read_stored(sample))
    print(f"\nid and value codes, top-k 64 ids of {len(sample)} cached sequences (bytes/token; "
          f"ratio to format 2's code)")
    ids_now = next(v for k, v in codes.items() if "(format 2)" in k)
    values_now = next(v for k, v in codes.items() if k.startswith("q8") and "(formats" in k)
    for name, per_token in codes.items():
        now = values_now if name.startswith("q8") else ids_now
        print(f"  {name:66} {per_token:7.2f}  {per_token / now:5.3f}")
    ids_v3 = next(v for k, v in codes.items() if "(format 3)" in k)
    print(f"format 3's ids / format 2's: {ids_v3:.2f} / {ids_now:.2f} B/token = "
          f"{ids_v3 / ids_now:.3f}")
    return codes

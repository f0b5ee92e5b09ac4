"""Ragged storage of adaptive top-k targets: each token keeps ``id_count`` of its k slots.

The encoder (pipeline/cache/compress.py) gives every per-slot array padded, ``[B, L, width]``
with zeros in the unused slots. On disk (:class:`pipeline.cache.spec.ArrayLayout` with
``ragged``) a sequence's row holds only the used slots, packed at the front, zeros after them:
slot-major (slot 0 of every token that uses it, then slot 1, ...: entries of one slot have
alike statistics, and zstd sees one dense stream and one zero run), or token-major for a
token-major array (format 3's ``id_gaps``: neighbouring tokens' gaps repeat). Which slots a
token uses follows from what is stored before them, so nothing else is stored:

- ``id_gaps``, ``id_gap_lengths`` and ``values``: the first ``id_count`` slots;
- ``id_stream`` (bytes of bit-packed id codes): the bytes the token's codes fill,
  ``ceil(bits / 8)`` with ``bits`` = the sum of ``max(length - 1, 0)`` over its gap lengths
  (``gap``) or ``id_count * id_bits`` (``packed``).

:func:`pack` and :func:`unpack` are exact inverses on what the encoder gives (host-side numpy,
deterministic, so a re-filled shard is byte-identical). The reader's padded copy is
``[B, L, k]``: the size of fixed top-k targets, never more.
"""

from __future__ import annotations

import numpy as np

from pipeline.cache.spec import TargetSpec, array_layout, id_bits

COUNT = "id_count"


def _used(name: str, arrays: dict[str, np.ndarray], spec: TargetSpec) -> np.ndarray:
    """Slots used per token, ``[..., L]``, of per-slot array ``name`` (``arrays`` holds
    ``id_count`` and, for the gap code's ``id_stream``, ``id_gap_lengths``, padded)."""
    count = arrays[COUNT].astype(np.int64)
    if name != "id_stream":
        return count
    if spec.id_encoding == "packed":
        bits = count * id_bits(spec.vocab_size)
    else:
        bits = np.maximum(arrays["id_gap_lengths"].astype(np.int64) - 1, 0).sum(-1)
    return -(-bits // 8)


def _in_stored_order(a: np.ndarray, token_major: bool) -> np.ndarray:
    """Padded ``[S, L, width]`` -> ``[S, L, width]`` token-major or ``[S, width, L]`` (a view)."""
    return a if token_major else np.swapaxes(a, -1, -2)


def _used_mask(used: np.ndarray, width: int, token_major: bool) -> np.ndarray:
    """Bool mask of the used slots (``used``: slots per token ``[S, L]``) in stored order."""
    return _in_stored_order(np.arange(width) < used[..., None], token_major)


def pack(arrays: dict[str, np.ndarray], spec: TargetSpec) -> dict[str, np.ndarray]:
    """Padded encoder arrays of whole sequences ``{name: [S, L, *trailing]}`` -> the stored
    form (ragged arrays ``[S, L * width]``; the others unchanged)."""
    out = dict(arrays)
    for layout in array_layout(spec):
        if not layout.ragged:
            continue
        a = arrays[layout.name]  # [S, L, width]
        mask = _used_mask(_used(layout.name, arrays, spec), a.shape[-1], layout.token_major)
        rows = np.zeros((a.shape[0], a.shape[1] * a.shape[2]), a.dtype)
        for row, (ordered, used) in enumerate(zip(_in_stored_order(a, layout.token_major),
                                                  mask)):
            entries = ordered[used]
            rows[row, :len(entries)] = entries
        out[layout.name] = rows
    return out


def unpack(stored: dict[str, np.ndarray], spec: TargetSpec) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack`: stored arrays (ragged ``[S, L * width]``) -> padded
    ``{name: [S, L, *trailing]}``, zeros in the unused slots."""
    out = dict(stored)
    seq_len = stored[COUNT].shape[-1]
    # id_stream last: its used bytes follow from the unpacked gap lengths
    for layout in sorted((a for a in array_layout(spec) if a.ragged),
                         key=lambda a: a.name == "id_stream"):
        flat = stored[layout.name]
        width = layout.trailing[0]
        padded = np.zeros((flat.shape[0], seq_len, width), flat.dtype)
        mask = _used_mask(_used(layout.name, out, spec), width, layout.token_major)
        for ordered, row, used in zip(_in_stored_order(padded, layout.token_major), flat, mask):
            ordered[used] = row[:int(used.sum())]
        out[layout.name] = padded
    return out

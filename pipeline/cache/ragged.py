"""Ragged storage of adaptive top-k targets: each token keeps ``id_count`` of its k slots.

The encoder (pipeline/cache/compress.py) gives every per-slot array padded, ``[B, L, width]``
with zeros in the unused slots. On disk (:class:`pipeline.cache.spec.ArrayLayout` with
``ragged``) a sequence's row holds only the used slots, packed at the front slot-major (slot 0
of every token that uses it, then slot 1, ...: entries of one slot have alike statistics, and
zstd sees one dense stream and one zero run), zeros after them. Which slots a token uses
follows from what is stored before them, so nothing else is stored:

- ``id_gap_lengths`` and ``values``: the first ``id_count`` slots;
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


def _slot_major_mask(used: np.ndarray, width: int) -> np.ndarray:
    """``[..., width, L]`` bool: slot j of token t is used (slot-major, as stored)."""
    return np.arange(width)[:, None] < used[..., None, :]


def pack(arrays: dict[str, np.ndarray], spec: TargetSpec) -> dict[str, np.ndarray]:
    """Padded encoder arrays of whole sequences ``{name: [S, L, *trailing]}`` -> the stored
    form (ragged arrays ``[S, L * width]``; the others unchanged)."""
    out = dict(arrays)
    for layout in array_layout(spec):
        if not layout.ragged:
            continue
        a = arrays[layout.name]  # [S, L, width]
        mask = _slot_major_mask(_used(layout.name, arrays, spec), a.shape[-1])
        rows = np.zeros((a.shape[0], a.shape[1] * a.shape[2]), a.dtype)
        for row, (slot_major, used) in enumerate(zip(np.swapaxes(a, -1, -2), mask)):
            entries = slot_major[used]
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
        mask = _slot_major_mask(_used(layout.name, out, spec), width)
        padded = np.zeros((flat.shape[0], width, seq_len), flat.dtype)
        for row, used in enumerate(mask):
            padded[row][used] = flat[row, :int(used.sum())]
        out[layout.name] = np.swapaxes(padded, -1, -2)
    return out

"""``cache.bytes_per_token``: which of a sequence's top-k candidates a byte budget keeps.

Every token keeps ``min_k`` ids; the sequence's other candidates are ranked by probability over
the whole sequence (ties: the earlier position, then the earlier slot) and the first ``extra``
of them are kept too (:func:`counts_with_extra`), so bytes go where the teacher is unsure.

Format 3 and later pick ``extra`` on **stored** bytes, what a user reads off the disk: the largest
``extra`` (found by bisection, about log2(L (k - min_k)) steps) whose encoded sequence, stored
as the cache stores it (:func:`stored_sequence_bytes`: the ragged packing and each array's
own codecs, as TensorStore writes them), takes at most ``B * L`` bytes. The measurement runs
on the host (``jax.pure_callback``) inside the jitted encoder, so every path that encodes
(``compress.encode``, ``pipeline.teacher_head``) gets the same bytes, and it depends on the
sequence alone: a re-fill, or another batching or host count, writes the same bytes. ``extra``
= 0 is kept even when ``min_k`` ids alone take more than B (short sequences, where each
chunk's codec headers weigh most). Each sequence is measured as its own inner chunk: with
``chunk_sequences`` > 1 zstd sees several sequences at once and, in practice, stores no more;
a short last shard's index keeps 16 bytes per absent sequence and array, beyond B. Formats 1
and 2 capped raw bytes before compression (``compress.kept_counts``), which stored about half
of B.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pipeline.cache import ragged
from pipeline.cache.format import array_layout, inner_codecs
from pipeline.cache.spec import TargetSpec

# Per stored array and sequence (inner chunk): its offset and size in the shard index (2 x 8
# bytes), plus the index's crc32c (4 bytes a shard, counted once per chunk: an upper bound).
INDEX_BYTES_PER_CHUNK = 20


def counts_with_extra(logprobs: jax.Array, extra, spec: TargetSpec) -> jax.Array:
    """Ids kept per token ``[T]`` int32: ``min_k``, plus the sequence's ``extra`` most probable
    other candidates. logprobs: ``[T, k]`` the candidates' log-probs, descending per token;
    extra: int (traced or not) in [0, T (k - min_k)]."""
    tokens, k = logprobs.shape
    candidates = logprobs[:, spec.min_k:].reshape(-1)
    rank = jnp.argsort(jnp.argsort(-candidates, stable=True))  # rank 0 = most probable
    kept = (rank < extra).reshape(tokens, k - spec.min_k)
    return spec.min_k + jnp.sum(kept, axis=-1, dtype=jnp.int32)


def stored_sequence_bytes(encoded: dict[str, np.ndarray], spec: TargetSpec) -> int:
    """Bytes one sequence's encoded arrays ``{name: [L, *trailing]}`` (padded, as the encoder
    gives them) take in the cache: each array packed (pipeline/cache/ragged.py) and written as
    one inner chunk with its codecs (``format.inner_codecs``), plus its shard-index share."""
    import tensorstore as ts

    seq_len = next(iter(encoded.values())).shape[0]
    stored = ragged.pack({name: np.asarray(a)[None] for name, a in encoded.items()}, spec)
    total = 0
    for layout in array_layout(spec):
        a = stored[layout.name]
        store = ts.open({
            "driver": "zarr3", "kvstore": "memory://", "store_data_equal_to_fill_value": True,
            "metadata": {"shape": list(a.shape), "data_type": layout.dtype, "fill_value": 0,
                         "chunk_grid": {"name": "regular",
                                        "configuration": {"chunk_shape": list(a.shape)}},
                         "chunk_key_encoding": {"name": "default"},
                         "codecs": inner_codecs(layout, seq_len)}}, create=True).result()
        store.write(a).result()
        chunk_key = "c/" + "/".join("0" * a.ndim)
        total += len(store.kvstore.read(chunk_key).result().value) + INDEX_BYTES_PER_CHUNK
    return total


def stored_counts(cut: Callable[[jax.Array], dict[str, jax.Array]], logprobs: jax.Array,
                  spec: TargetSpec) -> jax.Array:
    """Ids kept per token ``[T]`` so that the sequence stores at most ``bytes_per_token * T``
    bytes (format 3 and later; the module docstring). cut: counts ``[T]`` -> the encoded arrays
    ``{name: [T, ...]}``; logprobs: ``[T, k]`` descending per token. Traceable (jit, vmap)."""
    tokens, k = logprobs.shape
    limit = int(spec.bytes_per_token * tokens)

    def stored_bytes(extra):
        encoded = cut(counts_with_extra(logprobs, extra, spec))
        return jax.pure_callback(
            lambda arrays: np.int32(stored_sequence_bytes(arrays, spec)),
            jax.ShapeDtypeStruct((), jnp.int32), encoded, vmap_method="sequential")

    def bisect(bounds):
        low, high = bounds  # stored_bytes(low) fits (or low = 0); every extra > high does not
        middle = (low + high + 1) // 2
        fits = stored_bytes(middle) <= limit
        return jnp.where(fits, middle, low), jnp.where(fits, high, middle - 1)

    low, _ = jax.lax.while_loop(lambda b: b[0] < b[1], bisect,
                                (jnp.int32(0), jnp.int32(tokens * (k - spec.min_k))))
    return counts_with_extra(logprobs, low, spec)

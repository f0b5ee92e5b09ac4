"""Self-attention of a decoder layer: one function, with a dense and a blockwise implementation.

``attention(q, k, v, ...)`` computes, for every query head ``n`` and its key/value head
``n // (num_heads // num_kv_heads)`` (grouped-query attention, transformers' ``repeat_kv``
order):

.. math::

  \\mathrm{out}_l = \\sum_m \\mathrm{softmax}_m(s_{lm}) \\, v_m, \\qquad
  s_{lm} = \\mathrm{scale} \\cdot q_l \\cdot k_m \\text{ where query } l \\text{ may attend key }
  m, \\text{ else } -\\infty

Query ``l`` may attend key ``m`` when all the constraints given hold: ``m <= l`` (causal),
``l - m < sliding_window`` (Mistral), ``padding_mask[m]`` (the key is a real token) and
``segment_ids[l] == segment_ids[m]`` (packed documents: a token sees only its own document).
Scores and softmax are float32 whatever the input dtype; the output is in the input dtype.
A query with no key to attend (a left-padding position) gives a finite, meaningless output:
the dense path averages all values there (its mask is a finite minimum, not -inf), the others
give 0. Shape letters: b batch, l/m query/key position, n query heads, k key/value heads,
g query heads per key/value head, h head_dim.

Generation (``pipeline.generate``) runs ``cached_attention`` instead: the new tokens' queries
against a ``KVCache`` of the earlier tokens' keys and values plus their own, densely.

Implementations (``IMPLEMENTATIONS``):

- ``xla``: the dense einsum; materialises ``[b, n, l, l]`` float32 scores. The reference, and
  the only one that returns the probabilities (``dense_attention``).
- ``blockwise``: plain JAX with O(l) memory. The online softmax over key blocks of
  FlashAttention (Dao et al. 2022), and FlashAttention-2's backward (Dao 2023, Algorithm 2),
  which recomputes each block's probabilities from the saved log-sum-exp, in a
  ``jax.custom_vjp``. Key blocks that causality or the sliding window mask whole are skipped.
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU, 16-bit inputs).
- ``splash``: the Pallas TPU kernel of ``jax.experimental.pallas.ops.tpu.splash_attention``.
- ``auto``: cudnn on GPU (16-bit inputs), splash on a single TPU device (seq a multiple of
  128: a Pallas kernel is not partitioned by a sharded jit; it needs a ``shard_map``); otherwise
  xla up to one block (``block_size`` tokens: blockwise would hold as large a score block and
  compiles slower) and blockwise beyond.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Implementation = Literal["auto", "xla", "blockwise", "cudnn", "splash"]
IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "splash")

# The splash kernel's sequence block: its sequences must be a multiple of it.
_SPLASH_BLOCK = 128
# blockwise's default query and key block length.
BLOCK_SIZE = 512


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
              sliding_window: int | None = None, padding_mask: jax.Array | None = None,
              segment_ids: jax.Array | None = None, implementation: Implementation = "auto",
              scale: float | None = None, block_size: int = BLOCK_SIZE) -> jax.Array:
    """Scaled dot-product self-attention (see the module docstring).

    Args:
      q: ``[b, l, n, h]`` queries; k, v: ``[b, l, k, h]`` keys and values, ``k`` dividing ``n``;
        all three of one float dtype.
      causal: a query attends only to keys at or before its position.
      sliding_window: with ``causal``, a query attends only to the last ``sliding_window``
        positions (itself included); ``None``: no window.
      padding_mask: ``[b, l]``, true (or 1) where the key is a real token; ``None``: all are.
      segment_ids: ``[b, l]`` integers; a query attends only to keys of its own segment.
      implementation: one of ``IMPLEMENTATIONS``.
      scale: multiplies the scores; ``None``: ``h ** -0.5``.
      block_size: query and key block length of ``blockwise`` (clipped to ``l``).

    Returns:
      ``[b, l, n, h]`` in ``q``'s dtype.

    Raises:
      ValueError: mis-shaped inputs, or an unknown or unavailable implementation.
    """
    _check_inputs(q, k, v, causal, sliding_window, padding_mask, segment_ids, block_size)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    chosen = resolve_implementation(implementation, q.dtype, q.shape[1], block_size=block_size)
    masks = dict(causal=causal, sliding_window=sliding_window, padding_mask=padding_mask,
                 segment_ids=segment_ids, scale=scale)
    if chosen == "xla":
        return dense_attention(q, k, v, **masks)[0]
    if chosen == "blockwise":
        return blockwise_attention(q, k, v, **masks, block_size=block_size)
    if chosen == "cudnn":
        return fused_attention(q, k, v, **masks, implementation="cudnn")
    return splash_attention(q, k, v, **masks)


def resolve_implementation(implementation: str, dtype, seq_len: int,
                           platform: str | None = None, devices: int | None = None, *,
                           block_size: int = BLOCK_SIZE) -> str:
    """The implementation ``attention`` runs for ``implementation`` on ``platform`` with
    ``devices`` devices (``None``: JAX's default backend and its device count): ``auto`` picks
    cudnn on GPU for 16-bit inputs, splash on one TPU device for a sequence that is a multiple
    of 128, else xla up to ``block_size`` tokens and blockwise beyond; other names are returned
    as they are, after checking that the platform has them."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation: expected one of {IMPLEMENTATIONS}, got "
                         f"{implementation!r}")
    platform = jax.default_backend() if platform is None else platform
    devices = jax.device_count() if devices is None else devices
    if implementation == "auto":
        if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
            return "cudnn"
        if platform == "tpu" and devices == 1 and seq_len % _SPLASH_BLOCK == 0:
            return "splash"
        return "xla" if seq_len <= block_size else "blockwise"
    needs = {"cudnn": "gpu", "splash": "tpu"}.get(implementation)
    if needs is not None and platform != needs:
        raise ValueError(f"implementation: {implementation!r} runs on {needs} only; this "
                         f"platform is {platform!r} (use 'auto', 'blockwise' or 'xla')")
    return implementation


def _check_inputs(q, k, v, causal, sliding_window, padding_mask, segment_ids, block_size):
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q, k: expected [batch, seq, heads, head_dim], got shapes {q.shape} "
                         f"and {k.shape}")
    b, l, n, h = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, l) or k.shape[3] != h or n % k.shape[2]:
        raise ValueError(f"k, v: expected equal shapes [{b}, {l}, kv_heads, {h}] with kv_heads "
                         f"dividing {n}, got {k.shape} and {v.shape}")
    if not (q.dtype == k.dtype == v.dtype and jnp.issubdtype(q.dtype, jnp.floating)):
        raise ValueError(f"q, k, v: expected one float dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    for name, value in (("padding_mask", padding_mask), ("segment_ids", segment_ids)):
        if value is not None and value.shape != (b, l):
            raise ValueError(f"{name}: expected shape {(b, l)} ([batch, seq]), got {value.shape}")
    if sliding_window is not None and not (causal and int(sliding_window) > 0):
        raise ValueError(f"sliding_window: expected a positive integer with causal=True, got "
                         f"{sliding_window!r} (causal={causal})")
    if int(block_size) <= 0:
        raise ValueError(f"block_size: expected a positive integer, got {block_size!r}")


def _allowed(q_pos, k_pos, *, causal, sliding_window, key_ok=None, q_seg=None, k_seg=None):
    """``[b or 1, lq, lk]`` bool: query at ``q_pos`` ``[lq]`` may attend key at ``k_pos``
    ``[lk]``; ``key_ok`` ``[b, lk]``, ``q_seg`` ``[b, lq]``, ``k_seg`` ``[b, lk]``."""
    allowed = jnp.ones((1, q_pos.shape[0], k_pos.shape[0]), bool)
    if causal:
        allowed &= (k_pos[None, :] <= q_pos[:, None])[None]
    if sliding_window is not None:
        allowed &= (q_pos[:, None] - k_pos[None, :] < sliding_window)[None]
    if key_ok is not None:
        allowed &= key_ok[:, None, :]
    if q_seg is not None:
        allowed &= q_seg[:, :, None] == k_seg[:, None, :]
    return allowed


def dense_attention(q, k, v, *, causal=True, sliding_window=None, padding_mask=None,
                    segment_ids=None, scale=None):
    """The ``xla`` implementation: ``([b, l, n, h] output, [b, n, l, l] probabilities)``, the
    probabilities float32-softmaxed and cast to ``q``'s dtype (what ``output_attentions``
    returns, as transformers' eager attention does). Arguments as ``attention``'s."""
    positions = jnp.arange(q.shape[1])
    key_ok = None if padding_mask is None else padding_mask.astype(bool)
    allowed = _allowed(positions, positions, causal=causal, sliding_window=sliding_window,
                       key_ok=key_ok, q_seg=segment_ids, k_seg=segment_ids)
    return _dense(q, k, v, allowed, scale)


def _dense(q, k, v, allowed, scale):
    """Queries ``[b, l, n, h]`` over keys and values ``[b, m, k, h]`` where ``allowed``
    ``[b or 1, l, m]``: ``([b, l, n, h] output, [b, n, l, m] probabilities in q's dtype)``."""
    b, l, n, h = q.shape
    num_kv, m = k.shape[2], k.shape[1]
    scale = h ** -0.5 if scale is None else scale
    q = q.reshape(b, l, num_kv, n // num_kv, h)
    scores = jnp.einsum("blkgh,bmkh->bkglm", q, k, preferred_element_type=jnp.float32)
    # A finite minimum, not -inf: a fully masked row (a left-padding query) becomes a uniform
    # average instead of NaN; its output is padding and ignored downstream.
    scores = jnp.where(allowed[:, None, None], scores * scale, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkglm,bmkh->blkgh", probs, v).reshape(b, l, n, h)
    return out, probs.reshape(b, n, l, m)


@struct.dataclass
class KVCache:
    """The keys and values of the tokens a decoder has seen, for generation
    (``pipeline.generate``): slot ``s`` of a row holds its ``s``-th token (left padding
    included, masked by ``valid``).

    Attributes:
      keys, values: ``[layers, b, slots, k, h]`` in the compute dtype, after RoPE.
      valid: ``[b, slots]`` bool, true where a slot holds a real token (false for padding and
        for the slots not written yet).
      index: int32 scalar, the next slot to write (the same for every row).
    """

    keys: jax.Array
    values: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, layers: int, batch: int, slots: int, kv_heads: int, head_dim: int, dtype):
        """A cache of ``slots`` positions per row with nothing written."""
        shape = (layers, batch, slots, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch, slots), bool), jnp.zeros((), jnp.int32))

    def append(self, keys: jax.Array, values: jax.Array, valid: jax.Array) -> "KVCache":
        """The cache with ``l`` new tokens written at slots ``index..index+l-1``: ``keys``,
        ``values`` ``[layers, b, l, k, h]``, ``valid`` ``[b, l]``."""
        at = (0, 0, self.index, 0, 0)
        return KVCache(jax.lax.dynamic_update_slice(self.keys, keys.astype(self.keys.dtype), at),
                       jax.lax.dynamic_update_slice(self.values, values.astype(self.keys.dtype),
                                                    at),
                       jax.lax.dynamic_update_slice(self.valid, valid.astype(bool),
                                                    (0, self.index)),
                       self.index + keys.shape[2])


def cached_attention(q, k, v, cache_keys, cache_values, cache_valid, index, *,
                     padding_mask=None, sliding_window=None, scale=None):
    """Causal attention of ``l`` new tokens at slots ``index..index+l-1`` over the tokens
    already in one layer's ``KVCache`` and over themselves (a prefill: the prompt, a decode
    step: one token), as ``attention`` would compute at those positions over the whole row.

    Dense: the scores of the new queries against every slot ``[b, n, l, slots + l]`` (a mask
    over the valid slots, the causal order and the sliding window), so one step reads the
    whole cache whatever has been written; fine for generation's short rows.

    Args:
      q: ``[b, l, n, h]``; k, v: ``[b, l, k, h]`` the new tokens' keys and values.
      cache_keys, cache_values: ``[b, slots, k, h]``; cache_valid: ``[b, slots]`` bool.
      index: int32 scalar, the slot of the first new token.
      padding_mask: ``[b, l]``, true for the new tokens that are real; ``None``: all are.
      sliding_window, scale: as ``attention``'s.

    Returns:
      ``[b, l, n, h]`` in ``q``'s dtype.
    """
    b, l = q.shape[:2]
    slots = cache_keys.shape[1]
    new_slots = index + jnp.arange(l)
    new_ok = jnp.ones((b, l), bool) if padding_mask is None else padding_mask.astype(bool)
    allowed = _allowed(new_slots, jnp.concatenate([jnp.arange(slots), new_slots]), causal=True,
                       sliding_window=sliding_window,
                       key_ok=jnp.concatenate([cache_valid, new_ok], axis=1))
    keys = jnp.concatenate([cache_keys.astype(k.dtype), k], axis=1)
    values = jnp.concatenate([cache_values.astype(v.dtype), v], axis=1)
    return _dense(q, keys, values, allowed, scale)[0]


# --------------------------------------------------------------------------- blockwise


@dataclasses.dataclass(frozen=True)
class _Blocks:
    """What the blockwise kernel is compiled for (static, hashable)."""

    causal: bool
    sliding_window: int | None
    scale: float
    block: int
    num_blocks: int

    def key_range(self, i):
        """Key blocks ``[lo, hi)`` that query block ``i`` may attend (others are masked)."""
        hi = self.num_blocks
        if self.causal:  # keys up to the block's last query
            hi = jnp.minimum(hi, i + 1)
        lo = 0
        if self.sliding_window is not None:  # keys from the block's first query's window
            lo = jnp.maximum(0, (i * self.block - self.sliding_window + 1) // self.block)
        return lo, hi

    def query_range(self, j):
        """Query blocks ``[lo, hi)`` that may attend key block ``j``."""
        lo = j if self.causal else 0
        hi = self.num_blocks
        if self.sliding_window is not None:  # queries up to the block's last key's window
            last_query = (j + 1) * self.block - 1 + self.sliding_window - 1
            hi = jnp.minimum(hi, last_query // self.block + 1)
        return lo, hi


def blockwise_attention(q, k, v, *, causal=True, sliding_window=None, padding_mask=None,
                        segment_ids=None, scale=None, block_size=BLOCK_SIZE):
    """The ``blockwise`` implementation: as ``attention``, with O(l) memory forward and
    backward. The sequence is padded to a multiple of the block (padding keys are masked)."""
    b, l, n, h = q.shape
    num_kv = k.shape[2]
    block = min(int(block_size), l)
    num_blocks = -(-l // block)
    pad = num_blocks * block - l
    spec = _Blocks(causal, sliding_window, h ** -0.5 if scale is None else float(scale), block,
                   num_blocks)

    def padded(x, value=0):
        return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)

    key_ok = jnp.ones((b, l), bool) if padding_mask is None else padding_mask.astype(bool)
    segments = None if segment_ids is None else padded(segment_ids.astype(jnp.int32))
    out = _blockwise(spec, padded(q).reshape(b, l + pad, num_kv, n // num_kv, h), padded(k),
                     padded(v), padded(key_ok, False), segments)
    return out[:, :l].reshape(b, l, n, h)


def _block(x, i, block):
    """Block ``i`` of ``x`` along axis 1."""
    return jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=1)


def _block_scores(spec, i, j, q_i, k_j, key_ok, segments):
    """Query block ``i`` against key block ``j``: ``(scores [b, k, g, bq, bk] float32,
    allowed [b, 1, 1, bq, bk])``; masked scores are float32's minimum."""
    q_pos = i * spec.block + jnp.arange(spec.block)
    k_pos = j * spec.block + jnp.arange(spec.block)
    q_seg = k_seg = None
    if segments is not None:
        q_seg, k_seg = _block(segments, i, spec.block), _block(segments, j, spec.block)
    allowed = _allowed(q_pos, k_pos, causal=spec.causal, sliding_window=spec.sliding_window,
                       key_ok=_block(key_ok, j, spec.block), q_seg=q_seg,
                       k_seg=k_seg)[:, None, None]
    scores = jnp.einsum("bqkgh,bmkh->bkgqm", q_i, k_j, preferred_element_type=jnp.float32)
    return jnp.where(allowed, scores * spec.scale, jnp.finfo(jnp.float32).min), allowed


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise(spec, q, k, v, key_ok, segments):
    """``q`` ``[b, L, k, g, h]``, ``k``/``v`` ``[b, L, k, h]``, ``key_ok`` ``[b, L]``,
    ``segments`` ``[b, L]`` or ``None`` -> ``[b, L, k, g, h]``; ``L`` a multiple of the block."""
    return _blockwise_forward(spec, q, k, v, key_ok, segments)[0]


def _blockwise_forward(spec, q, k, v, key_ok, segments):
    """Output and log-sum-exp ``[b, k, g, L]`` float32 (+inf on rows with no allowed key)."""
    b, _, num_kv, groups, h = q.shape
    row = (b, num_kv, groups, spec.block)

    def query_block(i):
        q_i = _block(q, i, spec.block)

        def key_block(j, carry):
            row_max, row_sum, acc = carry
            scores, allowed = _block_scores(spec, i, j, q_i, _block(k, j, spec.block), key_ok,
                                            segments)
            new_max = jnp.maximum(row_max, scores.max(-1))
            probs = jnp.where(allowed, jnp.exp(scores - new_max[..., None]), 0.0)
            correction = jnp.exp(row_max - new_max)
            row_sum = row_sum * correction + probs.sum(-1)
            acc = acc * correction[..., None] + jnp.einsum(
                "bkgqm,bmkh->bkgqh", probs.astype(v.dtype), _block(v, j, spec.block),
                preferred_element_type=jnp.float32)
            return new_max, row_sum, acc

        init = (jnp.full(row, jnp.finfo(jnp.float32).min), jnp.zeros(row, jnp.float32),
                jnp.zeros((*row, h), jnp.float32))
        row_max, row_sum, acc = jax.lax.fori_loop(*spec.key_range(i), key_block, init)
        seen = row_sum > 0
        out = acc / jnp.where(seen, row_sum, 1.0)[..., None]
        lse = jnp.where(seen, row_max + jnp.log(jnp.where(seen, row_sum, 1.0)), jnp.inf)
        return out.astype(q.dtype), lse

    out, lse = jax.lax.map(query_block, jnp.arange(spec.num_blocks))
    # [blocks, b, k, g, block, h] -> [b, L, k, g, h]; [blocks, b, k, g, block] -> [b, k, g, L]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(q.shape)
    lse = lse.transpose(1, 2, 3, 0, 4).reshape(b, num_kv, groups, -1)
    return out, lse


def _blockwise_fwd(spec, q, k, v, key_ok, segments):
    out, lse = _blockwise_forward(spec, q, k, v, key_ok, segments)
    return out, (q, k, v, key_ok, segments, out, lse)


def _blockwise_bwd(spec, residuals, d_out):
    """FlashAttention-2's backward: per key block, over the query blocks that see it,
    ``p = exp(s - lse)``, ``dv += pᵀ do``, ``ds = p (do vᵀ - rowsum(do ∘ out))``,
    ``dk += scale dsᵀ q``, ``dq += scale ds k``."""
    q, k, v, key_ok, segments, out, lse = residuals
    # rowsum(do ∘ out) = rowsum(dp ∘ p), the softmax gradient's subtracted term: [b, k, g, L]
    d_rows = jnp.einsum("blkgh,blkgh->bkgl", d_out.astype(jnp.float32),
                        out.astype(jnp.float32))
    block = spec.block

    def key_block(d_q, j):
        k_j, v_j = _block(k, j, block), _block(v, j, block)

        def query_block(i, carry):
            d_q, d_k, d_v = carry
            q_i, do_i = _block(q, i, block), _block(d_out, i, block)
            scores, allowed = _block_scores(spec, i, j, q_i, k_j, key_ok, segments)
            lse_i = jax.lax.dynamic_slice_in_dim(lse, i * block, block, axis=3)
            probs = jnp.where(allowed, jnp.exp(scores - lse_i[..., None]), 0.0)
            d_v = d_v + jnp.einsum("bkgqm,bqkgh->bmkh", probs.astype(do_i.dtype), do_i,
                                   preferred_element_type=jnp.float32)
            d_probs = jnp.einsum("bqkgh,bmkh->bkgqm", do_i, v_j,
                                 preferred_element_type=jnp.float32)
            rows = jax.lax.dynamic_slice_in_dim(d_rows, i * block, block, axis=3)
            d_scores = (probs * (d_probs - rows[..., None]) * spec.scale).astype(q.dtype)
            d_k = d_k + jnp.einsum("bkgqm,bqkgh->bmkh", d_scores, q_i,
                                   preferred_element_type=jnp.float32)
            d_q_i = _block(d_q, i, block) + jnp.einsum(
                "bkgqm,bmkh->bqkgh", d_scores, k_j, preferred_element_type=jnp.float32)
            d_q = jax.lax.dynamic_update_slice_in_dim(d_q, d_q_i, i * block, axis=1)
            return d_q, d_k, d_v

        zeros = jnp.zeros(k_j.shape, jnp.float32)
        d_q, d_k, d_v = jax.lax.fori_loop(*spec.query_range(j), query_block,
                                          (d_q, zeros, zeros))
        return d_q, (d_k, d_v)

    d_q, (d_k, d_v) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32),
                                   jnp.arange(spec.num_blocks))

    def unblocked(x):  # [blocks, b, block, k, h] -> [b, L, k, h] in k's dtype
        return x.transpose(1, 0, 2, 3, 4).reshape(k.shape).astype(k.dtype)

    return d_q.astype(q.dtype), unblocked(d_k), unblocked(d_v), None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# --------------------------------------------------------------------------- platform kernels
# Neither runs on the CPU-only machines kdpipe is tested on; the tests check the argument
# translation (fused_attention with implementation="xla", splash_attention in interpret mode).


def fused_attention(q, k, v, *, causal=True, sliding_window=None, padding_mask=None,
                    segment_ids=None, scale=None, implementation="cudnn"):
    """``jax.nn.dot_product_attention`` with ``implementation`` (``cudnn``, or ``xla`` for its
    own dense path); padding and segments become a ``[b, 1, l, l]`` boolean mask, which cuDNN
    takes as a bias."""
    l = q.shape[1]
    mask = None
    if padding_mask is not None or segment_ids is not None:
        positions = jnp.arange(l)
        key_ok = None if padding_mask is None else padding_mask.astype(bool)
        mask = _allowed(positions, positions, causal=False, sliding_window=None, key_ok=key_ok,
                        q_seg=segment_ids, k_seg=segment_ids)
        mask = jnp.broadcast_to(mask, (q.shape[0], l, l))[:, None]
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal,
                                        local_window_size=window, implementation=implementation)


def splash_attention(q, k, v, *, causal=True, sliding_window=None, padding_mask=None,
                     segment_ids=None, scale=None, interpret=False):
    """The Pallas TPU splash kernel (``interpret``: emulated, runs anywhere, slowly), mapped
    over the batch. Padding keys get a segment no query has. Built for one device: under a
    sharded jit it needs a ``shard_map`` around it, which kdpipe does not add yet."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel, splash_attention_mask as masks)

    b, l, n, h = q.shape
    if l % _SPLASH_BLOCK:
        raise ValueError(f"q: the splash kernel needs a sequence length that is a multiple of "
                         f"{_SPLASH_BLOCK}, got {l}")
    if sliding_window is not None:
        mask = masks.LocalMask((l, l), (sliding_window - 1, 0), offset=0)
    else:
        mask = masks.CausalMask((l, l)) if causal else masks.FullMask((l, l))
    splash = kernel.make_splash_mha(masks.MultiHeadMask([mask] * n), head_shards=1,
                                    q_seq_shards=1, interpret=interpret)
    scale = h ** -0.5 if scale is None else scale
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)  # the kernel does not scale
    segments = (jnp.zeros((b, l), jnp.int32) if segment_ids is None
                else segment_ids.astype(jnp.int32))
    key_segments = segments
    if padding_mask is not None:
        key_segments = jnp.where(padding_mask.astype(bool), segments, np.iinfo(np.int32).min)

    def one(q, k, v, q_seg, k_seg):  # [l, heads, h] -> the kernel's [heads, l, h]
        out = splash(q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1),
                     segment_ids=kernel.SegmentIds(q=q_seg, kv=k_seg))
        return out.swapaxes(0, 1)

    return jax.vmap(one)(q, k, v, segments, key_segments)

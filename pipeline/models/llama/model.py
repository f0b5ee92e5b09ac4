"""The Llama-family decoder's layers and model in flax.nnx (architecture: ``LlamaConfig``).

Numerics follow transformers' eager implementation: RMSNorm normalises in float32 and casts
back before the scale; attention scores and softmax are float32; logits come back in float32.
Two dtypes, as MaxText's ``weight_dtype`` and ``dtype``: parameters are stored in
``param_dtype`` and computation runs in ``dtype`` (each parameter is cast where it is used, so
the embeddings, activations and matmuls are ``dtype``). A bfloat16 student with float32
parameters keeps float32 master weights: updates far below bfloat16's spacing (2^-8 at 1.0)
are not rounded away, and optax keeps its moments in the parameters' dtype.

Parameter names carry their axes as a suffix (``q_dnh`` is ``[hidden, heads, head_dim]``), which
is what ``pipeline.models.sharding``'s rules and ``pipeline.models.llama.names``' Hugging Face
name table key on. Shape letters: b batch, l/m query/key position, d hidden, v vocab, n query
heads, k key/value heads, g query heads per key/value head, h head_dim, f intermediate (MLP)
size.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pipeline.errors import DataError
from pipeline.models import ModelOutput
from pipeline.models.attention import KVCache, attention, cached_attention, dense_attention
from pipeline.models.llama.config import LlamaConfig
from pipeline.models.stack import make_layers, remat_policy, run_layers


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """RoPE inverse frequencies ``[head_dim // 2]`` float32, after any ``llama3`` scaling.

    ``inv_freq[i] = rope_theta ** (-2i / head_dim)`` (Su et al. 2021, RoFormer); with
    ``Llama3RopeScaling`` each is then scaled by wavelength band as that class describes.
    """
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    scaling = config.rope_scaling
    if scaling is not None:
        context = scaling.original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        low_freq_wavelen = context / scaling.low_freq_factor
        high_freq_wavelen = context / scaling.high_freq_factor
        smooth = (context / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        inv_freq = np.where(
            wavelen > low_freq_wavelen,
            inv_freq / scaling.factor,
            np.where(wavelen < high_freq_wavelen, inv_freq, interpolated),
        )
    return inv_freq.astype(np.float32)


def document_positions(segment_ids: jax.Array) -> jax.Array:
    """Per-document positions ``[b, l]`` int32 of packed rows: 0 where a segment starts (the
    row's first token, or a token whose segment id differs from the one before it), counting
    up within the segment. What a document would have as its positions if it ran alone."""
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return index - start_index


def rope_tables(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)`` ``[b, l, h]`` float32 of integer ``positions`` ``[b, l]`` (``b`` may be
    1, broadcast over the batch): the angle of frequency ``i`` at position ``p`` is
    ``p * inv_freq[i]``, repeated over the two halves of the head (transformers' layout)."""
    freqs = positions.astype(jnp.float32)[..., None] * rope_inverse_frequencies(config)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x`` ``[b, l, heads, h]`` by position; ``cos``/``sin`` are ``[b or 1, l, h]``
    float32 (``rope_tables``).

    Half-split convention of transformers' Llama (``rotate_half``), not interleaved pairs:
    ``x * cos + concat(-x2, x1) * sin`` with ``x1, x2`` the two halves of the head.
    """
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


def _normal(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def _batch_split(x: jax.Array, sharding) -> jax.Array:
    """``x`` held split over the batch by ``sharding`` (``None``, or a batch the batch axes do
    not divide, e.g. a small microbatch: as XLA propagates). Without it, XLA may lay the MLP's
    and attention's activations out like the fsdp-sharded weights and hold the whole global
    batch's on every device (``benchmarks/bench_scale.py``)."""
    if sharding is None or x.shape[0] % math.prod(
            sharding.mesh.shape[axis] for axis in jax.tree.leaves(sharding.spec[0])):
        return x
    return jax.lax.with_sharding_constraint(x, sharding)


def _used(param: nnx.Param, dtype) -> jax.Array:
    """A parameter's value in the compute dtype (its gradient flows back in its own dtype)."""
    return param[...].astype(dtype)


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis, normalised in float32 and cast
    back to ``x``'s dtype before the scale (as transformers' LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float, *, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))  # [dim]
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * _used(self.scale, x.dtype)


class Embedder(nnx.Module):
    """Token embedding table ``embedding_vd`` ``[vocab, hidden]``; its output is in ``dtype``,
    the compute dtype every later layer follows."""

    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        shape = (config.vocab_size, config.hidden_size)
        self.embedding_vd = nnx.Param(_normal(rngs, shape, config.initializer_range, param_dtype))
        self.dtype = dtype

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """``[b, l]`` int ids -> ``[b, l, d]`` embeddings."""
        # Gather, then cast: only the rows used are converted, not the whole table.
        return jnp.take(self.embedding_vd[...], input_ids, axis=0).astype(self.dtype)


class Attention(nnx.Module):
    """Causal grouped-query self-attention with RoPE (and Qwen2 biases / Qwen3 q,k norms),
    computed by ``pipeline.models.attention`` with ``implementation``."""

    def __init__(self, config: LlamaConfig, *, param_dtype, implementation, batch_sharding,
                 rngs: nnx.Rngs):
        d, n, k, h = (config.hidden_size, config.num_attention_heads,
                      config.num_key_value_heads, config.head_dim)
        std = config.initializer_range
        self.q_dnh = nnx.Param(_normal(rngs, (d, n, h), std, param_dtype))
        self.k_dkh = nnx.Param(_normal(rngs, (d, k, h), std, param_dtype))
        self.v_dkh = nnx.Param(_normal(rngs, (d, k, h), std, param_dtype))
        self.o_nhd = nnx.Param(_normal(rngs, (n, h, d), std, param_dtype))
        self.q_bias_nh = nnx.Param(jnp.zeros((n, h), param_dtype)) if config.qkv_bias else None
        self.k_bias_kh = nnx.Param(jnp.zeros((k, h), param_dtype)) if config.qkv_bias else None
        self.v_bias_kh = nnx.Param(jnp.zeros((k, h), param_dtype)) if config.qkv_bias else None
        eps = config.rms_norm_eps
        self.q_norm = RMSNorm(h, eps, param_dtype=param_dtype) if config.qk_norm else None
        self.k_norm = RMSNorm(h, eps, param_dtype=param_dtype) if config.qk_norm else None
        self.sliding_window = config.sliding_window
        self.implementation = implementation
        self.batch_sharding = batch_sharding

    def __call__(self, x, cos, sin, padding_mask, segment_ids, with_probs: bool, cache=None):
        """Self-attention of ``x`` ``[b, l, d]``.

        Args:
          cos, sin: ``[b or 1, l, h]`` float32 RoPE tables.
          padding_mask: ``[b, l]``, true for real tokens; ``None``: no padding.
          segment_ids: ``[b, l]`` integers, a token attending only to its own segment (its
            document in a packed row); ``None``: one segment.
          with_probs: also return the probabilities (computed the dense ``xla`` way).
          cache: ``None``, or this layer's ``(keys, values, valid, index)`` of a ``KVCache``
            (``pipeline.models.attention``): ``x`` holds the tokens of slots ``index..`` and
            attends to the cache's valid slots too (``cached_attention``; one segment).

        Returns:
          ``([b, l, d] output, [b, n, l, l] attention probabilities in x's dtype or None,
          (k, v) [b, l, k, h] this call's keys and values after RoPE)``.
        """
        split = functools.partial(_batch_split, sharding=self.batch_sharding)
        q = split(jnp.einsum("bld,dnh->blnh", x, _used(self.q_dnh, x.dtype)))
        k = split(jnp.einsum("bld,dkh->blkh", x, _used(self.k_dkh, x.dtype)))
        v = split(jnp.einsum("bld,dkh->blkh", x, _used(self.v_dkh, x.dtype)))
        if self.q_bias_nh is not None:
            q = q + _used(self.q_bias_nh, x.dtype)
            k = k + _used(self.k_bias_kh, x.dtype)
            v = v + _used(self.v_bias_kh, x.dtype)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        masks = dict(causal=True, sliding_window=self.sliding_window, padding_mask=padding_mask,
                     segment_ids=segment_ids)
        if cache is not None:
            out, probs = cached_attention(q, k, v, *cache, padding_mask=padding_mask,
                                          sliding_window=self.sliding_window), None
        elif with_probs:
            out, probs = dense_attention(q, k, v, **masks)
        else:
            out, probs = attention(q, k, v, **masks, implementation=self.implementation), None
        out = split(jnp.einsum("blnh,nhd->bld", split(out), _used(self.o_nhd, x.dtype)))
        return out, probs, (k, v)


class MLP(nnx.Module):
    """SwiGLU feed-forward: ``down(silu(x @ gate) * (x @ up))``."""

    def __init__(self, config: LlamaConfig, *, param_dtype, batch_sharding, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        std = config.initializer_range
        self.gate_df = nnx.Param(_normal(rngs, (d, f), std, param_dtype))
        self.up_df = nnx.Param(_normal(rngs, (d, f), std, param_dtype))
        self.down_fd = nnx.Param(_normal(rngs, (f, d), std, param_dtype))
        self.batch_sharding = batch_sharding

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[b, l, d]`` -> ``[b, l, d]``."""
        split = functools.partial(_batch_split, sharding=self.batch_sharding)
        gate = jax.nn.silu(split(x @ _used(self.gate_df, x.dtype)))
        return split((gate * split(x @ _used(self.up_df, x.dtype))) @ _used(self.down_fd, x.dtype))


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``h = x + attn(norm(x))``, ``out = h + mlp(norm(h))``."""

    def __init__(self, config: LlamaConfig, *, param_dtype, attention, batch_sharding,
                 rngs: nnx.Rngs):
        eps = config.rms_norm_eps
        self.input_norm = RMSNorm(config.hidden_size, eps, param_dtype=param_dtype)
        self.attn = Attention(config, param_dtype=param_dtype, implementation=attention,
                              batch_sharding=batch_sharding, rngs=rngs)
        self.post_attn_norm = RMSNorm(config.hidden_size, eps, param_dtype=param_dtype)
        self.mlp = MLP(config, param_dtype=param_dtype, batch_sharding=batch_sharding,
                       rngs=rngs)

    def __call__(self, x, cos, sin, padding_mask, segment_ids, with_probs, cache=None):
        """``[b, l, d]`` -> ``([b, l, d], [b, n, l, l] attention probabilities or None,
        (k, v))``; ``cache`` as ``Attention``'s."""
        attn_out, probs, kv = self.attn(self.input_norm(x), cos, sin, padding_mask, segment_ids,
                                        with_probs, cache)
        h = x + attn_out
        return h + self.mlp(self.post_attn_norm(h)), probs, kv


class Llama(nnx.Module):
    """A Llama-family causal LM following the protocol of ``pipeline.models``.

    Args:
      config: the architecture.
      dtype: compute dtype (float32 or bfloat16) of the embeddings, activations and matmuls;
        a Hugging Face export is written in it (``torch_dtype``).
      param_dtype: dtype the parameters are stored (and trained) in; ``None``: ``dtype``.
      attention: the implementation of ``pipeline.models.attention`` (``auto``, ``xla``,
        ``blockwise``, ...); ``output_attentions=True`` computes the probabilities with
        ``xla`` whatever it is.
      scan_layers, remat: the layers stacked and scanned, and what their backward pass
        recomputes (``pipeline.models.stack``).
      batch_sharding: a ``NamedSharding`` splitting the batch over a mesh (``build_model``
        gives ``pipeline.models.sharding.BATCH_SPEC`` on its mesh): the layers' activations
        are held split by it. ``None``: no constraint (one device, or XLA's choice).
      rngs: random initialisation (``nnx.Rngs(seed)``).
    """

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=None,
                 attention="auto", scan_layers: bool = False, remat: str = "none",
                 batch_sharding=None, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        param_dtype = self.dtype if param_dtype is None else jnp.dtype(param_dtype)
        remat_policy(remat)  # refuses a bad name here, not at the first call
        self.scan_layers, self.remat = scan_layers, remat
        self.embedder = Embedder(config, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = make_layers(
            lambda rngs: DecoderLayer(config, param_dtype=param_dtype, attention=attention,
                                      batch_sharding=batch_sharding, rngs=rngs),
            config.num_hidden_layers, rngs, scan_layers=scan_layers)
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
        head_shape = (config.vocab_size, config.hidden_size)
        self.lm_head_vd = None if config.tie_word_embeddings else nnx.Param(
            _normal(rngs, head_shape, config.initializer_range, param_dtype))

    def output_head(self) -> jax.Array:
        """The output projection ``[vocab, hidden]`` in the compute dtype (the embedding table
        when tied)."""
        if self.lm_head_vd is None:
            return _used(self.embedder.embedding_vd, self.dtype)
        return _used(self.lm_head_vd, self.dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        compute_logits: bool = True,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> ModelOutput:
        """Runs the decoder over positions ``0..seq-1``, or each packed document's own.

        Args:
          input_ids: ``[batch, seq]`` integer token ids.
          attention_mask: ``[batch, seq]``, 1 (or True) for real tokens, 0 for padding; combined
            with the causal mask (and mistral's sliding window). ``None``: no padding.
          output_hidden_states, output_attentions, compute_logits: see ``ModelOutput``.
          segment_ids: ``[batch, seq]`` integers, the document of each token in a packed row
            (``pipeline.data.prepare``): a token attends only to tokens of its own segment,
            and, unless ``positions`` are given, RoPE positions restart at 0 where a segment
            starts (``document_positions``), so each document computes as if it ran alone.
            ``None``: the row is one sequence.
          positions: ``[batch, seq]`` integer RoPE positions; ``None``: ``0..seq-1``, or per
            document with ``segment_ids``.
          cache: a ``KVCache`` (``pipeline.models.attention``) of the tokens before these
            (generation, ``pipeline.generate``): the tokens go to slots ``cache.index..`` and
            attend to the cache's valid slots as well; pass their ``positions``. ``None``: no
            cache.

        Returns:
          ``ModelOutput``; ``logits`` ``[batch, seq, vocab]`` float32; ``cache``: the cache with
          these tokens' keys and values written (``attention_mask`` marking the real ones),
          when one was given. Outputs at padding positions are finite but meaningless.
        """
        if input_ids.ndim != 2:
            raise DataError(f"input_ids: expected [batch, seq], got shape {input_ids.shape}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise DataError(
                f"attention_mask: expected shape {input_ids.shape} (as input_ids), got "
                f"{attention_mask.shape}"
            )
        for name, value in (("segment_ids", segment_ids), ("positions", positions)):
            if value is not None and value.shape != input_ids.shape:
                raise DataError(f"{name}: expected shape {input_ids.shape} (as input_ids), got "
                                f"{value.shape}")
        if positions is None:
            positions = (np.arange(input_ids.shape[1])[None] if segment_ids is None
                         else document_positions(segment_ids))
        cos, sin = rope_tables(self.config, positions)  # [b or 1, l, h]
        if cache is not None and segment_ids is not None:
            raise DataError("segment_ids: not supported with a cache (generation runs one "
                            "sequence per row)")

        def body(layer, carry):
            x, i = carry  # i: the layer's index, to find its slice of the cache
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i],
                                                      cache.valid, cache.index)
            x, probs, kv = layer(x, cos, sin, attention_mask, segment_ids, output_attentions,
                                 layer_cache)
            return (x, i + 1), (x if output_hidden_states else None, probs,
                                None if cache is None else kv)

        embeddings = self.embedder(input_ids)
        (x, _), outs = run_layers(self.layers, (embeddings, jnp.zeros((), jnp.int32)), body,
                                  scan_layers=self.scan_layers, remat=self.remat)
        hidden_states = [embeddings] + [hidden for hidden, _, _ in outs]
        attentions = [probs for _, probs, _ in outs]
        if cache is not None:
            cache = cache.append(
                jnp.stack([k for _, _, (k, _) in outs]), jnp.stack([v for _, _, (_, v) in outs]),
                jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask)
        x = self.final_norm(x)
        # transformers' convention: the last entry is the final-normed state, not the raw one.
        hidden_states[-1] = x
        logits = None
        if compute_logits:
            logits = jnp.einsum("bld,vd->blv", x, self.output_head(),
                                preferred_element_type=jnp.float32)
        return ModelOutput(
            last_hidden_state=x,
            logits=logits,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
            cache=cache,
        )

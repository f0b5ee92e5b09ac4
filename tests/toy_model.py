"""A tiny causal decoder: a test fixture for the distillation step, not a model to train.

It implements the model protocol of ``pipeline.models`` (``ModelOutput``, ``compute_logits``,
``output_head``) with as little as possible: token embeddings, ``num_layers`` pre-norm blocks
of causal multi-head attention plus a small MLP, a final norm, a tied or untied head, and
optional dropout (so that a model carries non-parameter state). There are no positions besides
the causal mask; the step's tests only need a differentiable function of the tokens whose
hidden states and attentions are meaningful, and one that compiles faster than the Llama family
(tests/test_step.py compiles a dozen steps). Parameters are drawn with numpy, so building one
compiles nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pipeline.models import ModelOutput


def _rms_norm(x: jax.Array, scale: nnx.Param) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale[...]


def _param(rng: np.random.Generator, *shape: int) -> nnx.Param:
    # numpy initialisation: eager jax.random calls would each compile, slowing every test.
    return nnx.Param(jnp.asarray(rng.standard_normal(shape, np.float32) / np.sqrt(shape[0])))


class ToyBlock(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, hidden: int, heads: int, rng: np.random.Generator):
        self.heads = heads
        self.attn_norm = nnx.Param(jnp.ones((hidden,)))
        self.qkv = _param(rng, hidden, 3 * hidden)
        self.out = _param(rng, hidden, hidden)
        self.mlp_norm = nnx.Param(jnp.ones((hidden,)))
        self.up = _param(rng, hidden, 2 * hidden)
        self.down = _param(rng, 2 * hidden, hidden)

    def __call__(self, x: jax.Array, allowed: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x ``[B, L, D]``, allowed ``[B, 1, L, L]`` bool -> (``[B, L, D]``, ``[B, H, L, L]``)."""
        batch, seq, hidden = x.shape
        q, k, v = jnp.split(_rms_norm(x, self.attn_norm) @ self.qkv[...], 3, axis=-1)
        q, k, v = (t.reshape(batch, seq, self.heads, hidden // self.heads) for t in (q, k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hidden // self.heads)
        # A finite fill keeps rows with no visible key (left padding) finite; they are masked out.
        probs = jax.nn.softmax(jnp.where(allowed, scores, -1e9), axis=-1)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, seq, hidden)
        x = x + mixed @ self.out[...]
        x = x + jax.nn.gelu(_rms_norm(x, self.mlp_norm) @ self.up[...]) @ self.down[...]
        return x, probs


class ToyDecoder(nnx.Module):
    """Tiny decoder LM following ``pipeline.models``' protocol (see its docstring)."""

    def __init__(self, vocab: int = 32, hidden: int = 16, num_layers: int = 2, heads: int = 2,
                 *, tie_embeddings: bool = False, dropout: float = 0.0, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.embedding = nnx.Param(jnp.asarray(rng.standard_normal((vocab, hidden), np.float32)))
        # Dropout gives the model non-parameter state (an RNG stream) for the step to carry.
        self.dropout = nnx.Dropout(dropout, rngs=nnx.Rngs(dropout=seed)) if dropout else None
        self.blocks = nnx.List([ToyBlock(hidden, heads, rng) for _ in range(num_layers)])
        self.final_norm = nnx.Param(jnp.ones((hidden,)))
        self.head = None if tie_embeddings else _param(rng, vocab, hidden)

    def output_head(self) -> jax.Array:
        """``[vocab, hidden]``: the tied embedding table or the separate head."""
        return self.embedding[...] if self.head is None else self.head[...]

    def __call__(self, input_ids, attention_mask=None, output_hidden_states=False,
                 output_attentions=False, compute_logits=True, *,
                 segment_ids=None) -> ModelOutput:
        batch, seq = input_ids.shape
        allowed = jnp.tril(jnp.ones((seq, seq), bool))[None, None]
        if attention_mask is not None:
            allowed = allowed & (attention_mask[:, None, None, :] > 0)
        if segment_ids is not None:  # no positions to restart: the toy has no position encoding
            allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        x = self.embedding[...][input_ids]
        if self.dropout is not None:
            x = self.dropout(x)
        hidden_states, attentions = [x], []
        for block in self.blocks:
            x, probs = block(x, allowed)
            hidden_states.append(x)
            attentions.append(probs)
        last = _rms_norm(x, self.final_norm)
        hidden_states[-1] = last  # transformers' convention: the last entry is the normed state
        return ModelOutput(
            last_hidden_state=last,
            logits=last @ self.output_head().T if compute_logits else None,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )

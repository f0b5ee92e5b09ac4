"""Text generation with a Llama-family model: a KV-cache prefill and decode loop, jitted and
batched.

``generate(model, prompt_ids, prompt_mask, ...)`` runs the prompts through the model once (the
prefill), writing every layer's keys and values into a ``KVCache``
(``pipeline.models.attention``), then one token per step in a ``lax.while_loop``: each step
feeds only the last sampled token, which attends to the cache, so a step costs one token's
matmuls instead of the whole prefix's. The loop stops after ``max_new_tokens`` or when every
row has produced ``eos_id``.

Prompts are **left-padded** (``left_pad`` makes such a batch from ragged token lists): padding
first, so every row's last prompt token sits in the same slot and each step writes one slot
for the whole batch. Padding slots are masked out of attention, and RoPE positions count real
tokens only (``cumsum(mask) - 1``, as transformers' ``generate`` computes them), so a padded
row generates what it would alone. Attention over the cache is dense: each step scores the new
token against all ``prompt + max_new_tokens`` slots with a mask over the valid ones
(``cached_attention``).

Sampling (``Sampling``) follows transformers' logits processors in their order: temperature,
then top-k, then top-p (nucleus, Holtzman et al. 2020: the smallest set of most likely tokens
whose probability reaches ``top_p``), renormalised; temperature 0 is greedy (argmax).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pipeline.errors import ConfigError, DataError
from pipeline.models.attention import KVCache
from pipeline.models.sharding import BATCH_SPEC, batch_devices


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the model's logits.

    Attributes:
      temperature: logits are divided by it; 0: greedy (the most likely token).
      top_k: keep only the ``top_k`` most likely tokens; 0: all.
      top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``
        (in ``(0, 1]``; 1: all).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"temperature: expected a finite number >= 0 (0: greedy), got "
                              f"{self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k: expected an integer >= 0 (0: no top-k), got "
                              f"{self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: expected a number in (0, 1] (1: no top-p), got "
                              f"{self.top_p!r}")


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """One token per row ``[b]`` int32 drawn from ``logits`` ``[b, vocab]`` float32 as
    ``sampling`` says, with one key for the batch, or one per row (``key`` ``[b, 2]``: each
    row's draw then depends on its own key alone)."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        # Keep a token when the tokens more likely than it hold less than top_p: the most
        # likely is always kept, and the one that crosses top_p too.
        kept = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < sampling.top_p, axis=-1)
        threshold = jnp.take_along_axis(ordered, kept[:, None] - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    if key.ndim == 2:
        return jax.vmap(jax.random.categorical)(key, logits).astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _fold_in(key: jax.Array, t) -> jax.Array:
    """``fold_in(key, t)`` of one key, or of each row's key ``[b, 2]``."""
    return jax.vmap(jax.random.fold_in, (0, None))(key, t) if key.ndim == 2 else (
        jax.random.fold_in(key, t))


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Ragged token lists -> ``(ids, mask)`` ``[len(rows), longest]`` int32, each row
    right-aligned after ``pad_id`` padding (mask 0) as ``generate`` takes them."""
    if not rows or any(len(row) == 0 for row in rows):
        raise DataError("prompt: expected one or more non-empty prompts (token lists)")
    longest = max(len(row) for row in rows)
    ids = np.full((len(rows), longest), pad_id, np.int32)
    mask = np.zeros((len(rows), longest), np.int32)
    for i, row in enumerate(rows):
        ids[i, longest - len(row):] = row
        mask[i, longest - len(row):] = 1
    return ids, mask


@struct.dataclass
class Generated:
    """What ``generate`` returns.

    Attributes:
      tokens: ``[b, max_new_tokens]`` int32, the new tokens; after a row's ``eos_id`` (kept)
        and after the loop stops, ``pad_id``.
      lengths: ``[b]`` int32, each row's new tokens up to and including its ``eos_id``.
      stopped: ``[b]`` bool, the row produced ``eos_id``.
    """

    tokens: jax.Array
    lengths: jax.Array
    stopped: jax.Array


def generate(model: nnx.Module, prompt_ids, prompt_mask, *, max_new_tokens: int,
             sampling: Sampling = Sampling(), eos_id: int | None = None, pad_id: int = 0,
             key: jax.Array | None = None, mesh: Mesh | None = None) -> Generated:
    """Continues each left-padded prompt by up to ``max_new_tokens`` tokens (module docstring).

    Args:
      model: a Llama-family model (``pipeline.models.llama.Llama``), looped or scanned layers.
      prompt_ids, prompt_mask: ``[b, p]`` ints, left-padded (``left_pad``): each mask row is
        zeros then ones, and ends in a real token.
      max_new_tokens: at least 1; ``p + max_new_tokens`` must fit the model's
        ``max_position_embeddings``.
      sampling: temperature, top-k and top-p (``Sampling``).
      eos_id: a row stops after it produces this token; ``None``: rows run to
        ``max_new_tokens``.
      pad_id: what fills a row's tokens after it stopped.
      key: the ``jax.random`` key of the sampling (step ``t`` uses ``fold_in(key, t)``), or
        one key per row ``[b, 2]`` (a row's tokens then depend on its key, not on the batch it
        is in); ``None``: ``PRNGKey(0)``. Unused when greedy.
      mesh: the model's mesh (``build_model(..., mesh)``): the batch, and the cache, are split
        over its data-parallel axes (``BATCH_SPEC``); ``b`` must be a multiple of their size
        on this process. In a multi-process program each process passes its own rows (and
        keys), and the result is a global array of all processes' rows.

    Raises:
      DataError: mis-shaped or right-padded prompts, prompts too long for the model, or token
        ids outside its vocabulary.
      ConfigError: ``max_new_tokens`` < 1.
    """
    prompt_ids = np.asarray(prompt_ids)
    prompt_mask = np.asarray(prompt_mask)
    _check_prompts(prompt_ids, prompt_mask, max_new_tokens, model.config)
    ids, mask = jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32)
    batch_sharding = None
    if mesh is not None:
        batch_sharding = NamedSharding(mesh, BATCH_SPEC)
        devices = batch_devices(mesh) // jax.process_count()
        if ids.shape[0] % max(devices, 1):
            raise DataError(f"prompt: a batch of {ids.shape[0]} does not split over the mesh's "
                            f"{devices} data-parallel devices; give a multiple of {devices}")
        ids, mask = (jax.make_array_from_process_local_data(batch_sharding, x) for x in (ids, mask))
        if key is not None and np.ndim(key) == 2:
            key = jax.make_array_from_process_local_data(batch_sharding, np.asarray(key))
    key = jax.random.PRNGKey(0) if key is None else jnp.asarray(key)
    if key.ndim == 2 and key.shape[0] != ids.shape[0]:
        raise DataError(f"key: expected one key or one per prompt row ({ids.shape[0]}), got "
                        f"{key.shape[0]} keys")
    # Traced, so one compilation serves every eos and pad; -1 matches no token.
    eos, pad = jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id)
    return _generate(model, ids, mask, key, eos, pad, max_new_tokens=max_new_tokens,
                     sampling=sampling, batch_sharding=batch_sharding)


def _check_prompts(ids: np.ndarray, mask: np.ndarray, max_new_tokens: int, config):
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise DataError(f"prompt: expected ids and mask of one shape [batch, prompt_len], got "
                        f"{ids.shape} and {mask.shape}")
    if not np.all((mask == 0) | (mask == 1)) or np.any(np.diff(mask, axis=1) < 0) or not np.all(
            mask[:, -1] == 1):
        raise DataError("prompt: expected left padding (each mask row zeros, then ones, ending "
                        "in a real token); left_pad makes such a batch from token lists")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or (
            max_new_tokens < 1):
        raise ConfigError(f"max_new_tokens: expected an integer >= 1, got {max_new_tokens!r}")
    context, vocab = config.max_position_embeddings, config.vocab_size
    real = ids[mask == 1]
    if real.min() < 0 or real.max() >= vocab:
        raise DataError(f"prompt: token ids must be in [0, {vocab}) (the model's vocab_size), "
                        f"got {real.min()}..{real.max()}; is the tokenizer the model's?")
    if ids.shape[1] + max_new_tokens > context:
        room = context - ids.shape[1]
        hint = (f"shorten the prompt or generate at most {room}" if room > 0 else
                "shorten the prompt")
        raise DataError(f"prompt: {ids.shape[1]} tokens (the longest prompt) + max_new_tokens "
                        f"{max_new_tokens} > the model's max_position_embeddings {context}; "
                        f"{hint}")


def _last_logits(model, out) -> jax.Array:
    """``[b, vocab]`` float32 logits of each row's last position only (the prefill's other
    positions need none): the head applied as the model protocol says (``pipeline.models``)."""
    return jnp.einsum("bd,vd->bv", out.last_hidden_state[:, -1], model.output_head(),
                      preferred_element_type=jnp.float32)


@nnx.jit(static_argnames=("max_new_tokens", "sampling", "batch_sharding"))
def _generate(model, ids, mask, key, eos_id, pad_id, *, max_new_tokens, sampling,
              batch_sharding):
    b, p = ids.shape
    config = model.config
    cache = KVCache.empty(config.num_hidden_layers, b, p + max_new_tokens,
                          config.num_key_value_heads, config.head_dim, model.dtype)
    if batch_sharding is not None:
        batch = batch_sharding.spec[0]
        cache = jax.tree.map(jax.lax.with_sharding_constraint, cache, KVCache(
            *(NamedSharding(batch_sharding.mesh, spec)
              for spec in (P(None, batch), P(None, batch), P(batch), P()))))
    lengths = mask.sum(axis=1)  # real prompt tokens; the next position of each row
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    out = model(ids, mask, compute_logits=False, positions=positions, cache=cache)
    token = sample(_last_logits(model, out), _fold_in(key, 0), sampling)
    stopped = token == eos_id
    tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)

    def running(state):
        _, _, _, t, stopped, _ = state
        return (t < max_new_tokens) & ~jnp.all(stopped)

    def step(state):
        model, cache, token, t, stopped, tokens = state
        out = model(token[:, None], compute_logits=False, positions=(lengths + t - 1)[:, None],
                    cache=cache)
        token = jnp.where(stopped, pad_id,
                          sample(_last_logits(model, out), _fold_in(key, t), sampling))
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, t))
        return model, out.cache, token, t + 1, stopped | (token == eos_id), tokens

    # nnx's loop: the model is part of the state (its layers' scan refuses a module captured
    # from an outer trace).
    _, _, _, steps, stopped, tokens = nnx.while_loop(
        running, step, (model, out.cache, token, jnp.int32(1), stopped, tokens))
    lengths = jnp.where(stopped, jnp.argmax(tokens == eos_id, axis=1) + 1, steps)
    out = Generated(tokens, lengths, stopped)
    # Rows where the prompts were: each process's rows stay on its devices (its host-local part).
    return out if batch_sharding is None else jax.lax.with_sharding_constraint(out, batch_sharding)

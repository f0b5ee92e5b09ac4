"""Decoder-only language models in flax.nnx, and the interface the distillation step relies on.

Every model that kdpipe trains or distils from follows one protocol, so the step never needs
to know which architecture it holds:

``model(input_ids, attention_mask=None, output_hidden_states=False, output_attentions=False,
compute_logits=True, *, segment_ids=None) -> ModelOutput``

- ``input_ids``: ``[batch, seq]`` int32; ``attention_mask``: ``[batch, seq]`` (1 = real token,
  0 = padding), combined with the causal mask; positions are ``0..seq-1`` as in transformers.
- ``segment_ids``: ``[batch, seq]`` integers of packed documents (``pipeline.data.prepare``):
  a token attends only to its own segment, whose positions start at 0, so every document
  computes as it would alone.
- ``compute_logits=False`` skips the output head: ``logits`` is ``None`` and the step applies
  the head itself, chunk by chunk over tokens (``pipeline.losses.fused_head``).

``model.output_head() -> [vocab, hidden]``: the output projection in Hugging Face layout, so
``logits = last_hidden_state @ model.output_head().T`` (the tied embedding table when the
embeddings are tied).
"""

from __future__ import annotations

import jax
from flax import struct

from pipeline.models.attention import KVCache


@struct.dataclass
class ModelOutput:
    """What a model returns.

    Attributes:
      last_hidden_state: ``[batch, seq, hidden]`` after the final norm, before the head.
      logits: ``[batch, seq, vocab]`` float32, or ``None`` when ``compute_logits=False``.
      hidden_states: ``None`` unless asked; else a tuple of ``num_layers + 1`` arrays
        ``[batch, seq, hidden]``, exactly the transformers convention: the embeddings, the
        outputs of layers ``1..num_layers-1``, and the final norm applied to the last layer's
        output (so ``hidden_states[-1] is last_hidden_state``).
      attentions: ``None`` unless asked; else a tuple of ``num_layers`` arrays
        ``[batch, heads, seq, seq]`` of post-softmax attention probabilities.
      cache: ``None`` unless the model was called with a ``cache``
        (``pipeline.models.attention.KVCache``, generation); else that cache with this call's
        keys and values written.
    """

    last_hidden_state: jax.Array
    logits: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None
    cache: KVCache | None = None

"""The token mask and the one reducer of every kdpipe loss.

``m = attention_mask × (labels != -100)`` and ``reduce(x) = Σ x·m / max(Σ m, 1)``: a token mean
over the whole batch, EasyDeL 0.3's normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pipeline.losses.softmax import F32

IGNORE_INDEX = -100


def loss_mask(attention_mask, labels, batch_shape: Sequence[int]) -> jax.Array:
    """The token mask ``m = attention_mask × (labels != -100)``, ``[batch, seq]`` float32.

    Each factor is used when given; all ones when both are ``None``.
    """
    mask = jnp.ones(tuple(batch_shape), F32)
    if attention_mask is not None:
        mask = mask * attention_mask.astype(F32)
    if labels is not None:
        mask = mask * (labels != IGNORE_INDEX).astype(F32)
    return mask


def masked_token_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    r"""Token mean over a mask: the one reducer of every kdpipe loss.

    .. math::
        \operatorname{reduce}(x) = \frac{\sum_i x_i m_i}{\max(\sum_i m_i, 1)}

    Args:
      x: ``[batch, seq]`` per-token values.
      mask: ``[batch, seq]`` weights (usually 0/1), or ``None`` for a plain mean.
    Returns:
      A float32 scalar.
    """
    x = x.astype(F32)
    if mask is None:
        return jnp.mean(x)
    mask = mask.astype(F32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)

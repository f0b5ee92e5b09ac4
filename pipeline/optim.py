"""The optimizer and its learning-rate schedule, built from the ``optimizer`` config section."""

from __future__ import annotations

from typing import Any

import jax
import optax

from pipeline.config import OptimizerConfig


def build_schedule(optimizer: OptimizerConfig, total_steps: int):
    """Learning rate per step: linear warmup, then cosine decay.

    .. math::
      \\eta(s) = \\eta_{max} s / w                         \\quad s < w \\\\
      \\eta(s) = \\eta_{end} + (\\eta_{max} - \\eta_{end})(1 + \\cos(\\pi \\min(1, (s-w)/(D-w))))/2
      \\quad s \\ge w

    with w = warmup_steps, D = decay_steps (or ``total_steps``) and
    η_end = min_lr_ratio · learning_rate.

    Returns an ``optax.Schedule`` (step -> learning rate).
    """
    decay = optimizer.decay_steps or total_steps
    peak = optimizer.learning_rate
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=optimizer.warmup_steps,
        decay_steps=decay, end_value=peak * optimizer.min_lr_ratio)


def _decay_mask(params: Any) -> Any:
    # Decaying norm scales and biases pulls them towards 0 and hurts; only matrices decay.
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def build_optimizer(optimizer: OptimizerConfig, total_steps: int):
    """``optax`` AdamW on ``build_schedule``'s learning rate, after global-norm clipping.

    Weight decay applies to parameters with ``ndim >= 2`` only. Returns an
    ``optax.GradientTransformation``.
    """
    adamw = optax.adamw(build_schedule(optimizer, total_steps), b1=optimizer.b1, b2=optimizer.b2,
                        eps=optimizer.eps, weight_decay=optimizer.weight_decay, mask=_decay_mask)
    if optimizer.clip_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(optimizer.clip_grad_norm), adamw)

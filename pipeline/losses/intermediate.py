"""Intermediate-representation losses: hidden states and attention maps of selected layers.

Layer indices (negatives allowed) select from both models' tuples, which follow transformers
(hidden states: embeddings, each layer, the final norm). The teacher's side is under
``stop_gradient``; the math runs in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pipeline.errors import ConfigError, KdpipeError
from pipeline.losses.checks import check_token_shape
from pipeline.losses.reduce import loss_mask, masked_token_mean
from pipeline.losses.softmax import F32


def _select_layers(name: str, student: Sequence[jax.Array], teacher: Sequence[jax.Array],
                   layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        if len(student) != len(teacher):
            raise KdpipeError(f"{name}: with layers=None both models need as many entries, got "
                              f"student {len(student)} and teacher {len(teacher)}; pass layers")
        return list(range(len(student)))
    if len(layers) == 0:
        raise KdpipeError(f"{name} layers: expected at least one index, got {tuple(layers)}")
    for i in layers:
        for side, states in (("student", student), ("teacher", teacher)):
            if not -len(states) <= i < len(states):
                raise KdpipeError(f"{name} layers: index {i} out of range for the {side}'s "
                                  f"{len(states)} entries "
                                  f"(valid -{len(states)}..{len(states) - 1})")
    return list(layers)


def hidden_state_loss(student_hidden_states, teacher_hidden_states, attention_mask=None,
                      layers=None, loss="mse"):
    r"""Intermediate-representation loss over selected hidden states.

    Layer indices (negatives allowed) select from both tuples, which follow transformers
    (embeddings, each layer, the final norm). With mask :math:`m` = ``attention_mask``
    (all ones if ``None``), :math:`N = \max(\sum m, 1)` and :math:`\mathcal{L}` the selected
    layers:

    .. math::
        \mathrm{mse} &= \frac{1}{|\mathcal{L}|}\sum_{l\in\mathcal{L}} \frac{1}{N}
            \sum_{b,i} \sum_d \bigl((s^l_{bid} - t^l_{bid})\, m_{bi}\bigr)^2 \\
        \mathrm{cosine} &= \frac{1}{|\mathcal{L}|}\sum_{l\in\mathcal{L}} \frac{1}{N}
            \sum_{b,i} m_{bi}\Bigl(1 - \frac{s^l_{bi}\cdot t^l_{bi}}
            {\max(\lVert s^l_{bi}\rVert \lVert t^l_{bi}\rVert, 10^{-8})}\Bigr)

    Args:
      student_hidden_states, teacher_hidden_states: tuples of ``[batch, seq, hidden]``
        (teacher under ``stop_gradient``); the widths must match.
      attention_mask: ``[batch, seq]`` or ``None``.
      layers: indices into both tuples, or ``None`` for all (then the tuples must have the
        same length).
      loss: ``"mse"`` or ``"cosine"``.
    Returns:
      A float32 scalar.
    """
    if loss not in ("mse", "cosine"):
        raise ConfigError(f"hidden_state_loss: expected 'mse' or 'cosine', got {loss!r}")
    selected = _select_layers("hidden_state", student_hidden_states, teacher_hidden_states, layers)
    per_layer = []
    for i in selected:
        s = student_hidden_states[i].astype(F32)
        t = jax.lax.stop_gradient(teacher_hidden_states[i]).astype(F32)
        if s.shape[-1] != t.shape[-1]:
            raise KdpipeError(f"hidden_state layers[{i}]: student hidden width {s.shape[-1]} != "
                              f"teacher hidden width {t.shape[-1]}; project one first or set "
                              f"hidden_state_weight=0")
        if s.shape != t.shape:
            raise KdpipeError(f"hidden_state layers[{i}]: student shape {tuple(s.shape)} != "
                              f"teacher shape {tuple(t.shape)}")
        check_token_shape("attention_mask", attention_mask, tuple(s.shape[:-1]))
        mask = loss_mask(attention_mask, None, s.shape[:-1])
        if loss == "mse":
            per_token = jnp.sum(jnp.square((s - t) * mask[..., None]), axis=-1)
        else:
            norms = jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1)
            per_token = 1.0 - jnp.sum(s * t, axis=-1) / jnp.maximum(norms, 1e-8)
        per_layer.append(masked_token_mean(per_token, mask))
    return jnp.mean(jnp.stack(per_layer))


def attention_loss(student_attentions, teacher_attentions, attention_mask=None, layers=None,
                   normalize=False):
    r"""Mean squared error between selected attention maps, over valid (query, key) pairs.

    With :math:`m` = ``attention_mask`` (all ones if ``None``), pair weight
    :math:`w_{bij} = m_{bi} m_{bj}` and :math:`P = \max(H \sum_{b,i,j} w_{bij}, 1)`:

    .. math::
        \frac{1}{|\mathcal{L}|}\sum_{l\in\mathcal{L}} \frac{1}{P}
            \sum_{b,h,i,j} w_{bij} (a^l_{bhij} - \hat a^l_{bhij})^2

    With ``normalize=True`` each map's rows are first renormalised over the valid keys,
    :math:`a_{bhij} \leftarrow a_{bhij} m_{bj} / \max(\sum_j a_{bhij} m_{bj}, 10^{-9})`.

    Args:
      student_attentions, teacher_attentions: tuples of ``[batch, heads, seq, seq]``
        (teacher under ``stop_gradient``); selected maps must have the same shape.
      attention_mask: ``[batch, seq]`` or ``None``.
      layers: indices into both tuples (negatives allowed), or ``None`` for all.
      normalize: renormalise rows first.
    Returns:
      A float32 scalar.
    """
    selected = _select_layers("attention", student_attentions, teacher_attentions, layers)
    per_layer = []
    for i in selected:
        s = student_attentions[i].astype(F32)
        t = jax.lax.stop_gradient(teacher_attentions[i]).astype(F32)
        if s.shape != t.shape:
            raise KdpipeError(f"attention layers[{i}]: student shape {tuple(s.shape)} != "
                              f"teacher shape {tuple(t.shape)} (heads and sequence must match)")
        batch, heads, seq, _ = s.shape
        check_token_shape("attention_mask", attention_mask, (batch, seq))
        mask = loss_mask(attention_mask, None, (batch, seq))
        keys = mask[:, None, None, :]
        if normalize:
            s = s * keys / jnp.maximum(jnp.sum(s * keys, axis=-1, keepdims=True), 1e-9)
            t = t * keys / jnp.maximum(jnp.sum(t * keys, axis=-1, keepdims=True), 1e-9)
        pairs = mask[:, None, :, None] * keys
        total = jnp.sum(jnp.square(s - t) * pairs)
        per_layer.append(total / jnp.maximum(heads * jnp.sum(pairs), 1.0))
    return jnp.mean(jnp.stack(per_layer))

"""The divergence against the teacher's full logits, with a closed-form backward pass.

Autodiff of the plain formulas leaves XLA a chain of ``[tokens, vocab]`` intermediates (a GiB
or more at 8192 x 32768). Here the forward pass keeps per-token residuals only (each side's
softmax shift and sum, and what the divergence's gradient reuses), and the backward pass is the
definition's closed-form gradient (pipeline/losses/divergences.py): one elementwise pass over
the logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pipeline.losses.divergences import DEFINITIONS
from pipeline.losses.softmax import Softmax, scaled, softmax_parts


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def dense_divergence(student_logits: jax.Array, teacher_logits: jax.Array, temperature,
                     divergence: str, beta: float, valid_vocab_size: int | None) -> jax.Array:
    r"""Per-token divergence between ``softmax(t/T)`` and ``softmax(s/T)`` over the real ids.

    Args:
      student_logits, teacher_logits: ``[..., vocab]``, any float dtype (math in float32);
        the teacher's may be −inf (p = 0: those terms count 0).
      temperature: T, a float32 scalar (traced or not).
      divergence: a name of the table, already resolved for ``beta``
        (:func:`pipeline.losses.divergences.resolve`).
      beta: the JSD weight, a Python float.
      valid_vocab_size: ids from it on are padding (``restrict_to_vocab``); ``None``: none.
    Returns:
      ``[...]`` float32, not clamped at 0; differentiable in the student's logits only.
    """
    return _dense_divergence_fwd(student_logits, teacher_logits, temperature, divergence,
                                 beta, valid_vocab_size)[0]


def _dense_divergence_fwd(student_logits, teacher_logits, temperature, divergence, beta,
                          valid_vocab_size):
    # Zero-probability terms (padding columns, -inf teacher logits) count 0 (xlogx_ratio).
    z_s, z_t = _scaled_pair(student_logits, teacher_logits, temperature, valid_vocab_size)
    student, teacher = Softmax(z_s, *softmax_parts(z_s)), Softmax(z_t, *softmax_parts(z_t))
    div, reused = DEFINITIONS[divergence].value(teacher.log_probs(), student.log_probs(), beta)
    parts = (student.shift, student.total), (teacher.shift, teacher.total)
    return div, (student_logits, teacher_logits, temperature, parts, reused)


def _dense_divergence_bwd(divergence, beta, valid_vocab_size, residuals, cotangent):
    student_logits, teacher_logits, temperature, parts, reused = residuals
    z_s, z_t = _scaled_pair(student_logits, teacher_logits, temperature, valid_vocab_size)
    student, teacher = Softmax(z_s, *parts[0]), Softmax(z_t, *parts[1])
    # d/dz for z = s/T; all 0 where q_v = p_v = 0 (padding columns: constant −inf logits).
    grad = DEFINITIONS[divergence].student_grad(student, teacher, reused, beta)
    grad = grad * (cotangent / temperature)[..., None]
    return grad.astype(student_logits.dtype), None, jnp.zeros_like(temperature)


dense_divergence.defvjp(_dense_divergence_fwd, _dense_divergence_bwd)


def _scaled_pair(student_logits, teacher_logits, temperature, valid_vocab_size):
    return (scaled(student_logits, temperature, valid_vocab_size),
            scaled(teacher_logits, temperature, valid_vocab_size))


@jax.custom_jvp
def clamp_rounding(divergence: jax.Array) -> jax.Array:
    """``max(div, 0)`` in value, the identity in derivative.

    An exact divergence is ≥ 0; the clamp only removes float32 rounding below 0, so the
    gradient stays the divergence's own, and a gradient-only program (``jax.grad``) need not
    compute the divergence's value at all.
    """
    return jnp.maximum(divergence, 0.0)


@clamp_rounding.defjvp
def _clamp_rounding_jvp(primals, tangents):
    return clamp_rounding(*primals), tangents[0]

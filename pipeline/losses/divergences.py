r"""The divergences: one small definition each, and the table of them by name.

A definition says, for teacher p and student q over the last axis (the vocabulary, or the
k+1 buckets of top-k targets), what the per-token divergence is and how its gradient with
respect to the student's scaled logits :math:`z = s/T` (:math:`q = \operatorname{softmax}(z)`)
is computed in closed form. The dense, top-k, sampled and fused-head paths read the table
and nothing else, so a new divergence is one definition added to :data:`DEFINITIONS` (and
the name to ``LossConfig.divergence`` in pipeline/config/training.py, which stays free of
JAX; tests/test_losses.py checks that the two agree).

The definitions, with m the β-mixture of p and q:

.. math::
    \mathrm{forward\_kl} &= \sum_v p_v (\log p_v - \log q_v) \\
    \mathrm{reverse\_kl} &= \sum_v q_v (\log q_v - \log p_v) \\
    \mathrm{jsd}_\beta &= \beta \sum_v p_v (\log p_v - \log m_v)
        + (1-\beta) \sum_v q_v (\log q_v - \log m_v), \quad m = \beta p + (1-\beta) q

``jsd`` is the generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024); β = 0.5
is the symmetric JSD. At the endpoints the mixture degenerates (the formula tends to 0 like
β·KL(p‖q) as β→0 and (1−β)·KL(q‖p) as β→1), so, as in GKD's reference code, **β = 0 is the
forward KL** KL(p‖q) and **β = 1 the reverse KL** KL(q‖p) (``Divergence.endpoints``).
Terms of zero probability count 0 (with finite gradients).
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pipeline.losses.softmax import Softmax, xlogx_ratio


class Divergence(NamedTuple):
    """One divergence D(p‖q): its per-token value and its closed-form student gradient.

    ``value(log_p, log_q, beta)`` takes ``[..., n]`` float32 log-probabilities of teacher and
    student and returns ``(divergence [...], residual)``: the residual is what
    ``student_grad`` reuses from the forward pass (or ``None``).

    ``student_grad(student, teacher, residual, beta)`` takes the two softmaxes over the
    vocabulary (:class:`~pipeline.losses.softmax.Softmax`, teacher constant) and returns
    ``dD/dz`` ``[..., vocab]`` for the student's scaled logits z: the dense path's backward
    pass, one elementwise pass over the logits with no ``[tokens, vocab]`` residual.

    ``from_samples(weights, log_q_at_ids, teacher_entropy)``, when given, is an unbiased
    estimate from ids drawn from the teacher (``weights`` = draw counts / draws,
    ``[..., n]``), in value and in gradient; ``None``: sampled targets are refused.

    ``endpoints`` maps values of β at which this divergence *is* another one to that one's name.
    """

    value: Callable[[jax.Array, jax.Array, float], tuple[jax.Array, jax.Array | None]]
    student_grad: Callable[[Softmax, Softmax, jax.Array | None, float], jax.Array]
    from_samples: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None
    endpoints: Mapping[float, str] = types.MappingProxyType({})


def _student_side_grad(student: Softmax, log_reference: jax.Array,
                       student_side: jax.Array) -> jax.Array:
    r"""``d/dz Σ_v q_v (log q_v − log r_v)`` for an r whose own dependence on z adds nothing:
    :math:`q_v (\log q_v - \log r_v - \sum_u q_u (\log q_u - \log r_u))`, 0 where
    :math:`q_v = 0` (padding columns: their logits are constants, −inf)."""
    log_q = student.log_probs()
    return jnp.where(log_q != -jnp.inf,
                     jnp.exp(log_q) * (log_q - log_reference - student_side[..., None]), 0.0)


# --------------------------------------------------------------------------- forward KL


def _forward_kl_value(log_p, log_q, beta):
    return jnp.sum(xlogx_ratio(log_p, log_q), axis=-1), None


def _forward_kl_grad(student, teacher, residual, beta):
    # d/dz Σ p (log p − log q) = q − p; the forward's exp(z − shift) terms again (XLA merges
    # them), so the gradient needs no third and fourth exp.
    return student.probs() - teacher.probs()


def _forward_kl_from_samples(weights, log_q_at_ids, teacher_entropy):
    # −Σ_j (c_j/n) log q_{y_j} estimates the cross-entropy −Σ_v p_v log q_v (E[c_j/n] = p_{y_j});
    # minus the teacher's entropy H it estimates KL(p‖q), in value and in gradient.
    return -jnp.sum(weights * log_q_at_ids, axis=-1) - teacher_entropy


FORWARD_KL = Divergence(_forward_kl_value, _forward_kl_grad, _forward_kl_from_samples)

# --------------------------------------------------------------------------- reverse KL


def _reverse_kl_value(log_p, log_q, beta):
    student_side = jnp.sum(xlogx_ratio(log_q, log_p), axis=-1)
    return student_side, student_side


def _reverse_kl_grad(student, teacher, student_side, beta):
    # r = p does not depend on the student.
    return _student_side_grad(student, teacher.log_probs(), student_side)


REVERSE_KL = Divergence(_reverse_kl_value, _reverse_kl_grad)

# --------------------------------------------------------------------------- generalized JSD


def _log_mixture(log_p, log_q, beta):
    return jnp.logaddexp(math.log(beta) + log_p, math.log1p(-beta) + log_q)


def _jsd_value(log_p, log_q, beta):
    log_m = _log_mixture(log_p, log_q, beta)
    student_side = jnp.sum(xlogx_ratio(log_q, log_m), axis=-1)
    teacher_side = jnp.sum(xlogx_ratio(log_p, log_m), axis=-1)
    return beta * teacher_side + (1.0 - beta) * student_side, student_side


def _jsd_grad(student, teacher, student_side, beta):
    # Through m the two sides' terms cancel (β p_v/m_v + (1−β) q_v/m_v = 1 and Σ dm = 0), so
    # only the student side's own term is left, weighted 1 − β.
    log_m = _log_mixture(teacher.log_probs(), student.log_probs(), beta)
    return (1.0 - beta) * _student_side_grad(student, log_m, student_side)


JSD = Divergence(_jsd_value, _jsd_grad,
                 endpoints=types.MappingProxyType({0.0: "forward_kl", 1.0: "reverse_kl"}))

# --------------------------------------------------------------------------- the table

DEFINITIONS: Mapping[str, Divergence] = types.MappingProxyType({
    "forward_kl": FORWARD_KL,
    "reverse_kl": REVERSE_KL,
    "jsd": JSD,
})
DIVERGENCES: tuple[str, ...] = tuple(DEFINITIONS)  # the valid names, in the table's order


def resolve(divergence: str, beta: float) -> str:
    """The name of the definition that computes ``divergence`` (a name of :data:`DIVERGENCES`)
    at ``beta``: itself, or what it is at one of its endpoints."""
    return DEFINITIONS[divergence].endpoints.get(beta, divergence)


def token_divergence(student_logprobs: jax.Array, teacher_logprobs: jax.Array,
                     divergence: str = "forward_kl", beta: float = 0.5) -> jax.Array:
    r"""Per-token divergence between two distributions given as log-probabilities.

    The definitions and their math are this module's (its docstring): with :math:`p` the
    teacher, :math:`q` the student, over the last axis (the vocabulary, or the k+1 buckets
    of top-k targets), ``forward_kl`` = KL(p‖q), ``reverse_kl`` = KL(q‖p), ``jsd`` the
    generalized JSD with weight β (β = 0: the forward KL, β = 1: the reverse KL).

    Args:
      student_logprobs: ``[..., n]`` float32 log q (normalised over the last axis).
      teacher_logprobs: ``[..., n]`` float32 log p.
      divergence: a name of :data:`DIVERGENCES`.
      beta: the JSD weight in [0, 1]; a Python float.
    Returns:
      ``[...]`` float32.
    """
    definition = DEFINITIONS[resolve(divergence, beta)]
    return definition.value(teacher_logprobs, student_logprobs, beta)[0]

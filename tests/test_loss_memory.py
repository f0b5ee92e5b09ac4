"""XLA temp memory of the dense distillation loss, forward + backward, vs the plain jnp formula.

Compile only (``memory_analysis`` of the lowered program): nothing is allocated. At
[1, 4096, 8192] XLA's CPU backend runs the plain formula's gradient as one kernel with no
temporaries; ours must not need more, with one long sequence (batch 1) or several.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipeline import losses
from pipeline.losses import softmax

TEMPERATURE = 4.0


def plain_loss(student, teacher):
    """T² · mean KL(softmax(t/T) ‖ softmax(s/T)) as jnp writes it, autodiff for the gradient."""
    t = teacher.astype(jnp.float32) / TEMPERATURE
    s = student.astype(jnp.float32) / TEMPERATURE
    kl = jnp.sum(jax.nn.softmax(t) * (jax.nn.log_softmax(t) - jax.nn.log_softmax(s)), axis=-1)
    return TEMPERATURE ** 2 * jnp.mean(kl)


def ours_loss(student, teacher):
    return losses.distillation_loss(student, teacher, temperature=TEMPERATURE)[0]


def temp_bytes(loss, differentiate, shape, dtype) -> int:
    logits = jax.ShapeDtypeStruct(shape, dtype)
    compiled = jax.jit(differentiate(loss)).lower(logits, logits).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("differentiate", [jax.grad, jax.value_and_grad],
                         ids=["grad", "value_and_grad"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(1, 4096, 8192), (4, 1024, 8192)], ids=["batch1", "batch4"])
def test_temp_memory_no_bigger_than_plain_formula(shape, dtype, differentiate):
    ours = temp_bytes(ours_loss, differentiate, shape, dtype)
    plain = temp_bytes(plain_loss, differentiate, shape, dtype)
    assert ours <= plain, (f"{shape} {dtype}: ours needs {ours / 2**20:.1f} MiB of XLA temp, "
                           f"the plain formula {plain / 2**20:.1f} MiB")


def test_logsumexp_matches_float64_on_rows_with_infinite_entries():
    # The rows' max is clamped from below, not selected by isfinite (see softmax.softmax_parts):
    # an all -inf row still gives -inf, -inf entries count 0, large finite logits stay exact.
    rng = np.random.default_rng(7)
    z = rng.normal(size=(5, 33)) * 40.0
    z[1, :10] = -np.inf
    z[2, :] = -np.inf
    z[3, 0] = 3.0e38
    z[4, :] = -3.0e38
    got = np.asarray(softmax.logsumexp(jnp.asarray(z, jnp.float32)), np.float64)
    with np.errstate(divide="ignore"):
        m = np.where(np.isfinite(z.max(-1)), z.max(-1), 0.0)
        want = m + np.log(np.exp(z - m[:, None]).sum(-1))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    grad = jax.grad(lambda x: softmax.logsumexp(x)[0:2].sum())(jnp.asarray(z, jnp.float32))
    ref = np.exp(z[:2] - want[:2, None])
    np.testing.assert_allclose(np.asarray(grad)[:2], ref, rtol=1e-5, atol=1e-7)


TOPK_SHAPE, TOPK_K, TOPK_PADDING = (2, 512, 8192), 64, 64


def topk_loss(valid_vocab_size):
    def loss(student, ids, logprobs, tail_logmass):
        targets = losses.TopKTargets(ids, logprobs, tail_logmass)
        return losses.targets_distillation_loss(student, targets, temperature=TEMPERATURE,
                                                valid_vocab_size=valid_vocab_size)[0]
    return loss


@pytest.mark.parametrize("padded", [False, True], ids=["full_head", "padded_head"])
@pytest.mark.parametrize("differentiate", [lambda f: f, jax.value_and_grad],
                         ids=["forward", "value_and_grad"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_topk_temp_memory_is_per_token_plus_one_float32_copy_at_most(dtype, differentiate,
                                                                     padded):
    """The exact top-k tail (losses.topk_bucket_logprobs) needs no [tokens, vocab] temporary
    in float32 (no membership mask, no masked copy of the logits): XLA temp <= 1/8 of the
    logits plus 32 bytes per candidate of the tail's max (the student's k + 1 + padding
    largest logits). Other dtypes may add one float32 copy of the logits (their upcast)."""
    *tokens, vocab = TOPK_SHAPE
    valid = vocab - TOPK_PADDING if padded else None
    shapes = (jax.ShapeDtypeStruct(TOPK_SHAPE, dtype),
              jax.ShapeDtypeStruct((*tokens, TOPK_K), jnp.int32),
              jax.ShapeDtypeStruct((*tokens, TOPK_K), jnp.float32),
              jax.ShapeDtypeStruct(tuple(tokens), jnp.float32))
    compiled = jax.jit(differentiate(topk_loss(valid))).lower(*shapes).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    float32_copy = 4 * np.prod(TOPK_SHAPE)
    candidates = np.prod(tokens) * (TOPK_K + 1 + (TOPK_PADDING if padded else 0))
    bound = float32_copy // 8 + 32 * candidates + (0 if dtype == "float32" else float32_copy)
    assert temp <= bound, (f"{TOPK_SHAPE} k={TOPK_K} {dtype} valid_vocab_size={valid}: "
                           f"{temp / 2**20:.1f} MiB of XLA temp, bound {bound / 2**20:.1f} MiB")

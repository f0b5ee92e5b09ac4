"""pipeline.losses.fused_head against the unchunked loss on materialised logits (and float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipeline import losses
from pipeline.errors import ConfigError, KdpipeError
from pipeline.losses import fused_head, fused_head_distillation_loss
from test_losses import ref_buckets, ref_divergence, ref_topk_grad

BATCH, SEQ, HIDDEN, VOCAB = 2, 7, 8, 30  # 14 tokens: chunks of 4 leave a ragged last chunk


def make_case(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(BATCH, SEQ, HIDDEN)), dtype)
    head = jnp.asarray(rng.normal(size=(VOCAB, HIDDEN)) * 0.7, dtype)
    teacher = jnp.asarray(rng.normal(size=(BATCH, SEQ, VOCAB)) * 3, jnp.float32)
    labels = rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32)
    labels[0, 1] = labels[1, 3] = -100
    attention = np.ones((BATCH, SEQ), np.int32)
    attention[1, 5:] = 0
    return hidden, head, teacher, jnp.asarray(attention), jnp.asarray(labels)


def all_targets(teacher, temperature):
    log_p = jax.nn.log_softmax(teacher / temperature)
    ids = jnp.argsort(-log_p, axis=-1)[..., :5].astype(jnp.int32)
    logprobs = jnp.take_along_axis(log_p, ids, -1)
    topk = losses.TopKTargets(ids, logprobs, jnp.log1p(-jnp.exp(logprobs).sum(-1)))
    counts = jnp.asarray(np.random.default_rng(1).integers(0, 4, ids.shape), jnp.float32)
    sampled = losses.SampledTargets(ids, counts.at[..., 0].add(1.0),
                                    -(jnp.exp(log_p) * log_p).sum(-1))
    return [losses.DenseTargets(teacher), topk, sampled]


CASES = [(kind, divergence) for kind in range(3)
         for divergence in (("forward_kl", "reverse_kl", "jsd") if kind < 2 else ("forward_kl",))]


@pytest.mark.parametrize("kind,divergence", CASES)
def test_fused_equals_unchunked_in_value_and_gradients(kind, divergence):
    hidden, head, teacher, attention, labels = make_case()
    temperature = 2.0
    targets = all_targets(teacher, temperature)[kind]

    def unchunked(h, w):
        return losses.targets_distillation_loss(h @ w.T, targets, attention, labels, True,
                                                temperature, 0.7, divergence=divergence)

    def fused(h, w, chunk_size):
        return fused_head_distillation_loss(h, w, targets, attention, labels, True, temperature,
                                            0.7, divergence=divergence, chunk_size=chunk_size)

    (want, want_metrics), want_grads = jax.value_and_grad(unchunked, (0, 1), has_aux=True)(
        hidden, head)
    # A ragged last chunk everywhere; an exact split and one chunk larger than the token count
    # once (they share the code path, so once is enough).
    chunk_sizes = (4, 14, 64) if (kind, divergence) == (0, "forward_kl") else (4,)
    for chunk_size in chunk_sizes:
        (got, got_metrics), got_grads = jax.jit(
            jax.value_and_grad(fused, (0, 1), has_aux=True), static_argnums=2)(
                hidden, head, chunk_size)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
        assert set(got_metrics) == set(want_metrics)
        for key in want_metrics:
            np.testing.assert_allclose(float(got_metrics[key]), float(want_metrics[key]),
                                       rtol=1e-5, atol=1e-6, err_msg=key)
        for g, w in zip(got_grads, want_grads):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)


def test_fused_head_gradient_in_ragged_vocab_blocks(monkeypatch):
    """The head gradient is accumulated in vocab blocks; 30 = 4 x 7 + 2 leaves a ragged one."""
    monkeypatch.setattr(fused_head, "_VOCAB_BLOCK", 7)
    hidden, head, teacher, attention, labels = make_case(4)
    targets = all_targets(teacher, 1.0)[1]

    def loss(fn):
        return jax.grad(lambda w: fn(w)[0])(head)

    got = loss(lambda w: fused_head.fused_head_distillation_loss(
        hidden, w, targets, attention, labels, True, 1.0, 0.5, chunk_size=5))
    want = loss(lambda w: losses.targets_distillation_loss(
        hidden @ w.T, targets, attention, labels, True, 1.0, 0.5))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)


def test_fused_forward_only_and_without_labels():
    hidden, head, teacher, attention, _ = make_case(2)
    targets = losses.DenseTargets(teacher)
    got, metrics = jax.jit(lambda h, w: fused_head_distillation_loss(
        h, w, targets, attention, chunk_size=3))(hidden, head)
    want, want_metrics = losses.distillation_loss(hidden @ head.T, teacher, attention)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    assert "ce_loss" not in metrics and set(metrics) == set(want_metrics)


def test_fused_bf16_inputs_match_float64_head():
    """bf16 hidden/head: logits are formed in f32, so the loss matches f64 logits closely."""
    hidden, head, teacher, attention, labels = make_case(3, jnp.bfloat16)
    targets = losses.DenseTargets(teacher)
    got, grads = jax.value_and_grad(lambda h, w: fused_head_distillation_loss(
        h, w, targets, attention, labels, True, 1.0, 0.5, chunk_size=4)[0], (0, 1))(hidden, head)
    logits = (np.asarray(hidden, np.float64) @ np.asarray(head, np.float64).T).astype(np.float32)
    want = losses.distillation_loss(logits, teacher, attention, labels, True, 1.0, 0.5)[0]
    np.testing.assert_allclose(float(got), float(want), rtol=1e-4)
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
    assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)


def test_fused_never_holds_the_logits():
    """XLA temp memory stays far below one [tokens, vocab] f32 logits array."""
    tokens, hidden_size, vocab = 512, 64, 4096
    h = jax.ShapeDtypeStruct((1, tokens, hidden_size), jnp.float32)
    w = jax.ShapeDtypeStruct((vocab, hidden_size), jnp.float32)
    t = jax.ShapeDtypeStruct((1, tokens, vocab), jnp.float32)

    def fused(h, w, t):
        return fused_head_distillation_loss(h, w, losses.DenseTargets(t), chunk_size=64)[0]

    def materialised(h, w, t):
        return losses.distillation_loss(h @ w.T, t)[0]

    def temp_bytes(f):
        compiled = jax.jit(jax.value_and_grad(f, (0, 1))).lower(h, w, t).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    fused_bytes = temp_bytes(fused)
    assert fused_bytes < tokens * vocab * 4
    assert fused_bytes < temp_bytes(materialised) / 4


def test_fused_bad_inputs():
    hidden, head, teacher, attention, labels = make_case()
    targets = losses.DenseTargets(teacher)
    cases = [
        (lambda: fused_head_distillation_loss(hidden, head[:, :5], targets), KdpipeError,
         r"hidden width 5.*width 8"),
        (lambda: fused_head_distillation_loss(hidden, head[:20], targets), KdpipeError,
         r"teacher_logits.*vocab 20"),
        (lambda: fused_head_distillation_loss(hidden[0], head, targets), KdpipeError,
         r"\[batch, seq, hidden\]"),
        (lambda: fused_head_distillation_loss(hidden, head, targets, chunk_size=0), ConfigError,
         r"chunk_size.*0"),
        (lambda: fused_head_distillation_loss(hidden, head, targets, temperature=0.0),
         ConfigError, r"temperature"),
        (lambda: fused_head_distillation_loss(hidden, head, targets, use_hard_labels=True),
         KdpipeError, r"labels"),
    ]
    for call, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            call()


@pytest.mark.parametrize("kind,divergence", [(0, "reverse_kl"), (1, "jsd"), (2, "forward_kl")])
def test_fused_equals_unchunked_with_a_padded_vocab(kind, divergence):
    """valid_vocab_size = 25 of 30: teacher at -1e9 on the padding (a full-mode cache)."""
    hidden, head, teacher, attention, labels = make_case(5)
    real = 25
    teacher = jnp.where(jnp.arange(VOCAB) < real, teacher, -1e9)
    labels = jnp.where(labels == -100, -100, labels % real)
    targets = all_targets(teacher, 2.0)[kind]
    common = dict(attention_mask=attention, labels=labels, use_hard_labels=True,
                  temperature=2.0, alpha=0.7, divergence=divergence, valid_vocab_size=real)

    (want, want_metrics), want_grads = jax.value_and_grad(
        lambda h, w: losses.targets_distillation_loss(h @ w.T, targets, **common), (0, 1),
        has_aux=True)(hidden, head)
    (got, got_metrics), got_grads = jax.jit(jax.value_and_grad(
        lambda h, w: fused_head_distillation_loss(h, w, targets, **common, chunk_size=4), (0, 1),
        has_aux=True))(hidden, head)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for key in want_metrics:
        np.testing.assert_allclose(float(got_metrics[key]), float(want_metrics[key]),
                                   rtol=1e-5, atol=1e-6, err_msg=key)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_topk_confident_student_matches_float64(dtype):
    """Logits up to about ±80, the teacher's top 4 = the student's: loss and gradients vs
    float64. Hidden states on a quarter grid and a ternary head make every logit exact in
    float32 (and the inputs exact in bf16), so this measures the loss, not the matmul."""
    rng = np.random.default_rng(11)
    vocab, width, tokens = 64, 8, 14
    head64 = rng.integers(-1, 2, (vocab, width)).astype(np.float64)
    hidden64 = np.clip(np.round(rng.normal(size=(1, tokens, width)) * 8 * 4) / 4, -31.75, 31.75)
    logits64 = hidden64 @ head64.T
    assert np.abs(logits64).max() <= 80
    ids = np.argsort(-logits64, axis=-1)[..., :4].astype(np.int32)
    logprobs = np.broadcast_to(np.log([0.6, 0.1, 0.1, 0.1]), ids.shape)
    tail = np.full((1, tokens), np.log(0.1))
    targets = losses.TopKTargets(jnp.asarray(ids), jnp.asarray(logprobs, jnp.float32),
                                 jnp.asarray(tail, jnp.float32))
    grad_rtol = 1e-5 if dtype == jnp.float32 else 2.0 ** -8 + 1e-5
    for divergence in losses.DIVERGENCES:
        loss_and_grads = jax.jit(jax.value_and_grad(
            lambda h, w, temperature: fused_head_distillation_loss(
                h, w, targets, temperature=temperature, alpha=1.0, divergence=divergence,
                chunk_size=4)[0], (0, 1)))
        for temperature in (1.0, 2.0, 4.0):
            loss, (d_hidden, d_head) = loss_and_grads(
                jnp.asarray(hidden64, dtype), jnp.asarray(head64, dtype), temperature)
            student_b, teacher_b, _, _ = ref_buckets(logits64, ids, logprobs, tail, temperature)
            scale = temperature ** 2 / tokens
            want = scale * ref_divergence(student_b, teacher_b, divergence, 0.5).sum()
            d_logits = scale * ref_topk_grad(logits64, ids, logprobs, tail, temperature,
                                             divergence)
            where = f"{divergence} {jnp.dtype(dtype).name} T={temperature}"
            np.testing.assert_allclose(float(loss), want, rtol=1e-5, err_msg=where)
            for got, want_grad in ((d_hidden, d_logits @ head64), (d_head, d_logits[0].T @
                                                                    hidden64[0])):
                got = np.asarray(got.astype(jnp.float32), np.float64)
                np.testing.assert_allclose(got, want_grad, rtol=grad_rtol,
                                           atol=1e-6 * np.abs(want_grad).max(), err_msg=where)

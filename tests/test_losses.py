"""pipeline.losses against an independent float64 numpy reference, on random inputs."""

from __future__ import annotations

import doctest
import functools
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipeline import losses
from pipeline.config import LossConfig
from pipeline.errors import ConfigError, KdpipeError
from pipeline.losses import DenseTargets, SampledTargets, TopKTargets, distill

# --------------------------------------------------------------------------- float64 reference


def ref_restrict(x, valid=None):
    """x in float64 with the ids from ``valid`` on (padding columns) at -inf."""
    x = np.asarray(x, np.float64)
    if valid is None:
        return x
    return np.where(np.arange(x.shape[-1]) < valid, x, -np.inf)


def ref_logsumexp(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


def ref_log_softmax(x, valid=None):
    x = ref_restrict(x, valid)
    return x - ref_logsumexp(x)[..., None]


def ref_kl(log_a, log_b):
    """Σ a (log a − log b) with 0 log 0 = 0."""
    a = np.exp(log_a)
    with np.errstate(invalid="ignore"):
        terms = np.where(a > 0, a * (log_a - log_b), 0.0)
    return terms.sum(-1)


def ref_divergence(log_q, log_p, divergence, beta):
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return ref_kl(log_p, log_q)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return ref_kl(log_q, log_p)
    with np.errstate(divide="ignore"):
        log_m = np.log(beta * np.exp(log_p) + (1 - beta) * np.exp(log_q))
    return beta * ref_kl(log_p, log_m) + (1 - beta) * ref_kl(log_q, log_m)


def ref_combine(div, ce, entropy, agree, mask, use_hard, temperature, alpha):
    n = max(mask.sum(), 1.0)
    kl_loss = temperature ** 2 * (div * mask).sum() / n
    metrics = {"kl_loss": kl_loss, "teacher_entropy": (entropy * mask).sum() / n,
               "top1_agreement": (agree * mask).sum() / n}
    loss = alpha * kl_loss
    if ce is not None:
        metrics["ce_loss"] = (ce * mask).sum() / n
        if use_hard:
            loss += (1 - alpha) * metrics["ce_loss"]
    return loss, metrics


def ref_mask(shape, attention_mask, labels):
    mask = np.ones(shape)
    if attention_mask is not None:
        mask = mask * attention_mask
    if labels is not None:
        mask = mask * (labels != -100)
    return mask


def ref_ce(s, labels):
    log_q1 = ref_log_softmax(s)
    safe = np.where(labels == -100, 0, labels)
    return np.where(labels == -100, 0.0, -np.take_along_axis(log_q1, safe[..., None], -1)[..., 0])


def ref_dense(s, t, attention_mask=None, labels=None, use_hard=False, temperature=4.0, alpha=0.9,
              divergence="forward_kl", beta=0.5, valid=None):
    """The loss over the real ids (< valid) for the divergence; CE over all ids."""
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    log_q = ref_log_softmax(s / temperature, valid)
    log_p = ref_log_softmax(t / temperature, valid)
    div = ref_divergence(log_q, log_p, divergence, beta)
    entropy = -ref_kl(log_p, np.zeros_like(log_p))
    agree = (ref_restrict(s, valid).argmax(-1) == ref_restrict(t, valid).argmax(-1))
    ce = None if labels is None else ref_ce(s, labels)
    return ref_combine(div, ce, entropy, agree.astype(np.float64),
                       ref_mask(s.shape[:-1], attention_mask, labels), use_hard, temperature, alpha)


def ref_buckets(s, ids, logprobs, tail, temperature, valid=None):
    """Student and teacher log-probs over the k+1 top-k buckets, float64; also log q.

    The student's tail is summed over the ids outside the top k directly (no 1 - sum).
    """
    log_q = ref_log_softmax(np.asarray(s, np.float64) / temperature, valid)
    outside = np.ones(log_q.shape, bool)
    np.put_along_axis(outside, np.asarray(ids), False, -1)
    q_tail = ref_logsumexp(np.where(outside, log_q, -np.inf))
    tail = np.asarray(tail, np.float64)
    q_tail = np.where(np.isneginf(tail), -np.inf, q_tail)
    student = np.concatenate([np.take_along_axis(log_q, ids, -1), q_tail[..., None]], -1)
    teacher = np.concatenate([np.asarray(logprobs, np.float64), tail[..., None]], -1)
    return student, teacher, log_q, outside


def ref_topk(s, ids, logprobs, tail, attention_mask=None, labels=None, use_hard=False,
             temperature=4.0, alpha=0.9, divergence="forward_kl", beta=0.5, valid=None):
    s = np.asarray(s, np.float64)
    student, teacher, _, _ = ref_buckets(s, ids, logprobs, tail, temperature, valid)
    div = ref_divergence(student, teacher, divergence, beta)
    entropy = -ref_kl(teacher, np.zeros_like(teacher))
    top = np.take_along_axis(ids, logprobs.argmax(-1)[..., None], -1)[..., 0]
    agree = (ref_restrict(s, valid).argmax(-1) == top).astype(np.float64)
    ce = None if labels is None else ref_ce(s, labels)
    return ref_combine(div, ce, entropy, agree, ref_mask(s.shape[:-1], attention_mask, labels),
                       use_hard, temperature, alpha)


def ref_topk_grad(s, ids, logprobs, tail, temperature, divergence, beta=0.5, valid=None):
    """d div / d s of one top-k divergence per token, float64, through the bucket Jacobian.

    With g_b = d div / d log q_b (the buckets taken as free variables),
    d log q_j / d z_v = [v = id_j] - q_v and d log q_tail / d z_v = [v outside] q_v / q_tail - q_v.
    At the student's argmax, g_j - q_j sum(g) cancels even in float64 when q_j ~ 1, so that
    entry is taken from shift invariance instead: the gradient sums to 0 over the ids.
    """
    student, teacher, log_q, outside = ref_buckets(s, ids, logprobs, tail, temperature, valid)
    q_b = np.exp(student)
    with np.errstate(divide="ignore", invalid="ignore"):
        if divergence == "forward_kl":
            g = -np.exp(teacher)
        elif divergence == "reverse_kl":
            g = np.where(q_b > 0, q_b * (student - teacher + 1.0), 0.0)
        else:
            log_m = np.log(beta * np.exp(teacher) + (1 - beta) * q_b)
            g = np.where(q_b > 0, (1 - beta) * q_b * (student - log_m), 0.0)
    q = np.exp(log_q)
    grad = -q * g.sum(-1, keepdims=True)
    with np.errstate(over="ignore", invalid="ignore"):
        tail_share = np.where(outside, np.exp(log_q - student[..., -1:]), 0.0)
        grad += np.where(np.isneginf(student[..., -1:]), 0.0, g[..., -1:] * tail_share)
    for index in np.ndindex(ids.shape[:-1]):
        np.add.at(grad[index], ids[index], g[index][:-1])
        top = np.argmax(log_q[index])
        grad[index][top] = -(grad[index][:top].sum() + grad[index][top + 1:].sum())
    return grad / temperature


def numeric_grad(f, x, eps=1e-6):
    x = np.asarray(x, np.float64).copy()
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        orig = x[i]
        x[i] = orig + eps
        up = f(x)
        x[i] = orig - eps
        down = f(x)
        x[i] = orig
        grad[i] = (up - down) / (2 * eps)
    return grad


# --------------------------------------------------------------------------- inputs


def make_inputs(seed, shape, *, pad=True, ignore=True, scale=3.0):
    rng = np.random.default_rng(seed)
    batch, seq, vocab = shape
    s = (rng.normal(size=shape) * scale).astype(np.float32)
    t = (rng.normal(size=shape) * scale).astype(np.float32)
    labels = rng.integers(0, vocab, size=(batch, seq)).astype(np.int32)
    if ignore:
        labels[rng.random((batch, seq)) < 0.3] = -100
    attention = np.ones((batch, seq), np.int32)
    if pad:
        for b in range(batch):
            attention[b, rng.integers(1, seq + 1):] = 0
    return s, t, attention, labels


@functools.lru_cache(maxsize=None)
def jitted_dense(divergence, use_hard, with_mask, with_labels, beta=0.5):
    def f(s, t, attention, labels, temperature, alpha):
        return losses.distillation_loss(
            s, t, attention if with_mask else None, labels if with_labels else None,
            use_hard, temperature, alpha, divergence=divergence, beta=beta)
    return jax.jit(f)


@functools.lru_cache(maxsize=None)
def jitted_value_and_grad(loss_fn, divergence="forward_kl", use_hard=False, beta=0.5, valid=None):
    """``f(s, teacher, attention, labels, temperature, alpha) -> ((loss, metrics), d loss / d s)``
    of ``loss_fn`` (distillation_loss, teacher logits; or targets_distillation_loss, targets),
    jitted once per options: taken eagerly, a gradient compiles each primitive apart, several
    times the work of one program."""
    def f(s, teacher, attention, labels, temperature, alpha):
        return loss_fn(s, teacher, attention, labels, use_hard, temperature, alpha,
                       divergence=divergence, beta=beta, valid_vocab_size=valid)
    return jax.jit(jax.value_and_grad(f, has_aux=True))


def check_metrics(got, want, rtol=2e-5, atol=2e-6):
    got_loss, got_metrics = got
    want_loss, want_metrics = want
    assert set(got_metrics) == set(want_metrics)
    np.testing.assert_allclose(float(got_loss), want_loss, rtol=rtol, atol=atol)
    for key, value in want_metrics.items():
        np.testing.assert_allclose(float(got_metrics[key]), value, rtol=rtol, atol=atol,
                                   err_msg=key)


# --------------------------------------------------------------------------- dense


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("shape,use_hard,with_mask,with_labels",
                         [((2, 5, 17), True, True, True), ((2, 5, 17), False, True, False),
                          ((2, 5, 17), False, False, False), ((2, 5, 17), False, False, True),
                          ((3, 4, 64), True, True, True)])
def test_dense_matches_reference(shape, divergence, use_hard, with_mask, with_labels):
    s, t, attention, labels = make_inputs(100 * shape[-1] + losses.DIVERGENCES.index(divergence),
                                          shape)
    f = jitted_dense(divergence, use_hard, with_mask, with_labels)
    for temperature in (1.0, 2.0, 4.0):
        for alpha in (0.0, 0.5, 0.9, 1.0):
            got = f(s, t, attention, labels, temperature, alpha)
            want = ref_dense(s, t, attention if with_mask else None,
                             labels if with_labels else None, use_hard, temperature, alpha,
                             divergence)
            check_metrics(got, want)


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5),
                                             ("jsd", 0.5), ("jsd", 0.1)])
def test_dense_gradient_matches_numeric_reference(divergence, beta):
    s, t, attention, labels = make_inputs(7, (2, 3, 9))
    temperature, alpha = 2.0, 0.7
    _, grad = jitted_value_and_grad(losses.distillation_loss, divergence, True, beta)(
        s, t, attention, labels, temperature, alpha)
    want = numeric_grad(lambda x: ref_dense(x, t, attention, labels, True, temperature, alpha,
                                            divergence, beta)[0], s)
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-3, atol=1e-6)


def test_gradient_does_not_reach_teacher():
    s, t, attention, labels = make_inputs(3, (2, 3, 11))
    grad = jax.grad(lambda x: losses.distillation_loss(s, x, attention, labels)[0])(t)
    assert not np.any(np.asarray(grad))


def test_jsd_endpoints_are_forward_and_reverse_kl():
    """β = 0 is KL(teacher‖student), β = 1 is KL(student‖teacher); inside, JSD/β → forward KL."""
    s, t, attention, labels = make_inputs(11, (2, 4, 13))
    for beta, same_as in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        got = losses.distillation_loss(s, t, attention, divergence="jsd", beta=beta)[0]
        want = ref_dense(s, t, attention, divergence=same_as)[0]
        np.testing.assert_allclose(float(got), want, rtol=1e-5)
    small = 1e-4
    near = losses.distillation_loss(s, t, attention, temperature=1.0, divergence="jsd",
                                    beta=small)[0]
    forward = ref_dense(s, t, attention, temperature=1.0)[0]
    np.testing.assert_allclose(float(near) / small, forward, rtol=0.01)


def test_masked_equals_sliced():
    s, t, _, labels = make_inputs(5, (2, 6, 20), ignore=False)
    attention = np.ones((2, 6), np.int32)
    attention[:, 4:] = 0
    for divergence in losses.DIVERGENCES:
        masked = losses.distillation_loss(s, t, attention, labels, True, 2.0, 0.5,
                                          divergence=divergence)
        sliced = losses.distillation_loss(s[:, :4], t[:, :4], None, labels[:, :4], True, 2.0,
                                          0.5, divergence=divergence)
        check_metrics(masked, (float(sliced[0]), {k: float(v) for k, v in sliced[1].items()}),
                      rtol=1e-6)


def test_all_masked_tokens_give_zero_not_nan():
    s, t, attention, labels = make_inputs(2, (1, 3, 7))
    loss, metrics = losses.distillation_loss(s, t, np.zeros_like(attention), labels, True)
    assert float(loss) == 0.0 and all(float(v) == 0.0 for v in metrics.values())


def test_bf16_inputs_kl_nonnegative_and_close():
    rng = np.random.default_rng(4)
    shape = (4, 8, 96)
    s = jnp.asarray(rng.normal(size=shape) * 4, jnp.bfloat16)
    t = s + jnp.asarray(rng.normal(size=shape) * 1e-2, jnp.bfloat16)  # nearly identical
    for divergence in losses.DIVERGENCES:
        per_token = losses.token_losses(s, DenseTargets(t), temperature=1.0,
                                        divergence=divergence).divergence
        assert np.all(np.asarray(per_token) >= 0.0), divergence
        loss = losses.distillation_loss(s, t, temperature=1.0, alpha=1.0,
                                        divergence=divergence)[0]
        want = ref_dense(np.asarray(s.astype(jnp.float32)), np.asarray(t.astype(jnp.float32)),
                         temperature=1.0, alpha=1.0, divergence=divergence)[0]
        np.testing.assert_allclose(float(loss), want, rtol=1e-3, atol=1e-7)


def naive_forward_kl(student, teacher, temperature=4.0):
    """The textbook formula, for the memory comparison below."""
    p = jax.nn.softmax(teacher.astype(jnp.float32) / temperature)
    log_q = jax.nn.log_softmax(student.astype(jnp.float32) / temperature)
    log_p = jax.nn.log_softmax(teacher.astype(jnp.float32) / temperature)
    return temperature ** 2 * jnp.mean(jnp.sum(p * (log_p - log_q), axis=-1))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xla_temp_memory_no_larger_than_naive(dtype):
    shape = jax.ShapeDtypeStruct((64, 4096), dtype)

    def temp_bytes(f):
        compiled = jax.jit(jax.value_and_grad(f)).lower(shape, shape).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    ours = temp_bytes(lambda s, t: losses.distillation_loss(s, t)[0])
    assert ours <= temp_bytes(naive_forward_kl)


# --------------------------------------------------------------------------- sparse targets


def topk_targets(t, k, temperature):
    log_p = ref_log_softmax(np.asarray(t, np.float64) / temperature)
    ids = np.argsort(-log_p, axis=-1)[..., :k].astype(np.int32)
    logprobs = np.take_along_axis(log_p, ids, -1)
    tail = np.log1p(-np.exp(logprobs).sum(-1)) if k < t.shape[-1] else np.full(t.shape[:-1],
                                                                               -np.inf)
    return TopKTargets(jnp.asarray(ids), jnp.asarray(logprobs, jnp.float32),
                       jnp.asarray(tail, jnp.float32))


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_with_k_equal_vocab_equals_dense(divergence):
    """Also when the teacher's tail is rounding residue (1e-7) instead of exactly -inf."""
    s, t, attention, labels = make_inputs(21, (2, 5, 12))
    exact = topk_targets(t, 12, 2.0)

    dense = jitted_value_and_grad(losses.distillation_loss, divergence, True)
    sparse = jitted_value_and_grad(losses.targets_distillation_loss, divergence, True)
    (want, want_m), want_grad = dense(s, t, attention, labels, 2.0, 0.8)
    residue = exact._replace(tail_logmass=jnp.full_like(exact.tail_logmass, np.log(1e-7)))
    for targets in (exact, residue):
        (got, got_m), got_grad = sparse(s, targets, attention, labels, 2.0, 0.8)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
        for key in ("kl_loss", "ce_loss", "teacher_entropy", "top1_agreement"):
            np.testing.assert_allclose(float(got_m[key]), float(want_m[key]), rtol=1e-5,
                                       err_msg=key)
        assert np.all(np.isfinite(got_grad))
        np.testing.assert_allclose(np.asarray(got_grad), np.asarray(want_grad), atol=1e-6)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("k", [1, 4])
def test_topk_tail_matches_reference(divergence, k):
    s, t, attention, labels = make_inputs(30 + k, (2, 4, 40), scale=2.0)
    for temperature in (1.0, 2.0, 4.0):
        targets = topk_targets(t, k, temperature)
        reference = functools.partial(
            ref_topk, ids=np.asarray(targets.ids), logprobs=np.asarray(targets.logprobs),
            tail=np.asarray(targets.tail_logmass), attention_mask=attention, labels=labels,
            use_hard=True, temperature=temperature, alpha=0.6, divergence=divergence, beta=0.3)
        (value, metrics), grad = jitted_value_and_grad(
            losses.targets_distillation_loss, divergence, True, 0.3)(
                s, targets, attention, labels, temperature, 0.6)
        check_metrics((value, metrics), reference(s), rtol=1e-4)
        want = numeric_grad(lambda x: reference(x)[0], s)
        np.testing.assert_allclose(np.asarray(grad), want, rtol=2e-3, atol=1e-6,
                                   err_msg=f"T={temperature}")


def test_topk_tail_is_finite_for_a_confident_student():
    """Rounding can put the student's covered mass at 1: the tail stays finite."""
    s = np.zeros((1, 1, 8), np.float32)
    s[..., 0] = 60.0
    targets = TopKTargets(jnp.array([[[0]]], jnp.int32), jnp.array([[[-0.5]]]),
                          jnp.array([[np.log1p(-np.exp(-0.5))]], jnp.float32))
    for divergence in losses.DIVERGENCES:
        value, grad = jax.value_and_grad(lambda x: losses.targets_distillation_loss(
            x, targets, temperature=1.0, divergence=divergence)[0])(s)
        assert np.isfinite(float(value)) and np.all(np.isfinite(grad)), divergence


CONFIDENT_TOPS = (15.0, 20.0, 25.0, 40.0, 80.0)


def confident_student_case(dtype=jnp.float32, vocab=1000, seed=0):
    """One token per value of ``top``, the student's logit at id 0 (the rest N(0, 1), but -top
    at a teacher id and at a tail id); the teacher's top 4 are ids 0-3 with probabilities
    0.6, 0.1, 0.1, 0.1 and a tail of 0.1. Logits are rounded to ``dtype``.

    Returns ``(student logits in dtype, TopKTargets, the rounded logits in float64)``.
    """
    rng = np.random.default_rng(seed)
    tops = np.asarray(CONFIDENT_TOPS)
    s = rng.normal(size=(1, len(tops), vocab))
    s[..., 0], s[..., 3], s[..., vocab // 2] = tops, -tops, -tops
    student = jnp.asarray(s, dtype)
    ids = np.broadcast_to(np.arange(4, dtype=np.int32), (1, len(tops), 4))
    logprobs = np.broadcast_to(np.log([0.6, 0.1, 0.1, 0.1]), ids.shape)
    targets = TopKTargets(jnp.asarray(ids), jnp.asarray(logprobs, jnp.float32),
                          jnp.full((1, len(tops)), np.log(0.1), jnp.float32))
    return student, targets, np.asarray(student.astype(jnp.float32), np.float64)


@functools.lru_cache(maxsize=None)
def _jitted_topk_divergence_and_grad(divergence, beta):
    def total(x, targets, temperature):
        div = losses.token_losses(x, targets, temperature=temperature, divergence=divergence,
                                  beta=beta).divergence
        return jnp.sum(div), div
    return jax.jit(jax.value_and_grad(total, has_aux=True))


def topk_divergence_and_grad(student, targets, temperature, divergence, beta=0.5):
    """Per-token top-k divergence and its gradient w.r.t. each token's logits (jitted once
    per divergence and beta, whatever the temperature)."""
    (_, div), grad = _jitted_topk_divergence_and_grad(divergence, beta)(student, targets,
                                                                        temperature)
    return np.asarray(div), np.asarray(grad.astype(jnp.float32), np.float64)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_confident_student_matches_float64(divergence, dtype):
    """The student's tail mass (down to e^-160) and its gradient have float32 accuracy:
    1e-5 relative against float64 of the same (rounded) logits; a bf16 gradient is within
    bf16 rounding of the float64 one."""
    student, targets, s64 = confident_student_case(dtype)
    ids, logprobs, tail = (np.asarray(x) for x in targets)
    grad_rtol = 1e-5 if dtype == jnp.float32 else 2.0 ** -8 + 1e-5
    for temperature in (1.0, 2.0, 4.0):
        div, grad = topk_divergence_and_grad(student, targets, temperature, divergence, 0.3)
        student_b, teacher_b, _, _ = ref_buckets(s64, ids, logprobs, tail, temperature)
        want_div = ref_divergence(student_b, teacher_b, divergence, 0.3)
        want_grad = ref_topk_grad(s64, ids, logprobs, tail, temperature, divergence, 0.3)
        where = f"{divergence} {jnp.dtype(dtype).name} T={temperature}"
        np.testing.assert_allclose(div, want_div, rtol=1e-5, err_msg=where)
        scale = np.abs(want_grad).max(-1, keepdims=True)
        assert np.all(np.abs(grad - want_grad) <= grad_rtol * np.abs(want_grad) + 1e-7 * scale), (
            where, np.max(np.abs(grad - want_grad) / (np.abs(want_grad) + 1e-7 * scale)))
        # The gradient along the tail (every logit outside the top 4 moved together).
        np.testing.assert_allclose(grad[..., 4:].sum(-1), want_grad[..., 4:].sum(-1),
                                   rtol=grad_rtol, err_msg=where)


def test_topk_float64_gradient_reference_is_the_numeric_one():
    """ref_topk_grad (the bucket Jacobian) against central differences of ref_topk."""
    s, t, _, _ = make_inputs(8, (1, 2, 12), scale=2.0)
    targets = topk_targets(t, 3, 2.0)
    ids, logprobs, tail = (np.asarray(x) for x in targets)
    for divergence in losses.DIVERGENCES:
        want = numeric_grad(lambda x: ref_topk(x, ids, logprobs, tail, temperature=2.0, alpha=1.0,
                                               divergence=divergence, beta=0.3)[0], s)
        got = ref_topk_grad(s, ids, logprobs, tail, 2.0, divergence, 0.3) * 4.0 / 2  # T² / N
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9, err_msg=divergence)



@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_topk_tail_when_padding_and_ids_hold_the_students_largest_logits(dtype):
    """The tail's max is taken among the student's k + 1 + padding largest logits: padding
    columns above everything, the teacher's ids above a tail 60 lower, ties among the ids and
    at the tail's max, the student's largest real logit in the tail. Divergence and gradient
    against float64 of the same (rounded) logits."""
    vocab, real = 48, 40
    s = np.random.default_rng(31).normal(size=(1, 4, vocab)) - 60.0
    s[..., real:] = 50.0
    s[0, 0, :6] = (30.0, 30.0, 20.0, 20.0, 10.0, 10.0)
    s[0, 1, [3, 2, 1, 0, 9]] = 5.0
    s[0, 2, [7, 0, 5, 2, 1]] = (3.0, 2.0, 1.0, 2.5, 0.5)
    s[0, 3, :4] = (8.0, 7.0, 6.0, 5.0)
    ids = np.array([[[0, 1, 2, 3], [3, 2, 1, 0], [0, 5, 2, 1], [2, 0, 3, 1]]], np.int32)
    logprobs = np.broadcast_to(np.log([0.6, 0.1, 0.1, 0.1]), ids.shape)
    tail = np.full(ids.shape[:-1], np.log(0.1))
    targets = TopKTargets(jnp.asarray(ids), jnp.asarray(logprobs, jnp.float32),
                          jnp.asarray(tail, jnp.float32))
    student = jnp.asarray(s, dtype)
    s64 = np.asarray(student.astype(jnp.float32), np.float64)
    grad_rtol = 1e-5 if dtype == jnp.float32 else 2.0 ** -8 + 1e-5
    for divergence, temperature in (("forward_kl", 1.0), ("reverse_kl", 2.0), ("jsd", 1.0)):
        def total(x):
            div = losses.token_losses(x, targets, temperature=temperature, divergence=divergence,
                                      beta=0.3, valid_vocab_size=real).divergence
            return jnp.sum(div), div

        (_, div), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(student)
        grad = np.asarray(grad.astype(jnp.float32), np.float64)
        student_b, teacher_b, _, _ = ref_buckets(s64, ids, logprobs, tail, temperature, real)
        want_grad = ref_topk_grad(s64, ids, logprobs, tail, temperature, divergence, 0.3, real)
        where = f"{divergence} {jnp.dtype(dtype).name} T={temperature}"
        np.testing.assert_allclose(np.asarray(div), ref_divergence(student_b, teacher_b,
                                                                   divergence, 0.3),
                                   rtol=1e-5, err_msg=where)
        scale = np.abs(want_grad).max(-1, keepdims=True)
        assert np.all(np.abs(grad - want_grad) <= grad_rtol * np.abs(want_grad) + 1e-7 * scale), (
            where, np.max(np.abs(grad - want_grad) / (np.abs(want_grad) + 1e-7 * scale)))


def draw_samples(rng, t, temperature, n_draws, n_slots):
    log_p = ref_log_softmax(np.asarray(t, np.float64) / temperature)
    p = np.exp(log_p)
    entropy = -(p * log_p).sum(-1)
    ids = np.zeros(t.shape[:-1] + (n_slots,), np.int32)
    counts = np.zeros(t.shape[:-1] + (n_slots,), np.float32)
    for index in np.ndindex(t.shape[:-1]):
        drawn = rng.choice(t.shape[-1], size=n_draws, p=p[index] / p[index].sum())
        unique, count = np.unique(drawn, return_counts=True)
        ids[index][:len(unique)] = unique
        counts[index][:len(unique)] = count
    return ids, counts, entropy.astype(np.float32)


def test_sampled_is_unbiased_for_loss_and_gradient():
    s, t, attention, labels = make_inputs(40, (2, 3, 10), scale=1.5)
    temperature, n_draws, n_rounds = 2.0, 6, 800
    rng = np.random.default_rng(0)
    draws = [draw_samples(rng, t, temperature, n_draws, n_draws) for _ in range(n_rounds)]
    ids, counts, entropy = (np.stack(x) for x in zip(*draws))

    def sampled(x, ids, counts, entropy):
        return losses.targets_distillation_loss(x, SampledTargets(ids, counts, entropy),
                                                attention, labels, False, temperature, 1.0)[0]

    values, grads = jax.jit(jax.vmap(jax.value_and_grad(sampled), (None, 0, 0, 0)))(
        s, ids, counts, entropy)
    (dense, _), dense_grad = jitted_value_and_grad(losses.distillation_loss)(
        s, t, attention, labels, temperature, 1.0)
    stderr = np.std(values) / np.sqrt(n_rounds)
    assert abs(np.mean(values) - float(dense)) < 4 * stderr + 1e-6
    grad_stderr = np.std(grads, axis=0) / np.sqrt(n_rounds)
    assert np.all(np.abs(np.mean(grads, axis=0) - dense_grad) < 4.5 * grad_stderr + 1e-6)
    # One draw: the metrics are the documented ones.
    _, metrics = losses.targets_distillation_loss(
        s, SampledTargets(ids[0], counts[0], entropy[0]), attention, labels, False, temperature)
    mask = ref_mask(s.shape[:-1], attention, labels)
    most_drawn = np.take_along_axis(ids[0], counts[0].argmax(-1)[..., None], -1)[..., 0]
    agree = (s.argmax(-1) == most_drawn).astype(np.float64)
    np.testing.assert_allclose(float(metrics["top1_agreement"]),
                               (agree * mask).sum() / mask.sum(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["teacher_entropy"]),
                               (entropy[0] * mask).sum() / mask.sum(), rtol=1e-5)


def test_the_config_offers_the_table_divergences():
    # pipeline.config stays free of JAX (a host actor refuses a jax imported before it set
    # JAX_PLATFORMS), so LossConfig spells the names; they must be the table's keys.
    divergence = typing.get_type_hints(LossConfig)["divergence"]
    assert typing.get_args(divergence) == losses.DIVERGENCES


def test_sampled_refuses_other_divergences():
    s, t, _, _ = make_inputs(1, (1, 2, 5))
    targets = SampledTargets(jnp.zeros((1, 2, 3), jnp.int32), jnp.ones((1, 2, 3)),
                             jnp.ones((1, 2)))
    for divergence in ("reverse_kl", "jsd"):
        with pytest.raises(ConfigError, match="divergence.*sampled.*forward_kl"):
            losses.targets_distillation_loss(s, targets, divergence=divergence)


def test_targets_from_batch():
    ids = np.zeros((1, 2, 3), np.int32)
    batch = {"teacher_topk_ids": ids, "teacher_topk_logprobs": ids.astype(np.float32),
             "teacher_tail_logmass": np.zeros((1, 2), np.float32), "input_ids": ids[..., 0]}
    assert isinstance(losses.targets_from_batch(batch), TopKTargets)
    assert isinstance(losses.targets_from_batch({"teacher_logits": ids}), DenseTargets)
    with pytest.raises(KdpipeError, match="exactly one kind"):
        losses.targets_from_batch({"input_ids": ids})
    with pytest.raises(KdpipeError, match="exactly one kind"):
        losses.targets_from_batch({**batch, "teacher_logits": ids})
    with pytest.raises(KdpipeError, match="missing.*teacher_entropy"):
        losses.targets_from_batch({"teacher_sample_ids": ids, "teacher_sample_counts": ids})


# --------------------------------------------------------------------------- padded vocabularies

REAL_V, PADDED_V = 13, 16


def padded_case(seed):
    """Logits over a head padded past the tokenizer: ids >= REAL_V are padding.

    Returns student logits (its argmax on a padded id at token [0, 0]), the teacher's real
    logits, the teacher as a full-mode cache stores it (-1e9 at padding), mask and labels.
    """
    s, t, attention, labels = make_inputs(seed, (2, 3, PADDED_V))
    labels = np.where(labels == -100, -100, labels % REAL_V).astype(np.int32)
    s[0, 0, REAL_V + 1] = s[0, 0].max() + 5.0
    full_mode = np.where(np.arange(PADDED_V) < REAL_V, t, -1e9).astype(np.float32)
    return s, t, full_mode, attention, labels


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_padded_vocab_dense_matches_reference_over_real_ids(divergence):
    """Teacher at -1e9 (a full-mode cache) or -inf on the padding: the divergence, entropy and
    top-1 agreement are those over the real ids; the CE is over the full logits."""
    s, t, full_mode, attention, labels = padded_case(60 + losses.DIVERGENCES.index(divergence))
    minus_inf = np.where(np.arange(PADDED_V) < REAL_V, t, -np.inf).astype(np.float32)
    loss = jitted_value_and_grad(losses.distillation_loss, divergence, True, 0.3, REAL_V)
    for teacher in (full_mode, minus_inf):
        for temperature in (1.0, 2.0):
            (value, metrics), grad = loss(s, teacher, attention, labels, temperature, 0.7)
            reference = functools.partial(ref_dense, t=t, attention_mask=attention,
                                          labels=labels, use_hard=True, temperature=temperature,
                                          alpha=0.7, divergence=divergence, beta=0.3,
                                          valid=REAL_V)
            check_metrics((value, metrics), reference(s), rtol=1e-5)
            want = numeric_grad(lambda x: reference(x)[0], s)
            np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-3, atol=1e-6)


def test_minus_inf_teacher_logits_count_zero_without_valid_vocab_size():
    """p = 0 terms of the forward KL and the JSD count 0 (no nan), whatever the id."""
    s, t, attention, labels = make_inputs(64, (2, 3, 10))
    t[..., 7:] = -np.inf
    for divergence in ("forward_kl", "jsd"):
        (value, metrics), grad = jitted_value_and_grad(
            losses.distillation_loss, divergence, True)(s, t, attention, labels, 2.0, 0.7)
        check_metrics((value, metrics), ref_dense(s, t, attention, labels, True, 2.0, 0.7,
                                                  divergence), rtol=1e-5)
        assert np.all(np.isfinite(np.asarray(grad))), divergence


def test_nan_inputs_give_a_nan_loss_and_gradient():
    """The zero-probability rule (-inf log-probs count 0) never hides a poisoned input."""
    s, t, _, _ = make_inputs(66, (1, 2, 9))
    bad_t = t.copy()
    bad_t[0, 0, 3] = np.nan
    bad_s = s.copy()
    bad_s[0, 1, 2] = np.nan
    good = topk_targets(t, 3, 1.0)
    poisoned = [DenseTargets(bad_t), good._replace(logprobs=good.logprobs.at[0, 0, 1].set(np.nan)),
                good._replace(tail_logmass=good.tail_logmass.at[0, 0].set(np.nan))]
    for divergence in losses.DIVERGENCES:
        loss = jitted_value_and_grad(losses.targets_distillation_loss, divergence)
        for targets in poisoned:
            (value, _), grad = loss(s, targets, None, None, 1.0, 0.9)
            assert np.isnan(float(value)), (divergence, type(targets).__name__)
        for targets in (DenseTargets(t), good):
            _, grad = loss(bad_s, targets, None, None, 1.0, 0.9)
            assert np.any(np.isnan(np.asarray(grad))), (divergence, type(targets).__name__)


def padded_sparse_targets(t, temperature):
    """Top-k (k = 4) and sampled targets of the teacher restricted to the real ids."""
    log_p = ref_log_softmax(np.asarray(t, np.float64) / temperature, REAL_V)
    ids = np.argsort(-log_p, axis=-1)[..., :4].astype(np.int32)
    logprobs = np.take_along_axis(log_p, ids, -1)
    outside = np.ones(log_p.shape, bool)
    np.put_along_axis(outside, ids, False, -1)
    tail = ref_logsumexp(np.where(outside, log_p, -np.inf))
    topk = TopKTargets(jnp.asarray(ids), jnp.asarray(logprobs, jnp.float32),
                       jnp.asarray(tail, jnp.float32))
    counts = np.random.default_rng(5).integers(1, 4, ids.shape).astype(np.float32)
    entropy = -ref_kl(log_p, np.zeros_like(log_p))
    sampled = SampledTargets(jnp.asarray(ids), jnp.asarray(counts),
                             jnp.asarray(entropy, jnp.float32))
    return topk, sampled


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_padded_vocab_sparse_targets_match_reference_over_real_ids(divergence):
    s, t, _, attention, labels = padded_case(70 + losses.DIVERGENCES.index(divergence))
    temperature = 2.0
    topk, sampled = padded_sparse_targets(t, temperature)
    ids, logprobs, tail = (np.asarray(x) for x in topk)

    loss = jitted_value_and_grad(losses.targets_distillation_loss, divergence, True, 0.3, REAL_V)
    (value, metrics), grad = loss(s, topk, attention, labels, temperature, 0.7)
    reference = functools.partial(ref_topk, ids=ids, logprobs=logprobs, tail=tail,
                                  attention_mask=attention, labels=labels, use_hard=True,
                                  temperature=temperature, alpha=0.7, divergence=divergence,
                                  beta=0.3, valid=REAL_V)
    check_metrics((value, metrics), reference(s), rtol=1e-5)
    want = numeric_grad(lambda x: reference(x)[0], s)
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-3, atol=1e-6)
    if divergence != "forward_kl":
        return
    (value, _), _ = loss(s, sampled, attention, labels, temperature, 0.7)
    log_q = ref_log_softmax(np.asarray(s, np.float64) / temperature, REAL_V)
    counts = np.asarray(sampled.counts, np.float64)
    div = (-(counts * np.take_along_axis(log_q, ids, -1)).sum(-1) / counts.sum(-1)
           - np.asarray(sampled.entropy, np.float64))
    agree = ref_restrict(s, REAL_V).argmax(-1) == ids[..., 0]
    want = ref_combine(div, ref_ce(s, labels), np.asarray(sampled.entropy, np.float64),
                       agree.astype(np.float64), ref_mask(s.shape[:-1], attention, labels), True,
                       temperature, 0.7)
    np.testing.assert_allclose(float(value), want[0], rtol=1e-5)


def test_padding_columns_get_no_kd_gradient():
    """Only the hard-label CE (over the full logits) reaches the padding columns."""
    s, t, full_mode, attention, labels = padded_case(80)
    topk, sampled = padded_sparse_targets(t, 1.0)
    for targets in (DenseTargets(full_mode), topk, sampled):
        for divergence in (("forward_kl",) if isinstance(targets, SampledTargets)
                           else losses.DIVERGENCES):
            def loss(x, alpha, use_hard):
                return losses.targets_distillation_loss(
                    x, targets, attention, labels, use_hard, 1.0, alpha, divergence=divergence,
                    valid_vocab_size=REAL_V)[0]

            where = f"{type(targets).__name__} {divergence}"
            kd_only = np.asarray(jax.grad(loss)(s, 1.0, False))
            assert np.all(np.isfinite(kd_only)), where
            assert np.all(kd_only[..., REAL_V:] == 0.0), where
            assert np.any(kd_only[..., :REAL_V] != 0.0), where
            mixed = np.asarray(jax.grad(loss)(s, 0.5, True))
            ce_only = np.asarray(jax.grad(lambda x: 0.5 * losses.masked_token_mean(
                losses.token_cross_entropy(x, labels), ref_mask(s.shape[:-1], attention,
                                                                labels)))(s))
            np.testing.assert_allclose(mixed[..., REAL_V:], ce_only[..., REAL_V:], rtol=1e-6,
                                       atol=1e-9, err_msg=where)


def test_restrict_to_vocab_and_valid_vocab_size_bounds():
    s, t, full_mode, attention, labels = padded_case(90)
    for dtype in (jnp.float32, jnp.bfloat16):
        got = losses.restrict_to_vocab(jnp.asarray(s, dtype), REAL_V)
        assert got.dtype == dtype
        np.testing.assert_array_equal(np.asarray(got, np.float64),
                                      ref_restrict(np.asarray(jnp.asarray(s, dtype), np.float64),
                                                   REAL_V))
    for valid in (None, PADDED_V, PADDED_V + 5):
        np.testing.assert_array_equal(np.asarray(losses.restrict_to_vocab(s, valid)), s)
    # A size at least the logits' width restricts nothing.
    plain = losses.distillation_loss(s, full_mode, attention, labels, True, 2.0, 0.5,
                                     divergence="jsd")
    for valid in (PADDED_V, PADDED_V + 5):
        wide = losses.distillation_loss(s, full_mode, attention, labels, True, 2.0, 0.5,
                                        divergence="jsd", valid_vocab_size=valid)
        assert float(wide[0]) == float(plain[0])
    for bad in (0, -3, 12.0, "13", True):
        with pytest.raises(ConfigError, match=rf"valid_vocab_size: expected None or an int >= 1"
                                              rf".*{bad!r}"):
            losses.distillation_loss(s, full_mode, valid_vocab_size=bad)


# --------------------------------------------------------------------------- small pieces


def test_loss_mask_and_masked_token_mean():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    attention = (rng.random((3, 4)) < 0.7).astype(np.int32)
    labels = np.where(rng.random((3, 4)) < 0.3, -100, 1)
    mask = losses.loss_mask(attention, labels, (3, 4))
    np.testing.assert_array_equal(np.asarray(mask), attention * (labels != -100))
    np.testing.assert_array_equal(np.asarray(losses.loss_mask(None, None, (3, 4))), 1.0)
    want = (x * np.asarray(mask)).sum() / max(np.asarray(mask).sum(), 1)
    np.testing.assert_allclose(float(losses.masked_token_mean(x, mask)), want, rtol=1e-6)
    np.testing.assert_allclose(float(losses.masked_token_mean(x, None)), x.mean(), rtol=1e-6)


def test_token_cross_entropy():
    s, _, _, labels = make_inputs(12, (2, 5, 9))
    np.testing.assert_allclose(np.asarray(losses.token_cross_entropy(s, labels)),
                               ref_ce(s, labels), rtol=1e-5, atol=1e-6)


def ref_hidden(student, teacher, mask, layers, loss):
    per_layer = []
    for i in layers:
        s, t = np.asarray(student[i], np.float64), np.asarray(teacher[i], np.float64)
        if loss == "mse":
            per_token = (((s - t) * mask[..., None]) ** 2).sum(-1)
        else:
            cos = (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
            per_token = (1 - cos) * mask
        per_layer.append(per_token.sum() / max(mask.sum(), 1))
    return np.mean(per_layer)


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_hidden_state_loss(loss):
    rng = np.random.default_rng(13)
    student = tuple(rng.normal(size=(2, 5, 6)).astype(np.float32) for _ in range(4))
    teacher = tuple(rng.normal(size=(2, 5, 6)).astype(np.float32) for _ in range(4))
    _, _, attention, _ = make_inputs(13, (2, 5, 3))
    got = losses.hidden_state_loss(student, teacher, attention, (1, -1), loss)
    np.testing.assert_allclose(float(got), ref_hidden(student, teacher, attention, (1, 3), loss),
                               rtol=1e-5)
    got = losses.hidden_state_loss(student, teacher, None, None, loss)
    np.testing.assert_allclose(float(got), ref_hidden(student, teacher, np.ones((2, 5)),
                                                      range(4), loss), rtol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_attention_loss(normalize):
    rng = np.random.default_rng(14)
    student = tuple(rng.random((2, 3, 5, 5)).astype(np.float32) for _ in range(3))
    teacher = tuple(rng.random((2, 3, 5, 5)).astype(np.float32) for _ in range(3))
    _, _, attention, _ = make_inputs(14, (2, 5, 3))
    want = []
    for i in (0, 2):
        s, t = np.asarray(student[i], np.float64), np.asarray(teacher[i], np.float64)
        keys = attention[:, None, None, :].astype(np.float64)
        if normalize:
            s = s * keys / (s * keys).sum(-1, keepdims=True)
            t = t * keys / (t * keys).sum(-1, keepdims=True)
        pairs = attention[:, None, :, None] * keys * np.ones((1, 3, 1, 1))
        want.append((((s - t) ** 2) * pairs).sum() / pairs.sum())
    got = losses.attention_loss(student, teacher, attention, (0, -1), normalize)
    np.testing.assert_allclose(float(got), np.mean(want), rtol=1e-5)


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_are_refused_with_names_and_values():
    s, t, attention, labels = make_inputs(0, (2, 3, 8))
    cases = [
        (lambda: losses.distillation_loss(s, t[..., :7]), KdpipeError, r"teacher_logits.*8.*7"),
        (lambda: losses.distillation_loss(s, t[:1]), KdpipeError, r"teacher_logits.*\(1, 3, 8\)"),
        (lambda: losses.distillation_loss(s, t, temperature=0.0), ConfigError,
         r"temperature.*> 0.*0\.0"),
        (lambda: losses.distillation_loss(s, t, temperature=-1), ConfigError, r"temperature.*-1"),
        (lambda: losses.distillation_loss(s, t, alpha=1.5), ConfigError, r"alpha.*\[0, 1\].*1\.5"),
        (lambda: losses.distillation_loss(s, t, alpha=-0.1), ConfigError, r"alpha.*-0\.1"),
        (lambda: losses.distillation_loss(s, t, use_hard_labels=True), KdpipeError,
         r"labels.*use_hard_labels"),
        (lambda: losses.distillation_loss(s, t, divergence="kl"), ConfigError,
         r"divergence.*'kl'"),
        (lambda: losses.distillation_loss(s, t, divergence="jsd", beta=2.0), ConfigError,
         r"beta.*\[0, 1\].*2\.0"),
        (lambda: losses.distillation_loss(s, t, attention[:, :2]), KdpipeError,
         r"attention_mask.*\(2, 3\).*\(2, 2\)"),
        (lambda: losses.distillation_loss(s, t, None, labels[:1]), KdpipeError,
         r"labels.*\(2, 3\).*\(1, 3\)"),
        (lambda: losses.targets_distillation_loss(
            s, TopKTargets(np.zeros((2, 3, 9), np.int32), np.zeros((2, 3, 9)), np.zeros((2, 3)))),
         KdpipeError, r"9 ids.*vocab 8"),
        (lambda: losses.targets_distillation_loss(
            s, TopKTargets(np.zeros((2, 3, 2), np.int32), np.zeros((2, 3, 2)), np.zeros((2,)))),
         KdpipeError, r"tail_logmass.*\(2, 3\).*\(2,\)"),
    ]
    hidden = tuple(np.ones((2, 3, 4), np.float32) for _ in range(3))
    wide = tuple(np.ones((2, 3, 6), np.float32) for _ in range(3))
    maps = tuple(np.ones((2, 2, 3, 3), np.float32) for _ in range(2))
    cases += [
        (lambda: losses.hidden_state_loss(hidden, hidden, layers=(3,)), KdpipeError,
         r"index 3 out of range.*3 entries"),
        (lambda: losses.hidden_state_loss(hidden, hidden, layers=(-4,)), KdpipeError,
         r"index -4 out of range"),
        (lambda: losses.hidden_state_loss(hidden, wide, layers=(0,)), KdpipeError,
         r"student hidden width 4.*teacher hidden width 6"),
        (lambda: losses.hidden_state_loss(hidden, hidden[:2]), KdpipeError,
         r"student 3 and teacher 2"),
        (lambda: losses.hidden_state_loss(hidden, hidden, loss="l1"), ConfigError, r"'l1'"),
        (lambda: losses.attention_loss(maps, maps, layers=(2,)), KdpipeError,
         r"attention layers: index 2 out of range.*2 entries"),
        (lambda: losses.attention_loss(maps, (np.ones((2, 4, 3, 3)),) * 2), KdpipeError,
         r"student shape \(2, 2, 3, 3\).*teacher shape \(2, 4, 3, 3\)"),
    ]
    for call, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            call()


def test_docstring_examples():
    assert doctest.testmod(distill).failed == 0

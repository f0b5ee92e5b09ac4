"""pipeline.losses against an independent float64 numpy reference, on random inputs."""

from __future__ import annotations

import doctest
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipeline import losses
from pipeline.errors import ConfigError, KdpipeError
from pipeline.losses import DenseTargets, SampledTargets, TopKTargets

# --------------------------------------------------------------------------- float64 reference


def ref_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


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
              divergence="forward_kl", beta=0.5):
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    log_q, log_p = ref_log_softmax(s / temperature), ref_log_softmax(t / temperature)
    div = ref_divergence(log_q, log_p, divergence, beta)
    entropy = -(np.exp(log_p) * log_p).sum(-1)
    agree = (s.argmax(-1) == t.argmax(-1)).astype(np.float64)
    ce = None if labels is None else ref_ce(s, labels)
    return ref_combine(div, ce, entropy, agree, ref_mask(s.shape[:-1], attention_mask, labels),
                       use_hard, temperature, alpha)


def ref_topk(s, ids, logprobs, tail, attention_mask=None, labels=None, use_hard=False,
             temperature=4.0, alpha=0.9, divergence="forward_kl", beta=0.5):
    s = np.asarray(s, np.float64)
    log_q = ref_log_softmax(s / temperature)
    q_ids = np.take_along_axis(log_q, ids, -1)
    q_tail = np.log1p(-np.exp(q_ids).sum(-1))
    tail = np.asarray(tail, np.float64)
    q_tail = np.where(np.isneginf(tail), -np.inf, q_tail)
    student = np.concatenate([q_ids, q_tail[..., None]], -1)
    teacher = np.concatenate([np.asarray(logprobs, np.float64), tail[..., None]], -1)
    div = ref_divergence(student, teacher, divergence, beta)
    entropy = -np.where(np.isneginf(teacher), 0.0, np.exp(teacher) * teacher).sum(-1)
    top = np.take_along_axis(ids, logprobs.argmax(-1)[..., None], -1)[..., 0]
    agree = (s.argmax(-1) == top).astype(np.float64)
    ce = None if labels is None else ref_ce(s, labels)
    return ref_combine(div, ce, entropy, agree, ref_mask(s.shape[:-1], attention_mask, labels),
                       use_hard, temperature, alpha)


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
    s, t, attention, labels = make_inputs(hash((shape, divergence)) % 1000, shape)
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
    grad = jax.grad(lambda x: losses.distillation_loss(
        x, t, attention, labels, True, temperature, alpha, divergence=divergence, beta=beta)[0])(s)
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
        want = losses.distillation_loss(s, t, attention, divergence=same_as)[0]
        np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
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
    s, t, attention, labels = make_inputs(21, (2, 5, 12))
    targets = topk_targets(t, 12, 2.0)

    def sparse(x):
        return losses.targets_distillation_loss(x, targets, attention, labels, True, 2.0, 0.8,
                                                divergence=divergence)

    def dense(x):
        return losses.distillation_loss(x, t, attention, labels, True, 2.0, 0.8,
                                        divergence=divergence)

    (got, got_m), got_grad = jax.value_and_grad(sparse, has_aux=True)(s)
    (want, want_m), want_grad = jax.value_and_grad(dense, has_aux=True)(s)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for key in ("kl_loss", "ce_loss", "teacher_entropy", "top1_agreement"):
        np.testing.assert_allclose(float(got_m[key]), float(want_m[key]), rtol=1e-5, err_msg=key)
    assert np.all(np.isfinite(got_grad))
    np.testing.assert_allclose(np.asarray(got_grad), np.asarray(want_grad), atol=1e-6)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("k", [1, 4])
def test_topk_tail_matches_reference(divergence, k):
    s, t, attention, labels = make_inputs(30 + k, (2, 4, 40), scale=2.0)
    for temperature in (1.0, 4.0):
        targets = topk_targets(t, k, temperature)
        got = losses.targets_distillation_loss(s, targets, attention, labels, True, temperature,
                                               0.6, divergence=divergence, beta=0.3)
        want = ref_topk(s, np.asarray(targets.ids), np.asarray(targets.logprobs),
                        np.asarray(targets.tail_logmass), attention, labels, True, temperature,
                        0.6, divergence, 0.3)
        check_metrics(got, want, rtol=1e-4)
    grad = jax.grad(lambda x: losses.targets_distillation_loss(
        x, targets, attention, labels, True, temperature, 0.6, divergence=divergence,
        beta=0.3)[0])(s)
    want = numeric_grad(lambda x: ref_topk(
        x, np.asarray(targets.ids), np.asarray(targets.logprobs),
        np.asarray(targets.tail_logmass), attention, labels, True, temperature, 0.6, divergence,
        0.3)[0], s)
    np.testing.assert_allclose(np.asarray(grad), want, rtol=2e-3, atol=1e-6)


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
    dense, dense_grad = jax.value_and_grad(lambda x: losses.distillation_loss(
        x, t, attention, labels, False, temperature, 1.0)[0])(s)
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
    assert doctest.testmod(losses).failed == 0

"""Tests of pipeline/step.py on the toy decoder: updates against a float64 reference, token-weighted
accumulation, chunked head, sparse targets, evaluation, non-finite skips, one compile,
data parallelism on two CPU devices, and a short distillation run."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from pipeline.errors import ConfigError, DataError, KdpipeError
from pipeline.step import (DistillLossConfig, LossMetrics, TrainState, distillation_step,
                           jit_distillation_step, lower_distillation_step)
from conftest import xla_flags
from toy_model import ToyDecoder

VOCAB, HIDDEN = 40, 16  # a vocab unlike any model width, for the [tokens, vocab] check
TESTS_DIR = Path(__file__).resolve().parent
# One object each: the optimizer is static in TrainState, so tests sharing a configuration
# share one compiled step (compiles dominate this file's run time).
SGD, ADAM = optax.sgd(0.1), optax.adam(0.01)
# The configuration shared by the live-teacher tests (reference, accumulation, chunked head)...
LIVE = dict(loss_config=DistillLossConfig(use_hard_labels=True), temperature=2.0, alpha=0.6,
            hidden_state_weight=0.3, hidden_state_layers=(1, -1), attention_weight=2.0,
            attention_layers=(0, -1), learning_rate_fn=optax.linear_schedule(0.1, 0.0, 10))
# ... and by the cached-teacher tests (dense, top-k, evaluation, non-finite).
CACHED = dict(temperature=2.0, loss_config=DistillLossConfig(use_hard_labels=True), alpha=0.8)


def student_state(tx=SGD, *, seed=0, tie_embeddings=False, num_layers=2) -> TrainState:
    model = ToyDecoder(VOCAB, HIDDEN, num_layers, tie_embeddings=tie_embeddings, seed=seed)
    return TrainState.create(model, tx)


@pytest.fixture(scope="module")
def teacher() -> TrainState:
    return TrainState.create(ToyDecoder(VOCAB, HIDDEN, num_layers=3, seed=100))


def make_batch(seed: int, lengths=(6, 3, 5, 1), seq: int = 6,
               left_padded_rows=(1,)) -> dict[str, np.ndarray]:
    """Random ids; row b has lengths[b] real tokens (right padded, or left padded if listed);
    labels are -100 on padding and on about a fifth of the real tokens."""
    rng = np.random.default_rng(seed)
    batch = len(lengths)
    mask = (np.arange(seq)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    for row in left_padded_rows:
        mask[row] = mask[row][::-1]
    labels = rng.integers(0, VOCAB, (batch, seq)).astype(np.int32)
    labels[(mask == 0) | (rng.random((batch, seq)) < 0.2)] = -100
    return {"input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int32),
            "attention_mask": mask, "labels": labels}


def live_batch() -> dict[str, np.ndarray]:
    """8 rows whose strided microbatches of 2 (rows s, s + 4) hold 2 to 12 real tokens."""
    return make_batch(1, lengths=(1, 6, 2, 6, 1, 6, 3, 5), left_padded_rows=(2, 7))


@jax.jit
def model_logits(state: TrainState, batch) -> jax.Array:
    """The logits [batch, seq, vocab] of ``state``'s model on ``batch``, jitted (run eagerly, a
    forward compiles each primitive apart)."""
    return state.model()(batch["input_ids"], batch["attention_mask"]).logits


def fresh(state: TrainState) -> TrainState:
    """A copy, since the jitted step donates (deletes) the state it is given."""
    return jax.tree.map(lambda x: x.copy(), state)


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64),
                                   rtol=rtol, atol=atol)


def assert_metrics_close(actual: LossMetrics, expected: LossMetrics, rtol=1e-5, atol=1e-6):
    assert actual.as_dict().keys() == expected.as_dict().keys()
    assert_trees_close(actual.as_dict(), expected.as_dict(), rtol, atol)


# ----------------------------------------------------------------------------- float64 reference


def _log_softmax64(x):
    x = x - jnp.max(x, axis=-1, keepdims=True)
    return x - jnp.log(jnp.sum(jnp.exp(x), axis=-1, keepdims=True))


def reference_objective(student, teacher, batch, *, temperature, alpha, hidden_weight,
                        hidden_layers, attention_weight, attention_layers):
    """pipeline/step.py's objective written out independently (x64, float64 params)."""
    s_out = student(batch["input_ids"], batch["attention_mask"], True, True)
    t_out = teacher(batch["input_ids"], batch["attention_mask"], True, True)
    attn = batch["attention_mask"].astype(jnp.float64)
    m = attn * (batch["labels"] != -100)
    n = jnp.maximum(jnp.sum(m), 1.0)
    log_q = _log_softmax64(s_out.logits / temperature)
    log_p = _log_softmax64(t_out.logits / temperature)
    p = jnp.exp(log_p)
    kl_loss = temperature ** 2 * jnp.sum(jnp.sum(p * (log_p - log_q), -1) * m) / n
    log_q1 = _log_softmax64(s_out.logits)
    safe = jnp.where(batch["labels"] == -100, 0, batch["labels"])
    ce = -jnp.take_along_axis(log_q1, safe[..., None], -1)[..., 0]
    ce_loss = jnp.sum(ce * m) / n
    hidden = jnp.mean(jnp.stack([
        jnp.sum(((s_out.hidden_states[i] - t_out.hidden_states[i]) * attn[..., None]) ** 2)
        / jnp.maximum(jnp.sum(attn), 1.0) for i in hidden_layers]))
    pairs = attn[:, None, :, None] * attn[:, None, None, :]
    heads = s_out.attentions[0].shape[1]
    attention = jnp.mean(jnp.stack([
        jnp.sum((s_out.attentions[i] - t_out.attentions[i]) ** 2 * pairs)
        / jnp.maximum(heads * jnp.sum(pairs), 1.0) for i in attention_layers]))
    loss = (alpha * kl_loss + (1 - alpha) * ce_loss + hidden_weight * hidden
            + attention_weight * attention)
    agree = jnp.argmax(s_out.logits, -1) == jnp.argmax(t_out.logits, -1)
    entropy = -jnp.sum(p * log_p, -1)
    return loss, {"kl_loss": kl_loss, "ce_loss": ce_loss, "hidden_state_loss": hidden,
                  "attention_loss": attention, "top1_agreement": jnp.sum(agree * m) / n,
                  "teacher_entropy": jnp.sum(entropy * m) / n, "num_tokens": jnp.sum(m)}


def test_step_matches_float64_reference_update(teacher):
    state = student_state(tie_embeddings=True)  # the head's gradient meets the embeddings' one
    batch = live_batch()
    new_state, metrics = jit_distillation_step(fresh(state), batch, teacher, **LIVE)
    options = dict(temperature=2.0, alpha=0.6, hidden_weight=0.3, hidden_layers=(1, -1),
                   attention_weight=2.0, attention_layers=(0, -1))

    @jax.jit
    def reference_update(params, teacher_params, batch):
        def objective(params):
            student = nnx.merge(state.graphdef, params, state.other)
            live_teacher = nnx.merge(teacher.graphdef, teacher_params, teacher.other)
            return reference_objective(student, live_teacher, batch, **options)

        (loss, ref_metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, _ = SGD.update(grads, SGD.init(params), params)
        return loss, ref_metrics, optax.apply_updates(params, updates), optax.tree.norm(grads)

    with jax.enable_x64(True):
        to64 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float64), tree)
        loss, ref_metrics, expected_params, grad_norm = jax.tree.map(np.asarray, reference_update(
            to64(state.params), to64(teacher.params), {k: jnp.asarray(v) for k, v in batch.items()}))
        assert expected_params["embedding"].dtype == np.float64

    assert ref_metrics["hidden_state_loss"] > 0.1 and ref_metrics["attention_loss"] > 1e-3
    np.testing.assert_allclose(metrics.loss, loss, rtol=1e-5)
    for name, value in ref_metrics.items():
        np.testing.assert_allclose(getattr(metrics, name), value, rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    np.testing.assert_allclose(metrics.grad_norm, grad_norm, rtol=1e-4)
    assert_trees_close(new_state.params, expected_params, rtol=1e-4, atol=1e-6)
    assert int(new_state.step) == 1 and int(metrics.skipped_updates) == 0
    np.testing.assert_allclose(metrics.learning_rate, 0.1)


def test_accumulation_is_token_weighted(teacher):
    batch, state = live_batch(), student_state(tie_embeddings=True)
    whole_state, whole = jit_distillation_step(fresh(state), batch, teacher, **LIVE)
    accumulated_state, accumulated = jit_distillation_step(fresh(state), batch, teacher,
                                                           gradient_accumulation_steps=4, **LIVE)
    assert_metrics_close(accumulated, whole, rtol=2e-5)
    assert_trees_close(accumulated_state.params, whole_state.params)
    expected = (0.6 * whole.kl_loss + 0.4 * whole.ce_loss + 0.3 * whole.hidden_state_loss
                + 2.0 * whole.attention_loss)
    np.testing.assert_allclose(whole.loss, expected, rtol=1e-6)
    m = (batch["attention_mask"] == 1) & (batch["labels"] != -100)
    assert int(whole.num_tokens) == int(m.sum())
    # Microbatch token counts differ several-fold, so averaging microbatch means (EasyDeL's way)
    # would weight tokens unequally and fail the comparisons above.
    counts = [int(m[s::4].sum()) for s in range(4)]
    assert max(counts) >= 3 * max(min(counts), 1), counts


def topk_batch(batch, teacher_logits, temperature, k):
    logprobs = np.asarray(jax.nn.log_softmax(teacher_logits / temperature), np.float32)
    ids = np.argsort(-logprobs, axis=-1)[..., :k].astype(np.int32)
    top = np.take_along_axis(logprobs, ids, -1)
    with np.errstate(divide="ignore"):  # k = vocab: no mass outside, log 0 = -inf
        tail = np.log1p(-np.minimum(np.exp(top.astype(np.float64)).sum(-1), 1.0))
    return {**batch, "teacher_topk_ids": ids, "teacher_topk_logprobs": top,
            "teacher_tail_logmass": tail.astype(np.float32)}


def sampled_batch(batch, teacher_logits, temperature, draws, seed=0):
    rng = np.random.default_rng(seed)
    probs = np.asarray(jax.nn.softmax(teacher_logits.astype(np.float64) / temperature))
    ids = np.zeros(probs.shape[:-1] + (draws,), np.int32)
    counts = np.zeros(ids.shape, np.float32)
    for index in np.ndindex(probs.shape[:-1]):
        p = probs[index] / probs[index].sum()
        unique, count = np.unique(rng.choice(VOCAB, draws, p=p), return_counts=True)
        ids[index][:len(unique)], counts[index][:len(unique)] = unique, count
    entropy = -np.sum(probs * np.log(probs), -1)
    return {**batch, "teacher_sample_ids": ids, "teacher_sample_counts": counts,
            "teacher_entropy": entropy.astype(np.float32)}


def random_teacher_logits(seed, batch):
    shape = batch["input_ids"].shape + (VOCAB,)
    return (3.0 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def test_dense_and_topk_with_k_equal_vocab_give_the_same_step():
    batch = make_batch(2)
    logits = random_teacher_logits(2, batch)
    state = student_state(ADAM)
    dense_state, dense = jit_distillation_step(fresh(state), {**batch, "teacher_logits": logits},
                                               None, **CACHED)
    topk_state, topk = jit_distillation_step(fresh(state), topk_batch(batch, logits, 2.0, VOCAB),
                                             None, **CACHED)
    assert_metrics_close(topk, dense, rtol=1e-5, atol=1e-6)
    assert_trees_close(topk_state.params, dense_state.params, atol=1e-6)
    assert_trees_close(topk_state.opt_state, dense_state.opt_state, atol=1e-6)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_padded_head_live_and_cached_teachers_give_the_same_step(teacher, divergence):
    """Heads padded past a tokenizer of ``real`` ids (Qwen-family): the live teacher's raw
    logits and a full-mode cache's (PADDED_LOGIT at padding) are the same targets, and the
    KL is the float64 divergence between the two models restricted to the real ids: finite
    for reverse KL and JSD too, where the padding would otherwise dominate."""
    from pipeline.cache import compress
    from pipeline.cache.format import TargetSpec
    from test_losses import ref_divergence, ref_log_softmax

    real = VOCAB - 8
    batch = make_batch(3)
    batch["input_ids"] %= real
    batch["labels"] = np.where(batch["labels"] == -100, -100, batch["labels"] % real)
    logits = model_logits(teacher, batch)
    spec = TargetSpec(mode="full", vocab_size=VOCAB, tokenizer_vocab_size=real,
                      value_dtype="float32", temperature=None)
    cached = compress.decode(compress.encode(logits, np.arange(len(logits)), spec), spec)
    options = dict(CACHED, loss_config=DistillLossConfig(
        divergence=divergence, use_hard_labels=True, valid_vocab_size=real))
    state = student_state(ADAM)
    live_state, live = jit_distillation_step(fresh(state), batch, teacher, **options)
    cached_state, from_cache = jit_distillation_step(fresh(state), {**batch, **cached}, None,
                                                     **options)
    assert_metrics_close(from_cache, live, rtol=1e-5, atol=1e-6)
    assert_trees_close(cached_state.params, live_state.params, atol=1e-6)

    student = np.asarray(model_logits(state, batch))
    t = options["temperature"]
    div = ref_divergence(ref_log_softmax(student[..., :real].astype(np.float64) / t),
                         ref_log_softmax(np.asarray(logits, np.float64)[..., :real] / t),
                         divergence, 0.5)
    m = batch["attention_mask"] * (batch["labels"] != -100)
    want = t ** 2 * np.sum(div * m) / np.sum(m)
    np.testing.assert_allclose(float(live.kl_loss), want, rtol=2e-5)


def test_chunked_head_matches_plain_logits(teacher):
    batch, state = live_batch(), student_state(tie_embeddings=True)
    options = dict(gradient_accumulation_steps=4, **LIVE)
    plain_state, plain = jit_distillation_step(fresh(state), batch, teacher, **options)
    chunked_state, chunked = jit_distillation_step(fresh(state), batch, teacher,
                                                   logits_chunk_size=5, **options)
    assert_metrics_close(chunked, plain, rtol=1e-5, atol=1e-6)
    assert_trees_close(chunked_state.params, plain_state.params, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sparse", [topk_batch, sampled_batch])
def test_chunked_head_with_sparse_targets_makes_no_tokens_by_vocab_array(sparse):
    batch = make_batch(3)
    batch = sparse(batch, random_teacher_logits(3, batch), 1.0, 5)
    state = student_state()

    def step_jaxpr(**options):
        return jax.make_jaxpr(lambda s, b: distillation_step(s, b, None, gradient_accumulation_steps=2,
                                                             **options))(state, batch).jaxpr

    def big_vocab_arrays(jaxpr):
        tokens_per_microbatch = batch["input_ids"].size // 2
        return [v.aval.shape for v in _all_vars(jaxpr)  # (parameters are [VOCAB, HIDDEN])
                if VOCAB in v.aval.shape and HIDDEN not in v.aval.shape
                and np.prod(v.aval.shape) >= tokens_per_microbatch * VOCAB]

    assert big_vocab_arrays(step_jaxpr()), "the plain step has [tokens, vocab] logits"
    assert not big_vocab_arrays(step_jaxpr(logits_chunk_size=5))


def _all_vars(jaxpr):
    for eqn in jaxpr.eqns:
        yield from (v for v in eqn.outvars if hasattr(v.aval, "shape"))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _all_vars(sub)


def test_eval_leaves_state_untouched_and_reports_the_same_metrics():
    batch = make_batch(4)
    batch["teacher_logits"] = random_teacher_logits(4, batch)
    state = student_state(ADAM)
    before = fresh(state)
    evaluated_state, evaluated = jit_distillation_step(fresh(state), batch, None,
                                                       is_training=False, **CACHED)
    _, trained = jit_distillation_step(fresh(state), batch, None, **CACHED)
    assert_trees_close(evaluated_state, before, rtol=0, atol=0)
    assert evaluated.grad_norm is None and evaluated.skipped_updates is None
    loss_metrics = {k: v for k, v in trained.as_dict().items()
                    if k not in ("grad_norm", "skipped_updates", "empty_batches")}
    assert_trees_close(evaluated.as_dict(), loss_metrics)


def test_non_finite_loss_skips_the_update_and_is_counted():
    batch = make_batch(5)
    logits = random_teacher_logits(5, batch)
    poisoned = logits.copy()
    poisoned[0, 0, 3] = np.nan
    state = student_state(ADAM)
    before = fresh(state)
    skipped_state, skipped = jit_distillation_step(
        fresh(state), {**batch, "teacher_logits": poisoned}, None, **CACHED)
    assert int(skipped.skipped_updates) == 1 and not np.isfinite(skipped.loss)
    assert_trees_close(skipped_state, before, rtol=0, atol=0)  # params, opt_state and step
    applied_state, applied = jit_distillation_step(
        skipped_state, {**batch, "teacher_logits": logits}, None, **CACHED)
    assert int(applied.skipped_updates) == 0 and int(applied_state.step) == 1
    assert not np.allclose(applied_state.params["head"][...], before.params["head"][...])


def test_batch_without_loss_tokens_skips_the_update_and_is_counted_apart():
    batch = make_batch(7)
    batch["teacher_logits"] = random_teacher_logits(7, batch)
    # One real update first, so that Adam's moments are non-zero: a step on a zero gradient
    # would still move the parameters by the momentum (and weight decay) and advance the step.
    state, first = jit_distillation_step(student_state(ADAM), batch, None, **CACHED)
    assert int(first.empty_batches) == 0 and int(first.skipped_updates) == 0
    before = fresh(state)
    for empty in ({**batch, "labels": np.full_like(batch["labels"], -100)},
                  {**batch, "attention_mask": np.zeros_like(batch["attention_mask"])}):
        state, metrics = jit_distillation_step(state, empty, None, **CACHED)
        assert int(metrics.num_tokens) == 0 and float(metrics.loss) == 0.0
        assert int(metrics.empty_batches) == 1 and int(metrics.skipped_updates) == 0
        assert_trees_close(state, before, rtol=0, atol=0)  # params, opt_state and step
    # A non-finite value at a masked position does not make an empty batch a non-finite skip.
    poisoned = {**batch, "labels": np.full_like(batch["labels"], -100),
                "teacher_logits": np.full_like(batch["teacher_logits"], np.nan)}
    state, metrics = jit_distillation_step(state, poisoned, None, **CACHED)
    assert int(metrics.empty_batches) == 1 and int(metrics.skipped_updates) == 0
    assert_trees_close(state, before, rtol=0, atol=0)
    _, evaluated = jit_distillation_step(fresh(state), batch, None, is_training=False, **CACHED)
    assert evaluated.empty_batches is None


def test_batch_without_kd_tokens_still_updates_on_the_hidden_state_term(teacher):
    batch, state = live_batch(), student_state(tie_embeddings=True)
    no_labels = {**batch, "labels": np.full_like(batch["labels"], -100)}
    new_state, metrics = jit_distillation_step(fresh(state), no_labels, teacher, **LIVE)
    assert int(metrics.num_tokens) == 0 and float(metrics.hidden_state_loss) > 0
    assert int(metrics.empty_batches) == 0 and int(new_state.step) == 1
    assert not np.allclose(new_state.params["embedding"][...], state.params["embedding"][...])
    no_tokens = {**batch, "attention_mask": np.zeros_like(batch["attention_mask"])}
    new_state, metrics = jit_distillation_step(fresh(state), no_tokens, teacher, **LIVE)
    assert int(metrics.empty_batches) == 1 and int(new_state.step) == 0
    assert_trees_close(new_state.params, state.params, rtol=0, atol=0)


def test_rng_state_advances_once_per_microbatch_and_evaluation_is_deterministic():
    state = TrainState.create(ToyDecoder(VOCAB, HIDDEN, 1, dropout=0.5, seed=4), SGD)
    batch = make_batch(6)
    batch["teacher_logits"] = random_teacher_logits(6, batch)
    count = lambda s: int(s.other["dropout"]["rngs"]["count"][...])
    trained, metrics = jit_distillation_step(  # loss_config positionally, as EasyDeL's callers do
        fresh(state), batch, None, DistillLossConfig(), gradient_accumulation_steps=2)
    assert (count(state), count(trained)) == (0, 2)  # a fresh dropout mask for every microbatch
    evaluations = [jit_distillation_step(state, batch, None, is_training=False)[1].loss
                   for _ in range(2)]
    assert float(evaluations[0]) == float(evaluations[1]) != float(metrics.loss)


def test_one_compile_across_steps_and_the_state_is_donated(teacher, caplog):
    state = student_state(ADAM, seed=7)
    schedule = optax.cosine_decay_schedule(0.01, 100)  # a new static argument: a fresh compile
    options = dict(learning_rate_fn=schedule, gradient_accumulation_steps=2, temperature=1.5)
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        for seed in range(3):
            old = state
            state, metrics = jit_distillation_step(state, make_batch(10 + seed), teacher, **options)
            assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old.params))
        # the public lowering of the same step: from JAX's caches, nothing compiled or donated
        compiled = lower_distillation_step(state, make_batch(20), teacher, **options).compile()
    assert compiled.memory_analysis().temp_size_in_bytes > 0
    assert compiled.cost_analysis()["flops"] > 0
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state.params))
    compiles = [r for r in caplog.records
                if "Compiling" in r.getMessage() and "distillation_step" in r.getMessage()]
    assert len(compiles) == 1, [r.getMessage()[:120] for r in compiles]
    assert int(state.step) == 3
    np.testing.assert_allclose(metrics.learning_rate, schedule(2), rtol=1e-6)


_TWO_DEVICE_SCRIPT = textwrap.dedent(r"""
    import json, re, sys
    import jax, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    sys.path.insert(0, sys.argv[1])
    from test_step import make_batch, random_teacher_logits, student_state
    from pipeline.step import STATIC_ARGNAMES, distillation_step, jit_distillation_step

    assert jax.device_count() == 2, jax.devices()
    batch = make_batch(6, lengths=(6, 1, 4, 2))
    batch["teacher_logits"] = random_teacher_logits(6, batch)
    options = dict(gradient_accumulation_steps=2, alpha=1.0)
    single, single_metrics = jit_distillation_step(student_state(), batch, None, **options)

    def lowered_text(partition_spec):
        return jax.jit(distillation_step, static_argnames=STATIC_ARGNAMES).lower(
            replicated, batch, None, partition_spec=partition_spec, **options).as_text()

    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,))
    replicated = jax.device_put(student_state(), NamedSharding(mesh, P()))
    # A bare spec on the current mesh and a NamedSharding (no current mesh) pin the same layout.
    with jax.set_mesh(mesh):
        hlos = [lowered_text(P("data"))]
    hlos.append(lowered_text(NamedSharding(mesh, P("data"))))
    with jax.set_mesh(mesh):
        # The batch arrives on one device; partition_spec alone must spread it over both.
        parallel, parallel_metrics = jit_distillation_step(replicated, batch, None,
                                                           partition_spec=P("data"), **options)
    # The same step with its mesh explicit, and no current mesh anywhere.
    assert jax.sharding.get_abstract_mesh().empty
    explicit, explicit_metrics = jit_distillation_step(
        jax.device_put(student_state(), NamedSharding(mesh, P())), batch, None,
        partition_spec=NamedSharding(mesh, P("data")), **options)
    PINNED = r'sharding_constraint %\w+ <@mesh, \[\{"data"\}, \{\}\]> : tensor<ROWSx6xi32>'
    diff = lambda a, b: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    print(json.dumps(dict(
        params_diff=diff(parallel.params, single.params),
        metrics_diff=diff(parallel_metrics, single_metrics),
        explicit_diff=max(diff(explicit.params, parallel.params),
                          diff(explicit_metrics, parallel_metrics)),
        loss=float(single_metrics.loss),
        # the whole batch [4, 6] and each microbatch [2, 6] pinned to the data axis
        constrained=all(re.search(PINNED.replace("ROWS", str(rows)), hlo) is not None
                        for hlo in hlos for rows in (4, 2)),
        params_devices=len(parallel.params["head"][...].sharding.device_set))))
""")


def test_data_parallel_step_on_two_cpu_devices_matches_one_device():
    env = {**os.environ, "XLA_FLAGS": xla_flags(2),
           "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(TESTS_DIR.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _TWO_DEVICE_SCRIPT, str(TESTS_DIR)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["constrained"], result
    assert result["params_devices"] == 2 and np.isfinite(result["loss"]), result
    assert result["params_diff"] < 1e-6 and result["metrics_diff"] < 1e-5, result
    assert result["explicit_diff"] == 0, result


def test_short_distillation_run_reduces_the_kl():
    teacher = TrainState.create(ToyDecoder(VOCAB, HIDDEN, num_layers=2, seed=50))
    state = student_state(optax.adam(0.03), seed=1, tie_embeddings=True, num_layers=1)
    batches = [make_batch(200 + seed, lengths=(6, 5, 6, 4)) for seed in range(4)]
    kl = []
    for step in range(60):  # the metrics of a step are those of the parameters before it
        state, metrics = jit_distillation_step(state, batches[step % 4], teacher, temperature=1.0,
                                               alpha=1.0)
        kl.append(float(metrics.kl_loss))
    first, last = np.mean(kl[:4]), np.mean(kl[-4:])
    assert last < 0.1 * first, kl


# ----------------------------------------------------------------------------- bad input


def _bad_cases():
    batch = make_batch(8)
    logits = random_teacher_logits(8, batch)
    cached = {**batch, "teacher_logits": logits}
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    cases = {  # id: (expected message, batch, live teacher?, step arguments)
        "steps-divide": ("gradient_accumulation_steps (3) must divide the batch size (4)", batch, True,
                         dict(gradient_accumulation_steps=3)),
        "steps-zero": ("gradient_accumulation_steps: expected an int >= 1, got 0", batch, True,
                       dict(gradient_accumulation_steps=0)),
        "temperature": ("temperature: expected > 0, got 0.0", batch, True, dict(temperature=0.0)),
        "alpha": ("alpha: expected in [0, 1], got 1.5", batch, True, dict(alpha=1.5)),
        "hard-labels": ("use_hard_labels=True needs labels", no_labels, True,
                        dict(loss_config=DistillLossConfig(use_hard_labels=True))),
        "divergence": ("divergence: expected one of", batch, True,
                       dict(loss_config=DistillLossConfig(divergence="kl"))),
        "loss-config": ("loss_config: expected a DistillLossConfig or None, got dict", batch, True,
                        dict(loss_config={"beta": 0.5})),
        "no-teacher": ("teacher_state=None needs teacher targets in the batch", batch, False, {}),
        "two-teachers": ("also holds teacher outputs ['teacher_logits']", cached, True, {}),
        "hidden-cached": ("hidden_state_weight=0.5 needs a live teacher", cached, False,
                          dict(hidden_state_weight=0.5)),
        "hidden-weight": ("hidden_state_weight: expected >= 0, got -1.0", batch, True,
                          dict(hidden_state_weight=-1.0)),
        "hidden-layer": ("index 3 out of range for the student's 3 entries", batch, True,
                         dict(hidden_state_weight=0.5, hidden_state_layers=(0, 3))),
        "attention-layer": ("index -3 out of range for the student's 2 entries", batch, True,
                            dict(attention_weight=0.5, attention_layers=(-3,))),
        "hard-labels-only-no-labels": ("use_hard_labels without a teacher needs batch['labels']",
                                       no_labels, False, dict(alpha=0.0,
                                       loss_config=DistillLossConfig(use_hard_labels=True))),
        "hard-labels-only-chunked": ("a hard-label-only step (no teacher, alpha=0) takes "
                                     "logits_chunk_size=None", batch, False,
                                     dict(alpha=0.0, logits_chunk_size=4,
                                          loss_config=DistillLossConfig(use_hard_labels=True))),
        "chunk": ("logits_chunk_size: expected None or an int >= 1, got 0", batch, True,
                  dict(logits_chunk_size=0)),
        "spec-type": ("partition_spec: expected None, a PartitionSpec or a NamedSharding, got str",
                      batch, True, dict(partition_spec="data")),
        "spec-no-mesh": ("axis 'data' must be an Auto axis of the mesh", batch, True,
                         dict(partition_spec=PartitionSpec("data"))),
        "no-input-ids": ("batch['input_ids']: expected an int array [batch, seq], got no such key",
                         {"attention_mask": batch["attention_mask"]}, True, {}),
        "labels-shape": ("batch['labels']: expected shape (4, 6) like input_ids, got (4, 5)",
                         {**batch, "labels": batch["labels"][:, :5]}, True, {}),
        "vocab": ("teacher_logits: expected the student logits' shape (4, 6, 40)",
                  {**batch, "teacher_logits": logits[..., :20]}, False, {}),
    }
    return [pytest.param(*case, id=name) for name, case in cases.items()]


@pytest.mark.parametrize("message,batch,live_teacher,kwargs", _bad_cases())
def test_bad_input_is_refused_with_a_clear_error(teacher, message, batch, live_teacher, kwargs):
    with pytest.raises(ValueError) as error:
        distillation_step(student_state(), batch, teacher if live_teacher else None, **kwargs)
    assert isinstance(error.value, KdpipeError)
    assert message in str(error.value)


def test_hard_labels_only_step_needs_no_teacher_and_matches_plain_cross_entropy():
    """alpha=0 with use_hard_labels and no teacher: one SGD step on the masked token-mean CE."""
    batch = make_batch(5)
    state = student_state()
    mask = (batch["attention_mask"] == 1) & (batch["labels"] != -100)

    def reference_ce(params):
        logits = state.replace(params=params).model()(batch["input_ids"], batch["attention_mask"]).logits
        logp = jax.nn.log_softmax(logits.astype(jnp.float64), axis=-1)
        picked = jnp.take_along_axis(logp, jnp.maximum(batch["labels"], 0)[..., None], -1)[..., 0]
        return -jnp.sum(jnp.where(mask, picked, 0.0)) / mask.sum()

    with jax.enable_x64(True):  # jitted: a model's gradient taken eagerly compiles every primitive
        params64 = jax.tree.map(lambda p: np.asarray(p, np.float64), state.params)
        ce, grads = jax.jit(jax.value_and_grad(reference_ce))(params64)
        expected = jax.tree.map(lambda p, g: p - 0.1 * np.asarray(g), params64, grads)
    new_state, metrics = jit_distillation_step(fresh(state), batch, None, alpha=0.0,
                                               loss_config=DistillLossConfig(use_hard_labels=True))
    assert metrics.kl_loss is None and metrics.top1_agreement is None
    np.testing.assert_allclose(float(metrics.ce_loss), float(ce), rtol=1e-5)
    np.testing.assert_allclose(float(metrics.loss), float(ce), rtol=1e-5)
    assert int(metrics.num_tokens) == int(mask.sum())
    assert_trees_close(new_state.params, expected, rtol=1e-4, atol=1e-6)


def test_bad_input_under_jit_leaves_the_state_alive(teacher):
    state = student_state()
    with pytest.raises(ConfigError, match="temperature"):
        jit_distillation_step(state, make_batch(0), teacher, temperature=-1.0)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state.params))
    with pytest.raises(DataError, match="leading"):
        jit_distillation_step(state, {**make_batch(0), "extra": np.zeros((3,))}, teacher)


def test_train_state_round_trips_the_model_and_a_teacher_has_no_optimizer(teacher):
    model = ToyDecoder(VOCAB, HIDDEN, seed=3)
    state = TrainState.create(model, SGD)
    merged = state.model()
    assert merged is not model and type(merged) is ToyDecoder and merged.head is not None
    assert_trees_close(nnx.state(merged), nnx.state(model), rtol=0, atol=0)
    assert int(state.step) == 0 and state.step.dtype == jnp.int32
    assert teacher.opt_state is None and teacher.tx is None
    with pytest.raises(ConfigError, match="student_state: training needs an optimizer"):
        distillation_step(teacher, make_batch(0), teacher)


def test_the_step_drives_the_llama_family():
    from pipeline.models.llama import Llama, LlamaConfig

    def llama(layers, seed, tied):
        config = LlamaConfig(model_type="llama", vocab_size=VOCAB, hidden_size=HIDDEN,
                             intermediate_size=24, num_hidden_layers=layers, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=8, tie_word_embeddings=tied)
        return Llama(config, rngs=nnx.Rngs(seed))

    teacher = TrainState.create(llama(2, 0, tied=False))
    state = TrainState.create(llama(1, 1, tied=True), SGD)
    batch = make_batch(9)
    new_state, metrics = jit_distillation_step(
        fresh(state), batch, teacher, gradient_accumulation_steps=2, logits_chunk_size=5,
        hidden_state_weight=0.1, hidden_state_layers=[0, -1], attention_weight=1.0,
        attention_layers=[0])  # lists, as a YAML config gives them
    assert all(np.isfinite(v) for v in metrics.as_dict().values()), metrics
    assert int(metrics.skipped_updates) == 0 and float(metrics.grad_norm) > 0
    assert min(float(metrics.kl_loss), float(metrics.hidden_state_loss), float(metrics.attention_loss)) > 0
    assert int(metrics.num_tokens) == int(np.sum((batch["attention_mask"] == 1) & (batch["labels"] != -100)))
    assert not np.allclose(new_state.params["embedder"]["embedding_vd"][...],
                           state.params["embedder"]["embedding_vd"][...])

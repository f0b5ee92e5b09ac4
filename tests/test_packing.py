"""Packed documents: segment ids from prepare-data, through the dataset, into the model.

A packed row with segment ids must compute each document as if it ran alone (attention inside
the document, RoPE positions from 0 at its start).
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pipeline.errors import DataError
from pipeline.models.hf_io import load_pretrained
from pipeline.models.llama import Llama, LlamaConfig
from pipeline.models.llama.model import document_positions
from pipeline.step import DistillLossConfig, TrainState, jit_distillation_step

FIXTURES = Path(__file__).parent / "fixtures" / "hf"


@functools.partial(jax.jit, static_argnums=(0, 5))
def _forward(graphdef, state, ids, mask, segments, output_attentions):
    return nnx.merge(graphdef, state)(ids, mask, output_attentions=output_attentions,
                                      segment_ids=segments)


def _packed(rng, layout, vocab):
    """Rows of documents of the given lengths back to back, then padding: ``(ids, mask,
    segments, [(row, start, length)])``, segment ids numbered from 1 in each row, 0 padding."""
    seq = max(sum(lengths) for lengths in layout) + 2
    ids = rng.integers(0, vocab, (len(layout), seq)).astype(np.int32)
    mask = np.zeros((len(layout), seq), np.int32)
    segments = np.zeros((len(layout), seq), np.int32)
    documents = []
    for row, lengths in enumerate(layout):
        start = 0
        for number, length in enumerate(lengths, start=1):
            mask[row, start:start + length] = 1
            segments[row, start:start + length] = number
            documents.append((row, start, length))
            start += length
    return ids, mask, segments, documents


# llama3 rope scaling makes every position's rotation distinct; mistral adds a window of 3.
@pytest.mark.parametrize("attention, scan, name", [("xla", False, "llama3_rope_scaling"),
                                                   ("blockwise", True, "mistral_sliding_window")])
def test_packed_row_matches_its_documents_run_alone(attention, scan, name):
    model = load_pretrained(FIXTURES / name, attention=attention, scan_layers=scan)
    graphdef, state = nnx.split(model)
    ids, mask, segments, documents = _packed(np.random.default_rng(0), [[5, 9, 3], [12, 1, 6]],
                                             model.config.vocab_size)
    with_probs = attention == "xla"
    packed = _forward(graphdef, state, ids, mask, segments, with_probs)
    # Each document alone in its own row from position 0, right-padded (causal attention: the
    # padding after a document does not change it): one batch, one compile.
    alone_ids = np.zeros((len(documents), 12), np.int32)
    alone_mask = np.zeros_like(alone_ids)
    for i, (row, start, length) in enumerate(documents):
        alone_ids[i, :length] = ids[row, start:start + length]
        alone_mask[i, :length] = 1
    alone = _forward(graphdef, state, alone_ids, alone_mask, None, with_probs)
    for i, (row, start, length) in enumerate(documents):
        end = start + length
        np.testing.assert_allclose(packed.logits[row, start:end], alone.logits[i, :length],
                                   atol=1e-5, rtol=0)
        if with_probs:  # the dense path's probabilities honour the segments too
            for ours, theirs in zip(packed.attentions, alone.attentions):
                block = np.asarray(ours[row, :, start:end])  # [heads, query, key]
                np.testing.assert_allclose(block[:, :, start:end], theirs[i, :, :length, :length],
                                           atol=1e-6, rtol=0)
                assert not block[:, :, :start].any() and not block[:, :, end:].any()


def test_rope_positions_restart_at_each_segment():
    """RoPE scores depend on relative positions only, so logits barely show where a document's
    positions start; the model must still give each document its own (``document_positions``,
    checked against a loop below), as it would run alone: bit for bit the explicit positions'
    result, not the row's ``0..seq-1``."""
    model = load_pretrained(FIXTURES / "llama3_rope_scaling", attention="xla")
    ids, mask, segments, _ = _packed(np.random.default_rng(2), [[5, 9, 3], [12, 1, 6]],
                                     model.config.vocab_size)
    run = jax.jit(lambda ids, segments, positions: model(ids, mask, segment_ids=segments,
                                                         positions=positions).logits)
    derived = run(ids, segments, None)
    np.testing.assert_array_equal(derived, run(ids, segments, document_positions(segments)))
    row_positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    assert np.abs(derived - run(ids, segments, row_positions)).max() > 0
    # Far from 0 float32 loses the angles' precision: restarting keeps long rows exact.
    assert np.abs(derived - run(ids, segments, row_positions + 2**20)).max() > 1e-3


def test_document_positions_restart_at_each_segment():
    rng = np.random.default_rng(1)
    segments = np.sort(rng.integers(0, 4, (3, 17)), axis=1)[:, ::-1].copy()  # runs of each id
    segments[1, :5] = 7  # a run at the row's start that continues the row before's document
    expected = np.zeros(segments.shape, np.int64)
    for b in range(segments.shape[0]):
        for t in range(1, segments.shape[1]):
            same = segments[b, t] == segments[b, t - 1]
            expected[b, t] = expected[b, t - 1] + 1 if same else 0
    np.testing.assert_array_equal(jax.jit(document_positions)(jnp.asarray(segments)), expected)


def test_bad_segment_and_position_shapes_are_refused():
    model = load_pretrained(FIXTURES / "llama_gqa_tied", attention="xla")
    ids = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(DataError, match=r"segment_ids: expected shape \(2, 4\)"):
        model(ids, segment_ids=jnp.zeros((2, 5), jnp.int32))
    with pytest.raises(DataError, match=r"positions: expected shape \(2, 4\)"):
        model(ids, positions=jnp.zeros((4,), jnp.int32))


def test_step_keeps_packed_documents_apart_for_student_and_live_teacher():
    """One packed row with segment ids gives the step's losses and gradient of its documents
    in rows of their own (each document's last token without a label, as prepare-data
    writes), with the student and a live teacher both taking the segment ids."""
    def llama(seed, layers):
        return Llama(LlamaConfig(model_type="llama", vocab_size=48, hidden_size=32,
                                 intermediate_size=48, num_hidden_layers=layers,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                 initializer_range=0.5), attention="xla", rngs=nnx.Rngs(seed))

    student = TrainState.create(llama(0, 1), optax.sgd(1.0))
    teacher = TrainState.create(llama(1, 2))
    rng = np.random.default_rng(3)
    lengths = (5, 7)
    ids = rng.integers(0, 48, sum(lengths)).astype(np.int32)
    labels = np.r_[ids[1:], 0].astype(np.int32)
    labels[np.cumsum(lengths) - 1] = -100  # a document's last token predicts nothing
    packed = {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), np.int32),
              "labels": labels[None], "segment_ids": np.repeat([[1, 2]], lengths, axis=1)}
    alone = {key: np.zeros((2, max(lengths)), np.int32) for key in packed if key != "segment_ids"}
    alone["labels"][:] = -100
    for row, (start, length) in enumerate(zip(np.cumsum((0,) + lengths[:-1]), lengths)):
        for key, values in (("input_ids", ids), ("labels", labels),
                            ("attention_mask", np.ones_like(ids))):
            alone[key][row, :length] = values[start:start + length]
    options = dict(loss_config=DistillLossConfig(use_hard_labels=True), alpha=0.5,
                   hidden_state_weight=0.5, hidden_state_layers=(1,))

    def run(batch):
        state, metrics = jit_distillation_step(
            TrainState.create(llama(0, 1), optax.sgd(1.0)), batch, teacher, **options)
        return state.params, metrics

    (packed_params, packed_metrics), (alone_params, alone_metrics) = run(packed), run(alone)
    for name in ("kl_loss", "ce_loss", "hidden_state_loss", "loss"):
        np.testing.assert_allclose(getattr(packed_metrics, name), getattr(alone_metrics, name),
                                   rtol=1e-5, err_msg=name)
    assert int(packed_metrics.num_tokens) == int(alone_metrics.num_tokens) == sum(lengths) - 2
    before = jax.tree.leaves(student.params)  # SGD at rate 1: the updates are the gradients
    for p, a, b in zip(jax.tree.leaves(packed_params), jax.tree.leaves(alone_params), before):
        update = np.asarray(a) - b
        assert np.abs(update).max() > 0
        np.testing.assert_allclose(np.asarray(p) - b, update, rtol=0,
                                   atol=1e-5 * np.abs(update).max())

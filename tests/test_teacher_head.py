"""pipeline.teacher_head against the reference the issue names: the bytes of
``compress.encode`` on the teacher's whole logits, for each target mode, with chunks that do not
divide the sequence (the last one overlaps); and its non-finite check against the writer's.

The vocabulary is past 4096: XLA:CPU sums the rows of a smaller array in another order (see
pipeline/teacher_head.py), and float32 values at a temperature that is not a power of two show
a change in the last bit."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pipeline.cache import audit, compress
from pipeline.cache.format import TargetSpec
from pipeline.cache.writer import first_nonfinite
from pipeline.models.llama import Llama, LlamaConfig
from pipeline.teacher_head import chunk_positions, encode_from_hidden

V, REAL_V, B, L = 4099, 4000, 3, 10


@pytest.fixture(scope="module")
def teacher_outputs():
    """A tiny bf16 teacher's final hidden states, head and whole logits (the model's own)."""
    config = LlamaConfig(model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, tie_word_embeddings=False)
    model = Llama(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, V, (B, L)))
    out = nnx.jit(lambda m: m(ids))(model)
    return out.last_hidden_state, model.output_head(), out.logits


SPECS = {
    "topk": (TargetSpec("topk", V, REAL_V, k=8, value_dtype="float32", temperature=1.5), 4),
    "sampled": (TargetSpec("sampled", V, REAL_V, n_draws=16, temperature=1.5, seed=3,
                           id_encoding="packed"), 4),
    "full": (TargetSpec("full", V, REAL_V, value_dtype="float32", temperature=None), 3),
    "top_p": (TargetSpec("topk", V, REAL_V, k=8, value_dtype="q8", temperature=1.5, top_p=0.5,
                         min_k=2), 4),
    # the candidates, chunk by chunk (the budget is applied on the host, once they are stored)
    "bytes_per_token": (TargetSpec("topk", V, REAL_V, k=8, value_dtype="float32",
                                   temperature=1.5, min_k=1, bytes_per_token=20.0), 4),
}


@pytest.mark.parametrize("mode", SPECS)
def test_fused_encode_gives_the_bytes_of_the_whole_logits(teacher_outputs, mode):
    hidden, head, logits = teacher_outputs
    spec, chunk = SPECS[mode]
    rows = np.array([5, 0, 11])
    expected = compress.encode(logits, rows, spec)
    got, check, fidelity = encode_from_hidden(hidden, head, rows, spec, chunk=chunk)
    assert set(got) == set(expected)
    for name, array in expected.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        assert np.asarray(got[name]).tobytes() == np.asarray(array).tobytes(), name
    np.testing.assert_array_equal(check, [-1, 0])
    if spec.mode == "topk" and spec.bytes_per_token is None:  # the writer's audit
        for g, want in zip(fidelity, audit.audit_batch(logits, expected, spec)):
            assert np.asarray(g).tobytes() == np.asarray(want).tobytes()
    else:
        assert fidelity is None
    if mode == "topk":  # one compiled program: an inf and a NaN planted in the hidden states
        planted = np.asarray(hidden, np.float32)
        planted[1, 7, 0], planted[2, 2, 3] = np.inf, np.nan
        planted = jnp.asarray(planted, hidden.dtype)
        whole = jnp.einsum("bld,vd->blv", planted, head, preferred_element_type=jnp.float32)
        check = encode_from_hidden(planted, head, rows, spec, chunk=chunk).check
        np.testing.assert_array_equal(check, first_nonfinite(whole))
        assert check[0] == 1 * L + 7


def test_chunk_choice_and_bad_arguments(teacher_outputs):
    hidden, head, _ = teacher_outputs
    assert chunk_positions(4, 4096, tokens=2048) == 512
    assert chunk_positions(4096, 16, tokens=2048) == 1
    assert chunk_positions(1, 16, tokens=2048) == 16
    spec = SPECS["topk"][0]
    with pytest.raises(ValueError, match="chunk: expected a positive int, got 0"):
        encode_from_hidden(hidden, head, np.arange(B), spec, chunk=0)
    with pytest.raises(ValueError, match=rf"head: expected {V} rows"):
        encode_from_hidden(hidden, head[:50], np.arange(B), spec, chunk=2)


def test_live_targets_of_a_budget_keep_it_per_sequence():
    """``encode_targets`` (a remote teacher scoring rows no cache holds) hands back stored
    arrays, each row cut to the budget on its own (``budget.cut`` without a shard)."""
    from pipeline.cache import budget
    from pipeline.cache.format import array_layout
    from pipeline.step import TrainState
    from pipeline.teacher import _run_teacher, encode_targets
    from toy_model import ToyDecoder

    vocab, seq = 96, 16
    state = TrainState.create(ToyDecoder(vocab, hidden=24, seed=3))
    spec = TargetSpec("topk", vocab, vocab, k=12, min_k=1, bytes_per_token=20.0)
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(0, vocab, (3, seq)).astype(np.int32),
             "attention_mask": np.ones((3, seq), np.int32)}
    rows = np.array([7, 2, 40])
    got = encode_targets(state, batch, rows, spec)
    assert set(got) == {a.name for a in array_layout(spec)}
    candidates = {n: np.asarray(a) for n, a in _run_teacher(state, batch, rows, spec)
                  .encoded.items()}
    for name, want in budget.cut(candidates, spec).items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    counts = got["id_count"].astype(int)
    assert len(np.unique(counts)) > 2 and counts.max() < spec.k
    for row in range(3):
        one = {n: a[row:row + 1] for n, a in got.items()}
        assert budget.stored_bytes(one, spec, shard_sequences=1) <= spec.bytes_per_token * seq

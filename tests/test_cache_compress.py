"""pipeline.cache.compress against float64 numpy references, and decoded targets fed to the
losses: full == dense exactly, top-k with k = V == dense, sampled unbiased."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipeline import losses
from pipeline.cache import compress
from pipeline.cache.format import PADDED_LOGIT, TargetSpec
from pipeline.errors import CacheError

V, REAL_V, B, L = 97, 90, 2, 3


def _logits(seed=0, shape=(B, L, V), scale=3.0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale


def _ref_logprobs(logits, temperature, real_v=REAL_V):
    x = logits.astype(np.float64) / temperature
    x[..., real_v:] = -np.inf
    m = x.max(-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def _roundtrip(logits, spec, seqs=None):
    seqs = jnp.arange(logits.shape[0]) if seqs is None else seqs
    stored = compress.encode(jnp.asarray(logits), seqs, spec)
    return stored, {k: np.asarray(v) for k, v in compress.decode(stored, spec).items()}


def _pack_reference(values, widths, num_bytes):
    """Bit-by-bit LSB-first concatenation with Python ints."""
    out = []
    for vals, ws in zip(values.tolist(), widths.tolist()):
        stream, offset = 0, 0
        for v, w in zip(vals, ws):
            stream |= v << offset
            offset += w
        out.append(list(stream.to_bytes(num_bytes, "little")))
    return np.array(out, np.uint8)


def test_pack_bits_matches_reference_and_unpacks():
    rng = np.random.default_rng(1)
    widths = rng.integers(0, 26, size=(5, 11)).astype(np.int32)
    values = (rng.integers(0, 2**25, size=(5, 11)) % (1 << widths)).astype(np.uint32)
    num_bytes = int(np.ceil(widths.sum(-1).max() / 8)) + 2
    packed = compress.pack_bits(jnp.asarray(values), jnp.asarray(widths), num_bytes)
    np.testing.assert_array_equal(np.asarray(packed), _pack_reference(values, widths, num_bytes))
    np.testing.assert_array_equal(np.asarray(compress.unpack_bits(packed, jnp.asarray(widths))),
                                  values)


@pytest.mark.parametrize("encoding", ["gap", "packed"])
def test_ids_roundtrip_beyond_17_bits(encoding):
    # 2**24 + 3 ids needs 25 bits: no 2**17 vocabulary cap
    big_v = 2**24 + 3
    spec = TargetSpec("topk", big_v, big_v, k=6, id_encoding=encoding, value_dtype="float32")
    rng = np.random.default_rng(2)
    ids = np.sort(np.stack([rng.choice(big_v, 6, replace=False) for _ in range(4)]), -1)
    ids[0] = [0, 1, 2, 3, big_v - 2, big_v - 1]
    stored = compress.encode_ids(jnp.asarray(ids, jnp.int32), jnp.ones(ids.shape, bool), spec)
    np.testing.assert_array_equal(np.asarray(compress.decode_ids(stored, spec)), ids)


def test_quantize_logprobs_error_within_half_step():
    lp = np.log(np.random.default_rng(3).dirichlet(np.ones(16), size=8)).astype(np.float32)
    q, scale = compress.quantize_logprobs(jnp.asarray(lp))
    back = np.asarray(compress.dequantize_logprobs(q, scale))
    step = np.asarray(scale, np.float32)[:, None]
    assert np.all(np.abs(back - lp) <= step * 0.5 + 1e-6 * np.abs(lp))


def test_q8sqrt_levels_against_float64():
    # a wide range of log-probs: peaked and flat rows, ids below the floor, p = 1 exactly
    rng = np.random.default_rng(3)
    p = np.concatenate([rng.dirichlet(np.full(64, a), size=16) for a in (0.02, 0.3, 3)])
    lp = np.log(np.maximum(p, 1e-300))
    lp[0, :3] = [0.0, -1e-6, -150.0]
    q = np.asarray(compress.quantize_sqrt_logprobs(jnp.asarray(lp, jnp.float32)))
    back = np.asarray(compress.dequantize_sqrt_logprobs(jnp.asarray(q)), np.float64)
    # the level table in float64: sqrt(p) = 1 - n / 100 to n = 98, then 1-nat steps of log p
    n = np.arange(256, dtype=np.float64)
    table = np.where(n <= 98, 2 * np.log(np.maximum(1 - n / 100, 1e-300)),
                     2 * np.log(0.02) - (n - 98))
    np.testing.assert_allclose(back, table[q], rtol=1e-5, atol=1e-6)
    root = q <= 98
    # nearest level: within half a step of sqrt(p) above p = 4e-4, of log p below
    assert np.all(np.abs(np.exp(back[root] / 2) - np.exp(lp[root] / 2)) <= 0.005 + 1e-6)
    clamped = np.maximum(lp[~root], compress.Q8_LOGPROB_FLOOR)
    assert np.all(np.abs(back[~root] - clamped) <= 0.5 + 1e-5)
    assert q[0, 0] == 0 and q[0, 2] == q.max() == 98 + round(2 * np.log(0.02) + 100)
    assert root.mean() > 0.2 and (~root).mean() > 0.2  # both kinds of level are exercised
    # monotone: a larger probability never gets a higher level
    order = np.argsort(lp.ravel())
    assert np.all(np.diff(q.ravel()[order].astype(int)) <= 0)


@pytest.mark.parametrize("encoding", ["gap", "packed"])
@pytest.mark.parametrize("value_dtype", ["float32", "bfloat16", "q8", "q8sqrt"])
def test_topk_roundtrip_against_float64(encoding, value_dtype):
    logits = _logits(4)
    spec = TargetSpec("topk", V, REAL_V, k=7, value_dtype=value_dtype, id_encoding=encoding,
                      temperature=2.0)
    _, out = _roundtrip(logits, spec)
    ref = _ref_logprobs(logits, 2.0)
    ids = out["teacher_topk_ids"]
    np.testing.assert_array_equal(np.sort(ids, -1), np.sort(np.argsort(-ref, -1)[..., :7], -1))
    ref_vals = np.take_along_axis(ref, ids, -1)
    in_top = np.zeros(ref.shape, bool)
    np.put_along_axis(in_top, ids, True, -1)
    ref_tail = np.log(np.where(in_top, 0.0, np.exp(ref)).sum(-1))
    if value_dtype == "q8sqrt":  # half a level in sqrt(p), plus the renormalisation
        np.testing.assert_allclose(np.exp(out["teacher_topk_logprobs"] / 2),
                                   np.exp(ref_vals / 2), atol=0.006)
    else:
        tol = {"float32": 1e-5, "bfloat16": 0.03, "q8": 0.03}[value_dtype]
        np.testing.assert_allclose(out["teacher_topk_logprobs"], ref_vals, atol=tol)
    np.testing.assert_allclose(out["teacher_tail_logmass"], ref_tail,
                               atol=1e-5 if value_dtype == "float32" else 0.02)
    # whatever the rounding, the decoded k + 1 buckets form a distribution
    total = np.exp(out["teacher_topk_logprobs"].astype(np.float64)).sum(-1) + np.exp(
        out["teacher_tail_logmass"].astype(np.float64))
    np.testing.assert_allclose(total, 1.0, atol=1e-5)


def test_topk_tail_counts_ids_tied_with_the_kth_value():
    # coarse logits (as bf16 teachers give): many ids tie with the k-th largest value
    logits = np.round(_logits(14) * 2) / 2
    spec = TargetSpec("topk", V, REAL_V, k=7, value_dtype="float32")
    _, out = _roundtrip(logits, spec)
    ref = _ref_logprobs(logits, 1.0)
    in_top = np.zeros(ref.shape, bool)
    np.put_along_axis(in_top, out["teacher_topk_ids"], True, -1)
    assert np.all(in_top.sum(-1) == 7)
    kth = np.sort(ref, -1)[..., -7]
    assert np.any((ref == kth[..., None]).sum(-1) > 1)  # the case under test occurs
    np.testing.assert_allclose(out["teacher_tail_logmass"],
                               np.log(np.where(in_top, 0.0, np.exp(ref)).sum(-1)), atol=1e-5)


def test_topk_with_all_ids_gives_dense_loss_and_gradient():
    logits, student = _logits(5, (B, L, REAL_V)), _logits(6, (B, L, REAL_V))
    spec = TargetSpec("topk", REAL_V, REAL_V, k=REAL_V, value_dtype="float32", temperature=2.0)
    _, out = _roundtrip(logits, spec)
    assert np.all(np.isneginf(out["teacher_tail_logmass"]))
    targets = losses.TopKTargets(jnp.asarray(out["teacher_topk_ids"]),
                                 jnp.asarray(out["teacher_topk_logprobs"]),
                                 jnp.asarray(out["teacher_tail_logmass"]))

    def sparse(s):
        return losses.targets_distillation_loss(s, targets, temperature=2.0)[0]

    def dense(s):
        return losses.distillation_loss(s, jnp.asarray(logits), temperature=2.0)[0]

    np.testing.assert_allclose(sparse(student), dense(student), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(sparse)(student), jax.grad(dense)(student), atol=1e-6)


@pytest.mark.parametrize("value_dtype", ["float32", "bfloat16"])
def test_full_mode_is_the_logits_with_padding_marked(value_dtype):
    logits = _logits(7)
    spec = TargetSpec("full", V, REAL_V, value_dtype=value_dtype, temperature=None)
    _, out = _roundtrip(logits, spec)
    expected = logits.astype(value_dtype if value_dtype == "float32" else jnp.bfloat16)
    np.testing.assert_array_equal(out["teacher_logits"][..., :REAL_V], expected[..., :REAL_V])
    assert np.all(out["teacher_logits"][..., REAL_V:] == np.asarray(PADDED_LOGIT, expected.dtype))
    # another padded width: padding columns cut or added, real ones untouched
    stored = compress.encode(jnp.asarray(logits), jnp.arange(B), spec)
    for width in (REAL_V, V + 5):
        got = np.asarray(compress.decode(stored, spec, width)["teacher_logits"])
        assert got.shape == (B, L, width)
        np.testing.assert_array_equal(got[..., :REAL_V], out["teacher_logits"][..., :REAL_V])


def test_full_mode_loss_equals_dense_exactly():
    logits, student = _logits(8, (B, L, REAL_V)), _logits(9, (B, L, REAL_V))
    spec = TargetSpec("full", REAL_V, REAL_V, temperature=None)
    _, out = _roundtrip(logits, spec)
    for temperature in (1.0, 3.0):  # full mode serves any temperature
        a = losses.targets_distillation_loss(
            student, losses.DenseTargets(jnp.asarray(out["teacher_logits"])),
            temperature=temperature)[0]
        b = losses.distillation_loss(student, jnp.asarray(logits), temperature=temperature)[0]
        assert float(a) == float(b)


@pytest.mark.parametrize("encoding", ["gap", "packed"])
def test_sampled_roundtrip_and_determinism(encoding):
    logits = _logits(10)
    spec = TargetSpec("sampled", V, REAL_V, n_draws=9, id_encoding=encoding, temperature=1.5,
                      seed=4)
    seqs = jnp.array([11, 5])
    stored, out = _roundtrip(logits, spec, seqs)
    ids, counts = out["teacher_sample_ids"], out["teacher_sample_counts"]
    np.testing.assert_array_equal(counts.sum(-1), 9)
    ref = _ref_logprobs(logits, 1.5)
    for t in np.ndindex(B, L):
        used = counts[t] > 0
        assert np.all(np.diff(ids[t][used]) > 0) and np.all(ids[t][~used] == 0)
        assert np.all(ids[t][used] < REAL_V) and np.all(np.isfinite(ref[t][ids[t][used]]))
    p = np.exp(ref)
    np.testing.assert_allclose(out["teacher_entropy"],
                               -(np.where(p > 0, p * np.nan_to_num(ref, neginf=0), 0)).sum(-1),
                               rtol=1e-5)
    # the stored bytes of a sequence depend on (seed, sequence index, logits) only, not on
    # the batch it came in (its size or its order)
    swapped = compress.encode(jnp.asarray(logits[::-1]), seqs[::-1], spec)
    alone = compress.encode(jnp.asarray(logits[1:]), seqs[1:], spec)
    for name in stored:
        np.testing.assert_array_equal(np.asarray(swapped[name])[::-1], np.asarray(stored[name]))
        np.testing.assert_array_equal(np.asarray(alone[name])[0], np.asarray(stored[name])[1])


def test_sampled_counts_are_unbiased_for_p_and_for_the_loss():
    draws, vocab, n = 3000, 12, 8
    # two teacher tokens, each repeated at every position of its own sequence: each position
    # has its own key, so each is an independent set of n draws
    tokens = _logits(11, (2, 1, vocab), 1.5)
    spec = TargetSpec("sampled", vocab, vocab, n_draws=n, temperature=2.0)
    _, out = _roundtrip(np.repeat(tokens, draws, axis=1), spec)
    out = {k: np.swapaxes(v, 0, 1) for k, v in out.items()}  # [draws, 2 tokens, ...]
    teacher = np.swapaxes(tokens, 0, 1)  # [1, 2, vocab]
    student = _logits(12, (1, 2, vocab))
    p = np.exp(_ref_logprobs(teacher[0], 2.0, vocab))
    freq = np.zeros((draws, 2, vocab))
    for t in range(2):
        np.add.at(freq[:, t], (np.arange(draws)[:, None], out["teacher_sample_ids"][:, t]),
                  out["teacher_sample_counts"][:, t] / n)
    se = np.sqrt(p * (1 - p) / (n * draws))
    assert np.all(np.abs(freq.mean(0) - p) < 5 * se + 1e-9)

    def per_draw(s, ids, counts, entropy):
        targets = losses.SampledTargets(ids[None], counts[None], entropy[None])
        return losses.targets_distillation_loss(s, targets, temperature=2.0)[0]

    args = [jnp.asarray(out[k]) for k in
            ("teacher_sample_ids", "teacher_sample_counts", "teacher_entropy")]
    value_and_grad = jax.vmap(jax.value_and_grad(per_draw), in_axes=(None, 0, 0, 0))
    values, grads = value_and_grad(jnp.asarray(student), *args)
    dense = lambda s: losses.distillation_loss(s, jnp.asarray(teacher[:1]), temperature=2.0)[0]
    for got, want in ((np.asarray(values), dense(student)),
                      (np.asarray(grads), jax.grad(dense)(student))):
        mean, se = got.mean(0), got.std(0) / np.sqrt(draws)
        assert np.all(np.abs(mean - np.asarray(want)) < 5 * se + 1e-6)


def test_padded_ids_never_chosen_or_drawn():
    logits = _logits(13)
    logits[..., REAL_V:] = 50.0  # garbage padding rows that would dominate if not masked
    topk = TargetSpec("topk", V, REAL_V, k=REAL_V, value_dtype="float32")
    _, out = _roundtrip(logits, topk)
    assert out["teacher_topk_ids"].max() < REAL_V
    sampled = TargetSpec("sampled", V, REAL_V, n_draws=20)
    _, out = _roundtrip(logits, sampled)
    assert out["teacher_sample_ids"].max() < REAL_V


@pytest.mark.parametrize("fields, named", [
    ({"mode": "dense"}, "mode"),
    ({"k": 0}, "k"),
    ({"k": 91}, "k"),
    ({"value_dtype": "int4"}, "value_dtype"),
    ({"id_encoding": "huffman"}, "id_encoding"),
    ({"temperature": 0.0}, "temperature"),
    ({"tokenizer_vocab_size": 98}, "tokenizer_vocab_size"),
    ({"vocab_size": 2**26, "tokenizer_vocab_size": 2**26}, "vocab_size"),
    ({"mode": "full", "k": None}, "temperature"),
    ({"mode": "full", "k": None, "temperature": None, "value_dtype": "q8"}, "value_dtype"),
    ({"mode": "full", "k": None, "temperature": None, "value_dtype": "q8sqrt"}, "value_dtype"),
    ({"value_dtype": "q8sqrt", "format_version": 3}, "value_dtype expected one of format "
                                                      "version 3's"),
    ({"mode": "sampled", "k": None, "n_draws": 256}, "n_draws"),
    ({"mode": "sampled", "n_draws": 4}, "k"),
])
def test_bad_target_spec_names_the_field(fields, named):
    base = {"mode": "topk", "vocab_size": V, "tokenizer_vocab_size": REAL_V, "k": 4}
    with pytest.raises(CacheError, match=named):
        TargetSpec(**{**base, **fields})

"""benchmarks/cache_real.py's fidelity figures against a dense float64 numpy reconstruction."""

import importlib.util
from pathlib import Path

import numpy as np

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "cache_real.py"
_SPEC = importlib.util.spec_from_file_location("cache_real", _PATH)
cache_real = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(cache_real)


def test_reconstruction_stats_match_dense_reference(monkeypatch):
    rng = np.random.default_rng(0)
    tokens, vocab, real, width = 40, 37, 33, 8
    logits = (3 * rng.standard_normal((tokens, vocab))).astype(np.float32)
    logits[0, :real] = 0.0  # a flat token next to peaked ones
    lp = logits[:, :real].astype(np.float64)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    p = np.exp(lp)
    k = rng.integers(1, width + 1, tokens)
    k[1] = real  # every real id stored: no tail
    ids = np.full((tokens, real), -1)
    lq = np.full((tokens, real), -np.inf)
    tail = np.empty(tokens)
    for t in range(tokens):
        chosen = rng.choice(real, k[t], replace=False)
        q = p[t, chosen] * np.exp(0.1 * rng.standard_normal(k[t]))  # lossy stored values
        rest = 1.0 - p[t, chosen].sum()
        q *= (1.0 - rest) / q.sum()
        ids[t, :k[t]], lq[t, :k[t]] = chosen, np.log(q)
        tail[t] = np.log(rest) if k[t] < real else -np.inf
    targets = {"teacher_topk_ids": ids, "teacher_topk_logprobs": lq.astype(np.float32),
               "teacher_tail_logmass": tail.astype(np.float32)}
    got = cache_real.reconstruction_stats(logits, targets, real)
    # the bench measures in chunks of tokens (bounded memory): the same per-token figures
    monkeypatch.setattr(cache_real, "CHUNK_TOKENS", 7)
    chunked = cache_real.in_chunks(cache_real.reconstruction_stats, logits, targets, real)
    for key in got:
        np.testing.assert_array_equal(chunked[key], got[key])

    kl, mass = np.empty(tokens), np.empty(tokens)
    for t in range(tokens):
        stored = ids[t, :k[t]]
        r = np.full(real, np.exp(np.float64(targets["teacher_tail_logmass"][t])) / max(
            real - k[t], 1))
        r[stored] = np.exp(lq[t, :k[t]].astype(np.float32).astype(np.float64))
        kl[t] = np.sum(p[t] * (lp[t] - np.log(r)))
        mass[t] = p[t, stored].sum()
    np.testing.assert_allclose(got["kl"], kl, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got["mass"], mass, rtol=1e-12)
    np.testing.assert_array_equal(got["k"], k)
    assert kl.min() > 0 and got["kl"][1] < 1e-2  # lossy values only on the token without tail

    counts = np.zeros((tokens, width), np.int64)
    counts[:, :3] = rng.integers(0, 3, (tokens, 3))
    sample_ids = rng.integers(0, real, (tokens, width))
    drawn = sample_ids[:, :3].copy()
    for t in range(tokens):  # distinct ids where counted, as the cache stores them
        drawn[t] = rng.choice(real, 3, replace=False)
    sample_ids[:, :3] = drawn
    want = np.array([p[t, drawn[t][counts[t, :3] > 0]].sum() for t in range(tokens)])
    np.testing.assert_allclose(
        cache_real.in_chunks(cache_real.sampled_mass, logits, {
            "teacher_sample_ids": sample_ids, "teacher_sample_counts": counts}, real),
        want, rtol=1e-12)
    # the teacher's own figures, chunked, against the dense float64 p
    top = -np.sort(-p, -1)
    stats = cache_real.teacher_stats(logits, real)
    np.testing.assert_allclose(stats["entropy_nats"], -(p * lp).sum(-1).mean(), rtol=1e-12)
    np.testing.assert_allclose(stats["top1"], top[:, 0].mean(), rtol=1e-12)
    need90 = np.array([np.searchsorted(np.cumsum(row), 0.9) + 1 for row in top])
    assert stats["ids_for_90pct_median"] == np.median(need90)

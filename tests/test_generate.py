"""Generation (pipeline/generate.py): greedy tokens against transformers' ``generate`` (the
committed fixtures of tests/fixtures/make_hf_fixtures.py), the KV cache against recomputing the
prefix, sampling against the model's distribution (chi-square, float64 numpy reference), the
EOS stop, and bad inputs."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from actors.cli import main
from pipeline.errors import ConfigError, DataError
from pipeline.generate import Sampling, generate, left_pad, sample
from pipeline.models.hf_io import load_pretrained

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
NAMES = sorted(path.stem for path in FIXTURES.glob("*.npz"))


def _prompts(name):
    """The fixture's left-padded prompts and transformers' greedy continuation."""
    ref = np.load(FIXTURES / f"{name}.npz")
    return ref["input_ids"], ref["generate_mask"], ref["generated"]


@pytest.mark.parametrize("name", NAMES)
def test_greedy_equals_transformers_generate(name):
    ids, mask, expected = _prompts(name)
    eos = json.loads((FIXTURES / name / "config.json").read_text())["eos_token_id"]
    model = load_pretrained(FIXTURES / name)
    out = generate(model, ids, mask, max_new_tokens=expected.shape[1],
                   sampling=Sampling(temperature=0), eos_id=eos, pad_id=eos)
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)
    at_eos = expected == eos
    np.testing.assert_array_equal(np.asarray(out.stopped), at_eos.any(axis=1))
    np.testing.assert_array_equal(
        np.asarray(out.lengths), np.where(at_eos.any(axis=1), at_eos.argmax(axis=1) + 1,
                                          expected.shape[1]))


_logits = nnx.jit(lambda model, ids: model(ids).logits)


def _recompute_greedy(model, row, new_tokens):
    """Greedy by running the whole prefix through the model for every token (no cache); the
    prefix right-padded to one length, which a causal model's earlier positions ignore."""
    seq = list(row)
    for _ in range(new_tokens):
        padded = np.zeros((1, len(row) + new_tokens), np.int32)
        padded[0, :len(seq)] = seq
        seq.append(int(jnp.argmax(_logits(model, jnp.asarray(padded))[0, len(seq) - 1])))
    return seq[len(row):]


def test_cache_equals_recompute_scanned_and_eos_stop():
    """Scanned layers, mistral's sliding window (3) well inside the 8 + 12 slots, ragged prompts
    left-padded by ``left_pad``; then the same with an EOS that row 0 meets early."""
    name = "mistral_sliding_window"
    model = load_pretrained(FIXTURES / name, scan_layers=True)
    looped = load_pretrained(FIXTURES / name)
    fixture_ids, fixture_mask, _ = _prompts(name)
    rows = [row[keep == 1].tolist() for row, keep in zip(fixture_ids, fixture_mask)]
    rows[1] = rows[1][:4]  # ragged: 8 and 4 tokens
    ids, mask = left_pad(rows, pad_id=0)
    assert mask.tolist()[1] == [0, 0, 0, 0, 1, 1, 1, 1]
    expected = [_recompute_greedy(looped, row, 12) for row in rows]
    out = generate(model, ids, mask, max_new_tokens=12, sampling=Sampling(temperature=0))
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)
    assert np.asarray(out.lengths).tolist() == [12, 12] and not np.asarray(out.stopped).any()

    eos = expected[0][3]  # row 0 stops after 4 tokens; row 1 at its first eos, if any
    stopped = generate(model, ids, mask, max_new_tokens=12, sampling=Sampling(temperature=0),
                       eos_id=eos, pad_id=-1)
    for row, tokens, length in zip(expected, np.asarray(stopped.tokens),
                                   np.asarray(stopped.lengths)):
        n = row.index(eos) + 1 if eos in row else 12
        assert length == n
        np.testing.assert_array_equal(tokens, row[:n] + [-1] * (12 - n))
    assert np.asarray(stopped.stopped).tolist() == [True, eos in expected[1]]


def _reference_probs(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """float64: softmax(logits / T), cut to the top-k, renormalised, cut to the smallest set
    of most likely tokens reaching top-p, renormalised."""
    z = logits.astype(np.float64) / sampling.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if sampling.top_k:
        p[np.argsort(-p)[sampling.top_k:]] = 0
        p /= p.sum()
    if sampling.top_p < 1:
        order = np.argsort(-p)
        before = np.cumsum(p[order]) - p[order]
        p[order[before >= sampling.top_p]] = 0
        p /= p.sum()
    return p


@functools.cache
def _next_token_logits() -> np.ndarray:
    """``[vocab]`` float32: the model's logits after the first fixture prompt."""
    ids, _, _ = _prompts("llama_gqa_tied")
    model = load_pretrained(FIXTURES / "llama_gqa_tied")
    return np.asarray(model(jnp.asarray(ids[:1])).logits[0, -1])


@pytest.mark.parametrize("sampling", [Sampling(3.0), Sampling(2.5, top_k=8),
                                      Sampling(3.0, top_p=0.7),
                                      Sampling(4.0, top_k=30, top_p=0.9)])
def test_sampling_matches_the_model_distribution(sampling):
    """The next token after a fixture prompt (a peaked distribution: high temperatures),
    drawn 20000 times: counts against the float64 reference distribution (chi-square over the
    tokens it keeps, those expected fewer than 5 times lumped into one bin); none outside."""
    logits = _next_token_logits()
    probs = _reference_probs(logits, sampling)
    draws = 20_000
    tokens = np.asarray(sample(jnp.tile(jnp.asarray(logits)[None], (draws, 1)),
                               jax.random.PRNGKey(1), sampling))
    counts = np.bincount(tokens, minlength=probs.size)
    kept = probs > 0
    assert counts[~kept].sum() == 0
    assert 3 <= kept.sum() < probs.size or sampling == Sampling(3.0)
    expected = draws * probs
    big = expected >= 5
    lumped = kept & ~big
    observed = np.append(counts[big], counts[lumped].sum())
    expected = np.append(expected[big], expected[lumped].sum())
    nonzero = expected > 0
    assert stats.chisquare(observed[nonzero], expected[nonzero]).pvalue > 1e-3


def test_bad_inputs_name_the_field():
    model = load_pretrained(FIXTURES / "llama_gqa_tied")
    ids, mask, _ = _prompts("llama_gqa_tied")
    for field, make in (("temperature", lambda: Sampling(-0.5)),
                        ("top_p", lambda: Sampling(top_p=0.0)),
                        ("top_p", lambda: Sampling(top_p=1.5)),
                        ("top_k", lambda: Sampling(top_k=-1))):
        with pytest.raises(ConfigError, match=field):
            make()
    with pytest.raises(DataError, match="left padding"):
        generate(model, ids, mask[:, ::-1], max_new_tokens=2)
    with pytest.raises(DataError, match="max_position_embeddings 64"):
        generate(model, ids, mask, max_new_tokens=57)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate(model, ids, mask, max_new_tokens=0)
    with pytest.raises(DataError, match="non-empty"):
        left_pad([[3, 4], []], pad_id=0)
    with pytest.raises(DataError, match=r"vocab_size"):
        generate(model, ids + 100, mask, max_new_tokens=2)


def test_cli_refuses_bad_sampling_before_loading(capsys):
    config = str(Path(__file__).parents[1] / "configs" / "tiny-test.yaml")
    assert main(["generate", config, "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p: expected a number in (0, 1]" in capsys.readouterr().err

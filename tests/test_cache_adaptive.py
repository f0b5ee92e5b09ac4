"""Adaptive top-k caches (top_p, bytes_per_token): the kept ids, the exact tail, ragged storage,
the k_t+1-bucket loss and the writer's fidelity audit, each against a float64 numpy reference;
the budget on stored bytes (shared over a shard) against the files TensorStore writes; format
1 to 4 caches still read."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from actors.inspect import describe
from pipeline import losses
from pipeline.cache import (CacheManifest, CacheReader, CacheWriter, RunDeclaration, TargetSpec,
                            audit, budget, compress, ragged, read_manifest)
from pipeline.cache.format import (MANIFEST_KEY, array_layout, array_metadata_key,
                                   raw_token_bytes, shard_file_key)
from pipeline.errors import CacheError, ConfigError

V, REAL_V, L, K = 61, 57, 6, 9


def _logits(seed, rows, length=L):
    """Rows of differing peakiness, so that k_t varies within and across sequences."""
    rng = np.random.default_rng(seed)
    scale = np.linspace(0.5, 6.0, rows * length).reshape(rows, length, 1)
    return (rng.standard_normal((rows, length, V)) * scale).astype(np.float32)


def _ref_logp(logits):
    x = logits.astype(np.float64)
    x[..., REAL_V:] = -np.inf
    return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(
        -1, keepdims=True)


def _ref_counts(logp_sorted, spec, extra=None):
    """k_t per token of one sequence [L, K] (descending float64 log-probs); a budget keeps
    ``extra`` ids beyond min_k (default: what format 2's raw budget affords)."""
    if spec.top_p is not None:
        cum = np.cumsum(np.exp(logp_sorted), -1)
        return np.clip(np.argmax(cum >= spec.top_p, -1) + 1 + (cum[:, -1] < spec.top_p) * K,
                       spec.min_k, K)
    length = len(logp_sorted)
    if extra is None:
        per_token, per_id = raw_token_bytes(spec)
        extra = int(length * (spec.bytes_per_token - per_token) // per_id) - length * spec.min_k
    cand = logp_sorted[:, spec.min_k:]
    order = sorted(np.ndindex(cand.shape), key=lambda tj: (-cand[tj], tj))
    counts = np.full(length, spec.min_k)
    for t, _ in order[:extra]:
        counts[t] += 1
    return counts


def _stored(logits, spec):
    """The stored arrays of rows ``logits`` [S, L, V] (a budget: each row on its own, as live
    scoring keeps it)."""
    encoded = {n: np.asarray(a) for n, a in compress.encode(jnp.asarray(logits),
                                                            jnp.arange(len(logits)),
                                                            spec).items()}
    return encoded if spec.bytes_per_token is None else budget.cut(encoded, spec)


@pytest.mark.parametrize("rule,encoding", [
    (dict(top_p=0.9, min_k=2), "gap"),
    (dict(bytes_per_token=20.0, min_k=1, format_version=2), "packed")])  # raw budget
def test_kept_ids_exact_tail_and_ragged_storage_match_float64(rule, encoding):
    spec = TargetSpec("topk", V, REAL_V, k=K, value_dtype="float32", id_encoding=encoding,
                      **rule)
    logits = _logits(1, 2)
    stored = _stored(logits, spec)
    got = {n: np.asarray(a) for n, a in compress.decode(stored, spec).items()}
    logp = _ref_logp(logits)
    order = np.argsort(-logp, -1)[..., :K]
    top = np.take_along_axis(logp, order, -1)
    counts = np.stack([_ref_counts(top[b], spec) for b in range(2)])
    np.testing.assert_array_equal(stored["id_count"], counts)
    assert len(np.unique(counts)) > 2  # the rule did vary k
    if spec.bytes_per_token:  # each sequence within its raw budget
        per_token, per_id = raw_token_bytes(spec)
        assert np.all(per_token + per_id * counts.mean(-1) <= spec.bytes_per_token)
    for b, t in np.ndindex(2, L):
        k_t = counts[b, t]
        kept = order[b, t, :k_t]
        ids, lp = got["teacher_topk_ids"][b, t], got["teacher_topk_logprobs"][b, t]
        assert sorted(ids[:k_t]) == sorted(kept) and np.all(ids[k_t:] == -1)
        assert np.all(lp[k_t:] == -np.inf)
        np.testing.assert_allclose(np.sort(lp[:k_t]), np.sort(logp[b, t, kept]), rtol=1e-5)
        outside = np.setdiff1d(np.arange(REAL_V), kept)
        want_tail = np.log(np.exp(logp[b, t, outside]).sum())
        np.testing.assert_allclose(got["teacher_tail_logmass"][b, t], want_tail, rtol=1e-5)
    # ragged storage: exact inverse, and a row holds sum(k_t) values, then zeros
    packed = ragged.pack(stored, spec)
    back = ragged.unpack(packed, spec)
    assert set(back) == set(stored)
    for name in stored:
        np.testing.assert_array_equal(back[name], stored[name], err_msg=name)
    for row in range(2):
        assert packed["values"].shape[1] == L * K
        assert np.all(packed["values"][row, counts[row].sum():] == 0)
        assert np.all(packed["values"][row, :counts[row].sum()] != 0)


def _ref_bucket_kl(s, ids, logprobs, tail, temperature):
    """Forward KL over the k_t+1 buckets per token, float64 (ids < 0: unused slots)."""
    out = np.zeros(s.shape[:-1])
    for index in np.ndindex(s.shape[:-1]):
        log_q = _ref_logp(s[index][None] / temperature)[0]
        used = ids[index] >= 0
        kept, p_kept = ids[index][used], logprobs[index][used].astype(np.float64)
        outside = np.setdiff1d(np.arange(REAL_V), kept)
        q_tail = np.log(np.exp(log_q[outside]).sum())
        out[index] = (np.exp(p_kept) * (p_kept - log_q[kept])).sum() + np.exp(tail[index]) * (
            tail[index] - q_tail)
    return out


def test_loss_is_the_kt_plus_one_bucket_kl_of_float64_with_its_gradient():
    spec = TargetSpec("topk", V, REAL_V, k=K, top_p=0.85, min_k=1, value_dtype="float32",
                      temperature=2.0)
    decoded = compress.decode(compress.encode(jnp.asarray(_logits(3, 2)), jnp.arange(2), spec),
                              spec)
    targets = losses.TopKTargets(decoded["teacher_topk_ids"], decoded["teacher_topk_logprobs"],
                                 decoded["teacher_tail_logmass"])
    assert len(np.unique(np.sum(np.asarray(targets.ids) >= 0, -1))) > 2
    student = np.random.default_rng(4).standard_normal((2, L, V)).astype(np.float32) * 2
    np_targets = [np.asarray(x) for x in targets]

    @jax.jit
    def ours(s, targets):
        return losses.token_losses(s, targets, temperature=2.0, valid_vocab_size=REAL_V).divergence

    divergence, grad = jax.jit(jax.value_and_grad(lambda s: jnp.sum(ours(s, targets))))(student)
    np.testing.assert_allclose(float(divergence), _ref_bucket_kl(student, *np_targets, 2.0).sum(),
                               rtol=1e-5)
    per_token = np.asarray(ours(student, targets))
    np.testing.assert_allclose(per_token, _ref_bucket_kl(student, *np_targets, 2.0), rtol=1e-4,
                               atol=1e-6)
    # gradient against central differences of the float64 reference (two tokens, all ids)
    eps, want = 1e-5, np.zeros((2, V))
    x = student.astype(np.float64)
    for t, v in np.ndindex(2, V):
        shifted = [x[:1, t:t + 1].copy() for _ in range(2)]
        shifted[0][..., v] += eps
        shifted[1][..., v] -= eps
        up, down = (_ref_bucket_kl(y, *(a[:1, t:t + 1] for a in np_targets), 2.0).sum()
                    for y in shifted)
        want[t, v] = (up - down) / (2 * eps)
    np.testing.assert_allclose(np.asarray(grad)[0, :2], want, atol=2e-5)
    # unused slots dropped == fixed top-k_t targets of the same ids (masked equals sliced)
    k0 = int(np.sum(np_targets[0][0, 0] >= 0))
    sliced = losses.TopKTargets(*(jnp.asarray(a[:1, :1, :k0]) for a in np_targets[:2]),
                                jnp.asarray(np_targets[2][:1, :1]))
    np.testing.assert_allclose(float(ours(student[:1, :1], sliced)[0, 0]), per_token[0, 0],
                               rtol=1e-6)


def test_audit_kl_and_mass_match_float64():
    spec = TargetSpec("topk", V, REAL_V, k=K, top_p=0.7, min_k=1)  # q8: lossy values too
    logits = _logits(5, 1)
    encoded = compress.encode(jnp.asarray(logits), jnp.arange(1), spec)
    decoded = {n: np.asarray(a)[0] for n, a in compress.decode(encoded, spec).items()}
    kl, mass = (np.asarray(a) for a in audit.reconstruction_kl(
        jnp.asarray(logits[0]), {n: jnp.asarray(a) for n, a in decoded.items()}, spec))
    logp = _ref_logp(logits)[0]
    for t in range(L):
        used = decoded["teacher_topk_ids"][t] >= 0
        kept = decoded["teacher_topk_ids"][t][used]
        log_r = np.full(REAL_V, decoded["teacher_tail_logmass"][t] - np.log(REAL_V - used.sum()),
                        np.float64)
        log_r[kept] = decoded["teacher_topk_logprobs"][t][used]
        p = np.exp(logp[t, :REAL_V])
        np.testing.assert_allclose(kl[t], (p * (logp[t, :REAL_V] - log_r)).sum(), rtol=1e-4,
                                   atol=1e-7)
        np.testing.assert_allclose(mass[t], p[kept].sum(), rtol=1e-5)
    record = audit.shard_audit(kl[None], mass[None], np.asarray(encoded["id_count"]))
    assert record["kl_p99"] == pytest.approx(np.percentile(kl.astype(np.float64), 99))
    assert record["k_mean"] == pytest.approx(np.asarray(encoded["id_count"]).mean())


@pytest.mark.parametrize("fields", [
    dict(k=K, value_dtype="q8", id_encoding="packed"), dict(k=K, value_dtype="bfloat16"),
    dict(k=REAL_V, value_dtype="float32")])  # k = the real vocab: no id beyond the candidates
def test_candidate_audit_matches_the_logits_audit_for_every_code(fields):
    spec = TargetSpec("topk", V, REAL_V, min_k=1, bytes_per_token=40.0, temperature=0.7,
                      **fields)
    logits = _logits(8, 2)
    candidates = {n: np.asarray(a) for n, a in
                  compress.encode(jnp.asarray(logits), jnp.arange(2), spec).items()}
    counts = np.random.default_rng(0).integers(1, spec.k + 1, (2, L))
    stored = compress.cut(candidates, counts, spec)
    np.testing.assert_array_equal(stored["id_count"], counts)
    kl, mass = audit.candidate_audit(candidates, stored, spec)
    decoded = compress.decode(stored, spec)
    for row in range(2):
        want_kl, want_mass = audit.reconstruction_kl(
            jnp.asarray(logits[row]), {n: a[row] for n, a in decoded.items()}, spec)
        np.testing.assert_allclose(kl[row], want_kl, rtol=2e-4, atol=2e-6)
        np.testing.assert_allclose(mass[row], want_mass, rtol=1e-5)
    assert np.all(np.isfinite(kl)) and kl.max() > 1e-3


def _reads_as_encoded(location, logits, spec, run, stored=None):
    got = CacheReader(location, run).read(list(range(len(logits))))
    want = compress.decode(stored or _stored(logits, spec), spec)
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)


def _on_disk(location, spec, shard):
    return sum((location / shard_file_key(a, shard)).stat().st_size for a in array_layout(spec))


def test_shard_budget_cache_roundtrip_audit_and_versions_1_to_4_still_read(tmp_path):
    length, budget_b = 48, 14.0
    spec = TargetSpec("topk", V, REAL_V, k=K, bytes_per_token=budget_b, min_k=1)
    m = CacheManifest(spec, "teacher", "tok", "data", seq_len=length, num_sequences=5,
                      shard_sequences=2)
    logits = _logits(6, 5, length)
    with CacheWriter(tmp_path / "v5", m) as writer:  # batches that straddle the shards
        writer.write(jnp.asarray(logits[:3]), np.arange(3))
        writer.write(jnp.asarray(logits[3:]), np.arange(3, 5))
    run = RunDeclaration("tok", "data", V, length, 1.0)
    candidates = {n: np.asarray(a) for n, a in
                  compress.encode(jnp.asarray(logits), jnp.arange(5), spec).items()}
    shards = [slice(0, 2), slice(2, 4), slice(4, 5)]
    stored = [budget.cut({n: a[rows] for n, a in candidates.items()}, spec, shard=(2, 1))
              for rows in shards]
    stored = {n: np.concatenate([s[n] for s in stored]) for n in stored[0]}
    _reads_as_encoded(tmp_path / "v5", logits, spec, run, stored)
    # the budget is on a shard's stored bytes: the files on disk are exactly what was measured,
    # within B per token, and near it (the short last shard's index keeps 16 bytes per absent
    # sequence and array)
    for shard, rows in enumerate(shards):
        measured = budget.stored_bytes({n: a[rows] for n, a in stored.items()}, spec,
                                       shard_sequences=2)
        assert _on_disk(tmp_path / "v5", spec, shard) == measured
        tokens = (rows.stop - rows.start) * length
        assert 0.8 * budget_b * tokens < measured <= budget_b * tokens
    # ... spent on the most probable candidates of the whole shard (float64 reference), which
    # moves ids between its sequences: each sequence on its own keeps other counts
    logp = _ref_logp(logits)
    top = -np.sort(-logp, -1)[..., :K]
    counts = stored["id_count"].astype(np.int64)
    assert len(np.unique(counts)) > 2
    for rows in shards:
        extra = int(counts[rows].sum()) - counts[rows].size * spec.min_k
        np.testing.assert_array_equal(counts[rows].ravel(),
                                      _ref_counts(top[rows].reshape(-1, K), spec, extra))
    alone = _stored(logits, spec)
    assert np.any(alone["id_count"][:4].sum(-1) != counts[:4].sum(-1))
    for row in range(5):  # live scoring: each sequence within B on its own
        one = {n: a[row:row + 1] for n, a in alone.items()}
        assert budget.stored_bytes(one, spec, shard_sequences=1) <= budget_b * length
    # format 3's codecs (format 4's and 5's too): token-major byte-shuffled gaps
    meta = json.loads((tmp_path / "v5" / "id_gaps" / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"][0]["configuration"]["codecs"]] == [
        "bytes", "blosc", "crc32c"]
    # the audit, at every token, from the candidates: as the logits' (float64-checked) audit
    manifest = read_manifest(tmp_path / "v5")
    audits = [c.audit for c in manifest.commits]
    assert [a["tokens"] for a in audits] == [2 * length, 2 * length, length]
    decoded = compress.decode(stored, spec)
    kl, mass = audit.candidate_audit(candidates, stored, spec)
    for row in range(5):
        want_kl, want_mass = audit.reconstruction_kl(
            jnp.asarray(logits[row]), {n: a[row] for n, a in decoded.items()}, spec)
        np.testing.assert_allclose(kl[row], want_kl, rtol=2e-4, atol=2e-6)
        np.testing.assert_allclose(mass[row], want_mass, rtol=1e-5)
    for shard, rows in enumerate(shards):
        assert audits[shard]["kl_mean"] == pytest.approx(kl[rows].astype(np.float64).mean())
        assert audits[shard]["k_mean"] == pytest.approx(counts[rows].mean())
    printed = describe(str(tmp_path / "v5"))  # kdpipe inspect: token-weighted over the shards
    tokens = 5 * length
    kl_mean = sum(a["kl_mean"] * a["tokens"] for a in audits) / tokens
    assert f"KL(teacher || reconstruction) mean {kl_mean:.4g} nats over {tokens} audited" in printed
    assert f"largest shard p99 {max(a['kl_p99'] for a in audits):.4g}" in printed
    assert "format      version 5" in printed
    assert "1..9 ids per token (<= 14 stored B/token over each shard) log-probs" in printed
    # format 4 kept the budget per sequence: each one's measure within B, the shard's file
    # their sum less one index crc (4 bytes) per array
    v4 = TargetSpec("topk", V, REAL_V, k=K, bytes_per_token=budget_b, min_k=1, format_version=4)
    with CacheWriter(tmp_path / "v4", CacheManifest(v4, "teacher", "tok", "data",
                                                    seq_len=length, num_sequences=2,
                                                    shard_sequences=2)) as writer:
        writer.write(jnp.asarray(logits[:2]), np.arange(2))
    per_sequence = _stored(logits[:2], v4)
    measured = [budget.stored_bytes({n: a[row:row + 1] for n, a in per_sequence.items()}, v4,
                                    shard_sequences=1) for row in range(2)]
    assert max(measured) <= budget_b * length
    assert _on_disk(tmp_path / "v4", v4, 0) == sum(measured) - 4 * len(array_layout(v4))
    _reads_as_encoded(tmp_path / "v4", logits[:2], v4, run)
    assert "format      version 4" in describe(str(tmp_path / "v4"))
    assert "(<= 14 stored B/token over each sequence)" in describe(str(tmp_path / "v4"))
    # version 3 (q8 values with a per-token scale), version 2 (raw budget, gap lengths + extra
    # bits, slot-major) and version 1 (fixed top-k) caches read unchanged
    v3 = TargetSpec("topk", V, REAL_V, k=5, format_version=3)
    v2 = TargetSpec("topk", V, REAL_V, k=K, bytes_per_token=18.0, min_k=1, format_version=2)
    fixed = TargetSpec("topk", V, REAL_V, k=5, format_version=2)
    assert spec.value_dtype == "q8sqrt" and v3.value_dtype == "q8"
    assert "value_scale" not in {a.name for a in array_layout(spec)}
    short = _logits(7, 3)
    for name, old in (("f3", v3), ("v2", v2), ("v1", fixed)):
        with CacheWriter(tmp_path / name, CacheManifest(old, "teacher", "tok", "data",
                                                        seq_len=L, num_sequences=3,
                                                        shard_sequences=2)) as writer:
            writer.write(jnp.asarray(short), np.arange(3))
        assert {a.name for a in array_layout(old)} >= (
            {"id_gaps", "value_scale"} if old is v3 else {"id_gap_lengths", "id_stream"})
        assert (tmp_path / name / array_metadata_key(array_layout(old)[-2])).exists()
    header = json.loads((tmp_path / "v1" / MANIFEST_KEY).read_text())
    header["format_version"] = 1
    for field in ("top_p", "min_k", "bytes_per_token"):
        del header["target"][field]
    (tmp_path / "v1" / MANIFEST_KEY).write_text(json.dumps(header))
    run = RunDeclaration("tok", "data", V, L, 1.0)
    assert CacheReader(tmp_path / "v1", run).manifest.format_version == 1
    assert "(<= 18 raw B/token over each sequence)" in describe(str(tmp_path / "v2"))
    assert "format      version 3" in describe(str(tmp_path / "f3"))
    for name, old in (("f3", v3), ("v2", v2), ("v1", fixed)):
        _reads_as_encoded(tmp_path / name, short, old, run)


def test_largest_fitting_meets_its_contract_in_few_probes():
    rng = np.random.default_rng(0)
    for trial in range(200):
        most = int(rng.integers(1, 300_000))
        slope, jitter = rng.uniform(0.3, 2.0), rng.uniform(0, 40)  # bytes per id; zstd's noise
        noise = rng.uniform(-jitter, jitter, 64)
        probes = []

        def size(extra, base=float(rng.uniform(50, 5000))):
            probes.append(extra)
            return int(base + slope * extra + noise[extra % 64])
        limit = int(size(int(rng.integers(0, most + 1))) + rng.uniform(-10, 10))
        probes.clear()
        extra = budget.largest_fitting(size, limit, most)
        assert 0 <= extra <= most and extra in probes + [0]
        if size(0) > limit:
            assert extra == 0
            continue
        assert size(extra) <= limit
        assert (extra == most or size(extra) >= limit * (1 - budget.SLACK)
                or size(extra + 1) > limit), (trial, extra)
        assert len(set(probes)) <= 2 * np.log2(most + 1) + 4, (trial, len(set(probes)))
    assert budget.largest_fitting(lambda e: 10 * e, 5, 0) == 0
    assert budget.largest_fitting(lambda e: 100 + e, 5, 9) == 0
    assert budget.largest_fitting(lambda e: e, 50, 9) == 9


def test_bad_adaptive_settings_name_the_field():
    from pipeline.config import load_config

    with pytest.raises(CacheError, match="bytes_per_token expected a number >= "):
        TargetSpec("topk", V, REAL_V, k=K, bytes_per_token=3.0, min_k=1)
    with pytest.raises(CacheError, match="min_k expected an int in"):
        TargetSpec("topk", V, REAL_V, k=K, top_p=0.9, min_k=K + 1)
    with pytest.raises(CacheError, match="top_p expected None"):
        TargetSpec("sampled", V, REAL_V, n_draws=4, top_p=0.9)
    for overrides, message in ((["cache.top_p=0.9", "cache.bytes_per_token=50"], "set one"),
                               (["cache.top_p=1.5"], "cache.top_p"),
                               (["cache.mode=sampled", "cache.top_p=0.9"], "needs mode topk"),
                               (["cache.top_p=0.9", "cache.min_k=65"], "cache.min_k")):
        with pytest.raises(ConfigError, match=message):
            load_config("configs/demo.yaml", overrides)

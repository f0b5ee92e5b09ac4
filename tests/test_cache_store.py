"""Cache writer and reader on disk: round trips, commit visibility, refusals, corruption,
kill-and-resume and two writers (subprocesses run this file as a script)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from pipeline.cache import (CacheManifest, CacheReader, CacheWriter, RunDeclaration, TargetSpec,
                            read_manifest)
from pipeline.cache import compress
from pipeline.cache.format import (FORMAT_VERSION, MANIFEST_KEY, PADDED_LOGIT, array_layout,
                                   check_compatible, shard_file_key)
from pipeline.errors import CacheError

V, REAL_V, L, N, SHARD = 50, 45, 4, 6, 2


def teacher_logits(sequences):
    """Deterministic fake teacher: logits of a sequence depend on its index only."""
    return np.stack([np.random.default_rng(int(s)).standard_normal((L, V)).astype(np.float32) * 3
                     for s in sequences])


def manifest(target=None, **fields):
    target = target or TargetSpec("topk", V, REAL_V, k=5)
    base = dict(teacher_fingerprint="teacher-a", tokenizer_fingerprint="tok-a",
                dataset_fingerprint="data-a", seq_len=L, num_sequences=N,
                shard_sequences=SHARD, chunk_sequences=1)
    return CacheManifest(target, **{**base, **fields})


def run_for(m, **fields):
    base = dict(tokenizer_fingerprint=m.tokenizer_fingerprint,
                dataset_fingerprint=m.dataset_fingerprint, vocab_size=m.target.vocab_size,
                seq_len=m.seq_len, temperature=m.target.temperature or 1.0)
    return RunDeclaration(**{**base, **fields})


def write_shards(location, m, shards, pause_s=0.0):
    """One teacher batch per shard, as a teacher host would; with a pause, each shard is
    committed before it (so that the commits are spaced out, whatever the first one costs)."""
    with CacheWriter(location, m) as writer:
        for shard in writer.pending_shards(shards):
            sequences = np.arange(*m.shard_range(shard))
            writer.write(jnp.asarray(teacher_logits(sequences)), sequences)
            if pause_s:
                writer.flush()
                time.sleep(pause_s)


def stored_and_commits(location, m):
    reader = CacheReader(location, run_for(m))
    return reader.read_stored(np.arange(N)), read_manifest(location).commits


def spawn_writer(location, shards, pause_s):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, __file__, str(location), ",".join(map(str, shards)),
                             str(pause_s)], env=env, cwd=os.path.dirname(os.path.dirname(__file__)))


SPECS = [
    TargetSpec("topk", V, REAL_V, k=5),
    TargetSpec("topk", V, REAL_V, k=5, value_dtype="bfloat16", id_encoding="packed"),
    TargetSpec("topk", V, REAL_V, k=5, value_dtype="float32", temperature=2.0),
    TargetSpec("topk", V, REAL_V, k=7, top_p=0.8, min_k=2, id_encoding="packed"),
    TargetSpec("sampled", V, REAL_V, n_draws=7),
    TargetSpec("sampled", V, REAL_V, n_draws=7, id_encoding="packed"),
    TargetSpec("full", V, REAL_V, temperature=None),
    TargetSpec("full", V, REAL_V, value_dtype="bfloat16", temperature=None),
]


@pytest.mark.parametrize("target", SPECS, ids=lambda t: f"{t.mode}-{t.id_encoding}-{t.value_dtype}")
def test_roundtrip_every_mode(tmp_path, target):
    m = manifest(target, num_sequences=5)  # a short last shard
    write_shards(tmp_path, m, range(m.num_shards))
    reader = CacheReader(f"file://{tmp_path}", run_for(m))  # a kvstore URL, same code path
    assert reader.committed_shards == {0, 1, 2}
    sequences = np.array([4, 0, 3])
    expected = compress.decode(compress.encode(jnp.asarray(teacher_logits(sequences)),
                                               jnp.asarray(sequences), target), target)
    got = reader.read(sequences)
    assert set(got) == set(expected)
    for key in expected:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(expected[key]))
    batches = [[1, 2], [4], [0, 3]]
    for batch, fetched in zip(batches, reader.prefetch(batches)):
        for key, value in reader.read(batch).items():
            np.testing.assert_array_equal(np.asarray(fetched[key]), np.asarray(value))


def test_uncommitted_shards_are_invisible_until_committed(tmp_path):
    m = manifest()
    write_shards(tmp_path, m, [0])
    reader = CacheReader(tmp_path, run_for(m))
    reader.read([0, 1])
    with pytest.raises(CacheError, match=r"shards \[1\] .*not committed"):
        reader.read([1, 2])
    with pytest.raises(CacheError, match=r"\[2\] still not committed"):
        reader.wait_for_shards([0, 2], timeout_s=0.2, poll_s=0.05)
    with pytest.raises(CacheError, match="not committed"):
        list(reader.prefetch([[0], [2]]))
    # a shard given only in part stays uncommitted
    with CacheWriter(tmp_path, m) as writer:
        writer.write(jnp.asarray(teacher_logits([4])), np.array([4]))
        writer.flush()
        assert writer.incomplete_shards == [2]
    write_shards(tmp_path, m, [1])
    reader.wait_for_shards([1], timeout_s=5, poll_s=0.05)
    assert reader.read([2])["teacher_topk_ids"].shape == (1, L, 5)


def test_bad_writer_input_names_the_argument(tmp_path):
    with CacheWriter(tmp_path, manifest()) as writer:
        with pytest.raises(CacheError, match="logits expected shape"):
            writer.write(jnp.zeros((1, L, V + 1)), np.array([0]))
        with pytest.raises(CacheError, match=r"sequence_indices expected in \[0, 6\)"):
            writer.write(jnp.zeros((1, L, V)), np.array([6]))
        with pytest.raises(CacheError, match="sequence_indices expected a 1-D int"):
            writer.write(jnp.zeros((1, L, V)), np.array([0.0]))


def test_writer_refuses_to_join_a_different_cache(tmp_path):
    write_shards(tmp_path, manifest(), [0])
    with pytest.raises(CacheError, match="target.k is 5 in the cache but the run declares 6"):
        CacheWriter(tmp_path, manifest(TargetSpec("topk", V, REAL_V, k=6)))
    with pytest.raises(CacheError, match="dataset_fingerprint is 'data-a' .* 'data-b'"):
        CacheWriter(tmp_path, manifest(dataset_fingerprint="data-b"))


@pytest.mark.parametrize("field, value, message", [
    ("tokenizer_fingerprint", "tok-b", "tokenizer_fingerprint is 'tok-a' .* declares 'tok-b'"),
    ("dataset_fingerprint", "data-b", "dataset_fingerprint is 'data-a' .* declares 'data-b'"),
    ("seq_len", 8, "seq_len is 4 .* declares 8"),
    ("teacher_fingerprint", "teacher-b", "teacher_fingerprint is 'teacher-a' .* 'teacher-b'"),
    ("vocab_size", 64, "vocab_size is 50 .* declares 64"),
    ("tokenizer_vocab_size", 44, "tokenizer_vocab_size is 45 .* declares 44"),
    ("temperature", 2.0, "temperature is 1.0 .* declares 2.0"),
])
def test_mismatched_run_is_refused_naming_field_and_values(field, value, message):
    m = manifest()
    with pytest.raises(CacheError, match=message):
        check_compatible(m, run_for(m, **{field: value}))


def test_padded_vocab_and_temperature_rules():
    m = manifest()
    check_compatible(m, run_for(m, vocab_size=64, tokenizer_vocab_size=REAL_V))
    check_compatible(m, run_for(m, teacher_fingerprint="teacher-a"))
    with pytest.raises(CacheError, match="vocab_size >= it"):
        check_compatible(m, run_for(m, vocab_size=40, tokenizer_vocab_size=REAL_V))
    full = manifest(TargetSpec("full", V, REAL_V, temperature=None))
    for temperature in (0.5, 4.0):
        check_compatible(full, run_for(full, temperature=temperature))


def test_full_mode_read_at_another_padded_width(tmp_path):
    m = manifest(TargetSpec("full", V, REAL_V, temperature=None))
    write_shards(tmp_path, m, [0])
    logits = np.asarray(CacheReader(tmp_path, run_for(m, vocab_size=64,
                                                      tokenizer_vocab_size=REAL_V)).read([1])[
        "teacher_logits"])
    assert logits.shape == (1, L, 64)
    np.testing.assert_array_equal(logits[..., :REAL_V], teacher_logits([1])[..., :REAL_V])
    assert np.all(logits[..., REAL_V:] == PADDED_LOGIT)


def test_newer_format_version_is_refused(tmp_path):
    m = manifest()
    write_shards(tmp_path, m, [0])
    header = json.loads((tmp_path / MANIFEST_KEY).read_text())
    header["format_version"] += 1
    (tmp_path / MANIFEST_KEY).write_text(json.dumps(header))
    with pytest.raises(CacheError, match=f"format_version {FORMAT_VERSION + 1} is not one this "
                       f"kdpipe reads"):
        CacheReader(tmp_path, run_for(m))


def test_missing_or_malformed_cache_is_refused(tmp_path):
    m = manifest()
    with pytest.raises(CacheError, match="no manifest.json"):
        CacheReader(tmp_path, run_for(m))
    write_shards(tmp_path, m, [0])
    shutil.rmtree(tmp_path / "values")
    with pytest.raises(CacheError, match="array 'values' cannot be opened"):
        CacheReader(tmp_path, run_for(m))
    (tmp_path / MANIFEST_KEY).write_text('{"format_version": 1}')
    with pytest.raises(CacheError, match="malformed manifest.json"):
        CacheReader(tmp_path, run_for(m))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_shard_is_an_error_naming_it(tmp_path, damage):
    m = manifest()
    write_shards(tmp_path, m, [0, 1])
    path = tmp_path / shard_file_key(array_layout(m.target)[-2], 1)  # the values of shard 1
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 3] ^= 0x40
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-9]))
    else:
        path.unlink()
    reader = CacheReader(tmp_path, run_for(m))
    reader.read([0, 1])
    with pytest.raises(CacheError, match=f"shard 1 is corrupt: file {shard_file_key(array_layout(m.target)[-2], 1)}"):
        reader.read([3])


def test_damage_after_verification_is_caught_by_chunk_checksums(tmp_path):
    m = manifest()
    write_shards(tmp_path, m, [0])
    reader = CacheReader(tmp_path, run_for(m))
    reader.read([0])
    path = tmp_path / shard_file_key(array_layout(m.target)[0], 0)
    data = bytearray(path.read_bytes())
    data[4] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"reading shards \[0\] failed"):
        reader.read([0])


def test_killed_writer_rerun_equals_uninterrupted(tmp_path):
    # ragged shards (adaptive top-k: a budget on stored bytes shared over each shard, cut and
    # measured once the shard is complete), whose commit records also carry the fidelity audit
    m = manifest(TargetSpec("topk", V, REAL_V, k=7, bytes_per_token=68.0, min_k=1))
    write_shards(tmp_path / "reference", m, range(m.num_shards))
    killed = tmp_path / "killed"
    CacheWriter(killed, m).close()  # create the manifest so the worker joins it
    worker = spawn_writer(killed, range(m.num_shards), pause_s=0.4)
    commits = killed / "commits"
    deadline = time.monotonic() + 60
    while not (commits.exists() and len(os.listdir(commits)) >= 1):
        assert worker.poll() is None and time.monotonic() < deadline, "worker ended early"
        time.sleep(0.02)
    time.sleep(0.25)  # somewhere inside the next shard
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    done = read_manifest(killed).committed
    assert 1 <= len(done) < m.num_shards
    # what a kill during a shard's write leaves behind: a partial file of an uncommitted shard
    pending = min(set(range(m.num_shards)) - done)
    (killed / shard_file_key(array_layout(m.target)[0], pending)).parent.mkdir(
        parents=True, exist_ok=True)
    (killed / shard_file_key(array_layout(m.target)[0], pending)).write_bytes(b"partial")
    write_shards(killed, m, range(m.num_shards))
    ref_arrays, ref_commits = stored_and_commits(tmp_path / "reference", m)
    got_arrays, got_commits = stored_and_commits(killed, m)
    assert got_commits == ref_commits  # same files, byte for byte (sizes and crc32)
    for name in ref_arrays:
        np.testing.assert_array_equal(got_arrays[name], ref_arrays[name])


def test_shard_workers_write_the_bytes_of_one(tmp_path):
    """Shards written by several worker threads at once (a budget's cut on the host among
    them) are the bytes one worker writes; every sequence in one batch, so that all shards
    are complete together."""
    m = manifest(TargetSpec("topk", V, REAL_V, k=7, bytes_per_token=68.0, min_k=1))
    for name, workers in (("one", 1), ("three", 3)):
        with CacheWriter(tmp_path / name, m, shard_workers=workers) as writer:
            writer.write(jnp.asarray(teacher_logits(range(N))), np.arange(N))
            # the same rows again, while their shards may still be being written: dropped
            writer.write(jnp.asarray(teacher_logits(range(N))), np.arange(N))
    ref_arrays, ref_commits = stored_and_commits(tmp_path / "one", m)
    got_arrays, got_commits = stored_and_commits(tmp_path / "three", m)
    assert got_commits == ref_commits and len(got_commits) == m.num_shards
    for name in ref_arrays:
        np.testing.assert_array_equal(got_arrays[name], ref_arrays[name])


def test_a_failed_shard_write_surfaces_and_the_others_commit(tmp_path, monkeypatch):
    m = manifest()
    write = CacheWriter._write_shard

    def failing(self, shard, data):
        if shard == 1:
            raise OSError("disk full")
        write(self, shard, data)

    monkeypatch.setattr(CacheWriter, "_write_shard", failing)
    writer = CacheWriter(tmp_path / "c", m, shard_workers=2)
    writer.write(jnp.asarray(teacher_logits(range(N))), np.arange(N))
    with pytest.raises(CacheError, match="background write failed: OSError..disk full"):
        writer.flush()
    with pytest.raises(CacheError, match="disk full"):
        writer.close()
    assert read_manifest(tmp_path / "c").committed == {0, 2}


def test_two_writer_processes_equal_one(tmp_path):
    m = manifest()
    write_shards(tmp_path / "one", m, range(m.num_shards))
    two = tmp_path / "two"
    workers = [spawn_writer(two, range(m.num_shards)[host::2], pause_s=0.0) for host in (0, 1)]
    assert [w.wait(timeout=120) for w in workers] == [0, 0]
    ref_arrays, ref_commits = stored_and_commits(tmp_path / "one", m)
    got_arrays, got_commits = stored_and_commits(two, m)
    assert got_commits == ref_commits
    for name in ref_arrays:
        np.testing.assert_array_equal(got_arrays[name], ref_arrays[name])


if __name__ == "__main__":
    # subprocess writer: LOCATION SHARDS(comma-separated) PAUSE_S; the target is taken from an
    # existing manifest (kill test) or is the default topk one (two-writer test)
    location, shards, pause = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], float(sys.argv[3])
    try:
        declared = read_manifest(location)
        declared = CacheManifest(**{**declared.__dict__, "commits": ()})
    except CacheError:
        declared = manifest()
    write_shards(location, declared, shards, pause)


def test_a_cache_is_created_once_its_arrays_exist_not_at_its_manifest(tmp_path):
    from pipeline.cache.format import is_created
    from pipeline.cache.store import open_kvstore
    from pipeline.cache.writer import create_or_join

    location = str(tmp_path / "c")
    m = manifest()
    store = open_kvstore(location)
    assert not is_created(store, location)
    create_or_join(location, m)  # what a writer does first: a reader cannot open it yet
    assert not is_created(store, location)
    with pytest.raises(CacheError, match="cannot be opened"):
        CacheReader(location, run_for(m))
    CacheWriter(location, m).close()
    assert is_created(store, location)
    assert CacheReader(location, run_for(m)).committed_shards == frozenset()


def test_shard_arithmetic_matches_the_rows_each_shard_holds():
    from pipeline.cache.format import num_shards, shard_of, shards_of

    rng = np.random.default_rng(0)
    for _ in range(20):
        rows, per_shard = int(rng.integers(1, 200)), int(rng.integers(1, 40))
        m = manifest(num_sequences=rows, shard_sequences=per_shard, chunk_sequences=1)
        holder = np.concatenate([np.full(m.shard_range(s)[1] - m.shard_range(s)[0], s)
                                 for s in range(num_shards(rows, per_shard))])
        assert len(holder) == rows and m.num_shards == num_shards(rows, per_shard)
        picked = rng.integers(0, rows, size=int(rng.integers(1, 10)))
        np.testing.assert_array_equal(shard_of(picked, per_shard), holder[picked])
        assert shards_of(picked, per_shard) == sorted(set(holder[picked].tolist()))
        assert m.shards_of(picked) == shards_of(picked, per_shard)


def test_every_mode_says_what_it_stores_and_what_its_kl_is():
    from pipeline.cache.format import MODES

    specs = {"topk": TargetSpec("topk", V, REAL_V, k=5),
             "sampled": TargetSpec("sampled", V, REAL_V, n_draws=7),
             "full": TargetSpec("full", V, REAL_V, value_dtype="float32", temperature=None)}
    assert set(specs) == set(MODES)
    assert specs["topk"].stored.startswith("top-5 ") and "7 sampled draws" in specs["sampled"].stored
    assert len({spec.kl_meaning for spec in specs.values()}) == len(MODES)

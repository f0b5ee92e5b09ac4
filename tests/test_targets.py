"""pipeline.targets picks one reader per split for each teacher source; actors.remote's requests
carry a split and rows only. Plain Python: fake openers and fake teacher actors, no Ray cluster."""

from __future__ import annotations

import pickle
import typing

import numpy as np
import pytest

from actors.remote import REMOTE_AHEAD, RemoteTargets, TeacherHosts, answer
from pipeline.config import RunConfig, TeacherSource
from pipeline.errors import ConfigError
from pipeline.targets import SOURCES, HybridTargets, Openers, pick_readers

SPLITS = ("train", "eval")


class FakeCache:
    """A cache opener's reader: holds the rows below ``committed_below``."""

    def __init__(self, split: str, committed_below: int = 8):
        self.split, self.committed_below, self.reads = split, committed_below, []

    def has(self, rows) -> bool:
        return bool(np.all(np.asarray(rows) < self.committed_below))

    def read(self, rows):
        self.reads.append(np.asarray(rows).tolist())
        return {"from": "cache"}


class FakeRemote:
    def __init__(self, split: str, wanted):
        self.split, self.wanted, self.fetched = split, wanted, []

    def take(self, rows):
        return ("ref", tuple(np.asarray(rows).tolist()))

    def fetch(self, rows, ref=None):
        self.fetched.append(ref)
        return {"from": "remote"}

    def read(self, rows):
        return self.fetch(rows, self.take(rows))


def openers(cache: bool = True, remote: bool = True) -> Openers:
    return Openers(cache=FakeCache if cache else None, remote=FakeRemote if remote else None)


def test_every_teacher_source_has_one_entry():
    assert set(SOURCES) == set(typing.get_args(TeacherSource))


def test_only_offline_has_its_cache_filled_by_the_teacher_hosts():
    assert [name for name, source in SOURCES.items() if source.fills_cache] == ["offline"]


def test_live_reads_nothing_the_teacher_runs_in_the_step():
    assert SOURCES["live"].teacher_in_step
    assert pick_readers("live", SPLITS, openers()) is None


def test_offline_reads_the_cache_and_nothing_without_one():
    readers = pick_readers("offline", SPLITS, openers(remote=False))
    assert {s: (type(r), r.split) for s, r in readers.items()} == {
        "train": (FakeCache, "train"), "eval": (FakeCache, "eval")}
    # a hard-label run without a cache section: held-out cross-entropy only
    assert pick_readers("offline", SPLITS, openers(cache=False, remote=False)) == {}
    assert pick_readers("offline", ["eval"], openers()).keys() == {"eval"}


def test_remote_asks_the_teacher_hosts_for_every_batch():
    readers = pick_readers("remote", SPLITS, openers(cache=False))
    assert all(isinstance(r, FakeRemote) and r.split == s for s, r in readers.items())
    assert all(r.wanted(np.arange(100)) for r in readers.values())


@pytest.mark.parametrize("source", ["remote", "hybrid"])
def test_sources_asking_teacher_hosts_are_refused_without_them(source):
    refused = f"cluster.teacher_source: '{source}' needs teacher actors"
    with pytest.raises(ConfigError, match=refused):
        pick_readers(source, SPLITS, openers(remote=False))
    # refused even when no split is read (a hard-label run under kdpipe train)
    with pytest.raises(ConfigError, match="kdpipe run"):
        pick_readers(source, [], openers(remote=False))


def test_hybrid_reads_committed_batches_from_the_cache_and_the_rest_remotely():
    reader = pick_readers("hybrid", ["train"], openers())["train"]
    assert isinstance(reader, HybridTargets)
    cache, remote = reader.cache, reader.remote
    # the remote reader asks ahead only for batches the cache does not hold
    assert not remote.wanted(np.arange(4)) and remote.wanted(np.arange(6, 10))
    assert reader.read(np.arange(4)) == {"from": "cache"}
    assert reader.read(np.arange(6, 10)) == {"from": "remote"}
    assert cache.reads == [[0, 1, 2, 3]]
    assert remote.fetched == [("ref", (6, 7, 8, 9))]
    assert reader.cached_batches == 1


def test_source_needs_match_the_readers_they_open():
    for name, source in SOURCES.items():
        if source.teacher_in_step:
            continue
        used = {"cache": False, "remote": False}

        def cache(split, used=used):
            used["cache"] = True
            return FakeCache(split)

        def remote(split, wanted, used=used):
            used["remote"] = True
            return FakeRemote(split, wanted)

        pick_readers(name, ["train"], Openers(cache=cache, remote=remote))
        assert used == {"cache": source.reads_cache, "remote": source.asks_teacher_hosts}, name


class FakeMethod:
    def __init__(self, calls: list, rank: int):
        self.calls, self.rank = calls, rank

    def remote(self, call):
        self.calls.append((self.rank, pickle.dumps(call)))
        return f"ref-{len(self.calls)}"


class FakeTeacher:
    """A teacher host actor: ``run.remote(call)`` records the pickled call."""

    def __init__(self, calls: list, rank: int):
        self.run = FakeMethod(calls, rank)


def test_a_remote_request_carries_the_split_and_rows_only():
    calls: list = []
    teachers = [FakeTeacher(calls, rank) for rank in range(3)]
    batches = [np.arange(i * 4, i * 4 + 4) for i in range(10)]
    reader = RemoteTargets(TeacherHosts(teachers, spec=None, vocab_size=64, first=1), "eval",
                           schedule=iter(batches))
    assert reader.take(batches[0]) == "ref-1"
    # REMOTE_AHEAD in flight after the one taken, round-robin over the hosts from `first`
    assert len(calls) == REMOTE_AHEAD + 1
    assert [rank for rank, _ in calls] == [(1 + i) % 3 for i in range(REMOTE_AHEAD + 1)]
    for (_, payload), rows in zip(calls, batches):
        fn, args, kwargs = pickle.loads(payload)
        assert fn is answer and kwargs == {}
        assert args[0] == "eval" and len(args) == 2
        np.testing.assert_array_equal(args[1], rows)
        assert RunConfig.__name__.encode() not in payload
        assert len(payload) < 512  # the rows and a function's name, nothing config-sized


def test_targets_decoded_on_the_device_reach_the_mesh_without_the_host(monkeypatch):
    """global_batch hands device arrays to JAX as they are: on an accelerator a host copy
    would be a device -> host -> device trip per batch (on CPU both paths share memory, so the
    handover itself is what is checked)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import pipeline.train
    from pipeline.train import global_batch

    handed = {}
    make = jax.make_array_from_process_local_data

    def spy(sharding, local_data):
        handed[id(local_data)] = local_data
        return make(sharding, local_data)

    monkeypatch.setattr(pipeline.train.jax, "make_array_from_process_local_data", spy)
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
    rows = 2 * jax.device_count()
    want = np.arange(rows * 3 * 5, dtype=np.float32).reshape(rows, 3, 5)
    decoded = jnp.asarray(want)
    batch = global_batch({"teacher_logits": decoded, "input_ids": np.zeros((rows, 3), np.int32)},
                         sharding)
    assert handed.get(id(decoded)) is decoded  # not a host copy of it
    assert batch["teacher_logits"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(batch["teacher_logits"]), want)
    assert batch["input_ids"].shape == (rows, 3)

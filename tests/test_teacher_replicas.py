"""Teacher replicas of several hosts (``cluster.teacher.hosts_per_replica``) on a multi-node
``ray.cluster_utils.Cluster`` (one node per teacher host, Ray actors with num_cpus=0, JAX over
gloo): 2 replicas x 2 hosts fill a cache (its bytes_per_token budget shared over each shard,
format 5's, so the writer cuts on the host) byte-identical to one teacher on one device, with a
replica's writing host SIGKILLed mid-fill (a shard's files written, its commit record not):
the replica is formed again on new hosts and the shard rewritten once. One run shows both (a
run without the kill costs CI another ~40 s and shows nothing more: every other shard of this
run is written undisturbed).

The run's student takes 2 steps: the driver returns once the fill is complete.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from actors.cluster import connect
from actors.work import fill_shard
from pipeline.config import load_config
from tiny_run import TINY, make_tiny_run, quiet_run

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TEACHERS = "{hosts: 4, hosts_per_replica: 2, resources: {teacher: 1}}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny run's files, the reference cache written in this process (one teacher on one
    device: ``kdpipe cache``'s way) and a cluster of a head and four teacher nodes."""
    from pipeline.models.build import build_model
    from pipeline.models.hf_io import teacher_fingerprint
    from pipeline.teacher import fill_cache, teacher_mesh

    work = tmp_path_factory.mktemp("teacher-replicas")
    overrides = make_tiny_run(work) + ["train.steps=2", "optimizer.warmup_steps=1", "eval.every_steps=0",
                                       "checkpoint.every_steps=2", "cache.bytes_per_token=24",
                                       "cache.min_k=1"]
    reference = load_config(TINY, [*overrides, f"cache.path={work / 'reference'}"])
    teacher = build_model(reference.model.teacher, frozen=True, mesh=teacher_mesh(reference.mesh))
    for split in ("train", "eval"):
        fill_cache(reference, teacher, split,
                   teacher_fp=teacher_fingerprint(reference.model.teacher.path))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    for _ in range(4):
        cluster.add_node(num_cpus=0, resources={"teacher": 1})
    cluster.wait_for_nodes()
    connect(cluster.address)
    yield work, overrides
    ray.shutdown()
    cluster.shutdown()


def files(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (arrays, commit records, manifest), by relative path."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def config_of(tiny, name: str, *more: str):
    work, overrides = tiny
    return load_config(TINY, [*overrides, f"run_dir={work / name}",
                              f"cache.path={work / name / 'cache'}",
                              f"cluster.teacher={TEACHERS}", *more])


def killing_fill(host, config, split, shard, teacher_fp):
    """``fill_shard``; but the first replica's writer (its JAX process 0) to start a train shard
    once two are committed SIGKILLs its process when the shard's array files are written,
    before its commit record. The marker file (the shard), created exclusively, makes it
    happen once in the run."""
    import jax

    commits = Path(config.cache.path) / "train" / "commits"
    if split == "train" and jax.process_index() == 0 and len(list(commits.glob("*"))) >= 2:
        try:
            fd = os.open(Path(config.run_dir) / "killed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.write(fd, str(shard).encode())
            os.close(fd)
            import pipeline.cache.writer as writer

            def die(shard):  # stands in for the commit record's key, the writer's last step
                os.kill(os.getpid(), signal.SIGKILL)

            writer.commit_key = die
    return fill_shard(host, config, split, shard, teacher_fp)


def test_two_replicas_of_two_hosts_fill_the_cache_of_one_device_despite_a_killed_host(tiny):
    work, _ = tiny
    want = files(work / "reference")
    assert want  # both splits, every shard committed

    config = config_of(tiny, "replicas")
    Path(config.run_dir).mkdir(parents=True)
    outcome = quiet_run(config, fill=killing_fill)
    killed = int((Path(config.run_dir) / "killed").read_text())
    assert outcome.teacher_hosts == 4 and outcome.teacher_hosts_lost >= 1
    assert outcome.result.step == 2
    written = [(split, shard) for split, shard, _ in outcome.shards_written]
    assert written.count(("train", killed)) == 1  # committed once, after the replica's loss
    assert files(Path(config.cache.path)) == want

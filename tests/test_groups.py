"""Host groups on a simulated multi-node Ray cluster (ray.cluster_utils.Cluster).

One cluster per module (each node start costs seconds): a head plus two "student" nodes and
one "teacher" node, each with its custom resource and a matching node label.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from actors.cluster import connect, resolve_address
from actors.groups import (GroupSpec, HostGroup, HostGroupError, HostTimeoutError,
                           InsufficientResourcesError)
from actors.hosts import HostEnv
from pipeline.errors import ConfigError, KdpipeError

# The work functions below travel to the actors by value: this test module is not importable
# in Ray's worker processes.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROLE = "kdpipe-role"


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = {}
    for name, role in (("s0", "student"), ("s1", "student"), ("t0", "teacher")):
        nodes[name] = c.add_node(num_cpus=1, resources={role: 1}, labels={ROLE: role})
    connect(c.address)
    c.wait_for_nodes()
    yield {name: node.node_id for name, node in nodes.items()}
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def student_group(cluster):
    group = HostGroup.create(GroupSpec("student", 2, {"student": 1}), placement_timeout_s=60)
    yield group
    group.shutdown()


def test_one_actor_per_host_and_groups_kept_apart(cluster, student_group):
    teacher_spec = GroupSpec("teacher", 1, {"CPU": 0.5}, label_selector={ROLE: "teacher"})
    with HostGroup.create(teacher_spec, placement_timeout_s=60) as teachers:
        students = student_group.info()
        [teacher] = teachers.info()
    assert [h.rank for h in students] == [0, 1]
    assert {h.node_id for h in students} == {cluster["s0"], cluster["s1"]}
    assert teacher.node_id == cluster["t0"]
    assert len({h.pid for h in students}) == 2


def test_more_hosts_than_the_cluster_has_is_a_clear_error(cluster, student_group):
    spec = GroupSpec("student", 3, {"student": 1})
    t0 = time.monotonic()
    with pytest.raises(InsufficientResourcesError) as caught:
        HostGroup.create(spec, placement_timeout_s=3)
    assert time.monotonic() - t0 < 30
    message = str(caught.value)
    assert "could not place 3 host(s) of {'student': 1}" in message
    assert "STRICT_SPREAD" in message
    assert "4 alive node(s), 2 of which could hold one host" in message
    assert isinstance(caught.value, KdpipeError)
    # The failed reservation was released: only the fixture's group is still placed.
    live = [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
    assert len(live) == 1


def _psum_of_ranks(host):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("hosts",))
    local = np.full((1, 3), float(host.rank + 1), np.float32)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("hosts")), local)
    total = jax.jit(jax.shard_map(lambda b: jax.lax.psum(b, "hosts"), mesh=mesh,
                                  in_specs=P("hosts"), out_specs=P()))(x)
    return np.asarray(total.addressable_data(0)).tolist(), jnp.zeros(()).dtype.name


def test_two_hosts_form_one_jax_program(student_group):
    infos = student_group.setup_jax(distributed=True)
    assert [(i.process_index, i.process_count, i.global_devices) for i in infos] == [(0, 2, 2), (1, 2, 2)]
    results = student_group.run(_psum_of_ranks, timeout_s=120)
    # psum over hosts of (rank + 1): 1 + 2 on every host.
    assert results == [([[3.0, 3.0, 3.0]], "float32")] * 2


@pytest.fixture
def local_pair(cluster):
    group = HostGroup.create(GroupSpec.local("pair", 2, HostEnv(cores_per_host=1)),
                             placement_timeout_s=60)
    yield group
    group.request_stop()
    group.shutdown()


def _fail_everywhere(host, shard):
    raise ValueError(f"shard {shard}: checksum mismatch")


def test_same_failure_on_all_ranks_is_reported_once(local_pair):
    with pytest.raises(HostGroupError) as caught:
        local_pair.run(_fail_everywhere, 7, timeout_s=60)
    err = caught.value
    assert sorted(err.failures) == [0, 1] and err.lost_ranks == [] and err.unfinished == []
    message = str(err)
    assert message.count("ranks 0, 1: ValueError: shard 7: checksum mismatch") == 1
    assert "pair group: run failed on 2 of 2 hosts" in message


def test_a_host_that_fails_to_start_is_reported_and_released(cluster):
    broken = GroupSpec.local("broken", 2, HostEnv(env_vars=(("KDPIPE_FLAG", 1),)))  # not a str
    with pytest.raises(HostGroupError) as caught:
        HostGroup.create(broken, placement_timeout_s=60)
    err = caught.value
    assert sorted(err.failures) == [0, 1] and err.lost_ranks == []
    assert "ranks 0, 1: the host failed to start: TypeError: str expected, not int" in str(err)
    live = [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
    assert len(live) == 1  # the module's student group only


def _work_until_stopped(host):
    while not host.stop_requested():
        time.sleep(0.05)
    return host.rank


def test_timeout_names_the_busy_ranks_and_stop_ends_the_work(local_pair):
    refs = local_pair.submit(_work_until_stopped)
    with pytest.raises(HostTimeoutError, match=r"pair group: run did not finish within 0.5 s on ranks \[0, 1\] of 2"):
        local_pair.gather(refs, timeout_s=0.5)
    local_pair.request_stop()
    assert local_pair.gather(refs, timeout_s=30) == {0: 0, 1: 1}


def test_host_killed_mid_work_surfaces_as_actor_error_by_rank(local_pair):
    refs = local_pair.submit(_work_until_stopped)
    deadline = time.monotonic() + 30
    while not all(h.busy for h in local_pair.info()):  # info answers while run works
        assert time.monotonic() < deadline
        time.sleep(0.1)
    victim = local_pair.info()[1]
    os.kill(victim.pid, signal.SIGKILL)
    with pytest.raises(HostGroupError) as caught:
        local_pair.gather(refs, timeout_s=60)
    err = caught.value
    assert list(err.failures) == [1] and err.lost_ranks == [1] and err.unfinished == [0]
    assert isinstance(err.failures[1], ray.exceptions.RayActorError)
    assert "rank 1: ActorDiedError" in str(err)
    assert local_pair.unhealthy(timeout_s=10) == [1]


def test_hosts_on_one_machine_get_distinct_cores(local_pair):
    infos = local_pair.info()
    cores = os.sched_getaffinity(0)
    if len(cores) >= 2:
        assert len({h.cpu_affinity for h in infos}) == 2
    assert all(len(h.cpu_affinity) == 1 for h in infos)
    # The work thread (where XLA starts its pools) is pinned too, not only the control thread.
    work_threads = local_pair.run(lambda host: tuple(sorted(os.sched_getaffinity(0))))
    assert work_threads == [h.cpu_affinity for h in infos]
    assert all("--xla_cpu_multi_thread_eigen=false" in h.env["XLA_FLAGS"] for h in infos)
    assert all(h.env["JAX_PLATFORMS"] == "cpu" for h in infos)


def test_host_env_and_group_spec_checks():
    env = HostEnv(cpu_devices=4, cores_per_host=2, env_vars=(("FOO", "1"),))
    flags = env.variables()["XLA_FLAGS"]
    assert "--xla_force_host_platform_device_count=4" in flags
    assert "intra_op_parallelism_threads=2" in flags
    assert env.variables()["FOO"] == "1"
    assert env.cores_for(1, [0, 1, 2]) == [0, 2]  # wraps around the node's cores
    assert HostEnv().cores_for(3, [0, 1]) is None
    with pytest.raises(ValueError, match="cores_per_host: expected >= 1, got 0"):
        HostEnv(cores_per_host=0)
    with pytest.raises(KdpipeError, match="num_hosts: expected >= 1, got 0"):
        GroupSpec("student", 0, {"CPU": 1})
    with pytest.raises(KdpipeError, match="cannot reserve an empty bundle"):
        GroupSpec("student", 2, {"CPU": 0})
    with pytest.raises(KdpipeError, match="strategy: expected one of .* got 'SPREADED'"):
        GroupSpec("student", 2, {"CPU": 1}, strategy="SPREADED")
    spec = GroupSpec("teacher", 2, {"TPU": 4}, head_resources={"TPU-v4-16-head": 1})
    assert spec.bundles() == [{"TPU": 4, "TPU-v4-16-head": 1}, {"TPU": 4}]


def test_tpu_slice_spec_follows_the_topology():
    v4 = GroupSpec.for_tpu_slice("student", "2x2x2", "v4")
    assert (v4.num_hosts, v4.resources_per_host["TPU"], v4.env.platform) == (2, 4, "tpu")
    v5e = GroupSpec.for_tpu_slice("student", "4x4", "v5litepod")
    assert (v5e.num_hosts, v5e.resources_per_host["TPU"]) == (4, 4)
    with pytest.raises(KdpipeError, match="accelerator_version 'v5e'.*v5litepod"):
        GroupSpec.for_tpu_slice("student", "4x4", "v5e")


def test_connect_without_address_starts_a_loopback_embedded_ray():
    # A fresh process: this one is attached to the module's cluster.
    code = ("from actors.cluster import connect; c = connect(num_cpus=1); "
            "import ray; print('CONNECTED', c.address, c.dashboard_url, ray.cluster_resources()['CPU'])")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("CONNECTED"))
    assert line.startswith("CONNECTED None http://127.0.0.1:") and line.endswith(" 1.0"), line


def test_resolve_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert resolve_address(None) == "10.0.0.2:6379"
    assert resolve_address("auto") == "auto"
    with pytest.raises(ConfigError, match="address: expected a Ray GCS address .* got 'http://h:8265'"):
        resolve_address("http://h:8265")


def test_resolve_address_falls_back_to_cluster_address(monkeypatch):
    """``cluster.address`` is joined when neither --address nor RAY_ADDRESS is given."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None, "10.0.0.3:6379") == "10.0.0.3:6379"
    assert resolve_address("auto", "10.0.0.3:6379") == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert resolve_address(None, "10.0.0.3:6379") == "10.0.0.2:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ConfigError, match="cluster.address: expected a Ray GCS address"):
        resolve_address(None, "http://h:8265")

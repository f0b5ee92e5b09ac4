"""A group of host actors: exactly one ``HostActor`` per host, placed with a placement group.

``HostGroup.create(spec)`` reserves one bundle per host (STRICT_SPREAD across the nodes of a
cluster; PACK for N hosts side by side on one machine; a ``ray.util.tpu`` slice placement group
on TPU pods), starts one actor in each bundle (bundle i = rank i; rank 0 is the JAX
coordinator) and waits until every actor answers. Calls fan out to all ranks and are collected
with ``ray.wait``; failures come back grouped: ranks that failed the same way are reported
once, with their ranks, in one ``HostGroupError`` (``actors.group_errors``). The driver decides
what to do with it (retry, re-form the group, ``replace_hosts`` of one JAX program in a group of
several programs): this module never retries.

A group's hosts form one JAX program (the student group), or several programs of consecutive
ranks (a teacher group of replicas, ``setup_jax(hosts_per_program=...)``; one host each: hosts
that run alone).

Keeping teacher and student groups apart is a matter of resources: give the teacher hosts a
custom resource (``ray start --resources '{"teacher": 1}'``) or a node label and ask for it in
``GroupSpec.resources_per_host`` / ``GroupSpec.label_selector``.
"""

from __future__ import annotations

import collections
import dataclasses
import time
import uuid
from typing import Any, Callable, Mapping

import ray
from ray.util import tpu as ray_tpu
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.group_errors import HostGroupError, HostTimeoutError, InsufficientResourcesError
from actors.hosts import CONTROL_GROUP, HostActor, HostEnv, HostInfo, JaxInfo
from pipeline.errors import KdpipeError

# Reserving hosts on an autoscaling cluster can take minutes (a TPU VM boots in ~3-5 min).
PLACEMENT_TIMEOUT_S = 600.0
# Actor start (a fresh Python process per host) and jax.distributed.initialize.
START_TIMEOUT_S = 120.0
# After the first failure, how long to keep collecting the other ranks' outcomes, so that a
# failure shared by all ranks (or a peer dying with its collective partner) is reported once.
FAILURE_GRACE_S = 3.0
# jax.distributed.shutdown and friends on teardown; past it the actors are killed anyway.
TEARDOWN_TIMEOUT_S = 15.0

# Ray rejects a bundle whose resources are all zero. Hosts side by side on one machine only
# need concurrency, not cores, so each reserves this sliver of a CPU.
LOCAL_HOST_CPU = 0.01

STRATEGIES = frozenset({"PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"})  # Ray's placement strategies


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """A TPU slice reserved through ``ray.util.tpu.slice_placement_group`` (one bundle per
    TPU VM host, all on one pod, host 0 = the pod's worker 0)."""

    topology: str  # "2x2x2" (v4), "4x4" (v5e)
    accelerator_version: str  # Ray's names: "v4", "v5litepod" (v5e), "v5p", "v6e"


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """What one group asks of the cluster.

    Attributes:
      name: the group's name ("teacher", "student"); used in errors and the placement group.
      num_hosts: how many hosts (= actors = bundles).
      resources_per_host: one bundle, e.g. {"TPU": 4}, {"GPU": 8, "CPU": 8}, {"CPU": 1,
        "student": 1}. The actor holds the whole bundle.
      strategy: "STRICT_SPREAD" (one host per node: real clusters), "PACK" / "STRICT_PACK"
        (several hosts on one machine), "SPREAD".
      head_resources: extra resources for host 0 only, e.g. {"TPU-v4-16-head": 1} so that
        rank 0 lands on a pod's worker 0.
      label_selector: node labels every host must carry, e.g. {"kdpipe-role": "teacher"}.
      env: the process setup of every host (JAX platform, XLA flags, core pinning).
      tpu: reserve a TPU slice with ray.util.tpu instead; num_hosts and resources_per_host
        must then be what ``GroupSpec.for_tpu_slice`` computed.
    """

    name: str
    num_hosts: int
    resources_per_host: Mapping[str, float]
    strategy: str = "STRICT_SPREAD"
    head_resources: Mapping[str, float] = dataclasses.field(default_factory=dict)
    label_selector: Mapping[str, str] = dataclasses.field(default_factory=dict)
    env: HostEnv = HostEnv()
    tpu: TpuSlice | None = None

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise KdpipeError(f"{self.name} group: strategy: expected one of {sorted(STRATEGIES)}, "
                              f"got {self.strategy!r}")
        if self.num_hosts < 1:
            raise KdpipeError(f"{self.name} group: num_hosts: expected >= 1, got {self.num_hosts}")
        if not any(v > 0 for v in self.resources_per_host.values()):
            raise KdpipeError(
                f"{self.name} group: resources_per_host: expected at least one resource > 0 "
                f"(Ray cannot reserve an empty bundle), got {dict(self.resources_per_host)}"
            )
        if any(v < 0 for v in self.resources_per_host.values()):
            raise KdpipeError(
                f"{self.name} group: resources_per_host: expected amounts >= 0, "
                f"got {dict(self.resources_per_host)}"
            )

    @classmethod
    def local(cls, name: str, num_hosts: int, env: HostEnv = HostEnv()) -> "GroupSpec":
        """``num_hosts`` hosts side by side on this machine (laptop demo, tests)."""
        return cls(name, num_hosts, {"CPU": LOCAL_HOST_CPU}, strategy="PACK", env=env)

    @classmethod
    def for_tpu_slice(
        cls, name: str, topology: str, accelerator_version: str, env: HostEnv = HostEnv("tpu")
    ) -> "GroupSpec":
        """One host per TPU VM of a slice: the host count and per-host chips follow from the
        topology (ray.util.tpu's arithmetic, e.g. v4 2x2x2 -> 2 hosts of 4 chips)."""
        try:
            num_hosts, resources = ray_tpu.get_tpu_worker_resources(topology, accelerator_version)
        except ValueError as err:
            raise KdpipeError(
                f"{name} group: tpu topology {topology!r} / accelerator_version "
                f"{accelerator_version!r}: {err}"
            ) from err
        return cls(
            name, num_hosts, resources, strategy="SPREAD", env=env,
            tpu=TpuSlice(topology, accelerator_version),
        )

    def bundles(self) -> list[dict[str, float]]:
        bundles = [dict(self.resources_per_host) for _ in range(self.num_hosts)]
        for key, amount in self.head_resources.items():
            bundles[0][key] = bundles[0].get(key, 0) + amount
        return bundles


def cluster_census(spec: GroupSpec) -> str:
    """What the alive nodes offer of the resources the spec asks for, one line per node."""
    wanted = set(spec.resources_per_host) | set(spec.head_resources) | {"CPU"}
    bundle = dict(spec.resources_per_host)
    lines, fitting = [], 0
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    for node in nodes:
        total = node.get("Resources", {})
        labels = node.get("Labels", {}) or {}
        fits = all(total.get(k, 0) >= v for k, v in bundle.items()) and all(
            labels.get(k) == v for k, v in spec.label_selector.items())
        fitting += fits
        shown = {k: total[k] for k in sorted(wanted) if k in total}
        own_labels = {k: v for k, v in labels.items() if k in spec.label_selector}
        lines.append(f"    {node.get('NodeManagerAddress')}: {shown}"
                     + (f" labels {own_labels}" if spec.label_selector else "")
                     + ("" if fits else "  (cannot hold one host)"))
    head = (f"  the cluster has {len(nodes)} alive node(s), {fitting} of which could hold one host "
            "(by total resources; other groups may hold some of them):")
    return "\n".join([head] + lines)


def _placement_name(spec: GroupSpec) -> str:
    # Readable in the dashboard; unique because names must be, and a re-formed group's
    # reservation can overlap the removal of the previous one.
    return f"kdpipe-{spec.name}-{uuid.uuid4().hex[:8]}"


def _remote_host_class():
    # One control thread next to the default (work) thread: see actors.hosts.
    return ray.remote(concurrency_groups={CONTROL_GROUP: 1})(HostActor)


def _start_host(spec: GroupSpec, pg, rank: int, local_index: int):
    """The actor of host ``rank``, in bundle ``rank`` of ``pg`` (holding the whole bundle)."""
    bundle = pg.bundle_specs[rank]
    return _remote_host_class().options(
        num_cpus=bundle.get("CPU", 0),
        num_gpus=bundle.get("GPU", 0),
        resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
        scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=rank),
        # a host Ray restarted by itself would silently miss the JAX program; the driver
        # replaces hosts or re-forms the group
        max_restarts=0,
    ).remote(spec.name, rank, spec.num_hosts, spec.env, local_index)


class HostGroup:
    """One actor per host of a placement group; see the module docstring.

    Use ``HostGroup.create(spec)``, then ``setup_jax``, ``run``/``submit``+``gather``, and
    ``shutdown`` (or ``with HostGroup.create(spec) as group:``).
    """

    def __init__(self, spec: GroupSpec, pg, actors: list, tpu_handle=None,
                 local_index: list[int] | None = None):
        self.spec = spec
        self._pg = pg
        self._actors = actors
        self._local_index = local_index or [0] * len(actors)
        self._tpu_handle = tpu_handle
        self._program_hosts = 1  # hosts per JAX program (setup_jax)
        self._closed = False

    # ---- placement ---------------------------------------------------------------------------

    @classmethod
    def create(cls, spec: GroupSpec, *, placement_timeout_s: float = PLACEMENT_TIMEOUT_S,
               start_timeout_s: float = START_TIMEOUT_S) -> "HostGroup":
        """Reserve one bundle per host, start one actor in each, wait until all answer.

        Raises:
          InsufficientResourcesError: the hosts could not be placed within
            ``placement_timeout_s`` (the message states the request and the cluster).
          HostGroupError: an actor failed to start.
        """
        pg, tpu_handle = cls._reserve(spec, placement_timeout_s)
        ready, _ = ray.wait([pg.ready()], timeout=placement_timeout_s)
        if not ready:
            census = cluster_census(spec)
            cls._release(pg, tpu_handle)
            raise InsufficientResourcesError(
                f"{spec.name} group: could not place {spec.num_hosts} host(s) of "
                f"{dict(spec.resources_per_host)} each"
                + (f" (+{dict(spec.head_resources)} on host 0)" if spec.head_resources else "")
                + (f" on nodes labelled {dict(spec.label_selector)}" if spec.label_selector else "")
                + f" with strategy {spec.strategy} within {placement_timeout_s:g} s"
                + (" (actors.groups.PLACEMENT_TIMEOUT_S: the time an autoscaler gets to add nodes)"
                   if placement_timeout_s == PLACEMENT_TIMEOUT_S else "")
                + f";\n{census}"
            )
        if tpu_handle is not None:
            tpu_handle.release_head_pgs()

        node_of_bundle = placement_group_table(pg)["bundles_to_node_id"]
        seen_on_node: dict[str, int] = collections.Counter()
        local_index = []
        for rank in range(spec.num_hosts):
            local_index.append(seen_on_node[node_of_bundle[rank]])
            seen_on_node[node_of_bundle[rank]] += 1

        actors = [_start_host(spec, pg, rank, local_index[rank]) for rank in range(spec.num_hosts)]
        group = cls(spec, pg, actors, tpu_handle, local_index)
        try:
            group.gather({r: a.healthy.remote() for r, a in enumerate(actors)},
                         timeout_s=start_timeout_s, call="start")
        except BaseException:
            group.shutdown()
            raise
        return group

    @property
    def hosts_per_program(self) -> int:
        """Hosts per JAX program, as ``setup_jax`` formed them (1: each host alone)."""
        return self._program_hosts

    def program_ranks(self, rank: int) -> list[int]:
        """The ranks of the JAX program ``rank`` belongs to (``setup_jax``)."""
        first = rank - rank % self._program_hosts
        return list(range(first, first + self._program_hosts))

    def replace_hosts(self, rank: int, *, timeout_s: float = START_TIMEOUT_S) -> list[JaxInfo]:
        """New actors for every host of ``rank``'s JAX program, in their bundles (the
        reservation outlives dead actors; Ray moves a bundle whose node is gone when another
        node can hold it), forming that program again: a JAX program cannot take in a new
        process, so its survivors (stuck in a collective with the dead) go too.

        For groups of several programs (``setup_jax(distributed=False)`` or
        ``hosts_per_program``); a student group, one program, is re-formed whole instead.

        Raises:
          HostGroupError: a new host failed to start.
          HostTimeoutError: they did not start within ``timeout_s`` (no room for a bundle).
        """
        ranks = self.program_ranks(rank)
        for r in ranks:
            ray.kill(self._actors[r], no_restart=True)  # dead already, or hung
            self._actors[r] = _start_host(self.spec, self._pg, r, self._local_index[r])
        self.gather({r: self._actors[r].healthy.remote() for r in ranks}, timeout_s=timeout_s,
                    call="start")
        return list(self._setup(ranks, timeout_s).values())

    @staticmethod
    def _reserve(spec: GroupSpec, timeout_s: float):
        selectors = [dict(spec.label_selector)] * spec.num_hosts if spec.label_selector else None
        if spec.tpu is None:
            pg = placement_group(spec.bundles(), strategy=spec.strategy, name=_placement_name(spec),
                                 bundle_label_selector=selectors)
            return pg, None
        try:
            handle = ray_tpu.slice_placement_group(
                spec.tpu.topology, spec.tpu.accelerator_version,
                resources_per_bundle=dict(spec.resources_per_host),
                strategy=spec.strategy, name=_placement_name(spec),
                head_reservation_timeout_s=timeout_s, bundle_label_selector=selectors,
            )
        except RuntimeError as err:  # ray.util.tpu could not reserve a slice head in time
            raise InsufficientResourcesError(
                f"{spec.name} group: no free TPU slice {spec.tpu.accelerator_version} "
                f"{spec.tpu.topology} within {timeout_s:g} s ({err});\n{cluster_census(spec)}"
            ) from err
        if handle.num_hosts != spec.num_hosts:
            handle.shutdown()
            raise KdpipeError(
                f"{spec.name} group: num_hosts: the TPU slice {spec.tpu.topology} has "
                f"{handle.num_hosts} hosts, the spec asked for {spec.num_hosts}"
            )
        return handle.placement_group, handle

    @staticmethod
    def _release(pg, tpu_handle) -> None:
        if tpu_handle is not None:
            tpu_handle.shutdown()
        else:
            remove_placement_group(pg)

    # ---- fan-out -------------------------------------------------------------------------------

    @property
    def num_hosts(self) -> int:
        return self.spec.num_hosts

    @property
    def placement_group(self):
        """The group's Ray placement group (one bundle per rank)."""
        return self._pg

    def actor(self, rank: int):
        """The actor handle of one host (for the driver's own per-rank calls)."""
        return self._actors[rank]

    def submit(self, fn: Callable[..., Any], *args, ranks: list[int] | None = None,
               **kwargs) -> dict[int, ray.ObjectRef]:
        """Start ``fn(host_context, *args, **kwargs)`` on the given ranks (default: all);
        returns rank -> reference. The call is ``ray.put`` once and shared by all ranks."""
        call = ray.put((fn, args, kwargs))
        chosen = range(self.num_hosts) if ranks is None else ranks
        return {rank: self._actors[rank].run.remote(call) for rank in chosen}

    def gather(self, refs: Mapping[int, ray.ObjectRef], *, timeout_s: float | None = None,
               call: str = "run") -> dict[int, Any]:
        """Wait for rank -> reference results with ``ray.wait``.

        Returns rank -> result when all succeed. On the first failure it keeps collecting for
        FAILURE_GRACE_S (so ranks failing together are reported together) and raises
        HostGroupError; ranks still running are listed, not cancelled.

        Raises:
          HostGroupError: some rank failed (its exception or RayActorError).
          HostTimeoutError: ``timeout_s`` passed with ranks still running.
        """
        rank_of = {ref: rank for rank, ref in refs.items()}
        results: dict[int, Any] = {}
        failures: dict[int, BaseException] = {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        give_up_at = deadline
        while rank_of:
            wait_s = None if give_up_at is None else max(0.0, give_up_at - time.monotonic())
            ready, _ = ray.wait(list(rank_of), num_returns=1, timeout=wait_s)
            if not ready:
                break
            for ref in ready:
                rank = rank_of.pop(ref)
                try:
                    results[rank] = ray.get(ref)  # already complete: does not block
                except ray.exceptions.RayError as err:
                    failures[rank] = err
            if failures and (give_up_at is None or give_up_at > time.monotonic() + FAILURE_GRACE_S):
                give_up_at = time.monotonic() + FAILURE_GRACE_S
        if failures:
            raise HostGroupError(self.spec.name, call, failures, list(rank_of.values()), self.num_hosts)
        if rank_of:
            raise HostTimeoutError(
                f"{self.spec.name} group: {call} did not finish within {timeout_s:g} s on ranks "
                f"{sorted(rank_of.values())} of {self.num_hosts}"
            )
        return dict(sorted(results.items()))

    def run(self, fn: Callable[..., Any], *args, timeout_s: float | None = None,
            **kwargs) -> list[Any]:
        """``fn(host_context, *args, **kwargs)`` on every host; the results in rank order."""
        return list(self.gather(self.submit(fn, *args, **kwargs), timeout_s=timeout_s).values())

    def setup_jax(self, *, distributed: bool, hosts_per_program: int | None = None,
                  timeout_s: float = START_TIMEOUT_S) -> list[JaxInfo]:
        """Start JAX on every host. ``distributed``: the hosts form JAX programs of
        ``hosts_per_program`` consecutive ranks (None: all hosts, one program), each with
        jax.distributed, its coordinator on its first rank, all its ranks initialising
        concurrently; otherwise each host is its own single-process JAX."""
        per_program = (hosts_per_program or self.num_hosts) if distributed else 1
        if self.num_hosts % per_program:
            raise KdpipeError(f"{self.spec.name} group: hosts_per_program: expected a divisor of "
                              f"its {self.num_hosts} hosts, got {per_program}")
        self._program_hosts = per_program
        return list(self._setup(range(self.num_hosts), timeout_s).values())

    def _setup(self, ranks, timeout_s: float) -> dict[int, JaxInfo]:
        """``setup`` on ``ranks`` (whole programs), each program's coordinator on its first."""
        n = self._program_hosts
        firsts = [r for r in ranks if r % n == 0 and n > 1]
        addresses = dict(zip(firsts, ray.get([self._actors[r].coordinator_address.remote()
                                              for r in firsts], timeout=timeout_s)))
        refs = {r: self._actors[r].setup.remote(addresses.get(r - r % n), n, r % n) for r in ranks}
        return self.gather(refs, timeout_s=timeout_s, call="setup")

    def info(self, timeout_s: float = START_TIMEOUT_S) -> list[HostInfo]:
        """Each host's placement and process setup, in rank order (answered while busy)."""
        refs = {r: a.info.remote() for r, a in enumerate(self._actors)}
        return list(self.gather(refs, timeout_s=timeout_s, call="info").values())

    def poll_status(self, timeout_s: float = 1.0) -> dict[int, dict[str, Any]]:
        """rank -> what each host's work last published (``HostContext.report``), for the
        ranks that answer within ``timeout_s`` (a dead or hung host is simply absent)."""
        rank_of = {a.status.remote(): r for r, a in enumerate(self._actors)}
        ready, _ = ray.wait(list(rank_of), num_returns=len(rank_of), timeout=timeout_s)
        answers = {}
        for ref in ready:
            try:
                answers[rank_of[ref]] = ray.get(ref)  # already complete: does not block
            except ray.exceptions.RayError:
                pass
        return dict(sorted(answers.items()))

    def unhealthy(self, timeout_s: float = 10.0) -> list[int]:
        """Ranks that did not answer a health check within ``timeout_s`` (dead or hung)."""
        rank_of = {a.healthy.remote(): r for r, a in enumerate(self._actors)}
        ready, _ = ray.wait(list(rank_of), num_returns=len(rank_of), timeout=timeout_s)
        bad = {r for ref, r in rank_of.items() if ref not in ready}
        for ref in ready:
            try:
                ray.get(ref)  # already complete: does not block
            except ray.exceptions.RayError:
                bad.add(rank_of[ref])
        return sorted(bad)

    def request_stop(self) -> None:
        """Ask every host's running function to stop at its next check (HostContext)."""
        for actor in self._actors:
            actor.request_stop.remote()

    def request_pause(self) -> None:
        """Ask every host's running function to stop at its next natural boundary
        (``HostContext.pause_event``)."""
        for actor in self._actors:
            actor.request_pause.remote()

    # ---- teardown ------------------------------------------------------------------------------

    def shutdown(self, *, graceful: bool = True) -> None:
        """Leave jax.distributed (bounded wait; skipped when not ``graceful``: after a peer
        died the survivors are stuck in a collective and the teardown call would queue behind
        it for the whole TEARDOWN_TIMEOUT_S), kill the actors, release the reservation.
        Safe to call twice and after hosts died."""
        if self._closed:
            return
        self._closed = True
        if graceful:
            teardown = [a.teardown.remote() for a in self._actors]
            ray.wait(teardown, num_returns=len(teardown), timeout=TEARDOWN_TIMEOUT_S)
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._release(self._pg, self._tpu_handle)

    def __enter__(self) -> "HostGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

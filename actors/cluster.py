"""The Ray cluster the driver runs on: connect to it (an embedded local Ray by default, a
cluster when given an address), and the placement of each host group on it.

- No address (no argument, no RAY_ADDRESS, no ``cluster.address``): start Ray inside this
  process, the laptop default. Its dashboard, if started (``cluster.dashboard``), listens on
  127.0.0.1 only. A start that fails (Ray 2.60 raises a bare ``Exception`` when its raylet is
  not up 30 s after it was started, as on an overloaded machine) is an ``EmbeddedRayError``:
  one message saying what failed and what to do, not Ray's traceback.
- ``address`` (``kdpipe run --address``), else RAY_ADDRESS (what ``ray job submit`` sets for the
  job's entrypoint), else the config's ``cluster.address``: join that cluster's GCS
  ("10.0.0.2:6379", "auto").

Token authentication stays on and is never turned off here. An embedded Ray enables it by
itself; a driver joining a cluster sends the token Ray finds (RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) when RAY_AUTH_MODE is unset. This module does not
force RAY_AUTH_MODE=token on a driver: a driver in token mode cannot join a cluster running
without authentication (its workers fail to start). The HTTP clients of the job server
(`ray job submit`) do need RAY_AUTH_MODE=token against a Ray 2.60 head: deploy/submit.sh sets it.
"""

from __future__ import annotations

import collections
import dataclasses
import os

import ray

from actors.group_errors import InsufficientResourcesError
from actors.groups import LOCAL_HOST_CPU, GroupSpec
from actors.hosts import HostEnv
from pipeline.config import GroupConfig
from pipeline.errors import ConfigError, KdpipeError

LOOPBACK = "127.0.0.1"


def resolve_address(address: str | None, configured: str | None = None) -> str | None:
    """The cluster address to join: ``address``, else RAY_ADDRESS, else ``configured`` (the
    config's ``cluster.address``), else None (embedded Ray).

    Raises:
      ConfigError: an ``http://`` address: that is a dashboard/job-server address, for
        ``ray job submit``, not for a driver joining the cluster.
    """
    named = [("address", address), ("RAY_ADDRESS", os.environ.get("RAY_ADDRESS")),
             ("cluster.address", configured)]
    name, chosen = next(((n, a) for n, a in named if a), (None, None))
    if chosen is not None and chosen.startswith(("http://", "https://")):
        raise ConfigError(
            f"{name}: expected a Ray GCS address such as 10.0.0.2:6379 or 'auto', got {chosen!r} "
            f"(a dashboard URL; submit with `ray job submit --address {chosen}` instead)"
        )
    return chosen


class EmbeddedRayError(KdpipeError):
    """The embedded local Ray did not start."""


@dataclasses.dataclass(frozen=True)
class Connection:
    """Where the driver is connected: ``address`` is None for an embedded Ray."""

    address: str | None
    dashboard_url: str | None


def connect(address: str | None = None, *, configured: str | None = None,
            num_cpus: int | None = None, dashboard: bool = True,
            namespace: str = "kdpipe") -> Connection:
    """Start or join Ray for this driver process.

    Args:
      address: a GCS address to join; None falls back to RAY_ADDRESS, then to ``configured``.
      configured: the config's ``cluster.address``; None: an embedded Ray.
      num_cpus: embedded Ray only: the CPUs it advertises (default: all of this machine).
      dashboard: embedded Ray only: start the dashboard (bound to 127.0.0.1).
      namespace: Ray namespace of the driver (named actors/placement groups live there).

    Raises:
      EmbeddedRayError: the embedded Ray failed to start (Ray's own message included).
    """
    chosen = resolve_address(address, configured)
    if chosen is None:
        try:
            # "local": always a new Ray in this process, even when another one (a `ray start`,
            # a test cluster) left its address in Ray's temp dir, which a bare ray.init() joins.
            context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard,
                               dashboard_host=LOOPBACK, namespace=namespace)
        except Exception as error:  # Ray 2.60 times its raylet out with a bare Exception
            said = " ".join(str(error).split()).rstrip(".")
            raise EmbeddedRayError(
                f"cluster.address: none given, so kdpipe started an embedded local Ray, which "
                f"failed to start: {said}. If it timed out, retry when this machine is less "
                f"loaded; Ray's logs are in session_latest/logs under its temp dir (RAY_TMPDIR, "
                f"default /tmp/ray: raylet.out, gcs_server.out); or start Ray "
                f"apart (`ray start --head`) and give its address with --address, RAY_ADDRESS "
                f"or cluster.address") from error
    else:
        context = ray.init(address=chosen, namespace=namespace)
    url = context.dashboard_url or None
    return Connection(chosen, f"http://{url}" if url and "://" not in url else url)


def group_spec(name: str, group: GroupConfig, *, one_machine: bool) -> GroupSpec:
    """The placement of a group: ``group.resources`` per host, one host per node on a cluster
    (STRICT_SPREAD), side by side (PACK) on a one-node Ray such as the embedded one. Hosts that
    reserve nothing (all resources 0) take a sliver of a CPU, as ``GroupSpec.local``."""
    resources = {k: v for k, v in group.resources.items() if v > 0}
    platform = "tpu" if "TPU" in resources else "cuda" if "GPU" in resources else "cpu"
    return GroupSpec(name, group.hosts, resources or {"CPU": LOCAL_HOST_CPU},
                     strategy="PACK" if one_machine else "STRICT_SPREAD", env=HostEnv(platform))


def check_embedded_fit(specs: list[GroupSpec]) -> None:
    """Refuse groups that an embedded local Ray can never hold, before reserving anything.

    The embedded Ray (started by this driver) never grows, so a placement it cannot hold
    would only wait out PLACEMENT_TIMEOUT_S. The groups run at the same time: each is checked
    on top of the ones before it. Hosts that reserve nothing count with their sliver of a CPU
    (LOCAL_HOST_CPU).

    Raises:
      InsufficientResourcesError: naming the group, its hosts x resources and what Ray has.
    """
    have = ray.cluster_resources()
    held: collections.Counter = collections.Counter()
    for spec in specs:
        ask: collections.Counter = collections.Counter()
        for bundle in spec.bundles():
            ask.update(bundle)
        short = sorted(k for k, v in ask.items() if held[k] + v > have.get(k, 0) + 1e-9)
        if short:
            before = {k: held[k] for k in ask if held[k]}
            raise InsufficientResourcesError(
                f"cluster.{spec.name}: {spec.num_hosts} host(s) x "
                f"{dict(spec.resources_per_host)} ask for {dict(ask)}"
                + (f" on top of {before} held by the groups started before it" if before else "")
                + f", but the embedded local Ray has {{{', '.join(f'{k!r}: {have.get(k, 0):g}' for k in ask)}}} "
                f"in all (short of {', '.join(short)}) and never grows; lower "
                f"cluster.{spec.name}.hosts or cluster.{spec.name}.resources, or join a cluster "
                f"with --address, RAY_ADDRESS or cluster.address")
        held.update(ask)

"""Connect the driver to Ray: an embedded local Ray by default, a cluster when given an address.

- No address (and no RAY_ADDRESS): start Ray inside this process, the laptop default. Its
  dashboard, if started, listens on 127.0.0.1 only.
- ``address`` or RAY_ADDRESS (what ``ray job submit`` sets for the job's entrypoint): join that
  cluster's GCS ("10.0.0.2:6379", "auto").

Token authentication stays on. A head started with ``ray start --head`` (Ray 2.60) requires a
token, and a client sends it only in token mode; so when joining a cluster with RAY_AUTH_MODE
unset, this module sets it to "token". An embedded Ray enables token auth by itself. Nothing
here ever sets it to "disabled": a user who runs an unauthenticated cluster must say so.
"""

from __future__ import annotations

import os

import ray

from pipeline.errors import ConfigError

AUTH_MODE_ENV = "RAY_AUTH_MODE"
LOOPBACK = "127.0.0.1"


def resolve_address(address: str | None) -> str | None:
    """The cluster address to join: the argument, else RAY_ADDRESS, else None (embedded Ray).

    Raises:
      ConfigError: an ``http://`` address: that is a dashboard/job-server address, for
        ``ray job submit``, not for a driver joining the cluster.
    """
    chosen = address or os.environ.get("RAY_ADDRESS") or None
    if chosen is not None and chosen.startswith(("http://", "https://")):
        raise ConfigError(
            f"address: expected a Ray GCS address such as 10.0.0.2:6379 or 'auto', got {chosen!r} "
            f"(a dashboard URL; submit with `ray job submit --address {chosen}` instead)"
        )
    return chosen


def connect(address: str | None = None, *, num_cpus: int | None = None,
            dashboard: bool = True, namespace: str = "kdpipe") -> str | None:
    """Start or join Ray for this driver process; returns the address joined (None: embedded).

    Args:
      address: a GCS address to join; None falls back to RAY_ADDRESS, then to an embedded Ray.
      num_cpus: embedded Ray only: the CPUs it advertises (default: all of this machine).
      dashboard: embedded Ray only: start the dashboard (bound to 127.0.0.1).
      namespace: Ray namespace of the driver (named actors/placement groups live there).
    """
    chosen = resolve_address(address)
    if chosen is None:
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host=LOOPBACK,
                 namespace=namespace)
        return None
    os.environ.setdefault(AUTH_MODE_ENV, "token")
    ray.init(address=chosen, namespace=namespace)
    return chosen

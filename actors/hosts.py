"""One Ray actor per host: a thin, generic shell around pipeline-level functions.

A ``HostActor`` owns one host's process. It fixes the process environment (JAX platform, XLA
flags, CPU affinity) before JAX is imported, starts JAX (alone, or as one process of a
multi-host ``jax.distributed`` program), and runs whatever function the driver hands it with
``run(fn, *args)``. It knows nothing about teachers or students: those are functions written
on top of it, called as ``fn(host, *args, **kwargs)`` with the ``HostContext`` first.

Work and control are two Ray concurrency groups, each with its own thread: ``run`` occupies
the default group (one call at a time, so JAX state is touched from one thread), while
``healthy``, ``info``, ``request_stop`` and ``request_pause`` answer from the "control" group
even during a long ``run``; ``status`` returns what the running function last published with
``host.report(...)`` (a step, a loss, the shard it waits for). This is the Ray Train v2 worker idea (a generic execute, status answerable while
training runs) without its polling: a dead actor surfaces as ``RayActorError`` on the pending
``run`` reference, which the group collects with ``ray.wait``.

A SIGTERM to the host's process while it works (a preemption notice: a TPU VM gets one some
seconds before it goes) sets the stop event instead of ending the process, so the work can save
what it must (the student saves a checkpoint) and return; ``HostContext.preempted`` says it
happened. A second SIGTERM, or one while idle, ends the process as Ray's own handler does.

The class is a plain class; ``actors.groups`` wraps it with ``ray.remote`` and the per-host
resources, so tests and the driver choose placement in one place.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
from typing import Any, Callable

import ray

logger = logging.getLogger(__name__)

# jax.distributed.initialize waits this long for every process to join; a host that never
# arrives (dead node, wrong address) turns into an error instead of a hang.
JAX_INIT_TIMEOUT_S = 120
# jax.distributed.shutdown after a peer died can block on a barrier that never completes.
JAX_SHUTDOWN_TIMEOUT_S = 10

CONTROL_GROUP = "control"


@dataclasses.dataclass(frozen=True)
class HostEnv:
    """How a host process is set up before JAX starts.

    Attributes:
      platform: JAX_PLATFORMS for the process ("cpu", "tpu", "cuda"); None leaves JAX's choice.
      cpu_devices: on CPU, how many XLA devices the process exposes
        (--xla_force_host_platform_device_count); None keeps JAX's default of one.
      cores_per_host: pin the process to this many CPU cores and limit XLA's intra-op threads to
        the same number. The k-th host of a group placed on a node takes cores [k*n, (k+1)*n)
        modulo the node's core count, so two 1-core hosts of a group on one machine use
        different cores (issue 6's scaling benchmark measures the pipeline, not XLA's threads).
        The count restarts at 0 for each group. None: no pinning.
      env_vars: further variables for the process (applied last; they win).
    """

    platform: str | None = "cpu"
    cpu_devices: int | None = None
    cores_per_host: int | None = None
    env_vars: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.cpu_devices is not None and self.cpu_devices < 1:
            raise ValueError(f"HostEnv.cpu_devices: expected >= 1, got {self.cpu_devices}")
        if self.cores_per_host is not None and self.cores_per_host < 1:
            raise ValueError(f"HostEnv.cores_per_host: expected >= 1, got {self.cores_per_host}")

    def variables(self) -> dict[str, str]:
        """The environment variables this setup sets (XLA_FLAGS appended to any inherited)."""
        env: dict[str, str] = {}
        if self.platform is not None:
            env["JAX_PLATFORMS"] = self.platform
        flags = []
        if self.cpu_devices is not None:
            flags.append(f"--xla_force_host_platform_device_count={self.cpu_devices}")
        if self.cores_per_host is not None:
            # A "--" flag first: XLA reads an XLA_FLAGS value that does not start with "--" as
            # the name of a flags file (and aborts when there is none).
            single = "false" if self.cores_per_host == 1 else "true"
            flags.append(f"--xla_cpu_multi_thread_eigen={single}")
            flags.append(f"intra_op_parallelism_threads={self.cores_per_host}")
            # Other native pools (BLAS, OpenMP) would otherwise size themselves to the machine.
            env["OMP_NUM_THREADS"] = str(self.cores_per_host)
        if flags:
            inherited = os.environ.get("XLA_FLAGS", "")
            env["XLA_FLAGS"] = " ".join(([inherited] if inherited else []) + flags)
        env.update(dict(self.env_vars))
        return env

    def cores_for(self, local_index: int, node_cores: list[int]) -> list[int] | None:
        """The cores of ``node_cores`` that the ``local_index``-th host on a node is pinned to."""
        if self.cores_per_host is None:
            return None
        n = self.cores_per_host
        return sorted({node_cores[(local_index * n + i) % len(node_cores)] for i in range(n)})


@dataclasses.dataclass(frozen=True)
class HostInfo:
    """Where a host actor runs and how its process is set up (answered while it works)."""

    group: str
    rank: int
    num_hosts: int
    node_id: str
    node_ip: str
    pid: int
    cpu_affinity: tuple[int, ...]
    env: dict[str, str]
    jax_started: bool
    busy: bool


@dataclasses.dataclass(frozen=True)
class JaxInfo:
    """What JAX reports in one host process after ``setup``."""

    rank: int
    process_index: int
    process_count: int
    local_devices: int
    global_devices: int
    platform: str


class HostContext:
    """Handed to every ``run`` function as its first argument.

    Attributes:
      group, rank, num_hosts: which host of which group this is (rank 0 = JAX coordinator).
      state: objects that outlive one call on this host (a loaded model, an open cache
        writer). Only ``run`` functions touch it, one at a time.
    """

    def __init__(self, group: str, rank: int, num_hosts: int):
        self.group = group
        self.rank = rank
        self.num_hosts = num_hosts
        self.state: dict[str, Any] = {}
        self.preempted = False  # a SIGTERM (preemption notice) set the stop event
        self._stop = threading.Event()
        self._pause = threading.Event()
        self._status: dict[str, Any] = {}
        self._status_lock = threading.Lock()

    def stop_requested(self) -> bool:
        """True once the driver asked this host to stop (preemption notice, shutdown):
        a long loop checks it between steps, saves what it must, and returns."""
        return self._stop.is_set()

    @property
    def stop_event(self) -> threading.Event:
        """The event behind ``stop_requested``, for loops that take one (``pipeline.train``)."""
        return self._stop

    @property
    def pause_event(self) -> threading.Event:
        """Set when the driver asks the work to stop at its next natural boundary (a student:
        after its next checkpoint), to re-form the group with more hosts."""
        return self._pause

    def report(self, **values: Any) -> None:
        """Publish small progress values (step, loss, what the host waits for); the driver
        reads the latest of each with ``HostGroup.poll_status`` while the work runs."""
        with self._status_lock:
            self._status.update(values)

    def status(self) -> dict[str, Any]:
        with self._status_lock:
            return dict(self._status)


def _pin_process(cores: list[int]) -> None:
    """Pin every thread of this process to ``cores``.

    Affinity is per thread on Linux (new threads inherit their creator's), and Ray has started
    its own threads (gRPC, I/O) before this constructor runs: all of them are pinned, so that a
    1-core host uses one core, whatever thread does the work.
    """
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # the thread ended meanwhile
            pass


class HostActor:
    """The actor body; see the module docstring. Constructed by ``actors.groups.HostGroup``."""

    def __init__(self, group: str, rank: int, num_hosts: int, env: HostEnv, local_index: int):
        # Everything here must run before the first `import jax` in this process: XLA reads
        # XLA_FLAGS and JAX_PLATFORMS once, when its first backend starts.
        if "jax" in sys.modules:
            raise RuntimeError(
                f"{group} host {rank}: jax was imported before the host set its environment; "
                "XLA_FLAGS/JAX_PLATFORMS would be ignored"
            )
        self._env = env.variables()
        os.environ.update(self._env)
        cores = env.cores_for(local_index, sorted(os.sched_getaffinity(0)))
        if cores is not None:
            _pin_process(cores)
        self._ctx = HostContext(group, rank, num_hosts)
        self._busy = threading.Event()
        self._jax_started = False
        # Ray runs the constructor on the worker's main thread, the only one that may set a
        # signal handler; Ray's own (exit at once) stays the fallback.
        if threading.current_thread() is threading.main_thread():
            self._ray_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        if self._busy.is_set() and not self._ctx._stop.is_set():
            logger.warning("%s host %d: SIGTERM (preemption notice): stopping the work at its next "
                           "check", self._ctx.group, self._ctx.rank)
            self._ctx.preempted = True
            self._ctx._stop.set()
        elif callable(self._ray_sigterm):
            self._ray_sigterm(signum, frame)
        else:  # SIG_DFL: terminate as if no handler had been set
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    # ---- control group: answerable while `run` works --------------------------------------

    @ray.method(concurrency_group=CONTROL_GROUP)
    def healthy(self) -> bool:
        return True

    @ray.method(concurrency_group=CONTROL_GROUP)
    def info(self) -> HostInfo:
        ctx = ray.get_runtime_context()
        return HostInfo(
            group=self._ctx.group,
            rank=self._ctx.rank,
            num_hosts=self._ctx.num_hosts,
            node_id=ctx.get_node_id(),
            node_ip=ray.util.get_node_ip_address(),
            pid=os.getpid(),
            cpu_affinity=tuple(sorted(os.sched_getaffinity(0))),
            env=dict(self._env),
            jax_started=self._jax_started,
            busy=self._busy.is_set(),
        )

    @ray.method(concurrency_group=CONTROL_GROUP)
    def status(self) -> dict[str, Any]:
        """What the running function last published with ``host.report``."""
        return self._ctx.status()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def request_stop(self) -> None:
        self._ctx._stop.set()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def request_pause(self) -> None:
        self._ctx._pause.set()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def coordinator_address(self) -> str:
        """ip:port of a port free right now on this node, for the JAX coordination service.

        The port is released before JAX binds it; another process could take it in between,
        which jax.distributed.initialize then reports as a bind error.
        """
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        return f"{ip}:{port}"

    # ---- default group: one piece of work at a time ----------------------------------------

    def setup(self, coordinator: str | None = None, num_processes: int | None = None,
              process_id: int | None = None) -> JaxInfo:
        """Start JAX in this process; with ``coordinator`` (the program's first host's
        address), join a ``jax.distributed`` program of ``num_processes`` hosts as process
        ``process_id`` (default: the whole group's, as process ``rank``).

        All hosts of the program must call this concurrently: initialize blocks until every
        process has connected (or JAX_INIT_TIMEOUT_S passes).
        """
        import jax

        if coordinator is not None:
            # Cross-process collectives on CPU go through gloo (JAX's CPU option); on TPU/GPU the
            # setting is unused.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            # JAX's own preemption service would take SIGTERM over from this actor's handler;
            # the student loop already agrees on a step to stop at (pipeline.loop_state.StopVote).
            jax.config.update("jax_enable_preemption_service", False)
            jax.distributed.initialize(
                coordinator_address=coordinator,
                num_processes=self._ctx.num_hosts if num_processes is None else num_processes,
                process_id=self._ctx.rank if process_id is None else process_id,
                initialization_timeout=JAX_INIT_TIMEOUT_S,
            )
        self._jax_started = True
        return JaxInfo(
            rank=self._ctx.rank,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            local_devices=jax.local_device_count(),
            global_devices=jax.device_count(),
            platform=jax.default_backend(),
        )

    def run(self, call: tuple[Callable[..., Any], tuple, dict]) -> Any:
        """``fn(host_context, *args, **kwargs)`` for ``call = (fn, args, kwargs)``.

        The three travel as one object (``ray.put`` once by the group, resolved by Ray before
        this method runs), so a large argument is not copied once per host.
        """
        fn, args, kwargs = call
        self._busy.set()
        try:
            return fn(self._ctx, *args, **kwargs)
        finally:
            self._busy.clear()

    def teardown(self) -> None:
        """Leave the jax.distributed program, if this process joined one.

        After a peer died, shutdown can wait on a barrier forever: it runs on a side thread
        and is abandoned with a warning after JAX_SHUTDOWN_TIMEOUT_S (the group kills the
        actor next anyway).
        """
        if not self._jax_started:
            return
        import jax

        done = threading.Thread(target=jax.distributed.shutdown, daemon=True)
        done.start()
        done.join(JAX_SHUTDOWN_TIMEOUT_S)
        if done.is_alive():
            logger.warning(
                "%s host %d: jax.distributed.shutdown did not finish in %d s; abandoning it",
                self._ctx.group, self._ctx.rank, JAX_SHUTDOWN_TIMEOUT_S,
            )

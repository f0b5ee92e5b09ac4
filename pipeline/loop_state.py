"""What the training loop carries between steps besides the train state: the group's vote on
the step to stop at (``StopVote``), SIGTERM as a flag (``StopOnSigterm``) and the updates
skipped over the whole run (``SkipCounts``)."""

from __future__ import annotations

import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pipeline.checkpoint import TrainPosition
from pipeline.step import LossMetrics


class SkipCounts:
    """Skipped updates of the run, by reason (``LossMetrics.skipped_updates``: non-finite;
    ``empty_batches``: no loss token): the restored checkpoint's counts plus this session's.

    This session's are summed on the device, one small jitted add per step, and read only when
    asked (a checkpoint, the end of the run), so counting adds no host sync to a step. They
    come from the step's replicated outputs, so every host of a group holds the same counts.
    """

    NAMES = ("skipped_updates", "empty_batches")

    def __init__(self, position: TrainPosition | None):
        self._restored = {name: getattr(position, name) if position else 0 for name in self.NAMES}
        self._session = None

    def add(self, metrics: LossMetrics) -> None:
        step = {name: getattr(metrics, name) for name in self.NAMES}
        self._session = step if self._session is None else _add_counts(self._session, step)

    def totals(self) -> dict[str, int]:
        session = {} if self._session is None else jax.device_get(self._session)
        return {name: self._restored[name] + int(session.get(name, 0)) for name in self.NAMES}


_add_counts = jax.jit(lambda total, step: jax.tree.map(jnp.add, total, step))


class StopVote:
    """The hosts of a group agree on the step to stop at.

    After every step each host votes: CARRY_ON, PAUSE (stop at the next checkpoint step) or
    STOP (stop now); the highest vote wins. A host that stopped alone would leave the others
    waiting in the next step's collectives forever, so with several hosts the votes meet in a
    max over the processes (one scalar collective), and each host reads the outcome one step
    later: by then the collective has run, so reading it does not wait for the step just
    dispatched. Every host reads the same outcome at the same step.
    """

    CARRY_ON, PAUSE, STOP = 0, 1, 2

    def __init__(self, hosts: int):
        self._single = hosts == 1
        self._pending = None
        if not self._single:
            mesh = Mesh(np.array(jax.devices()), ("hosts",))
            self._sharding = NamedSharding(mesh, PartitionSpec("hosts"))
            self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def cast(self, vote: int) -> int:
        """Cast this step's vote; returns the decision to act on now (one host: this vote;
        several: the highest vote of the previous step)."""
        if self._single:
            return vote
        ballot = np.full((jax.local_device_count(),), vote, np.int32)
        decided = self._pending
        self._pending = self._max(jax.make_array_from_process_local_data(self._sharding, ballot))
        return self.CARRY_ON if decided is None else int(decided)


class StopOnSigterm:
    """Turns SIGTERM into a flag the loop checks between steps (main thread only)."""

    def __init__(self):
        self.requested = threading.Event()
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self.requested.set())
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

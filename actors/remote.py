"""A remote teacher: teacher hosts compute a student's targets on request and hand them over
Ray's object store. The only reader of ``pipeline.targets`` that needs Ray, so it lives here and
is handed to ``pipeline.targets.run_targets`` as ``remote_readers(...)``.

Both ends: ``RemoteTargets`` (on a student host) asks, ``answer`` (on a teacher host) answers.
A request carries a split and its rows only; the teacher host holds the rest
(``TargetService``) from the time it loaded the teacher.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import ray

from pipeline.config import RunConfig

if TYPE_CHECKING:  # both import jax, which the driver process does not load
    from pipeline.cache import TargetSpec
    from pipeline.targets import RemoteReaders

# Batches a student host asks remote teachers for ahead of the one it reads.
REMOTE_AHEAD = 4
# host.state key of a teacher host's TargetService
SERVICE = "target_service"


@dataclasses.dataclass
class TargetService:
    """What a teacher host needs to answer requests besides the teacher: where the prepared
    data is and how targets are encoded (``pipeline.teacher.target_spec``)."""

    prepared_dir: str
    spec: TargetSpec
    datasets: dict = dataclasses.field(default_factory=dict)  # split -> TokenDataset

    @classmethod
    def of(cls, config: RunConfig, vocab_size: int) -> TargetService:
        """The service of ``config``'s teacher, whose logits are ``vocab_size`` wide."""
        from pipeline.data import read_info
        from pipeline.teacher import target_spec

        info = read_info(config.data.prepared_dir)
        return cls(config.data.prepared_dir, target_spec(config, info, vocab_size=vocab_size))


def answer(host, split: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The encoded targets of ``rows`` of ``split``: what a teacher host (its teacher and
    ``TargetService`` loaded) sends back to a student."""
    from pipeline.data import TokenDataset
    from pipeline.teacher import encode_targets

    if SERVICE not in host.state:
        raise RuntimeError(f"teacher host {host.rank}: asked for targets before its teacher was "
                           f"loaded (load_teacher)")
    model, state = host.state["teacher"]
    service: TargetService = host.state[SERVICE]
    if split not in service.datasets:
        service.datasets[split] = TokenDataset(service.prepared_dir, split,
                                               vocab_size=model.config.vocab_size)
    return encode_targets(state, service.datasets[split].read_rows(rows), rows, service.spec)


class RemoteTargets:
    """Targets computed by teacher hosts on request and handed over Ray's object store.

    ``schedule`` yields the row batches this student host will read, in order; requests run
    REMOTE_AHEAD batches ahead of the one being read, spread round-robin over the teacher
    hosts from ``first``. A read off the schedule is requested on the spot. ``wanted(rows)``
    (hybrid) skips batches another source will serve.
    """

    def __init__(self, teachers: Sequence, split: str, spec: TargetSpec, vocab_size: int,
                 schedule: Iterator[np.ndarray], *, first: int = 0,
                 wanted: Callable[[np.ndarray], bool] = lambda rows: True):
        self._teachers, self._split = list(teachers), split
        self._spec, self._vocab_size = spec, vocab_size
        self._schedule, self._wanted = schedule, wanted
        self._next = first  # the teacher host of the next request
        self._ahead: collections.deque = collections.deque()
        self.batches = 0

    def _request(self, rows: np.ndarray):
        teacher = self._teachers[self._next % len(self._teachers)]
        self._next += 1
        return teacher.run.remote((answer, (self._split, rows), {}))

    def _top_up(self) -> None:
        while len(self._ahead) < REMOTE_AHEAD:
            upcoming = next(self._schedule)
            ref = self._request(upcoming) if self._wanted(upcoming) else None
            self._ahead.append((upcoming, ref))

    def take(self, rows: np.ndarray):
        """The request made ahead for ``rows`` (None if none), keeping REMOTE_AHEAD in flight."""
        self._top_up()
        ref = None
        if np.array_equal(self._ahead[0][0], rows):
            ref = self._ahead.popleft()[1]
            self._top_up()
        return ref

    def fetch(self, rows: np.ndarray, ref=None):
        """The targets of ``rows`` (``ref``: the request made ahead for them), decoded on the
        device as ``pipeline.cache.CacheReader.read`` decodes them."""
        import jax.numpy as jnp

        from pipeline.cache import compress

        stored = ray.get(ref if ref is not None else self._request(rows))
        self.batches += 1
        return compress.decode({k: jnp.asarray(v) for k, v in stored.items()}, self._spec,
                               self._vocab_size)

    def read(self, rows: np.ndarray):
        return self.fetch(rows, self.take(rows))


def remote_readers(teachers: Sequence, config: RunConfig, host_index: int,
                   host_count: int) -> RemoteReaders:
    """``pipeline.targets.RemoteReaders`` of student host ``host_index`` of ``host_count``:
    ``RemoteTargets`` asking the teacher host actors ``teachers`` (by rank)."""
    # students start on different teacher hosts so that their first requests spread out
    first = host_index * len(teachers) // host_count

    @functools.cache
    def widths() -> tuple[TargetSpec, int]:
        from pipeline.data import read_info
        from pipeline.models.hf_io import read_config
        from pipeline.teacher import target_spec

        info = read_info(config.data.prepared_dir)
        # the teacher's logit width: what the teacher hosts encode with
        teacher_vocab = read_config(config.model.teacher.path).vocab_size
        spec = target_spec(config, info, vocab_size=teacher_vocab)
        return spec, config.model.student.vocab_size or info.vocab_size

    def open_remote(split: str, schedule: Iterator[np.ndarray],
                    wanted: Callable[[np.ndarray], bool]) -> RemoteTargets:
        spec, vocab_size = widths()
        return RemoteTargets(teachers, split, spec, vocab_size, schedule, first=first,
                             wanted=wanted)

    return open_remote

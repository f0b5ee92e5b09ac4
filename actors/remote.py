"""A remote teacher: teacher hosts compute a student's targets on request and hand them over
Ray's object store. The only reader of ``pipeline.targets`` that needs Ray, so it lives here and
is handed to ``pipeline.targets.run_targets`` as ``remote_readers(...)``.

Two kinds of request, both answered with the targets encoded as the run's ``TargetSpec`` says
(top-k with its tail, sampled, or full logits) and decoded on the student's device:

- rows of the dataset (offline-style targets): ``RemoteTargets`` (on a student host) asks,
  ``answer`` (on a teacher host) answers. The request carries a split and its rows only; the
  teacher host holds the rest (``TargetService``) from the time it loaded the teacher.
- sequences the student wrote (on-policy rollouts): ``TeacherHosts.score`` sends the token ids
  and masks themselves, ``score`` runs the teacher over them.

A teacher host that dies under either kind fails the student's ``ray.get``; the driver then
replaces it and restarts the students (``actors.policy``'s ``TeacherLost``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
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


# The keys of a batch the teacher's forward reads (a rollout's other keys stay with the student).
SCORED_KEYS = ("input_ids", "attention_mask", "segment_ids")


def _service(host) -> TargetService:
    if SERVICE not in host.state:
        raise RuntimeError(f"teacher host {host.rank}: asked for targets before its teacher was "
                           f"loaded (load_teacher)")
    return host.state[SERVICE]


def score(host, batch: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The encoded targets of the sequences ``batch`` (``input_ids``, ``attention_mask`` and
    optionally ``segment_ids``, each ``[B, L]``) whose rows are ``rows`` [B] (the sampled
    encoding's seed): what a teacher host (its teacher and ``TargetService`` loaded) sends
    back to a student, ``{name: [B, L, *trailing]}``."""
    from pipeline.teacher import encode_targets

    service = _service(host)
    return encode_targets(host.state["teacher"][1], batch, rows, service.spec)


def answer(host, split: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The encoded targets of ``rows`` of ``split`` (``score`` of those rows as stored)."""
    from pipeline.data import TokenDataset

    service = _service(host)
    if split not in service.datasets:
        service.datasets[split] = TokenDataset(service.prepared_dir, split,
                                               vocab_size=host.state["teacher"][0].config.vocab_size)
    return score(host, service.datasets[split].read_rows(rows), rows)


class TeacherHosts:
    """The teacher host actors a student host asks, in turn from ``first`` (so that the
    students' requests spread out), and how their answers decode: as
    ``pipeline.cache.CacheReader.read`` decodes the cache's bytes, on the device."""

    def __init__(self, teachers: Sequence, spec: TargetSpec, vocab_size: int, *, first: int = 0):
        self._teachers, self._spec, self._vocab_size = list(teachers), spec, vocab_size
        self._next = first  # the teacher host of the next request

    def ask(self, work: Callable, *args):
        """Send ``work(host, *args)`` (``answer``, ``score``) to the next teacher host; its ref."""
        teacher = self._teachers[self._next % len(self._teachers)]
        self._next += 1
        return teacher.run.remote((work, args, {}))

    def receive(self, ref):
        """The answer of ``ref`` decoded into the batch keys of its targets (a dead teacher
        host raises Ray's actor error here)."""
        import jax.numpy as jnp

        from pipeline.cache import compress

        stored = ray.get(ref)
        return compress.decode({k: jnp.asarray(v) for k, v in stored.items()}, self._spec,
                               self._vocab_size)

    def score(self, batch: Mapping[str, np.ndarray], rows: np.ndarray):
        """The teacher's targets of the sequences ``batch`` (this host's ``[B, L]`` arrays,
        e.g. the student's own continuations; only ``SCORED_KEYS`` travel), ``rows`` [B]
        seeding a sampled encoding: the batch keys of ``pipeline/losses/targets.py``."""
        sent = {key: np.asarray(batch[key]) for key in SCORED_KEYS if key in batch}
        return self.receive(self.ask(score, sent, np.asarray(rows)))


class RemoteTargets:
    """Targets of dataset rows computed by teacher hosts on request.

    ``schedule`` yields the row batches this student host will read, in order; requests run
    REMOTE_AHEAD batches ahead of the one being read, spread over ``hosts``. A read off the
    schedule is requested on the spot. ``wanted(rows)`` (hybrid) skips batches another source
    will serve.
    """

    def __init__(self, hosts: TeacherHosts, split: str, schedule: Iterator[np.ndarray], *,
                 wanted: Callable[[np.ndarray], bool] = lambda rows: True):
        self._hosts, self._split = hosts, split
        self._schedule, self._wanted = schedule, wanted
        self._ahead: collections.deque = collections.deque()
        self.batches = 0

    def _request(self, rows: np.ndarray):
        return self._hosts.ask(answer, self._split, rows)

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
        """The targets of ``rows`` (``ref``: the request made ahead for them)."""
        decoded = self._hosts.receive(ref if ref is not None else self._request(rows))
        self.batches += 1
        return decoded

    def read(self, rows: np.ndarray):
        return self.fetch(rows, self.take(rows))


def teacher_hosts(teachers: Sequence, config: RunConfig, host_index: int,
                  host_count: int) -> TeacherHosts:
    """The ``TeacherHosts`` of student host ``host_index`` of ``host_count``, asking the
    teacher host actors ``teachers`` (by rank), with the run's target encoding."""
    from pipeline.data import read_info
    from pipeline.models.hf_io import read_config
    from pipeline.teacher import target_spec

    info = read_info(config.data.prepared_dir)
    # the teacher's logit width: what the teacher hosts encode with
    teacher_vocab = read_config(config.model.teacher.path).vocab_size
    spec = target_spec(config, info, vocab_size=teacher_vocab)
    # students start on different teacher hosts so that their first requests spread out
    return TeacherHosts(teachers, spec, config.model.student.vocab_size or info.vocab_size,
                        first=host_index * len(teachers) // host_count)


def remote_readers(teachers: Sequence, config: RunConfig, host_index: int,
                   host_count: int) -> RemoteReaders:
    """``pipeline.targets.RemoteReaders`` of student host ``host_index`` of ``host_count``:
    ``RemoteTargets`` asking the teacher host actors ``teachers`` (by rank)."""
    hosts = functools.cache(lambda: teacher_hosts(teachers, config, host_index, host_count))

    def open_remote(split: str, schedule: Iterator[np.ndarray],
                    wanted: Callable[[np.ndarray], bool]) -> RemoteTargets:
        return RemoteTargets(hosts(), split, schedule, wanted=wanted)

    return open_remote

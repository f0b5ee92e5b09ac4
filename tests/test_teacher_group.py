"""actors.teacher_group.TeacherWork carrying out the driver's decisions, on a fake host group (no
Ray): shards handed out one per replica, a lost host's shard first in line again and its whole
replica formed again, a replica that cannot be replaced retired, and the work stalled when no
replica is left."""

import itertools

import pytest

from actors.group_errors import HostGroupError, HostTimeoutError
from actors.teacher_group import Loaded, ShardQueue, ShardWritten, TeacherWork
from actors.work import load_teacher


class FakeGroup:
    """What TeacherWork asks of a HostGroup of JAX programs of ``hosts_per_program`` hosts:
    submit returns one reference per rank, gather answers them (a load: its seconds; a fill:
    the job), replace_hosts may fail."""

    def __init__(self, num_hosts: int, *, replaceable: bool = True, hosts_per_program: int = 1):
        self.num_hosts, self.replaceable = num_hosts, replaceable
        self.hosts_per_program = hosts_per_program
        self.dead: set[int] = set()  # ranks whose next answer is a failure
        self.calls: dict[int, tuple] = {}  # reference -> (rank, fn, args)
        self.replaced: list[int] = []
        self._refs = itertools.count()

    def submit(self, fn, *args, ranks=None):
        refs = {}
        for rank in range(self.num_hosts) if ranks is None else ranks:
            refs[rank] = next(self._refs)
            self.calls[refs[rank]] = (rank, fn, args)
        return refs

    def program_ranks(self, rank):
        first = rank - rank % self.hosts_per_program
        return list(range(first, first + self.hosts_per_program))

    def gather(self, refs, *, call):
        dead = self.dead & set(refs)
        if dead:
            self.dead -= dead
            raise HostGroupError("teacher", call, {r: RuntimeError("died") for r in dead},
                                 sorted(set(refs) - dead), self.num_hosts)
        answers = {}
        for rank, ref in refs.items():
            _, fn, args = self.calls[ref]
            answers[rank] = 1.5 if fn is load_teacher else args[1:3]
        return answers

    def replace_hosts(self, rank):
        if not self.replaceable:
            raise HostTimeoutError(f"rank {rank} did not start")
        self.replaced.extend(self.program_ranks(rank))


def fill(host, config, split, shard, teacher_fp):
    raise AssertionError("FakeGroup answers for the hosts")


def jobs(work: TeacherWork) -> dict[int, tuple]:
    """rank -> what it runs now ("load" or (split, shard))."""
    group = work.group
    return {group.calls[ref][0]: "load" if group.calls[ref][1] is load_teacher
            else group.calls[ref][2][1:3] for ref in work.refs}


def finish(work: TeacherWork, rank: int):
    (ref,) = [ref for ref in work.refs if work.group.calls[ref][0] == rank]
    return work.collect(ref)


def die(work: TeacherWork, rank: int) -> None:
    """Host ``rank`` fails its job; the driver (its policy saying retry) has the work lose it."""
    work.group.dead.add(rank)
    with pytest.raises(HostGroupError):
        finish(work, rank)
    work.lose([rank])


def test_hosts_take_the_next_shard_when_they_finish_one():
    work = TeacherWork(FakeGroup(2), None, ShardQueue([("train", 0), ("train", 1), ("eval", 0)]),
                       "fp", fill)
    assert jobs(work) == {0: "load", 1: "load"}
    assert finish(work, 1) == Loaded(1, 1.5)
    assert jobs(work) == {0: "load", 1: ("train", 0)}
    assert finish(work, 1) == ShardWritten(1, ("train", 0))
    assert finish(work, 0) == Loaded(0, 1.5)
    assert jobs(work) == {0: ("eval", 0), 1: ("train", 1)}
    finish(work, 0), finish(work, 1)
    assert not work.busy and work.queue.done == [("train", 0, 1), ("eval", 0, 0), ("train", 1, 1)]


def test_a_lost_host_is_replaced_and_its_shard_is_first_in_line():
    group = FakeGroup(2)
    work = TeacherWork(group, None, ShardQueue([("train", 0), ("train", 1), ("train", 2)]), "fp", fill)
    finish(work, 0), finish(work, 1)
    assert jobs(work) == {0: ("train", 0), 1: ("train", 1)}
    die(work, 1)
    assert group.replaced == [1] and jobs(work) == {0: ("train", 0), 1: "load"}
    finish(work, 1)
    assert jobs(work)[1] == ("train", 1)  # the lost shard, before ("train", 2)


def test_without_a_replacement_the_survivors_take_the_shard_or_the_work_stalls():
    group = FakeGroup(2, replaceable=False)
    work = TeacherWork(group, None, ShardQueue([("train", 0), ("train", 1)]), "fp", fill)
    finish(work, 0), finish(work, 1)
    finish(work, 0)  # host 0 wrote train 0 and found the queue empty
    assert jobs(work) == {1: ("train", 1)}
    die(work, 1)
    assert work.retired == {1} and jobs(work) == {0: ("train", 1)} and not work.stalled
    die(work, 0)
    assert work.retired == {0, 1} and work.stalled


def test_collect_lets_a_failure_through_and_forgets_the_job():
    work = TeacherWork(FakeGroup(1), None, ShardQueue([("train", 0)]), "fp", fill)
    work.group.dead.add(0)
    with pytest.raises(HostGroupError):
        work.collect(work.refs[0])
    assert not work.busy and work.stalled  # nothing runs, train 0 still to write


def test_replicas_of_two_hosts_run_each_job_on_both_and_a_lost_host_costs_its_replica():
    group = FakeGroup(4, hosts_per_program=2)
    work = TeacherWork(group, None, ShardQueue([("train", 0), ("train", 1), ("eval", 0)]), "fp",
                       fill)
    assert work.replicas == 2 and jobs(work) == {r: "load" for r in range(4)}
    assert finish(work, 1) == Loaded(0, 1.5)  # rank 1's answer collects rank 0's too
    assert jobs(work) == {0: ("train", 0), 1: ("train", 0), 2: "load", 3: "load"}
    finish(work, 2)
    assert jobs(work) == {0: ("train", 0), 1: ("train", 0), 2: ("train", 1), 3: ("train", 1)}
    group.dead.add(3)
    with pytest.raises(HostGroupError) as lost:
        finish(work, 2)  # the survivor's job returns; its peer's failure comes with it
    assert lost.value.failures.keys() == {3} and lost.value.unfinished == [2]
    work.lose(lost.value.failures)
    assert group.replaced == [2, 3] and jobs(work) == {0: ("train", 0), 1: ("train", 0),
                                                       2: "load", 3: "load"}
    assert finish(work, 0) == ShardWritten(0, ("train", 0))
    assert jobs(work)[0] == ("train", 1)  # the lost shard first in line, for whichever replica
    assert finish(work, 3) == Loaded(1, 1.5)
    assert jobs(work) == {0: ("train", 1), 1: ("train", 1), 2: ("eval", 0), 3: ("eval", 0)}
    finish(work, 2), finish(work, 1)
    assert not work.busy and work.queue.done == [("train", 0, 0), ("eval", 0, 1), ("train", 1, 0)]

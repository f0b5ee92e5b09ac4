"""The sections that fix where and how a run executes, not what it computes (none is in the
config hash): mesh, checkpoint, eval, logging, cluster and demo."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from pipeline.config.fields import Section, field
from pipeline.errors import ConfigError

# The student mesh's axes, in mesh order; MeshConfig has one size field per axis, and
# pipeline.models.sharding builds the mesh and its rules over these names.
MESH_AXES = ("data", "fsdp", "tensor")
TeacherSource = Literal["offline", "live", "remote", "hybrid"]


@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
    """Device mesh of the student group: axis sizes; -1 takes the remaining devices."""

    PATH: ClassVar[str] = "mesh"
    data: int = field(-1, "Data-parallel axis (batch split, parameters replicated).", ge=-1)
    fsdp: int = field(1, "Fully sharded data-parallel axis (batch and parameters split).", ge=-1)
    tensor: int = field(1, "Tensor-parallel axis (heads and MLP width split).", ge=-1)

    def __post_init__(self) -> None:
        super().__post_init__()
        sizes = [getattr(self, axis) for axis in MESH_AXES]
        for axis, size in zip(MESH_AXES, sizes):
            if size == 0:
                raise ConfigError(f"mesh.{axis}: expected >= 1 or -1 (the remaining devices), got 0")
        if sizes.count(-1) > 1:
            raise ConfigError("mesh: at most one axis may be -1 (the remaining devices); got "
                              + ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes)))

    def shape(self, num_devices: int) -> tuple[int, ...]:
        """Axis sizes for ``num_devices`` devices, in the order of ``MESH_AXES``."""
        fixed = 1
        for axis in MESH_AXES:
            fixed *= max(getattr(self, axis), 1)
        sizes = [getattr(self, axis) for axis in MESH_AXES]
        if -1 in sizes:
            if num_devices % fixed:
                raise ConfigError(f"mesh: the fixed axes ({fixed} devices) do not divide the "
                                  f"{num_devices} devices available")
            sizes[sizes.index(-1)] = num_devices // fixed
        elif fixed != num_devices:
            raise ConfigError(f"mesh: axis sizes multiply to {fixed} but {num_devices} devices "
                              f"are available")
        return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(Section):
    """Orbax checkpoints in ``<run_dir>/checkpoints``."""

    PATH: ClassVar[str] = "checkpoint"
    every_steps: int = field(100, "Save every this many steps (and at the end, and on SIGTERM).",
                             gt=0, hashed=False)
    keep: int = field(3, "Newest checkpoints kept; older ones are deleted.", gt=0, hashed=False)
    async_save: bool = field(True, "Write in the background while training continues.",
                             hashed=False)


@dataclasses.dataclass(frozen=True)
class EvalConfig(Section):
    """Held-out evaluation: student CE, KL to the teacher, top-1 agreement."""

    PATH: ClassVar[str] = "eval"
    every_steps: int = field(100, "Evaluate every this many steps (and at the end); 0: never.",
                             ge=0, hashed=False)
    batch_size: int = field(16, "Sequences per eval batch, over all hosts.", gt=0, hashed=False)
    max_batches: int | None = field(None, "Stop after this many batches; null: the whole "
                                    "held-out split.", gt=0, hashed=False)


@dataclasses.dataclass(frozen=True)
class LoggingConfig(Section):
    """Metrics and progress output (``<run_dir>/metrics.jsonl``, TensorBoard, report.md)."""

    PATH: ClassVar[str] = "logging"
    every_steps: int = field(10, "Log training metrics every this many steps.", gt=0, hashed=False)
    tensorboard: bool = field(True, "Also write TensorBoard event files.", hashed=False)
    progress: bool = field(True, "Show progress: a live bar on a terminal, plain lines "
                           "otherwise.", hashed=False)
    progress_every_s: float = field(10.0, "Without a terminal (output to a file, a Ray job's "
                                    "log), print a plain progress line (done/total, rate, ETA) "
                                    "this often, in seconds, besides the start and end of each "
                                    "phase.", gt=0, hashed=False)
    report: bool = field(True, "Write report.md with plots at the end.", hashed=False)
    example_ids: bool = field(False, "Test mode: each host appends the rows every step trained "
                              "on to <run_dir>/examples/host-<i>-of-<n>.jsonl (records past the "
                              "checkpoint are dropped on resume), to check that every example is "
                              "seen exactly once across restarts.", hashed=False)


@dataclasses.dataclass(frozen=True)
class GroupConfig(Section):
    """A host group: one Ray actor per host."""

    PATH: ClassVar[str] = "cluster.<teacher|student>"
    hosts: int = field(1, "Hosts to start with.", gt=0, hashed=False)
    min_hosts: int | None = field(None, "Fewest hosts the group may shrink to after a loss and "
                                  "keep going; null: hosts.", gt=0, hashed=False)
    max_hosts: int | None = field(None, "Most hosts the group may grow to when nodes join; "
                                  "null: hosts.", gt=0, hashed=False)
    resources: dict[str, float] = field(doc="Ray resources each host's actor reserves, e.g. "
                                        "{TPU: 4} on a v4 host or {CPU: 1} on a laptop; custom "
                                        "resources keep the groups on separate nodes.",
                                        factory=lambda: {"CPU": 1.0}, hashed=False)

    @property
    def fewest_hosts(self) -> int:
        return self.hosts if self.min_hosts is None else self.min_hosts

    @property
    def most_hosts(self) -> int:
        return self.hosts if self.max_hosts is None else self.max_hosts


@dataclasses.dataclass(frozen=True)
class TeacherGroupConfig(GroupConfig):
    """The teacher hosts: replicas of ``hosts_per_replica`` hosts, each one JAX program with
    the teacher sharded over all of its devices, each writing whole cache shards."""

    PATH: ClassVar[str] = "cluster.teacher"
    hosts_per_replica: int = field(1, "Hosts per teacher replica: each replica is one JAX "
                                   "program over its hosts (jax.distributed), the teacher's "
                                   "weights split over all their devices (mesh.tensor, the rest "
                                   "fsdp), for a teacher too big for one host. hosts must be a "
                                   "multiple; offline only (remote and hybrid ask single hosts).",
                                   gt=0, hashed=False)

    @property
    def replicas(self) -> int:
        return self.hosts // self.hosts_per_replica


def _check_group(group: GroupConfig, path: str) -> None:
    for name, value in group.resources.items():
        if value < 0:
            raise ConfigError(f"{path}.resources.{name}: expected >= 0, got {value!r}")
    if not group.fewest_hosts <= group.hosts <= group.most_hosts:
        raise ConfigError(f"{path}: expected min_hosts <= hosts <= max_hosts, got "
                          f"min_hosts={group.fewest_hosts}, hosts={group.hosts}, "
                          f"max_hosts={group.most_hosts}")


@dataclasses.dataclass(frozen=True)
class ClusterConfig(Section):
    """Where the run executes: the Ray address, the two host groups and the teacher source."""

    PATH: ClassVar[str] = "cluster"
    address: str | None = field(None, "Ray address to join; null: start an embedded local Ray "
                                "(RAY_ADDRESS or --address override it).", hashed=False)
    dashboard: bool = field(True, "Embedded Ray only: start Ray's dashboard (on 127.0.0.1; the "
                            "address is in Ray's start-up line) to watch the hosts' actors. "
                            "false: start without it, a few seconds and processes fewer.",
                            hashed=False)
    teacher_source: TeacherSource | None = field(
        None, "offline: the teacher group fills the cache and the student reads it; live: the "
        "teacher runs inside the student step; remote: teacher actors send targets ahead of need; "
        "hybrid: cached where committed, remote otherwise. null: offline when a cache section "
        "exists.", hashed=False)
    teacher: TeacherGroupConfig = field(doc="Teacher hosts (offline, remote, hybrid).",
                                        factory=TeacherGroupConfig, hashed=False)
    student: GroupConfig = field(doc="Student hosts: one JAX program across them.",
                                 factory=GroupConfig, hashed=False)
    max_failures: int = field(3, "Retries after failures (a host's process or node died) before "
                              "the run gives up: one budget for the whole run, which both groups "
                              "count against (each teacher host replaced, each re-formation of "
                              "the student group).", ge=0, hashed=False)
    max_preemptions: int = field(10, "Retries after preemptions (a preempted node, a SIGTERM "
                                 "notice to a student host) before the run gives up: one budget "
                                 "for the whole run, as max_failures.", ge=0, hashed=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_group(self.teacher, "cluster.teacher")
        per_replica = self.teacher.hosts_per_replica
        if self.teacher.hosts % per_replica:
            raise ConfigError(f"cluster.teacher.hosts ({self.teacher.hosts}) must be a multiple of "
                              f"cluster.teacher.hosts_per_replica ({per_replica})")
        if per_replica > 1 and self.teacher_source in ("remote", "hybrid"):
            raise ConfigError(f"cluster.teacher.hosts_per_replica: teacher_source "
                              f"'{self.teacher_source}' asks single teacher hosts for targets; "
                              f"expected 1, got {per_replica} (replicas of several hosts fill "
                              f"a cache: offline)")
        _check_group(self.student, "cluster.student")


@dataclasses.dataclass(frozen=True)
class DemoConfig(Section):
    """What only ``kdpipe demo`` uses: its corpus, tokenizer and teacher pretraining."""

    PATH: ClassVar[str] = "demo"
    max_files: int = field(80, "Python standard-library .py files of the running interpreter, "
                           "taken evenly spaced from the sorted list (a fixed selection).", gt=0)
    tokenizer_vocab_size: int = field(2048, "Vocabulary of the byte-level BPE tokenizer trained "
                                      "on the selection.", gt=256)
    teacher_steps: int = field(400, "Hard-label pretraining steps of the teacher.", gt=0)
    teacher_learning_rate: float = field(3e-3, "Peak learning rate of the teacher pretraining "
                                         "(same schedule shape as optimizer).", gt=0.0)

"""``RunConfig``: the whole run, its sections composed and the checks that span sections."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pipeline.config.fields import Section, field
from pipeline.config.model import ModelConfig, check_context
from pipeline.config.runtime import (CheckpointConfig, ClusterConfig, DemoConfig, EvalConfig,
                                     LoggingConfig, MeshConfig, TeacherSource)
from pipeline.config.training import (CacheConfig, DataConfig, LossConfig, OptimizerConfig,
                                      TrainConfig, hard_labels_only)
from pipeline.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class RunConfig(Section):
    """A whole run."""

    model: ModelConfig = field(doc="Teacher and student models (required: at least the student).")
    run_dir: str = field("runs/run", "Directory of checkpoints, metrics, report and export.",
                         hashed=False)
    data: DataConfig = field(doc="Dataset preparation and order.", factory=DataConfig)
    cache: CacheConfig | None = field(None, "Teacher-output cache; null/absent: no cache (the "
                                      "teacher must then be live or remote).")
    loss: LossConfig = field(doc="Distillation loss.", factory=LossConfig)
    optimizer: OptimizerConfig = field(doc="Optimizer and schedule.", factory=OptimizerConfig)
    train: TrainConfig = field(doc="Steps and batch sizes.", factory=TrainConfig)
    mesh: MeshConfig = field(doc="Student device mesh.", factory=MeshConfig, hashed=False)
    checkpoint: CheckpointConfig = field(doc="Checkpointing.", factory=CheckpointConfig, hashed=False)
    eval: EvalConfig = field(doc="Held-out evaluation.", factory=EvalConfig, hashed=False)
    logging: LoggingConfig = field(doc="Metrics and progress.", factory=LoggingConfig, hashed=False)
    cluster: ClusterConfig = field(doc="Hosts and teacher source.", factory=ClusterConfig, hashed=False)
    demo: DemoConfig | None = field(None, "Settings of `kdpipe demo` (ignored by other verbs).",
                                    hashed=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data.tokenizer is None and self.model.teacher.path is not None:
            # Unset, the tokenizer is the teacher checkpoint's own (its tokenizer.json).
            object.__setattr__(self, "data", dataclasses.replace(
                self.data, tokenizer=self.model.teacher.path))
        self._check_teacher_source()
        self._check_context()
        self._check_batch_split()
        self._check_schedule()
        self._check_on_policy()

    @property
    def teacher_source(self) -> TeacherSource:
        """``cluster.teacher_source``, or ``offline`` when unset (a cache is then configured)."""
        return self.cluster.teacher_source or "offline"

    @property
    def cache_temperature(self) -> float:
        """T_cache of the configured cache: ``cache.temperature``, or ``loss.temperature``."""
        if self.cache is None or self.cache.temperature is None:
            return self.loss.temperature
        return self.cache.temperature

    def cache_target_fields(self) -> dict[str, Any]:
        """Keyword arguments of ``pipeline.cache.format.TargetSpec`` for the configured cache
        (all but ``vocab_size`` and ``tokenizer_vocab_size``, which come from the model and the
        tokenizer); fields of other modes are None, as TargetSpec requires."""
        if self.cache is None:
            raise ConfigError("cache: no cache section is configured")
        cache = self.cache
        return {"mode": cache.mode,
                "k": cache.k if cache.mode == "topk" else None,
                "n_draws": cache.n_draws if cache.mode == "sampled" else None,
                "value_dtype": cache.value_dtype,
                "id_encoding": cache.id_encoding,
                "temperature": None if cache.mode == "full" else self.cache_temperature,
                "seed": cache.seed,
                **({"top_p": cache.top_p, "bytes_per_token": cache.bytes_per_token,
                    "min_k": cache.min_k}
                   if cache.top_p is not None or cache.bytes_per_token is not None else {})}

    @property
    def checkpoint_dir(self) -> str:
        return str(Path(self.run_dir) / "checkpoints")

    def student_host_counts(self) -> tuple[int, ...]:
        """Student host counts in [min_hosts, max_hosts] that split the global batch evenly
        into grad_accum_steps microbatches: the sizes the student group may re-form with."""
        group, train = self.cluster.student, self.train
        return tuple(n for n in range(group.fewest_hosts, group.most_hosts + 1)
                     if train.global_batch_size % (n * train.grad_accum_steps) == 0)

    @property
    def hard_labels_only(self) -> bool:
        """``hard_labels_only`` of ``loss``: training needs no teacher targets."""
        return hard_labels_only(self.loss.alpha, self.loss.use_hard_labels)

    def _check_teacher_source(self) -> None:
        source = self.cluster.teacher_source
        if source is None and self.cache is None and self.hard_labels_only:
            return  # a plain language-model run (the demo's teacher pretraining and baseline)
        if source is None and self.cache is None:
            raise ConfigError("cache: neither a cache nor a live teacher is configured; add a "
                              "`cache:` section, or set cluster.teacher_source: live (or remote), "
                              "or train on hard labels alone (loss.alpha: 0 with "
                              "loss.use_hard_labels: true)")
        from pipeline.targets import SOURCES  # what each source reads (it imports no config)

        needs = SOURCES[self.teacher_source]
        if needs.reads_cache and self.cache is None:
            raise ConfigError(f"cache: cluster.teacher_source '{self.teacher_source}' reads teacher "
                              f"targets from a cache, but there is no `cache:` section")
        if (needs.teacher_in_step or needs.asks_teacher_hosts) and not self.model.has_teacher:
            raise ConfigError(f"model.teacher: cluster.teacher_source '{self.teacher_source}' runs "
                              f"the teacher, but model.teacher has neither a path nor an architecture")
        cache = self.cache
        if (cache is not None and cache.mode != "full" and cache.temperature is not None
                and cache.temperature != self.loss.temperature):
            raise ConfigError(f"cache.temperature ({cache.temperature}) must equal loss.temperature "
                              f"({self.loss.temperature}) in {cache.mode} mode: the stored targets "
                              f"are taken at that temperature (only mode full serves any)")

    def _check_context(self) -> None:
        # Models loaded from a path are checked when they are loaded (pipeline.train).
        for name in ("student", "teacher"):
            spec = getattr(self.model, name)
            if spec.path is None and spec.hidden_size is not None:
                check_context(self.data.seq_len, f"model.{name}", spec.max_position_embeddings)

    def _check_batch_split(self) -> None:
        train, group = self.train, self.cluster.student
        per_step = group.hosts * train.grad_accum_steps
        if train.global_batch_size % per_step:
            raise ConfigError(f"train.global_batch_size ({train.global_batch_size}) must be "
                              f"divisible by train.grad_accum_steps * cluster.student.hosts "
                              f"({train.grad_accum_steps} * {group.hosts} = {per_step})")
        if self.eval.batch_size % group.hosts:
            raise ConfigError(f"eval.batch_size ({self.eval.batch_size}) must be divisible by "
                              f"cluster.student.hosts ({group.hosts})")

    def _check_schedule(self) -> None:
        opt, steps = self.optimizer, self.train.steps
        decay = opt.decay_steps or steps
        if opt.warmup_steps > decay:
            raise ConfigError(f"optimizer.warmup_steps ({opt.warmup_steps}) must not exceed the decay "
                              f"horizon ({'optimizer.decay_steps' if opt.decay_steps else 'train.steps'}"
                              f" = {decay})")

    def _check_on_policy(self) -> None:
        on_policy = self.train.on_policy
        if on_policy is None:
            return
        from pipeline.targets import SOURCES

        if not SOURCES[self.teacher_source].scores_sequences:
            scoring = ", ".join(name for name, s in SOURCES.items() if s.scores_sequences)
            raise ConfigError(f"train.on_policy: the teacher must score the student's own "
                              f"sequences, but cluster.teacher_source '{self.teacher_source}' only "
                              f"reads stored targets of the dataset's rows; use one of {scoring}")
        if self.loss.use_hard_labels:
            raise ConfigError("train.on_policy: loss.use_hard_labels would add the cross-entropy "
                              "of the student's own samples (the rollouts' labels) to the loss; "
                              "set loss.use_hard_labels: false")
        seq_len, width = self.data.seq_len, on_policy.prompt_tokens(self.data.seq_len)
        if on_policy.max_new_tokens >= seq_len:
            raise ConfigError(f"train.on_policy.max_new_tokens: expected < data.seq_len "
                              f"({seq_len}), leaving room for a prompt, got "
                              f"{on_policy.max_new_tokens}")
        if width + on_policy.max_new_tokens > seq_len:
            raise ConfigError(f"train.on_policy.prefix_tokens: a prompt of {width} tokens + "
                              f"max_new_tokens {on_policy.max_new_tokens} > data.seq_len "
                              f"{seq_len}; expected prefix_tokens <= "
                              f"{seq_len - on_policy.max_new_tokens}")

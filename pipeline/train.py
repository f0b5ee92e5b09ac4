"""One student host's run: data -> teacher targets -> jitted step -> checkpoints, metrics.

``train(config)`` is what ``kdpipe train`` runs on one host, and what each student actor of a
multi-host run calls with its ``Host`` (the JAX processes then form one program; the batch is
split by ``pipeline.data.HostBatches`` and assembled into global arrays here). It

1. opens the prepared dataset and builds (or loads) the student, on a mesh from ``config.mesh``;
2. restores the latest checkpoint of ``run_dir`` when there is one (explicit target shardings,
   so the mesh may differ from the one that saved it) and resumes at its global sample offset;
3. takes the teacher targets of every batch from the cache (``offline``), from ``targets``
   (readers the caller plugs in: the driver's for a cache still being written, or for a
   ``remote``/``hybrid`` teacher), or runs the teacher inside the step (``live``);
4. logs metrics every ``logging.every_steps``, evaluates every ``eval.every_steps``, saves every
   ``checkpoint.every_steps``, and on SIGTERM (or ``stop``) saves a checkpoint and raises
   ``Preempted``; on ``pause`` it does so at the next checkpoint step. The hosts of a group
   agree on the step to stop at (``pipeline.loop_state.StopVote``), so a notice to one host
   stops them all there;
5. at the end evaluates, saves, exports the student as a Hugging Face directory and writes
   ``report.md``, with the updates skipped over the whole run
   (``pipeline.loop_state.SkipCounts``).

A run whose loss is the hard-label cross-entropy alone (``loss.alpha == 0`` with
``loss.use_hard_labels``) needs no teacher for training; it still evaluates against the
teacher's held-out targets when a cache or a live teacher is there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding

from pipeline.cache import CacheReader
from pipeline.cache.reader import prefetch
from pipeline.checkpoint import Checkpoints, RunIdentity, TrainPosition
from pipeline.config import RunConfig
from pipeline.data import DatasetInfo, HostBatches, TokenDataset, eval_batches, host_offsets, read_info
from pipeline.data.order import eval_rows
from pipeline.errors import ConfigError
from pipeline.hardware import Utilisation, format_mfu, train_flops_per_token
from pipeline.loop_state import SkipCounts, StopOnSigterm, StopVote
from pipeline.metrics import ExampleLog, MetricsLogger, progress_bar, write_report
from pipeline.models.build import build_model, check_model_context
from pipeline.models.hf_io import save_pretrained, teacher_fingerprint
from pipeline.models.llama import Llama
from pipeline.models.sharding import BATCH_SPEC, shard_model
from pipeline.onpolicy import Rollouts, SequenceScorer, check_split_prompts, samples_only
from pipeline.optim import build_schedule
from pipeline.step import DistillLossConfig, TrainState, jit_distillation_step
from pipeline.student_state import from_saved_tree, run_identity, saved_tree, student_state
from pipeline.targets import (SOURCES, Openers, TargetReader, open_cache, pick_readers,
                              require_complete)

EXPORT_DIR = "student"
# Eval metrics are token-weighted means of the per-batch values (each batch's num_tokens).
EVAL_KEYS = ("ce_loss", "kl_loss", "top1_agreement", "teacher_entropy")


class Preempted(Exception):
    """The run stopped early (SIGTERM, ``stop`` or ``pause``) after saving the checkpoint of
    ``step``."""

    def __init__(self, step: int, cause: str = "SIGTERM"):
        super().__init__(f"stopped by {cause} after saving the checkpoint of step {step}; run "
                         f"the same command again to resume")
        self.step = step


@dataclasses.dataclass(frozen=True)
class Host:
    """This process's place in the student group (``jax.process_index/count`` in a group)."""

    index: int = 0
    count: int = 1

    @property
    def is_primary(self) -> bool:
        return self.index == 0


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """How a run ended. ``skipped_updates`` (non-finite) and ``empty_batches`` (no loss token)
    count the updates skipped over the whole run, resumes included (``LossMetrics``)."""

    step: int
    global_sample_offset: int
    final_eval: dict
    final_train: dict
    tokens_per_s: float
    skipped_updates: int
    run_dir: Path
    empty_batches: int = 0


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------

def step_options(config: RunConfig, tokenizer_vocab_size: int, *, is_training: bool = True) -> dict:
    """The static keyword arguments of ``distillation_step`` that ``config`` sets, for data of
    a tokenizer of ``tokenizer_vocab_size`` ids (the divergence is over those ids alone when
    the models' heads are wider)."""
    loss = config.loss
    return dict(
        loss_config=DistillLossConfig(divergence=loss.divergence, beta=loss.beta,
                                      use_hard_labels=loss.use_hard_labels,
                                      valid_vocab_size=tokenizer_vocab_size),
        learning_rate_fn=build_schedule(config.optimizer, config.train.steps) if is_training else None,
        gradient_accumulation_steps=config.train.grad_accum_steps if is_training else 1,
        is_training=is_training,
        temperature=loss.temperature,
        alpha=loss.alpha,
        hidden_state_weight=loss.hidden_state_weight,
        hidden_state_layers=loss.hidden_state_layers,
        hidden_state_loss=loss.hidden_state_loss,
        attention_weight=loss.attention_weight,
        attention_layers=loss.attention_layers,
        attention_normalize=loss.attention_normalize,
        logits_chunk_size=config.train.logits_chunk_size or None,
    )


def global_batch(local: Mapping[str, np.ndarray | jax.Array],
                 sharding: NamedSharding) -> dict[str, jax.Array]:
    """This host's rows of a batch -> global arrays split over the mesh's batch axes. Arrays
    already on a device (teacher targets decoded there) go to the mesh's devices from there,
    not through the host."""
    return {key: jax.make_array_from_process_local_data(
                sharding, value if isinstance(value, jax.Array) else np.asarray(value))
            for key, value in local.items()}


def _to_host(values: Mapping[str, jax.Array]) -> dict[str, float]:
    return {key: float(value) for key, value in jax.device_get(dict(values)).items()}


def evaluate(config: RunConfig, state: TrainState, dataset: TokenDataset, *, host: Host,
             sharding: NamedSharding, reader: TargetReader | None = None,
             teacher: TrainState | None = None) -> dict[str, float]:
    """Held-out metrics of ``state``: student CE on the hard labels and, when a teacher's
    targets are available (``reader`` or ``teacher``), KL to the teacher and top-1 agreement.

    Each is a token-weighted mean over the eval batches (the same as one batch of all of them).
    """
    with_teacher = reader is not None or teacher is not None
    eval_config = config if with_teacher else _ce_only(config)
    options = step_options(eval_config, dataset.info.vocab_size, is_training=False)
    where = dict(host_index=host.index, host_count=host.count, max_batches=config.eval.max_batches)
    totals: dict[str, float] = {}
    tokens = 0.0
    for (rows, _), batch in zip(eval_rows(dataset.num_rows, config.eval.batch_size, **where),
                                eval_batches(dataset, config.eval.batch_size, **where)):
        if reader is not None:
            batch = {**batch, **reader.read(rows)}
        _, metrics = jit_distillation_step(state, global_batch(batch, sharding), teacher, **options)
        values = _to_host(metrics.as_dict())
        weight = values["num_tokens"]
        tokens += weight
        for key in EVAL_KEYS:
            if key in values:
                totals[key] = totals.get(key, 0.0) + values[key] * weight
    result = {key: total / max(tokens, 1.0) for key, total in totals.items()}
    result["num_tokens"] = tokens
    return result


def _sample_divergence(config: RunConfig, state: TrainState, local: Mapping, rollouts: Rollouts,
                       sharding: NamedSharding, teacher: TrainState | None,
                       vocab_size: int) -> dict[str, float]:
    """``rollout_reverse_kl``: the mean KL(student || teacher) per generated token of this
    step's rollouts at temperature 1 (the models' own distributions, whatever
    ``loss.temperature`` and the rollouts' sampling temperature), under the parameters before
    the step. None from sampled targets (their estimator serves the forward KL alone), nor from
    a scorer's targets taken at a ``loss.temperature`` other than 1 (they hold the teacher at
    that temperature)."""
    if "teacher_sample_ids" in local or (teacher is None and config.loss.temperature != 1):
        return {}
    loss = dataclasses.replace(config.loss, divergence="reverse_kl", alpha=1.0, temperature=1.0,
                               hidden_state_weight=0.0, attention_weight=0.0)
    options = step_options(dataclasses.replace(config, loss=loss), vocab_size, is_training=False)
    batch = global_batch(samples_only(local, rollouts.count), sharding)
    _, metrics = jit_distillation_step(state, batch, teacher, **options)
    return {"rollout_reverse_kl": float(metrics.kl_loss)}


def _ce_only(config: RunConfig) -> RunConfig:
    loss = dataclasses.replace(config.loss, alpha=0.0, use_hard_labels=True, hidden_state_weight=0.0,
                               attention_weight=0.0)
    return dataclasses.replace(config, loss=loss)


# --------------------------------------------------------------------------------------------
# Setting a run up
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RunSetup:
    """Everything a student host builds before its first step (``prepare_run``)."""

    info: DatasetInfo
    vocab_size: int
    train_data: TokenDataset
    eval_data: TokenDataset | None
    sharding: NamedSharding
    state: TrainState
    teacher_state: TrainState | None
    train_reader: TargetReader | None
    eval_reader: TargetReader | None
    identity: RunIdentity


def prepare_run(config: RunConfig, *, teacher: Llama | None = None,
                train_targets: bool = True,
                targets: Mapping[str, TargetReader] | None = None) -> RunSetup:
    """Open the data, build the student (fresh, on the mesh of ``config.mesh``), and find the
    teacher targets: ``targets`` (split -> reader) when given, else the readers of the
    source (``pipeline.targets.pick_readers``: complete caches; the train split only when
    ``train_targets``), or the live teacher (``teacher``, else ``model.teacher.path``).
    Every mismatch between config, data, cache and teacher is refused here, before a step."""
    source = config.teacher_source
    in_step = SOURCES[source].teacher_in_step
    info = read_info(config.data.prepared_dir)
    vocab_size = config.model.student.vocab_size or info.vocab_size
    train_data = TokenDataset(config.data.prepared_dir, "train", vocab_size=vocab_size)
    eval_data = (TokenDataset(config.data.prepared_dir, "eval", vocab_size=vocab_size)
                 if info.splits.get("eval", {}).get("num_rows") else None)

    check_model_context(config.model.student, "student", info.seq_len)
    if config.train.on_policy is not None:
        check_split_prompts(train_data, config.train.on_policy)
    if in_step and config.model.has_teacher:
        check_model_context(config.model.teacher, "teacher", info.seq_len)
    state, mesh = student_state(config, vocab_size)

    teacher_state = None
    if in_step and teacher is None and config.model.teacher.from_pretrained:
        teacher = build_model(config.model.teacher, vocab_size, config.train.seed, mesh,
                              frozen=True)
    elif teacher is not None:
        shard_model(teacher, mesh)
    if teacher is not None:
        teacher_state = TrainState.create(teacher)
    if in_step and teacher_state is None and not config.hard_labels_only:
        raise ConfigError("model.teacher.path: a live teacher is needed (cluster.teacher_source: "
                          "live) but none is given")
    wanted = ((["train"] if train_targets and not config.hard_labels_only else [])
              + (["eval"] if eval_data is not None and teacher_state is None else []))
    if targets is None:
        @functools.cache
        def teacher_fp() -> str | None:  # hashes the weights: only for a cache to check
            return (teacher_fingerprint(config.model.teacher.path)
                    if config.model.teacher.from_pretrained else None)

        def complete_cache(split: str) -> CacheReader:
            return require_complete(open_cache(config.cache, info, split, vocab_size,
                                               temperature=config.loss.temperature,
                                               teacher_fp=teacher_fp()), split)

        targets = pick_readers(source, wanted, Openers(
            cache=complete_cache if config.cache is not None else None)) or {}
    train_reader, eval_reader = (targets.get(split) if split in wanted else None
                                 for split in ("train", "eval"))
    identity = run_identity(config, vocab_size, train_data.fingerprint)
    return RunSetup(info=info, vocab_size=vocab_size, train_data=train_data, eval_data=eval_data,
                    sharding=NamedSharding(mesh, BATCH_SPEC), state=state,
                    teacher_state=teacher_state, train_reader=train_reader,
                    eval_reader=eval_reader, identity=identity)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

def train(config: RunConfig, *, host: Host = Host(), teacher: Llama | None = None,
          stop: threading.Event | None = None, pause: threading.Event | None = None,
          on_step: Callable[[int, dict], None] | None = None,
          targets: Mapping[str, TargetReader] | None = None,
          scorer: SequenceScorer | None = None) -> TrainResult:
    """Run (or resume) the distillation of ``config`` on this host; see the module docstring.

    Args:
      config: the run.
      host: this process's index and the student group's size.
      teacher: a live teacher already in memory (else loaded from ``model.teacher.path`` when
        the run is ``live``).
      stop: set by another thread to stop after the current step, as SIGTERM does.
      pause: set by another thread to stop after the next checkpoint step's save (the driver
        re-forms a grown group there).
      on_step: called after every step with ``(step, metrics)`` (metrics on logging steps
        only, else ``{}``), e.g. to report progress to a driver.
      targets: split -> reader of teacher targets, replacing the cache readers (``kdpipe run``
        passes readers that wait for shards still being written, or ask a remote teacher).
      scorer: the teacher scoring the student's rollouts (``train.on_policy``) when it does not
        run in the step (``pipeline.onpolicy.SequenceScorer``: teacher hosts, ``kdpipe run``).

    Raises:
      Preempted: after SIGTERM (or ``stop``, ``pause``), once the checkpoint is saved.
      KdpipeError: bad config, data, cache or checkpoint.
    """
    # From the start: a SIGTERM during the (slow) setup still ends in a saved checkpoint.
    with StopOnSigterm() as sigterm:
        return _train(config, host=host, teacher=teacher, targets=targets, on_step=on_step,
                      scorer=scorer, sigterm=sigterm.requested, stop=stop or threading.Event(),
                      pause=pause or threading.Event())


def _train(config: RunConfig, *, host: Host, teacher: Llama | None,
           targets: Mapping[str, TargetReader] | None,
           on_step: Callable[[int, dict], None] | None, scorer: SequenceScorer | None,
           sigterm: threading.Event,
           stop: threading.Event, pause: threading.Event) -> TrainResult:
    setup = prepare_run(config, teacher=teacher, targets=targets)
    info, train_data, eval_data, sharding = setup.info, setup.train_data, setup.eval_data, setup.sharding
    state, teacher_state = setup.state, setup.teacher_state
    train_reader, eval_reader = setup.train_reader, setup.eval_reader
    source, run_dir = config.teacher_source, Path(config.run_dir)
    train_teacher = (teacher_state if SOURCES[source].teacher_in_step and not config.hard_labels_only
                     else None)
    options = step_options(_ce_only(config) if config.hard_labels_only else config, info.vocab_size)
    primary = host.is_primary
    with Checkpoints(config.checkpoint_dir, setup.identity, keep=config.checkpoint.keep,
                     async_save=config.checkpoint.async_save) as checkpoints:
        offset, start, position = 0, 0, None
        if checkpoints.latest_step() is not None:
            saved, position = checkpoints.restore(saved_tree(state))
            state = from_saved_tree(state, saved)
            offset, start = position.global_sample_offset, position.step
        skips = SkipCounts(position)
        logger = MetricsLogger(run_dir, enabled=primary, tensorboard=config.logging.tensorboard,
                               resume_step=start)
        examples = (ExampleLog(run_dir, host.index, host.count, resume_step=start)
                    if config.logging.example_ids else None)
        votes = StopVote(host.count)
        batches = HostBatches(train_data, seed=config.data.seed,
                              global_batch=config.train.global_batch_size,
                              host_index=host.index, host_count=host.count, offset=offset,
                              shuffle_window=config.data.shuffle_window)
        batch_tokens = config.train.global_batch_size * info.seq_len
        rollouts = None
        if config.train.on_policy is not None:
            if train_teacher is None and scorer is None:
                raise ConfigError(f"train.on_policy: cluster.teacher_source '{source}' scores "
                                  f"rollouts on teacher hosts; run it with `kdpipe run`")
            rollouts = Rollouts(config.train.on_policy, batches, seed=config.train.seed,
                                steps=config.train.steps, mesh=sharding.mesh,
                                scorer=None if train_teacher is not None else scorer)
            rollouts.restore(position and position.rollouts, batches.rows_at(batches.offset))
        utilisation = Utilisation(train_flops_per_token(state.model().config, info.seq_len),
                                  jax.devices()[0].device_kind, jax.device_count())

        def save(step: int) -> None:
            if step not in checkpoints.all_steps():
                checkpoints.save(TrainPosition(
                    step, batches.offset, config.train.seed, **skips.totals(),
                    rollouts=None if rollouts is None else rollouts.pending_state()),
                    saved_tree(state))

        def run_eval(step: int) -> dict:
            if eval_data is None or not config.eval.every_steps:
                return {}
            values = evaluate(config, state, eval_data, host=host, sharding=sharding,
                              reader=eval_reader, teacher=teacher_state)
            logger.log(step, values, split="eval")
            return values

        progress = progress_bar("train", enabled=primary and config.logging.progress,
                                every_s=config.logging.progress_every_s)
        task = progress.add_task("train", total=config.train.steps, completed=start, status="")
        last_train: dict = {}
        last_eval: dict = {}
        tick, tick_step, tokens_per_s = time.perf_counter(), start, 0.0
        # The teacher targets of the next batches are read on a background thread while the
        # current step runs; decoded on the device, they stay there (global_batch).
        upcoming = (batches.rows_at(offset + i * config.train.global_batch_size)
                    for i in range(config.train.steps - start))
        if rollouts is not None:  # the rollout rows' targets come from the scorer
            upcoming = map(rollouts.offline_rows, upcoming)
        targets_ahead = (None if train_reader is None or rollouts is not None and
                         not rollouts.offline_rows(batches.rows_at(offset)).size else
                         prefetch(train_reader.read, upcoming))
        with progress, (contextlib.nullcontext() if targets_ahead is None
                        else contextlib.closing(targets_ahead)), (
                contextlib.nullcontext() if rollouts is None else contextlib.closing(rollouts)):
            for step in range(start + 1, config.train.steps + 1):
                if examples is not None:
                    examples_at = host_offsets(batches.offset, config.train.global_batch_size,
                                               host.index, host.count)
                rows, local = next(batches)
                stored = next(targets_ahead) if targets_ahead is not None else {}
                logging_step = step % config.logging.every_steps == 0 or step == config.train.steps
                if rollouts is not None:
                    local = rollouts.batch(state, step, rows, local, stored)
                    sampled = (_sample_divergence(config, state, local, rollouts, sharding,
                                                  train_teacher, info.vocab_size)
                               if logging_step else {})
                    started = time.perf_counter()
                else:
                    local = {**local, **stored}
                state, metrics = jit_distillation_step(state, global_batch(local, sharding),
                                                       train_teacher, **options)
                skips.add(metrics)
                if rollouts is not None:
                    jax.block_until_ready(metrics.loss)
                    rollouts.step_done(time.perf_counter() - started)
                logged = {}
                if logging_step:
                    logged = _to_host(metrics.as_dict())
                    if rollouts is not None:
                        logged.update(sampled, **rollouts.take_metrics())
                    now = time.perf_counter()
                    tokens_per_s = batch_tokens * (step - tick_step) / (now - tick)
                    tick, tick_step = now, step
                    logged["tokens_per_s"] = tokens_per_s
                    mfu = utilisation.mfu(tokens_per_s)
                    if mfu is not None:
                        logged["mfu"] = mfu
                    last_train = logger.log(step, logged)
                    progress.update(task, status=f"loss {logged['loss']:.4f}  {tokens_per_s:,.0f} "
                                                 f"tok/s  MFU {format_mfu(mfu)}")
                progress.update(task, advance=1)
                if examples is not None:
                    examples.log(step, examples_at, rows)
                if on_step is not None:
                    on_step(step, logged)
                if config.eval.every_steps and step % config.eval.every_steps == 0:
                    last_eval = run_eval(step)
                checkpoint_step = step % config.checkpoint.every_steps == 0
                if checkpoint_step:
                    save(step)
                decision = votes.cast(
                    StopVote.STOP if sigterm.is_set() or stop.is_set() else
                    StopVote.PAUSE if pause.is_set() else StopVote.CARRY_ON)
                if decision == StopVote.STOP or (decision == StopVote.PAUSE and checkpoint_step):
                    save(step)
                    checkpoints.wait()
                    logger.close()
                    if examples is not None:
                        examples.close()
                    raise Preempted(step, "SIGTERM" if sigterm.is_set() else
                                    "a stop request" if decision == StopVote.STOP else
                                    "a pause at a checkpoint")
        final_step = max(start, config.train.steps)
        if config.eval.every_steps and final_step % config.eval.every_steps:
            last_eval = run_eval(final_step)
        save(final_step)
        checkpoints.wait()
        save_pretrained(state.model(), run_dir / EXPORT_DIR)
        counts = skips.totals()
        if primary and config.logging.report:
            rows_out = [{"split": "train", **{k: last_train.get(k, float("nan"))
                                              for k in ("loss", "kl_loss", "ce_loss", "tokens_per_s")},
                         "mfu": format_mfu(last_train.get("mfu")),
                         **{k: v for k, v in last_train.items() if k == "rollout_reverse_kl"}},
                        {"split": "eval", **last_eval}]
            write_report(run_dir, f"kdpipe run: {run_dir.name}", rows_out,
                         notes=[f"steps: {final_step}", f"teacher source: {source}",
                                f"skipped non-finite updates: {counts['skipped_updates']}",
                                f"skipped batches without loss tokens: {counts['empty_batches']}",
                                utilisation.describe(),
                                f"student exported to {run_dir / EXPORT_DIR}"])
        logger.close()
        if examples is not None:
            examples.close()
    return TrainResult(step=final_step, global_sample_offset=batches.offset, final_eval=last_eval,
                       final_train=last_train, tokens_per_s=tokens_per_s, run_dir=run_dir,
                       **counts)


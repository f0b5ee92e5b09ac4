"""On-policy distillation: part of every batch is the student's own continuations of prompts.

GKD (Agarwal et al., "On-Policy Distillation of Language Models", ICLR 2024) trains the student
on a mixture: with probability lambda a sequence is sampled from the student and the teacher
scores each sampled token, else it comes from the fixed dataset. Here the mixture is by rows:
each step, the first ``rollout_count(rows, fraction)`` rows of a host's batch are replaced by

1. their prompts (``prompt_lengths``: the tokens before a row's first label, or a prefix),
2. continued by the student with the current parameters (``pipeline.generate``, on the
   student's mesh; the sampling key of a row is ``rollout_keys(seed, step, rows)``, so a
   rollout depends on the run's seed, the step and the row alone: no generation state to
   checkpoint, and a resumed run draws the same tokens),
3. laid out as training rows (``continuation_rows``): the prompt, then the generated tokens
   (through the first ``eos_id``), then padding; labels only on the generated tokens, so the
   loss (``loss.divergence``: GKD uses reverse KL or the generalised JSD) covers them alone,
4. scored by the teacher: in the step when it runs there (``cluster.teacher_source: live``), or
   by a ``SequenceScorer`` (teacher hosts over Ray: ``actors.remote``), whose targets take the
   same form as the stored targets of the other rows (``pipeline.cache.TargetSpec``).

The other rows read their teacher targets as without on-policy rows (``offline_rows``). With
``lag: 1`` the rollouts of step s+1 are generated after step s-1's update and scored on a
background thread while step s runs (the student's parameters are one update old when it
trains on them: ``rollout_staleness``); a checkpoint then holds the pending rollouts too
(``Rollouts.pending_state``), so a resumed run continues exactly.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from pipeline.config import OnPolicyConfig
from pipeline.data import HostBatches
from pipeline.data.dataset import prompt_tokens
from pipeline.errors import DataError
from pipeline.generate import Generated, Sampling, generate
from pipeline.losses import IGNORE_INDEX
from pipeline.models.sharding import BATCH_SPEC, batch_devices
from pipeline.step import TrainState

# Rows of the dataset read at a time when the prompts of a split are checked.
CHECK_ROWS = 4096


class SequenceScorer(Protocol):
    """The teacher scoring sequences the student wrote (a remote teacher:
    ``actors.remote.TeacherHosts``).

    ``score(batch, rows)``: ``batch`` holds this host's ``input_ids``, ``attention_mask`` (and
    ``segment_ids`` when the data has them), each ``[n, L]`` int32; ``rows`` ``[n]`` int32 are
    the sequences' indices that seed a sampled encoding (``rollout_sequence_ids``: one per
    dataset row and step, so a row's rollouts at two steps draw apart). Returns the
    teacher's targets as batch keys of pipeline/losses/targets.py (``[n, L, ...]``, on the
    device or not), in the form the run's other targets take (``pipeline.teacher.target_spec``).
    """

    def score(self, batch: Mapping[str, np.ndarray], rows: np.ndarray
              ) -> Mapping[str, jax.Array | np.ndarray]: ...


def rollout_count(rows: int, fraction: float) -> int:
    """Rollout rows among a host's ``rows``: ``round(fraction * rows)``, halves rounded up."""
    return int(np.floor(fraction * rows + 0.5))


def offline_rows(rows: np.ndarray, count: int) -> np.ndarray:
    """The rows of a host's batch that read stored (or remote) targets: all but the first
    ``count``, which are rollouts."""
    return rows[count:]


# --------------------------------------------------------------------------------------------
# Prompts and rows
# --------------------------------------------------------------------------------------------

def prompt_lengths(batch: Mapping[str, np.ndarray], on_policy: OnPolicyConfig,
                   seq_len: int) -> np.ndarray:
    """Each row's prompt length ``[n]`` (at least 1): ``prompt`` source, the tokens through the
    one whose label is the first (the rest of a row without labels); ``prefix`` source, the
    first ``on_policy.prompt_tokens(seq_len)`` tokens of the row's first document (fewer when
    the document is shorter). Rows are left-aligned (``pipeline.data``)."""
    if on_policy.prompt_source == "prompt":
        return prompt_tokens(batch["labels"], batch["attention_mask"])
    first_document = np.asarray(batch["attention_mask"]) != 0
    if "segment_ids" in batch:
        segments = np.asarray(batch["segment_ids"])
        first_document = first_document & (segments == segments[:, :1])
    return np.maximum(np.minimum(first_document.sum(axis=1), on_policy.prompt_tokens(seq_len)), 1)


def check_prompts(lengths: np.ndarray, rows: np.ndarray, on_policy: OnPolicyConfig,
                  seq_len: int) -> None:
    """DataError naming ``train.on_policy.max_new_tokens`` when a prompt of ``lengths`` (of
    dataset ``rows``) leaves less than ``max_new_tokens`` of a ``seq_len`` row."""
    width = on_policy.prompt_tokens(seq_len)
    long = lengths > width
    if long.any():
        raise DataError(
            f"train.on_policy.max_new_tokens: {int(long.sum())} prompt(s) of the train split "
            f"(row {int(rows[long][0])}: {int(lengths[long][0])} tokens) are longer than "
            f"data.seq_len - max_new_tokens = {seq_len} - {on_policy.max_new_tokens} = {width}; "
            f"lower max_new_tokens, raise data.seq_len, or shorten the prompts")


def check_split_prompts(dataset, on_policy: OnPolicyConfig) -> None:
    """``check_prompts`` over every row of ``dataset`` (a ``pipeline.data.TokenDataset``),
    before a step is taken: from the split's ``max_prompt_tokens`` (``pipeline.data.prepare``
    records it), reading rows only to name a long one, or for a dataset prepared before that
    figure. A prefix is never too long (``pipeline.config.RunConfig`` checks its length)."""
    if on_policy.prompt_source != "prompt":
        return
    longest = dataset.info.splits[dataset.split].get("max_prompt_tokens")
    if longest is not None and longest <= on_policy.prompt_tokens(dataset.seq_len):
        return
    for first in range(0, dataset.num_rows, CHECK_ROWS):
        rows = np.arange(first, min(first + CHECK_ROWS, dataset.num_rows))
        lengths = prompt_lengths(dataset.read_rows(rows), on_policy, dataset.seq_len)
        check_prompts(lengths, rows, on_policy, dataset.seq_len)


def left_padded_prompts(input_ids: np.ndarray, lengths: np.ndarray, width: int,
                        pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``lengths[i]`` tokens of each row of ``input_ids`` ``[n, L]``, right-aligned in
    ``[n, width]`` after ``pad_id`` padding: ``(ids, mask)`` as ``pipeline.generate`` takes
    them (one width, so one compilation serves every batch)."""
    n = len(lengths)
    ids = np.full((n, width), pad_id, np.int32)
    mask = np.zeros((n, width), np.int32)
    for i, length in enumerate(lengths):
        ids[i, width - length:] = input_ids[i, :length]
        mask[i, width - length:] = 1
    return ids, mask


def continuation_rows(prompt_ids: np.ndarray, prompt_lengths_: np.ndarray, tokens: np.ndarray,
                      lengths: np.ndarray, seq_len: int, *, segment_ids: bool,
                      pad_id: int = 0) -> dict[str, np.ndarray]:
    """Training rows ``[n, seq_len]`` of prompts continued by generated tokens.

    Args:
      prompt_ids: ``[n, P]`` left-padded prompts (``left_padded_prompts``).
      prompt_lengths_: ``[n]`` real prompt tokens of each row.
      tokens: ``[n, T]`` generated tokens (``Generated.tokens``); ``lengths`` ``[n]`` of them
        count (through ``eos_id``).
      seq_len: the row length; ``P + T <= seq_len``.
      segment_ids: add ``segment_ids`` (``labelled_rows``).

    Returns:
      ``labelled_rows`` of the prompts followed by their generated tokens.
    """
    n, width = prompt_ids.shape
    whole = np.concatenate([prompt_ids, tokens], axis=1)  # [n, P + T]
    whole = np.pad(whole, ((0, 0), (0, seq_len - whole.shape[1])), constant_values=pad_id)
    # Row i starts at its first real prompt token: shift it left by its padding.
    source = np.arange(seq_len)[None, :] + (width - prompt_lengths_)[:, None]
    input_ids = np.take_along_axis(whole, np.minimum(source, seq_len - 1), axis=1)
    return labelled_rows(input_ids, prompt_lengths_, lengths, segment_ids=segment_ids,
                         pad_id=pad_id)


def labelled_rows(input_ids: np.ndarray, prompt_lengths_: np.ndarray, lengths: np.ndarray, *,
                  segment_ids: bool, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Rows ``[n, L]`` whose first ``prompt_lengths_[i]`` tokens are a prompt and the next
    ``lengths[i]`` were generated, as a batch: ``input_ids`` (``pad_id`` after those),
    ``attention_mask``, ``labels[t] = input_ids[t + 1]`` where ``input_ids[t + 1]`` is a
    generated token and -100 elsewhere (prompt and padding carry no loss), and with
    ``segment_ids`` those too (1 on the row's tokens, 0 on padding, as a dataset prepared with
    ``data.document_mask`` has them)."""
    n, seq_len = input_ids.shape
    ends = prompt_lengths_ + lengths  # [n] real tokens of each row
    positions = np.arange(seq_len)[None, :]
    real = positions < ends[:, None]
    input_ids = np.where(real, input_ids, pad_id).astype(np.int32)
    target = (positions + 1 >= prompt_lengths_[:, None]) & (positions + 1 < ends[:, None])
    next_ids = np.concatenate([input_ids[:, 1:], np.full((n, 1), pad_id, np.int32)], axis=1)
    out = {"input_ids": input_ids, "attention_mask": real.astype(np.int32),
           "labels": np.where(target, next_ids, IGNORE_INDEX).astype(np.int32)}
    if segment_ids:
        out["segment_ids"] = real.astype(np.int32)
    return out


def rollout_keys(seed: int, step: int, rows: np.ndarray) -> np.ndarray:
    """The sampling key ``[n, 2]`` uint32 of each rollout: ``fold_in(fold_in(PRNGKey(seed),
    step), row)``: a function of the run's seed, the step and the dataset row alone."""
    base = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(base, jnp.asarray(rows, jnp.uint32))
    return np.asarray(keys)


def rollout_sequence_ids(seed: int, step: int, rows: np.ndarray) -> np.ndarray:
    """The sequence index ``[n]`` int32 in [0, 2^31) that keys a sampled encoding of each
    rollout's targets (``pipeline.cache.compress``: draws per (seed, sequence, position)): a
    word of ``rollout_keys``, so a function of the run's seed, the step and the row, distinct
    for a row's rollouts at different steps (unlike the row itself)."""
    return (rollout_keys(seed, step, rows)[:, 1] >> 1).astype(np.int32)


def mix(rollout: Mapping[str, np.ndarray | jax.Array], rest: Mapping[str, np.ndarray | jax.Array]
        ) -> dict[str, np.ndarray | jax.Array]:
    """A host's batch: the rollout rows ``[n, ...]`` then the other rows ``rest`` ``[b - n,
    ...]``, key by key (``rollout`` has every key of ``rest``: the scorer's targets are of the
    kind the stored targets are)."""
    missing = sorted(set(rest) - set(rollout))
    if missing:
        raise DataError(f"rollout: lacks the batch keys {missing} (a scorer must return the "
                        f"targets of the kind the other rows have)")
    out = {}
    for key, value in rest.items():
        if isinstance(value, jax.Array) or isinstance(rollout[key], jax.Array):
            out[key] = jnp.concatenate([jnp.asarray(rollout[key]), jnp.asarray(value)])
        else:
            out[key] = np.concatenate([rollout[key], value])
    return out


# --------------------------------------------------------------------------------------------
# The rollouts of a run
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Rollout:
    """The rollouts of one step on this host: ``batch`` (``continuation_rows``), the prompt
    and generated ``lengths`` and whether each ``stopped`` at eos, the update count of the
    parameters that wrote them, the seconds it took, and (lag 1) the scorer's answer."""

    step: int
    rows: np.ndarray
    batch: dict
    prompt_lengths: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray
    params_step: int
    generate_s: float
    scored: concurrent.futures.Future | None = None


class Rollouts:
    """The on-policy rows of a run on one student host (module docstring).

    ``batch(state, step, rows, local, targets)`` is the host's batch of ``step`` with its
    rollout rows in; ``take_metrics()`` what they were like, and took, since its last call.
    """

    def __init__(self, on_policy: OnPolicyConfig, batches: HostBatches, *, seed: int, steps: int,
                 mesh: Mesh, scorer: SequenceScorer | None):
        """The rollouts of ``batches`` (this host's dataset rows, step after step, up to step
        ``steps``; ``seed``: the run's), generated on the student's ``mesh`` and scored by
        ``scorer`` (None: the teacher runs in the step)."""
        info = batches.dataset.info
        self.config, self.seq_len, self.seed, self.mesh = on_policy, info.seq_len, seed, mesh
        self.eos_id, self.segment_ids, self.scorer = info.eos_token_id, info.document_mask, scorer
        self.count = rollout_count(batches.global_batch // batches.host_count, on_policy.fraction)
        self.sampling = Sampling(on_policy.temperature, on_policy.top_k, on_policy.top_p)
        self._batches, self._steps = batches, steps
        self._multiple = max(batch_devices(mesh) // jax.process_count(), 1)
        self._pending: Rollout | None = None
        self._pool = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="score")
                      if on_policy.lag and scorer is not None else None)
        self._sums = dict.fromkeys(METRIC_SUMS, 0.0)

    def offline_rows(self, rows: np.ndarray) -> np.ndarray:
        """This host's batch ``rows`` less its rollouts (:func:`offline_rows`)."""
        return offline_rows(rows, self.count)

    # ---- generation ------------------------------------------------------------------------

    def _generate(self, state: TrainState, step: int, rows: np.ndarray,
                  local: Mapping[str, np.ndarray]) -> Rollout:
        start = time.perf_counter()
        rows, local = rows[:self.count], {k: np.asarray(v)[:self.count] for k, v in local.items()}
        lengths = prompt_lengths(local, self.config, self.seq_len)
        check_prompts(lengths, rows, self.config, self.seq_len)
        width = self.config.prompt_tokens(self.seq_len)
        ids, mask = left_padded_prompts(local["input_ids"], lengths, width, pad_id=0)
        keys = rollout_keys(self.seed, step, rows)
        extra = -len(rows) % self._multiple  # rows the data-parallel devices need, dropped after
        if extra:
            ids, mask, keys = (np.concatenate([x, np.repeat(x[:1], extra, axis=0)])
                               for x in (ids, mask, keys))
        model = state.model()
        model.eval()
        generated = generate(model, ids, mask, max_new_tokens=self.config.max_new_tokens,
                             sampling=self.sampling, eos_id=self.eos_id, pad_id=0, key=keys,
                             mesh=self.mesh)
        generated = _host_local(generated, self.mesh)
        tokens, new = (np.asarray(x)[:len(rows)] for x in (generated.tokens, generated.lengths))
        stopped = np.asarray(generated.stopped)[:len(rows)]
        batch = continuation_rows(ids[:len(rows)], lengths, tokens, new, self.seq_len,
                                  segment_ids=self.segment_ids)
        return Rollout(step=step, rows=rows, batch=batch, prompt_lengths=lengths, lengths=new,
                       stopped=stopped,
                       params_step=int(state.step), generate_s=time.perf_counter() - start)

    def _score(self, rollout: Rollout) -> dict:
        """The rollout's rows with the scorer's targets (none for a teacher in the step)."""
        if self.scorer is None:
            return rollout.batch
        ids = rollout_sequence_ids(self.seed, rollout.step, rollout.rows)
        return {**rollout.batch, **jax.block_until_ready(dict(
            self.scorer.score(rollout.batch, ids)))}

    def _submit(self, rollout: Rollout) -> Rollout:
        if self._pool is not None:
            rollout.scored = self._pool.submit(_timed, self._score, rollout)
        return rollout

    def batch(self, state: TrainState, step: int, rows: np.ndarray,
              local: Mapping[str, np.ndarray], targets: Mapping[str, jax.Array | np.ndarray]
              ) -> dict[str, np.ndarray | jax.Array]:
        """This host's batch of ``step``: the dataset rows ``rows`` (``local``; ``targets``: the
        stored targets of ``offline_rows(rows)``), the first ``count`` of them replaced by
        rollouts of their prompts (made before this call with ``state``'s parameters, or one
        update earlier with ``lag: 1``)."""
        if self.count == 0:
            return {**local, **targets}
        rollout = self._pending
        if rollout is None or rollout.step != step:
            rollout = self._submit(self._generate(state, step, rows, local))
        self._pending = None
        if self.config.lag:  # the next step's rollouts, written while this step trains
            if step < self._steps:  # after this step's rows were taken: the next step's offset
                upcoming = self._batches.rows_at(self._batches.offset)
                self._pending = self._submit(self._generate(
                    state, step + 1, upcoming, self._batches.dataset.read_rows(upcoming)))
        waited = time.perf_counter()
        if rollout.scored is not None:
            scored, _ = rollout.scored.result()
            score_s = time.perf_counter() - waited
        else:
            scored, score_s = _timed(self._score, rollout)
        tokens = float(rollout.lengths.sum())
        self._sums.update(last_tokens=tokens, last_stopped=float(rollout.stopped.sum()),
                          last_rows=float(len(rollout.lengths)),
                          last_staleness=float(int(state.step) - rollout.params_step))
        self._add(steps=1, rollout_tokens=tokens, rollout_s=rollout.generate_s, score_s=score_s)
        rest = {key: np.asarray(value)[self.count:] for key, value in local.items()}
        return mix(scored, {**rest, **targets})

    # ---- checkpointed state (lag 1) ---------------------------------------------------------

    def pending_state(self) -> dict | None:
        """The rollouts written for the next step (lag 1) by every host, as JSON for the
        checkpoint (``pipeline.checkpoint.TrainPosition.rollouts``); None when there are none.
        Every host calls it (a collective in a multi-host run)."""
        pending = self._pending
        if pending is None:
            return None
        fields = {"rows": pending.rows, "input_ids": pending.batch["input_ids"],
                  "prompt_lengths": pending.prompt_lengths, "lengths": pending.lengths,
                  "stopped": pending.stopped}
        if jax.process_count() > 1:
            fields = {key: np.concatenate(multihost_utils.process_allgather(value))
                      for key, value in fields.items()}
        return {"step": pending.step, "params_step": pending.params_step,
                **{key: np.asarray(value).tolist() for key, value in fields.items()}}

    def restore(self, saved: Mapping | None, rows: np.ndarray) -> None:
        """Takes back the pending rollouts of a checkpoint (``pending_state``) whose rows are
        this host's first ``count`` of ``rows`` (the rows of its next step); otherwise (none
        saved, or another host count) that step generates its own."""
        if not saved:
            return
        where = {int(row): i for i, row in enumerate(saved["rows"])}
        mine = [where.get(int(row)) for row in rows[:self.count]]
        if None in mine:
            return
        picked = {key: np.asarray(saved[key])[mine] for key in
                  ("input_ids", "prompt_lengths", "lengths", "stopped")}
        batch = labelled_rows(picked["input_ids"], picked["prompt_lengths"], picked["lengths"],
                              segment_ids=self.segment_ids)
        self._pending = self._submit(Rollout(
            step=saved["step"], rows=rows[:self.count], batch=batch,
            prompt_lengths=picked["prompt_lengths"], lengths=picked["lengths"],
            stopped=picked["stopped"].astype(bool), params_step=saved["params_step"],
            generate_s=0.0))

    # ---- metrics ---------------------------------------------------------------------------

    def _add(self, **values: float) -> None:
        for key, value in values.items():
            self._sums[key] += value

    def step_done(self, seconds: float) -> None:
        """Counts ``seconds`` of the step that trained on the last ``batch``."""
        self._add(step_s=seconds)

    def take_metrics(self) -> dict[str, float]:
        """``rollout_metrics`` of every host's rollouts since the last call (each host calls it
        at the same steps: a collective in a multi-host run)."""
        sums, self._sums = self._sums, dict.fromkeys(METRIC_SUMS, 0.0)
        if not sums["steps"]:
            return {}
        local = np.asarray([[sums[key] for key in METRIC_SUMS]], np.float32)
        if jax.process_count() > 1:
            local = np.concatenate(multihost_utils.process_allgather(local))
        return rollout_metrics(local)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


# What each host sums between two logging steps (``Rollouts.take_metrics``), in this order:
# steps, generated tokens and seconds of those steps, and the last step's rollouts.
METRIC_SUMS = ("steps", "rollout_tokens", "rollout_s", "score_s", "step_s", "last_tokens",
               "last_stopped", "last_rows", "last_staleness")


def rollout_metrics(per_host: np.ndarray) -> dict[str, float]:
    """The rollout metrics of a logging period from every host's sums ``[hosts,
    len(METRIC_SUMS)]``: of the last step's rollouts of all hosts, ``rollout_length`` (mean
    generated tokens), ``rollout_eos_fraction`` (share that ended at eos) and
    ``rollout_staleness`` (updates between the parameters that wrote them and the step's);
    per step, the hosts' mean seconds generating (``rollout_s``), waiting for the teacher's
    scores (``score_s``) and training (``step_s``); and ``rollout_tokens_per_s``, all hosts'
    generated tokens over their mean generation seconds (the hosts generate at once)."""
    sums = dict(zip(METRIC_SUMS, np.asarray(per_host, np.float64).T))
    rows, steps = sums["last_rows"].sum(), sums["steps"].sum()
    return {"rollout_length": float(sums["last_tokens"].sum() / rows),
            "rollout_eos_fraction": float(sums["last_stopped"].sum() / rows),
            "rollout_staleness": float(sums["last_staleness"].max()),
            **{key: float(sums[key].sum() / steps) for key in ("rollout_s", "score_s", "step_s")},
            "rollout_tokens_per_s": float(sums["rollout_tokens"].sum()
                                          / max(sums["rollout_s"].mean(), 1e-9))}


def samples_only(batch: Mapping[str, np.ndarray | jax.Array], count: int
                 ) -> dict[str, np.ndarray | jax.Array]:
    """``batch`` with the labels of all but its first ``count`` rows (the rollouts) -100: a
    step on it measures the rollouts' tokens alone."""
    labels = np.array(batch["labels"])
    labels[count:] = IGNORE_INDEX
    return {**batch, "labels": labels}


def _timed(fn: Callable, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def _host_local(generated: Generated, mesh: Mesh) -> Generated:
    """This process's rows of a global ``Generated`` (all of them in a one-process run)."""
    if jax.process_count() == 1:
        return generated
    specs = jax.tree.map(lambda _: BATCH_SPEC, generated)
    return multihost_utils.global_array_to_host_local_array(generated, mesh, specs)

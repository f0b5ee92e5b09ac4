"""Checkpoints: the train state plus the run's position, written by Orbax.

A checkpoint directory (``<run_dir>/checkpoints``) holds one sub-directory per saved step, each
with two Orbax items:

- ``state``: the train state, any pytree of ``jax.Array`` (``StandardSave``; every process of
  a multi-host run calls ``save`` with its shards);
- ``meta``: JSON (``JsonSave``) with the ``TrainPosition`` (step, global sample offset, seed,
  skipped-update counts), the ``RunIdentity`` it belongs to, and the state's signature (each
  leaf's path, shape and dtype).

``Checkpoints`` opens the directory and refuses it, with ``CheckpointError`` naming what
differs, if any checkpoint there belongs to another config, model or dataset, and before it
writes anything: a refusal leaves every file as it was. A checkpoint Orbax cannot read is
reported as corrupt; it is never skipped in favour of starting over.

Restoring takes an explicit target (leaves ``jax.ShapeDtypeStruct`` with a ``sharding``, or
arrays whose sharding is reused), so a run saved on one mesh resumes on another.

Typical use in a training loop::

    identity = RunIdentity(config_hash(cfg), config_to_dict(cfg, hashed_only=True),
                           model_fingerprint, dataset.fingerprint)
    with Checkpoints(cfg.checkpoint_dir, identity, keep=cfg.checkpoint.keep,
                     async_save=cfg.checkpoint.async_save) as checkpoints:
        if checkpoints.latest_step() is not None:
            state, position = checkpoints.restore(abstract_state_with_shardings)
        ...
        checkpoints.save(TrainPosition(step, batches.offset, seed), state)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from pipeline.errors import CheckpointError

META_VERSION = 1
_MAX_LISTED = 5


@dataclasses.dataclass(frozen=True)
class TrainPosition:
    """Where a run stands: enough, with the state, to continue it exactly.

    The run's random state is not here: the data order follows from ``data.seed`` and the
    global sample offset, and the model's RNG streams (dropout) are variables of the saved state.

    Attributes:
      step: training steps taken (applied and skipped updates).
      global_sample_offset: global samples consumed (``pipeline.data.HostBatches.offset``).
      rng_seed: the run's ``train.seed``.
      skipped_updates: updates skipped so far because the loss or gradient was not finite.
      empty_batches: updates skipped so far because the batch had no loss token.
      rollouts: on-policy rollouts already written for the next step (``train.on_policy.lag``
        1: ``pipeline.onpolicy.Rollouts.pending_state``), or None.
    """

    step: int
    global_sample_offset: int
    rng_seed: int
    skipped_updates: int = 0
    empty_batches: int = 0
    rollouts: dict | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainPosition:
        """The position saved as ``data``. A checkpoint of an earlier version, without the
        counts (0 then) or with the ``rng_key_data`` it once held (a key that was never read
        back), is accepted."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


@dataclasses.dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must match to be resumed.

    Attributes:
      config_hash: ``pipeline.config.config_hash`` of the run.
      config: ``pipeline.config.config_to_dict(cfg, hashed_only=True)``, so that a refusal can
        name the fields that differ.
      model_fingerprint: identifies the student's architecture (and its initial weights' source).
      dataset_fingerprint: ``DatasetInfo.fingerprint("train")``; empty when not applicable.
    """

    config_hash: str
    config: Mapping[str, Any]
    model_fingerprint: str
    dataset_fingerprint: str = ""


def tree_signature(tree: Any) -> list[list]:
    """``[[path, shape, dtype], ...]`` of every leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [[jax.tree_util.keystr(path), list(np.shape(leaf)), str(leaf.dtype)]
            for path, leaf in leaves]


# A looped model's parameter path has the layer's index after "layers"; a scanned one's
# (stacked, pipeline.models.stack) has none.
_LOOPED_LAYER = re.compile(r"\['layers'\]\[\d+\]")


def _layers_hint(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
    """Names model.student.scan_layers when the checkpoint's layers and the target's differ in
    layout (looped vs stacked), the likely cause of such a mismatch; else ""."""
    looped = [any(_LOOPED_LAYER.search(path) for path in paths) for paths in (saved, wanted)]
    if looped[0] == looped[1] or not any("['layers']" in path for path in wanted):
        return ""
    return (f"model.student.scan_layers: the checkpoint was saved with scan_layers="
            f"{str(not looped[0]).lower()}, this run has {str(not looped[1]).lower()}; set it "
            f"back to resume (Hugging Face exports load either way). ")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    a, b = _flatten(saved), _flatten(current)
    missing = object()
    return [f"{key}: checkpoint has {a.get(key, missing)!r}, this run has {b.get(key, missing)!r}"
            .replace(repr(missing), "(absent)")
            for key in sorted(set(a) | set(b)) if a.get(key, missing) != b.get(key, missing)]


def _listing(items: list[str]) -> str:
    more = f"; and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return "; ".join(items[:_MAX_LISTED]) + more


def _root_cause(error: BaseException) -> str:
    """The innermost error of a chain, on one line: Orbax wraps TensorStore's precise message
    (which array, which file, which byte range) in one that dumps whole TensorStore specs."""
    seen = {id(error)}
    while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        error = inner
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line[:300]}"


def _abstract(target: Any) -> Any:
    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))
    return jax.tree.map(leaf, target)


def _read_meta(manager: ocp.CheckpointManager, directory: Path, step: int) -> dict[str, Any]:
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # Orbax raises many types for unreadable files; all mean corrupt
        raise CheckpointError(f"{directory / str(step)}: corrupt checkpoint, its metadata "
                              f"cannot be read ({type(e).__name__}: {e}); move it away to "
                              f"resume from an earlier one") from e
    if not isinstance(meta, dict) or meta.get("version") != META_VERSION or not all(
            k in meta for k in ("position", "identity", "signature")):
        raise CheckpointError(f"{directory / str(step)}: corrupt checkpoint or not a kdpipe "
                              f"checkpoint (metadata without version {META_VERSION}, position, "
                              f"identity and signature)")
    return meta


def read_checkpoint_metas(directory: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """``{step: metadata}`` of every committed checkpoint in ``directory``, read-only and
    without identity checks (for ``kdpipe inspect`` and ``kdpipe export``); ``{}`` when there is
    none."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        return {}
    # Orbax warns through absl that a read-only manager saves nothing: true, and not news here.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
            create=False, read_only=True))
    finally:
        absl.setLevel(level)
    try:
        return {step: _read_meta(manager, directory, step) for step in sorted(manager.all_steps())}
    finally:
        manager.close()


def _unreport_orbax_reads() -> None:
    """From now on, for the rest of the process, Python's reports of Orbax's read coroutines
    are dropped; every other report goes to the hook that was there before.

    Called once a restore has failed and been raised as a CheckpointError. Orbax reads a
    state's arrays in coroutines; when one read fails, the others are left suspended in Orbax's
    event loop, and Python prints each as "Exception ignored in: <coroutine ...>" with a dump
    of TensorStore specs whenever it closes them: when the loop lets go of them, often only at
    exit. A filter limited to a block (an earlier version) missed the reads still pending at
    its end, so the filter stays."""
    if getattr(sys.unraisablehook, "drops_orbax_reads", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
            return
        previous(unraisable)

    hook.drops_orbax_reads = True
    sys.unraisablehook = hook


class Checkpoints:
    """Save, find and restore the checkpoints of one run directory.

    ``keep`` newest checkpoints are kept. With ``async_save`` a save returns once the arrays
    are copied off the devices and the files are written in the background; ``wait()`` (and
    ``close()``) blocks until they are committed. Use as a context manager or call ``close()``.
    All processes of a multi-host run construct it on the same shared directory and call
    ``save``/``restore`` together.
    """

    def __init__(self, directory: str | os.PathLike, identity: RunIdentity, *, keep: int = 3,
                 async_save: bool = True):
        if keep < 1:
            raise CheckpointError(f"checkpoint.keep: expected >= 1, got {keep}")
        self.directory = Path(directory).absolute()
        self.identity = identity
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: exists and is not a directory")
        # Opening an existing directory reads only; nothing is created until the first save.
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=False,
                                                 enable_async_checkpointing=async_save))
        try:
            for step in self._manager.all_steps():
                self._check_identity(step, self.read_meta(step))
        except BaseException:
            self._manager.close()
            raise

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def all_steps(self) -> list[int]:
        """Steps of the committed checkpoints, ascending (a save still in flight is not listed)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None when the directory holds no checkpoint."""
        return self._manager.latest_step()

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata of ``step`` (``position``, ``identity``, ``signature``)."""
        return _read_meta(self._manager, self.directory, step)

    def _check_identity(self, step: int, meta: Mapping[str, Any]) -> None:
        saved, current = meta["identity"], self.identity
        where = self.directory / str(step)
        if saved.get("model_fingerprint") != current.model_fingerprint:
            raise CheckpointError(f"{where}: checkpoint is from another model (model fingerprint "
                                  f"{saved.get('model_fingerprint')!r}, this run's is "
                                  f"{current.model_fingerprint!r}); use another run_dir")
        if saved.get("dataset_fingerprint") != current.dataset_fingerprint:
            raise CheckpointError(f"{where}: checkpoint was trained on another dataset (dataset "
                                  f"fingerprint {saved.get('dataset_fingerprint')!r}, this run's is "
                                  f"{current.dataset_fingerprint!r}); use another run_dir")
        if saved.get("config_hash") != current.config_hash:
            changed = _differences(saved.get("config", {}), current.config)
            raise CheckpointError(f"{where}: checkpoint is from another config (hash "
                                  f"{saved.get('config_hash')!r}, this run's is "
                                  f"{current.config_hash!r}): {_listing(changed) or 'unknown fields'}"
                                  f"; restore those values or use another run_dir")

    def save(self, position: TrainPosition, state: Any) -> None:
        """Save ``state`` (a pytree of arrays) as checkpoint ``position.step``.

        Refuses a step that is already saved (``CheckpointError``); deletes the oldest
        checkpoints beyond ``keep`` once this one is committed.
        """
        if position.step in self._manager.all_steps():
            raise CheckpointError(f"{self.directory / str(position.step)}: a checkpoint of step "
                                  f"{position.step} already exists; it is not overwritten")
        identity = dataclasses.asdict(self.identity)
        identity["config"] = dict(identity["config"])
        meta = {"version": META_VERSION, "position": dataclasses.asdict(position),
                "identity": identity, "signature": tree_signature(state)}
        self.directory.mkdir(parents=True, exist_ok=True)
        self._manager.save(position.step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, TrainPosition]:
        """Restore checkpoint ``step`` (default: the latest) into the layout of ``target``.

        Args:
          target: a pytree matching the saved state whose leaves are ``jax.ShapeDtypeStruct``
            with the wanted ``sharding`` (or arrays, whose sharding is reused): the restored
            arrays are laid out on that mesh, whatever mesh they were saved from.
          step: which checkpoint; None: the latest.

        Returns ``(state, position)``. Raises ``CheckpointError`` if there is no such checkpoint,
        if the state's structure, shapes or dtypes differ from ``target`` (naming the leaves),
        or if the checkpoint is corrupt.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        elif step not in self._manager.all_steps():
            raise CheckpointError(f"{self.directory}: no checkpoint of step {step} "
                                  f"(have {self.all_steps()})")
        meta = self.read_meta(step)
        self._check_identity(step, meta)
        abstract = _abstract(target)
        saved = {path: (shape, dtype) for path, shape, dtype in meta["signature"]}
        wanted = {path: (shape, dtype) for path, shape, dtype in tree_signature(abstract)}
        mismatched = [f"{p}: checkpoint {saved.get(p, '(absent)')}, target {wanted.get(p, '(absent)')}"
                      for p in sorted(set(saved) | set(wanted)) if saved.get(p) != wanted.get(p)]
        if mismatched:
            raise CheckpointError(f"{self.directory / str(step)}: the saved state does not match "
                                  f"the target state: {_layers_hint(saved, wanted)}"
                                  f"{_listing(mismatched)}")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))
        except Exception as e:  # Orbax/TensorStore raise many types for damaged files
            _unreport_orbax_reads()
            raise CheckpointError(f"{self.directory / str(step)}: corrupt checkpoint, its state "
                                  f"cannot be read ({_root_cause(e)}); move it away to resume "
                                  f"from an earlier one") from None
        return restored.state, TrainPosition.from_json(meta["position"])

    def wait(self) -> None:
        """Block until every save in flight is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish saves in flight and release the manager."""
        self._manager.close()

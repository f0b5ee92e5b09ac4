"""What ``kdpipe eval``, ``kdpipe export`` and ``kdpipe generate`` do with a saved checkpoint of
a run: evaluate its student on the held-out split, write it as a Hugging Face directory, or
hand its student model over (``checkpoint_student``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from pipeline.cache import read_manifest, split_location
from pipeline.checkpoint import read_checkpoint_metas
from pipeline.config import RunConfig
from pipeline.data import read_info
from pipeline.errors import CacheError, CheckpointError, ConfigError
from pipeline.models.hf_io import save_pretrained
from pipeline.student_state import restore_checkpoint, run_identity, student_state
from pipeline.targets import SOURCES
from pipeline.train import EXPORT_DIR, Host, evaluate, prepare_run


def _complete_cache(config: RunConfig, split: str) -> bool:
    """True when ``split``'s cache exists with all its shards committed."""
    if config.cache is None:
        return False
    try:
        manifest = read_manifest(split_location(config.cache.path, split))
    except CacheError:  # nothing written there yet
        return False
    return len(manifest.committed) == manifest.num_shards


def evaluate_checkpoint(config: RunConfig, *, step: int | None = None
                        ) -> tuple[int, dict[str, float], str]:
    """``(step, held-out metrics, where the teacher's targets came from)`` of a checkpoint
    (``kdpipe eval``).

    The targets come from the eval cache (``offline``) or the teacher run on this host
    (``live``). A ``remote`` or ``hybrid`` config, whose teacher hosts only ``kdpipe run``
    starts, is evaluated as an offline one when its eval cache is complete, else as a live one.
    """
    info = read_info(config.data.prepared_dir)
    if not info.splits.get("eval", {}).get("num_rows"):
        raise ConfigError(f"data.eval_fraction: the prepared dataset {config.data.prepared_dir} has "
                          f"no held-out rows to evaluate on")
    if SOURCES[config.teacher_source].asks_teacher_hosts:
        source = "offline" if _complete_cache(config, "eval") else "live"
        config = dataclasses.replace(config, cluster=dataclasses.replace(config.cluster,
                                                                         teacher_source=source))
    setup = prepare_run(config, train_targets=False)
    state, position = restore_checkpoint(config, setup.state, setup.identity, step)
    values = evaluate(config, state, setup.eval_data, host=Host(), sharding=setup.sharding,
                      reader=setup.eval_reader, teacher=setup.teacher_state)
    if setup.eval_reader is not None:
        targets = f"cache {setup.eval_reader.location}"
    elif setup.teacher_state is not None:
        targets = f"live teacher {config.model.teacher.path} on this host"
    else:
        targets = "none (held-out cross-entropy only)"
    return position.step, values, targets


def _saved_vocab_size(meta: Mapping, where: str) -> int:
    """The student's vocabulary size recorded in a checkpoint's state signature: the rows of
    its token embedding (``Embedder.embedding_vd`` ``[vocab, hidden]``)."""
    for path, shape, _ in meta["signature"]:
        if path.startswith("['params']") and "'embedding_vd'" in path:
            return shape[0]
    raise CheckpointError(f"{where}: the checkpoint's state has no student token embedding "
                          f"(params ... embedding_vd); not a checkpoint of a kdpipe student")


def export_checkpoint(config: RunConfig, *, out: str | None = None,
                      step: int | None = None) -> tuple[int, Path]:
    """Write a checkpoint's student as a Hugging Face directory (``kdpipe export``); returns
    ``(step, path)``. Default path: ``<run_dir>/student``. Reads it as ``checkpoint_student``.
    """
    step, model = checkpoint_student(config, step=step)
    path = Path(out) if out else Path(config.run_dir) / EXPORT_DIR
    save_pretrained(model, path)
    return step, path


def checkpoint_student(config: RunConfig, *, step: int | None = None):
    """``(step, student model)`` of the checkpoint of ``step`` (``None``: the latest).

    Needs the checkpoint and ``model.student`` only, whatever the teacher source: no teacher,
    cache or prepared data. The vocabulary size (unless ``model.student.vocab_size`` sets it)
    and the dataset fingerprint of the run's identity come from the checkpoint's own record.
    """
    directory = Path(config.checkpoint_dir).absolute()
    metas = read_checkpoint_metas(directory)
    chosen = max(metas, default=None) if step is None else step
    if chosen not in metas:
        raise CheckpointError(f"{directory}: no checkpoint "
                              + ("saved" if step is None else
                                 f"of step {step} (have {sorted(metas)})"))
    meta = metas[chosen]
    vocab_size = (config.model.student.vocab_size
                  or _saved_vocab_size(meta, str(directory / str(chosen))))
    state, _ = student_state(config, vocab_size)
    identity = run_identity(config, vocab_size, meta["identity"]["dataset_fingerprint"])
    state, position = restore_checkpoint(config, state, identity, chosen)
    return position.step, state.model()

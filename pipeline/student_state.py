"""The student's train state as a run builds it (fresh, on the mesh of ``config.mesh``),
checkpoints it (its arrays: the graph and the optimizer are rebuilt) and identifies it
(``RunIdentity``: what a checkpoint must match to be resumed or restored)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pipeline.checkpoint import Checkpoints, RunIdentity, TrainPosition
from pipeline.config import MESH_AXES, RunConfig, config_hash, config_to_dict
from pipeline.models.build import build_model, model_fingerprint
from pipeline.models.sharding import make_mesh
from pipeline.optim import build_optimizer
from pipeline.step import TrainState


def saved_tree(state: TrainState) -> dict:
    """What a checkpoint holds of a TrainState: its arrays (graphdef and tx are rebuilt)."""
    return {"params": state.params, "other": state.other, "opt_state": state.opt_state,
            "step": state.step}


def from_saved_tree(template: TrainState, tree: dict) -> TrainState:
    """``template`` holding the arrays of ``tree`` (a restored ``saved_tree``)."""
    return template.replace(params=tree["params"], other=tree["other"],
                            opt_state=tree["opt_state"], step=tree["step"])


def _all_on_mesh(state: TrainState, mesh: Mesh) -> TrainState:
    """``state`` with the arrays not laid out on ``mesh`` yet (the step, optimizer counters:
    each on one local device) replicated over it. A checkpoint restores into the template's
    layouts, and a step over several processes refuses an input committed to one device."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(leaf):
        if not isinstance(leaf, jax.Array) or isinstance(leaf.sharding, NamedSharding):
            return leaf
        value = np.asarray(leaf)
        return jax.make_array_from_callback(value.shape, replicated, lambda index: value[index])

    return from_saved_tree(state, jax.tree.map(place, saved_tree(state)))


def student_state(config: RunConfig, vocab_size: int) -> tuple[TrainState, Mesh]:
    """A fresh student with its optimizer state, laid out on the mesh of ``config.mesh``."""
    mesh = make_mesh(**dict(zip(MESH_AXES, config.mesh.shape(jax.device_count()))))
    student = build_model(config.model.student, vocab_size, config.train.seed, mesh)
    state = _all_on_mesh(TrainState.create(student, build_optimizer(config.optimizer,
                                                                    config.train.steps)), mesh)
    return state, mesh


def run_identity(config: RunConfig, vocab_size: int, dataset_fingerprint: str) -> RunIdentity:
    """What the checkpoints of ``config``'s run must match."""
    return RunIdentity(config_hash(config), config_to_dict(config, hashed_only=True),
                       model_fingerprint(config.model.student, vocab_size, config.train.seed),
                       dataset_fingerprint)


def restore_checkpoint(config: RunConfig, state: TrainState, identity: RunIdentity,
                       step: int | None = None) -> tuple[TrainState, TrainPosition]:
    """Checkpoint ``step`` (default: the latest) of ``config.run_dir`` restored into the
    layout of ``state``, once its identity is checked against ``identity``."""
    with Checkpoints(config.checkpoint_dir, identity, keep=config.checkpoint.keep,
                     async_save=False) as checkpoints:
        saved, position = checkpoints.restore(saved_tree(state), step)
    return from_saved_tree(state, saved), position

"""Typed run configuration: frozen dataclasses per concern, loaded from YAML and checked.

A run is described by one ``RunConfig`` composed of sections (``model``, ``data``, ``cache``,
``loss``, ``optimizer``, ``train``, ``mesh``, ``checkpoint``, ``eval``, ``logging``,
``cluster``). ``load_config("configs/demo.yaml")`` reads a YAML file and returns it; every key
is checked on the way in:

- an unknown key is refused with the closest known one (``loss.temprature: unknown key; did
  you mean 'temperature'?``);
- a value of the wrong type or out of range is refused with its path
  (``loss.temperature: expected > 0, got 0``);
- fields that depend on each other are checked together (``train.global_batch_size (10) must
  be divisible by train.grad_accum_steps * cluster.student.hosts (4)``).

All of these raise ``pipeline.errors.ConfigError``. A config is never mutated after loading;
derived values are methods. Each section documents its fields in ``dataclasses.field``
metadata, from which ``render_reference()`` generates ``docs/config-reference.md``
(``python -m pipeline.config docs/config-reference.md`` rewrites it; a test keeps it current).

``config_hash(cfg)`` identifies the fields that change what a run computes (not paths, logging,
checkpoint cadence or the cluster layout), so a checkpoint can refuse to resume under another
config while a run may still move to other hosts or another directory.

Modules: ``fields`` (the typed-section machinery), ``model`` (the model section),
``training`` (the sections in the hash: data, cache, loss, optimizer, train), ``runtime``
(mesh, checkpoint, eval, logging, cluster, demo), ``run`` (``RunConfig``), ``load`` (YAML,
overrides, hashing) and ``reference`` (the generated Markdown reference).
"""

from pipeline.config.load import config_from_dict, config_hash, config_to_dict, load_config, stable_hash
from pipeline.config.model import Dtype, ModelConfig, ModelSpec, check_context
from pipeline.config.reference import render_reference
from pipeline.config.run import RunConfig
from pipeline.config.runtime import (MESH_AXES, CheckpointConfig, ClusterConfig, DemoConfig,
                                     EvalConfig, GroupConfig, LoggingConfig, MeshConfig,
                                     TeacherSource)
from pipeline.config.training import (CacheConfig, DataConfig, LossConfig, OnPolicyConfig,
                                      OptimizerConfig, TrainConfig, hard_labels_only)

__all__ = [
    "MESH_AXES", "CacheConfig", "CheckpointConfig", "ClusterConfig", "DataConfig", "DemoConfig",
    "Dtype", "EvalConfig", "GroupConfig", "LoggingConfig", "LossConfig", "MeshConfig",
    "ModelConfig", "ModelSpec", "OnPolicyConfig", "OptimizerConfig", "RunConfig", "TeacherSource", "TrainConfig",
    "check_context", "config_from_dict", "config_hash", "config_to_dict", "hard_labels_only",
    "load_config",
    "render_reference", "stable_hash",
]

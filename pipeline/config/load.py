"""Loading a ``RunConfig`` from YAML with ``KEY.PATH=VALUE`` overrides, and hashing it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.fields import build_section
from pipeline.config.run import RunConfig
from pipeline.errors import ConfigError


def _set_override(tree: dict, override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected KEY.PATH=VALUE, e.g. loss.temperature=2.0")
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: cannot set a key inside {part!r}, which is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw)


def config_from_dict(raw: Mapping[str, Any], overrides: tuple[str, ...] | list[str] = ()) -> RunConfig:
    """Build and check a ``RunConfig`` from plain data (a parsed YAML document).

    ``overrides`` are ``"section.key=value"`` strings applied first; the value is parsed as YAML
    (``train.steps=20``, ``cache=null``).
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: expected a mapping of sections at the top level, got "
                          f"{type(raw).__name__}")
    tree = json.loads(json.dumps(raw, default=str))  # a deep, plain copy that overrides may edit
    for override in overrides:
        _set_override(tree, override)
    return build_section(RunConfig, tree, "")


def load_config(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> RunConfig:
    """Read a YAML config file, apply ``overrides`` and return the checked ``RunConfig``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file ({e})") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if raw is None:
        raise ConfigError(f"{path}: the config file is empty")
    try:
        return config_from_dict(raw, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def config_to_dict(config: Any, *, hashed_only: bool = False) -> Any:
    """The config as plain JSON-able data (tuples become lists). ``hashed_only`` keeps only the
    fields that ``config_hash`` covers."""
    if not dataclasses.is_dataclass(config):
        if isinstance(config, tuple):
            return list(config)
        return dict(config) if isinstance(config, dict) else config
    out = {}
    for f in dataclasses.fields(config):
        if hashed_only and not f.metadata.get("hashed", True):
            continue
        out[f.name] = config_to_dict(getattr(config, f.name), hashed_only=hashed_only)
    return out


def stable_hash(data: Any) -> str:
    """SHA-256 (hex, 16 characters) of the canonical JSON of ``data``: equal for equal data,
    across processes, machines and Python versions."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_hash(config: RunConfig) -> str:
    """Hash of the fields that change what a run computes (model, data, cache, loss, optimizer,
    steps, batch size, seeds). Paths, cadences, logging and the cluster/mesh layout are left out
    so that a run can resume elsewhere or on another number of hosts."""
    return stable_hash(config_to_dict(config, hashed_only=True))

"""The typed-section machinery: documented fields with bounds, and checked construction.

A section is a frozen dataclass deriving from ``Section`` whose fields are made with ``field``
(a doc string, optional bounds ``gt``/``ge``/``lt``/``le``, and whether the field is part of
the config hash). ``build_section`` builds one from a mapping, coercing each value to its
annotation and naming the full key path of anything wrong.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pipeline.errors import ConfigError


def field(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = dataclasses.MISSING,
          gt: float | None = None, ge: float | None = None, lt: float | None = None,
          le: float | None = None, hashed: bool = True) -> Any:
    """A documented config field with optional bounds.

    ``hashed=False`` keeps the field out of ``config_hash``: it changes where or how often
    things happen, not what is computed.
    """
    bounds = {name: value for name, value in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le))
              if value is not None}
    metadata = {"doc": doc, "bounds": bounds, "hashed": hashed}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


BOUND_TEXT = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_BOUND_OK = {"gt": lambda v, b: v > b, "ge": lambda v, b: v >= b,
             "lt": lambda v, b: v < b, "le": lambda v, b: v <= b}


def _hint(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        key, value = typing.get_args(tp)
        return f"mapping {type_name(key)} -> {type_name(value)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "section"
    return tp.__name__


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if isinstance(value, str) else repr(value)


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form.

    YAML lists become tuples, mappings for a section become that section's dataclass, ints are
    accepted (and converted) where a float is expected.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{path}: expected {type_name(tp)}, got null")
        non_null = [a for a in options if a is not type(None)]
        if len(non_null) == 1:
            return _coerce(path, value, non_null[0])
        raise TypeError(f"unsupported annotation {tp}")  # a kdpipe bug, not user input
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool):
            raise ConfigError(f"{path}: expected one of {', '.join(map(repr, choices))}, "
                              f"got {_describe(value)}{_hint(value, choices)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {_describe(value)}")
        item_type = typing.get_args(tp)[0]
        return tuple(_coerce(f"{path}[{i}]", item, item_type) for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {_describe(value)}")
        key_type, value_type = typing.get_args(tp)
        return {_coerce(f"{path} key", k, key_type): _coerce(f"{path}.{k}", v, value_type)
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a section (a mapping of keys), got {_describe(value)}")
        return build_section(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        # PyYAML follows YAML 1.1, which reads `1e-3` (no dot) as a string: accept numeric
        # strings here rather than make every user write `1.0e-3`.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported annotation {tp}")  # a kdpipe bug, not user input


def format_number(value: float) -> str:
    return format(value, "g") if isinstance(value, float) else repr(value)


def _check_bounds(path: str, value: Any, bounds: Mapping[str, float]) -> None:
    if value is None or isinstance(value, (str, bool, tuple, dict)) or dataclasses.is_dataclass(value):
        return
    for kind, bound in bounds.items():
        if not _BOUND_OK[kind](value, bound):
            raise ConfigError(f"{path}: expected {BOUND_TEXT[kind]} {format_number(bound)}, "
                              f"got {format_number(value)}")


def _check_fields(section: Any, prefix: str) -> None:
    """Coerce and bound-check every field of ``section`` in place (used by ``__post_init__``)."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        path = f"{prefix}.{f.name}" if prefix else f.name
        value = _coerce(path, getattr(section, f.name), hints[f.name])
        _check_bounds(path, value, f.metadata.get("bounds", {}))
        object.__setattr__(section, f.name, value)


def build_section(cls: type, mapping: Mapping[str, Any], path: str) -> Any:
    """Build ``cls`` from a mapping, naming the full key path of any bad key or value."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in mapping.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"{key_path}: unknown key{_hint(key, fields)} "
                              f"(known keys: {', '.join(fields)})")
        # Check here with the full path, so that an error deep inside names e.g.
        # `cluster.student.hosts` and not just `hosts`.
        kwargs[key] = _coerce(key_path, value, hints[key])
        _check_bounds(key_path, kwargs[key], fields[key].metadata.get("bounds", {}))
    missing = [name for name, f in fields.items() if name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{path + '.' if path else ''}{missing[0]}: required key is missing")
    return cls(**kwargs)


class Section:
    """Base of every config section: fields are checked however the section is built."""

    PATH: ClassVar[str] = ""

    def __post_init__(self) -> None:
        _check_fields(self, self.PATH)

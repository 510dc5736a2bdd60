"""Configuration helpers shared by training recipes and evaluation configs.

One dtype table, one dotted-key override parser and setter, and strict dataclass building: an unknown key fails
with the file, the dotted key and the closest valid names. Light on purpose (no torch until `DTYPES` is used), so
that a misspelled key fails in well under a second.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any, Union

import yaml

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def __getattr__(name: str):
    # DTYPES: {"float32": torch.float32, ...}, built on first use so that importing this module needs no torch
    if name == "DTYPES":
        import torch

        table = {n: getattr(torch, n) for n in DTYPE_NAMES}
        globals()["DTYPES"] = table
        return table
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ConfigError(ValueError):
    """A configuration mistake the user can fix; its message is one line, ready to print."""


# ---------------------------------------------------------------------- suggestions
def closest(word: str, candidates: Iterable[str]) -> list[str]:
    """The candidates closest to `word` (difflib ratio >= 0.6): the best one and any within 0.05 of it, at most 3."""
    scored = sorted(((difflib.SequenceMatcher(None, word, c).ratio(), c) for c in set(candidates)), reverse=True)
    scored = [(s, c) for s, c in scored if s >= 0.6]
    return [c for s, c in scored[:3] if s >= scored[0][0] - 0.05] if scored else []


def phrase(names: Sequence[str]) -> str:
    """"; did you mean 'x'?" / "; did you mean one of 'x', 'y'?" ('' for no names)."""
    if not names:
        return ""
    if len(names) == 1:
        return f"; did you mean {names[0]!r}?"
    return "; did you mean one of " + ", ".join(repr(n) for n in names) + "?"


def did_you_mean(key: str, candidates: Iterable[str]) -> str:
    return phrase(closest(key, candidates))


def unknown_key(where: str, key: str, candidates: Iterable[str], what: str = "key", hint: str = "") -> ConfigError:
    """`where: unknown key 'a.b'; did you mean 'a.c'?` (`hint` when nothing is close)."""
    suggestion = did_you_mean(key, candidates)
    return ConfigError(f"{where}: unknown {what} {key!r}{suggestion or (f'; {hint}' if hint else '')}")


# ---------------------------------------------------------------------- dotted overrides
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)")


def parse_value(text: str) -> Any:
    """YAML value, except that `1e-5` is a float (PyYAML's YAML 1.1 reads it as a string)."""
    value = yaml.safe_load(text)
    return float(value) if isinstance(value, str) and _FLOAT.fullmatch(value.strip()) else value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.learning_rate=1e-5)")
    key, value = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {text!r}: empty key name")
    return keys, parse_value(value)


def set_dotted(tree: dict, keys: str | Sequence[str], value: Any, where: str = "override") -> None:
    """tree["a"]["b"] = value for keys "a.b" (or ["a", "b"]), creating sections as needed."""
    keys = keys.split(".") if isinstance(keys, str) else list(keys)
    node = tree
    for depth, k in enumerate(keys[:-1]):
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {'.'.join(keys[:depth + 1])} is not a section")
    node[keys[-1]] = value


# ---------------------------------------------------------------------- strict dataclasses
def _optional(tp) -> tuple[bool, tuple]:
    """(None allowed, the other members) of a type hint."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = typing.get_args(tp)
        return type(None) in args, tuple(a for a in args if a is not type(None))
    return tp is type(None), (tp,)


def _matches(value: Any, tp) -> bool:
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, tp)


def _type_name(tp) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name((typing.get_args(tp) or (Any,))[0]).removeprefix('a ').removeprefix('an ')}s"
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def build(cls, values: Any, where: str, prefix: str = ""):
    """`cls(**values)` for a dataclass, strictly: unknown keys (with suggestions), wrong value types and missing
    required fields raise ConfigError naming `where` and the dotted key; a field's `metadata["choices"]` lists its
    valid values. Nested dataclass fields are built from
    nested mappings; `None` for a field means its default."""
    label = prefix.rstrip(".") or "recipe"
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: {label} must be a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = field_names(cls)
    choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(cls) if "choices" in f.metadata}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise unknown_key(where, f"{prefix}{key}", [f"{prefix}{n}" for n in names],
                              hint=f"valid keys of {label}: {', '.join(names)}")
        if value is None:
            continue  # null: the default
        nullable, members = _optional(hints[key])
        nested = [m for m in members if dataclasses.is_dataclass(m)]
        if nested:
            kwargs[key] = build(nested[0], value, where, f"{prefix}{key}.")
        elif not _matches(value, hints[key]):
            raise ConfigError(f"{where}: {prefix}{key} must be {_type_name(hints[key])}, got {value!r}")
        elif value not in choices.get(key, (value,)):
            raise ConfigError(f"{where}: {prefix}{key}={value!r}; expected one of {', '.join(choices[key])}"
                              f"{did_you_mean(str(value), choices[key])}")
        else:
            kwargs[key] = float(value) if hints[key] is float else value
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: {prefix}{missing[0]} is required")
    return cls(**kwargs)

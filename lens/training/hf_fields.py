"""The names `train` and `grpo` of a recipe may hold: the init fields of `transformers.TrainingArguments` and
`trl.GRPOConfig`, kept on disk per installed version so that checking a recipe imports neither package."""

from __future__ import annotations

import dataclasses
import json
import os
from functools import cache
from pathlib import Path


def names_cache() -> Path:
    """Where the TrainingArguments / GRPOConfig field names are kept between runs: $LENS_CACHE, else
    $XDG_CACHE_HOME/lens, else ~/.cache/lens."""
    if os.environ.get("LENS_CACHE"):
        return Path(os.environ["LENS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lens"


def init_field_names(module: str, cls: str) -> frozenset[str]:
    """The init fields of dataclass `module.cls` (TrainingArguments, GRPOConfig). Importing transformers takes
    seconds, and the launcher checks a recipe before it starts the ranks: the names are kept in a JSON file per
    installed version of the package (`names_cache()`), so that a recipe check imports neither transformers nor
    trl once they are known. An unreadable or unwritable cache only costs the import."""
    from importlib import import_module
    from importlib.metadata import PackageNotFoundError, version

    package = module.split(".")[0]
    try:
        file = names_cache() / f"fields-{package}-{version(package)}-{cls}.json"
    except PackageNotFoundError:
        file = None
    if file is not None:
        try:
            return frozenset(json.loads(file.read_text()))
        except (OSError, ValueError, TypeError):
            pass
    names = frozenset(f.name for f in dataclasses.fields(getattr(import_module(module), cls)) if f.init)
    if file is not None:
        try:  # atomic: ranks that start together may all write it
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(sorted(names)))
            os.replace(tmp, file)
        except OSError:
            pass
    return names


@cache
def train_fields() -> frozenset[str]:
    return init_field_names("transformers", "TrainingArguments")


@cache
def grpo_fields() -> frozenset[str]:
    return init_field_names("trl", "GRPOConfig") - train_fields()

"""The one dataset registry: named benchmarks and training sources over the upstream ``datasets/`` layout, plus
``custom:<path.jsonl>``.

Benchmarks are named ``<dataset>_<split>`` (``refcoco_val``, ``grefcoco_testA``, ``groundingsuite``;
:func:`load_benchmark`); training recipes name the same sets ``<dataset>:<split>`` (``refcoco:train``,
``grefcoco:val``, ``reasonseg:train``; the split defaults to ``train``; :func:`load_source`). Both resolve a
relative ``custom:`` path the same way: as given, else under ``data_root``.

Default ``data_root`` layout::

    datasets/
      refer_seg/{refcoco,refcoco+,refcocog}/refs(unc|umd).p, instances.json
      refer_seg/grefcoco/grefs(unc).json, instances.json
      refer_seg/images/mscoco/images/train2014/COCO_train2014_{id:012d}.jpg
      reason_seg/ReasonSeg/{train,val,test}/*.jpg + *.json
      GroundingSuite-Eval.jsonl
      coco/unlabeled2017/*.jpg
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from lens.data.base import Reference
from lens.data.custom import load_custom
from lens.data.grefcoco import load_grefcoco
from lens.data.groundingsuite import (
    DEFAULT_IMAGE_DIR,
    DEFAULT_JSONL,
    load_groundingsuite,
)
from lens.data.reasonseg import load_reasonseg
from lens.data.refer import load_refer

DEFAULT_DATA_ROOT = Path("datasets")
CUSTOM_PREFIX = "custom:"

Loader = Callable[..., list[Reference]]


def _refer(data_root: Path, *, dataset: str, split: str, **kw: Any) -> list[Reference]:
    return load_refer(data_root, dataset, split, **kw)


def _grefcoco(data_root: Path, *, split: str, **kw: Any) -> list[Reference]:
    return load_grefcoco(data_root, split, **kw)


def _reasonseg(data_root: Path, *, split: str, **kw: Any) -> list[Reference]:
    return load_reasonseg(data_root, split, **kw)


def _groundingsuite(data_root: Path, **kw: Any) -> list[Reference]:
    kw.setdefault("image_root", Path(data_root) / DEFAULT_IMAGE_DIR)
    return load_groundingsuite(Path(data_root) / DEFAULT_JSONL, **kw)


def _build() -> dict[str, Loader]:
    table: dict[str, Loader] = {}
    for ds, splits in (("refcoco", ("val", "testA", "testB")), ("refcoco+", ("val", "testA", "testB")),
                       ("refcocog", ("val", "test"))):
        for split in ("train",) + splits:
            table[f"{ds}_{split}"] = partial(_refer, dataset=ds, split=split)
    for split in ("train", "val", "testA", "testB"):
        table[f"grefcoco_{split}"] = partial(_grefcoco, split=split)
    for split in ("train", "val", "test"):
        table[f"reasonseg_{split}"] = partial(_reasonseg, split=split)
    table["groundingsuite"] = partial(_groundingsuite)
    return table


#: name -> loader taking ``(data_root, **kw)``; evaluation benchmarks plus the ``*_train`` sets.
BENCHMARKS: dict[str, Loader] = _build()
EVAL_BENCHMARKS: tuple[str, ...] = (
    "refcoco_val", "refcoco_testA", "refcoco_testB", "refcoco+_val", "refcoco+_testA", "refcoco+_testB",
    "refcocog_val", "refcocog_test", "reasonseg_val", "reasonseg_test", "groundingsuite",
    "grefcoco_val", "grefcoco_testA", "grefcoco_testB",
)


#: datasets a training source may name as ``<dataset>:<split>``.
SOURCE_DATASETS: tuple[str, ...] = ("refcoco", "refcoco+", "refcocog", "grefcoco", "reasonseg")


def custom_path(name: str, data_root: str | Path) -> Path:
    """The file of ``custom:<path.jsonl>``: a relative path as given, else under ``data_root`` when it is there."""
    path = Path(name[len(CUSTOM_PREFIX):])
    if not path.is_absolute() and not path.exists() and (Path(data_root) / path).exists():
        path = Path(data_root) / path
    return path


def source_key(name: str) -> str | None:
    """The :data:`BENCHMARKS` key of a training source name (``refcoco:train`` or ``refcoco`` -> ``refcoco_train``;
    a benchmark key stays as it is); None when it names no registered set."""
    dataset, _, split = name.partition(":")
    key = f"{dataset}_{split or 'train'}" if dataset in SOURCE_DATASETS else name
    return key if key in BENCHMARKS else None


def load_source(name: str, data_root: str | Path = DEFAULT_DATA_ROOT, **kw: Any) -> list[Reference]:
    """Load training source ``name``: ``<dataset>:<split>`` (``refcoco:train``, ``refcoco+:train``,
    ``refcocog:train``, ``grefcoco:val``, ``reasonseg:train``), a benchmark key, or ``custom:<path.jsonl>``.
    gRefCOCO no-target refs come with an all-zero mask and no box (``meta["no_target"]``), multi-target ones with
    the union mask."""
    if name.startswith(CUSTOM_PREFIX):
        return load_custom(custom_path(name, data_root), **kw)
    key = source_key(name)
    if key is None:
        raise ValueError(
            f"unknown training source {name!r}; expected refcoco:<split>, refcoco+:<split>, refcocog:<split>, "
            f"grefcoco:<split>, reasonseg:<split> or custom:<path.jsonl> (the splits of {sorted(BENCHMARKS)})"
        )
    return BENCHMARKS[key](Path(data_root), **kw)


def load_benchmark(name: str, data_root: str | Path = DEFAULT_DATA_ROOT, **kw: Any) -> list[Reference]:
    """Load benchmark ``name`` (a key of :data:`BENCHMARKS` or ``custom:<path.jsonl>``).

    A relative custom path is tried as given, then under ``data_root``. ``kw`` goes to the loader.
    """
    if name.startswith(CUSTOM_PREFIX):
        return load_custom(custom_path(name, data_root), **kw)
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)} or 'custom:<path.jsonl>'")
    return BENCHMARKS[name](Path(data_root), **kw)

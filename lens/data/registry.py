"""Named benchmarks over the upstream ``datasets/`` layout, plus ``custom:<path.jsonl>``.

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

from functools import partial
from pathlib import Path
from typing import Any, Callable

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


def load_benchmark(name: str, data_root: str | Path = DEFAULT_DATA_ROOT, **kw: Any) -> list[Reference]:
    """Load benchmark ``name`` (a key of :data:`BENCHMARKS` or ``custom:<path.jsonl>``).

    A relative custom path is tried as given, then under ``data_root``. ``kw`` goes to the loader.
    """
    if name.startswith(CUSTOM_PREFIX):
        path = Path(name[len(CUSTOM_PREFIX):])
        if not path.is_absolute() and not path.exists() and (Path(data_root) / path).exists():
            path = Path(data_root) / path
        return load_custom(path, **kw)
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)} or 'custom:<path.jsonl>'")
    return BENCHMARKS[name](Path(data_root), **kw)

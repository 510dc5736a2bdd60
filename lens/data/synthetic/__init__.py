"""Synthetic referring-segmentation scenes written in every supported on-disk format.

Each scene holds 2-4 disjoint flat-coloured shapes on a neutral background (solid, gradient or
mild noise). Expressions come from a small closed grammar (:func:`parse_expression` reads it back)
and every one is checked to select exactly one object of its image (:func:`resolve`), except in the
gRefCOCO files, whose expressions select one object, several ("all the red shapes", kind
``group``) or none ("the green star" in an image without one).

Layout written under ``out`` (the upstream ``datasets/`` layout, so the default loaders read it)::

    refer_seg/{refcoco,refcoco+}/refs(unc).p + instances.json    splits train/val/testA/testB
    refer_seg/refcocog/refs(umd).p + instances.json              splits train/val/test
    refer_seg/grefcoco/grefs(unc).json + instances.json          splits train/val/testA/testB (GRES)
    refer_seg/images/mscoco/images/train2014/COCO_train2014_{id:012d}.jpg
    reason_seg/ReasonSeg/{train,val,test}/synth_{split}_{i:04d}.jpg + .json
    GroundingSuite-Eval.jsonl + coco/unlabeled2017/{id:012d}.jpg  (val + test scenes)
    custom/{train,val,test}.jsonl + custom/images/{split}_{i:04d}.jpg
    swap.json               {ref_id: [expressions naming OTHER objects of the same image]}
    synthetic_meta.json     scenes (objects) and, per ref_id, target / swap targets / parseable texts
    grefcoco_meta.json      per gRefCOCO ref_id: scene, targets (0, 1 or more), texts, kind

The gRefCOCO refs are drawn from their own random stream (seeded by ``[seed, GREFCOCO_STREAM]``),
so adding them left every other file byte-identical for a given seed.

Masks in the files are polygons (or RLE encoded from pycocotools rasterisations of the polygons),
so loaders reproduce them exactly; JPEG (quality 95) only perturbs image pixels.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lens.data.base import Reference
from lens.data.synthetic.grammar import (
    ALL_KINDS,
    CATEGORY_IDS,
    COLOUR_THINGS,
    COLOURS,
    FORMAT_KINDS,
    GREFCOCO_SINGLE_KINDS,
    GREFCOCO_STREAM,
    MARGIN,
    POSITIONS,
    RELATIONS,
    SENTENCE_WRAPPERS,
    SHAPE_FEATURES,
    SHAPES,
    SIZE_RATIO,
    SIZES,
    Predicate,
    choose_texts,
    normalise_text,
    parse_expression,
    render,
    resolve,
    valid_predicates,
)
from lens.data.synthetic.scenes import Scene, SceneObject, render_scene, sample_scene, shape_polygon
from lens.data.synthetic.writers import _Writer

__all__ = [
    "ALL_KINDS", "CATEGORY_IDS", "COLOUR_THINGS", "COLOURS", "FORMAT_KINDS", "GREFCOCO_SINGLE_KINDS",
    "GREFCOCO_STREAM", "MARGIN", "POSITIONS", "RELATIONS", "SENTENCE_WRAPPERS", "SHAPE_FEATURES", "SHAPES",
    "SIZE_RATIO", "SIZES", "Predicate", "Scene", "SceneObject", "attach_swaps", "choose_texts", "generate_synthetic",
    "load_grefcoco_meta", "load_swaps", "load_synthetic_meta", "normalise_text", "parse_expression", "render",
    "render_scene", "resolve", "sample_scene", "shape_polygon", "valid_predicates",
]



def generate_synthetic(
    out: str | Path,
    seed: int = 0,
    n_train: int = 64,
    n_val: int = 16,
    n_test: int = 16,
    image_size: int = 224,
) -> dict[str, int]:
    """Write the synthetic benchmark under ``out`` (see module docstring); returns ref counts per format.

    Image height is ``image_size``; width is ``image_size`` or ``1.25 * image_size`` (drawn per image).
    Deterministic for a given ``seed``.
    """
    if min(n_train, n_val, n_test) < 1:
        raise ValueError("n_train, n_val and n_test must be >= 1")
    out = Path(out)
    rng = np.random.default_rng(seed)
    writer = _Writer(out, rng, np.random.default_rng([seed, GREFCOCO_STREAM]))
    image_id = 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for idx in range(n):
            image_id += 1
            width = image_size if rng.random() < 0.7 else round(1.25 * image_size)
            scene = sample_scene(rng, f"{split}/{idx:04d}", split, image_size, width)
            buf = io.BytesIO()
            Image.fromarray(render_scene(scene, rng)).save(buf, format="JPEG", quality=95)
            writer.add(scene, image_id, idx, buf.getvalue())
    writer.finish(seed, image_size)
    return {"images": image_id, **writer.counts}


def load_swaps(root: str | Path) -> dict[str, list[str]]:
    """``{ref_id: [expressions naming other objects of the same image]}`` from ``root/swap.json``."""
    path = Path(root) / "swap.json"
    if not path.is_file():
        raise FileNotFoundError(f"missing {path} (written by tools/make_synthetic_data.py)")
    return json.loads(path.read_text(encoding="utf-8"))


def attach_swaps(references: Iterable[Reference], swaps: dict[str, list[str]]) -> list[Reference]:
    """Set ``meta["swap_expressions"]`` on each reference found in ``swaps``; returns the list."""
    refs = list(references)
    for ref in refs:
        if ref.ref_id in swaps:
            ref.meta["swap_expressions"] = list(swaps[ref.ref_id])
    return refs


def load_grefcoco_meta(root: str | Path) -> dict[str, Any]:
    """``{"seed", "refs": {ref_id: {scene, split, targets, texts, kind}}}`` of the synthetic gRefCOCO."""
    path = Path(root) / "grefcoco_meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"missing {path} (written by tools/make_synthetic_data.py)")
    return json.loads(path.read_text(encoding="utf-8"))


def load_synthetic_meta(root: str | Path) -> dict[str, Any]:
    """Scenes (as :class:`Scene`) and per-ref metadata written by :func:`generate_synthetic`."""
    data = json.loads((Path(root) / "synthetic_meta.json").read_text(encoding="utf-8"))
    data["scenes"] = {k: Scene.from_dict(v) for k, v in data["scenes"].items()}
    return data

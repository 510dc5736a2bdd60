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
import math
import pickle
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from lens.data.base import Reference
from lens.data.masks import encode_rle, polygon_mask

# ----------------------------------------------------------------------------- vocabulary

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 80, 225),
    "yellow": (245, 210, 30),
    "purple": (145, 55, 190),
    "orange": (250, 135, 20),
}
COLOUR_THINGS = {
    "red": "a ripe tomato",
    "green": "fresh grass",
    "blue": "a clear summer sky",
    "yellow": "a banana",
    "purple": "an eggplant",
    "orange": "a pumpkin",
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SHAPE_FEATURES = {
    "circle": "a round outline",
    "square": "four right angles",
    "triangle": "exactly three corners",
    "diamond": "four equal sides but no right angles",
    "star": "five points",
}
CATEGORY_IDS = {name: i + 1 for i, name in enumerate(SHAPES)}
SENTENCE_WRAPPERS = (("can you find ", "?"), ("please segment ", "."), ("which part of the picture shows ", "?"))

POSITIONS = {"on the left": ("x", 1), "on the right": ("x", -1), "at the top": ("y", 1), "at the bottom": ("y", -1)}
SIZES = {"largest": "max", "big": "max", "smallest": "min", "small": "min"}
RELATIONS = {"left of": ("x", -1), "right of": ("x", 1), "above": ("y", -1), "below": ("y", 1)}
MARGIN = 0.06  # fraction of the image side: positional/relational decisions need this clearance
SIZE_RATIO = 1.5  # "largest" needs this area ratio over the runner-up
ALL_KINDS = ("attr", "position", "size", "relation", "reasoning")
GREFCOCO_STREAM = 0x67524546  # second entropy word of the gRefCOCO random stream
GREFCOCO_SINGLE_KINDS = ("attr", "position", "size", "relation")
FORMAT_KINDS = {
    "refcoco": ("attr", "position", "size", "relation"),
    "refcoco+": ("attr", "size", "reasoning"),  # like RefCOCO+: no location words
    "refcocog": ("relation", "reasoning", "attr", "position"),
    "reasonseg": ("reasoning",),
    "groundingsuite": ALL_KINDS,
    "custom": ALL_KINDS,
}

# ----------------------------------------------------------------------------- scene model


@dataclass
class SceneObject:
    """One flat shape; ``polygon`` is flat ``[x0, y0, ...]`` in pixels, ``area`` its mask pixel count."""

    shape: str
    colour: str
    cx: float
    cy: float
    r: float
    polygon: list[float]
    area: int = 0
    bbox: list[float] = field(default_factory=list)  # xyxy of the polygon


@dataclass
class Scene:
    key: str
    split: str
    height: int
    width: int
    objects: list[SceneObject]
    background: str = "solid"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scene":
        return cls(**{**d, "objects": [SceneObject(**o) for o in d["objects"]]})


@dataclass(frozen=True)
class Predicate:
    """Parsed expression. ``op``: position name, size word or relation; ``anchor``: (colour, shape)."""

    kind: str
    colour: str | None = None
    shape: str | None = None
    op: str | None = None
    anchor: tuple[str | None, str | None] | None = None


# ----------------------------------------------------------------------------- grammar

_COL = "|".join(COLOURS)
_SHP = "|".join(SHAPES)
_THING = "|".join(re.escape(v) for v in COLOUR_THINGS.values())
_FEAT = "|".join(re.escape(v) for v in SHAPE_FEATURES.values())


def _core(tag: str) -> str:
    return rf"(?:(?P<c{tag}>{_COL}) )?(?P<s{tag}>{_SHP}|object|shape)"


_PLURAL = {**{shape: shape + "s" for shape in SHAPES}, "object": "objects", "shape": "shapes"}
_PLURAL_TO_WORD = {v: k for k, v in _PLURAL.items()}
_PLU = "|".join(_PLURAL.values())

_PATTERNS = [
    ("group", re.compile(rf"^(?:all the|the) (?:(?P<c1>{_COL}) )?(?P<p1>{_PLU})$")),
    ("group_every", re.compile(rf"^every {_core('1')}$")),
    ("relation", re.compile(rf"^the {_core('1')} (?P<op>{'|'.join(RELATIONS)}) the {_core('2')}$")),
    ("position", re.compile(rf"^the {_core('1')} (?P<op>{'|'.join(POSITIONS)})$")),
    ("size", re.compile(rf"^the (?P<op>{'|'.join(SIZES)}) {_core('1')}$")),
    ("reasoning_cs", re.compile(rf"^something with (?P<feat>{_FEAT}) that is the colour of (?P<thing>{_THING})$")),
    ("reasoning_c", re.compile(rf"^the object that is the colour of (?P<thing>{_THING})$")),
    ("reasoning_s", re.compile(rf"^the shape with (?P<feat>{_FEAT})$")),
    ("attr", re.compile(rf"^the {_core('1')}$")),
]
_THING_TO_COLOUR = {v: k for k, v in COLOUR_THINGS.items()}
_FEAT_TO_SHAPE = {v: k for k, v in SHAPE_FEATURES.items()}


def normalise_text(text: str) -> str:
    """Lower-case, strip sentence wrappers and final punctuation."""
    t = text.strip().lower().rstrip(".?! ")
    for prefix, _ in SENTENCE_WRAPPERS:
        if t.startswith(prefix):
            t = t[len(prefix):]
    return t


def parse_expression(text: str) -> Predicate:
    """Parse a synthetic expression back into a :class:`Predicate` (``ValueError`` if not in the grammar)."""
    t = normalise_text(text)
    for name, pattern in _PATTERNS:
        m = pattern.match(t)
        if not m:
            continue
        g = m.groupdict()
        if name == "group":
            return Predicate("group", g["c1"], _shape_word(_PLURAL_TO_WORD[g["p1"]]))
        if name == "group_every":
            return Predicate("group", g["c1"], _shape_word(g["s1"]))
        if name.startswith("reasoning"):
            colour = _THING_TO_COLOUR.get(g.get("thing") or "")
            shape = _FEAT_TO_SHAPE.get(g.get("feat") or "")
            return Predicate("reasoning", colour, shape)
        colour, shape = g["c1"], _shape_word(g["s1"])
        anchor = (g["c2"], _shape_word(g["s2"])) if name == "relation" else None
        return Predicate(name, colour, shape, g.get("op"), anchor)
    raise ValueError(f"not a synthetic expression: {text!r}")


def _shape_word(word: str) -> str | None:
    return None if word in ("object", "shape") else word


def _matches(scene: Scene, colour: str | None, shape: str | None) -> list[int]:
    return [i for i, o in enumerate(scene.objects)
            if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)]


def resolve(pred: Predicate | str, scene: Scene) -> list[int]:
    """Indices of the objects ``pred`` selects; more than one means ambiguous (near-ties included)."""
    if isinstance(pred, str):
        pred = parse_expression(pred)
    cands = _matches(scene, pred.colour, pred.shape)
    objs = scene.objects
    if pred.kind in ("attr", "reasoning", "group"):
        return cands
    if pred.kind == "position":
        axis, sign = POSITIONS[pred.op]
        key = {i: sign * (objs[i].cx if axis == "x" else objs[i].cy) for i in cands}
        slack = MARGIN * (scene.width if axis == "x" else scene.height)
        best = min(key.values(), default=0.0)
        return [i for i in cands if key[i] <= best + slack]
    if pred.kind == "size":
        areas = {i: objs[i].area for i in cands}
        if SIZES[pred.op] == "max":
            top = max(areas.values(), default=0)
            return [i for i in cands if areas[i] * SIZE_RATIO >= top]
        low = min(areas.values(), default=0)
        return [i for i in cands if areas[i] <= low * SIZE_RATIO]
    if pred.kind == "relation":
        anchors = _matches(scene, *pred.anchor)
        if len(anchors) != 1:
            return []
        a = objs[anchors[0]]
        axis, sign = RELATIONS[pred.op]
        return [i for i in cands if i != anchors[0] and sign * _delta(objs[i], a, axis) > 0]
    raise ValueError(f"unknown predicate kind {pred.kind!r}")


def _delta(o: SceneObject, a: SceneObject, axis: str) -> float:
    return (o.cx - a.cx) if axis == "x" else (o.cy - a.cy)


def render(pred: Predicate, rng: np.random.Generator) -> str:
    """Text for ``pred`` (synonyms such as object/shape picked with ``rng``)."""
    if pred.kind == "reasoning":
        if pred.colour and pred.shape:
            return f"something with {SHAPE_FEATURES[pred.shape]} that is the colour of {COLOUR_THINGS[pred.colour]}"
        if pred.colour:
            return f"the object that is the colour of {COLOUR_THINGS[pred.colour]}"
        return f"the shape with {SHAPE_FEATURES[pred.shape]}"
    if pred.kind == "group":
        return _group_text(pred.colour, pred.shape, rng)
    core = _core_text(pred.colour, pred.shape, rng)
    if pred.kind == "attr":
        return f"the {core}"
    if pred.kind == "position":
        return f"the {core} {pred.op}"
    if pred.kind == "size":
        return f"the {pred.op} {core}"
    return f"the {core} {pred.op} the {_core_text(*pred.anchor, rng)}"


def _core_text(colour: str | None, shape: str | None, rng: np.random.Generator) -> str:
    noun = shape or ("object" if rng.random() < 0.5 else "shape")
    return f"{colour} {noun}" if colour else noun


def _group_text(colour: str | None, shape: str | None, rng: np.random.Generator) -> str:
    """A plural phrase for every object matching ``(colour, shape)``: "all the red circles", ..."""
    noun = shape or ("object" if rng.random() < 0.5 else "shape")
    form = int(rng.integers(3))
    if form == 2:
        return f"every {colour} {noun}" if colour else f"every {noun}"
    head = "all the" if form == 0 else "the"
    return f"{head} {colour} {_PLURAL[noun]}" if colour else f"{head} {_PLURAL[noun]}"


def valid_predicates(scene: Scene, target: int) -> list[Predicate]:
    """All grammar predicates that select exactly ``target`` with clear margins."""
    o = scene.objects[target]
    cores = [(o.colour, o.shape), (o.colour, None), (None, o.shape), (None, None)]
    preds = [Predicate("attr", c, s) for c, s in cores[:3]]
    preds += [Predicate("reasoning", c, s) for c, s in cores[:3]]
    preds += [Predicate("position", c, s, op) for c, s in cores for op in POSITIONS]
    preds += [Predicate("size", c, s, op) for c, s in cores for op in SIZES]
    for j, a in enumerate(scene.objects):
        if j == target:
            continue
        anchor = next(((c, s) for c, s in [(a.colour, None), (None, a.shape), (a.colour, a.shape)]
                       if _matches(scene, c, s) == [j]), None)
        if anchor is not None:
            preds += [Predicate("relation", c, s, op, anchor) for c, s in cores[1:] for op in RELATIONS]
    return [p for p in preds if resolve(p, scene) == [target] and _clear(p, scene, target)]


def _clear(pred: Predicate, scene: Scene, target: int) -> bool:
    """Extra naturalness rules: comparatives need >= 2 candidates; relations need clearance."""
    n = len(_matches(scene, pred.colour, pred.shape))
    if pred.kind == "position":
        return n >= 2
    if pred.kind == "size":
        return n >= 2 if pred.op in ("largest", "smallest") else n == 2
    if pred.kind == "relation":
        a = scene.objects[_matches(scene, *pred.anchor)[0]]
        axis, sign = RELATIONS[pred.op]
        side = scene.width if axis == "x" else scene.height
        return sign * _delta(scene.objects[target], a, axis) >= MARGIN * side
    return True


# ----------------------------------------------------------------------------- scene sampling


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[float]:
    """Flat polygon (rounded to 0.01 px) for ``shape`` centred at ``(cx, cy)`` with size ``r``."""
    if shape == "circle":
        ang = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        pts = np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1)
    elif shape == "square":
        a = 0.85 * r
        pts = np.array([[cx - a, cy - a], [cx + a, cy - a], [cx + a, cy + a], [cx - a, cy + a]])
    elif shape == "triangle":
        ang = np.deg2rad([-90, 30, 150])
        pts = np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1)
    elif shape == "diamond":
        pts = np.array([[cx, cy - r], [cx + 0.65 * r, cy], [cx, cy + r], [cx - 0.65 * r, cy]])
    elif shape == "star":
        ang = np.deg2rad(-90 + 36 * np.arange(10))
        rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [round(float(v), 2) for v in pts.reshape(-1)]


def _bound_radius(shape: str, r: float) -> float:
    return 0.85 * math.sqrt(2) * r if shape == "square" else r


def sample_scene(rng: np.random.Generator, key: str, split: str, height: int, width: int) -> Scene:
    """Sample a scene in which every object has at least one unambiguous expression."""
    while True:
        scene = _try_scene(rng, key, split, height, width)
        if scene is not None and all(valid_predicates(scene, i) for i in range(len(scene.objects))):
            return scene


def _try_scene(rng: np.random.Generator, key: str, split: str, h: int, w: int) -> Scene | None:
    n = int(rng.integers(2, 5))
    colours = list(rng.choice(list(COLOURS), size=int(rng.integers(2, 5)), replace=False))
    shapes = list(rng.choice(SHAPES, size=int(rng.integers(2, 4)), replace=False))
    side, gap = min(h, w), 0.04 * min(h, w)
    objects: list[SceneObject] = []
    for _ in range(n):
        shape, colour = str(rng.choice(shapes)), str(rng.choice(colours))
        r = float(rng.uniform(0.07, 0.19) * side)
        br = _bound_radius(shape, r)
        for _attempt in range(60):
            cx, cy = float(rng.uniform(br + 2, w - br - 2)), float(rng.uniform(br + 2, h - br - 2))
            if all(math.hypot(cx - o.cx, cy - o.cy) >= br + _bound_radius(o.shape, o.r) + gap for o in objects):
                break
        else:
            return None
        poly = shape_polygon(shape, cx, cy, r)
        xs, ys = poly[0::2], poly[1::2]
        area = int(polygon_mask(poly, h, w).sum())
        objects.append(SceneObject(shape, colour, round(cx, 2), round(cy, 2), round(r, 2), poly, area,
                                   [min(xs), min(ys), max(xs), max(ys)]))
    return Scene(key, split, h, w, objects, str(rng.choice(["solid", "gradient", "noise"])))


def render_scene(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """``uint8 (H, W, 3)`` image: background plus shapes painted from their pycocotools masks."""
    h, w = scene.height, scene.width
    base = _neutral(rng)
    if scene.background == "gradient":
        other, ang = _neutral(rng), rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w]
        t = (np.cos(ang) * xx / w + np.sin(ang) * yy / h)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        img = base[None, None] * (1 - t[..., None]) + other[None, None] * t[..., None]
    else:
        img = np.broadcast_to(base, (h, w, 3)).astype(np.float64)
        if scene.background == "noise":
            img = img + rng.normal(0, 6, size=(h, w, 3))
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    for o in scene.objects:
        img[polygon_mask(o.polygon, h, w) > 0] = COLOURS[o.colour]
    return img


def _neutral(rng: np.random.Generator) -> np.ndarray:
    return np.clip(rng.uniform(60, 200) + rng.uniform(-10, 10, size=3), 0, 255)


# ----------------------------------------------------------------------------- expression choice


def choose_texts(preds: Sequence[Predicate], kinds: Sequence[str], n: int, rng: np.random.Generator) -> list[str]:
    """Up to ``n`` distinct texts from ``preds`` of the given ``kinds`` (kinds drawn uniformly)."""
    by_kind: dict[str, list[Predicate]] = {}
    for p in preds:
        if p.kind in kinds:
            by_kind.setdefault(p.kind, []).append(p)
    texts: list[str] = []
    for _ in range(4 * n):
        if len(texts) >= n or not by_kind:
            break
        kind = sorted(by_kind)[int(rng.integers(len(by_kind)))]
        text = render(by_kind[kind][int(rng.integers(len(by_kind[kind])))], rng)
        if text not in texts:
            texts.append(text)
    return texts


def _swap_texts(scene: Scene, preds: list[list[Predicate]], target: int, kinds: Sequence[str],
                rng: np.random.Generator) -> tuple[list[str], list[int]]:
    texts, targets = [], []
    for j in range(len(scene.objects)):
        if j != target:
            got = choose_texts(preds[j], kinds, 1, rng) or choose_texts(preds[j], ALL_KINDS, 1, rng)
            texts.append(got[0])
            targets.append(j)
    return texts, targets


# ----------------------------------------------------------------------------- writers


class _Writer:
    """Collects refs of all formats plus the side files while scenes are generated."""

    def __init__(self, out: Path, rng: np.random.Generator, grng: np.random.Generator) -> None:
        self.out, self.rng, self.grng = out, rng, grng  # grng: the gRefCOCO stream only
        self.refs_meta: dict[str, dict[str, Any]] = {}
        self.swaps: dict[str, list[str]] = {}
        self.scenes: dict[str, dict[str, Any]] = {}
        self.refer_refs: dict[str, list[dict]] = {"refcoco": [], "refcoco+": [], "refcocog": []}
        self.coco_images: list[dict] = []
        self.coco_anns: list[dict] = []
        self.gs_lines: list[dict] = []
        self.grefs: list[dict] = []
        self.grefs_meta: dict[str, dict[str, Any]] = {}
        self.custom: dict[str, list[dict]] = {}
        self.counts: dict[str, int] = {}

    def add(self, scene: Scene, image_id: int, index_in_split: int, jpeg: bytes) -> None:
        preds = [valid_predicates(scene, i) for i in range(len(scene.objects))]
        self.scenes[scene.key] = asdict(scene)
        self._refer(scene, image_id, index_in_split, preds, jpeg)
        self._reasonseg(scene, index_in_split, preds, jpeg)
        if scene.split in ("val", "test"):
            self._groundingsuite(scene, image_id, preds, jpeg)
        self._custom(scene, index_in_split, preds, jpeg)
        self._grefcoco(scene, image_id, index_in_split, preds)

    def _record(self, ref_id: str, scene: Scene, target: int, texts: list[str], swap: tuple[list[str], list[int]],
                **extra: Any) -> None:
        self.refs_meta[ref_id] = {"scene": scene.key, "target": target, "texts": texts,
                                  "swap_expressions": swap[0], "swap_targets": swap[1], **extra}
        self.swaps[ref_id] = swap[0]
        fmt = ref_id.split("/")[0]
        self.counts[fmt] = self.counts.get(fmt, 0) + 1

    def _write(self, rel: str, data: bytes) -> None:
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    # REFER ------------------------------------------------------------------
    def _refer(self, scene: Scene, image_id: int, idx: int, preds: list[list[Predicate]], jpeg: bytes) -> None:
        self._write(f"refer_seg/images/mscoco/images/train2014/COCO_train2014_{image_id:012d}.jpg", jpeg)
        self.coco_images.append({"id": image_id, "file_name": f"COCO_train2014_{image_id:012d}.jpg",
                                 "height": scene.height, "width": scene.width})
        overlaps = set()
        for j, o in enumerate(scene.objects):
            ann_id = image_id * 100 + j
            overlap = (idx == 0 and j == 0) or self.rng.random() < 0.08  # a few two-part annotations
            seg = [o.polygon, _inner_square(o)] if overlap else [o.polygon]
            if overlap:
                overlaps.add(j)
            x1, y1, x2, y2 = o.bbox
            self.coco_anns.append({"id": ann_id, "image_id": image_id, "category_id": CATEGORY_IDS[o.shape],
                                   "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)], "area": o.area,
                                   "iscrowd": 0, "segmentation": seg})
        for ds, refs in self.refer_refs.items():
            split = _refer_split(scene.split, idx, ds)
            for j, o in enumerate(scene.objects):
                texts = choose_texts(preds[j], FORMAT_KINDS[ds], int(self.rng.integers(1, 4)), self.rng)
                if not texts:
                    continue
                ref_id, ann_id = len(refs), image_id * 100 + j
                sent0 = sum(len(r["sentences"]) for r in refs)
                sents = [{"sent": t, "raw": t, "sent_id": sent0 + k, "tokens": t.split()} for k, t in enumerate(texts)]
                refs.append({"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split,
                             "category_id": CATEGORY_IDS[o.shape], "sent_ids": [s["sent_id"] for s in sents],
                             "sentences": sents, "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg"})
                swap = _swap_texts(scene, preds, j, FORMAT_KINDS[ds], self.rng)
                self._record(f"{ds}/{ref_id}", scene, j, texts, swap, split=split, overlap=j in overlaps)

    # ReasonSeg --------------------------------------------------------------
    def _reasonseg(self, scene: Scene, idx: int, preds: list[list[Predicate]], jpeg: bytes) -> None:
        rng = self.rng
        reasoned = [j for j, p in enumerate(preds) if any(q.kind == "reasoning" for q in p)]
        target = int(rng.choice(reasoned or list(range(len(scene.objects)))))
        kinds = FORMAT_KINDS["reasonseg"] if reasoned else ALL_KINDS
        texts = [_wrap(t, rng) for t in choose_texts(preds[target], kinds, int(rng.integers(1, 4)), rng)]
        o = scene.objects[target]
        shapes = [{"label": "target", "points": p} for p in _maybe_split(o, idx % 4 == 1)]
        if idx % 3 == 0:  # an ignore patch over the target's right edge (painted after: smaller)
            shapes.append({"label": "ignore", "points": _pairs(_square(o.cx + 0.9 * o.r, o.cy, 0.3 * o.r))})
        if idx % 5 == 2:  # a deprecated "flag" shape that must be skipped
            shapes.append({"label": "flag", "points": _pairs(_square(scene.width / 2, scene.height / 2,
                                                                       0.45 * min(scene.width, scene.height)))})
        name = f"synth_{scene.split}_{idx:04d}"
        ann: dict[str, Any] = {"shapes": shapes, "text": texts, "is_sentence": any(t[-1] in "?." for t in texts)}
        if idx % 3 != 2:  # some files omit the size so loaders read the image header
            ann.update(imageHeight=scene.height, imageWidth=scene.width)
        base = f"reason_seg/ReasonSeg/{scene.split}/{name}"
        self._write(base + ".jpg", jpeg)
        self._write(base + ".json", json.dumps(ann).encode())
        swap = _swap_texts(scene, preds, target, kinds, rng)
        self._record(f"reasonseg/{scene.split}/{name}", scene, target, texts, swap,
                     ignore=idx % 3 == 0, multipart=len(shapes) > 1 and shapes[1]["label"] == "target",
                     flag=idx % 5 == 2)

    # GroundingSuite ---------------------------------------------------------
    def _groundingsuite(self, scene: Scene, image_id: int, preds: list[list[Predicate]], jpeg: bytes) -> None:
        self._write(f"coco/unlabeled2017/{image_id:012d}.jpg", jpeg)
        for j, o in enumerate(scene.objects):
            text = choose_texts(preds[j], ALL_KINDS, 1, self.rng)[0]
            caption = text[0].upper() + text[1:] + "."
            overlap = len(self.gs_lines) % 7 == 3
            seg = ([o.polygon, _inner_square(o)] if overlap
                   else encode_rle(polygon_mask(o.polygon, scene.height, scene.width)))
            ref_id = f"groundingsuite/{len(self.gs_lines)}"
            self.gs_lines.append({"image_path": f"{image_id:012d}.jpg", "box": o.bbox, "segmentation": seg,
                                  "caption": caption})
            self._record(ref_id, scene, j, [caption], _swap_texts(scene, preds, j, ALL_KINDS, self.rng),
                         overlap=overlap)

    # custom -----------------------------------------------------------------
    def _custom(self, scene: Scene, idx: int, preds: list[list[Predicate]], jpeg: bytes) -> None:
        image = f"images/{scene.split}_{idx:04d}.jpg"
        self._write(f"custom/{image}", jpeg)
        for j, o in enumerate(scene.objects):
            texts = choose_texts(preds[j], ALL_KINDS, int(self.rng.integers(1, 4)), self.rng)
            swap = _swap_texts(scene, preds, j, ALL_KINDS, self.rng)
            ref_id = f"custom/{scene.split}/{idx:04d}-{j}"
            rec: dict[str, Any] = {"id": ref_id, "image": image, "expressions": texts}
            if (idx + j) % 2:
                rec["mask"] = encode_rle(polygon_mask(o.polygon, scene.height, scene.width))
            else:
                rec["polygons"] = [o.polygon]
                rec["box"] = o.bbox
            rec.update(swap_expressions=swap[0], meta={"scene": scene.key, "target": j, "swap_targets": swap[1]})
            self.custom.setdefault(scene.split, []).append(rec)
            self._record(ref_id, scene, j, texts, swap)

    # gRefCOCO ---------------------------------------------------------------
    def _grefcoco(self, scene: Scene, image_id: int, idx: int, preds: list[list[Predicate]]) -> None:
        """Single-, multi- and no-target refs on the REFER images and annotations (draws: grng only)."""
        rng = self.grng
        split = _refer_split(scene.split, idx, "grefcoco")
        for j in range(len(scene.objects)):
            texts = choose_texts(preds[j], GREFCOCO_SINGLE_KINDS, int(rng.integers(1, 3)), rng)
            if texts:
                self._gref(scene, image_id, split, [j], texts, "single")
        groups = _groups(scene)
        for k in rng.permutation(len(groups))[: int(rng.integers(1, 3))]:
            colour, shape = groups[int(k)]
            texts = _distinct(lambda c=colour, s=shape: _group_text(c, s, rng), int(rng.integers(1, 3)))
            self._gref(scene, image_id, split, _matches(scene, colour, shape), texts, "multi")
        absent = _absent(scene)
        colour, shape = absent[int(rng.integers(len(absent)))]
        n = int(rng.integers(1, 3))
        texts = _distinct(lambda: (render(Predicate("attr", colour, shape), rng) if rng.random() < 0.5
                                   else _group_text(colour, shape, rng)), n)
        self._gref(scene, image_id, split, [], texts, "none")

    def _gref(self, scene: Scene, image_id: int, split: str, targets: list[int], texts: list[str], kind: str) -> None:
        ref_id = len(self.grefs)
        sent0 = sum(len(r["sentences"]) for r in self.grefs)
        sents = [{"sent": t, "raw": t, "sent_id": sent0 + k, "tokens": t.split()} for k, t in enumerate(texts)]
        objs = scene.objects
        self.grefs.append({
            "ref_id": ref_id, "image_id": image_id, "split": split, "sentences": sents,
            "sent_ids": [x["sent_id"] for x in sents],
            "ann_id": [image_id * 100 + j for j in targets] or [-1],
            "category_id": [CATEGORY_IDS[objs[j].shape] for j in targets] or [-1],
            "no_target": not targets,
        })
        self.grefs_meta[f"grefcoco/{ref_id}"] = {"scene": scene.key, "split": split, "targets": targets,
                                                 "texts": texts, "kind": kind}
        self.counts["grefcoco"] = self.counts.get("grefcoco", 0) + 1

    # finish -----------------------------------------------------------------
    def finish(self, seed: int, image_size: int) -> None:
        cats = [{"id": i, "name": n, "supercategory": "shape"} for n, i in CATEGORY_IDS.items()]
        instances = {"images": self.coco_images, "annotations": self.coco_anns, "categories": cats}
        for ds, refs in self.refer_refs.items():
            split_by = "umd" if ds == "refcocog" else "unc"
            self._write(f"refer_seg/{ds}/refs({split_by}).p", pickle.dumps(refs, protocol=2))
            self._write(f"refer_seg/{ds}/instances.json", json.dumps(instances).encode())
        self._write("refer_seg/grefcoco/grefs(unc).json", json.dumps(self.grefs).encode())
        self._write("refer_seg/grefcoco/instances.json", json.dumps(instances).encode())
        self._write("grefcoco_meta.json", json.dumps({"seed": seed, "refs": self.grefs_meta}, sort_keys=True).encode())
        self._write("GroundingSuite-Eval.jsonl", "".join(json.dumps(x) + "\n" for x in self.gs_lines).encode())
        for split, recs in self.custom.items():
            self._write(f"custom/{split}.jsonl", "".join(json.dumps(r) + "\n" for r in recs).encode())
        self._write("swap.json", json.dumps(self.swaps, indent=1, sort_keys=True).encode())
        meta = {"seed": seed, "image_size": image_size, "scenes": self.scenes, "refs": self.refs_meta}
        self._write("synthetic_meta.json", json.dumps(meta, sort_keys=True).encode())


def _groups(scene: Scene) -> list[tuple[str | None, str | None]]:
    """``(colour, shape)`` cores matching >= 2 objects (``(None, None)``: all of them), sorted."""
    cores = {(o.colour, o.shape) for o in scene.objects} | {(o.colour, None) for o in scene.objects}
    cores |= {(None, o.shape) for o in scene.objects} | {(None, None)}
    return sorted((c for c in cores if len(_matches(scene, *c)) >= 2), key=lambda c: (c[0] or "", c[1] or ""))


def _absent(scene: Scene) -> list[tuple[str, str | None]]:
    """Descriptions matching no object: a present colour with a present shape that never go together
    (the deceptive kind), else colours absent from the image."""
    colours = sorted({o.colour for o in scene.objects})
    shapes = sorted({o.shape for o in scene.objects})
    near = [(c, s) for c in colours for s in shapes if not _matches(scene, c, s)]
    return near or [(c, None) for c in COLOURS if c not in colours]


def _distinct(make, n: int) -> list[str]:
    """Up to ``n`` distinct strings from ``make()`` (a few tries)."""
    texts: list[str] = []
    for _ in range(4 * n):
        if len(texts) >= n:
            break
        text = make()
        if text not in texts:
            texts.append(text)
    return texts


def _refer_split(split: str, idx: int, dataset: str) -> str:
    if split != "test":
        return split
    return "test" if dataset == "refcocog" else ("testA" if idx % 2 == 0 else "testB")


def _square(cx: float, cy: float, half: float) -> list[float]:
    x1, y1, x2, y2 = cx - half, cy - half, cx + half, cy + half
    return [round(v, 2) for v in (x1, y1, x2, y1, x2, y2, x1, y2)]


def _inner_square(o: SceneObject) -> list[float]:
    """A second polygon part fully inside the object, so the summed mask holds 2 there."""
    return _square(o.cx, o.cy, 0.25 * o.r)


def _pairs(flat: Sequence[float]) -> list[list[float]]:
    return [[flat[i], flat[i + 1]] for i in range(0, len(flat), 2)]


def _maybe_split(o: SceneObject, split: bool) -> list[list[list[float]]]:
    """The object's polygon as point pairs, cut into two convex halves when ``split`` (convex shapes only)."""
    pts = _pairs(o.polygon)
    if not split or o.shape not in ("circle", "square", "diamond"):
        return [pts]
    half = len(pts) // 2
    return [pts[: half + 1], pts[half:] + pts[:1]]


def _wrap(text: str, rng: np.random.Generator) -> str:
    if rng.random() < 0.5:
        return text
    prefix, suffix = SENTENCE_WRAPPERS[int(rng.integers(len(SENTENCE_WRAPPERS)))]
    sentence = prefix + text + suffix
    return sentence[0].upper() + sentence[1:]


# ----------------------------------------------------------------------------- entry points


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

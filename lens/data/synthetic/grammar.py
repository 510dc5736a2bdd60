"""The expression grammar of the synthetic scenes: vocabulary, :class:`Predicate`, rendering a predicate as text,
parsing it back (:func:`parse_expression`), resolving it in a scene (:func:`resolve`), and choosing texts."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from lens.data.synthetic.scenes import Scene, SceneObject

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

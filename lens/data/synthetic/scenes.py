"""The scene model (:class:`Scene` of :class:`SceneObject`), sampling scenes whose every object has an
unambiguous expression, and rendering them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lens.data.masks import polygon_mask
from lens.data.synthetic.grammar import COLOURS, SHAPES, valid_predicates

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
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls(**{**d, "objects": [SceneObject(**o) for o in d["objects"]]})


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

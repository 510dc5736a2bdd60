"""ReasonSeg loader (LISA annotation format, as used upstream).

Expected layout under ``root``::

    reason_seg/ReasonSeg/{train,val,test,explanatory}/
      <name>.jpg
      <name>.json   {"shapes": [{"label", "points": [[x, y], ...]}], "text": [..] | "..", "is_sentence"}

Mask: shapes labelled ``flag`` are skipped; polygons are painted largest-area first, later ones
overwriting earlier ones; value 1 = target, 255 = labels containing ``ignore``. Polygons are
rasterised with pycocotools from the float points (upstream used cv2 on int-truncated points with a
1 px outline, so borders can differ by about a pixel).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lens.data.base import Reference, require
from lens.data.masks import decode_segmentation
from lens.data.transforms import image_size

SPLITS = ("train", "val", "test", "explanatory")
TARGET_VALUE, IGNORE_VALUE = 1, 255
SUBDIR = Path("reason_seg/ReasonSeg")

EXPECTED_TREE = (
    "reason_seg/\n"
    "  ReasonSeg/\n"
    "    {train,val,test,explanatory}/\n"
    "      <name>.jpg\n"
    "      <name>.json   (shapes: [{label, points}], text, is_sentence)\n"
)


@dataclass(frozen=True, slots=True)
class ReasonSegMask:
    """Lazy ReasonSeg mask: ``shapes`` = ((label, flat_points), ...) without ``flag`` shapes."""

    shapes: tuple[tuple[str, tuple[float, ...]], ...]
    height: int | None = None
    width: int | None = None
    what: str = "ReasonSeg annotation"

    def load(self, image_path: Path) -> np.ndarray:
        h, w = (self.height, self.width) if self.height and self.width else image_size(image_path)
        return paint_shapes(self.shapes, h, w, self.what)


def paint_shapes(shapes: tuple[tuple[str, tuple[float, ...]], ...], h: int, w: int, what: str) -> np.ndarray:
    """Paint polygons largest-first (stable on ties); ``ignore`` labels -> 255, others -> 1."""
    mask = np.zeros((h, w), dtype=np.uint8)
    if not shapes:
        return mask
    parts = [decode_segmentation([list(pts)], h, w, combine="union", what=f"{what} shape {i}")
             for i, (_, pts) in enumerate(shapes)]
    areas = np.array([int(p.sum()) for p in parts])
    for k in np.argsort(-areas, kind="stable"):
        label = shapes[k][0]
        mask[parts[k] > 0] = IGNORE_VALUE if "ignore" in label.lower() else TARGET_VALUE
    return mask


def load_reasonseg(root: str | Path, split: str) -> list[Reference]:
    """One :class:`Reference` per image of ``split`` (all texts kept; ``box`` derived from mask == 1)."""
    if split not in SPLITS:
        raise ValueError(f"unknown ReasonSeg split {split!r}; expected one of {SPLITS}")
    root = Path(root)
    split_dir = require(root / SUBDIR / split, root, EXPECTED_TREE, f"ReasonSeg {split} directory")
    images = sorted(split_dir.glob("*.jpg"))
    if not images:
        raise FileNotFoundError(f"no .jpg images in {split_dir}\nexpected layout under {root}:\n{EXPECTED_TREE}")
    return [_reference(img, split) for img in images]


def _reference(image_path: Path, split: str) -> Reference:
    json_path = image_path.with_suffix(".json")
    if not json_path.is_file():
        raise FileNotFoundError(f"missing ReasonSeg annotation {json_path} for image {image_path}")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{json_path}: invalid JSON ({exc})") from exc
    what = f"ReasonSeg annotation {json_path}"
    texts = _texts(data, what)
    shapes = _shapes(data, what)
    h, w = data.get("imageHeight"), data.get("imageWidth")
    if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
        h = w = None  # read from the image header when the mask is needed
    return Reference(
        ref_id=f"reasonseg/{split}/{image_path.stem}",
        image_path=image_path,
        expressions=texts,
        box=None,
        source="reasonseg",
        meta={"split": split, "is_sentence": bool(data.get("is_sentence", False)), "height": h, "width": w,
              "annotation": str(json_path)},
        mask_source=ReasonSegMask(shapes, h, w, what),
    )


def _texts(data: dict[str, Any], what: str) -> list[str]:
    text = data.get("text") if isinstance(data, dict) else None
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"{what}: 'text' must be a non-empty string or list of strings, got {text!r}")
    return list(texts)


def _shapes(data: dict[str, Any], what: str) -> tuple[tuple[str, tuple[float, ...]], ...]:
    shapes = data.get("shapes")
    if not isinstance(shapes, list):
        raise ValueError(f"{what}: 'shapes' must be a list of {{label, points}}, got {type(shapes).__name__}")
    out = []
    for i, shape in enumerate(shapes):
        label, points = (shape.get("label"), shape.get("points")) if isinstance(shape, dict) else (None, None)
        if not isinstance(label, str):
            raise ValueError(f"{what}: shape {i} needs a string 'label'")
        if label.lower() == "flag":
            continue
        try:
            flat = tuple(float(v) for pt in points for v in _pair(pt))
        except (TypeError, ValueError):
            raise ValueError(f"{what}: shape {i} 'points' must be a list of [x, y] pairs") from None
        if len(flat) < 6:
            raise ValueError(f"{what}: shape {i} ({label!r}) has {len(flat) // 2} points, a polygon needs >= 3")
        out.append((label, flat))
    return tuple(out)


def _pair(pt: Any) -> tuple[float, float]:
    if not isinstance(pt, (list, tuple)) or len(pt) != 2:
        raise ValueError("not a pair")
    return float(pt[0]), float(pt[1])

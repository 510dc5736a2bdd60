"""ReasonSeg loader (LISA annotation format, as used upstream).

Expected layout under ``root``::

    reason_seg/ReasonSeg/{train,val,test,explanatory}/
      <name>.jpg
      <name>.json   {"shapes": [{"label", "points": [[x, y], ...]}], "text": [..] | "..", "is_sentence"}

Reading, as upstream: the JSON is decoded as UTF-8, and as cp1252 when that fails (some ReasonSeg
files were saved on Windows); ``meta["encoding"]`` says which (``utf-8``, ``utf-8-sig`` for a file
with a byte-order mark, or ``cp1252``). A file readable in neither raises an error naming it.
Images may be stored under another extension or letter case (``.JPG``, ``.jpeg``, ``.png``); the
annotation is the ``.json`` with the same stem.

Mask: :func:`lens.data.masks.rasterise_labelme`, the original code's OpenCV rasteriser (points
truncated to int, fill plus a 1 px outline, largest shape first, ``flag`` shapes skipped, labels
containing ``ignore`` -> 255, others -> 1). Training targets and evaluation masks both come from
:meth:`ReasonSegMask.load`, so they are the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lens.data.base import Reference, require
from lens.data.files import IMAGE_EXTENSIONS, read_json
from lens.data.masks import (
    LABELME_IGNORE,
    LABELME_TARGET,
    labelme_points,
    rasterise_labelme,
)
from lens.data.transforms import image_size

SPLITS = ("train", "val", "test", "explanatory")
TARGET_VALUE, IGNORE_VALUE = LABELME_TARGET, LABELME_IGNORE
SUBDIR = Path("reason_seg/ReasonSeg")
ENCODINGS = ("utf-8", "cp1252")

EXPECTED_TREE = (
    "reason_seg/\n"
    "  ReasonSeg/\n"
    "    {train,val,test,explanatory}/\n"
    "      <name>.jpg\n"
    "      <name>.json   (shapes: [{label, points}], text, is_sentence)\n"
)

Shape = tuple[str, tuple[tuple[float, float], ...]]


@dataclass(frozen=True, slots=True)
class ReasonSegMask:
    """Lazy ReasonSeg mask: ``shapes`` = ((label, ((x, y), ...)), ...) in file order, ``flag`` ones
    already removed; drawn by :func:`paint_shapes`."""

    shapes: tuple[Shape, ...]
    height: int | None = None
    width: int | None = None
    what: str = "ReasonSeg annotation"

    def load(self, image_path: Path) -> np.ndarray:
        # Drawn at the size of the image file, as upstream (which draws on cv2.imread's array); the
        # JSON's imageHeight / imageWidth (kept in ``height`` / ``width`` and the meta) are not used.
        h, w = image_size(image_path)
        return paint_shapes(self.shapes, h, w, self.what)


def paint_shapes(shapes: tuple[Shape, ...], h: int, w: int, what: str = "ReasonSeg annotation") -> np.ndarray:
    """The upstream ReasonSeg mask (``np.uint8 (h, w)``: 0, 1, 255) of ``shapes``; see
    :func:`lens.data.masks.rasterise_labelme`."""
    try:
        return rasterise_labelme([(label, [list(p) for p in pts]) for label, pts in shapes], h, w)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from exc


def load_reasonseg(root: str | Path, split: str) -> list[Reference]:
    """One :class:`Reference` per image of ``split`` (all texts kept; ``box`` derived from mask == 1).

    Images are the files with an image extension (any case) in the split folder, sorted by path;
    each needs ``<stem>.json`` beside it. A ``.json`` without an image, or two images with one stem,
    raise errors naming the files.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown ReasonSeg split {split!r}; expected one of {SPLITS}")
    root = Path(root)
    split_dir = require(root / SUBDIR / split, root, EXPECTED_TREE, f"ReasonSeg {split} directory")
    images: dict[str, Path] = {}
    jsons: dict[str, Path] = {}
    for path in sorted(split_dir.iterdir()):
        if not path.is_file():
            continue
        ext = path.suffix.lower()
        if ext in IMAGE_EXTENSIONS:
            if path.stem in images:
                raise ValueError(f"two images for one ReasonSeg annotation: {images[path.stem]} and {path}")
            images[path.stem] = path
        elif ext == ".json":
            jsons[path.stem] = path
    if not images:
        raise FileNotFoundError(f"no images (.jpg) in {split_dir}\nexpected layout under {root}:\n{EXPECTED_TREE}")
    orphans = sorted(set(jsons) - set(images))
    if orphans:
        raise FileNotFoundError(
            f"ReasonSeg annotation {jsons[orphans[0]]} has no image ({orphans[0]}.jpg or another image extension)"
            + (f"; {len(orphans) - 1} more annotation(s) without image" if len(orphans) > 1 else "")
        )
    refs = []
    for stem in sorted(images, key=lambda k: images[k]):
        image_path = images[stem]
        json_path = jsons.get(stem)
        if json_path is None:
            raise FileNotFoundError(f"missing ReasonSeg annotation {image_path.with_suffix('.json')} for image {image_path}")
        refs.append(_reference(image_path, json_path, split))
    return refs


def read_annotation(json_path: str | Path) -> tuple[dict[str, Any], str]:
    """``(data, encoding)`` of a ReasonSeg JSON: UTF-8 (BOM allowed), else cp1252, as upstream."""
    data, enc = read_json(json_path, ENCODINGS, "ReasonSeg annotation")
    if not isinstance(data, dict):
        raise ValueError(f"{json_path}: a ReasonSeg annotation must be a JSON object, got {type(data).__name__}")
    return data, enc


def _reference(image_path: Path, json_path: Path, split: str) -> Reference:
    data, encoding = read_annotation(json_path)
    what = f"ReasonSeg annotation {json_path}"
    texts = _texts(data, what)
    shapes, n_flag = _shapes(data, what)
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
              "annotation": str(json_path), "encoding": encoding, "flag_shapes": n_flag},
        mask_source=ReasonSegMask(shapes, h, w, what),
    )


def _texts(data: dict[str, Any], what: str) -> list[str]:
    text = data.get("text")
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"{what}: field 'text' must be a non-empty string or list of strings, got {text!r}")
    return list(texts)


def _shapes(data: dict[str, Any], what: str) -> tuple[tuple[Shape, ...], int]:
    """Shapes in file order without ``flag`` ones (checked now, drawn lazily), and the flag count."""
    shapes = data.get("shapes")
    if not isinstance(shapes, list):
        raise ValueError(f"{what}: field 'shapes' must be a list of {{label, points}}, got {type(shapes).__name__}")
    out, n_flag = [], 0
    for i, shape in enumerate(shapes):
        if not isinstance(shape, dict):
            raise ValueError(f"{what}: shapes[{i}] must be an object with 'label' and 'points'")
        label, points = shape.get("label"), shape.get("points")
        if not isinstance(label, str):
            raise ValueError(f"{what}: shapes[{i}] field 'label' must be a string, got {label!r}")
        if label.lower() == "flag":  # deprecated annotations, skipped upstream without looking at them
            n_flag += 1
            continue
        try:
            labelme_points(points)
        except ValueError as exc:
            raise ValueError(f"{what}: shapes[{i}] ({label!r}) field 'points': {exc}") from None
        out.append((label, tuple((float(x), float(y)) for x, y in points)))
    return tuple(out), n_flag

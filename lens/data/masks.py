"""COCO-style segmentation decoding and encoding (pycocotools only, no hand-written rasteriser).

Segmentations come in three shapes:

* polygons: ``[[x0, y0, x1, y1, ...], ...]`` (one list per part, >= 3 points each);
* compressed RLE: ``{"size": [h, w], "counts": "<str>" | b"<bytes>"}``;
* uncompressed RLE: ``{"size": [h, w], "counts": [int, ...]}``.

:func:`decode_segmentation` SUMS the parts of one annotation (REFER / GroundingSuite behaviour
upstream), so pixels covered by two overlapping parts hold 2. Use ``combine="union"`` for a plain
binary mask.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Sequence

import numpy as np
from pycocotools import mask as coco_mask

Segmentation = Any  # list[list[float]] | dict | list[dict]


def validate_segmentation(seg: Segmentation, what: str) -> None:
    """Cheap structural check (no decoding); raise ``ValueError`` naming ``what`` if malformed."""
    if isinstance(seg, dict):
        _validate_rle(seg, what)
        return
    if not isinstance(seg, (list, tuple)) or len(seg) == 0:
        raise ValueError(f"{what}: segmentation must be a non-empty polygon list or an RLE dict, got {_short(seg)}")
    if all(isinstance(p, dict) for p in seg):
        for p in seg:
            _validate_rle(p, what)
        return
    for i, poly in enumerate(seg):
        if not isinstance(poly, (list, tuple)) or not all(_is_number(v) for v in poly):
            raise ValueError(f"{what}: polygon part {i} must be a flat list of numbers, got {_short(poly)}")
        if len(poly) < 6 or len(poly) % 2:
            raise ValueError(
                f"{what}: polygon part {i} needs an even number (>= 6) of coordinates, got {len(poly)}"
            )


def decode_segmentation(
    seg: Segmentation,
    height: int,
    width: int,
    *,
    combine: Literal["sum", "union"] = "sum",
    what: str = "segmentation",
) -> np.ndarray:
    """Decode polygons / RLE to ``np.uint8 (H, W)``; parts summed (clipped at 254) or OR-ed."""
    validate_segmentation(seg, what)
    try:
        rles = _to_rles(seg, height, width)
        with warnings.catch_warnings():  # pycocotools + numpy 2 emit a harmless __array__ copy warning
            warnings.simplefilter("ignore", DeprecationWarning)
            parts = coco_mask.decode(rles)  # (H, W, N) uint8
    except Exception as exc:  # pycocotools raises assorted types on bad data
        raise ValueError(f"{what}: cannot decode segmentation ({exc})") from exc
    if parts.ndim == 2:
        parts = parts[:, :, None]
    if parts.shape[:2] != (height, width):
        raise ValueError(f"{what}: RLE size {list(parts.shape[:2])} differs from image size {[height, width]}")
    if combine == "union":
        return parts.max(axis=2).astype(np.uint8)
    return np.minimum(parts.sum(axis=2, dtype=np.int64), 254).astype(np.uint8)


def polygon_mask(polygon: Sequence[float], height: int, width: int) -> np.ndarray:
    """Rasterise one flat polygon to a binary ``uint8 (H, W)`` mask."""
    return decode_segmentation([list(polygon)], height, width, combine="union", what="polygon")


def encode_rle(mask: np.ndarray) -> dict:
    """Binary mask (nonzero = 1) -> compressed RLE with ``str`` counts (JSON friendly)."""
    rle = coco_mask.encode(np.asfortranarray((np.asarray(mask) > 0).astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def segmentation_size(seg: Segmentation) -> tuple[int, int] | None:
    """``(h, w)`` stored in an RLE segmentation, or ``None`` for polygons."""
    first = seg if isinstance(seg, dict) else (seg[0] if isinstance(seg, (list, tuple)) and seg else None)
    if isinstance(first, dict):
        h, w = first["size"]
        return int(h), int(w)
    return None


def _to_rles(seg: Segmentation, height: int, width: int) -> list[dict]:
    if isinstance(seg, dict):
        seg = [seg]
    if isinstance(seg[0], dict):
        return [_rle_one(r, height, width) for r in seg]
    # Polygons: one RLE per part (pycocotools treats a 4-number list as a box; validated above).
    return coco_mask.frPyObjects([[float(v) for v in p] for p in seg], height, width)


def _rle_one(rle: dict, height: int, width: int) -> dict:
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed
        return coco_mask.frPyObjects(rle, *[int(v) for v in rle["size"]])
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [int(v) for v in rle["size"]], "counts": counts}


def _validate_rle(rle: dict, what: str) -> None:
    size, counts = rle.get("size"), rle.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise ValueError(f"{what}: RLE 'size' must be [height, width] positive ints, got {_short(size)}")
    if isinstance(counts, (str, bytes)):
        if not counts:
            raise ValueError(f"{what}: RLE 'counts' is empty")
        return
    if isinstance(counts, list) and counts and all(isinstance(v, int) and v >= 0 for v in counts):
        if sum(counts) != size[0] * size[1]:
            raise ValueError(f"{what}: uncompressed RLE counts sum to {sum(counts)}, expected h*w={size[0] * size[1]}")
        return
    raise ValueError(f"{what}: RLE 'counts' must be a str/bytes or a list of non-negative ints, got {_short(counts)}")


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _short(obj: object, n: int = 80) -> str:
    text = repr(obj)
    return text if len(text) <= n else text[: n - 3] + "..."

"""Mask decoding: COCO segmentations (pycocotools) and LabelMe polygons (OpenCV, as upstream).

COCO segmentations come in three shapes:

* polygons: ``[[x0, y0, x1, y1, ...], ...]`` (one list per part). Parts with fewer than 3 points
  (fewer than 6 numbers: zero area; real COCO files hold a few) are dropped, as detectron2 and the
  GRES loader do; a segmentation with no part of >= 3 points is an error. An odd count is an error;
* compressed RLE: ``{"size": [h, w], "counts": "<str>" | b"<bytes>"}``; the counts string is
  checked (alphabet, termination, non-negative runs summing to h*w) before pycocotools reads it,
  because pycocotools does no bounds checks;
* uncompressed RLE: ``{"size": [h, w], "counts": [int, ...]}`` (column-major runs, as COCO).

A segmentation may also be a list of RLE dicts (one per part).

:func:`decode_segmentation` SUMS the parts of one annotation (REFER / GroundingSuite behaviour
upstream), so pixels covered by two overlapping parts hold 2. Use ``combine="union"`` for a plain
binary mask.

:func:`rasterise_labelme` is the ReasonSeg rasteriser of the original code (LISA's
``get_mask_from_json``, used unchanged by LENS): points truncated to int, ``cv2.fillPoly`` plus a
1 px closed ``cv2.polylines`` outline, shapes drawn largest first, ``flag`` shapes skipped, labels
containing ``ignore`` painted 255.
"""

from __future__ import annotations

import math
import re
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
        if len(poly) % 2:
            raise ValueError(f"{what}: polygon part {i} needs an even number of coordinates (x, y pairs), got {len(poly)}")
        if not all(math.isfinite(v) for v in poly):
            raise ValueError(f"{what}: polygon part {i} holds a non-finite coordinate: {_short(poly)}")
    if not any(len(poly) >= 6 for poly in seg):
        raise ValueError(
            f"{what}: no polygon part has >= 3 points (part sizes in coordinates: {[len(p) for p in seg]})"
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


def polygon_parts(seg: Segmentation) -> list[list[float]]:
    """The polygon parts of ``seg`` that have >= 3 points (the ones that are drawn)."""
    return [[float(v) for v in p] for p in seg if len(p) >= 6]


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
    # Polygons: one RLE per part; degenerate parts dropped first (pycocotools would read a 4-number
    # first part as a box, and every part as a box then).
    return coco_mask.frPyObjects(polygon_parts(seg), height, width)


def _rle_one(rle: dict, height: int, width: int) -> dict:
    counts = rle["counts"]
    size = [int(v) for v in rle["size"]]
    if isinstance(counts, list):  # uncompressed
        return coco_mask.frPyObjects({"size": size, "counts": [int(v) for v in counts]}, *size)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    counts = bytes(counts)
    total = sum(rle_string_counts(counts))
    if total != size[0] * size[1]:
        raise ValueError(f"compressed RLE counts cover {total} pixels, expected h*w={size[0] * size[1]}")
    return {"size": size, "counts": counts}


def rle_string_counts(counts: bytes) -> list[int]:
    """Run lengths of a COCO compressed RLE string (the inverse of pycocotools' ``rleToString``).

    Raises ``ValueError`` on a character outside ``'0'..'o'``, a value cut off at the end, or a
    negative run, i.e. on strings pycocotools would read out of bounds.
    """
    runs: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError(f"compressed RLE counts end inside a value (length {n})")
            c = counts[p] - 48
            if not 0 <= c <= 63:
                raise ValueError(f"compressed RLE counts hold {chr(counts[p])!r} at position {p}; expected characters '0'..'o'")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            raise ValueError(f"compressed RLE counts decode to a negative run ({x}) at run {len(runs)}")
        runs.append(x)
    return runs


_RLE_ALPHABET = re.compile(rb"[0-o]*")


def _validate_rle(rle: dict, what: str) -> None:
    size, counts = rle.get("size"), rle.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)):
        raise ValueError(f"{what}: RLE 'size' must be [height, width] positive ints, got {_short(size)}")
    if isinstance(counts, (str, bytes, bytearray)):
        if not counts:
            raise ValueError(f"{what}: RLE 'counts' is empty")
        raw = counts.encode("utf-8", "replace") if isinstance(counts, str) else bytes(counts)
        if not _RLE_ALPHABET.fullmatch(raw):
            bad = next(i for i, b in enumerate(raw) if not 48 <= b <= 111)
            raise ValueError(
                f"{what}: RLE 'counts' string holds {chr(raw[bad])!r} at position {bad}; a COCO compressed RLE "
                f"uses characters '0'..'o' only (got {_short(counts)})"
            )
        return
    if isinstance(counts, list) and counts and all(isinstance(v, int) and v >= 0 for v in counts):
        if sum(counts) != int(size[0]) * int(size[1]):
            raise ValueError(
                f"{what}: uncompressed RLE counts sum to {sum(counts)}, expected h*w={int(size[0]) * int(size[1])}"
            )
        return
    raise ValueError(f"{what}: RLE 'counts' must be a str/bytes or a list of non-negative ints, got {_short(counts)}")


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: object) -> bool:
    """An int, or a float with an integral value (some writers store sizes as 480.0)."""
    return _is_number(v) and float(v).is_integer()


def _short(obj: object, n: int = 80) -> str:
    text = repr(obj)
    return text if len(text) <= n else text[: n - 3] + "..."


# ----------------------------------------------------------------------------- LabelMe (ReasonSeg)

LABELME_TARGET, LABELME_IGNORE = 1, 255


def labelme_points(points: Any) -> np.ndarray:
    """``[[x, y], ...]`` -> ``int32 (1, N, 2)`` as upstream's ``np.array([points], dtype=np.int32)``:
    coordinates truncated toward zero. Raises ``ValueError`` (caller adds the file) on non-pairs,
    non-finite values or an empty list."""
    if not isinstance(points, (list, tuple)) or not points:
        raise ValueError(f"'points' must be a non-empty list of [x, y] pairs, got {_short(points)}")
    for j, pt in enumerate(points):
        if not (isinstance(pt, (list, tuple)) and len(pt) == 2 and all(_is_number(v) for v in pt)):
            raise ValueError(f"point {j} must be an [x, y] pair of numbers, got {_short(pt)}")
    arr = np.asarray(points, dtype=np.float64)
    if not np.isfinite(arr).all() or np.abs(arr).max() >= 2**31:
        raise ValueError(f"'points' hold a non-finite or out-of-range coordinate: {_short(points)}")
    return arr.astype(np.int32)[None]


def rasterise_labelme(shapes: Sequence[tuple[str, Any]], height: int, width: int) -> np.ndarray:
    """The ReasonSeg mask exactly as the original code draws it, ``np.uint8 (H, W)``.

    ``shapes`` = ``(label, points)`` with ``points`` ``[[x, y], ...]`` (floats allowed) or an
    ``int32 (1, N, 2)`` array from :func:`labelme_points`. Shapes labelled ``flag`` (any case,
    whole label) are skipped. Each remaining shape's area is the pixel count of its own fill plus
    1 px outline; shapes are drawn in ``np.argsort(areas)[::-1]`` order (largest first; ties keep
    upstream's order), each as ``cv2.polylines(closed, thickness 1)`` then ``cv2.fillPoly``, value
    255 where the label contains ``ignore`` (any case), else 1. Fewer than 3 points are drawn as
    OpenCV draws them (a line or a dot), as upstream.
    """
    import cv2

    kept = []
    for label, points in shapes:
        if label.lower() == "flag":
            continue
        pts = points if isinstance(points, np.ndarray) else labelme_points(points)
        kept.append((label, pts))
    areas = []
    for _, pts in kept:
        tmp = np.zeros((height, width), dtype=np.uint8)
        cv2.polylines(tmp, pts, True, 1, 1)
        cv2.fillPoly(tmp, pts, 1)
        areas.append(tmp.sum())
    mask = np.zeros((height, width), dtype=np.uint8)
    for k in np.argsort(areas)[::-1].astype(np.int32):
        label, pts = kept[int(k)]
        value = LABELME_IGNORE if "ignore" in label.lower() else LABELME_TARGET
        cv2.polylines(mask, pts, True, value, 1)
        cv2.fillPoly(mask, pts, value)
    return mask

"""Overlay PNGs of chosen expressions: the prediction (left) next to the ground truth (right).

Which expressions: ``extremes`` (the K best and K worst by mask IoU, the default), or the K clearest
cases of ``mask_rescues_box`` (box IoU < 0.5, mask IoU >= 0.5; largest mask-minus-box IoU first)
or ``box_rescues_mask`` (the reverse).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lens.evaluation.analysis import box_mask_case
from lens.evaluation.metrics import expression_iou


def pick_extremes(records: Sequence[dict], k: int) -> list[tuple[str, int, int]]:
    """``(kind, position, index)`` of the ``k`` best and ``k`` worst expressions by IoU (ties: earlier first)."""
    ious = np.array([expression_iou(r["I"], r["U"]) for r in records])
    best = np.argsort(-ious, kind="stable")[:k]
    worst = np.argsort(ious, kind="stable")[:k]
    return [("best", p, int(i)) for p, i in enumerate(best)] + [("worst", p, int(i)) for p, i in enumerate(worst)]


def pick_case(records: Sequence[dict], k: int, case: str) -> list[tuple[str, int, int]]:
    """The ``k`` records of ``case`` with the largest IoU gap between mask and box (ties: earlier first)."""
    sign = 1.0 if case == "mask_rescues_box" else -1.0
    hits = [i for i, r in enumerate(records) if box_mask_case(r) == case]
    gap = [sign * (expression_iou(records[i]["I"], records[i]["U"]) - float(records[i]["box_iou"])) for i in hits]
    order = np.argsort(-np.array(gap), kind="stable")[:k] if hits else []
    return [(case, p, hits[int(j)]) for p, j in enumerate(order)]


def pick_overlays(records: Sequence[dict], k: int, mode: str = "extremes") -> list[tuple[str, int, int]]:
    if mode == "extremes":
        return pick_extremes(records, k)
    if mode in ("mask_rescues_box", "box_rescues_mask"):
        return pick_case(records, k, mode)
    raise ValueError(f"unknown overlays filter {mode!r}; valid: extremes, mask_rescues_box, box_rescues_mask")


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    import warnings

    from pycocotools import mask as coco_mask

    counts = rle["counts"]
    with warnings.catch_warnings():  # pycocotools + numpy 2: a harmless __array__ copy warning
        warnings.simplefilter("ignore", DeprecationWarning)
        return coco_mask.decode({"size": rle["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts})


def record_box(r: dict[str, Any]) -> list[float] | None:
    """The predicted box in original pixels (``box``, else converted from ``box_llm``)."""
    from lens.data.transforms import box_from_llm_pixels

    if r.get("box") is not None:
        return r["box"]
    if r.get("box_llm") and r.get("llm_hw"):
        return box_from_llm_pixels(r["box_llm"], r["llm_hw"], r["orig_hw"])
    return None


def save_overlays(
    folder: Path, exprs: Sequence[Any], records: Sequence[dict], k: int, protocol: str, mode: str = "extremes"
) -> int:
    """One PNG per picked expression in ``folder``; returns how many were written."""
    from PIL import Image

    from lens.evaluation.metrics import foreground_mask
    from lens.visualize import overlay

    picked = pick_overlays(records, k, mode)
    folder.mkdir(parents=True, exist_ok=True)
    for kind, pos, i in picked:
        e, r = exprs[i], records[i]
        image, raw = e.ref.load_image(), e.ref.load_mask()
        pred = decode_rle(r["rle"]).astype(bool)
        iou = expression_iou(r["I"], r["U"])
        biou = "" if r.get("box_iou") is None else f" box {r['box_iou']:.3f}"
        left = overlay(image, pred, record_box(r), f"IoU {iou:.3f}{biou} | {e.text} -> {r.get('text') or ''}")
        gt = foreground_mask(torch.from_numpy(raw), protocol)[0].numpy()
        right = overlay(image, gt, e.ref.target_box(raw), f"GT | {e.text}")
        canvas = Image.new("RGB", (left.width * 2, left.height))
        canvas.paste(left, (0, 0))
        canvas.paste(right, (left.width, 0))
        safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", e.id)
        canvas.save(folder / f"{kind}_{pos:02d}_iou{iou:.3f}_{safe}.png")
    return len(picked)

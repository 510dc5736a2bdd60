"""Box parsing and box/mask IoU helpers.

Boxes are ``xyxy`` floats with no ``+1`` in widths. Parsing follows the original LENS order of
patterns (see :func:`parse_box`) but never evaluates text and returns ``None`` instead of a dummy box.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

__all__ = [
    "parse_box",
    "parse_answer_box",
    "extract_answer",
    "as_box",
    "box_iou",
    "box_iou_pairs",
    "mask_iou_pairs",
]

_NUM = r"-?\d+(?:\.\d+)?"
# Tried in this order on the whole text; the first pattern that matches anywhere wins.
_BOX_PATTERNS = (
    re.compile(rf"\[\s*({_NUM}),\s*({_NUM}),\s*({_NUM}),\s*({_NUM})\s*\]"),
    re.compile(rf"\(\s*({_NUM}),\s*({_NUM}),\s*({_NUM}),\s*({_NUM})\s*\)"),
    re.compile(rf"\(\s*({_NUM}),\s*({_NUM})\),\s*\(\s*({_NUM}),\s*({_NUM})\)"),
)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def parse_box(text: str) -> list[float] | None:
    """First box in ``text``: ``[a, b, c, d]``, else ``(a, b, c, d)``, else ``(a, b),(c, d)``.

    Each pattern is searched over the whole text before the next is tried, so a bracketed box wins
    over an earlier parenthesised one. Returns ``None`` when nothing matches, when the input is not a
    string, or when the first match holds a non-finite value (e.g. a 400-digit number).
    """
    if not isinstance(text, str):
        return None
    for pattern in _BOX_PATTERNS:
        match = pattern.search(text)
        if match is not None:
            box = [float(g) for g in match.groups()]
            return box if all(math.isfinite(v) for v in box) else None
    return None


def extract_answer(text: str) -> str | None:
    """Content of the last complete ``<answer>...</answer>`` block, or ``None``."""
    if not isinstance(text, str):
        return None
    blocks = _ANSWER.findall(text)
    return blocks[-1] if blocks else None


def parse_answer_box(text: str, fallback: bool = True) -> list[float] | None:
    """Box from the ``<answer>`` block when present; otherwise (or if it has none) from the whole text.

    With ``fallback=False`` a completion that has an answer block is scored on that block only.
    """
    answer = extract_answer(text)
    if answer is not None:
        box = parse_box(answer)
        if box is not None or not fallback:
            return box
    return parse_box(text)


def as_box(box: object) -> tuple[float, float, float, float] | None:
    """Four finite floats from a sequence (list, tuple, tensor, array), or ``None``."""
    if isinstance(box, (str, bytes)) or box is None:
        return None
    try:
        values = tuple(float(v) for v in box)  # type: ignore[union-attr]
    except (TypeError, ValueError, OverflowError, RuntimeError):
        return None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        return None
    return values  # type: ignore[return-value]


def box_iou(a: Sequence[float] | None, b: Sequence[float] | None) -> float:
    """IoU of two ``xyxy`` boxes; 0.0 for ``None``, malformed or non-finite boxes and empty unions."""
    box_a, box_b = as_box(a), as_box(b)
    if box_a is None or box_b is None:
        return 0.0
    ax1, ay1, ax2, ay2 = box_a
    bx1, by1, bx2, by2 = box_b
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    if not (math.isfinite(inter) and math.isfinite(union)) or union <= 0.0:
        return 0.0
    return min(1.0, max(0.0, inter / union))


def box_iou_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise IoU of ``(N, 4)`` ``xyxy`` boxes -> ``(N,)``; 0 where the union is <= 0 or not finite."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    iw = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    ih = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a + area_b - inter
    valid = (union > 0) & torch.isfinite(union) & torch.isfinite(inter)
    safe_union = torch.where(valid, union, torch.ones_like(union))
    iou = torch.where(valid, inter / safe_union, torch.zeros_like(union))
    return iou.clamp(0.0, 1.0)


def mask_iou_pairs(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """IoU of binary masks ``(N, H, W)`` pairwise -> ``(N,)`` as ``inter / (union + eps)``.

    Non-bool inputs count as foreground where non-zero.
    """
    pred, target = pred.bool(), target.bool()
    inter = (pred & target).flatten(1).sum(1, dtype=torch.float64)
    union = (pred | target).flatten(1).sum(1, dtype=torch.float64)
    return (inter / (union + eps)).to(torch.float32)

"""Figures computed from per-expression records beside cIoU/gIoU: GRES metrics and box versus mask.

Both work on the records the runner keeps for every expression (``I``, ``U``, ``pred_area``,
``box_iou``, ``no_target``), so any figure can be recomputed from ``<split>.partial.jsonl`` or from
a predictions file scored again.

GRES (generalized referring expression segmentation, gRefCOCO; Liu, Ding, Jiang, CVPR 2023), as
its evaluator defines them:

* no-target expression (all-zero target): "predicted empty" = ``pred_area == 0`` (the rule used
  here; LENS has no separate no-target classifier, so an empty mask is the "no target" answer).
  Empty: TN, IoU 1, adds nothing to I or U. Non-empty: FP, IoU 0, adds its predicted area to U.
* expression with targets (multi-target ones scored against the union mask): empty prediction: FN,
  else TP; IoU ``I / U`` (0 when ``U == 0``), I and U accumulated.
* cIoU = sum I / sum U, gIoU = mean IoU (no epsilons), N-acc = TN / (TN + FP) over no-target
  expressions, T-acc = TP / (TP + FN) over expressions with targets (``None`` when a group is empty).

Note: the GRES code names the four counts from the no-target class's point of view (its "TP" is
our TN); the accuracies are the same.

Box versus mask (every split whose records carry a box IoU): the share of expressions whose parsed
box misses (box IoU < 0.5) while the mask hits (mask IoU >= 0.5), "mask rescues box", the reverse,
and the mean mask IoU in bins of box IoU.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from lens.evaluation.metrics import expression_iou

__all__ = [
    "GRES_EMPTY_RULE",
    "BOX_IOU_BINS",
    "HIT",
    "is_empty_prediction",
    "gres_metrics",
    "box_mask_case",
    "box_mask_analysis",
]

GRES_EMPTY_RULE = "predicted area == 0 pixels (at the original image size)"
BOX_IOU_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)
HIT = 0.5
CASES = ("mask_rescues_box", "box_rescues_mask")


def is_empty_prediction(record: dict[str, Any]) -> bool:
    """The "no target" answer of a mask-only model: no predicted pixel (``pred_area == 0``)."""
    return int(record["pred_area"]) == 0


def gres_metrics(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """GRES cIoU, gIoU, N-acc, T-acc and the four counts from records with ``no_target`` flags."""
    sum_i = sum_u = 0
    sum_iou = 0.0
    n = tp = fn = tn = fp = 0
    for rec in records:
        n += 1
        empty = is_empty_prediction(rec)
        if rec.get("no_target"):
            if empty:
                tn += 1
                sum_iou += 1.0
            else:
                fp += 1
                sum_u += int(rec["pred_area"])
            continue
        inter, union = int(rec["I"]), int(rec["U"])
        if empty:
            fn += 1
            inter = 0  # already 0 for an empty mask; kept explicit as in the GRES evaluator
        else:
            tp += 1
        sum_i += inter
        sum_u += union
        sum_iou += inter / union if union else 0.0
    return {
        "ciou": sum_i / sum_u if sum_u else None,
        "giou": sum_iou / n if n else None,
        "n_acc": tn / (tn + fp) if tn + fp else None,
        "t_acc": tp / (tp + fn) if tp + fn else None,
        "n": n, "n_no_target": tn + fp, "n_target": tp + fn,
        "TP": tp, "FN": fn, "TN": tn, "FP": fp,
        "sum_I": sum_i, "sum_U": sum_u,
        "empty_rule": GRES_EMPTY_RULE,
    }


def box_mask_case(record: dict[str, Any], threshold: float = HIT) -> str | None:
    """``"mask_rescues_box"``, ``"box_rescues_mask"`` or ``None`` (both hit, both miss, or no box IoU)."""
    biou = record.get("box_iou")
    if biou is None:
        return None
    box_hit = float(biou) >= threshold
    mask_hit = expression_iou(record["I"], record["U"]) >= threshold
    if mask_hit and not box_hit:
        return "mask_rescues_box"
    if box_hit and not mask_hit:
        return "box_rescues_mask"
    return None


def _bin_index(value: float, edges: Sequence[float]) -> int:
    """Bins ``[e0, e1), [e1, e2), ..., [e_{k-1}, e_k]`` (the last one closed)."""
    for b in range(len(edges) - 2):
        if value < edges[b + 1]:
            return b
    return len(edges) - 2


def box_mask_analysis(
    records: Iterable[dict[str, Any]], bins: Sequence[float] = BOX_IOU_BINS, threshold: float = HIT
) -> dict[str, Any] | None:
    """Box-vs-mask figures over the records that have a box IoU; ``None`` when none has one.

    Mask IoU is the per-expression IoU of the protocol (``I / (U + 1e-5)``, 1 for an empty union).
    """
    edges = [float(e) for e in bins]
    if len(edges) < 2 or any(b >= a for a, b in zip(edges[1:], edges)):
        raise ValueError(f"bins must be at least 2 increasing edges, got {list(bins)}")
    counts = {c: 0 for c in CASES}
    per_bin: list[list[float]] = [[] for _ in range(len(edges) - 1)]
    n = 0
    for rec in records:
        if rec.get("box_iou") is None:
            continue
        n += 1
        case = box_mask_case(rec, threshold)
        if case:
            counts[case] += 1
        per_bin[_bin_index(float(rec["box_iou"]), edges)].append(expression_iou(rec["I"], rec["U"]))
    if not n:
        return None
    return {
        "n_box": n,
        "threshold": threshold,
        "mask_rescues_box": counts["mask_rescues_box"] / n,
        "box_rescues_mask": counts["box_rescues_mask"] / n,
        "n_mask_rescues_box": counts["mask_rescues_box"],
        "n_box_rescues_mask": counts["box_rescues_mask"],
        "bins": [
            {"lo": lo, "hi": hi, "n": len(v), "mask_miou": sum(v) / len(v) if v else None}
            for lo, hi, v in zip(edges, edges[1:], per_bin)
        ],
    }

"""Referring-segmentation metrics: per-expression intersection/union, cIoU, gIoU and box accuracy.

Two protocols interpret the RAW ``uint8`` target values (0 background, 1 target, >=2 polygon
overlap, 255 ignore):

* ``lens`` (original LENS evaluation): foreground = ``t == 1``; every other value is background and
  nothing is excluded, so overlap (2) and ignore (255) pixels count as background.
* ``standard`` (LISA-style): foreground = ``1 <= t <= 254``; ``t == 255`` pixels are excluded from
  both intersection and union.

:func:`score_mask_logits` is the one place where low-resolution mask logits become full-size masks and pixel
counts: evaluation (``lens.evaluation.runner``), the training reward's IoU (``lens.losses.mask_iou_from_logits``),
the quickstart and the research probes all call it.

Aggregates use the original epsilons: per-expression ``iou = I / (U + 1e-5)``, or 1.0 when
``U == 0`` (empty prediction on empty target); ``giou = sum(iou) / (N + 1e-5)``;
``ciou = sum(I) / (sum(U) + 1e-8)``.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lens.geometry import box_iou

__all__ = [
    "PROTOCOLS",
    "foreground_mask",
    "intersection_union",
    "expression_iou",
    "MaskScores",
    "score_mask_logits",
    "SegmentationMetrics",
]

PROTOCOLS = ("lens", "standard")
IGNORE_VALUE = 255


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")


def foreground_mask(target: torch.Tensor, protocol: str = "lens") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(foreground, valid)`` bool masks from raw target values; ``valid`` is ``None`` for ``lens``."""
    _check_protocol(protocol)
    target = torch.as_tensor(target)
    if protocol == "lens":
        return target == 1, None
    valid = target != IGNORE_VALUE
    return (target >= 1) & valid, valid


def intersection_union(
    pred: torch.Tensor, target: torch.Tensor, protocol: str = "lens"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground intersection and union pixel counts (int64) per sample.

    ``pred`` is bool ``(H, W)`` or ``(B, H, W)`` (non-bool: foreground where non-zero); ``target``
    holds raw values of the same shape. Returns 0-d tensors for 2-D input, ``(B,)`` otherwise.
    """
    pred = torch.as_tensor(pred)
    target = torch.as_tensor(target).to(pred.device)
    if pred.shape != target.shape or pred.dim() not in (2, 3):
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must match, 2-D or 3-D")
    pred = pred.bool()
    fg, valid = foreground_mask(target, protocol)
    inter = pred & fg
    union = pred | fg
    if valid is not None:
        union = union & valid  # fg already excludes ignore pixels, so inter needs no masking
    dims = (-2, -1)
    return inter.sum(dim=dims, dtype=torch.int64), union.sum(dim=dims, dtype=torch.int64)


def expression_iou(inter: float, union: float) -> float:
    """Per-expression IoU ``I / (U + 1e-5)``; 1.0 when ``U == 0`` (empty prediction, empty target)."""
    return 1.0 if union == 0 else float(inter) / (float(union) + 1e-5)


@dataclass
class MaskScores:
    """Per-row results of :func:`score_mask_logits`: ``(B,)`` int64 tensors on the logits' device and, with
    ``keep_masks``, each row's full-size bool mask (``None`` otherwise)."""

    inter: torch.Tensor
    union: torch.Tensor
    pred_area: torch.Tensor  # predicted pixels (ignore pixels included)
    target_area: torch.Tensor  # target foreground pixels under the protocol
    masks: list[torch.Tensor] | None = None


@torch.no_grad()
def score_mask_logits(
    logits: torch.Tensor,
    targets: Sequence[Any],
    protocol: str = "lens",
    empty: Sequence[bool] | None = None,
    keep_masks: bool = False,
) -> MaskScores:
    """Upsample each row of low-resolution mask logits to its target's size and count pixels.

    ``logits`` is ``(B, 1, h, w)`` or ``(B, h, w)``; ``targets`` holds B raw ``(H, W)`` masks (tensors or
    arrays; values read by ``protocol``, see :func:`foreground_mask`). Rows are grouped by target size, and
    each group is one bilinear interpolate (``align_corners=False``, as SAM2 upsamples) thresholded at 0.
    Rows flagged in ``empty`` (e.g. a "no target" answer) predict an all-zero mask. No gradients.
    """
    from lens.modeling.sam import upsample_masks

    if logits.dim() == 3:
        logits = logits.unsqueeze(1)
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"mask logits must be (B, 1, h, w) or (B, h, w), got {tuple(logits.shape)}")
    n = len(targets)
    if logits.shape[0] != n:
        raise ValueError(f"{logits.shape[0]} logit maps but {n} targets")
    if empty is not None and len(empty) != n:
        raise ValueError(f"empty has {len(empty)} entries, expected {n}")
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, t in enumerate(targets):
        if len(t.shape) != 2:
            raise ValueError(f"target {k} must be (H, W), got shape {tuple(t.shape)}")
        groups.setdefault(tuple(t.shape), []).append(k)
    counts = torch.zeros(4, n, dtype=torch.int64, device=logits.device)
    masks: list[Any] = [None] * n
    for size, idx in groups.items():
        index = torch.tensor(idx, device=logits.device)
        pred = upsample_masks(logits.index_select(0, index), size) > 0
        if empty is not None:
            pred[torch.tensor([bool(empty[k]) for k in idx], device=pred.device)] = False
        tgt = torch.stack([torch.as_tensor(targets[k]).to(pred.device) for k in idx])
        inter, union = intersection_union(pred, tgt, protocol)
        fg = foreground_mask(tgt, protocol)[0].flatten(1).sum(1)
        counts[:, index] = torch.stack([inter, union, pred.flatten(1).sum(1), fg])
        if keep_masks:
            for row, k in enumerate(idx):
                masks[k] = pred[row]
    return MaskScores(counts[0], counts[1], counts[2], counts[3], masks if keep_masks else None)


def _as_list(masks: Any) -> list:
    """A batch given as a ``(B, H, W)`` tensor/array or a sequence of ``(H, W)`` masks -> list."""
    if isinstance(masks, (torch.Tensor, np.ndarray)):
        if masks.ndim == 2:
            return [masks]
        return list(masks)
    return list(masks)


class SegmentationMetrics:
    """Accumulates per-expression records ``{id, I, U, box_iou}`` and their running sums.

    Records with a non-``None`` ``id`` are deduplicated (first seen wins) so that the records of a
    multi-process evaluation (where samplers pad with repeated items) can be gathered and merged.
    """

    def __init__(self, protocol: str = "lens") -> None:
        _check_protocol(protocol)
        self.protocol = protocol
        self.records: list[dict[str, Any]] = []
        self._seen: set[Hashable] = set()
        self.sum_i = 0  # Python ints: exact, at least int64
        self.sum_u = 0
        self.sum_iou = 0.0  # Python floats: float64
        self.n_box = 0
        self.sum_box_iou = 0.0
        self.n_box_hit = 0

    # ------------------------------------------------------------------ accumulation
    def _add(self, record: dict[str, Any]) -> bool:
        """Add one record unless its id was seen; returns whether it was added."""
        rid = record.get("id")
        if rid is not None:
            if rid in self._seen:
                return False
            self._seen.add(rid)
        inter, union = int(record["I"]), int(record["U"])
        biou = record.get("box_iou")
        rec = {"id": rid, "I": inter, "U": union, "box_iou": None if biou is None else float(biou)}
        self.records.append(rec)
        self.sum_i += inter
        self.sum_u += union
        self.sum_iou += expression_iou(inter, union)
        if rec["box_iou"] is not None:
            self.n_box += 1
            self.sum_box_iou += rec["box_iou"]
            self.n_box_hit += int(rec["box_iou"] >= 0.5)
        return True

    def update(
        self,
        pred_masks: Any,
        targets: Any,
        pred_boxes: Sequence[Sequence[float] | None] | None = None,
        gt_boxes: Sequence[Sequence[float]] | None = None,
        ids: Sequence[Hashable] | None = None,
    ) -> list[dict[str, Any]]:
        """Score a batch (tensor ``(B,H,W)`` or lists of differently sized masks); returns new records.

        Box metrics are recorded only when both ``pred_boxes`` and ``gt_boxes`` are given; a ``None``
        predicted box scores IoU 0. ``ids`` (e.g. ``(split, ref_id, sent_id)``) enable deduplication.
        """
        preds, tgts = _as_list(pred_masks), _as_list(targets)
        n = len(preds)
        if len(tgts) != n:
            raise ValueError(f"{n} predictions but {len(tgts)} targets")
        for name, seq in (("pred_boxes", pred_boxes), ("gt_boxes", gt_boxes), ("ids", ids)):
            if seq is not None and len(seq) != n:
                raise ValueError(f"{name} has {len(seq)} entries, expected {n}")
        inters, unions = self._batch_iu(preds, tgts)
        with_boxes = pred_boxes is not None and gt_boxes is not None
        added = []
        for k in range(n):
            record = {
                "id": None if ids is None else ids[k],
                "I": inters[k],
                "U": unions[k],
                "box_iou": box_iou(pred_boxes[k], gt_boxes[k]) if with_boxes else None,  # type: ignore[index]
            }
            if self._add(record):
                added.append(self.records[-1])
        return added

    def _batch_iu(self, preds: list, tgts: list) -> tuple[list[int], list[int]]:
        """I and U for each pair, one batched computation per distinct mask shape."""
        inters, unions = [0] * len(preds), [0] * len(preds)
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, (p, t) in enumerate(zip(preds, tgts)):
            if tuple(p.shape) != tuple(t.shape):
                raise ValueError(f"sample {k}: pred {tuple(p.shape)} vs target {tuple(t.shape)}")
            groups.setdefault(tuple(t.shape), []).append(k)
        for idx in groups.values():
            pred = torch.stack([torch.as_tensor(preds[k]) for k in idx])
            tgt = torch.stack([torch.as_tensor(tgts[k]).to(pred.device) for k in idx])
            i, u = intersection_union(pred, tgt, self.protocol)
            for k, iv, uv in zip(idx, i.tolist(), u.tolist()):
                inters[k], unions[k] = iv, uv
        return inters, unions

    # ------------------------------------------------------------------ merging
    def merge(self, records: Iterable[dict[str, Any]]) -> int:
        """Add gathered records (deduplicated by id); returns how many were added."""
        return sum(self._add(r) for r in records)

    @classmethod
    def from_records(cls, records: Iterable[dict[str, Any]], protocol: str = "lens") -> SegmentationMetrics:
        """A fresh accumulator holding ``records`` (deduplicated by id)."""
        metrics = cls(protocol)
        metrics.merge(records)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """Sums and per-expression records (plain Python types, picklable for ``gather_object``)."""
        return {
            "protocol": self.protocol,
            "n": len(self.records),
            "sum_I": self.sum_i,
            "sum_U": self.sum_u,
            "sum_iou": self.sum_iou,
            "n_box": self.n_box,
            "sum_box_iou": self.sum_box_iou,
            "n_box_hit": self.n_box_hit,
            "records": [dict(r) for r in self.records],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> SegmentationMetrics:
        """Rebuild from :meth:`state_dict` (recomputes sums from the records)."""
        return cls.from_records(state["records"], state["protocol"])

    # ------------------------------------------------------------------ results
    def compute(self) -> dict[str, Any]:
        """``ciou``, ``giou``, ``box_acc``, ``box_miou`` (``None`` without boxes), ``n``, ``protocol``."""
        n = len(self.records)
        return {
            "ciou": self.sum_i / (self.sum_u + 1e-8),
            "giou": self.sum_iou / (n + 1e-5),
            "box_acc": self.n_box_hit / self.n_box if self.n_box else None,
            "box_miou": self.sum_box_iou / self.n_box if self.n_box else None,
            "n": n,
            "n_box": self.n_box,
            "protocol": self.protocol,
        }

"""Evaluation utilities (metrics, GRES and box-vs-mask figures; benchmark runners live alongside)."""

from lens.evaluation.analysis import box_mask_analysis, gres_metrics
from lens.evaluation.metrics import (
    PROTOCOLS,
    SegmentationMetrics,
    expression_iou,
    foreground_mask,
    intersection_union,
)

__all__ = [
    "PROTOCOLS",
    "SegmentationMetrics",
    "box_mask_analysis",
    "expression_iou",
    "foreground_mask",
    "gres_metrics",
    "intersection_union",
]

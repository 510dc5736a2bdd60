"""Evaluation utilities (metrics; benchmark runners live alongside)."""

from lens.evaluation.metrics import (
    PROTOCOLS,
    SegmentationMetrics,
    expression_iou,
    foreground_mask,
    intersection_union,
)

__all__ = ["PROTOCOLS", "SegmentationMetrics", "expression_iou", "foreground_mask", "intersection_union"]

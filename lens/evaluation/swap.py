"""The swap check: does the mask follow the words or only the image?

Each expression is replaced by one naming ANOTHER object of the same image and the prediction is scored
against the ORIGINAL target. A model that reads the prompt scores near 0; one that ignores it scores
like the unswapped run.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm import tqdm

from lens.data.base import Reference
from lens.evaluation.metrics import SegmentationMetrics
from lens.modeling.sam import upsample_masks


def score_references(
    segmenter,
    refs: Sequence[Reference],
    prompts: Sequence[str],
    protocol: str = "standard",
    batch_size: int = 16,
    teacher_answers: Sequence[str] | None = None,
    desc: str = "eval",
) -> dict:
    """cIoU/gIoU/box metrics of `segmenter` on one prompt per reference (batched, images shared)."""
    metrics = SegmentationMetrics(protocol)
    order = sorted(range(len(refs)), key=lambda i: str(refs[i].image_path))  # same image -> same batch
    for s in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        idx = order[s : s + batch_size]
        batch = [refs[i] for i in idx]
        out = segmenter.run_batch(
            [str(r.image_path) for r in batch], [prompts[i] for i in idx],
            answers=None if teacher_answers is None else [teacher_answers[i] for i in idx],
        )
        targets = [torch.from_numpy(r.load_mask()) for r in batch]
        preds = [upsample_masks(out.mask_logits[k : k + 1], tuple(t.shape))[0] > 0 for k, t in enumerate(targets)]
        gt_boxes = [target_llm_box(r, out.orig_sizes[k], out.llm_sizes[k]) for k, r in enumerate(batch)]
        metrics.update(preds, targets, out.boxes_llm, gt_boxes, ids=[refs[i].ref_id for i in idx])
    return metrics.compute()


def target_llm_box(ref: Reference, orig_hw, llm_hw) -> list[float]:
    """The reference's target box (xyxy) in the pixels of the LLM's resized image."""
    from lens.data.transforms import box_to_llm_pixels

    return box_to_llm_pixels(ref.target_box(), orig_hw, llm_hw)


def evaluate_with_swaps(
    segmenter, refs: Sequence[Reference], swaps: dict[str, list[str]], protocol: str = "standard", batch_size: int = 16
) -> dict:
    """Metrics on each reference's first expression, plus `swap_giou` with a swapped expression."""
    refs = [r for r in refs if swaps.get(r.ref_id)]
    if not refs:
        raise ValueError("no reference has a swap expression (synthetic data writes them to swap.json)")
    result = score_references(segmenter, refs, [r.expressions[0] for r in refs], protocol, batch_size)
    swapped = score_references(segmenter, refs, [swaps[r.ref_id][0] for r in refs], protocol, batch_size, desc="swap")
    result["swap_giou"] = swapped["giou"]
    result["swap_ciou"] = swapped["ciou"]
    return result

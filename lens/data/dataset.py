"""Torch datasets over :class:`~lens.data.base.Reference` lists.

Prompt text is NOT built here (the trainer does it with ``lens.prompts``); items carry the raw
expression and the name of the question template to use.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lens.data.base import Reference
from lens.data.transforms import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    IMAGE_FACTOR,
    box_to_llm_pixels,
    llm_image_size,
    resize_for_llm,
    sam_image,
)

Item = Reference | tuple[Reference, int]


def expand_expressions(references: Sequence[Reference]) -> list[tuple[Reference, int]]:
    """One ``(reference, expression_index)`` per expression (evaluation scores every sentence)."""
    return [(ref, i) for ref in references for i in range(len(ref.expressions))]


class GroundingDataset(Dataset):
    """Items for grounding training / evaluation.

    ``items`` are references (expression drawn per access when ``random_expression``, reproducible
    from ``(seed, epoch, index)``; else the first) or ``(reference, expression_index)`` pairs.
    Each item is a dict with keys ``image`` (PIL, LLM-resized), ``sam_image`` (uint8 ``3xSxS``),
    ``mask`` (np.uint8 ``HxW`` raw values, original size), ``expression``, ``expr_index``,
    ``box`` (xyxy original pixels), ``box_llm`` (list[int] xyxy in the model's box frame: LLM pixels, or 0-1000
    with ``box_frame=(1000, 1000)``), ``has_box``, ``orig_hw``, ``llm_hw`` (the LLM image), ``box_hw`` (the box
    frame), ``image_path``, ``image_id`` (= image path, for de-duplication),
    ``ref_id``, ``source``, ``question_template``.
    """

    def __init__(
        self,
        items: Sequence[Item],
        *,
        question_template: str = "pr1_grounding",
        min_pixels: int = DEFAULT_MIN_PIXELS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        sam_size: int = 1024,
        llm_longest_side: int | None = None,
        random_expression: bool = True,
        seed: int = 0,
        image_factor: int = IMAGE_FACTOR,
        box_frame: tuple[int, int] | None = None,
        memo_images: int = 16,
    ) -> None:
        """``image_factor``: the LLM image's side multiple (``lens.modeling.families.image_factor(processor)``);
        ``box_frame``: the frame of answer boxes, None = LLM pixels (``lens.modeling.families.box_frame(config)``);
        ``memo_images``: how many images' decoded views (LLM image, SAM input, size) are kept, least recently used
        dropped (0: none). Items of one image then decode it once: the G rollouts of a GRPO prompt (TRL's sampler
        repeats each index G times in a row), the references of one image, and, with a memo as large as the image
        set, every epoch after the first. About 4 MB per 640x480 image at SAM's 1024 input; per
        data-loader worker."""
        self.items = list(items)
        self.question_template = question_template
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.sam_size = sam_size
        self.llm_longest_side = llm_longest_side
        self.random_expression = random_expression
        self.seed = seed
        self.image_factor, self.box_frame = image_factor, box_frame
        if int(memo_images) < 0:
            raise ValueError(f"memo_images={memo_images}: expected a count of images >= 0 (0: no memo)")
        self.memo_images = int(memo_images)
        self._views: OrderedDict[str, tuple] = OrderedDict()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Change the per-access expression draw (call once per epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def expression_index(self, index: int) -> int:
        """Which expression item ``index`` uses in the current epoch."""
        item = self.items[index]
        if isinstance(item, tuple):
            return item[1]
        if not self.random_expression or len(item.expressions) == 1:
            return 0
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return int(rng.integers(len(item.expressions)))

    def image_views(self, ref: Reference) -> tuple[Any, torch.Tensor, tuple[int, int], tuple[int, int]]:
        """``(LLM image (PIL), SAM input uint8 (3, S, S), original (h, w), LLM (h, w))`` of ``ref``'s image, from
        the memo when there. Callers must not modify them (items of one image share them)."""
        key = ref.image_key
        views = self._views.get(key)
        if views is not None:
            self._views.move_to_end(key)
            return views
        image = ref.load_image()
        w, h = image.size
        llm_hw = llm_image_size(h, w, self.min_pixels, self.max_pixels, self.llm_longest_side, self.image_factor)
        llm_image = resize_for_llm(image, self.min_pixels, self.max_pixels, self.llm_longest_side, self.image_factor)
        assert llm_image.size == (llm_hw[1], llm_hw[0])
        views = (llm_image, sam_image(image, self.sam_size), (h, w), llm_hw)
        if self.memo_images > 0:
            self._views[key] = views
            while len(self._views) > self.memo_images:
                self._views.popitem(last=False)
        return views

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        ref = item[0] if isinstance(item, tuple) else item
        expr_index = self.expression_index(index)
        llm_image, sam_input, (h, w), llm_hw = self.image_views(ref)
        mask = ref.load_mask()
        if mask.shape != (h, w):
            raise ValueError(f"{ref.ref_id}: mask size {mask.shape} differs from image {ref.image_path} size {(h, w)}")
        box = ref.target_box(mask)
        box_hw = tuple(self.box_frame) if self.box_frame is not None else llm_hw
        return {
            "image": llm_image,
            "sam_image": sam_input,
            "mask": mask,
            "expression": ref.expressions[expr_index],
            "expr_index": expr_index,
            "box": box if box is not None else (0.0, 0.0, 0.0, 0.0),
            "box_llm": box_to_llm_pixels(box, (h, w), box_hw) if box is not None else [0, 0, 0, 0],
            "has_box": box is not None,
            "orig_hw": (h, w),
            "llm_hw": llm_hw,
            "box_hw": box_hw,
            "image_path": str(ref.image_path),
            "image_id": ref.image_key,
            "ref_id": ref.ref_id,
            "source": ref.source,
            "question_template": self.question_template,
        }


def collate_grounding(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Dict of lists; ``sam_image`` is stacked to ``(B, 3, S, S)`` (masks differ in size: kept as a list)."""
    out: dict[str, Any] = {key: [item[key] for item in batch] for key in batch[0]}
    out["sam_image"] = torch.stack(out["sam_image"])
    return out

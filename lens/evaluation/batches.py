"""One batch of an evaluation: load images and target masks (prefetched in threads), run the `Segmenter`,
score its masks with :func:`lens.evaluation.metrics.score_mask_logits` and turn them into per-expression records
(the records the runner writes to ``*.partial.jsonl`` and the metrics read)."""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from lens.evaluation.config import Expression
from lens.evaluation.files import PartialWriter
from lens.evaluation.metrics import score_mask_logits
from lens.evaluation.predictions import encode_rles
from lens.geometry import box_iou


def load_batch(exprs: Sequence[Expression]) -> tuple[list[Any], list[np.ndarray]]:
    """PIL images and RAW target masks for a batch (each image / mask decoded once)."""
    images: dict[str, Any] = {}
    masks: dict[str, np.ndarray] = {}
    for e in exprs:
        if e.image_key not in images:
            images[e.image_key] = e.ref.load_image()
        if e.ref.ref_id not in masks:
            masks[e.ref.ref_id] = e.ref.load_mask()
    return [images[e.image_key] for e in exprs], [masks[e.ref.ref_id] for e in exprs]


def prefetched(batches: Sequence[list[Expression]], load: Callable, depth: int = 2) -> Iterator[tuple[list, Any]]:
    """Yield ``(batch, load(batch))`` while the next ``depth`` batches load in worker threads."""
    with ThreadPoolExecutor(max_workers=depth) as pool:
        queue: deque = deque()
        for batch in batches:
            queue.append((batch, pool.submit(load, batch)))
            if len(queue) > depth:
                head, future = queue.popleft()
                yield head, future.result()
        while queue:
            head, future = queue.popleft()
            yield head, future.result()


def score_batch(
    out: Any, exprs: Sequence[Expression], targets: Sequence[np.ndarray], protocol: str,
    no_target_ok: bool = False, elapsed: float | None = None,
) -> list[dict[str, Any]]:
    """Per-expression records: I, U, predicted area, box IoU in LLM pixels (gt converted as upstream),
    the parsed box (LLM and original pixels), text, score, RLE and the expression's share of the batch time.

    ``no_target_ok`` (gRefCOCO): an answer that says "no target" (:func:`lens.prompts.is_no_target_answer`)
    predicts an empty mask.
    """
    from lens.data.transforms import box_from_llm_pixels, box_to_llm_pixels
    from lens.prompts import is_no_target_answer

    for e, t, hw in zip(exprs, targets, out.orig_sizes):
        if tuple(t.shape) != tuple(hw):
            raise ValueError(f"{e.ref.ref_id}: mask size {tuple(t.shape)} differs from image "
                             f"{e.ref.image_path} size {tuple(hw)}")
    empty = [no_target_ok and is_no_target_answer(t) for t in out.texts]
    scores = score_mask_logits(out.mask_logits, targets, protocol, empty, keep_masks=True)
    inters, unions, areas = scores.inter.tolist(), scores.union.tolist(), scores.pred_area.tolist()
    rles = [encode_rles(m[None].cpu().numpy())[0] for m in scores.masks]
    records = []
    for k, e in enumerate(exprs):
        gt = e.ref.target_box(targets[k])
        gt_llm = box_to_llm_pixels(gt, out.orig_sizes[k], out.llm_sizes[k]) if gt is not None else None
        box_llm = out.boxes_llm[k]
        records.append({
            "id": e.id, "I": inters[k], "U": unions[k], "pred_area": areas[k],
            "box_iou": box_iou(box_llm, gt_llm) if gt_llm is not None else None,
            "text": out.texts[k], "box_llm": box_llm,
            "box": box_from_llm_pixels(box_llm, out.llm_sizes[k], out.orig_sizes[k]) if box_llm else None,
            "gt_box_llm": gt_llm, "score": float(out.scores[k]),
            "orig_hw": list(out.orig_sizes[k]), "llm_hw": list(out.llm_sizes[k]), "rle": rles[k],
            "no_target_answer": empty[k], "time_s": None if elapsed is None else elapsed / len(exprs),
        })
    return records


@contextlib.contextmanager
def configured(segmenter: Any, **attrs: Any) -> Iterator[Any]:
    """Temporarily set Segmenter attributes (template, max_new_tokens, llm_longest_side)."""
    old = {k: getattr(segmenter, k) for k in attrs}
    for k, v in attrs.items():
        setattr(segmenter, k, v)
    try:
        yield segmenter
    finally:
        for k, v in old.items():
            setattr(segmenter, k, v)


def run_batches(
    segmenter: Any,
    exprs: Sequence[Expression],
    batches: Sequence[list[int]],
    cot: bool,
    protocol: str,
    writer: PartialWriter,
    progress: Any,
    no_target_ok: bool = False,
) -> list[dict[str, Any]]:
    """Run, score and record ``batches`` (lists of indices into ``exprs``)."""
    records: list[dict[str, Any]] = []
    for batch, (images, targets) in prefetched([[exprs[i] for i in b] for b in batches], load_batch):
        keys = [e.image_key for e in batch]
        start = time.perf_counter()
        out = segmenter.run_batch(images, [e.text for e in batch], cot=cot, image_keys=keys)
        new = score_batch(out, batch, targets, protocol, no_target_ok, time.perf_counter() - start)
        writer.write(new)
        records.extend(new)
        progress.update(len(batch))
    return records

"""The swap check: does the mask follow the words or only the image?

Each expression is replaced by one naming ANOTHER object of the same image and the prediction is scored
against the ORIGINAL target. A model that reads the prompt scores near 0; one that ignores it scores
like the unswapped run.

Scoring is evaluation's own: each batch goes through :func:`lens.evaluation.batches.score_batch` (which
upsamples and counts pixels with :func:`lens.evaluation.metrics.score_mask_logits`) and the records are
aggregated by :class:`lens.evaluation.metrics.SegmentationMetrics`, exactly as `eval.sh` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tqdm import tqdm

from lens.data.base import Reference
from lens.evaluation.batches import score_batch
from lens.evaluation.config import Expression
from lens.evaluation.metrics import SegmentationMetrics


def score_prompt_sets(
    segmenter,
    refs: Sequence[Reference],
    prompt_sets: Mapping[str, Sequence[str]],
    protocol: str = "standard",
    batch_size: int = 32,
    teacher_answers: Mapping[str, Sequence[str]] | None = None,
    desc: str = "eval",
) -> dict[str, dict]:
    """cIoU/gIoU/box metrics of `segmenter` for each named set of prompts (one prompt per reference each).

    All sets run in one pass: the rows of one reference (one per set) are adjacent and references are
    ordered by image, so a batch of `batch_size` rows encodes each image once for every set.
    `teacher_answers` (same keys, optional) teacher-forces the answers instead of generating them.
    """
    names = list(prompt_sets)
    for name in names:
        if len(prompt_sets[name]) != len(refs):
            raise ValueError(f"prompt set {name!r} has {len(prompt_sets[name])} prompts for {len(refs)} references")
    order = sorted(range(len(refs)), key=lambda i: str(refs[i].image_path))  # same image -> same batch
    rows = [(i, name) for i in order for name in names]
    records: dict[str, list[dict]] = {name: [] for name in names}
    masks: dict[str, object] = {}  # each reference's mask decoded once
    for s in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False):
        batch = rows[s : s + batch_size]
        first: dict[str, Reference] = {}
        for i, _ in batch:
            first.setdefault(refs[i].image_key, refs[i])
            if refs[i].ref_id not in masks:
                masks[refs[i].ref_id] = refs[i].load_mask()
        images = {key: ref.load_image() for key, ref in first.items()}  # each image decoded once per batch
        answers = None if teacher_answers is None else [teacher_answers[name][i] for i, name in batch]
        keys = [refs[i].image_key for i, _ in batch]
        out = segmenter.run_batch([images[k] for k in keys], [prompt_sets[name][i] for i, name in batch],
                                  answers=answers, image_keys=keys)
        exprs = [Expression(refs[i].ref_id, refs[i], 0) for i, _ in batch]
        new = score_batch(out, exprs, [masks[refs[i].ref_id] for i, _ in batch], protocol)
        for (_, name), record in zip(batch, new):
            records[name].append(record)
    return {name: SegmentationMetrics.from_records(records[name], protocol).compute() for name in names}


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
    answers = None if teacher_answers is None else {"prompts": teacher_answers}
    return score_prompt_sets(segmenter, refs, {"prompts": prompts}, protocol, batch_size, answers, desc)["prompts"]


def target_llm_box(ref: Reference, orig_hw, llm_hw) -> list[float]:
    """The reference's target box (xyxy) in the pixels of the LLM's resized image."""
    from lens.data.transforms import box_to_llm_pixels

    return box_to_llm_pixels(ref.target_box(), orig_hw, llm_hw)


def evaluate_with_swaps(
    segmenter, refs: Sequence[Reference], swaps: dict[str, list[str]], protocol: str = "standard", batch_size: int = 32
) -> dict:
    """Metrics on each reference's first expression, plus `swap_giou`/`swap_ciou` with a swapped expression
    (scored against the original target). Both run in one pass (`batch_size` rows: half as many images)."""
    refs = [r for r in refs if swaps.get(r.ref_id)]
    if not refs:
        raise ValueError("no reference has a swap expression (synthetic data writes them to swap.json)")
    sets = {"own": [r.expressions[0] for r in refs], "swap": [swaps[r.ref_id][0] for r in refs]}
    scores = score_prompt_sets(segmenter, refs, sets, protocol, batch_size)
    result = scores["own"]
    result["swap_giou"] = scores["swap"]["giou"]
    result["swap_ciou"] = scores["swap"]["ciou"]
    return result

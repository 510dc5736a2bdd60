"""research/swap.py: the swap check routes each row to its prompt set and scores it as evaluation does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lens.data.refer import load_refer
from lens.evaluation.metrics import expression_iou, intersection_union
from lens.inference import BatchOutput, Segmenter
from research.swap import evaluate_with_swaps, score_references


@pytest.fixture(scope="module")
def held_out(synthetic_root):
    from lens.data.synthetic import load_swaps

    refs = load_refer(synthetic_root, "refcoco", "val") + load_refer(synthetic_root, "refcoco", "testA")
    return refs, load_swaps(synthetic_root)


class PromptReader:
    """A fake segmenter: the whole image for the reference's own expression, nothing for any other prompt."""

    def __init__(self, own: set[str]) -> None:
        self.own = own
        self.batches: list[tuple[int, int]] = []  # (rows, distinct images) per call

    def run_batch(self, images, prompts, answers=None, image_keys=None, **kwargs) -> BatchOutput:
        n = len(prompts)
        self.batches.append((n, len(set(image_keys))))
        sizes = [(im.height, im.width) for im in images]
        logits = torch.stack([torch.full((1, 8, 8), 5.0 if p in self.own else -5.0) for p in prompts])
        return BatchOutput(texts=[""] * n, boxes_llm=[None] * n, mask_logits=logits, scores=torch.zeros(n),
                           orig_sizes=sizes, llm_sizes=sizes)


def hand_giou(refs, predict) -> float:
    """gIoU (`standard` protocol) from full-size predicted masks, computed without the runner."""
    ious = []
    for ref in refs:
        target = torch.from_numpy(ref.load_mask())
        inter, union = intersection_union(torch.as_tensor(predict(ref)), target, "standard")
        ious.append(expression_iou(int(inter), int(union)))
    return sum(ious) / (len(ious) + 1e-5)


def test_swapped_rows_are_scored_against_the_original_target(held_out):
    refs, _ = held_out
    swaps = {r.ref_id: [f"not {r.expressions[0]}"] for r in refs}  # prompts the fake answers with an empty mask
    fake = PromptReader({r.expressions[0] for r in refs})
    result = evaluate_with_swaps(fake, refs, swaps, batch_size=4)
    whole = hand_giou(refs, lambda ref: np.ones(ref.load_mask().shape, bool))
    assert result["giou"] == pytest.approx(whole, abs=1e-9) and result["n"] == len(refs)
    assert result["swap_giou"] == 0.0 and result["swap_ciou"] == 0.0
    # one pass: a reference's own and swapped rows share a batch, so each batch holds at most half as many images
    assert sum(rows for rows, _ in fake.batches) == 2 * len(refs)
    assert all(images <= rows // 2 for rows, images in fake.batches)


def test_scores_match_the_user_facing_predictor(held_out):
    refs, _ = held_out
    segmenter = Segmenter.from_pretrained("tiny", max_new_tokens=4)
    result = score_references(segmenter, refs, [r.expressions[0] for r in refs], batch_size=4)
    expected = hand_giou(refs, lambda ref: segmenter(str(ref.image_path), ref.expressions[0]).mask)
    assert result["giou"] == pytest.approx(expected, abs=1e-6) and result["protocol"] == "standard"


def test_references_without_a_swap_are_refused(held_out):
    refs, _ = held_out
    with pytest.raises(ValueError, match="no reference has a swap expression"):
        evaluate_with_swaps(PromptReader(set()), refs, {})

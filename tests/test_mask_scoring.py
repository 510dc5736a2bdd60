"""lens.evaluation.metrics.score_mask_logits: the one function that upsamples and scores mask logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lens.evaluation.metrics import intersection_union, score_mask_logits
from lens.losses import mask_iou_from_logits
from lens.modeling.sam import upsample_masks


def test_counts_by_hand():
    # 2x2 logits at the target's size: no resize. Prediction: 3 pixels; target: 1 = target, 255 = ignore
    logits = torch.tensor([[[1.0, -1.0], [1.0, 1.0]]])
    target = np.array([[1, 0], [255, 1]], dtype=np.uint8)
    lens = score_mask_logits(logits, [target], "lens")
    assert (lens.inter.item(), lens.union.item(), lens.pred_area.item(), lens.target_area.item()) == (2, 3, 3, 2)
    standard = score_mask_logits(logits, [target], "standard")  # the ignore pixel leaves the union
    assert (standard.inter.item(), standard.union.item(), standard.pred_area.item()) == (2, 2, 3)
    empty = score_mask_logits(logits, [target], "lens", empty=[True], keep_masks=True)
    assert (empty.inter.item(), empty.union.item(), empty.pred_area.item()) == (0, 2, 0)
    assert not empty.masks[0].any()


def test_mixed_sizes_equal_one_row_at_a_time():
    gen = torch.Generator().manual_seed(0)
    sizes = [(9, 7), (12, 12), (9, 7), (5, 16)]
    targets = [(torch.rand(s, generator=gen) > 0.5).to(torch.uint8).numpy() for s in sizes]
    logits = torch.randn(4, 1, 6, 6, generator=gen)
    batched = score_mask_logits(logits, targets, "standard", keep_masks=True)
    for k, t in enumerate(targets):
        pred = upsample_masks(logits[k : k + 1], t.shape)[0] > 0
        inter, union = intersection_union(pred, torch.from_numpy(t), "standard")
        assert (batched.inter[k].item(), batched.union[k].item()) == (inter.item(), union.item())
        assert torch.equal(batched.masks[k], pred)


def test_training_reward_iou_is_the_same_count():
    gen = torch.Generator().manual_seed(2)
    targets = [torch.rand(10, 8, generator=gen) > 0.5 for _ in range(3)]
    logits = torch.randn(3, 1, 4, 4, generator=gen)
    scores = score_mask_logits(logits, targets, "lens")
    expected = scores.inter.float() / (scores.union.float() + 1e-6)
    assert torch.equal(mask_iou_from_logits(logits, targets), expected)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="2 logit maps but 1 targets"):
        score_mask_logits(torch.zeros(2, 1, 4, 4), [np.zeros((4, 4))])
    with pytest.raises(ValueError, match=r"must be \(H, W\)"):
        score_mask_logits(torch.zeros(1, 1, 4, 4), [np.zeros((1, 4, 4))])
    with pytest.raises(ValueError, match="one mask channel|mask logits must be"):
        score_mask_logits(torch.zeros(1, 2, 4, 4), [np.zeros((4, 4))])

"""BCE + dice segmentation loss and mask IoU on low-res logits."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lens.losses import mask_iou_from_logits, segmentation_loss, sigmoid_bce_dice

LOGITS_2X2 = [[0.0, 2.0], [-1.0, 3.0]]
TARGET_2X2 = [[0.0, 1.0], [1.0, 0.0]]


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _hand_bce_dice(logits, target):
    xs = [v for row in logits for v in row]
    ts = [v for row in target for v in row]
    # BCE with logits per pixel: -(t*log(p) + (1-t)*log(1-p)), averaged over the 4 pixels
    bce = sum(-(t * math.log(_sigmoid(x)) + (1 - t) * math.log(1 - _sigmoid(x))) for x, t in zip(xs, ts)) / 4
    ps = [_sigmoid(x) for x in xs]
    dice = 1 - (2 * sum(p * t for p, t in zip(ps, ts)) + 1) / (sum(ps) + sum(ts) + 1)
    return bce, dice


def test_bce_dice_hand_2x2():
    bce_hand, dice_hand = _hand_bce_dice(LOGITS_2X2, TARGET_2X2)
    # spelled out: p = [0.5, 0.8808, 0.2689, 0.9526]; sum(p*t) = 0.8808 + 0.2689 = 1.1497
    assert dice_hand == pytest.approx(1 - (2 * 1.14973 + 1) / (2.60231 + 2 + 1), abs=1e-4)
    bce, dice = sigmoid_bce_dice(torch.tensor([LOGITS_2X2]), torch.tensor([TARGET_2X2]))
    assert bce.shape == dice.shape == (1,)
    assert bce.item() == pytest.approx(bce_hand, rel=1e-6)
    assert dice.item() == pytest.approx(dice_hand, rel=1e-6)


def test_segmentation_loss_hand_and_weights():
    logits = torch.tensor([[LOGITS_2X2]])  # (1, 1, 2, 2); same-size bilinear resize is the identity
    target = [torch.tensor(TARGET_2X2, dtype=torch.uint8)]
    bce_hand, dice_hand = _hand_bce_dice(LOGITS_2X2, TARGET_2X2)
    loss, parts = segmentation_loss(logits, target)
    assert loss.item() == pytest.approx(bce_hand + dice_hand, rel=1e-6)
    assert parts["bce"].item() == pytest.approx(bce_hand, rel=1e-6)
    assert parts["dice"].item() == pytest.approx(dice_hand, rel=1e-6)
    loss_w, _ = segmentation_loss(logits[:, 0], target, bce_weight=0.5, dice_weight=2.0)
    assert loss_w.item() == pytest.approx(0.5 * bce_hand + 2.0 * dice_hand, rel=1e-6)


def test_batch_mean_of_two_hand_samples():
    other_logits = [[1.0, 1.0], [1.0, 1.0]]
    other_target = [[1.0, 1.0], [1.0, 1.0]]
    logits = torch.tensor([[LOGITS_2X2], [other_logits]])
    targets = [torch.tensor(TARGET_2X2), torch.tensor(other_target, dtype=torch.bool)]
    b0, d0 = _hand_bce_dice(LOGITS_2X2, TARGET_2X2)
    b1 = math.log(1 + math.exp(-1.0))  # all-foreground target, logit 1 everywhere
    d1 = 1 - (2 * 4 * _sigmoid(1) + 1) / (4 * _sigmoid(1) + 4 + 1)
    loss, parts = segmentation_loss(logits, targets)
    assert parts["bce"].item() == pytest.approx((b0 + b1) / 2, rel=1e-6)
    assert parts["dice"].item() == pytest.approx((d0 + d1) / 2, rel=1e-6)
    assert loss.item() == pytest.approx((b0 + b1 + d0 + d1) / 2, rel=1e-6)


def test_constant_logit_upsamples_to_constant():
    # a 1x1 logit map upsampled to 3x4 is constant; BCE of logit 0 is log(2) whatever the target
    target = torch.zeros(3, 4)
    target[0, :3] = 1
    loss, parts = segmentation_loss(torch.zeros(1, 1, 1, 1), [target])
    assert parts["bce"].item() == pytest.approx(math.log(2))
    assert parts["dice"].item() == pytest.approx(1 - (2 * 0.5 * 3 + 1) / (0.5 * 12 + 3 + 1))


def _reference_loop(logits, targets):
    bces, dices = [], []
    for i, t in enumerate(targets):
        up = F.interpolate(logits[i : i + 1].float(), size=tuple(t.shape), mode="bilinear", align_corners=False)
        up = up[0, 0]
        tf = t.float()
        bces.append(F.binary_cross_entropy_with_logits(up, tf))
        p = up.sigmoid()
        dices.append(1 - (2 * (p * tf).sum() + 1) / (p.sum() + tf.sum() + 1))
    return torch.stack(bces).mean() + torch.stack(dices).mean()


@pytest.mark.parametrize("sizes", [[(16, 12)] * 4, [(16, 12), (10, 10), (16, 12), (7, 9)]])
def test_grouped_loss_equals_per_sample_loop(sizes):
    gen = torch.Generator().manual_seed(0)
    targets = [(torch.rand(s, generator=gen) > 0.6).to(torch.uint8) for s in sizes]
    logits = torch.randn(len(sizes), 1, 8, 8, generator=gen)
    la = logits.clone().requires_grad_(True)
    lb = logits.clone().requires_grad_(True)
    loss, _ = segmentation_loss(la, targets)
    ref = _reference_loop(lb, targets)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(la.grad, lb.grad, rtol=1e-4, atol=1e-7)


def test_bf16_logits_and_numpy_targets():
    logits = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    targets = [np.ones((5, 6), dtype=np.uint8), np.zeros((5, 6), dtype=np.uint8)]
    loss, parts = segmentation_loss(logits, targets)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # the same as float32 logits holding the bf16 values and tensor targets: upcast before the loss, not after
    ref, ref_parts = segmentation_loss(logits.float(), [torch.from_numpy(t) for t in targets])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert parts["bce"].item() == pytest.approx(ref_parts["bce"].item(), rel=1e-6)
    assert loss.item() == pytest.approx(_reference_loop(logits.float(), [torch.from_numpy(t) for t in targets]).item(), rel=1e-5)


def test_shape_errors():
    with pytest.raises(ValueError, match="2 logit maps but 1 targets"):
        segmentation_loss(torch.zeros(2, 1, 4, 4), [torch.zeros(4, 4)])
    with pytest.raises(ValueError, match=r"expected one mask channel, got shape \(1, 2, 4, 4\)"):
        segmentation_loss(torch.zeros(1, 2, 4, 4), [torch.zeros(4, 4)])
    with pytest.raises(ValueError, match=r"target 0 must be \(H, W\), got shape \(1, 4, 4\)"):
        mask_iou_from_logits(torch.zeros(1, 4, 4), [torch.zeros(1, 4, 4)])
    with pytest.raises(ValueError, match=r"logits must be \(B,1,h,w\) or \(B,h,w\), got \(4, 4\)"):
        segmentation_loss(torch.zeros(4, 4), [torch.zeros(4, 4)])


def test_mask_iou_from_logits_hand():
    # 1x1 positive logit -> everything predicted; target has 5 of 12 pixels -> IoU 5/12
    target = torch.zeros(3, 4, dtype=torch.uint8)
    target[0, :4] = 1
    target[1, 0] = 1
    # 2x2 logits at the same size as the target: no resize
    small_logits = torch.tensor([[1.0, -1.0], [1.0, 1.0]])
    small_target = torch.tensor([[1, 0], [0, 1]], dtype=torch.uint8)
    empty = torch.zeros(2, 2)
    logits = [torch.ones(1, 1, 1, 1), small_logits[None, None], -torch.ones(1, 1, 2, 2)]
    ious = torch.cat(
        [
            mask_iou_from_logits(logits[0], [target]),
            mask_iou_from_logits(logits[1], [small_target]),
            mask_iou_from_logits(logits[2], [empty]),
        ]
    )
    assert ious.tolist() == pytest.approx([5 / (12 + 1e-6), 2 / (3 + 1e-6), 0.0])


def test_mask_iou_grouped_equals_loop():
    gen = torch.Generator().manual_seed(1)
    sizes = [(9, 7), (12, 12), (9, 7)]
    targets = [(torch.rand(s, generator=gen) > 0.5).float() for s in sizes]
    logits = torch.randn(3, 1, 6, 6, generator=gen)
    batched = mask_iou_from_logits(logits, targets)
    single = torch.cat([mask_iou_from_logits(logits[i : i + 1], [t]) for i, t in enumerate(targets)])
    assert batched.tolist() == pytest.approx(single.tolist())

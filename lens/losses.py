"""Segmentation loss (BCE + dice) and mask IoU on low-resolution SAM logits.

Targets passed here must already be binary foreground masks. The trainer binarises the raw
``uint8`` masks with ``(t == 1)`` (see :func:`lens.evaluation.metrics.foreground_mask` with the
``lens`` protocol), as the original LENS code does: overlap pixels (2) and ignore pixels (255)
become background.

Logits are upsampled bilinearly (``align_corners=False``) to each target's own size. Samples are
grouped by target size so that every group is one batched interpolate + loss.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

__all__ = ["sigmoid_bce_dice", "segmentation_loss", "mask_iou_from_logits", "group_by_shape"]


def sigmoid_bce_dice(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample BCE (mean over pixels) and dice loss ``1 - (2*sum(p*t)+1)/(sum(p)+sum(t)+1)``.

    ``logits`` and ``targets`` are ``(B, H, W)``; targets are float in {0, 1}. Returns two ``(B,)``.
    """
    logits = logits.float()
    targets = targets.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(1)
    p = logits.sigmoid().flatten(1)
    t = targets.flatten(1)
    dice = 1.0 - (2.0 * (p * t).sum(1) + 1.0) / (p.sum(1) + t.sum(1) + 1.0)
    return bce, dice


def group_by_shape(targets: Sequence) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(indices, stacked_targets)`` for each distinct target ``(H, W)``, in first-seen order.

    Targets may be tensors or numpy arrays; a group is stacked into one tensor on the first one's device.
    """
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, t in enumerate(targets):
        if len(t.shape) != 2:
            raise ValueError(f"target {i} must be (H, W), got shape {tuple(t.shape)}")
        groups[tuple(t.shape)].append(i)
    for idx in groups.values():
        yield idx, torch.stack([torch.as_tensor(targets[i]) for i in idx])


def _as_bhw(low_res_logits: torch.Tensor, n_targets: int) -> torch.Tensor:
    """Accept ``(B, 1, h, w)`` or ``(B, h, w)``; check B against the number of targets."""
    if low_res_logits.dim() == 4:
        if low_res_logits.shape[1] != 1:
            raise ValueError(f"expected one mask channel, got shape {tuple(low_res_logits.shape)}")
        low_res_logits = low_res_logits[:, 0]
    if low_res_logits.dim() != 3:
        raise ValueError(f"logits must be (B,1,h,w) or (B,h,w), got {tuple(low_res_logits.shape)}")
    if low_res_logits.shape[0] != n_targets:
        raise ValueError(f"{low_res_logits.shape[0]} logit maps but {n_targets} targets")
    return low_res_logits


def _upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear ``(n, h, w)`` -> ``(n, H, W)`` in float32, ``align_corners=False``."""
    out = F.interpolate(logits.float().unsqueeze(1), size=size, mode="bilinear", align_corners=False)
    return out[:, 0]


def segmentation_loss(
    low_res_logits: torch.Tensor,
    targets: Sequence[torch.Tensor],
    bce_weight: float = 1.0,
    dice_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``bce_weight * mean BCE + dice_weight * mean dice`` over the batch, at each target's size.

    Returns the scalar loss and detached batch means ``{"bce": ..., "dice": ...}``.
    """
    logits = _as_bhw(low_res_logits, len(targets))
    bsz = logits.shape[0]
    if bsz == 0:
        zero = logits.sum() * 0.0
        return zero, {"bce": zero.detach(), "dice": zero.detach()}
    bce = logits.new_zeros(bsz, dtype=torch.float32)
    dice = logits.new_zeros(bsz, dtype=torch.float32)
    for idx, stacked in group_by_shape(targets):
        index = torch.tensor(idx, device=logits.device)
        up = _upsample(logits.index_select(0, index), tuple(stacked.shape[1:]))
        group_bce, group_dice = sigmoid_bce_dice(up, stacked.to(up.device))
        bce = bce.index_put((index,), group_bce)
        dice = dice.index_put((index,), group_dice)
    bce_mean, dice_mean = bce.mean(), dice.mean()
    loss = bce_weight * bce_mean + dice_weight * dice_mean
    return loss, {"bce": bce_mean.detach(), "dice": dice_mean.detach()}


@torch.no_grad()
def mask_iou_from_logits(low_res_logits: torch.Tensor, targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample IoU ``inter / (union + 1e-6)`` of upsampled ``logit > 0`` vs the binary target -> ``(B,)``.

    Targets count as foreground where ``> 0.5``. The training reward's IoU: the pixel counts come from
    :func:`lens.evaluation.metrics.score_mask_logits`, the function evaluation scores with, so training and
    evaluation upsample and threshold alike; only the reward's epsilon (0 for an empty union) differs from
    evaluation's per-expression IoU. Tensors stay on the logits' device.
    """
    from lens.evaluation.metrics import score_mask_logits

    logits = _as_bhw(low_res_logits, len(targets))
    binary = [torch.as_tensor(t) > 0.5 for t in targets]
    scores = score_mask_logits(logits, binary, protocol="lens")
    return scores.inter.float() / (scores.union.float() + 1e-6)

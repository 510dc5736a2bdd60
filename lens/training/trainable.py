"""Which parameter groups train in each stage (reference §3.2, §3.3)."""

from __future__ import annotations

import torch
from torch import nn

GROUPS = ("llm", "vision", "context", "sam_image_encoder", "sam_prompt_encoder", "sam_mask_decoder")

# Defaults as in the paper: stage 1 aligns only the context module; stage 2 trains everything but the
# SAM2 image encoder. The tiny warm-up trains everything (it stands in for pretraining).
STAGE_DEFAULTS: dict[str, dict[str, bool]] = {
    "warmup": dict.fromkeys(GROUPS, True),
    "stage1": {**dict.fromkeys(GROUPS, False), "context": True},
    "stage2": {**dict.fromkeys(GROUPS, True), "sam_image_encoder": False},
}


def group_of(name: str) -> str | None:
    """Parameter name -> trainable group (None: never trained, e.g. SAM2's unused object-pointer head).

    Names of a PEFT-wrapped model (`base_model.model.` prefix, `modules_to_save` copies) map as the plain ones."""
    name = name.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".").replace(".original_module.", ".")
    if name.startswith(("learnable_query", "connector.", "conv_1d.", "proj_to_sam.")):
        return "context"
    if name.startswith("model.visual."):
        return "vision"
    if name.startswith(("model.language_model.", "lm_head.")):
        return "llm"
    if name.startswith("sam.image_encoder."):
        return "sam_image_encoder"
    if name.startswith("sam.sam_prompt_encoder."):
        return "sam_prompt_encoder"
    if name.startswith("sam.sam_mask_decoder."):
        return "sam_mask_decoder"
    return None


def set_trainable(model: nn.Module, stage: str, overrides: dict[str, bool] | None = None) -> dict[str, int]:
    """Freeze/unfreeze parameters by group; returns trainable parameter counts per group."""
    if stage not in STAGE_DEFAULTS:
        raise ValueError(f"stage={stage!r}; expected one of {sorted(STAGE_DEFAULTS)}")
    unknown = set(overrides or {}) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown trainable groups {sorted(unknown)}; expected a subset of {GROUPS}")
    flags = {**STAGE_DEFAULTS[stage], **(overrides or {})}
    counts = dict.fromkeys(GROUPS, 0)
    for name, param in model.named_parameters():
        group = group_of(name)
        param.requires_grad_(bool(group and flags[group]))
        if param.requires_grad:
            counts[group] += param.numel()
    return counts


def scale_group_lrs(optimizer: torch.optim.Optimizer, model: nn.Module, multipliers: dict[str, float]) -> torch.optim.Optimizer:
    """Regroup `optimizer` (not yet stepped) in place: each group's lr times `multipliers[group]` (default 1).

    Each existing param group (e.g. decay / no-decay) is split by trainable group; called before the
    LR scheduler is created, so schedules scale every group alike.
    """
    unknown = set(multipliers) - set(GROUPS)
    if unknown:
        raise ValueError(f"lr_multipliers: unknown groups {sorted(unknown)}; expected a subset of {GROUPS}")
    if any(optimizer.state.values()):
        raise RuntimeError("lr_multipliers must be applied before the first optimizer step")
    scale = {id(p): float(multipliers.get(group_of(n) or "", 1.0)) for n, p in model.named_parameters()}
    groups = []
    for group in optimizer.param_groups:
        by_scale: dict[float, list[nn.Parameter]] = {}
        for p in group["params"]:
            by_scale.setdefault(scale.get(id(p), 1.0), []).append(p)
        groups += [{**group, "params": ps, "lr": group["lr"] * s} for s, ps in by_scale.items()]
    optimizer.param_groups.clear()
    for group in groups:
        optimizer.add_param_group(group)
    return optimizer


class GroupLRMixin:
    """Trainer mixin: `lr_multipliers` ({group: factor}) scale the learning rate of trainable groups."""

    lr_multipliers: dict[str, float] = {}

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.lr_multipliers:
            self.optimizer = optimizer = scale_group_lrs(optimizer, self.model if model is None else model,
                                                         self.lr_multipliers)
        return optimizer

"""Which parameter groups train in each stage (reference §3.2, §3.3)."""

from __future__ import annotations

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
    """Parameter name -> trainable group (None: never trained, e.g. SAM2's unused object-pointer head)."""
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

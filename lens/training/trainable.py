"""Which parameter groups train in each stage (the original's stage 1 and stage 2 settings)."""

from __future__ import annotations

import torch
from torch import nn

from lens.modeling.zero3 import full_numel

GROUPS = ("llm", "vision", "context", "sam_image_encoder", "sam_prompt_encoder", "sam_mask_decoder")
# SAM2 parts that no LENS loss reaches: point/box/mask prompt embeddings (LENS prompts with its queries and the
# dense `no_mask_embed` only), the IoU and object-score heads (their outputs enter no loss). They never train:
# a trainable parameter without a gradient breaks DDP's reduction.
UNREACHED = (
    "sam.sam_prompt_encoder.point_embeddings.", "sam.sam_prompt_encoder.not_a_point_embed.",
    "sam.sam_prompt_encoder.mask_downscaling.", "sam.sam_mask_decoder.iou_prediction_head.",
    "sam.sam_mask_decoder.pred_obj_score_head.",
)

# Defaults as in the paper: stage 1 aligns only the context module; stage 2 trains everything but the
# SAM2 image encoder. The tiny warm-up trains everything (it stands in for pretraining).
STAGE_DEFAULTS: dict[str, dict[str, bool]] = {
    "warmup": dict.fromkeys(GROUPS, True),
    "stage1": {**dict.fromkeys(GROUPS, False), "context": True},
    "stage2": {**dict.fromkeys(GROUPS, True), "sam_image_encoder": False},
}


def check_groups(names, what: str) -> None:
    """Raise if `names` (e.g. the keys of a recipe's `trainable` or `lr_multipliers` section) hold a name that is
    not a trainable group; `what` names the section in the message. The one check of group names."""
    unknown = sorted(set(names) - set(GROUPS))
    if unknown:
        raise ValueError(f"{what}: unknown groups {unknown}; expected a subset of {GROUPS}")


def group_of(name: str) -> str | None:
    """Parameter name -> trainable group (None: never trained, e.g. SAM2's unused object-pointer head).

    Names of a PEFT-wrapped model (`base_model.model.` prefix, `modules_to_save` copies) map as the plain ones."""
    name = name.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".").replace(".original_module.", ".")
    if name.startswith(UNREACHED):
        return None
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
    check_groups(overrides or {}, "trainable")
    flags = {**STAGE_DEFAULTS[stage], **(overrides or {})}
    counts = dict.fromkeys(GROUPS, 0)
    for name, param in model.named_parameters():
        group = group_of(name)
        param.requires_grad_(bool(group and flags[group]))
        if param.requires_grad:
            counts[group] += full_numel(param)  # numel() is 0 for a ZeRO-3 partitioned parameter
    return counts


def freeze_unreached(model: nn.Module) -> None:
    """Freeze what `group_of` never trains, e.g. in PEFT `modules_to_save` copies made after `set_trainable`."""
    for name, param in model.named_parameters():
        if param.requires_grad and group_of(name) is None:
            param.requires_grad_(False)


def upcast_trainable(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """fp32 master weights for fully trained parameters of a 16-bit model (what DeepSpeed's bf16 mode does in its
    optimizer; without DeepSpeed AdamW would update bf16 weights, where small steps round to nothing). The forward
    then needs autocast (train.bf16/fp16). Returns the number of parameters cast."""
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += full_numel(param)
    return cast


def scale_group_lrs(optimizer: torch.optim.Optimizer, model: nn.Module, multipliers: dict[str, float]) -> torch.optim.Optimizer:
    """Regroup `optimizer` (not yet stepped) in place: each group's lr times `multipliers[group]` (default 1).

    Each existing param group (e.g. decay / no-decay) is split by trainable group; called before the
    LR scheduler is created, so schedules scale every group alike.
    """
    check_groups(multipliers, "lr_multipliers")
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


class CountedFlopsMixin:
    """Trainer mixin: the Trainer's per-step FLOP estimate (6 x tokens x non-embedding parameters, logged as
    `total_flos`) with the parameter count taken once. transformers recounts it every step by walking every module
    and parameter, about 10 ms a step for the tiny preset (a tenth of a warm-up step on CPU)."""

    _counted_parameters: int | None = None

    def floating_point_ops(self, inputs) -> int:
        name = getattr(self.model, "main_input_name", "input_ids")
        if name not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._counted_parameters is None:
            self._counted_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[name].numel() * self._counted_parameters


def prepare_model_for_training(trainer) -> None:
    """What every LENS trainer does once its model is final (after PEFT wrapping, before DDP/DeepSpeed wrap it):
    freeze what no loss reaches, register ZeRO-3's external parameters, and give a 16-bit model trained without
    DeepSpeed fp32 master weights for what trains fully (its forward then runs under autocast)."""
    from lens.modeling.zero3 import register_external_parameters, zero3_enabled

    model = trainer.model
    freeze_unreached(model)
    lens = model.get_base_model() if hasattr(model, "get_base_model") else model
    if zero3_enabled():
        register_external_parameters(lens)
    sixteen = {p.dtype for p in model.parameters() if p.requires_grad} & {torch.bfloat16, torch.float16}
    if sixteen and not trainer.is_deepspeed_enabled:
        args = trainer.args
        if not (args.bf16 or args.fp16):
            raise ValueError(
                f"model.dtype is {sorted(map(str, sixteen))} without DeepSpeed: set train.bf16=true (or fp16) so the "
                "forward runs under autocast over fp32 master weights, or model.dtype=float32"
            )
        upcast_trainable(model)

"""Recipes -> model, data, trainer, train, save (the schema and loading: lens/training/config.py).

This is the only module that wires the pieces together; it reads top to bottom like the procedure.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoProcessor, TrainerCallback, set_seed

from lens.config import DTYPES, parse_override, parse_value  # noqa: F401  (parse_*: re-exported for tools)
from lens.data.dataset import GroundingDataset
from lens.modeling import LensForConditionalGeneration, build_preset
from lens.modeling.families import box_frame, image_factor
from lens.modeling.presets import preset_name
from lens.rewards import get_reward_funcs
from lens.training.config import (  # noqa: F401  (re-exported: callers import them from here)
    STAGES,
    DataConfig,
    LoraSettings,
    ModelConfig,
    Recipe,
    as_recipe,
    load_config,
    load_recipe,
)
from lens.training.data import SupervisedCollator, grpo_dataset, load_sources
from lens.training.trainable import set_trainable

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- pieces
def load_policy(cfg: ModelConfig | dict[str, Any], seed: int):
    """(model, processor) from `preset:<name>` or a checkpoint folder (ours, released, or base Qwen + SAM2)."""
    if isinstance(cfg, dict):
        from lens.config import build

        cfg = build(ModelConfig, cfg, "model", "model.")
    init, dtype = str(cfg.init), DTYPES[cfg.dtype]
    lens_fields = {} if cfg.query_position_mode is None else {"query_position_mode": cfg.query_position_mode}
    preset = preset_name(init)
    if preset is not None:
        variant = {} if cfg.sam_variant is None else {"sam_variant": cfg.sam_variant}
        model, processor = build_preset(preset, seed=seed, dtype=dtype, **lens_fields, **variant)
        if cfg.sam_checkpoint:  # Meta's file of the preset's variant into its SAM (else it stays random)
            from lens.modeling.sam import load_sam_checkpoint

            load_sam_checkpoint(model.sam, cfg.sam_checkpoint, model.config.sam_variant)
        if cfg.attn_implementation:  # a preset is built with the default (SDPA) like any config
            model.set_attn_implementation(cfg.attn_implementation)
    else:
        kwargs = {"dtype": dtype, **lens_fields}
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        if cfg.sam_checkpoint is not None:
            kwargs["sam_checkpoint"] = cfg.sam_checkpoint
        model = load_checkpoint(init, kwargs, cfg)
        processor = AutoProcessor.from_pretrained(init)
    if cfg.reinit_context:
        model.reset_context_module()
    return model, processor


def load_checkpoint(init: str, kwargs: dict[str, Any], cfg: ModelConfig):
    """`from_pretrained(init, **kwargs)` with the recipe's `model.sam_variant`. A checkpoint whose SAM is of another
    variant gets a fresh SAM of the recipe's variant from `model.sam_checkpoint` (Meta's file), as stage 2 swaps in
    a fresh SAM; the checkpoint's SAM weights are dropped (of another size they load as mismatched and are replaced)."""
    from lens.modeling.loading import checkpoint_kind
    from lens.modeling.sam import hub_location

    if cfg.sam_variant is None:
        return LensForConditionalGeneration.from_pretrained(init, **kwargs)
    kind = checkpoint_kind(init)
    saved = json.loads((Path(init) / "config.json").read_text()).get("sam_variant", "sam2_hiera_l")  # released: 2.0 L
    if kind == "qwen" or saved == cfg.sam_variant:
        return LensForConditionalGeneration.from_pretrained(init, **kwargs, sam_variant=cfg.sam_variant)
    if not cfg.sam_checkpoint:
        raise ValueError(
            f"model.sam_variant={cfg.sam_variant!r} but {init} holds a {saved} SAM: set model.sam_checkpoint to "
            f"Meta's file of {cfg.sam_variant} ({hub_location(cfg.sam_variant)}) to swap in a fresh SAM, or drop "
            "model.sam_variant to keep the checkpoint's")
    model, info = LensForConditionalGeneration.from_pretrained(
        init, **kwargs, sam_variant=cfg.sam_variant, ignore_mismatched_sizes=True, output_loading_info=True)
    other = sorted(key for key, *_ in info["mismatched_keys"] if not key.startswith("sam."))
    if other:  # only SAM may change shape with the variant
        raise ValueError(f"{init}: weights of another shape than the model's outside SAM: {other[:5]}")
    logger.info("model.sam_variant: swapped the checkpoint's %s SAM for %s from %s", saved, cfg.sam_variant,
                cfg.sam_checkpoint)
    return model


def set_pixel_limits(processor, min_pixels: int, max_pixels: int) -> None:
    ip = processor.image_processor
    ip.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}


def build_dataset(data: DataConfig, sam_size: int, seed: int, image_factor: int = 28,
                  box_frame: tuple[int, int] | None = None) -> GroundingDataset:
    """The training set; `image_factor` and `box_frame` are the policy's (`lens.modeling.families`)."""
    refs = load_sources(data.train, data.root)
    return GroundingDataset(
        refs, question_template=data.question_template, min_pixels=data.min_pixels, max_pixels=data.max_pixels,
        sam_size=sam_size, llm_longest_side=data.llm_longest_side, seed=seed, image_factor=image_factor,
        box_frame=box_frame, memo_images=data.memo_images,
    )


class EpochCallback(TrainerCallback):
    """Re-draws each reference's expression per epoch (reproducible from seed, epoch, index)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch or 0))


def lora_config(cfg: LoraSettings | dict[str, Any] | None):
    """PEFT LoraConfig of the recipe's `lora` section (None: no LoRA)."""
    if cfg is None:
        return None
    if isinstance(cfg, dict):
        from lens.config import build

        cfg = build(LoraSettings, cfg, "lora", "lora.")
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
        modules_to_save=list(cfg.modules_to_save), task_type="CAUSAL_LM",
    )


# ---------------------------------------------------------------------- the procedure
def build_trainer(recipe: Recipe | dict[str, Any], policy: tuple | None = None):
    """Model, processor, data and trainer of a recipe (rank 0 writes the resolved config next to the outputs).

    `recipe`: a `Recipe` or its dict form (`load_recipe`'s; validated again, so edits to it are checked too).
    `policy`: an already built (model, processor) to train instead of loading `model.init` (e.g. a smoke test that
    builds the 3B preset once for several phases)."""
    recipe = as_recipe(recipe)
    stage, seed = recipe.stage, int(recipe.train["seed"])
    set_seed(seed)
    args = recipe.training_arguments()  # created before the model: ZeRO-3 init needs it
    init_deepspeed_comm(args)
    out = Path(args.output_dir)
    if args.process_index == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))

    model, processor = policy if policy is not None else load_policy(recipe.model, seed)
    wanted = recipe.model.query_position_mode
    if policy is not None and wanted is not None and wanted != model.config.query_position_mode:
        raise ValueError(f"model.query_position_mode={wanted!r} but the given policy uses "
                         f"{model.config.query_position_mode!r}: set model.config.query_position_mode first")
    data = recipe.data
    set_pixel_limits(processor, data.min_pixels, data.max_pixels)
    processor.tokenizer.padding_side = "left"
    counts = set_trainable(model, stage, recipe.trainable.given() or None)
    logger.info("trainable parameters per group: %s", counts)
    if sum(counts.values()) == 0:
        raise ValueError("no trainable parameters: check the recipe's trainable section")
    dataset = build_dataset(data, model.config.sam_image_size, seed, image_factor(processor), box_frame(model.config))
    loss, lr_multipliers = recipe.loss, recipe.lr_multipliers.given() or None

    if recipe.is_grpo:
        from lens.training.grpo import LensGRPOTrainer

        init = recipe.model.init
        trainer = LensGRPOTrainer(
            model=model, reward_funcs=get_reward_funcs(recipe.rewards), args=args,
            train_dataset=grpo_dataset(dataset), processing_class=processor, peft_config=lora_config(recipe.lora),
            seg_weight=loss.seg_weight, bce_weight=loss.bce_weight, dice_weight=loss.dice_weight,
            reference_init=None if policy is not None or preset_name(str(init)) is not None else init,
            lr_multipliers=lr_multipliers, shared_prefix=recipe.grpo_shared_prefix,
            single_pass_rewards=recipe.single_pass_rewards, cache_sam_features=recipe.cache_sam_features,
        )
    else:
        from lens.training.supervised import SupervisedLensTrainer

        trainer = SupervisedLensTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=processor,
            data_collator=SupervisedCollator(processor, data.answer_style),
            objective=recipe.objective, bce_weight=loss.bce_weight, dice_weight=loss.dice_weight,
            lm_weight=loss.lm_weight, seg_weight=loss.seg_weight, cache_sam_features=recipe.cache_sam_features,
            lr_multipliers=lr_multipliers,
        )
    trainer.add_callback(EpochCallback(dataset))
    return trainer


def init_deepspeed_comm(args) -> None:
    """DeepSpeed on CPU processes: accelerate starts torch.distributed (gloo) but not DeepSpeed's communicator, whose
    world size ZeRO-3's model init and batch checks read; hand it the existing process group."""
    import torch.distributed as dist

    if args.deepspeed and dist.is_available() and dist.is_initialized():
        import deepspeed

        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed(dist_backend=dist.get_backend())


def close_distributed() -> None:
    """End this process's part in torch.distributed once every rank is done: without it gloo's threads can still
    be running at interpreter exit, and a rank may die with SIGABRT ("terminate called without an active
    exception") after its work was saved, which torchrun then reports as a failed run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run(recipe: Recipe | dict[str, Any], resume: bool = False, callbacks: Sequence[TrainerCallback] = ()) -> Path:
    """Train one recipe; returns the folder of the final checkpoint (a full LENS checkpoint, LoRA merged).
    `callbacks` are added to the trainer's (e.g. the quickstart's thread sharing with its scoring process)."""
    recipe = as_recipe(recipe)
    trainer = build_trainer(recipe)
    for callback in callbacks:
        trainer.add_callback(callback)
    out = Path(trainer.args.output_dir)
    if resume and trainer.args.save_only_model:
        raise ValueError(f"--resume: {out} was trained with train.save_only_model=true, whose checkpoints hold no "
                         "optimizer state; rerun with train.save_only_model=false to make resumable checkpoints")
    trainer.train(resume_from_checkpoint=resume_checkpoint(out) if resume else None)
    final = out / "final"
    save_final(trainer, final, DTYPES[recipe.model.dtype])
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(final)
        trainer.state.save_to_json(str(final / "trainer_state.json"))  # full log history incl. the run summary
        (final / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    trainer.accelerator.wait_for_everyone()
    return final


def save_final(trainer, final: Path, dtype: torch.dtype) -> None:
    """The final checkpoint in the recipe's model dtype, loadable by `LensForConditionalGeneration.from_pretrained`.

    DeepSpeed: every rank takes part (ZeRO-3 gathers the 16-bit weights). LoRA: the adapter goes to
    `final/adapter`, then is merged into the language model and the full model is written. fp32 master weights
    (16-bit model without DeepSpeed) are cast back to the model dtype."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.is_deepspeed_enabled:
        trainer.save_model(str(final))
        return
    if hasattr(model, "peft_config"):
        if trainer.is_world_process_zero():
            model.save_pretrained(str(final / "adapter"))  # the adapter alone, for PEFT users
        model = model.merge_and_unload()
        trainer.model = model
    if trainer.is_world_process_zero():
        model.to(dtype).save_pretrained(str(final))


def resume_checkpoint(out: Path) -> str:
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if last is None:
        raise FileNotFoundError(f"--resume: no checkpoint-* folder in {out}; train without --resume first")
    return last

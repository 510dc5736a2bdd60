"""Recipes: one YAML per run + `key.sub=value` overrides -> model, data, trainer, train, save.

This is the only module that wires the pieces together; it reads top to bottom like the procedure.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoProcessor, TrainerCallback, TrainingArguments, set_seed

from lens.data.dataset import GroundingDataset
from lens.modeling import LensForConditionalGeneration, build_preset
from lens.rewards import get_reward_funcs
from lens.training.data import SupervisedCollator, grpo_dataset, load_sources
from lens.training.trainable import GROUPS, set_trainable

logger = logging.getLogger(__name__)
STAGES = ("warmup", "stage1", "stage2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------- recipe files
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)")


def parse_value(text: str) -> Any:
    """YAML value, except that `1e-5` is a float (PyYAML's YAML 1.1 reads it as a string)."""
    value = yaml.safe_load(text)
    return float(value) if isinstance(value, str) and _FLOAT.fullmatch(value.strip()) else value


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value (e.g. train.learning_rate=1e-5)")
    key, value = text.split("=", 1)
    return key.strip().split("."), parse_value(value)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """Read a recipe (optionally `base:`-inheriting another YAML) and apply dotted overrides."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} not found (recipes live in configs/recipes/)")
    recipe = yaml.safe_load(path.read_text()) or {}
    if "base" in recipe:
        base = load_recipe(path.parent / recipe.pop("base"))
        recipe = merge(base, recipe)
    for override in overrides:
        keys, value = parse_override(override)
        node = recipe
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {override!r}: {'.'.join(keys[:-1])} is not a section")
        node[keys[-1]] = value
    validate(recipe, path)
    return recipe


def merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validate(recipe: dict, path: Path) -> None:
    if recipe.get("stage") not in STAGES:
        raise ValueError(f"{path}: stage={recipe.get('stage')!r}; expected one of {STAGES}")
    for section in ("model", "data", "train"):
        if not isinstance(recipe.get(section), dict):
            raise ValueError(f"{path}: missing section {section!r}")
    if "init" not in recipe["model"]:
        raise ValueError(f"{path}: model.init is required (a checkpoint folder or preset:<name>)")
    if not recipe["data"].get("train"):
        raise ValueError(f"{path}: data.train must list training sources (e.g. refcoco:train)")
    if "output_dir" not in recipe["train"]:
        raise ValueError(f"{path}: train.output_dir is required")
    for section in ("trainable", "lr_multipliers"):
        unknown = set(recipe.get(section) or {}) - set(GROUPS)
        if unknown:
            raise ValueError(f"{path}: {section}: unknown groups {sorted(unknown)}; expected a subset of {GROUPS}")


# ---------------------------------------------------------------------- pieces
def load_policy(cfg: dict[str, Any], seed: int):
    """(model, processor) from `preset:<name>` or a checkpoint folder (ours, released, or base Qwen + SAM2)."""
    init = str(cfg["init"])
    dtype = DTYPES[cfg.get("dtype", "float32")]
    lens_fields = {k: cfg[k] for k in ("query_position_mode",) if k in cfg}
    if init.startswith("preset:"):
        model, processor = build_preset(init.split(":", 1)[1], seed=seed, dtype=dtype, **lens_fields)
    else:
        kwargs = {"dtype": dtype, **lens_fields}
        if cfg.get("attn_implementation"):
            kwargs["attn_implementation"] = cfg["attn_implementation"]
        if "sam_checkpoint" in cfg:
            kwargs["sam_checkpoint"] = cfg["sam_checkpoint"]
        model = LensForConditionalGeneration.from_pretrained(init, **kwargs)
        processor = AutoProcessor.from_pretrained(init)
    if cfg.get("reinit_context"):
        model.reset_context_module()
    return model, processor


def set_pixel_limits(processor, min_pixels: int, max_pixels: int) -> None:
    ip = processor.image_processor
    ip.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}


def build_dataset(data: dict[str, Any], sam_size: int, seed: int) -> GroundingDataset:
    refs = load_sources(data["train"], data.get("root", "datasets"))
    return GroundingDataset(
        refs, question_template=data.get("question_template", "pr1_grounding"),
        min_pixels=data.get("min_pixels", 3136), max_pixels=data.get("max_pixels", 1_000_000),
        sam_size=sam_size, llm_longest_side=data.get("llm_longest_side"), seed=seed,
    )


class EpochCallback(TrainerCallback):
    """Re-draws each reference's expression per epoch (reproducible from seed, epoch, index)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch or 0))


def lora_config(cfg: dict[str, Any] | None):
    if not cfg:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.get("r", 64), lora_alpha=cfg.get("alpha", 128), lora_dropout=cfg.get("dropout", 0.05),
        target_modules=cfg.get("target_modules", r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"),
        modules_to_save=cfg.get("modules_to_save", ["connector", "conv_1d", "proj_to_sam", "sam_mask_decoder", "sam_prompt_encoder"]),
        task_type="CAUSAL_LM",
    )


# ---------------------------------------------------------------------- the procedure
def build_trainer(recipe: dict[str, Any], policy: tuple | None = None):
    """Model, processor, data and trainer of a recipe (rank 0 writes the resolved config next to the outputs).

    `policy`: an already built (model, processor) to train instead of loading `model.init` (e.g. a smoke test that
    builds the 3B preset once for several phases)."""
    stage, train_cfg = recipe["stage"], dict(recipe["train"])
    seed = int(train_cfg.setdefault("seed", 42))
    set_seed(seed)
    train_cfg.setdefault("remove_unused_columns", False)
    train_cfg.setdefault("report_to", "tensorboard")
    # every trainable parameter is used inside the one wrapped forward, so DDP needs no search for unused ones
    train_cfg.setdefault("ddp_find_unused_parameters", False)
    if train_cfg.get("gradient_checkpointing"):
        train_cfg.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})

    if stage == "stage2":
        from trl import GRPOConfig

        args = GRPOConfig(**train_cfg, **recipe.get("grpo", {}))
    else:
        args = TrainingArguments(**train_cfg)  # created before the model: ZeRO-3 init needs it
    init_deepspeed_comm(args)
    out = Path(args.output_dir)
    if args.process_index == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))

    model, processor = policy if policy is not None else load_policy(recipe["model"], seed)
    data = recipe["data"]
    set_pixel_limits(processor, data.get("min_pixels", 3136), data.get("max_pixels", 1_000_000))
    processor.tokenizer.padding_side = "left"
    counts = set_trainable(model, stage, recipe.get("trainable"))
    logger.info("trainable parameters per group: %s", counts)
    if sum(counts.values()) == 0:
        raise ValueError("no trainable parameters: check the recipe's trainable section")
    dataset = build_dataset(data, model.config.sam_image_size, seed)
    loss = recipe.get("loss", {})

    if stage == "stage2":
        from lens.training.grpo import LensGRPOTrainer

        init = recipe["model"]["init"]
        trainer = LensGRPOTrainer(
            model=model, reward_funcs=get_reward_funcs(recipe.get("rewards", ["box_iou", "mask_iou"])), args=args,
            train_dataset=grpo_dataset(dataset), processing_class=processor, peft_config=lora_config(recipe.get("lora")),
            seg_weight=loss.get("seg_weight", 1.0), bce_weight=loss.get("bce_weight", 1.0),
            dice_weight=loss.get("dice_weight", 1.0),
            reference_init=None if policy is not None or str(init).startswith("preset:") else init,
            flow=recipe.get("flow", "fast"), lr_multipliers=recipe.get("lr_multipliers"),
        )
    else:
        from lens.training.supervised import SupervisedLensTrainer

        trainer = SupervisedLensTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=processor,
            data_collator=SupervisedCollator(processor, data.get("answer_style", "grounding")),
            objective=loss.get("objective", "seg" if stage == "stage1" else "lm"),
            bce_weight=loss.get("bce_weight", 1.0), dice_weight=loss.get("dice_weight", 1.0),
            lm_weight=loss.get("lm_weight", 1.0), seg_weight=loss.get("seg_weight", 1.0),
            cache_sam_features=bool(recipe.get("cache_sam_features", False)),
            lr_multipliers=recipe.get("lr_multipliers"),
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


def run(recipe: dict[str, Any], resume: bool = False) -> Path:
    """Train one recipe; returns the folder of the final checkpoint (a full LENS checkpoint, LoRA merged)."""
    trainer = build_trainer(recipe)
    out = Path(trainer.args.output_dir)
    if resume and trainer.args.save_only_model:
        raise ValueError(f"--resume: {out} was trained with train.save_only_model=true, whose checkpoints hold no "
                         "optimizer state; rerun with train.save_only_model=false to make resumable checkpoints")
    trainer.train(resume_from_checkpoint=resume_checkpoint(out) if resume else None)
    final = out / "final"
    save_final(trainer, final, DTYPES[recipe["model"].get("dtype", "float32")])
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(final)
        trainer.state.save_to_json(str(final / "trainer_state.json"))  # full log history incl. the run summary
        (final / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    trainer.accelerator.wait_for_everyone()
    return final


def save_final(trainer, final: Path, dtype: torch.dtype) -> None:
    """The final checkpoint in the recipe's model dtype, loadable by `LensForConditionalGeneration.from_pretrained`.

    DeepSpeed: every rank takes part (ZeRO-3 gathers the 16-bit weights). LoRA: the adapter goes to
    `final/adapter`, then is merged into the language model and the full model is written. fp32 master weights (16-bit model without DeepSpeed) are cast
    back to the model dtype."""
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

"""Fine-tuning recipes (ReasonSeg, CoT, LoRA): every real recipe resolves; each tiny one trains one GRPO step."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import lens.training.recipe as recipe_module
from lens.prompts import QUESTION_TEMPLATES
from lens.training.recipe import STAGES, load_recipe, lora_config, run

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "recipes"
REAL = sorted(RECIPES.glob("*.yaml"))
MODULES_TO_SAVE = ("connector.", "conv_1d.", "proj_to_sam.", "sam.sam_mask_decoder.", "sam.sam_prompt_encoder.")


# ---------------------------------------------------------------------- real recipes (no training)
@pytest.mark.parametrize("path", REAL, ids=[p.stem for p in REAL])
def test_real_recipe_resolves_with_what_the_trainer_needs(path):
    from transformers import TrainingArguments
    from trl import GRPOConfig

    recipe = load_recipe(path)
    assert "base" not in recipe  # inheritance fully resolved
    assert recipe["stage"] in STAGES
    assert recipe["model"]["init"] and recipe["data"]["train"] and recipe["train"]["output_dir"]
    # every train/grpo key is a field of the arguments class build_trainer passes them to
    fields = {f.name for f in dataclasses.fields(GRPOConfig if recipe["stage"] == "stage2" else TrainingArguments)}
    unknown = (set(recipe["train"]) | set(recipe.get("grpo", {}))) - fields
    assert not unknown, unknown
    if recipe["stage"] == "stage2":
        # whole GRPO groups per rank in each generation batch (TRL: per-device batch x steps_per_generation, which
        # defaults to the accumulation steps)
        g, train = recipe["grpo"]["num_generations"], recipe["train"]
        steps = recipe["grpo"].get("steps_per_generation") or train.get("gradient_accumulation_steps", 1)
        assert train["per_device_train_batch_size"] * steps % g == 0
    if "lora" in recipe:
        assert lora_config(recipe["lora"]) is not None


def test_fine_tuning_recipes_inherit_as_documented():
    reasonseg, cot, lora = (load_recipe(RECIPES / f"{n}.yaml") for n in ("reasonseg", "cot", "lora"))
    assert reasonseg["data"]["train"] == ["reasonseg:train"] and reasonseg["model"]["init"] == "outputs/stage2/final"
    assert cot["data"]["train"] == ["reasonseg:train"] and cot["data"]["question_template"] == "samr1_v4"
    assert "deepspeed" not in lora["train"] and lora["model"]["query_position_mode"] == "mrope"  # null: removed


# ---------------------------------------------------------------------- tiny recipes (one GRPO step each)
def test_tiny_recipes_mirror_the_real_ones():
    for name in ("reasonseg", "cot", "lora"):
        real, tiny = load_recipe(RECIPES / f"{name}.yaml"), load_recipe(RECIPES / "tiny" / f"{name}.yaml")
        assert tiny["stage"] == real["stage"], name
        if name != "lora":  # LoRA keeps its base's sources (tiny stage 2: refcoco only)
            assert tiny["data"]["train"] == real["data"]["train"], name
        assert tiny.get("rewards") == real.get("rewards"), name
        assert tiny["data"].get("question_template", "pr1_grounding") == real["data"].get("question_template"), name
        assert tiny["model"].get("query_position_mode") == real["model"].get("query_position_mode"), name
        assert tiny["train"]["use_cpu"] and not tiny["train"].get("deepspeed"), name
        assert tiny["train"]["output_dir"] == f"outputs/tiny/{name}", name
        assert ("lora" in tiny) == ("lora" in real), name


@pytest.fixture()
def captured_trainer(monkeypatch):
    """Records the trainer `run` builds, so the test can look inside after training."""
    seen = {}
    build = recipe_module.build_trainer

    def spy(recipe):
        seen["trainer"] = build(recipe)
        return seen["trainer"]

    monkeypatch.setattr(recipe_module, "build_trainer", spy)
    return seen


@pytest.mark.parametrize("name", ["reasonseg", "cot", "lora"])
def test_tiny_recipe_trains_one_step(name, synthetic_root, tiny_checkpoint, tmp_path, captured_trainer):
    out = tmp_path / name
    recipe = load_recipe(
        RECIPES / "tiny" / f"{name}.yaml",
        [f"data.root={synthetic_root}", f"model.init={tiny_checkpoint}", f"train.output_dir={out}",
         "train.report_to=none", "train.disable_tqdm=true", "train.max_steps=1", "train.save_steps=1000",
         "train.logging_steps=1", "grpo.max_completion_length=12"],
    )
    final = run(recipe)
    trainer = captured_trainer["trainer"]

    assert final == out / "final" and final.is_dir()
    assert yaml.safe_load((out / "config.yaml").read_text()) == recipe  # the resolved recipe, next to the outputs
    assert yaml.safe_load((final / "recipe.yaml").read_text()) == recipe
    history = json.loads((final / "trainer_state.json").read_text())["log_history"]
    step = [h for h in history if "loss" in h]
    assert len(step) == 1 and math.isfinite(step[0]["loss"]) and math.isfinite(step[0]["seg/loss"])
    assert trainer.state.global_step == 1

    # the training rows really are ReasonSeg train (synthetic reason_seg/ReasonSeg/train/*.jpg)
    ids = {trainer.train_dataset[i]["ref_id"] for i in range(len(trainer.train_dataset))}
    expected = {f"reasonseg/train/{p.stem}" for p in (synthetic_root / "reason_seg/ReasonSeg/train").glob("*.jpg")}
    if name in ("reasonseg", "cot"):
        assert ids == expected
    else:
        assert ids.isdisjoint(expected) and all(i.startswith("refcoco/") for i in ids)

    rewards = ["box_iou", "think_format", "mask_iou"] if name == "cot" else ["box_iou", "mask_iou"]
    assert list(trainer.reward_func_names) == rewards
    assert all(f"rewards/{r}/mean" in step[0] for r in rewards)
    question = trainer.train_dataset[0]["prompt"][-1]["content"][-1]["text"]
    if name == "cot":
        head, tail = QUESTION_TEMPLATES["samr1_v4"].split("{question}")
        assert question.startswith(head) and question.endswith(tail) and len(question) > len(head + tail)
        assert "<think>" in question and "<answer>" in question
    else:
        assert question.startswith("Output the bounding box of the ")  # pr1_grounding

    if name == "lora":
        check_lora(trainer, final, tiny_checkpoint)
    else:
        saved = load_file(str(final / "model.safetensors"))
        before = load_file(str(tiny_checkpoint / "model.safetensors"))
        assert set(saved) == set(before)
        changed = {k for k in before if not torch.equal(before[k], saved[k])}
        assert any(k.startswith("model.language_model.") for k in changed)  # full fine-tuning of the LM
        assert not any(k.startswith("sam.image_encoder.") for k in changed)  # frozen in stage 2


def check_lora(trainer, final: Path, init: Path) -> None:
    """The run ends with a merged, full LENS checkpoint (and the adapter beside it): LoRA deltas merged into the LM,
    modules_to_save copies trained, learnable queries untouched; the adapter reloads to the same merged weights."""
    from peft import PeftModel

    from lens.modeling import LensForConditionalGeneration

    assert trainer.ref_model is None  # reference = adapter disabled
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.05)
    adapter = load_file(str(final / "adapter" / "adapter_model.safetensors"))
    for key in adapter:
        inner = key.removeprefix("base_model.model.")
        assert ".lora_" in inner or inner.startswith(MODULES_TO_SAVE), key
    lora_b = {k: v for k, v in adapter.items() if ".lora_B." in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())  # initialised at zero, moved by the step
    assert {k.split(".")[-3] for k in lora_b} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"}

    before = load_file(str(init / "model.safetensors"))
    merged = load_file(str(final / "model.safetensors"))
    assert set(merged) == set(before)  # a full LENS checkpoint, no PEFT names
    changed = {k for k in before if not torch.equal(before[k], merged[k])}
    assert any(k.startswith("model.language_model.") and k.endswith("q_proj.weight") for k in changed)  # merged
    assert not any(k.startswith(("model.visual.", "learnable_query", "sam.image_encoder.")) for k in changed)
    for prefix in ("connector.", "conv_1d.", "proj_to_sam.", "sam.sam_mask_decoder."):
        assert any(k.startswith(prefix) for k in changed), prefix  # fully trained copies moved
    model, info = LensForConditionalGeneration.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    # the adapter, applied to the initial weights and merged, gives exactly the saved checkpoint
    again = PeftModel.from_pretrained(LensForConditionalGeneration.from_pretrained(init), final / "adapter")
    again = again.merge_and_unload().state_dict()
    mismatched = [k for k in merged if not torch.allclose(again[k], merged[k], atol=1e-6)]
    assert not mismatched, mismatched[:5]

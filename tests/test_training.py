"""Training: trainable groups, stage-1 isolation, resume, GRPO advantages/loss by hand, seg-loss gradients."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lens.losses import segmentation_loss
from lens.training.recipe import build_trainer, load_recipe, run
from lens.training.trainable import group_of, scale_group_lrs, set_trainable

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "tiny"


def tiny_recipe(stage: str, root: Path, init: Path, out: Path, *extra: str) -> dict:
    return load_recipe(
        RECIPES / f"{stage}.yaml",
        [f"data.root={root}", f"model.init={init}", f"train.output_dir={out}", "train.report_to=none",
         "train.save_steps=1000", "train.logging_steps=1", "train.disable_tqdm=true", *extra],
    )


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_stage_defaults_match_the_paper(tiny_checkpoint):
    from lens.modeling import LensForConditionalGeneration

    model = LensForConditionalGeneration.from_pretrained(tiny_checkpoint)
    s1 = set_trainable(model, "stage1")
    assert s1["context"] > 0 and sum(v for k, v in s1.items() if k != "context") == 0
    s2 = set_trainable(model, "stage2")
    assert s2["sam_image_encoder"] == 0 and all(s2[k] > 0 for k in ("llm", "vision", "context", "sam_mask_decoder"))
    assert not model.sam.no_mem_embed.requires_grad  # video-memory leftovers never train
    with pytest.raises(ValueError, match="unknown trainable groups"):
        set_trainable(model, "stage1", {"decoder": True})


def test_stage1_changes_only_the_context_module(synthetic_root, tiny_checkpoint, tmp_path):
    # the paper's stage-1 groups (the tiny recipe also trains its LM and SAM2 decoder; see its header)
    recipe = tiny_recipe("stage1", synthetic_root, tiny_checkpoint, tmp_path / "s1", "train.max_steps=2",
                         "trainable.sam_mask_decoder=false", "trainable.sam_prompt_encoder=false", "trainable.llm=false")
    final = run(recipe)
    before, after = weights(tiny_checkpoint), weights(final)
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(group_of(k) == "context" for k in changed), sorted(changed)[:5]
    assert "learnable_query" in changed and "conv_1d.weight" in changed
    assert (tmp_path / "s1" / "config.yaml").is_file()  # the resolved recipe is written next to the outputs


def test_resume_gives_the_same_next_step_loss(synthetic_root, tiny_checkpoint, tmp_path):
    out = tmp_path / "s1"
    recipe = tiny_recipe("stage1", synthetic_root, tiny_checkpoint, out, "train.max_steps=4", "train.save_steps=2",
                         "train.per_device_train_batch_size=4")
    run(recipe)
    uninterrupted = [h["loss"] for h in json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "final")
    run(recipe, resume=True)  # continues from checkpoint-2
    resumed = [h["loss"] for h in json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(uninterrupted) == len(resumed) == 4
    assert resumed[2:] == pytest.approx(uninterrupted[2:], rel=1e-5, abs=1e-6)


def test_lm_plus_seg_takes_one_forward_and_matches_two(synthetic_root, tiny_checkpoint, tmp_path):
    # "lm+seg" reads the answer's log-probs off the query forward; the stock forward gives the same next-token loss.
    # Both the SAM2 encoding and the query forward are calls of the model (what DDP/ZeRO-3 need); nothing else is.
    trainer = build_trainer(tiny_recipe("stage1", synthetic_root, tiny_checkpoint, tmp_path / "s1",
                                        "train.per_device_train_batch_size=4", "cache_sam_features=false"))
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model.eval()
    calls = []
    hook = model.register_forward_hook(lambda m, args, kwargs, out: calls.append(type(out).__name__), with_kwargs=True)
    with torch.no_grad():
        total = trainer.compute_loss(model, batch)
    hook.remove()
    assert calls == ["SamFeatures", "LensOutput"]
    lm_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "labels")}
    with torch.no_grad():
        lm = model(**lm_inputs, mm_token_type_ids=batch.get("mm_token_type_ids")).loss
        out = model(**{k: v for k, v in lm_inputs.items() if k != "labels"}, sam_images=batch["sam_images"],
                    sam_image_index=batch["sam_image_index"])
    seg, _ = segmentation_loss(out.mask_logits, batch["target_masks"])
    assert float(total) == pytest.approx(float(lm + seg), rel=1e-5)
    assert trainer._parts["lm"][-1] == pytest.approx(float(lm), rel=1e-5)


def test_resume_without_checkpoint_is_a_clear_error(synthetic_root, tiny_checkpoint, tmp_path):
    recipe = tiny_recipe("stage1", synthetic_root, tiny_checkpoint, tmp_path / "none", "train.max_steps=1")
    with pytest.raises(FileNotFoundError, match="no checkpoint-"):
        run(recipe, resume=True)


def test_overrides_parse_yaml_values_and_scientific_floats():
    recipe = load_recipe(RECIPES / "stage1.yaml", ["train.learning_rate=1e-5", "train.max_steps=3", "model.dtype=bfloat16",
                                                   "data.train=[refcoco:train, custom:x.jsonl]", "trainable.llm=true"])
    assert recipe["train"]["learning_rate"] == 1e-5 and isinstance(recipe["train"]["learning_rate"], float)
    assert recipe["train"]["max_steps"] == 3 and recipe["model"]["dtype"] == "bfloat16"
    assert recipe["data"]["train"] == ["refcoco:train", "custom:x.jsonl"] and recipe["trainable"]["llm"] is True


def test_bad_recipes_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="section.key=value"):
        load_recipe(RECIPES / "stage1.yaml", ["learning_rate"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: stage3\nmodel: {init: x}\ndata: {train: [a]}\ntrain: {output_dir: o}\n")
    with pytest.raises(ValueError, match="stage='stage3'"):
        load_recipe(bad)
    with pytest.raises(ValueError, match="unknown training source 'refcocox:train'"):
        from lens.training.data import load_source

        load_source("refcocox:train", tmp_path)


def test_lr_multipliers_scale_each_group_through_the_schedule(synthetic_root, tiny_checkpoint, tmp_path):
    recipe = tiny_recipe("stage1", synthetic_root, tiny_checkpoint, tmp_path / "lr", "train.max_steps=2",
                         "train.learning_rate=1e-4", "train.warmup_steps=0", "train.lr_scheduler_type=constant",
                         "trainable.llm=false", "trainable.sam_prompt_encoder=false", "lr_multipliers.sam_mask_decoder=5",
                         "lr_multipliers.context=0.5")
    trainer = build_trainer(recipe)
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    lrs = {group_of(names[id(p)]): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert lrs == pytest.approx({"context": 5e-5, "sam_mask_decoder": 5e-4})
    assert sorted(trainer.lr_scheduler.get_last_lr()) == pytest.approx(sorted(g["lr"] for g in trainer.optimizer.param_groups))
    n_trainable = sum(p.requires_grad for p in trainer.model.parameters())
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == n_trainable


def test_peft_parameter_names_map_to_their_groups():
    assert group_of("base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight") == "llm"
    assert group_of("base_model.model.connector.modules_to_save.default.blocks.0.attn.qkv.weight") == "context"
    assert group_of("base_model.model.sam.sam_mask_decoder.original_module.iou_token.weight") == "sam_mask_decoder"
    assert group_of("base_model.model.learnable_query") == "context"
    assert group_of("sam.obj_ptr_proj.layers.0.weight") is None


def test_unknown_groups_are_rejected_when_the_recipe_loads(synthetic_root, tiny_checkpoint, tmp_path):
    for section in ("lr_multipliers", "trainable"):
        with pytest.raises(ValueError, match=f"{section}: unknown groups \\['decoder'\\]"):
            tiny_recipe("stage1", synthetic_root, tiny_checkpoint, tmp_path / "lr", f"{section}.decoder=5")
    model = torch.nn.Linear(2, 2)  # the optimizer-side check, for callers that bypass recipes
    with pytest.raises(ValueError, match="lr_multipliers: unknown groups"):
        scale_group_lrs(torch.optim.AdamW(model.parameters()), model, {"decoder": 5.0})


# ---------------------------------------------------------------------- GRPO
@pytest.fixture()
def grpo(synthetic_root, tiny_checkpoint, tmp_path):
    def make(*extra: str):
        recipe = tiny_recipe("stage2", synthetic_root, tiny_checkpoint, tmp_path / "s2", "train.max_steps=1",
                             "grpo.max_completion_length=12", *extra)
        trainer = build_trainer(recipe)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop; we call the pieces directly
        g = trainer.args.num_generations
        rows = [dict(trainer.train_dataset[i // g]) for i in range(2 * g)]  # 2 prompts x G rollouts
        return trainer, rows
    return make


def test_grpo_advantages_rewards_and_loss_match_a_hand_computation(grpo):
    trainer, rows = grpo()
    g = trainer.args.num_generations
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions(rows)
    box = torch.tensor(list(trainer._logs["rewards"]["box_iou"])[-2 * g:])
    mask_reward = torch.tensor(list(trainer._logs["rewards"]["mask_iou"])[-2 * g:])
    # segment-level reward = IoU^2 of the scoring forward's masks
    assert mask_reward.tolist() == pytest.approx([r["mask_iou"] ** 2 for r in rows], abs=1e-6)
    r = (box + mask_reward).view(2, g)
    expected_adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()  # unbiased std
    torch.testing.assert_close(inputs["advantages"].cpu(), expected_adv, atol=1e-5, rtol=1e-5)

    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    k = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, inputs)
        lp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, att, k, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
        out = trainer.model.forward_with_queries(ids, att, inputs["pixel_values"], inputs["image_grid_thw"],
                                                 sam_features=trainer._banks["train"][1], sam_image_index=inputs["sam_image_index"])
    delta = inputs["ref_per_token_logps"] - lp
    k3 = torch.exp(delta) - delta - 1
    per_token = -inputs["advantages"][:, None] + trainer.beta * k3  # ratio exp(lp - lp.detach()) == 1
    m = inputs["completion_mask"].float()
    policy = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    seg, _ = segmentation_loss(out.mask_logits, inputs["target_masks"])
    assert loss.item() == pytest.approx((policy + trainer.seg_weight * seg).item(), rel=1e-4, abs=1e-5)
    # the policy log-probs of the query forward equal a plain forward's under the same positions
    assert torch.isfinite(lp).all() and (lp <= 0).all()


def test_stage2_segmentation_loss_reaches_context_lm_and_decoder(grpo):
    trainer, rows = grpo("grpo.beta=0.0")
    inputs = trainer._generate_and_score_completions(rows)
    inputs["advantages"] = torch.zeros_like(inputs["advantages"])  # policy term contributes no gradient
    trainer.model.zero_grad()
    trainer._compute_loss(trainer.model, inputs).backward()
    model = trainer.model
    for name in ("learnable_query", "connector.blocks.0.attn.qkv.weight", "conv_1d.weight", "proj_to_sam.2.weight",
                 "model.language_model.layers.0.self_attn.q_proj.weight", "model.visual.blocks.0.attn.qkv.weight",
                 "sam.sam_mask_decoder.output_upscaling.0.weight", "sam.sam_mask_decoder.conv_s0.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.sam.image_encoder.parameters())


def test_grpo_rejects_groups_split_across_ranks(synthetic_root, tiny_checkpoint, tmp_path):
    recipe = tiny_recipe("stage2", synthetic_root, tiny_checkpoint, tmp_path / "s2", "train.per_device_train_batch_size=6",
                         "grpo.num_generations=4")
    with pytest.raises(ValueError, match="num_generations"):
        build_trainer(recipe)


def test_malformed_completion_scores_zero_not_a_crash():
    from lens.rewards import REWARDS

    bad = ["", "<answer>", "(1,2),(3", "{\"bbox_2d\": [1e999, 2, 3, 4]}", "\x00" * 5]
    for name, fn in REWARDS.items():
        kwargs = {"box_llm": [[0, 0, 10, 10]] * len(bad), "mask_iou": [0.0] * len(bad)}
        scores = fn(prompts=[""] * len(bad), completions=bad, **kwargs)
        assert all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in scores), name

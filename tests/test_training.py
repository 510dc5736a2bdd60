"""Training: trainable groups, stage-1 isolation, resume, GRPO advantages/loss by hand, seg-loss gradients."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from lens import geometry, rewards
from lens.losses import segmentation_loss
from lens.training.recipe import build_trainer, load_recipe, run
from lens.training.trainable import group_of, scale_group_lrs, set_trainable

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "tiny"


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def logged_losses(checkpoint: Path) -> list[float]:
    return [h["loss"] for h in json.loads((checkpoint / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def test_stage_defaults_match_the_paper(tiny_checkpoint):
    from lens.modeling import LensForConditionalGeneration

    model = LensForConditionalGeneration.from_pretrained(tiny_checkpoint)
    s1 = set_trainable(model, "stage1")
    assert s1["context"] > 0 and sum(v for k, v in s1.items() if k != "context") == 0
    s2 = set_trainable(model, "stage2")
    assert s2["sam_image_encoder"] == 0 and all(s2[k] > 0 for k in ("llm", "vision", "context", "sam_mask_decoder"))
    assert not model.sam.no_mem_embed.requires_grad  # video-memory leftovers never train
    with pytest.raises(ValueError, match=r"trainable: unknown groups \['decoder'\]; expected a subset of \('llm', "):
        set_trainable(model, "stage1", {"decoder": True})


def test_stage1_changes_only_the_context_module(tiny_recipe, tiny_checkpoint, tmp_path):
    # the paper's stage-1 groups (the tiny recipe also trains its LM and SAM2 decoder; see its header)
    recipe = tiny_recipe("stage1", "train.max_steps=2",
                         "trainable.sam_mask_decoder=false", "trainable.sam_prompt_encoder=false", "trainable.llm=false")
    final = run(recipe)
    before, after = weights(tiny_checkpoint), weights(final)
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(group_of(k) == "context" for k in changed), sorted(changed)[:5]
    assert "learnable_query" in changed and "conv_1d.weight" in changed
    assert (tmp_path / "stage1" / "config.yaml").is_file()  # the resolved recipe is written next to the outputs


def test_resume_gives_the_same_next_step_loss(tiny_recipe, tmp_path):
    out = tmp_path / "s1"
    recipe = tiny_recipe("stage1", "train.max_steps=4", "train.save_steps=2",
                         "train.per_device_train_batch_size=4", out=out)
    run(recipe)
    uninterrupted = logged_losses(out / "checkpoint-4")
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "final")
    run(recipe, resume=True)  # continues from checkpoint-2
    resumed = logged_losses(out / "checkpoint-4")
    assert len(uninterrupted) == len(resumed) == 4
    assert resumed[2:] == pytest.approx(uninterrupted[2:], rel=1e-5, abs=1e-6)


def test_lm_plus_seg_takes_one_forward_and_matches_two(tiny_recipe):
    # "lm+seg" reads the answer's log-probs off the query forward; the stock forward gives the same next-token loss.
    # Both the SAM2 encoding and the query forward are calls of the model (what DDP/ZeRO-3 need); nothing else is.
    trainer = build_trainer(tiny_recipe("stage1",
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


def test_resume_without_checkpoint_is_a_clear_error(tiny_recipe):
    recipe = tiny_recipe("stage1", "train.max_steps=1")
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


def test_lr_multipliers_scale_each_group_through_the_schedule(tiny_recipe):
    recipe = tiny_recipe("stage1", "train.max_steps=2",
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


def test_flop_estimate_counts_the_parameters_once_and_equals_transformers(tiny_recipe):
    """`total_flos` as transformers computes it (6 x tokens x non-embedding parameters), without walking the
    model's parameters every step."""
    from transformers import Trainer

    trainer = build_trainer(tiny_recipe("stage1", "train.max_steps=1"))
    inputs = {"input_ids": torch.zeros(3, 17, dtype=torch.long)}
    expected = Trainer.floating_point_ops(trainer, inputs)
    assert expected == 6 * 3 * 17 * trainer.model.num_parameters(exclude_embeddings=True) > 0
    with mock.patch.object(type(trainer.model), "num_parameters", autospec=True,
                           side_effect=type(trainer.model).num_parameters) as counted:
        assert [trainer.floating_point_ops(inputs) for _ in range(4)] == [expected] * 4
    assert counted.call_count == 1
    assert trainer.floating_point_ops({"pixel_values": torch.zeros(2)}) == 0  # no token ids: nothing counted


def test_peft_parameter_names_map_to_their_groups():
    assert group_of("base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight") == "llm"
    assert group_of("base_model.model.connector.modules_to_save.default.blocks.0.attn.qkv.weight") == "context"
    assert group_of("base_model.model.sam.sam_mask_decoder.original_module.iou_token.weight") == "sam_mask_decoder"
    assert group_of("base_model.model.learnable_query") == "context"
    assert group_of("sam.obj_ptr_proj.layers.0.weight") is None


def test_unknown_groups_are_rejected_when_the_recipe_loads(tiny_recipe):
    for section in ("lr_multipliers", "trainable"):
        with pytest.raises(ValueError, match=f"stage1.yaml: override '{section}.decoder=5': unknown key '{section}.decoder'; "
                                             f"did you mean '{section}.sam_mask_decoder'\\?"):
            tiny_recipe("stage1", f"{section}.decoder=5")
    model = torch.nn.Linear(2, 2)  # the optimizer-side check, for callers that bypass recipes
    with pytest.raises(ValueError, match=r"lr_multipliers: unknown groups \['decoder'\]; expected a subset of \('llm', "):
        scale_group_lrs(torch.optim.AdamW(model.parameters()), model, {"decoder": 5.0})


# ---------------------------------------------------------------------- GRPO
@pytest.fixture()
def grpo(tiny_recipe):
    def make(*extra: str):
        # two passes: the rewards and advantages exist after generation (the single pass, which takes them from the
        # loss forward, is shown equal to this flow in tests/test_shared_prefix.py)
        recipe = tiny_recipe("stage2", "train.max_steps=1", "single_pass_rewards=false",
                             "grpo.max_completion_length=12", *extra)
        trainer = build_trainer(recipe)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop; we call the pieces directly
        g = trainer.args.num_generations
        rows = [dict(trainer.train_dataset[i // g]) for i in range(2 * g)]  # 2 prompts x G rollouts
        return trainer, rows
    return make


# The reward definitions, written out here rather than imported: IoU^2 of the first box of the answer against box_llm
# (the <answer> block's box first, else the whole text's; "[a, b, c, d]" before "(a, b, c, d)" before
# "(a, b),(c, d)"), and IoU^2 of the thresholded upsampled mask against the target mask.
HAND_NUM = r"-?\d+(?:\.\d+)?"
HAND_BOXES = [re.compile(p.replace("N", HAND_NUM)) for p in (
    r"\[\s*(N),\s*(N),\s*(N),\s*(N)\s*\]", r"\(\s*(N),\s*(N),\s*(N),\s*(N)\s*\)", r"\(\s*(N),\s*(N)\),\s*\(\s*(N),\s*(N)\)")]


def hand_box(text: str) -> list[float] | None:
    def first(t):
        for pattern in HAND_BOXES:
            m = pattern.search(t)
            if m:
                box = [float(v) for v in m.groups()]
                return box if all(math.isfinite(v) for v in box) else None
        return None

    answers = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    return (first(answers[-1]) if answers else None) or first(text)


def hand_box_reward(text: str, gt) -> float:
    box, gt = hand_box(text), [float(v) for v in gt]
    if box is None:
        return 0.0
    iw = max(0.0, min(box[2], gt[2]) - max(box[0], gt[0]))
    ih = max(0.0, min(box[3], gt[3]) - max(box[1], gt[1]))
    union = (box[2] - box[0]) * (box[3] - box[1]) + (gt[2] - gt[0]) * (gt[3] - gt[1]) - iw * ih
    return (iw * ih / union) ** 2 if union > 0 else 0.0


def hand_mask_iou_and_seg_loss(mask_logits, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row IoU of (upsampled logit > 0) vs target, and mean BCE + mean dice (+1 smoothing) of the rows."""
    ious, bces, dices = [], [], []
    for logit, target in zip(mask_logits, targets):
        up = F.interpolate(logit[None].float(), size=tuple(target.shape), mode="bilinear", align_corners=False)[0, 0]
        t = target.float()
        pred = up > 0
        ious.append((pred & target).sum() / ((pred | target).sum() + 1e-6))
        bces.append(F.binary_cross_entropy_with_logits(up, t))
        p = up.sigmoid()
        dices.append(1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1))
    return torch.stack(ious).double(), torch.stack(bces).mean() + torch.stack(dices).mean()


def completion_logps(logits, completion_ids, temperature: float) -> torch.Tensor:
    """Log-prob of each completion token at `temperature` from (B, L, V) logits over prompt + completion."""
    k = completion_ids.shape[1]
    logp = torch.log_softmax(logits[:, -k - 1 : -1].float() / temperature, -1)
    return logp.gather(-1, completion_ids[..., None])[..., 0]


def test_grpo_advantages_rewards_and_loss_match_a_hand_computation(grpo):
    trainer, rows = grpo()
    model, tok = trainer.model, trainer.processing_class.tokenizer
    g, n = trainer.args.num_generations, len(rows)
    assert model.config.query_position_mode == "upstream" and trainer.loss_type == "grpo"
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions(rows)
    c_ids, c_mask = inputs["completion_ids"], inputs["completion_mask"]
    ids = torch.cat([inputs["prompt_ids"], c_ids], 1)
    att = torch.cat([inputs["prompt_mask"], c_mask], 1)
    targets = [torch.from_numpy(r["mask"] == 1) for r in rows]

    # rewards from the completion text and from an independent query forward (every row encodes its own SAM2 image)
    texts = tok.batch_decode([c[m.bool()] for c, m in zip(c_ids, c_mask)], skip_special_tokens=True)
    box = torch.tensor([hand_box_reward(t, r["box_llm"]) for t, r in zip(texts, rows)], dtype=torch.float64)
    sam = torch.stack([torch.as_tensor(r["sam_image"]) for r in rows])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=att, pixel_values=inputs["pixel_values"],
                    image_grid_thw=inputs["image_grid_thw"], sam_images=sam, share_vision=False)
    iou, seg = hand_mask_iou_and_seg_loss(out.mask_logits, targets)
    mask = iou**2
    logged = trainer._logs["rewards"]
    assert list(logged["box_iou"])[-n:] == pytest.approx(box.tolist(), abs=1e-6)
    assert list(logged["mask_iou"])[-n:] == pytest.approx(mask.tolist(), rel=1e-5, abs=1e-12)  # same pixel counts
    assert len(set(texts)) > 1 and mask.std() > 0  # rollouts differ: the advantages below are not all zero

    # advantages: group-normalised (unbiased std over the G rollouts of each prompt, + 1e-4)
    r = (box + mask).view(n // g, g)
    advantages = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()
    assert inputs["advantages"].double().tolist() == pytest.approx(advantages.tolist(), rel=1e-3, abs=1e-6)

    # log-probs from stock Qwen2.5-VL forwards: the policy's with LENS's upstream positions (cumsum of the mask,
    # padding at 1, the same on the 3 M-RoPE axes), the reference's with the stock M-RoPE positions. Before any
    # step the reference holds the policy's weights.
    m = c_mask.bool()
    positions = (att.long().cumsum(-1) - 1).masked_fill(att == 0, 1)[None].expand(3, -1, -1)
    vision = {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}
    with torch.no_grad():
        policy_logits = model(input_ids=ids, attention_mask=att, position_ids=positions, **vision).logits
        ref_logits = model(input_ids=ids, attention_mask=att, mm_token_type_ids=(ids == model.config.image_token_id).int(),
                           **vision).logits
    lp = completion_logps(policy_logits, c_ids, trainer.temperature)
    ref = completion_logps(ref_logits, c_ids, trainer.temperature)
    torch.testing.assert_close(inputs["ref_per_token_logps"][m], ref[m], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the policy's query forward (queries appended) scores the tokens as the stock forward
        trainer_lp, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, att, c_ids.shape[1], **vision)
    torch.testing.assert_close(trainer_lp[m], lp[m], atol=1e-5, rtol=1e-5)

    # loss: ratio exp(lp - lp.detach()) == 1, so the clipped term is -A; k3 KL to the reference; token mean per
    # completion, mean over completions; plus seg_weight x (BCE + dice) of the masks
    assert trainer.beta > 0 and trainer.seg_weight == 1.0
    delta = (ref - lp).double()
    kl = torch.exp(delta) - delta - 1

    def hand_policy_loss(adv: torch.Tensor) -> float:
        per_token = -adv.double()[:, None] + trainer.beta * kl
        return ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean().item()

    # the trainer's advantages (checked above) enter as they are: they are float32 divisions by std + 1e-4 of reward
    # differences near 1e-7, so their group sums are ~1e-7 rather than 0
    probe = torch.tensor([1.0, -0.5, 2.0, 0.25])  # advantages whose mean is not 0, so the -A term shows in the loss
    with torch.no_grad():
        loss = trainer._compute_loss(model, inputs).item()
        trainer.seg_weight = 0.0
        kl_only = trainer._compute_loss(model, {**inputs, "advantages": torch.zeros(n)}).item()
        probed = trainer._compute_loss(model, {**inputs, "advantages": probe}).item()
    assert loss == pytest.approx(hand_policy_loss(inputs["advantages"]) + seg.item(), rel=1e-5)
    # upstream vs M-RoPE positions on the image tokens: the KL to the reference is not 0 even before a step
    assert kl_only == pytest.approx(hand_policy_loss(torch.zeros(n)), rel=0.03) and kl_only > 1e-9
    assert probed == pytest.approx(hand_policy_loss(probe), rel=1e-6)


# ---------------------------------------------------------------------- malformed completions, unclamped
def _unclamped_score_all(completions, score):
    """`lens.rewards._score_all` without its safety net: no exception is caught and nothing is clamped."""
    out = []
    for i, completion in enumerate(completions):
        value = score(i, rewards.completion_text(completion))
        assert isinstance(value, float), (value, completion)
        out.append(value)
    return out


_NO_DIGITS = st.text(st.characters(blacklist_categories=("Nd", "Cs")), max_size=12)  # \d matches every Nd digit
_TAGS = st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "<|im_end|>", "<|endoftext|>", "<|box_start|>",
                         "<|box_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "```json", "```", "{", "}", "[",
                         "]", "(", ")", ",", '"bbox_2d": ', "\x00", "🙂"])
_FILLER = st.lists(st.one_of(_NO_DIGITS, _TAGS), max_size=5).map("".join)
_INT = st.integers(-2000, 2000).map(str)
_FINITE = st.one_of(_INT, st.floats(-2000, 2000, allow_nan=False).map(lambda v: f"{v:.3f}"))
_HUGE = st.sampled_from(["9" * 400, "-" + "9" * 400, "1" * 330 + ".5"])  # parse to +-inf
_WRONG_ARITY = st.one_of(st.integers(0, 3), st.integers(5, 7)).flatmap(lambda k: st.lists(_FINITE, min_size=k, max_size=k))
_NON_FINITE = st.lists(_FINITE, min_size=3, max_size=3).flatmap(
    lambda nums: st.tuples(_HUGE, st.integers(0, 3)).map(lambda h: nums[: h[1]] + [h[0]] + nums[h[1]:]))
_DEGENERATE = st.tuples(st.integers(-500, 500), st.integers(-500, 500), st.integers(0, 300), st.integers(-300, 300),
                        st.booleans()).map(  # x2 <= x1 (or y2 <= y1): no area on the named axis
    lambda t: [t[0], t[1], t[0] - t[2], t[1] + t[3]] if t[4] else [t[0], t[1], t[0] + t[3], t[1] - t[2]]
).map(lambda v: [str(x) for x in v])


def _forms(nums: list[str]) -> st.SearchStrategy[str]:
    pairs = ("(" + ", ".join(nums[:2]) + ")" + (",(" + ", ".join(nums[2:4]) + ")" if len(nums) >= 4 else "")
             if len(nums) in (2, 4) else "(" + ", ".join(nums) + ")")
    return st.sampled_from(["[" + ", ".join(nums) + "]", "(" + ", ".join(nums) + ")", pairs,
                            '{"bbox_2d": [' + ", ".join(nums) + "]}", "<|box_start|>" + pairs + "<|box_end|>"])


_BAD_BOX = st.one_of(_WRONG_ARITY, _NON_FINITE, _DEGENERATE).flatmap(_forms)
_MALFORMED = st.one_of(
    _FILLER,
    st.tuples(_FILLER, _BAD_BOX, _FILLER).map("".join),
    st.tuples(_FILLER, _BAD_BOX, _FILLER).map(lambda t: f"<think>{t[0]}</think><answer>{t[1]}</answer>{t[2]}"),
)
_VALID_GT = st.tuples(st.integers(0, 500), st.integers(0, 500), st.integers(1, 300), st.integers(1, 300)).map(
    lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]])
_BAD_IOU = st.one_of(st.sampled_from([float("nan"), float("inf"), float("-inf"), None, "junk", "", [], {}]),
                     st.floats(max_value=0.0, allow_nan=False), st.text(st.characters(blacklist_categories=("Nd",)), max_size=4))


@settings(max_examples=300, deadline=None)
@given(st.lists(_MALFORMED, min_size=1, max_size=4), _VALID_GT, _BAD_IOU)
@example(["", "<answer>", "(1,2),(3", '{"bbox_2d": [1e999, 2, 3, 4]}', "\x00" * 5], [0, 0, 10, 10], float("nan"))
def test_malformed_completion_scores_zero_not_a_crash(completions, gt, bad_iou):
    # The reward wrapper clamps every score into [0, 1] and turns exceptions into 0, so it would hide a parser that
    # crashed or scored garbage: here the parsers run without it and malformed completions must score exactly 0.
    n = len(completions)
    conversational = [[{"role": "assistant", "content": c}] for c in completions]
    with mock.patch.object(rewards, "_score_all", _unclamped_score_all):
        for form in (completions, conversational):
            assert rewards.box_iou([None] * n, form, box_llm=[gt] * n) == [0.0] * n
            assert rewards.box_iou([None] * n, form, solution=[str(gt)] * n) == [0.0] * n
            assert rewards.answer_format([None] * n, form) == [0.0] * n
            for name in ("mask_iou", "mask_iou_linear"):
                assert rewards.REWARDS[name]([None] * n, form, mask_iou=[bad_iou] * n) == [0.0] * n
        no_answer_close = [c.replace("</answer>", "") for c in completions]
        assert rewards.think_format([None] * n, no_answer_close) == [0.0] * n
        # a well-formed answer still scores through the unclamped path: the zeros above are the parsers' own
        good = '<think>x</think><answer>{"bbox_2d": [' + ", ".join(map(str, gt)) + "]}</answer>"
        assert rewards.box_iou([None], [good], box_llm=[gt]) == [1.0]
        assert rewards.answer_format([None], [good]) == rewards.think_format([None], [good]) == [1.0]
    for c in completions:
        assert geometry.parse_answer_box(c) is None or geometry.box_iou(geometry.parse_answer_box(c), gt) == 0.0

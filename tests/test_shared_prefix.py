"""Shared-prefix forwards give the unshared forwards' numbers (log-probs, entropies, query states, masks,
gradients) for both query position modes, left-padded prompts, completions of different lengths, G = 1 and 8."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lens.modeling import LensForConditionalGeneration
from lens.modeling.shared_prefix import packed_layout, prefix_groups, shared_reference_log_probs
from lens.prompts import build_messages


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return LensForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_checkpoint)


def group_batch(processor, prompts: int = 2, g: int = 8, seed: int = 0, max_new: int = 9):
    """`prompts` groups of `g` rollouts: images of different sizes and questions of different lengths (so the
    prompts are left padded), completions of random lengths (right padded, eos-terminated).
    Returns the batch (B = prompts x g rows), the prompt length P, each row's image (B,) and SAM images."""
    rng = np.random.default_rng(seed)
    from PIL import Image

    images = [Image.fromarray(rng.integers(0, 255, (56 + 28 * i, 84, 3), dtype=np.uint8)) for i in range(prompts)]
    texts = [processor.apply_chat_template(build_messages("the red circle" + " left" * (3 * i)),
                                           add_generation_prompt=True, tokenize=False) for i in range(prompts)]
    enc = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    tok = processor.tokenizer
    patches = enc["image_grid_thw"].prod(-1).tolist()
    per_image = torch.split(enc["pixel_values"], patches)
    rows = torch.arange(prompts).repeat_interleave(g)
    lengths = rng.integers(1, max_new + 1, size=prompts * g)
    vocab = len(tok) - 64
    comp = torch.full((prompts * g, max_new + 1), tok.pad_token_id)
    comp_mask = torch.zeros_like(comp)
    for r, n in enumerate(lengths):  # test data only
        comp[r, :n] = torch.from_numpy(rng.integers(10, vocab, size=n))
        comp[r, n] = tok.eos_token_id
        comp_mask[r, : n + 1] = 1
    batch = dict(
        input_ids=torch.cat([enc["input_ids"][rows], comp], 1),
        attention_mask=torch.cat([enc["attention_mask"][rows], comp_mask], 1),
        pixel_values=torch.cat([per_image[r] for r in rows.tolist()]),
        image_grid_thw=enc["image_grid_thw"][rows],
    )
    sam = torch.from_numpy(rng.integers(0, 255, (prompts, 3, 256, 256), dtype=np.uint8))
    return batch, enc["input_ids"].shape[1], rows, sam


def labels_of(batch, p):
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :p] = -100
    return labels


def run(model, batch, p, rows, features, shared: bool):
    extra = {}
    if shared:
        extra = dict(prefix_groups=prefix_groups(batch["input_ids"][:, :p], batch["attention_mask"][:, :p], rows),
                     prefix_length=p)
    return model(**batch, labels=labels_of(batch, p), append_queries=True, sam_features=features,
                 sam_image_index=rows, **extra)


def unshared_and_shared(model, batch, p, rows, features):
    """Outputs and parameter gradients of the unshared and the shared forward, under one loss that weighs every
    output (log-probs position by position, entropies, masks, query states)."""
    outs, grads = [], []
    for shared in (False, True):
        model.zero_grad()
        out = run(model, batch, p, rows, features, shared)
        w = torch.linspace(-1, 1, out.log_probs.shape[1])
        loss = (out.log_probs * w).sum() + out.entropy.sum() + out.mask_logits.mean() + out.query_states.square().mean()
        loss.backward()
        outs.append(out)
        grads.append({n: prm.grad.clone() for n, prm in model.named_parameters() if prm.grad is not None})
    return outs, grads


def test_layout_masks_other_suffixes_and_padding():
    layout = packed_layout(torch.tensor([0, 0, 1]), prefix_length=3, suffix_width=2)  # head 2, 2 slots
    assert layout.length == 6 and layout.slots == 2
    assert layout.suffix_positions().tolist() == [[2, 3], [4, 5], [2, 3]]
    allowed = layout.allowed(torch.tensor([[0, 1], [0, 1], [1, 1]]), torch.ones(3, 2, dtype=torch.long))[:, 0]
    # group 0: suffix 2 (positions 4, 5) sees the valid prefix token 1 and itself, not suffix 1 nor the padding
    assert allowed[0, 5].tolist() == [False, True, False, False, True, True]
    assert allowed[0, 3].tolist() == [False, True, True, True, False, False]
    assert allowed[0, 0].tolist() == [True, False, False, False, False, False]  # padding: itself only
    # group 1 has one row: no real token sees its unused slot (which itself sees the prefix and itself)
    assert not allowed[1, :4, 4:].any() and allowed[1, 4].tolist() == [True, True, False, False, True, False]


@pytest.mark.parametrize("mode", ["upstream", "mrope"])
@pytest.mark.parametrize("g", [1, 8])
def test_shared_equals_unshared_fp32(model, processor, mode, g, one_thread):
    model = copy.deepcopy(model)
    model.config.query_position_mode = mode
    batch, p, rows, sam = group_batch(processor, prompts=2, g=g)
    assert (batch["attention_mask"][:, :p] == 0).any()  # left padding is exercised
    assert len(set(batch["attention_mask"][:, p:].sum(1).tolist())) > 1 or g == 1  # completions of different lengths
    with torch.no_grad():
        features = model.encode_sam_images(sam)
    (a, b), grads = unshared_and_shared(model, batch, p, rows, features)
    keep = labels_of(batch, p)[:, 1:] != -100
    assert keep.any()
    torch.testing.assert_close(b.log_probs[keep], a.log_probs[keep], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(b.entropy[keep], a.entropy[keep], atol=2e-5, rtol=1e-5)
    assert (b.log_probs[~keep] == 0).all()
    torch.testing.assert_close(b.query_states, a.query_states, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(b.mask_logits, a.mask_logits, atol=1e-4, rtol=1e-4)
    assert grads[0].keys() == grads[1].keys()
    assert any(k.startswith("model.visual") for k in grads[0])  # the gradient reaches the vision tower
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_shared_equals_unshared_bf16(model, processor, one_thread):
    model = copy.deepcopy(model).to(torch.bfloat16)
    batch, p, rows, _ = group_batch(processor, prompts=2, g=4, seed=1)
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        a, b = (run(model, batch, p, rows, None, shared) for shared in (False, True))
    keep = labels_of(batch, p)[:, 1:] != -100
    torch.testing.assert_close(b.log_probs[keep], a.log_probs[keep], atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(b.query_states.float(), a.query_states.float(), atol=5e-2, rtol=5e-2)


def test_shared_prefix_rejects_rows_that_differ(model, processor):
    batch, p, rows, _ = group_batch(processor, prompts=2, g=2)
    groups = torch.zeros(4, dtype=torch.long)  # claims both prompts are one group
    with pytest.raises(ValueError, match="prefix_groups"):
        model(**batch, labels=labels_of(batch, p), append_queries=True, prefix_groups=groups, prefix_length=p)


@pytest.mark.parametrize("with_types", [True, False])
def test_shared_reference_log_probs(model, processor, with_types, one_thread):
    from trl.trainer.utils import add_fused_lm_head

    from lens.training.grpo import build_reference_model

    ref = build_reference_model(model)
    add_fused_lm_head(ref)
    batch, p, rows, _ = group_batch(processor, prompts=2, g=8, seed=2)
    c = batch["input_ids"].shape[1] - p
    mm = (batch["input_ids"] == model.config.image_token_id).int() if with_types else None
    extra = {"mm_token_type_ids": mm} if with_types else {}
    with torch.no_grad():
        plain = ref(**batch, labels=labels_of(batch, p), fused_lm_head=True, **extra).log_probs[:, -c:]
        groups = prefix_groups(batch["input_ids"][:, :p], batch["attention_mask"][:, :p], rows)
        shared = shared_reference_log_probs(ref, ref, batch["input_ids"], batch["attention_mask"], c, groups,
                                            batch["pixel_values"], batch["image_grid_thw"], mm)
    torch.testing.assert_close(shared, plain, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------- the trainer: shared vs unshared, one pass vs two
G = 4


@pytest.fixture(scope="module")
def grpo_trainer(tiny_grpo):
    return tiny_grpo("grpo_shared", f"grpo.num_generations={G}", f"train.per_device_train_batch_size={2 * G}",
                     "grpo.beta=0.04")


def generate(trainer, prompts, shared: bool, single: bool = False):
    trainer.shared_prefix, trainer.single_pass_rewards = shared, single
    rows = [dict(prompts[i // G]) for i in range(2 * G)]
    torch.manual_seed(0)
    return trainer._generate_and_score_completions(rows), rows


def loss_and_grads(trainer, inputs):
    from lens.training.grpo import lens_module

    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in lens_module(model).named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_trainer_shared_prefix_equals_unshared(grpo_trainer, one_thread, monkeypatch):
    from lens.modeling import shared_generation

    trainer, prompts = grpo_trainer
    plain, plain_rows = generate(trainer, prompts, shared=False)
    used = []
    real = shared_generation.shared_prefill_generate
    monkeypatch.setattr(shared_generation, "shared_prefill_generate", lambda *a, **k: used.append(1) or real(*a, **k))
    shared, shared_rows = generate(trainer, prompts, shared=True)
    assert used == [1]  # the generation prefilled each prompt once
    torch.testing.assert_close(shared["completion_ids"], plain["completion_ids"], rtol=0, atol=0)
    assert [r["mask_iou"] for r in shared_rows] == pytest.approx([r["mask_iou"] for r in plain_rows], abs=1e-5)
    torch.testing.assert_close(shared["ref_per_token_logps"], plain["ref_per_token_logps"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(shared["advantages"], plain["advantages"], atol=1e-4, rtol=1e-4)
    trainer.shared_prefix = False
    loss_a, grads_a = loss_and_grads(trainer, shared)  # the latest SAM feature bank is the shared batch's
    trainer.shared_prefix = True
    loss_b, grads_b = loss_and_grads(trainer, shared)
    trainer.shared_prefix = False
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-5, abs=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=1e-3, msg=name)


def test_single_pass_rewards_equal_two_passes(grpo_trainer, one_thread):
    trainer, prompts = grpo_trainer
    scored = []
    score = trainer._score_masks
    trainer._score_masks = lambda *a, **k: scored.append(1) or score(*a, **k)
    try:
        two, _ = generate(trainer, prompts, shared=True)
        assert len(scored) == 1
        one, _ = generate(trainer, prompts, shared=True, single=True)
        assert len(scored) == 1  # no scoring forward in the single-pass flow
    finally:
        del trainer._score_masks
    torch.testing.assert_close(one["completion_ids"], two["completion_ids"], rtol=0, atol=0)
    two["sam_bank"] = one["sam_bank"]  # same images: the latest bank holds their features
    trainer.single_pass_rewards = False
    loss_two, grads_two = loss_and_grads(trainer, dict(two))
    one = dict(one)
    without_masks = one["advantages"].clone()  # generation's advantages leave the mask reward out
    assert not torch.allclose(without_masks, two["advantages"], atol=1e-3)  # so the mask reward matters here
    trainer.single_pass_rewards = True
    try:
        loss_one, grads_one = loss_and_grads(trainer, one)  # writes the advantages into `one`
    finally:
        trainer.shared_prefix = trainer.single_pass_rewards = False
    torch.testing.assert_close(one["advantages"], two["advantages"], atol=1e-4, rtol=1e-4)
    logged = trainer._metrics["train"]
    for key in ("reward", "reward_std", "rewards/mask_iou/mean", "frac_reward_zero_std", "seg/mask_iou"):  # real figures
        assert logged[key][-1] == pytest.approx(logged[key][-2], rel=1e-4, abs=1e-6), key
    assert two["advantages"].abs().sum() > 0
    assert loss_one.item() == pytest.approx(loss_two.item(), rel=1e-5, abs=1e-6)
    for name in grads_two:
        torch.testing.assert_close(grads_one[name], grads_two[name], atol=1e-6, rtol=1e-3, msg=name)


def test_shuffle_groups_moves_whole_groups():
    from lens.training.shared_grpo import shuffle_groups

    torch.manual_seed(3)
    batch = {"prompt_ids": torch.arange(12)[:, None].repeat(1, 2), "names": [f"r{i}" for i in range(12)], "n": 5}
    out = shuffle_groups(batch, 4)
    rows = out["prompt_ids"][:, 0]
    assert sorted(rows.tolist()) == list(range(12))
    assert (rows.view(3, 4) // 4 == (rows.view(3, 4)[:, :1] // 4)).all()  # each run of 4 is one group, in order
    assert (rows.view(3, 4) % 4 == torch.arange(4)).all()
    assert out["names"] == [f"r{i}" for i in rows.tolist()] and out["n"] == 5


def test_single_pass_rewards_fall_back_to_two_passes_naming_why(tiny_recipe, caplog):
    from lens.training.recipe import build_trainer

    recipe = tiny_recipe("stage2", "single_pass_rewards=true", "train.per_device_train_batch_size=3",
                         "grpo.num_generations=3", "grpo.scale_rewards=batch", "train.max_steps=1")
    with caplog.at_level("WARNING", logger="lens.training.shared_grpo"):
        trainer = build_trainer(recipe)
    assert trainer.single_pass_rewards is False
    assert "two-pass flow" in caplog.text and "scale_rewards 'group' or 'none'" in caplog.text
    ok = build_trainer(tiny_recipe("stage2", "single_pass_rewards=true", "train.max_steps=1"))
    assert ok.single_pass_rewards is True


# ---------------------------------------------------------------------- generation: each prompt prefilled once
def generation_inputs(processor, prompts: int = 2, g: int = 4, seed: int = 4):
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (56 + 28 * i, 84, 3), dtype=np.uint8)) for i in range(prompts)]
    texts = [processor.apply_chat_template(build_messages("the red circle" + " left" * (3 * i)),
                                           add_generation_prompt=True, tokenize=False) for i in range(prompts)]
    enc = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    rows = torch.arange(prompts).repeat_interleave(g)
    per_image = torch.split(enc["pixel_values"], enc["image_grid_thw"].prod(-1).tolist())
    inputs = dict(input_ids=enc["input_ids"][rows], attention_mask=enc["attention_mask"][rows],
                  pixel_values=torch.cat([per_image[r] for r in rows.tolist()]),
                  image_grid_thw=enc["image_grid_thw"][rows], mm_token_type_ids=enc["mm_token_type_ids"][rows])
    assert (inputs["attention_mask"] == 0).any()
    return inputs, rows


@pytest.mark.parametrize("sample", [False, True])
def test_shared_prefill_generation_equals_plain(model, processor, sample, one_thread):
    from lens.modeling.shared_generation import shared_prefill_generate

    inputs, rows = generation_inputs(processor)
    kwargs = dict(max_new_tokens=8, do_sample=sample, temperature=1.5, top_k=0, top_p=1.0, output_scores=True,
                  return_dict_in_generate=True, pad_token_id=processor.tokenizer.pad_token_id)
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, k: calls.append(tuple(k["input_ids"].shape)), with_kwargs=True)
    try:
        torch.manual_seed(0)
        plain = model.generate(**inputs, **kwargs)
        n_plain = len(calls)
        torch.manual_seed(0)
        shared = shared_prefill_generate(model, model.generate, rows, **inputs, **kwargs)
    finally:
        hook.remove()
    prefill = calls[n_plain]
    assert prefill == (2, inputs["input_ids"].shape[1] - 1)  # one prefill row per distinct prompt
    assert calls[n_plain + 1] == (8, 1)  # then every row continues from its last prompt token
    torch.testing.assert_close(shared.sequences, plain.sequences, rtol=0, atol=0)
    for a, b in zip(shared.scores, plain.scores):
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a))
        torch.testing.assert_close(a[finite], b[finite], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------- 2-process ZeRO-3 on CPU
@pytest.mark.slow
def test_zero3_two_processes_shared_equals_unshared(synthetic_root, tiny_checkpoint, tmp_path):
    """Two ranks under DeepSpeed ZeRO-3 (gloo, CPU): the same two logged losses and trained weights with and
    without shared prefixes (steps_per_generation 1, so that both draw the same random numbers)."""
    from test_cluster import STAGE2, ZERO3, launch, losses, zero_weights

    script, recipe, *overrides = STAGE2
    runs = {}
    for shared in (False, True):
        out = tmp_path / f"shared_{shared}"
        launch(script, recipe, out, *overrides, ZERO3, "train.gradient_accumulation_steps=1",
               f"grpo_shared_prefix={str(shared).lower()}", root=synthetic_root, init=tiny_checkpoint)
        assert f"grpo_shared_prefix: {str(shared).lower()}" in (out / "config.yaml").read_text()
        runs[shared] = (losses(out), zero_weights(out / "checkpoint-2"))
    (loss_a, weights_a), (loss_b, weights_b) = runs[False], runs[True]
    assert len(loss_a) == 2 and loss_b == pytest.approx(loss_a, rel=1e-5, abs=1e-6)
    from safetensors.torch import load_file

    start = load_file(str(tiny_checkpoint / "model.safetensors"))
    keys = sorted(k for k in weights_a if k in start)
    assert len(keys) > 0.9 * len(weights_a)
    step_a = torch.cat([(weights_a[k].float() - start[k].float()).flatten() for k in keys])
    step_b = torch.cat([(weights_b[k].float() - start[k].float()).flatten() for k in keys])
    assert step_a.abs().max() > 0  # the runs trained
    # Adam's first steps are about lr x sign(g): where |g| is at float-noise level a sign may flip, elsewhere the
    # updates agree
    cosine = torch.nn.functional.cosine_similarity(step_a, step_b, dim=0).item()
    same = torch.isclose(step_b, step_a, atol=1e-8, rtol=1e-3).float().mean().item()
    assert cosine > 0.999 and same > 0.999, (cosine, same)


def test_distinct_image_processing_gives_the_same_inputs(processor):
    from PIL import Image

    from lens.training.shared_grpo import DistinctImages, distinct_image_processing

    rng = np.random.default_rng(5)
    pics = [Image.fromarray(rng.integers(0, 255, (56 + 28 * i, 84, 3), dtype=np.uint8)) for i in range(2)]
    rows = [{"image_id": f"i{r % 2}", "image": pics[r % 2].copy()} for r in range(6)]  # equal content, new objects
    text = processor.apply_chat_template(build_messages("the red circle"), add_generation_prompt=True, tokenize=False)
    plain = processor(text=[text] * 6, images=[[r["image"]] for r in rows], padding=True, return_tensors="pt")
    calls = []
    inner = processor.image_processor
    with distinct_image_processing(processor, rows):
        assert isinstance(processor.image_processor, DistinctImages)
        assert rows[2]["image"] is rows[0]["image"] and rows[1]["image"] is not rows[0]["image"]
        original = inner.__class__.__call__
        inner.__class__.__call__ = lambda self, images, **k: calls.append(len(images)) or original(self, images, **k)
        try:
            shared = processor(text=[text] * 6, images=[[r["image"]] for r in rows], padding=True, return_tensors="pt")
        finally:
            inner.__class__.__call__ = original
    assert processor.image_processor is inner and calls == [2]  # two distinct images processed, once each
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        torch.testing.assert_close(shared[key], plain[key], rtol=0, atol=0)


# ---------------------------------------------------------------------- every policy family
@pytest.fixture(scope="module", params=["tiny-qwen2-vl", "tiny-qwen3-vl"])
def family_model(request):
    from lens.modeling.presets import build_preset

    model, processor = build_preset(request.param, seed=0)
    return model.eval(), processor


@pytest.mark.parametrize("mode", ["upstream", "mrope"])
def test_shared_equals_unshared_for_every_family(family_model, mode, one_thread):
    """Qwen2-VL and Qwen3-VL (whose deepstack features join the image tokens of the packed prefix) give the
    unshared numbers too: log-probs, query states, masks and gradients; and their stock reference model."""
    from trl.trainer.utils import add_fused_lm_head

    from lens.training.grpo import build_reference_model

    model, processor = family_model
    model = copy.deepcopy(model)
    model.config.query_position_mode = mode
    batch, p, rows, sam = group_batch(processor, prompts=2, g=4, seed=3)
    with torch.no_grad():
        features = model.encode_sam_images(sam)
    (a, b), grads = unshared_and_shared(model, batch, p, rows, features)
    keep = labels_of(batch, p)[:, 1:] != -100
    torch.testing.assert_close(b.log_probs[keep], a.log_probs[keep], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(b.query_states, a.query_states, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(b.mask_logits, a.mask_logits, atol=1e-4, rtol=1e-4)
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("model.visual") for k in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)

    ref = build_reference_model(model)
    add_fused_lm_head(ref)
    c = batch["input_ids"].shape[1] - p
    mm = (batch["input_ids"] == model.config.image_token_id).int()
    with torch.no_grad():
        plain = ref(**batch, labels=labels_of(batch, p), fused_lm_head=True, mm_token_type_ids=mm).log_probs[:, -c:]
        groups = prefix_groups(batch["input_ids"][:, :p], batch["attention_mask"][:, :p], rows)
        shared_lp = shared_reference_log_probs(ref, ref, batch["input_ids"], batch["attention_mask"], c, groups,
                                               batch["pixel_values"], batch["image_grid_thw"], mm)
    torch.testing.assert_close(shared_lp, plain, atol=2e-5, rtol=1e-5)


def test_shared_prefill_generation_equals_plain_for_every_family(family_model, one_thread):
    from lens.modeling.shared_generation import shared_prefill_generate

    model, processor = family_model
    inputs, rows = generation_inputs(processor)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    plain = model.generate(**inputs, **kwargs)
    shared = shared_prefill_generate(model, model.generate, rows, **inputs, **kwargs)
    torch.testing.assert_close(shared, plain, rtol=0, atol=0)

"""LensForConditionalGeneration: shapes, invariants, position ids, shared SAM features, presets."""

from __future__ import annotations

import pytest
import torch
from transformers.initialization import meta_device_safe_creation_ops

from lens.modeling import LensConfig, LensForConditionalGeneration, build_preset
from lens.modeling.presets import load_preset


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_preset("tiny", seed=0)
    return model.eval(), processor


def test_query_forward_shapes(tiny, make_batch):
    model, processor = tiny
    batch, sam, index = make_batch(processor)
    with torch.no_grad():
        out = model(**batch, sam_images=sam, sam_image_index=index)
    b, length = batch["input_ids"].shape
    assert out.logits.shape == (b, length, model.config.text_config.vocab_size)
    assert out.mask_logits.shape == (b, 1, 64, 64)  # 256 / 4
    assert out.iou_scores.shape == (b, 1)
    assert out.query_states.shape == (b, model.config.num_of_query, model.config.text_config.hidden_size)
    assert out.sam_prompt.shape == (b, 1, model.sam.hidden_dim)
    with torch.no_grad():
        kept = model(**batch, sam_images=sam, sam_image_index=index, logits_to_keep=5)
    torch.testing.assert_close(kept.logits, out.logits[:, -5:])


def test_upstream_positions_are_mask_cumsum(tiny):
    model, _ = tiny
    q = model.config.num_of_query
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    ids = torch.zeros_like(mask)
    pos = model.query_position_ids(ids, mask)
    assert pos.shape == (3, 2, 5 + q)
    assert pos[0, 0].tolist() == [1, 1, 0, 1, 2] + list(range(3, 3 + q))
    # a masked slot between completion and queries gets 1, queries continue from the attended count
    assert pos[0, 1].tolist() == [0, 1, 2, 3, 1] + list(range(4, 4 + q))
    assert torch.equal(pos[0], pos[1]) and torch.equal(pos[0], pos[2])


# The appended queries leave the text logits unchanged: tests/test_backbones.py, for every family (this one too).


def test_mrope_and_upstream_positions_differ_on_image_tokens(tiny, make_batch):
    model, processor = tiny
    batch, _, _ = make_batch(processor)
    model.config.query_position_mode = "mrope"
    try:
        mrope = model.query_position_ids(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"])
    finally:
        model.config.query_position_mode = "upstream"
    upstream = model.query_position_ids(batch["input_ids"], batch["attention_mask"])
    length = batch["input_ids"].shape[1]
    img = batch["input_ids"][0] == model.config.image_token_id
    assert not torch.equal(mrope[1, 0, :length][img], upstream[1, 0, :length][img])
    # M-RoPE: along the h axis each merged grid row repeats one index once per column
    rows, cols = (batch["image_grid_thw"][0, 1:] // 2).tolist()
    h = mrope[1, 0, :length][img].view(rows, cols)
    assert (h == h[:, :1]).all() and (h[1:, 0] - h[:-1, 0] == 1).all()


def test_shared_sam_features_equal_per_row_encoding(tiny, make_batch):
    model, processor = tiny
    batch, sam, index = make_batch(processor, n_rows=3, n_images=2)
    with torch.no_grad():
        shared = model(**batch, sam_images=sam, sam_image_index=index)
        per_row = model(**batch, sam_images=sam[index])  # each row encodes its own copy
        feats = model.encode_sam_images(sam)
        cached = model(**batch, sam_features=feats, sam_image_index=index)
    torch.testing.assert_close(shared.mask_logits, per_row.mask_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached.mask_logits, shared.mask_logits)


def test_batched_decoding_equals_one_row_at_a_time(tiny, make_batch):
    model, processor = tiny
    batch, sam, index = make_batch(processor)
    with torch.no_grad():
        full = model(**batch, sam_images=sam, sam_image_index=index)
        for b in range(3):
            one = {k: v[b : b + 1] if k in ("input_ids", "attention_mask") else v for k, v in batch.items()}
            n_img = int(batch["image_grid_thw"][b].prod())
            start = int(batch["image_grid_thw"][:b].prod(-1).sum())
            one["pixel_values"] = batch["pixel_values"][start : start + n_img]
            one["image_grid_thw"] = batch["image_grid_thw"][b : b + 1]
            keep = one["attention_mask"][0].bool()
            one["input_ids"], one["attention_mask"] = one["input_ids"][:, keep], one["attention_mask"][:, keep]
            single = model(**one, sam_images=sam[index[b] : index[b] + 1])
            torch.testing.assert_close(single.mask_logits[0], full.mask_logits[b], atol=1e-4, rtol=1e-4)


def test_gradients_reach_every_trainable_part(tiny, make_batch):
    model, processor = tiny
    batch, sam, index = make_batch(processor)
    model.train()
    model.zero_grad()
    out = model(**batch, sam_images=sam, sam_image_index=index)
    (out.logits.float().logsumexp(-1).mean() + out.mask_logits.float().sigmoid().mean()).backward()
    model.eval()
    for name in ("learnable_query", "conv_1d.weight", "proj_to_sam.2.weight", "connector.blocks.0.attn.qkv.weight",
                 "sam.sam_mask_decoder.output_upscaling.0.weight", "model.visual.blocks.0.mlp.up_proj.weight",
                 "model.language_model.layers.0.mlp.up_proj.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    model.zero_grad()


def test_context_init_is_explicit(tiny):
    model, _ = tiny
    assert 0.015 < model.learnable_query.std().item() < 0.025
    width_std = 0.02 * (2048 / model.config.text_config.hidden_size) ** 0.5  # 0.02 at the 3B width
    assert 0.9 * width_std < model.conv_1d.weight.std().item() < 1.1 * width_std
    assert 0.85 * width_std < model.proj_to_sam[2].weight.std().item() < 1.15 * width_std
    assert torch.count_nonzero(model.conv_1d.bias) == 0
    assert torch.count_nonzero(model.connector.pos_embed) == 0
    assert torch.equal(model.connector.blocks[0].norm1.weight, torch.ones_like(model.connector.blocks[0].norm1.weight))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_presets_are_seeded():
    a, _ = build_preset("tiny", seed=3)
    b, _ = build_preset("tiny", seed=3)
    c, _ = build_preset("tiny", seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    differ = {k for (k, x), y in zip(a.state_dict().items(), c.state_dict().values()) if not torch.equal(x, y)}
    for name in ("learnable_query", "conv_1d.weight", "lm_head.weight", "sam.sam_mask_decoder.iou_token.weight"):
        assert name in differ, name  # the seed reaches the LM, the context module and SAM2


def test_3b_preset_matches_reference_parameter_counts():
    """The real preset builds from configs/models/qwen2.5-vl-3b.yaml with the same class (on meta: no memory)."""
    raw, _ = load_preset("qwen2.5-vl-3b")
    with torch.device("meta"), meta_device_safe_creation_ops():
        model = LensForConditionalGeneration(LensConfig(**raw))
    count = lambda m: sum(p.numel() for p in (m.parameters() if isinstance(m, torch.nn.Module) else [m]))  # noqa: E731
    ctx = {k: count(v) for k, v in model.context_modules.items()}
    assert ctx == {"learnable_query": 131_072, "conv_1d": 268_437_504, "proj_to_sam": 4_720_896, "connector": 201_564_160}
    assert sum(ctx.values()) == 474_853_632  # the released checkpoint's context module total
    assert count(model.sam) == 217_122_770
    assert count(model.sam.image_encoder) == 212_703_280
    assert not hasattr(model.sam, "memory_attention") and not hasattr(model.sam, "memory_encoder")
    assert model.config.text_config.hidden_size == 2048 and model.config.text_config.num_hidden_layers == 36


def test_bad_config_and_inputs(tiny, make_batch):
    model, processor = tiny
    with pytest.raises(ValueError, match="query_position_mode"):
        LensConfig(query_position_mode="bogus")
    with pytest.raises(ValueError, match="sam_variant"):
        build_preset("tiny", sam_variant="sam9_huge")
    with pytest.raises(ValueError, match="unknown model preset"):
        build_preset("qwen7b")
    batch, sam, index = make_batch(processor)
    with pytest.raises(ValueError, match=r"sam_images must be \(N, 3, 256, 256\)"):
        model(**batch, sam_images=sam[:, :, :100, :100], sam_image_index=index)
    with pytest.raises(ValueError, match="sam_image_index"):
        model(**batch, sam_images=sam)  # 2 images for 3 rows and no index


def test_vision_tower_once_per_distinct_image_equals_per_row(tiny, make_batch):
    """Rows sharing an image: one ViT encoding, same outputs and same gradients as encoding every row."""
    model, processor = tiny
    batch, sam, index = make_batch(processor, n_rows=3, n_images=2)  # rows 0 and 2 show image 0
    calls = []
    hook = model.model.visual.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    results = {}
    try:
        for share in (True, False):
            model.zero_grad()
            out = model.forward_with_queries(**batch, sam_images=sam, sam_image_index=index, share_vision=share)
            (out.logits.float().logsumexp(-1).mean() + out.mask_logits.float().sigmoid().mean()).backward()
            grad = model.get_parameter("model.visual.blocks.0.mlp.up_proj.weight").grad.clone()
            results[share] = (out.logits.detach(), out.mask_logits.detach(), grad)
    finally:
        hook.remove()
        model.zero_grad()
    patches = batch["image_grid_thw"].prod(-1)
    assert calls == [int(patches[0] + patches[1]), int(patches.sum())]  # 2 images encoded instead of 3
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["upstream", "mrope"])
def test_image_and_video_pads_sampled_into_a_completion_are_text(tiny, make_batch, mode):
    """A policy can sample <|image_pad|> or <|video_pad|> into its completion (the tiny LoRA stage 2 did): they are
    text there. The query forward runs, and the prompt's positions and the image's slots stay those of the batch
    without them."""
    model, processor = tiny
    batch, sam, index = make_batch(processor)
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"]
    last = mask.sum(1) - 1  # right-padded completions: overwrite two tokens before each row's last one
    rows = torch.arange(ids.shape[0])
    sampled = ids.clone()
    sampled[rows, last - 1] = model.config.image_token_id
    sampled[rows, last - 2] = model.config.video_token_id
    model.config.query_position_mode = mode
    try:
        plain_pos = model.query_position_ids(ids, mask, batch["image_grid_thw"])
        pos = model.query_position_ids(sampled, mask, batch["image_grid_thw"])
        with torch.no_grad():
            out = model(**{**batch, "input_ids": sampled}, sam_images=sam, sam_image_index=index)
    finally:
        model.config.query_position_mode = "upstream"
    assert torch.equal(pos, plain_pos)
    assert torch.equal(model.image_slots(sampled, batch["image_grid_thw"]),
                       model.image_slots(ids, batch["image_grid_thw"]))
    assert out.mask_logits.shape[0] == ids.shape[0] and torch.isfinite(out.mask_logits).all()

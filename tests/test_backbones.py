"""One LENS model over Qwen2-VL, Qwen2.5-VL and Qwen3-VL: the tiny preset of each family through the query forward,
save/load, a base-model start, the box frame, training steps, Segmenter and the evaluation CLI; the real presets'
parameter counts (built on the meta device)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lens.modeling import LensForConditionalGeneration, build_preset, lens_model_class, load_model_and_processor
from lens.modeling.families import box_frame, box_frame_size, family_of, image_factor
from lens.modeling.loading import checkpoint_family

REPO = Path(__file__).resolve().parents[1]
TINY_PRESETS = {"tiny": "qwen2_5_vl", "tiny-qwen2-vl": "qwen2_vl", "tiny-qwen3-vl": "qwen3_vl"}
LENS_PREFIXES = ("learnable_query", "connector", "conv_1d", "proj_to_sam", "sam")


@pytest.fixture(scope="module", params=list(TINY_PRESETS))
def tiny(request):
    model, processor = build_preset(request.param, seed=0)
    return request.param, model.eval(), processor


def query_outputs(model, processor, make_batch):
    batch, sam, index = make_batch(processor)
    with torch.no_grad():
        return model.eval()(**batch, sam_images=sam, sam_image_index=index)


def test_each_preset_builds_its_family(tiny):
    name, model, processor = tiny
    family = family_of(model.config)
    assert family.name == TINY_PRESETS[name] == model.config.lens_family
    assert isinstance(model, family.stock_model) and type(model) is lens_model_class(family)
    assert isinstance(processor, family.processor)
    assert image_factor(processor) == {"qwen3_vl": 32}.get(family.name, 28)  # patch 16 x merge 2, else 14 x 2
    assert box_frame(model.config) == (None if family.name == "qwen2_5_vl" else (1000, 1000))


@pytest.mark.parametrize("mode", ["upstream", "mrope"])
def test_query_forward_leaves_text_logits_unchanged(tiny, make_batch, mode):
    """Queries come after the text: the text logits equal the stock forward's on the same tokens and positions."""
    _, model, processor = tiny
    batch, sam, index = make_batch(processor)
    model.config.query_position_mode = mode
    try:
        with torch.no_grad():
            out = model(**batch, sam_images=sam, sam_image_index=index)
            if mode == "upstream":
                length = batch["input_ids"].shape[1]
                pos = model.query_position_ids(batch["input_ids"], batch["attention_mask"])[:, :, :length]
                ref = model(**batch, position_ids=pos)
            else:  # the family's stock forward computes its own M-RoPE grid positions
                ref = model(**batch, mm_token_type_ids=(batch["input_ids"] == model.config.image_token_id).int())
    finally:
        model.config.query_position_mode = "upstream"
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[valid], ref.logits[valid], atol=1e-5, rtol=1e-5)


def test_qwen3_deepstack_features_reach_the_query_forward(make_batch):
    model, processor = build_preset("tiny-qwen3-vl", seed=0)
    model.eval()
    batch, _, _ = make_batch(processor)
    mask = batch["attention_mask"]
    with torch.no_grad():
        embeds, full_mask, pos, extras = model.query_inputs(batch["input_ids"], mask, batch["pixel_values"],
                                                            batch["image_grid_thw"])
        q = model.config.num_of_query
        slots = batch["input_ids"] == model.config.image_token_id
        assert torch.equal(extras["visual_pos_masks"], torch.cat([slots, torch.zeros_like(slots[:, :q])], 1))
        assert len(extras["deepstack_visual_embeds"]) == len(model.config.vision_config.deepstack_visual_indexes)
        assert all(e.shape == (int(slots.sum()), model.config.text_config.hidden_size)
                   for e in extras["deepstack_visual_embeds"])
        lm = model.model.language_model
        with_ds = lm(inputs_embeds=embeds, attention_mask=full_mask, position_ids=pos, **extras).last_hidden_state
        without = lm(inputs_embeds=embeds, attention_mask=full_mask, position_ids=pos).last_hidden_state
    assert not torch.allclose(with_ds, without)  # deepstack changes the states: dropping it would go unnoticed


def test_shared_sam_features_equal_per_row_encoding(tiny, make_batch):
    _, model, processor = tiny
    batch, sam, index = make_batch(processor, n_rows=3, n_images=2)
    with torch.no_grad():
        shared = model(**batch, sam_images=sam, sam_image_index=index)
        per_row = model(**batch, sam_images=sam[index], share_vision=False)  # each row encodes its own copy
    torch.testing.assert_close(shared.mask_logits, per_row.mask_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.logits, per_row.logits, atol=1e-5, rtol=1e-5)


def test_our_checkpoint_round_trips_through_the_generic_loader(tiny, make_batch, tmp_path):
    name, model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    family = family_of(model.config)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == family.lens_model_type
    assert checkpoint_family(tmp_path) == ("lens", family)
    # the Qwen2.5-VL class loads any family's checkpoint as that family's class
    loaded, info = LensForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(loaded) is type(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    again, proc = load_model_and_processor(tmp_path)
    assert type(proc) is type(processor) and image_factor(proc) == image_factor(processor)
    a, b = query_outputs(model, processor, make_batch), query_outputs(again, proc, make_batch)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.mask_logits, b.mask_logits)


def write_meta_sam_file(config, path: Path, seed: int):
    """A SAM2 checkpoint in Meta's format: {'model': state dict including the video memory modules}."""
    from sam2.build_sam import build_sam2

    from lens.modeling.sam import SAM2_CONFIGS

    torch.manual_seed(seed)
    full = build_sam2(SAM2_CONFIGS[config.sam_variant], device="cpu", apply_postprocessing=False,
                      hydra_overrides_extra=[f"++model.image_size={config.sam_image_size}", *config.sam_overrides])
    torch.save({"model": full.state_dict()}, path)
    return full.state_dict()


def test_stage1_starts_from_a_base_instruct_folder_and_a_sam2_file(tiny, tmp_path):
    """A stock Qwen-VL folder of the family (save_pretrained + processor) + Meta's SAM2 file -> a LENS model."""
    from lens.training.grpo import qwen_config

    _, model, processor = tiny
    family = family_of(model.config)
    stock = family.stock_model(qwen_config(model.config))
    stock.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(LENS_PREFIXES)})
    stock.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    assert checkpoint_family(tmp_path / "base") == ("qwen", family)
    sam_ref = write_meta_sam_file(model.config, tmp_path / "sam2.pt", seed=5)
    cfg = model.config
    lens_fields = dict(num_of_query=cfg.num_of_query, connector_depth=cfg.connector_depth,
                       connector_heads=cfg.connector_heads, sam_variant=cfg.sam_variant,
                       sam_image_size=cfg.sam_image_size, sam_overrides=cfg.sam_overrides,
                       sam_dynamic_multimask=cfg.sam_dynamic_multimask)
    started, info = LensForConditionalGeneration.from_pretrained(
        tmp_path / "base", sam_checkpoint=tmp_path / "sam2.pt", output_loading_info=True, **lens_fields)
    assert type(started) is type(model)
    assert not info["unexpected_keys"] and info["missing_keys"]
    assert all(k.startswith(LENS_PREFIXES) for k in info["missing_keys"])
    ours = started.state_dict()
    for k, v in stock.state_dict().items():
        assert torch.equal(ours[k], v), k  # every language / vision weight came from the base folder
    for k, v in started.sam.state_dict().items():
        assert torch.equal(v, sam_ref[k]), k
    # without a SAM2 file the error names the file of the asked variant and where Meta publishes it
    with pytest.raises(ValueError, match=r"sam_checkpoint='path/to/sam2\.1_hiera_tiny\.pt' \(sam2\.1_hiera_tiny\.pt from "
                       r"the hub repository facebook/sam2\.1-hiera-tiny"):
        LensForConditionalGeneration.from_pretrained(tmp_path / "base", **{**lens_fields, "sam_variant": "sam2.1_hiera_t"})


def test_stock_view_and_reference_model_are_the_familys_stock_class(tiny, make_batch, tmp_path):
    """vLLM's view of the policy and GRPO's reference model: the family's stock class with the policy's weights and
    the policy's stock-forward logits."""
    from lens.training.grpo import build_reference_model
    from lens.training.vllm import save_stock_view

    _, model, processor = tiny
    family = family_of(model.config)
    view = save_stock_view(model, processor, tmp_path / "view")
    stock, info = family.stock_model.from_pretrained(view, output_loading_info=True)
    assert type(stock) is family.stock_model and stock.config.model_type == family.name
    assert stock.config.architectures == [family.stock_architecture]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ref = build_reference_model(model)
    assert type(ref) is family.stock_model
    batch, _, _ = make_batch(processor)
    batch["mm_token_type_ids"] = (batch["input_ids"] == model.config.image_token_id).int()
    with torch.no_grad():
        ours = model(**batch).logits
        torch.testing.assert_close(stock.eval()(**batch).logits, ours, atol=0, rtol=0)
        torch.testing.assert_close(ref(**batch).logits, ours, atol=0, rtol=0)


def test_box_frame_through_data_reward_and_back():
    """Hand-computed: a 100 x 200 (h x w) image, GT box (50, 20)-(150, 80) in original pixels."""
    from lens.data.transforms import box_from_llm_pixels, box_to_llm_pixels, llm_image_size
    from lens.rewards import box_iou

    orig_hw, gt = (100, 200), (50.0, 20.0, 150.0, 80.0)
    q2, _ = build_preset("tiny-qwen2-vl")
    q25, _ = build_preset("tiny")
    # smart_resize: 100 x 200 has 20000 > 12544 pixels: scale by sqrt(20000 / 12544) = 1.263, floor to 28:
    # floor(100 / 1.263 / 28) = 2 -> 56, floor(200 / 1.263 / 28) = 5 -> 140
    llm_hw = llm_image_size(*orig_hw, 3136, 12544)
    assert llm_hw == (56, 140)
    # Qwen2-VL: 0-1000 of the image: x / 200 * 1000, y / 100 * 1000
    frame = box_frame_size(q2.config, llm_hw)
    assert frame == (1000, 1000) and box_to_llm_pixels(gt, orig_hw, frame) == [250, 200, 750, 800]
    # an answer covering the top half of the GT: IoU = (500 x 300) / (500 x 600) = 0.5, reward IoU^2 = 0.25
    answer = "<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(250,200),(750,500)<|box_end|>"
    assert box_iou([None], [answer], box_llm=[[250, 200, 750, 800]]) == [pytest.approx(0.25)]
    assert box_from_llm_pixels([250, 200, 750, 500], frame, orig_hw) == [50.0, 20.0, 150.0, 50.0]
    # Qwen2.5-VL: pixels of the 56 x 140 LLM image: x * 140 / 200, y * 56 / 100 (11.2 -> 11, 44.8 -> 45)
    frame = box_frame_size(q25.config, llm_hw)
    assert frame == (56, 140) and box_to_llm_pixels(gt, orig_hw, frame) == [35, 11, 105, 45]


def test_dataset_items_follow_the_model(synthetic_root):
    from lens.data.dataset import GroundingDataset
    from lens.data.registry import load_source

    refs = load_source("refcoco:train", synthetic_root)[:4]
    for name in TINY_PRESETS:
        model, processor = build_preset(name)
        ds = GroundingDataset(refs, max_pixels=12544, sam_size=64, image_factor=image_factor(processor),
                              box_frame=box_frame(model.config))
        for item in ds:
            (h, w), (lh, lw) = item["orig_hw"], item["llm_hw"]
            assert lh % image_factor(processor) == 0 and lw % image_factor(processor) == 0
            frame = item["box_hw"]
            assert frame == box_frame_size(model.config, (lh, lw))
            x1, y1, x2, y2 = item["box"]
            assert item["box_llm"] == [round(x1 * frame[1] / w), round(y1 * frame[0] / h),
                                       round(x2 * frame[1] / w), round(y2 * frame[0] / h)]
            # the processor keeps the LLM image's size (no second resize): its patch grid covers it exactly
            grid = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[item["image"]],
                             return_tensors="pt")["image_grid_thw"][0]
            patch = processor.image_processor.patch_size
            assert (int(grid[1]) * patch, int(grid[2]) * patch) == (lh, lw)


@pytest.mark.parametrize("recipe_name", ["lens2b_stage1", "lens2b_stage2", "qwen3vl4b_stage1", "qwen3vl4b_stage2"])
def test_tiny_twin_recipe_trains_one_step(recipe_name, synthetic_root, tmp_path):
    from lens.training.recipe import build_trainer, load_recipe

    recipe = load_recipe(REPO / "configs" / "recipes" / "tiny" / f"{recipe_name}.yaml", [
        f"data.root={synthetic_root}", f"train.output_dir={tmp_path}", "train.max_steps=1", "train.report_to=none",
        "train.disable_tqdm=true"])
    real = load_recipe(REPO / "configs" / "recipes" / f"{recipe_name}.yaml")
    assert recipe["stage"] == real["stage"] and recipe.get("rewards") == real.get("rewards")
    assert recipe["data"].get("answer_style") == real["data"].get("answer_style")
    trainer = build_trainer(recipe)
    assert family_of(trainer.model.config).name == ("qwen2_vl" if recipe_name.startswith("lens2b") else "qwen3_vl")
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    trainer.train()
    assert trainer.state.global_step == 1
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(np.isfinite(losses))
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(v, after[k]) for k, v in before.items() if k.startswith("conv_1d"))


@pytest.mark.parametrize("name", list(TINY_PRESETS))
def test_segmenter_and_evaluation_cli(name, synthetic_root, tmp_path):
    from lens.evaluation.__main__ import main
    from lens.inference import Segmenter

    seg = Segmenter.from_pretrained(name, max_new_tokens=6)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 150, 3), dtype=np.uint8))
    pred = seg(image, "the red circle")
    assert pred.mask.shape == (90, 150) and np.isfinite(pred.score)
    out = tmp_path / "eval"
    assert main(["--model", name, "--config", str(REPO / "configs/eval/synthetic.yaml"), "--limit", "4",
                 "--benchmarks", "refcoco_val", "--data-root", str(synthetic_root), "--out", str(out),
                 "--max-new-tokens", "6", "--save-overlays", "0"]) == 0
    assert (out / "refcoco_val.limit4.json").is_file()
    files = sorted(out.glob("refcoco_val*.predictions.jsonl"))
    records = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert len(records) == 4
    frame = box_frame(seg.model.config)  # boxes are recorded in the model's frame
    assert all(frame is None or tuple(r["llm_hw"]) == frame for r in records)


# Measured on the meta device (no memory): context module, language model (embeddings, layers, norm and an untied
# LM head), vision tower, SAM2 and the whole model.
REAL_COUNTS = {
    "qwen2-vl-2b": dict(context=267_273_472, language_model=1_543_714_304, vision=665_271_296, sam=217_122_770,
                        total=2_693_381_842),
    "qwen2.5-vl-3b": dict(context=474_853_632, language_model=3_085_938_688, vision=668_684_288, sam=217_122_770,
                          total=4_446_599_378),
    "qwen2.5-vl-7b": dict(context=1_453_061_376, language_model=7_615_616_512, vision=676_550_144, sam=217_122_770,
                          total=9_962_350_802),
    "qwen3-vl-4b": dict(context=741_678_336, language_model=4_022_468_096, vision=415_347_712, sam=217_122_770,
                        total=5_396_616_914),
}


@pytest.mark.parametrize("name", list(REAL_COUNTS))
def test_real_preset_parameter_counts(name):
    from lens.modeling.presets import meta_preset, parameter_counts

    model = meta_preset(name)
    assert all(p.is_meta for p in model.parameters())
    got = parameter_counts(model)
    assert got == REAL_COUNTS[name]
    # the parts are disjoint and cover the model (nothing else holds parameters)
    assert got["total"] == got["context"] + got["language_model"] + got["vision"] + got["sam"]
    assert family_of(model.config).name == {"qwen2-vl-2b": "qwen2_vl", "qwen3-vl-4b": "qwen3_vl"}.get(name, "qwen2_5_vl")


def test_bad_family_inputs_name_the_problem(tmp_path):
    from lens.modeling import save_released_layout
    from lens.modeling.config import lens_config

    with pytest.raises(ValueError, match=r"unknown policy family 'qwen4_vl'; expected one of \('qwen2_vl', "):
        lens_config({"backbone": "qwen4_vl"})
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text(json.dumps({"model_type": "llava", "architectures": ["Llava"]}))
    (tmp_path / "llava" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"model_type='llava'.*neither a LENS checkpoint nor a base Qwen2-VL"):
        checkpoint_family(tmp_path / "llava")
    model, _ = build_preset("tiny-qwen2-vl")
    with pytest.raises(ValueError, match="released LENS layout holds Qwen2.5-VL policies only, not qwen2_vl"):
        save_released_layout(model, tmp_path / "released")

"""Checkpoint loading: our round trip, the released 4.51 layout, base Qwen + Meta's SAM2 file, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen2_5_VLForConditionalGeneration

from lens.modeling import LensForConditionalGeneration, build_preset, load_model_and_processor, save_released_layout
from lens.modeling.loading import released_config_dict, released_state_dict
from lens.modeling.sam import SAM2_CONFIGS

TINY_SAM = {}


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_preset("tiny", seed=1)
    TINY_SAM.update(sam_variant=model.config.sam_variant, sam_image_size=model.config.sam_image_size,
                    sam_overrides=model.config.sam_overrides, connector_depth=model.config.connector_depth,
                    connector_heads=model.config.connector_heads,
                    sam_dynamic_multimask=model.config.sam_dynamic_multimask)
    return model.eval(), processor


def outputs(model, processor, make_batch):
    batch, sam, index = make_batch(processor)
    with torch.no_grad():
        return model.eval()(**batch, sam_images=sam, sam_image_index=index)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_own_checkpoint_round_trip(tiny, make_batch, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, proc = load_model_and_processor(tmp_path)
    assert_same_weights(model, loaded)
    a, b = outputs(model, processor, make_batch), outputs(loaded, proc, make_batch)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.mask_logits, b.mask_logits)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "lens"


def test_released_layout_loads_with_no_missing_or_unexpected_keys(tiny, make_batch, tmp_path):
    model, processor = tiny
    save_released_layout(model, tmp_path, processor)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["SAMR1ForConditionalGeneration_qwen2p5"] and cfg["model_type"] == "qwen2_vl"
    assert cfg["num_of_query"] == model.config.num_of_query and cfg["if_use_qwen_connector"] is True
    assert "hidden_size" in cfg and "text_config" not in cfg  # flat 4.51 layout
    keys = set(released_state_dict(model))
    assert {"learnable_query", "conv_1d.weight", "connector.pos_embed", "proj_to_sam.0.weight", "sam.no_mem_embed"} <= keys
    assert any(k.startswith("model.layers.0.") for k in keys) and any(k.startswith("visual.blocks.0.") for k in keys)
    assert not any(k.startswith("model.language_model") or k.startswith("model.visual") for k in keys)

    loaded, info = LensForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True, **TINY_SAM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.config.query_position_mode == "upstream"
    assert_same_weights(model, loaded)
    a, b = outputs(model, processor, make_batch), outputs(loaded, processor, make_batch)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.mask_logits, b.mask_logits)


def write_base_qwen(model, path):
    """A base Qwen2.5-VL-Instruct folder as the hub ships it: 4.x key layout, no LENS keys."""
    qwen = {k: v for k, v in released_state_dict(model).items() if k.startswith(("model.", "visual.", "lm_head"))}
    cfg = released_config_dict(model.config)
    for k in ("num_of_query", "if_use_qwen_connector", "if_include_sam"):
        cfg.pop(k)
    cfg.update(model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"])
    path.mkdir()
    save_file(qwen, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg))


def write_meta_sam_file(path, seed: int):
    """A SAM2 checkpoint in Meta's format: {'model': state dict including the video memory modules}."""
    from sam2.build_sam import build_sam2

    torch.manual_seed(seed)
    full = build_sam2(SAM2_CONFIGS[TINY_SAM["sam_variant"]], device="cpu", apply_postprocessing=False,
                      hydra_overrides_extra=[f"++model.image_size={TINY_SAM['sam_image_size']}", *TINY_SAM["sam_overrides"]])
    assert any(k.startswith("memory_attention.") for k in full.state_dict())
    torch.save({"model": full.state_dict()}, path)
    return full


def test_base_qwen_plus_sam2_file(tiny, tmp_path):
    model, _ = tiny
    write_base_qwen(model, tmp_path / "qwen")
    full = write_meta_sam_file(tmp_path / "sam2.pt", seed=7)
    lens_model, info = LensForConditionalGeneration.from_pretrained(
        tmp_path / "qwen", sam_checkpoint=tmp_path / "sam2.pt", output_loading_info=True, num_of_query=8, **TINY_SAM
    )
    assert not info["unexpected_keys"]
    assert all(k.split(".")[0] in ("learnable_query", "connector", "conv_1d", "proj_to_sam", "sam") for k in info["missing_keys"])
    ours, theirs = lens_model.state_dict(), model.state_dict()
    for k in ours:
        if k.startswith("model."):
            assert torch.equal(ours[k], theirs[k]), k  # Qwen weights came from the 4.x layout
    sam_ref = full.state_dict()
    for k, v in lens_model.sam.state_dict().items():
        assert torch.equal(v, sam_ref[k]), k
    # the context module is initialised explicitly (upstream's init silently did nothing)
    assert 0.015 < lens_model.learnable_query.std().item() < 0.025
    assert torch.count_nonzero(lens_model.connector.pos_embed) == 0
    assert all(torch.isfinite(p).all() for p in lens_model.parameters())


def test_base_qwen_without_sam_file_is_an_error(tiny, tmp_path):
    model, _ = tiny
    write_base_qwen(model, tmp_path / "qwen")
    with pytest.raises(ValueError, match="sam_checkpoint=.*sam2_hiera_large.pt"):
        LensForConditionalGeneration.from_pretrained(tmp_path / "qwen", **TINY_SAM)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt not found.*facebook/sam2-hiera-t"):
        LensForConditionalGeneration.from_pretrained(tmp_path / "qwen", sam_checkpoint=tmp_path / "missing.pt", **TINY_SAM)


def test_wrong_sam_file_is_an_error(tiny, tmp_path):
    model, _ = tiny
    write_base_qwen(model, tmp_path / "qwen")
    torch.save({"model": {"image_encoder.bogus": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not match sam_variant"):
        LensForConditionalGeneration.from_pretrained(tmp_path / "qwen", sam_checkpoint=tmp_path / "bad.pt", **TINY_SAM)


def test_missing_or_incomplete_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist.*OuyBin/LENS"):
        load_model_and_processor(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config.json is missing"):
        load_model_and_processor(tmp_path / "empty")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text(json.dumps({"model_type": "lens"}))
    with pytest.raises(FileNotFoundError, match=r"partial has a config.json but no weights"):
        load_model_and_processor(tmp_path / "partial")


def test_checkpoint_without_processor_is_an_error(tiny, tmp_path):
    model, _ = tiny
    model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no processor files"):
        load_model_and_processor(tmp_path)


def test_stock_class_still_loads_our_language_model(tiny, make_batch, tmp_path):
    """Our checkpoints stay readable by plain transformers (extra LENS keys are ignored)."""
    model, processor = tiny
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "qwen2_5_vl"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    stock = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(stock.lm_head.weight, model.lm_head.weight)
    theirs = stock.state_dict()
    ours = model.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in theirs.items())  # every language/vision weight, not just the head
    batch, _, _ = make_batch(processor)
    mm = (batch["input_ids"] == model.config.image_token_id).int()
    with torch.no_grad():
        torch.testing.assert_close(stock(**batch, mm_token_type_ids=mm).logits, model(**batch, mm_token_type_ids=mm).logits)


def test_hub_ids_are_downloaded_and_cached(tiny, tmp_path, monkeypatch):
    """`org/name` that is not a local folder goes through huggingface_hub.snapshot_download."""
    import huggingface_hub

    model, processor = tiny
    model.save_pretrained(tmp_path / "snap")
    processor.save_pretrained(tmp_path / "snap")
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id: asked.append(repo_id) or str(tmp_path / "snap"))
    loaded, _ = load_model_and_processor("OuyBin/LENS-test")
    assert asked == ["OuyBin/LENS-test"]
    assert_same_weights(model, loaded)

    def offline(repo_id):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a downloadable hub repository"):
        load_model_and_processor("OuyBin/LENS-missing")

"""SAM2.1 next to SAM2.0: every variant builds (real sizes on the meta device, parameter counts pinned), Meta's
checkpoint files of both families load (or fail naming the variant the file looks like), and a preset field or a
recipe line switches a LENS model to SAM2.1, which then runs, trains and round-trips like the SAM2.0 one."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch
from transformers.initialization import meta_device_safe_creation_ops

from lens.config import ConfigError
from lens.modeling import LensForConditionalGeneration, build_preset
from lens.modeling.presets import load_preset
from lens.modeling.sam import (
    DELETED,
    SAM2_CHECKPOINT_FILES,
    SAM2_CONFIGS,
    SAM21_MEMORY_ONLY,
    build_sam,
    load_sam_checkpoint,
    matching_variants,
)
from lens.training.config import SAM_VARIANTS
from lens.training.recipe import load_policy, run
from lens.training.trainable import group_of, set_trainable

SIZES = ("t", "s", "b+", "l")
# measured (build_sam on the meta device); sam2_hiera_l as the reference: 217,122,770 kept, image encoder
# 212,703,280, mask decoder 4,215,109 (conv_s0/conv_s1 included), prompt encoder 6,220
KEPT = {
    "t": {"image_encoder": 27_219_136, "sam_prompt_encoder": 6_220, "sam_mask_decoder": 4_215_109, "rest": 198_161},
    "s": {"image_encoder": 34_316_992, "sam_prompt_encoder": 6_220, "sam_mask_decoder": 4_215_109, "rest": 198_161},
    "b+": {"image_encoder": 69_106_816, "sam_prompt_encoder": 6_220, "sam_mask_decoder": 4_215_109, "rest": 198_161},
    "l": {"image_encoder": 212_703_280, "sam_prompt_encoder": 6_220, "sam_mask_decoder": 4_215_109, "rest": 198_161},
}
KEPT_TOTAL = {"t": 31_638_626, "s": 38_736_482, "b+": 73_526_306, "l": 217_122_770}
# deleted: memory_attention 5,922,304 + memory_encoder 1,384,608 + maskmem_tpos_enc 448 (both families), and SAM2.1's
# no_obj_embed_spatial (1 x 64) + obj_ptr_tpos_proj (Linear 256 -> 64: 16,448)
DELETED_20, DELETED_21 = 7_307_360, 7_307_360 + 64 + 16_448
# the config keys in which the packaged sam2.1 configs differ from the sam2 ones: all of the video-memory path
SAM21_CONFIG_CHANGES = {"no_obj_embed_spatial", "add_tpos_enc_to_obj_ptrs", "proj_tpos_enc_in_obj_ptrs",
                        "use_signed_tpos_enc_to_obj_ptrs"}


def on_meta(variant: str, image_only: bool = True):
    with torch.device("meta"), meta_device_safe_creation_ops():
        return build_sam(variant, image_only=image_only)


def counts(sam) -> dict[str, int]:
    out = Counter()
    for name, param in sam.named_parameters():
        top = name.split(".")[0]
        out[top if top in ("image_encoder", "sam_prompt_encoder", "sam_mask_decoder") else "rest"] += param.numel()
    return dict(out)


def total(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------- every variant, real sizes (meta device)
def test_the_recipe_schema_knows_the_same_variants():
    assert SAM_VARIANTS == tuple(SAM2_CONFIGS) and set(SAM2_CHECKPOINT_FILES) == set(SAM2_CONFIGS)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("family", ("sam2", "sam2.1"))
def test_every_variant_builds_with_the_pinned_parameter_counts(family, size):
    variant = f"{family}_hiera_{size}"
    sam, full = on_meta(variant), on_meta(variant, image_only=False)
    assert counts(sam) == KEPT[size] and total(sam) == KEPT_TOTAL[size]
    assert total(full) - total(sam) == (DELETED_21 if family == "sam2.1" else DELETED_20)
    assert not any(hasattr(sam, name) for name in DELETED)
    # what stays outside the three SAM groups never trains: no trainable parameter that no loss reaches
    assert all(group_of(f"sam.{n}") is None for n, _ in sam.named_parameters()
               if not n.startswith(("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.")))


@pytest.mark.parametrize("size", SIZES)
def test_sam21_differs_from_sam2_only_in_the_video_memory_path(size):
    import sam2  # noqa: F401  (registers the packaged configs)
    from hydra import compose

    old, new = (compose(config_name=SAM2_CONFIGS[f"{f}_hiera_{size}"]).model for f in ("sam2", "sam2.1"))
    changed = {k for k in set(old) | set(new) if old.get(k) != new.get(k)}
    assert changed == SAM21_CONFIG_CHANGES  # image encoder, prompt encoder, mask decoder settings: the same
    full_old, full_new = (dict(on_meta(f"{f}_hiera_{size}", image_only=False).named_parameters()) for f in ("sam2", "sam2.1"))
    assert set(full_new) - set(full_old) == {"no_obj_embed_spatial", "obj_ptr_tpos_proj.weight", "obj_ptr_tpos_proj.bias"}
    kept_old, kept_new = (on_meta(f"{f}_hiera_{size}").state_dict() for f in ("sam2", "sam2.1"))
    assert {k: v.shape for k, v in kept_old.items()} == {k: v.shape for k, v in kept_new.items()}


@pytest.mark.parametrize("variant", list(SAM2_CONFIGS))
def test_a_meta_file_names_its_variant(variant):
    """Meta's files hold the memory weights too: family and size tell each variant apart."""
    assert matching_variants(on_meta(variant, image_only=False).state_dict()) == [variant]
    size = variant.rsplit("_", 1)[1]
    assert matching_variants(on_meta(variant).state_dict()) == [f"sam2_hiera_{size}", f"sam2.1_hiera_{size}"]


# ---------------------------------------------------------------------- Meta's file format, tiny sizes
TINY = load_preset("tiny")[0]
SMALL = {"image_size": TINY["sam_image_size"], "overrides": TINY["sam_overrides"]}


def meta_file(path, variant: str, seed: int):
    """`{'model': state dict with every memory weight}` of a full SAM2Base, as Meta ships it."""
    torch.manual_seed(seed)
    full = build_sam(variant, SMALL["image_size"], SMALL["overrides"], image_only=False)
    assert any(k.startswith("memory_attention.") for k in full.state_dict())
    torch.save({"model": full.state_dict()}, path)
    return full.state_dict()


@pytest.mark.parametrize("variant", ["sam2.1_hiera_t", "sam2.1_hiera_b+", "sam2_hiera_t"])
def test_meta_files_load_into_sam(tmp_path, variant):
    ref = meta_file(tmp_path / "sam.pt", variant, seed=5)
    sam = build_sam(variant, SMALL["image_size"], SMALL["overrides"])
    load_sam_checkpoint(sam, tmp_path / "sam.pt", variant)
    ours = sam.state_dict()
    assert ours and all(torch.equal(v, ref[k]) for k, v in ours.items())
    assert set(ref) - set(ours) and all(k.split(".")[0] in DELETED for k in set(ref) - set(ours))
    if variant.startswith("sam2.1"):
        assert {k.split(".")[0] for k in set(ref) - set(ours)} >= set(SAM21_MEMORY_ONLY)


def test_a_file_of_the_other_family_or_size_names_what_it_looks_like(tmp_path):
    meta_file(tmp_path / "sam2_t.pt", "sam2_hiera_t", seed=1)
    meta_file(tmp_path / "sam21_t.pt", "sam2.1_hiera_t", seed=1)
    meta_file(tmp_path / "sam21_bplus.pt", "sam2.1_hiera_b+", seed=1)
    sam21 = build_sam("sam2.1_hiera_t", SMALL["image_size"], SMALL["overrides"])
    before = {k: v.clone() for k, v in sam21.state_dict().items()}
    # the tiny overrides shrink t, s and l to the same shapes (b+ keeps a 14x14 window position embedding)
    with pytest.raises(ValueError, match=r"sam_variant='sam2.1_hiera_t' \(SAM2.1\): the file looks like sam2_hiera_t or "
                                         r"sam2_hiera_s or sam2_hiera_l .*It is a SAM2.0 file"):
        load_sam_checkpoint(sam21, tmp_path / "sam2_t.pt", "sam2.1_hiera_t")
    with pytest.raises(ValueError, match=r"looks like sam2.1_hiera_b\+\. .*1 of another shape .*trunk.pos_embed"):
        load_sam_checkpoint(sam21, tmp_path / "sam21_bplus.pt", "sam2.1_hiera_t")
    assert all(torch.equal(v, before[k]) for k, v in sam21.state_dict().items())  # nothing loaded on an error
    sam20 = build_sam("sam2_hiera_t", SMALL["image_size"], SMALL["overrides"])
    with pytest.raises(ValueError, match=r"looks like sam2.1_hiera_t or .*It is a SAM2.1 file.*sam2_hiera_tiny\.pt"):
        load_sam_checkpoint(sam20, tmp_path / "sam21_t.pt", "sam2_hiera_t")
    with pytest.raises(FileNotFoundError, match=r"sam2.1_hiera_large\.pt from the hub repository facebook/sam2\.1-hiera-large"):
        load_sam_checkpoint(sam21, tmp_path / "nowhere.pt", "sam2.1_hiera_l")


# ---------------------------------------------------------------------- a tiny LENS on SAM2.1
@pytest.fixture(scope="module")
def tiny21():
    model, processor = build_preset("tiny", seed=2, sam_variant="sam2.1_hiera_t")
    return model, processor


@pytest.fixture(scope="module")
def tiny21_checkpoint(tiny21, tmp_path_factory):
    model, processor = tiny21
    path = tmp_path_factory.mktemp("tiny21")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_the_tiny_preset_switches_to_sam21(tiny21, make_batch):
    model, processor = tiny21
    tiny20, _ = build_preset("tiny", seed=2)
    assert model.config.sam_variant == "sam2.1_hiera_t" and model.config.sam_overrides == TINY["sam_overrides"]
    assert total(model.sam) == total(tiny20.sam) and not any(hasattr(model.sam, n) for n in DELETED)
    batch, sam, index = make_batch(processor)
    set_trainable(model, "warmup")  # everything that trains in any stage
    model.zero_grad()
    out = model.train()(**batch, sam_images=sam, sam_image_index=index)
    side = model.config.sam_image_size // 4
    assert out.mask_logits.shape == (3, 1, side, side) and torch.isfinite(out.mask_logits).all()
    (out.logits.float().logsumexp(-1).mean() + out.mask_logits.float().sigmoid().mean()).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused[:5]  # DDP / ZeRO-3: every trainable parameter takes part
    model.zero_grad()


@pytest.mark.parametrize("preset", ["tiny-qwen2-vl", "tiny-qwen3-vl"])
def test_every_policy_family_takes_sam21(preset, make_batch):
    """The SAM side is one code path whatever the policy: the other families' tiny presets switch too."""
    model, processor = build_preset(preset, seed=0, sam_variant="sam2.1_hiera_t")
    assert model.config.sam_variant == "sam2.1_hiera_t" and not any(hasattr(model.sam, n) for n in DELETED)
    batch, sam, index = make_batch(processor)
    with torch.no_grad():
        out = model.eval()(**batch, sam_images=sam, sam_image_index=index)
    side = model.config.sam_image_size // 4
    assert out.mask_logits.shape == (3, 1, side, side) and torch.isfinite(out.mask_logits).all()


def test_sam21_checkpoint_round_trip(tiny21, tiny21_checkpoint, make_batch):
    model, processor = tiny21
    loaded, info = LensForConditionalGeneration.from_pretrained(tiny21_checkpoint, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.config.sam_variant == "sam2.1_hiera_t"
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    batch, sam, index = make_batch(processor)
    with torch.no_grad():
        a, b = (m.eval()(**batch, sam_images=sam, sam_image_index=index) for m in (model, loaded))
    torch.testing.assert_close(a.mask_logits, b.mask_logits)


def test_one_stage1_step_on_sam21(tiny_recipe, tiny21_checkpoint, tmp_path):
    final = run(tiny_recipe("stage1", "train.max_steps=1", init=tiny21_checkpoint))
    assert json.loads((final / "config.json").read_text())["sam_variant"] == "sam2.1_hiera_t"
    logs = json.loads((final / "trainer_state.json").read_text())["log_history"]
    assert any("loss" in row and torch.isfinite(torch.tensor(row["loss"])) for row in logs)


def test_one_stage2_step_on_sam21(tiny_recipe, tiny21_checkpoint):
    from safetensors.torch import load_file

    final = run(tiny_recipe("stage2", "train.max_steps=1", "grpo.max_completion_length=12", init=tiny21_checkpoint))
    before, after = load_file(tiny21_checkpoint / "model.safetensors"), load_file(final / "model.safetensors")
    assert set(before) == set(after)  # no SAM2.1 memory weight appears (or goes) in training
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("sam.sam_mask_decoder.") for k in changed)  # the decoder learns in stage 2
    assert not any(k.startswith("sam.image_encoder.") for k in changed)


# ---------------------------------------------------------------------- the recipe line
def test_a_recipe_line_switches_the_sam_variant(tiny_recipe, tmp_path):
    assert tiny_recipe("stage1", "model.sam_variant=sam2.1_hiera_l")["model"]["sam_variant"] == "sam2.1_hiera_l"
    with pytest.raises(ConfigError, match=r"model\.sam_variant='sam2\.1_hiera_L'; expected one of sam2_hiera_t, .*"
                                          r"sam2\.1_hiera_l"):
        tiny_recipe("stage1", "model.sam_variant=sam2.1_hiera_L")
    model, _ = load_policy({"init": "preset:tiny", "sam_variant": "sam2.1_hiera_t"}, seed=0)
    assert model.config.sam_variant == "sam2.1_hiera_t" and not hasattr(model.sam, "obj_ptr_tpos_proj")
    # a preset with Meta's file: the file's weights in the preset's SAM (of the wrong family: the loader's error)
    ref = meta_file(tmp_path / "sam21.pt", "sam2.1_hiera_t", seed=4)
    model, _ = load_policy({"init": "preset:tiny", "sam_variant": "sam2.1_hiera_t",
                            "sam_checkpoint": str(tmp_path / "sam21.pt")}, seed=0)
    assert all(torch.equal(v, ref[k]) for k, v in model.sam.state_dict().items())
    with pytest.raises(ValueError, match=r"sam_variant='sam2_hiera_t' \(SAM2.0\): the file looks like sam2.1_hiera_t"):
        load_policy({"init": "preset:tiny", "sam_checkpoint": str(tmp_path / "sam21.pt")}, seed=0)


@pytest.mark.parametrize("variant", ["sam2.1_hiera_t", "sam2.1_hiera_b+"])
def test_another_variant_on_a_checkpoint_swaps_in_a_fresh_sam(tiny_checkpoint, tmp_path, variant):
    """A SAM2.0 LENS checkpoint + `model.sam_variant` + Meta's file of that variant: its SAM is replaced by the
    file's (b+: other shapes under the tiny overrides, which load as mismatched and are replaced)."""
    ref = meta_file(tmp_path / "sam.pt", variant, seed=9)
    cfg = {"init": str(tiny_checkpoint), "sam_variant": variant}
    with pytest.raises(ValueError, match=rf"model.sam_variant='{re.escape(variant)}'.* holds a sam2_hiera_t SAM: set "
                                         r"model.sam_checkpoint"):
        load_policy(cfg, seed=0)
    model, _ = load_policy({**cfg, "sam_checkpoint": str(tmp_path / "sam.pt")}, seed=0)
    assert model.config.sam_variant == variant
    assert all(torch.equal(v, ref[k]) for k, v in model.sam.state_dict().items())
    saved = LensForConditionalGeneration.from_pretrained(tiny_checkpoint)
    ours, theirs = model.state_dict(), saved.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.startswith("sam."))  # the rest is the checkpoint's

"""16-bit lanes without autocast: a bf16/fp16 model segments, evaluates, demos and trains (one step of each stage),
with finite outputs close to the fp32 model's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lens import Segmenter
from lens.modeling import build_preset
from lens.training.recipe import build_trainer, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "recipes" / "tiny"


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (120, 160, 3), dtype=np.uint8))


def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(correlation, share of equal signs) of two logit maps."""
    a, b = a.float().flatten(), b.float().flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1]), float(((a > 0) == (b > 0)).float().mean())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_segmenter_in_16_bit_is_finite_and_close_to_fp32(dtype):
    images, prompts, answers = [image(0), image(0), image(1)], ["the red cup", "the dog", "a car"], ["red cup", "dog", "car"]
    outs = {}
    for dt in (torch.float32, dtype):
        model, processor = build_preset("tiny", seed=0, dtype=dt)
        assert model.sam.no_mem_embed.dtype == dt and model.learnable_query.dtype == dt  # no autocast anywhere
        outs[dt] = Segmenter(model, processor).run_batch(images, prompts, answers=answers, image_keys=[0, 0, 1])
    low, ref = outs[dtype], outs[torch.float32]
    assert torch.isfinite(low.mask_logits).all() and torch.isfinite(low.scores).all()
    corr, signs = agreement(low.mask_logits, ref.mask_logits)
    assert corr > 0.9 and signs > 0.9, (corr, signs)


def test_segmenter_generates_in_bf16():
    model, processor = build_preset("tiny", seed=0, dtype=torch.bfloat16)
    pred = Segmenter(model, processor, max_new_tokens=6)(image(2), "the red cup")
    assert pred.mask.shape == (120, 160) and np.isfinite(pred.score)


def test_eval_in_bf16_completes_with_finite_metrics(synthetic_root, tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "lens.evaluation", "--model", "tiny", "--data-root", str(synthetic_root),
           "--benchmarks", "refcoco_val", "reasonseg_val", "--dtype", "bfloat16", "--limit", "8", "--out", str(out),
           "--max-new-tokens", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    splits = json.loads((out / "results.limit8.json").read_text())["splits"]
    for name in ("refcoco_val", "reasonseg_val"):
        assert splits[name]["n"] == 8
        assert all(np.isfinite(splits[name][k]) and 0 <= splits[name][k] <= 1 for k in ("ciou", "giou"))


def test_demo_in_bf16_writes_an_overlay(tmp_path):
    src, out = tmp_path / "scene.png", tmp_path / "overlay.png"
    image(3).save(src)
    proc = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--image", str(src), "--prompt", "the dog",
                           "--out", str(out), "--dtype", "bfloat16"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Image.open(out).size == (160, 120)


def first_loss(stage: str, root: Path, init: Path, out: Path, dtype: str, *extra: str) -> float:
    bf16 = dtype != "float32"
    recipe = load_recipe(RECIPES / f"{stage}.yaml", [
        f"data.root={root}", f"model.init={init}", f"train.output_dir={out}", "train.report_to=none",
        "train.max_steps=1", "train.save_steps=1000", "train.logging_steps=1", "train.disable_tqdm=true",
        f"model.dtype={dtype}", f"train.bf16={str(bf16).lower()}", "train.warmup_steps=0", *extra])
    torch.manual_seed(0)
    trainer = build_trainer(recipe)
    before = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    if bf16:  # fp32 master weights for what trains; the rest of the model stays bf16
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)
        assert trainer.model.sam.image_encoder.trunk.patch_embed.proj.weight.dtype == torch.bfloat16
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(p.float(), before[n])]
    assert changed, "the optimizer step changed nothing"
    return next(h["loss"] for h in trainer.state.log_history if "loss" in h)


@pytest.mark.parametrize("stage,extra", [
    ("stage1", ("train.per_device_train_batch_size=4", "cache_sam_features=false")),
    ("stage2", ("train.per_device_train_batch_size=4", "grpo.num_generations=2", "grpo.max_completion_length=6",
                "grpo.temperature=0.0001")),
])
def test_one_step_in_bf16_is_finite_and_close_to_fp32(stage, extra, synthetic_root, tiny_checkpoint, tmp_path):
    ref = first_loss(stage, synthetic_root, tiny_checkpoint, tmp_path / "fp32", "float32", *extra)
    low = first_loss(stage, synthetic_root, tiny_checkpoint, tmp_path / "bf16", "bfloat16", *extra)
    assert np.isfinite(low) and low == pytest.approx(ref, rel=0.05, abs=0.02), (low, ref)

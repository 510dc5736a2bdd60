"""Every fast path gives the reference flow's numbers (CPU, tiny preset).

The reference flow does what the original does: SAM2 encodes the image once per rollout or expression, the
mask decoder runs in a per-sample loop, and the GRPO policy log-probs and masks come from separate forwards.
`tools/benchmark.py` times both flows (the reference flow is its `ReferenceFlowTrainer`, a subclass of the product
trainer); these tests prove that the speed costs nothing in the numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lens.modeling import LensForConditionalGeneration
from lens.modeling.sam import SamFeatures, decode_masks, decode_masks_per_sample
from lens.training.grpo import LensGRPOTrainer, lens_module

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from tools.benchmark.reference_flow import ReferenceFlowTrainer  # noqa: E402

FLOWS = ("fast", "reference")
ROW_IMAGE = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])  # 8 rows (rollouts / expressions) over 3 images


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return LensForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()


@pytest.fixture(scope="module")
def sam_images():
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 256, (3, 3, 256, 256), dtype=np.uint8))


def set_flow(trainer, flow: str) -> None:
    """The one trainer under the product flow (`LensGRPOTrainer`) or the benchmark's `ReferenceFlowTrainer`."""
    if flow == "reference":
        ReferenceFlowTrainer.adopt(trainer)
    else:
        trainer.__class__ = LensGRPOTrainer


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------- (1) shared SAM2 features
def test_shared_sam_features_equal_per_rollout_encoding(model, sam_images):
    with torch.no_grad():
        shared = model.encode_sam_images(sam_images)  # once per distinct image
        per_rollout = model.encode_sam_images(sam_images[ROW_IMAGE])  # once per row, as the original
    gathered = shared.index(ROW_IMAGE)
    for name in ("image_embed", "fpn_s0", "fpn_s1"):
        close(getattr(gathered, name), getattr(per_rollout, name))

    prompt = torch.randn(len(ROW_IMAGE), 1, model.sam.hidden_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        m_shared, iou_shared = decode_masks(model.sam, shared, prompt, ROW_IMAGE)
        m_rollout, iou_rollout = decode_masks(model.sam, per_rollout, prompt)
    close(m_shared, m_rollout)
    close(iou_shared, iou_rollout)
    assert not torch.allclose(m_shared[0], m_shared[3], atol=1e-3)  # rows of different images differ


def test_sam_features_are_channels_last_and_decode_as_nchw_features_do(model, sam_images):
    """The three feature levels come channels-last (the layout the decoder's 1x1 convolutions are fast on), and
    masks decoded from them equal masks decoded from the same values laid out NCHW."""
    with torch.no_grad():
        features = model.encode_sam_images(sam_images)
    for name in ("image_embed", "fpn_s0", "fpn_s1"):
        assert getattr(features, name).is_contiguous(memory_format=torch.channels_last), name
    nchw = SamFeatures(*(x.contiguous() for x in (features.image_embed, features.fpn_s0, features.fpn_s1)))
    assert not nchw.fpn_s0.is_contiguous(memory_format=torch.channels_last)
    prompt = torch.randn(len(ROW_IMAGE), 1, model.sam.hidden_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        m_cl, iou_cl = decode_masks(model.sam, features, prompt, ROW_IMAGE)
        m_nchw, iou_nchw = decode_masks(model.sam, nchw, prompt, ROW_IMAGE)
    close(m_cl, m_nchw)
    close(iou_cl, iou_nchw)


# ---------------------------------------------------------------------- (2) batched decoding
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_batched_decoding_equals_the_per_sample_loop(model, sam_images, training):
    model.train(training)
    try:
        with torch.no_grad():
            feats = model.encode_sam_images(sam_images)
        base = torch.randn(len(ROW_IMAGE), 1, model.sam.hidden_dim, generator=torch.Generator().manual_seed(2))
        weight = torch.randn(len(ROW_IMAGE), 1, 64, 64, generator=torch.Generator().manual_seed(3))
        conv = model.sam.sam_mask_decoder.conv_s0.weight
        results = {}
        for name, decode in (("batched", decode_masks), ("loop", decode_masks_per_sample)):
            prompt = base.clone().requires_grad_(True)
            conv.grad = None
            masks, iou = decode(model.sam, feats, prompt, ROW_IMAGE)
            ((masks * weight).sum() + iou.sum()).backward()
            results[name] = (masks.detach(), iou.detach(), prompt.grad.clone(), conv.grad.clone())
        for a, b in zip(results["batched"], results["loop"]):
            close(a, b, atol=1e-4, rtol=1e-4)  # gradients summed over rows in a different order
        # without an index, row b uses image b
        with torch.no_grad():
            close(decode_masks(model.sam, feats, base[:3])[0], decode_masks_per_sample(model.sam, feats, base[:3])[0])
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


# ---------------------------------------------------------------------- (3) one GRPO forward, both flows
@pytest.fixture(scope="module")
def grpo_batches(tiny_grpo):
    """One trainer; the same 2 prompts x G rollouts generated under each flow with the same seed. The two-pass flow
    (a scoring forward) is the one compared here; the single pass is tests/test_shared_prefix.py's."""
    trainer, prompts = tiny_grpo("grpo_fast_paths", "single_pass_rewards=false")
    g = trainer.args.num_generations
    batches = {}
    for flow in FLOWS:
        set_flow(trainer, flow)
        rows = [dict(prompts[i // g]) for i in range(2 * g)]
        torch.manual_seed(0)
        inputs = trainer._generate_and_score_completions(rows)
        batches[flow] = {"inputs": inputs, "rows": rows, "sam": trainer._banks["train"], "n_sam": len(trainer._banks["train"][1])}
    return trainer, batches


def test_both_flows_score_the_same_rollouts(grpo_batches):
    trainer, batches = grpo_batches
    fast, ref = batches["fast"], batches["reference"]
    g = trainer.args.num_generations
    assert fast["n_sam"] == 2 and ref["n_sam"] == 2 * g  # one SAM2 encoding per image vs per rollout
    torch.testing.assert_close(fast["inputs"]["completion_ids"], ref["inputs"]["completion_ids"], rtol=0, atol=0)
    assert [r["mask_iou"] for r in fast["rows"]] == pytest.approx([r["mask_iou"] for r in ref["rows"]], abs=1e-5)
    close(fast["inputs"]["advantages"], ref["inputs"]["advantages"], atol=1e-4, rtol=1e-4)
    close(fast["inputs"]["ref_per_token_logps"], ref["inputs"]["ref_per_token_logps"])


def run_flow(trainer, flow: str, batch: dict) -> dict[str, torch.Tensor]:
    """Per-token log-probs, mask logits, loss and a few gradients of `flow` on its own generation batch."""
    set_flow(trainer, flow)
    trainer._banks["train"] = batch["sam"]
    inputs = batch["inputs"]
    model = trainer.model
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    trainer._seg_inputs = inputs
    try:
        with torch.no_grad():
            logps, _, _ = trainer._get_per_token_logps_and_entropies(
                model, ids, att, inputs["completion_ids"].shape[1],
                pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
        masks = trainer._mask_logits
    finally:
        trainer._seg_inputs, trainer._mask_logits = None, None
    model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    policy = lens_module(model)
    grads = {name: policy.get_parameter(name).grad.clone() for name in (
        "learnable_query", "conv_1d.weight", "model.language_model.layers.0.self_attn.q_proj.weight",
        "model.visual.blocks.0.attn.qkv.weight", "sam.sam_mask_decoder.conv_s0.weight")}
    model.zero_grad(set_to_none=True)
    return {"logps": logps, "masks": masks, "loss": loss.detach(), **grads}


def test_grpo_forward_fast_equals_reference_flow(grpo_batches):
    trainer, batches = grpo_batches
    fast = run_flow(trainer, "fast", batches["fast"])
    ref = run_flow(trainer, "reference", batches["reference"])
    mask = batches["fast"]["inputs"]["completion_mask"].bool()
    close(fast["logps"][mask], ref["logps"][mask])
    close(fast["masks"], ref["masks"], atol=1e-4, rtol=1e-4)
    assert fast["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-5, abs=1e-6)
    for name in fast:
        if name not in ("logps", "masks", "loss"):
            assert fast[name].abs().sum() > 0, name
            close(fast[name], ref[name], atol=1e-6, rtol=1e-3)


def test_recipes_have_no_flow_switch():
    # the original's flow lives in the benchmark only (tools/benchmark/reference_flow.py)
    from lens.training.recipe import load_recipe

    with pytest.raises(ValueError, match="unknown key 'flow'"):
        load_recipe(REPO / "configs/recipes/tiny/stage2.yaml", ["flow=reference"])


# ---------------------------------------------------------------------- (4) batched evaluation
def test_batched_segmenter_equals_one_at_a_time(synthetic_root, tiny_checkpoint, model):
    from transformers import AutoProcessor

    from lens.data.registry import load_benchmark
    from lens.inference import Segmenter

    refs = load_benchmark("refcoco_val", synthetic_root)
    pairs = [(ref, i) for ref in refs for i in range(len(ref.expressions))]
    by_image: dict[str, list] = {}
    for ref, i in pairs:
        by_image.setdefault(ref.image_key, []).append((ref, i))
    chosen = [p for group in list(by_image.values())[:3] for p in group[:3]]  # <= 3 images, several texts each
    images = {ref.image_key: ref.load_image() for ref, _ in chosen}
    keys = [ref.image_key for ref, _ in chosen]
    texts = [ref.expressions[i] for ref, i in chosen]

    seg = Segmenter(model, AutoProcessor.from_pretrained(tiny_checkpoint), max_new_tokens=8)
    encoded: list[int] = []
    encode = model.encode_sam_images
    model.encode_sam_images = lambda x: encoded.append(len(x)) or encode(x)
    try:
        batched = seg.run_batch([images[k] for k in keys], texts, image_keys=keys)
        assert encoded == [len(images)]  # one SAM2 encoding per distinct image
        single = [seg.run_batch([images[k]], [t]) for k, t in zip(keys, texts)]
    finally:
        del model.encode_sam_images
    assert len(encoded) == 1 + len(texts)
    assert batched.texts == [s.texts[0] for s in single]
    close(batched.mask_logits, torch.cat([s.mask_logits for s in single]), atol=1e-4, rtol=1e-4)
    close(batched.scores, torch.cat([s.scores for s in single]), atol=1e-4, rtol=1e-4)


def test_the_one_row_to_distinct_image_index():
    from lens.distinct import distinct_index
    from lens.modeling.lens import distinct_images
    from lens.training.data import unique_images

    first, index = distinct_index(["b", "a", "b", "c", "a"])
    assert first == [0, 1, 3] and index.tolist() == [0, 1, 0, 2, 1]
    items = [{"image_id": k, "sam_image": torch.full((1,), float(i))} for i, k in enumerate("babca")]
    images, rows, keys = unique_images(items)
    assert images.flatten().tolist() == [0.0, 1.0, 3.0] and rows.tolist() == [0, 1, 0, 2, 1] and keys == ["b", "a", "c"]
    grid = torch.tensor([[1, 1, 2], [1, 1, 1], [1, 1, 2]])  # rows 0 and 2 show image 7 (2 patches), row 1 image 3
    patches = torch.arange(5.0)[:, None]
    kept, kept_grid, inverse = distinct_images(patches, grid, torch.tensor([7, 3, 7]))
    assert kept.flatten().tolist() == [0.0, 1.0, 2.0] and kept_grid.tolist() == [[1, 1, 2], [1, 1, 1]]
    assert inverse.tolist() == [0, 1, 0]

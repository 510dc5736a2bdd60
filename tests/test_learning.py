"""Learning test: after a short teacher-forced training, LENS masks follow the prompt words (swap check).

Every synthetic image holds two flat-coloured shapes of different colours, and each shape is named only by
its colour ("red object"), so the words are the only thing that tells an image's two rows apart. The tiny
preset (random weights) trains its context module, SAM2 prompt encoder and SAM2 mask decoder with BCE + dice.
On held-out images the mask for the right expression must match its object far better than before training,
and far better than the mask obtained when the expression names the image's other object.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from lens.data.transforms import resize_for_llm, sam_image
from lens.inference import Segmenter, completion_mask
from lens.losses import mask_iou_from_logits, segmentation_loss
from lens.modeling import build_preset
from lens.modeling.sam import SamFeatures
from lens.training.trainable import group_of, set_trainable

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 40), "yellow": (230, 210, 30)}
SEED = 0
N_TRAIN, N_TEST = 24, 8  # images; with 8 training images the model memorises them and held-out gaps are small
CHUNK = 8  # images per step (2 * CHUNK rows); the training images are cycled in fixed chunks
STEPS = 250
# Adam at 1e-3 on the context module (conv_1d has fan-in Q * H = 1024) inflates the common part of the SAM
# prompt ~20x within 25 steps and drowns the word signal, so the context module gets a smaller rate.
LR = {"context": 3e-5, "sam": 1e-3}
Batch = tuple[dict[str, torch.Tensor], torch.Tensor, list[torch.Tensor], SamFeatures]


@dataclass
class Scene:
    image: Image.Image
    words: tuple[str, str]  # colours of object 0 and object 1
    masks: tuple[torch.Tensor, torch.Tensor]  # (H, W) bool each


def phrase(colour: str) -> str:
    return f"{colour} object"


def answer(colour: str) -> str:
    """Teacher-forced answer: the phrase in Qwen's object-ref tokens (no box, which would give the place away)."""
    return f"<|object_ref_start|>{phrase(colour)}.<|object_ref_end|>"


def make_scene(rng: np.random.Generator) -> Scene:
    """Grey image (64..112 px a side) with two disjoint flat-coloured squares or discs of different colours."""
    h, w = (int(v) for v in rng.integers(64, 113, size=2))
    colours = rng.choice(list(COLOURS), size=2, replace=False)
    while True:
        r = rng.uniform(0.1, 0.2, size=2) * min(h, w)
        cy, cx = rng.uniform(r[:, None], [h - r, w - r]).T  # centres keep each shape inside the image
        if np.hypot(cy[0] - cy[1], cx[0] - cx[1]) > 1.5 * (r[0] + r[1]):
            break
    yy, xx = np.mgrid[:h, :w]
    pixels = np.full((h, w, 3), 128, np.uint8)
    masks = []
    for i in range(2):
        dy, dx = np.abs(yy - cy[i]), np.abs(xx - cx[i])
        inside = np.hypot(dy, dx) <= r[i] if rng.random() < 0.5 else np.maximum(dy, dx) <= r[i]
        pixels[inside] = COLOURS[colours[i]]
        masks.append(torch.from_numpy(inside))
    return Scene(Image.fromarray(pixels), (str(colours[0]), str(colours[1])), (masks[0], masks[1]))


def rows_of(scenes: list[Scene], swap: bool = False) -> tuple[torch.Tensor, list[str], list[torch.Tensor]]:
    """Two rows per scene, one per object: image index (B,), the colour the text names, the object's target mask.

    With `swap`, each row names the image's other object but keeps its own object's target."""
    index = torch.arange(len(scenes)).repeat_interleave(2)
    words = [s.words[(k + swap) % 2] for s in scenes for k in range(2)]
    targets = [s.masks[k] for s in scenes for k in range(2)]
    return index, words, targets


def encode_rows(seg: Segmenter, scenes: list[Scene], index: torch.Tensor, words: list[str]) -> dict[str, torch.Tensor]:
    """Token batch built as `Segmenter.run_batch(answers=...)` builds it: left-padded prompts, then right-padded
    answers + eos. input_ids / attention_mask: (B, L); pixel_values: (patches, D); image_grid_thw: (B, 3)."""
    proc, tok = seg.processor, seg.processor.tokenizer
    images = [resize_for_llm(scenes[i].image, seg.min_pixels, seg.max_pixels) for i in index.tolist()]
    inputs = proc(text=[seg.prompt_text(phrase(w)) for w in words], images=images, padding=True, return_tensors="pt")
    completion = tok([answer(w) + tok.eos_token for w in words], add_special_tokens=False, padding=True,
                     padding_side="right", return_tensors="pt")["input_ids"]
    return {
        "input_ids": torch.cat([inputs["input_ids"], completion], 1),
        "attention_mask": torch.cat([inputs["attention_mask"], completion_mask(completion, tok.eos_token_id)], 1),
        "pixel_values": inputs["pixel_values"],
        "image_grid_thw": inputs["image_grid_thw"],
    }


def training_batch(seg: Segmenter, scenes: list[Scene]) -> Batch:
    """Tokens, row -> image index, targets and the SAM2 features of `scenes` (the image encoder is frozen, so
    its features are computed once and reused at every step)."""
    index, words, targets = rows_of(scenes)
    sam = torch.stack([sam_image(s.image, seg.model.config.sam_image_size) for s in scenes])  # (N, 3, S, S) uint8
    with torch.no_grad():
        feats = seg.model.encode_sam_images(sam)
    return encode_rows(seg, scenes, index, words), index, targets, feats


def train(seg: Segmenter, scenes: list[Scene], steps: int) -> list[float]:
    """AdamW (linear decay, gradient clipping) on the context module, SAM2 prompt encoder and mask decoder."""
    model = seg.model
    set_trainable(model, "stage1", {"sam_prompt_encoder": True, "sam_mask_decoder": True})
    groups: dict[str, list[torch.nn.Parameter]] = {"context": [], "sam": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups["context" if group_of(name) == "context" else "sam"].append(param)
    opt = torch.optim.AdamW([{"params": p, "lr": LR[k]} for k, p in groups.items()], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    batches = [training_batch(seg, scenes[i : i + CHUNK]) for i in range(0, len(scenes), CHUNK)]
    model.train()
    losses = []
    for step in range(steps):
        tokens, index, targets, feats = batches[step % len(batches)]
        out = model.forward_with_queries(**tokens, sam_features=feats, sam_image_index=index, return_logits=False)
        loss, _ = segmentation_loss(out.mask_logits, targets)  # out.mask_logits: (2 * CHUNK, 1, 64, 64)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(groups["context"] + groups["sam"], 1.0)  # without it some seeds diverge
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def held_out_iou(seg: Segmenter, scenes: list[Scene], swap: bool) -> float:
    """Mean IoU of the masks `Segmenter.run_batch` predicts (teacher-forced answers) against each row's target."""
    index, words, targets = rows_of(scenes, swap)
    out = seg.run_batch([scenes[i].image for i in index.tolist()], [phrase(w) for w in words],
                        answers=[answer(w) for w in words], image_keys=index.tolist())
    return mask_iou_from_logits(out.mask_logits, targets).mean().item()


def swap_check(seed: int, steps: int) -> tuple[list[float], float, float, float]:
    """Train on fresh scenes; returns the losses and the held-out IoU before training, after, and swapped."""
    rng = np.random.default_rng(seed)
    scenes = [make_scene(rng) for _ in range(N_TRAIN + N_TEST)]
    model, processor = build_preset("tiny", seed=seed)
    seg = Segmenter(model, processor, template="default")  # the prompt is the expression itself
    before = held_out_iou(seg, scenes[N_TRAIN:], swap=False)
    losses = train(seg, scenes[:N_TRAIN], steps)
    test = scenes[N_TRAIN:]
    return losses, before, held_out_iou(seg, test, swap=False), held_out_iou(seg, test, swap=True)


@pytest.mark.slow  # 250 training steps (minutes on a busy runner); still run by default
def test_masks_follow_the_prompt_words(one_thread):
    losses, before, iou, swap_iou = swap_check(SEED, STEPS)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; held-out IoU {before:.3f} -> {iou:.3f}, swap IoU {swap_iou:.3f}")
    # Measured (250 steps, seeds 0-9): held-out IoU 0.62-0.93 (seed 0: 0.746), swap IoU 0.01-0.10 (0.056), IoU
    # before training 0.01-0.24 (0.022), loss 1.5 -> 0.03-0.16 (0.16). A model that cannot use the words predicts
    # both objects: with every phrase replaced by "object" this training ends at IoU = swap IoU = 0.468 and fails.
    assert np.mean(losses[-3:]) < 0.3 * np.mean(losses[:3])
    assert iou > 0.5 and iou > before + 0.3
    assert iou - swap_iou > 0.4

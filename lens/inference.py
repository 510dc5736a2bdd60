"""Segmenter: image + text prompt -> generated answer, box and mask (the user-facing predictor).

The model code (lens.modeling) knows tensors; this module owns pre- and post-processing: the chat
prompt, the LLM-sized and SAM-sized images, batched greedy generation with left padding, the one
batched query forward, and mapping boxes and masks back to the original image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data.transforms import box_from_llm_pixels, load_rgb, resize_for_llm, sam_image
from .distinct import distinct_index
from .geometry import parse_answer_box
from .modeling.families import box_frame, image_factor
from .modeling.sam import upsample_masks
from .prompts import build_messages

ImageLike = str | Path | Image.Image | np.ndarray


@dataclass
class Prediction:
    """One answer. `box` and `mask` are in original-image pixels; `box_llm` as the model answers it (LLM-image
    pixels for Qwen2.5-VL, 0-1000 for Qwen2-VL and Qwen3-VL)."""

    text: str
    box: list[float] | None
    mask: np.ndarray  # (H, W) bool
    score: float
    box_llm: list[float] | None = None


@dataclass
class BatchOutput:
    """Raw batched results, before per-sample post-processing (used by the evaluation runner)."""

    texts: list[str]
    boxes_llm: list[list[float] | None]
    mask_logits: torch.Tensor  # (B, 1, h, w) low-resolution logits
    scores: torch.Tensor  # (B,)
    orig_sizes: list[tuple[int, int]]  # (H, W) per row
    llm_sizes: list[tuple[int, int]]  # (H, W) of the frame `boxes_llm` are in: the LLM image, or (1000, 1000)


def as_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    return load_rgb(image)


def completion_mask(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) -> (B, T) long mask that keeps tokens up to and including the first EOS."""
    is_eos = completion_ids == eos_id
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return (~after_eos).long()


class Segmenter:
    """Text-prompted segmentation with a LENS model.

    >>> seg = Segmenter.from_pretrained("weights/LENS")          # or a preset name: "tiny"
    >>> pred = seg("dog.jpg", "the dog on the left")
    >>> pred.text, pred.box, pred.mask.shape, pred.score
    """

    def __init__(
        self,
        model,
        processor,
        template: str = "pr1_grounding",
        cot_template: str = "samr1_v4",
        max_new_tokens: int = 256,
        llm_longest_side: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"
        self.template, self.cot_template = template, cot_template
        self.max_new_tokens = max_new_tokens
        self.llm_longest_side = llm_longest_side
        cfg = model.config
        self.vision_token_ids = [i for i in (cfg.image_token_id, getattr(cfg, "video_token_id", None)) if i is not None]
        ip = processor.image_processor
        self.min_pixels = ip.size.get("shortest_edge", 3136)
        self.max_pixels = ip.size.get("longest_edge", 1_000_000)
        self.image_factor = image_factor(processor)  # the policy's resize grid and answer-box frame
        self.box_frame = box_frame(cfg)

    @classmethod
    def from_pretrained(
        cls,
        path_or_preset: str,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        model_kwargs: dict | None = None,
        **kw,
    ):
        """Build from a checkpoint folder (ours or released), a hub id, or a preset name (random weights).

        `model_kwargs` go to `from_pretrained` (e.g. `{"attn_implementation": "flash_attention_2"}`); other
        keyword arguments (`max_new_tokens`, `template`, ...) configure the Segmenter.
        """
        from .modeling.loading_api import load_model_and_processor

        model, processor = load_model_and_processor(path_or_preset, device=device, dtype=dtype, **(model_kwargs or {}))
        return cls(model, processor, **kw)

    # ------------------------------------------------------------------ batch
    def prompt_text(self, prompt: str, cot: bool = False) -> str:
        messages = build_messages(prompt, self.cot_template if cot else self.template)
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @torch.no_grad()
    def run_batch(
        self,
        images: Sequence[ImageLike],
        prompts: Sequence[str],
        cot: bool = False,
        answers: Sequence[str] | None = None,
        image_keys: Sequence[object] | None = None,
        sampling: dict | None = None,
    ) -> BatchOutput:
        """Generate (or teacher-force `answers`) for B (image, prompt) pairs, then one query forward.

        Rows that share an image (same `image_keys` entry, default: same path or object) share one
        SAM2 encoding. Decoding is greedy unless `sampling` gives `generate` keyword arguments
        (e.g. `{"do_sample": True, "temperature": 0.9}`).
        """
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        keys = list(image_keys) if image_keys is not None else [im if isinstance(im, (str, Path)) else id(im) for im in images]
        first, index = distinct_index(keys)  # rows that share a key share one SAM2 encoding
        pil = [as_pil(im) for im in images]
        device = self.model.device

        llm_images = [resize_for_llm(p, self.min_pixels, self.max_pixels, self.llm_longest_side, self.image_factor)
                      for p in pil]
        texts = [self.prompt_text(q, cot) for q in prompts]
        tok = self.processor.tokenizer
        inputs = self.processor(text=texts, images=llm_images, padding=True, return_tensors="pt").to(device)
        prompt_len = inputs["input_ids"].shape[1]
        if answers is None:
            seqs = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, **(sampling or {"do_sample": False}),
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                suppress_tokens=self.vision_token_ids,  # a generated image/video pad has no features to fill it
            )
            completion = seqs[:, prompt_len:]
        else:
            completion = tok([a + tok.eos_token for a in answers], add_special_tokens=False, padding=True,
                             padding_side="right", return_tensors="pt")["input_ids"].to(device)
            seqs = torch.cat([inputs["input_ids"], completion], dim=1)
        comp_mask = completion_mask(completion, tok.eos_token_id)
        attention = torch.cat([inputs["attention_mask"], comp_mask], dim=1)

        sam_batch = torch.stack([sam_image(pil[r], self.model.config.sam_image_size) for r in first])
        out = self.model(  # the query forward; SAM2 encodes each distinct image once, inside it
            input_ids=seqs, attention_mask=attention, pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"), sam_images=sam_batch.to(device),
            sam_image_index=index.to(device), return_logits=False, share_vision=True,
        )
        decoded = tok.batch_decode(completion * comp_mask + tok.pad_token_id * (1 - comp_mask), skip_special_tokens=True)
        return BatchOutput(
            texts=decoded,
            boxes_llm=[parse_answer_box(t) for t in decoded],
            mask_logits=out.mask_logits.float(),
            scores=out.iou_scores[:, 0].float(),
            orig_sizes=[(p.height, p.width) for p in pil],
            llm_sizes=[self.box_frame or (p.height, p.width) for p in llm_images],
        )

    def predict_batch(self, images: Sequence[ImageLike], prompts: Sequence[str], cot: bool = False) -> list[Prediction]:
        """Many (image, prompt) pairs in one batch -> one Prediction each."""
        out = self.run_batch(images, prompts, cot)
        preds = []
        for i, (text, box_llm) in enumerate(zip(out.texts, out.boxes_llm)):
            mask = upsample_masks(out.mask_logits[i : i + 1], out.orig_sizes[i])[0] > 0
            box = box_from_llm_pixels(box_llm, out.llm_sizes[i], out.orig_sizes[i]) if box_llm else None
            preds.append(Prediction(text, box, mask.cpu().numpy(), float(out.scores[i]), box_llm))
        return preds

    def __call__(self, image: ImageLike, prompt: str, cot: bool = False) -> Prediction:
        return self.predict_batch([image], [prompt], cot)[0]

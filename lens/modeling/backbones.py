"""LENS over Qwen2-VL and Qwen3-VL: the same `LensMixin` as `LensForConditionalGeneration` (Qwen2.5-VL), over
the family's stock class. Only what the family's modules need differs:

- Qwen2-VL: no window attention in the vision tower; everything else as Qwen2.5-VL.
- Qwen3-VL: the vision tower also returns deepstack features (one per `deepstack_visual_indexes` entry) that the
  text model adds at the image-token positions after its first layers; the query forward passes them on
  (`vision_extras`), with the appended queries marked as non-image positions.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)

from .config import LensConfig, LensQwen2VLConfig, LensQwen3VLConfig
from .image_rows import rows_of
from .lens import LensForConditionalGeneration, LensMixin


class LensQwen2VLForConditionalGeneration(LensMixin, Qwen2VLForConditionalGeneration):
    """LENS over Qwen2-VL (LENS-2B: Qwen2-VL-2B-Instruct)."""

    config_class = LensQwen2VLConfig
    config: LensQwen2VLConfig


class LensQwen3VLForConditionalGeneration(LensMixin, Qwen3VLForConditionalGeneration):
    """LENS over Qwen3-VL (e.g. Qwen3-VL-4B-Instruct)."""

    config_class = LensQwen3VLConfig
    config: LensQwen3VLConfig

    def vision_extras(self, vision, slots: torch.Tensor, image_index: torch.LongTensor | None) -> dict:
        """Deepstack inputs: `visual_pos_masks` (B, L) image-pad slots, `deepstack_visual_embeds` one
        (n_slots, H) tensor per deepstack layer, rows in slot order (as the stock Qwen3VLModel.forward builds them)."""
        dtype = self.model.language_model.embed_tokens.weight.dtype
        embeds = [rows_of(per_layer, image_index).to(slots.device, dtype) for per_layer in vision.deepstack_features]
        return {"visual_pos_masks": slots, "deepstack_visual_embeds": embeds}


LENS_BACKBONES = {"qwen2_vl": LensQwen2VLForConditionalGeneration, "qwen3_vl": LensQwen3VLForConditionalGeneration}


def _register_auto_classes() -> None:
    for config_class, model_class in ((LensConfig, LensForConditionalGeneration),
                                      (LensQwen2VLConfig, LensQwen2VLForConditionalGeneration),
                                      (LensQwen3VLConfig, LensQwen3VLForConditionalGeneration)):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForImageTextToText.register(config_class, model_class, exist_ok=True)


_register_auto_classes()

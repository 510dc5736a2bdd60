"""Policy families LENS runs on: Qwen2-VL, Qwen2.5-VL and Qwen3-VL (one descriptor each).

A family says which transformers classes build the policy and which frame its answers' boxes are in.
Everything outside lens/modeling asks through `box_frame_size(config, llm_hw)` and `image_factor(processor)`
instead of naming a family:

- Qwen2.5-VL answers in absolute pixels of the resized LLM image (`box_frame = None`: the frame is the LLM image);
- Qwen2-VL and Qwen3-VL answer in 0-1000 coordinates relative to the image (`box_frame = (1000, 1000)`).

The resize grid of the LLM image is patch_size x spatial_merge_size of the vision tower: 28 for Qwen2-VL and
Qwen2.5-VL (patch 14), 32 for Qwen3-VL (patch 16); the processor knows it.
"""

from __future__ import annotations

from dataclasses import dataclass

import transformers as tf

DEFAULT_FAMILY = "qwen2_5_vl"


@dataclass(frozen=True)
class Family:
    """One policy family. `name` is the transformers model_type of its base checkpoints."""

    name: str
    lens_model_type: str  # model_type of our checkpoints' config.json
    stock_config: type  # e.g. Qwen2_5_VLConfig
    stock_model: type  # e.g. Qwen2_5_VLForConditionalGeneration (the reference model, vLLM's view)
    pretrained_model: type  # e.g. Qwen2_5_VLPreTrainedModel (the parent whose __init__ LENS calls)
    inner_model: type  # e.g. Qwen2_5_VLModel (`model.model`: visual + language_model)
    processor: type
    video_processor: type
    box_frame: tuple[int, int] | None  # None: LLM-image pixels; (1000, 1000): relative 0-1000 coordinates
    released_architectures: tuple[str, ...] = ()  # upstream LENS checkpoints of this family

    @property
    def stock_architecture(self) -> str:
        return self.stock_model.__name__


def _families() -> dict[str, Family]:
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as q25
    from transformers.models.qwen2_vl import modeling_qwen2_vl as q2
    from transformers.models.qwen3_vl import modeling_qwen3_vl as q3

    return {
        "qwen2_vl": Family(
            "qwen2_vl", "lens_qwen2_vl", tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration,
            q2.Qwen2VLPreTrainedModel, q2.Qwen2VLModel, tf.Qwen2VLProcessor, tf.Qwen2VLVideoProcessor, (1000, 1000),
        ),
        "qwen2_5_vl": Family(
            "qwen2_5_vl", "lens", tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration,
            q25.Qwen2_5_VLPreTrainedModel, q25.Qwen2_5_VLModel, tf.Qwen2_5_VLProcessor, tf.Qwen2VLVideoProcessor,
            None, ("SAMR1ForConditionalGeneration_qwen2p5",),
        ),
        "qwen3_vl": Family(
            "qwen3_vl", "lens_qwen3_vl", tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration,
            q3.Qwen3VLPreTrainedModel, q3.Qwen3VLModel, tf.Qwen3VLProcessor, tf.Qwen3VLVideoProcessor, (1000, 1000),
        ),
    }


FAMILIES: dict[str, Family] = _families()
FAMILY_NAMES = tuple(FAMILIES)


def get_family(name: str) -> Family:
    """The family of a name (`qwen2_vl`, `qwen2_5_vl`, `qwen3_vl`); ValueError naming the valid ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown policy family {name!r}; expected one of {FAMILY_NAMES}")
    return FAMILIES[name]


def family_of(config) -> Family:
    """The family of a LENS config (its class says it) or of a stock Qwen-VL config (its model_type)."""
    name = getattr(config, "lens_family", None) or getattr(config, "model_type", None)
    return get_family(name)


def family_for_model_type(model_type: str | None) -> Family | None:
    """The family whose LENS or base checkpoints carry `model_type` in config.json, else None."""
    for fam in FAMILIES.values():
        if model_type in (fam.name, fam.lens_model_type):
            return fam
    return None


def box_frame(config) -> tuple[int, int] | None:
    """The fixed frame of a model's answer boxes ((1000, 1000) for 0-1000 coordinates), None for LLM-image pixels."""
    return family_of(config).box_frame


def box_frame_size(config, llm_hw: tuple[int, int]) -> tuple[int, int]:
    """(H, W) of the frame a model's answer boxes are in: the LLM image `llm_hw` or the family's fixed frame."""
    frame = box_frame(config)
    return tuple(llm_hw) if frame is None else frame


def image_factor(processor) -> int:
    """Side multiple of the LLM image: the image processor's patch_size x merge_size (28 Qwen2/2.5-VL, 32 Qwen3-VL)."""
    ip = getattr(processor, "image_processor", processor)
    return int(ip.patch_size) * int(ip.merge_size)

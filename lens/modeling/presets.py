"""Model presets: real architectures with random weights (`qwen2.5-vl-3b`, `qwen2.5-vl-7b`, `qwen2-vl-2b` = LENS-2B,
`qwen3-vl-4b`) and CPU-sized ones (`tiny` = Qwen2.5-VL, `tiny-qwen2-vl`, `tiny-qwen3-vl`).

All are read from YAML files shipped inside the package (`lens/configs/models/`, found through
`importlib.resources`, so an installed wheel has them too) and built by the same code; a YAML's `backbone:`
names the policy family (default qwen2_5_vl). Without a real Qwen processor folder, a preset gets the offline
tiny tokenizer (`tiny_processor.py`) with the family's processor class and patch size, and the config's
special-token ids are set to that tokenizer's ids.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

import torch
import yaml

from .config import lens_config
from .families import DEFAULT_FAMILY, get_family
from .tiny_processor import build_tiny_processor, special_token_ids

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

CONFIG_DIR: Traversable = resources.files("lens") / "configs" / "models"
PRESETS = ("qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen2-vl-2b", "qwen3-vl-4b", "tiny", "tiny-qwen2-vl", "tiny-qwen3-vl")


def preset_path(name: str) -> Traversable:
    """The packaged YAML file of a preset (a `Traversable`: a `Path` in a checkout or an unpacked wheel)."""
    path = CONFIG_DIR / f"{name}.yaml"
    if name not in PRESETS or not path.is_file():
        raise ValueError(f"unknown model preset {name!r}; expected one of {PRESETS} (files in {CONFIG_DIR})")
    return path


PRESET_PREFIX = "preset:"


def preset_name(spec: object) -> str | None:
    """The preset a model spec names, else None (a checkpoint folder or hub id). The one parser of preset specs:
    `preset:<name>` (recipes' `model.init`) or a bare preset name (`Segmenter.from_pretrained`, evaluation's
    `model`). An unknown `preset:<name>` raises."""
    text = str(spec)
    if text.startswith(PRESET_PREFIX):
        name = text[len(PRESET_PREFIX):]
        preset_path(name)  # raises, naming the presets
        return name
    return text if text in PRESETS else None


def load_preset(name: str, **overrides: Any) -> tuple[dict, dict]:
    """(config dict, processor kwargs) of a preset; `overrides` update top-level config fields."""
    raw = yaml.safe_load(preset_path(name).read_text())
    processor_kwargs = raw.pop("processor", {})
    raw.update(overrides)
    return raw, processor_kwargs


def config_for_tokenizer(raw: dict, tokenizer):
    """The family's LENS config with special-token ids and vocabulary size matched to `tokenizer`."""
    ids = special_token_ids(tokenizer)
    raw = {**raw, "text_config": dict(raw["text_config"])}
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        raw[key] = ids[key]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        raw["text_config"][key] = ids[key]
    vocab = raw["text_config"].get("vocab_size") or 0
    raw["text_config"]["vocab_size"] = max(vocab, -(-len(tokenizer) // 64) * 64)
    return lens_config(raw)


def preset_processor(raw: dict, processor_kwargs: dict):
    """The offline tiny processor of a preset: the family's processor classes, the vision tower's patch size."""
    family = get_family(raw.get("backbone") or DEFAULT_FAMILY)
    return build_tiny_processor(
        patch_size=raw["vision_config"].get("patch_size", 14), processor_class=family.processor,
        video_processor_class=family.video_processor, **processor_kwargs,
    )


def build_preset(name: str, seed: int = 0, dtype: torch.dtype | None = None, **overrides: Any):
    """Randomly initialised (model, processor) of a preset; deterministic for a seed."""
    from .lens import lens_model_class

    raw, processor_kwargs = load_preset(name, **overrides)
    processor = preset_processor(raw, processor_kwargs)
    config = config_for_tokenizer(raw, processor.tokenizer)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)  # allocate in the target dtype: no fp32 copy of a 3B model
    try:
        model = lens_model_class(config.lens_family)(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.bos_token_id = config.text_config.bos_token_id
    return model, processor


def meta_preset(name: str, **overrides: Any):
    """A preset's model on the meta device (shapes, no memory, no weights): for parameter counts of real presets.
    `python -c "from lens.modeling.presets import *; print(parameter_counts(meta_preset('qwen3-vl-4b')))"`"""
    from transformers.initialization import meta_device_safe_creation_ops

    from .lens import lens_model_class

    raw, _ = load_preset(name, **overrides)
    config = lens_config(raw)
    with torch.device("meta"), meta_device_safe_creation_ops():
        return lens_model_class(config.lens_family)(config)


def parameter_counts(model) -> dict[str, int]:
    """Parameters of a LENS model by part: context module, language model (embeddings, layers, final norm and an
    untied LM head), vision tower, SAM2, and the whole model (tied weights once)."""
    def count(part) -> int:
        return sum(p.numel() for p in (part.parameters() if isinstance(part, torch.nn.Module) else [part]))

    lm = count(model.model.language_model) + (0 if model.config.tie_word_embeddings else count(model.lm_head))
    return {"context": sum(count(m) for m in model.context_modules.values()), "language_model": lm,
            "vision": count(model.model.visual), "sam": count(model.sam), "total": count(model)}

"""One entry point for every way a model is named: a preset, our checkpoint, a released one."""

from __future__ import annotations

from pathlib import Path

import torch

from .presets import PRESETS, build_preset


def load_model_and_processor(
    name_or_path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **model_kwargs,
):
    """(model, processor) from a preset name (random weights) or a checkpoint folder.

    A checkpoint folder must hold its processor files (ours and the released ones do).
    """
    from transformers import AutoProcessor

    from .lens import LensForConditionalGeneration

    if str(name_or_path) in PRESETS:
        model, processor = build_preset(str(name_or_path), dtype=dtype)
    else:
        path = Path(name_or_path)
        model = LensForConditionalGeneration.from_pretrained(path, dtype=dtype or "auto", **model_kwargs)
        if not (path / "tokenizer_config.json").is_file():
            raise FileNotFoundError(
                f"{path} has model weights but no processor files (tokenizer_config.json, "
                f"preprocessor_config.json or processor_config.json): copy them from the base "
                f"Qwen2.5-VL-Instruct folder"
            )
        processor = AutoProcessor.from_pretrained(path)
    if device is not None:
        model = model.to(device)
    return model, processor

"""One entry point for every way a model is named: a preset, our checkpoint, a released one."""

from __future__ import annotations

from pathlib import Path

import torch

from .presets import build_preset, preset_name


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A local folder as is; an `org/name` that is not a local folder is downloaded from the hub (cached)."""
    path = Path(name_or_path)
    if path.exists() or str(name_or_path).count("/") != 1 or str(name_or_path).startswith((".", "/")):
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=str(name_or_path)))
    except Exception as err:  # offline, unknown repo, no access: say what was tried
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a local folder nor a downloadable hub repository ({type(err).__name__}: {err})"
        ) from err


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

    preset = preset_name(name_or_path)
    if preset is not None:
        model, processor = build_preset(preset, dtype=dtype)
    else:
        path = resolve_checkpoint(name_or_path)
        model = LensForConditionalGeneration.from_pretrained(path, dtype=dtype or "auto", **model_kwargs)
        if not (path / "tokenizer_config.json").is_file():
            raise FileNotFoundError(
                f"{path} has model weights but no processor files (tokenizer_config.json, "
                f"preprocessor_config.json or processor_config.json): copy them from the base "
                f"Qwen-VL-Instruct folder"
            )
        processor = AutoProcessor.from_pretrained(path)
    if device is not None:
        model = model.to(device)
    return model, processor

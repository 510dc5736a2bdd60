"""Checkpoint layouts: our own (transformers 5.x), the released LENS checkpoints (transformers 4.51,
`SAMR1ForConditionalGeneration_qwen2p5`), and a base Qwen2-VL / Qwen2.5-VL / Qwen3-VL Instruct folder plus Meta's
SAM2 file. The policy family comes from config.json (`model_type`, `architectures`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .config import LensConfig, lens_config_class
from .families import Family, family_for_model_type, family_of, get_family
from .sam import SAM2_CHECKPOINT_FILES, build_sam, hub_location, load_sam_checkpoint
from .zero3 import gathered, partition_whole_parameters

logger = logging.getLogger(__name__)

RELEASED_ARCHITECTURE = "SAMR1ForConditionalGeneration_qwen2p5"
# transformers 4.x key layout -> 5.x (the stock class gets this by name; a subclass must ask for it).
LEGACY_KEY_MAPPING = {
    r"^visual\.": "model.visual.",
    r"^model\.(?!language_model\.|visual\.)": "model.language_model.",
}
WEIGHTS_HELP = (
    "Released LENS weights are on the Hugging Face hub as OuyBin/LENS (RefCOCO), OuyBin/LENS_ReasonSeg, "
    "OuyBin/LENS_ReasonSeg_FT and OuyBin/LENS_ReasonSeg_CoT; the base model is Qwen/Qwen2.5-VL-3B-Instruct "
    "and SAM2 is facebook/sam2-hiera-large (sam2_hiera_large.pt). Download them (e.g. `huggingface-cli download "
    "OuyBin/LENS --local-dir weights/LENS`) and pass the local folder."
)
_DROP_RELEASED = ("architectures", "model_type", "if_include_sam", "transformers_version", "_name_or_path")
_LENS_FIELDS = (
    "num_of_query", "if_use_qwen_connector", "connector_depth", "connector_heads", "connector_mlp_ratio",
    "sam_variant", "sam_image_size", "sam_overrides", "sam_dynamic_multimask", "query_position_mode",
)


def checkpoint_kind(path: str | Path) -> str:
    """'lens' (ours), 'released' (upstream LENS) or 'qwen' (a base Qwen-VL folder); errors name the path."""
    return checkpoint_family(path)[0]


def checkpoint_family(path: str | Path) -> tuple[str, Family]:
    """(kind, policy family) of a checkpoint folder: kind as `checkpoint_kind`; errors name the path."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist. {WEIGHTS_HELP}")
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} is missing: {path} is not a model folder. {WEIGHTS_HELP}")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise FileNotFoundError(
            f"{path} has a config.json but no weights (*.safetensors or *.bin): the download is incomplete. {WEIGHTS_HELP}"
        )
    cfg = json.loads(cfg_file.read_text())
    model_type, family = cfg.get("model_type"), family_for_model_type(cfg.get("model_type"))
    if family is not None and model_type == family.lens_model_type:
        return "lens", family
    if RELEASED_ARCHITECTURE in (cfg.get("architectures") or []) or "num_of_query" in cfg:
        return "released", get_family("qwen2_5_vl")  # the released checkpoints are Qwen2.5-VL (flat qwen2_vl config)
    if family is not None:
        return "qwen", family
    raise ValueError(
        f"{cfg_file}: model_type={model_type!r}, architectures={cfg.get('architectures')} is neither a LENS "
        f"checkpoint nor a base Qwen2-VL, Qwen2.5-VL or Qwen3-VL folder"
    )


def foreign_config(path: Path, overrides: dict[str, Any], family: Family | None = None):
    """The family's LENS config from a released-LENS or base-Qwen config.json (flat 4.51 layout or nested 5.x)."""
    family = family or checkpoint_family(path)[1]
    raw = json.loads((path / "config.json").read_text())
    raw = {k: v for k, v in raw.items() if k not in _DROP_RELEASED}
    raw.setdefault("use_cache", True)
    raw.update(overrides)
    return lens_config_class(family.name)(**raw)


def prepare_from_pretrained(path: Path, kwargs: dict[str, Any]) -> tuple[str, Family, dict[str, Any]]:
    """Pick the family, config and key mapping `from_pretrained` needs for the layout found at `path`."""
    kind, family = checkpoint_family(path)
    overrides = {k: kwargs.pop(k) for k in _LENS_FIELDS if k in kwargs}
    if "config" in kwargs:
        family = family_of(kwargs["config"])
    if kind != "lens" and "config" not in kwargs:
        kwargs["config"] = foreign_config(path, overrides, family)
    elif overrides:
        kwargs.update(overrides)
    kwargs.setdefault("key_mapping", LEGACY_KEY_MAPPING)
    return kind, family, kwargs


def finish_from_pretrained(model, kind: str, missing: set[str], sam_checkpoint: str | Path | bool | None) -> None:
    """Give SAM real weights: Meta's file when asked, else a fresh sam2 init where the checkpoint had none."""
    missing_sam = sorted(k for k in missing if k.startswith("sam."))
    if kind == "qwen" and sam_checkpoint is None:
        raise ValueError(
            f"a base Qwen-VL folder has no SAM2 weights: pass sam_checkpoint='path/to/"
            f"{SAM2_CHECKPOINT_FILES[model.config.sam_variant]}' ({hub_location(model.config.sam_variant)}; "
            "or sam_checkpoint=False to start from a randomly initialised SAM2). " + WEIGHTS_HELP
        )
    if missing_sam or sam_checkpoint:
        cfg = model.config
        fresh = build_sam(cfg.sam_variant, cfg.sam_image_size, cfg.sam_overrides, cfg.sam_dynamic_multimask)
        if sam_checkpoint:
            load_sam_checkpoint(fresh, sam_checkpoint, cfg.sam_variant)
        elif kind != "qwen":
            logger.warning("%d SAM2 weights were missing from the checkpoint: SAM2 is randomly initialised", len(missing_sam))
        dtype = model.learnable_query.dtype
        with gathered(list(model.sam.parameters()), modify=True):  # ZeRO-3: load into the full tensors
            model.sam.load_state_dict(fresh.to(dtype).state_dict())
    partition_whole_parameters(model)
    check_weights(model)


def check_weights(model) -> None:
    """Every weight finite and non-empty (under ZeRO-3 each is gathered to be checked, so none passes vacuously)."""
    bad = []
    for name, param in model.named_parameters():
        with gathered([param]):
            if param.numel() == 0 or not torch.isfinite(param).all():
                bad.append(name)
    if bad:
        raise ValueError(f"empty or non-finite weights after loading: {bad[:5]}")


def released_state_dict(model) -> dict[str, torch.Tensor]:
    """Model weights under the released (transformers 4.51) key names."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model."):]
        elif key.startswith("model.visual."):
            key = key[len("model."):]
        out[key] = value.detach().contiguous()
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def released_config_dict(config: LensConfig) -> dict[str, Any]:
    """config.json as the released checkpoints store it: flat text fields, model_type qwen2_vl (Qwen2.5-VL only)."""
    if family_of(config).name != "qwen2_5_vl":
        raise ValueError(f"the released LENS layout holds Qwen2.5-VL policies only, not {family_of(config).name}")
    text = config.text_config.to_dict()
    vision = config.vision_config.to_dict()
    rope = dict(text.pop("rope_parameters", None) or {})
    flat = {k: v for k, v in text.items() if k not in ("model_type", "architectures", "transformers_version", "dtype")}
    flat.update(
        architectures=[RELEASED_ARCHITECTURE],
        model_type="qwen2_vl",
        rope_theta=rope.get("rope_theta", 1e6),
        rope_scaling={"type": "mrope", "mrope_section": rope.get("mrope_section")},
        vision_config={k: v for k, v in vision.items() if k not in ("transformers_version", "dtype")},
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id,
        vision_end_token_id=config.vision_end_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
        num_of_query=config.num_of_query,
        if_use_qwen_connector=config.if_use_qwen_connector,
        if_include_sam=False,
        use_cache=False,
        torch_dtype="float32",
        transformers_version="4.51.3",
    )
    flat["vision_config"]["model_type"] = "qwen2_5_vl"
    return flat


def save_released_layout(model, path: str | Path, processor=None) -> Path:
    """Write `model` as a released LENS checkpoint (4.51 keys and config), e.g. for the original code base."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(released_state_dict(model), str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(released_config_dict(model.config), indent=2))
    if processor is not None:
        processor.save_pretrained(path)
    return path

"""LENS model code: configuration, policy families, context module, SAM2 wrapper, model classes, presets, loading."""

from .backbones import LensQwen2VLForConditionalGeneration, LensQwen3VLForConditionalGeneration
from .config import LensConfig, LensQwen2VLConfig, LensQwen3VLConfig
from .lens import LensForConditionalGeneration, LensOutput, lens_model_class
from .loading import save_released_layout
from .loading_api import load_model_and_processor
from .presets import PRESETS, build_preset

__all__ = [
    "LensConfig",
    "LensForConditionalGeneration",
    "LensOutput",
    "LensQwen2VLConfig",
    "LensQwen2VLForConditionalGeneration",
    "LensQwen3VLConfig",
    "LensQwen3VLForConditionalGeneration",
    "PRESETS",
    "build_preset",
    "lens_model_class",
    "load_model_and_processor",
    "save_released_layout",
]

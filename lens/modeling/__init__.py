"""LENS model code: configuration, context module, SAM2 wrapper, model class, presets, loading."""

from .config import LensConfig
from .lens import LensForConditionalGeneration, LensOutput
from .loading import save_released_layout
from .loading_api import load_model_and_processor
from .presets import PRESETS, build_preset

__all__ = [
    "LensConfig",
    "LensForConditionalGeneration",
    "LensOutput",
    "PRESETS",
    "build_preset",
    "load_model_and_processor",
    "save_released_layout",
]

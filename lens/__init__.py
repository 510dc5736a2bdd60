"""LENS: text-prompted image segmentation with reinforced reasoning (Qwen2.5-VL + context queries + SAM2)."""

from .inference import Prediction, Segmenter
from .modeling import LensConfig, LensForConditionalGeneration, build_preset, load_model_and_processor

__all__ = [
    "LensConfig",
    "LensForConditionalGeneration",
    "Prediction",
    "Segmenter",
    "build_preset",
    "load_model_and_processor",
]
__version__ = "0.1.0"

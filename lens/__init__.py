"""LENS: text-prompted image segmentation with reinforced reasoning (Qwen2.5-VL + context queries + SAM2).

Public names are imported lazily so that `import lens.data` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LensConfig": "lens.modeling",
    "LensForConditionalGeneration": "lens.modeling",
    "build_preset": "lens.modeling",
    "load_model_and_processor": "lens.modeling",
    "Prediction": "lens.inference",
    "Segmenter": "lens.inference",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lens' has no attribute {name!r}")

"""LENS configurations: a Qwen-VL configuration of one family plus the context-query and SAM2 fields of LENS.

`LensConfig` is the Qwen2.5-VL one (model_type `lens`, what every existing checkpoint holds); `LensQwen2VLConfig`
and `LensQwen3VLConfig` carry the same fields over Qwen2-VL and Qwen3-VL. `lens_config(raw)` picks the class from a
`backbone:` entry (a preset YAML's), `lens_config_class(family)` from a family name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

from .families import DEFAULT_FAMILY, get_family

QUERY_POSITION_MODES = ("upstream", "mrope")


@dataclass(kw_only=True, repr=False)
class LensFields:
    """The fields LENS adds to a Qwen-VL config (names of the upstream fields kept where they exist):

        num_of_query: number of learnable context queries appended after the text (64).
        if_use_qwen_connector: run the 4-block connector over the query states (True).
        connector_depth / connector_heads / connector_mlp_ratio: connector shape (4 / 16 / 4.0).
        sam_variant: a key of `lens.modeling.sam.SAM2_CONFIGS` (upstream: SAM 2.0 hiera-L).
        sam_image_size: SAM input side (1024 in released checkpoints).
        sam_overrides: extra Hydra overrides for the SAM2 config (used by small presets).
        sam_dynamic_multimask: in eval mode, fall back to SAM2's best multimask output when the single
            mask is unstable (upstream's build_sam2 post-processing; True for released checkpoints).
        query_position_mode: "upstream" = 1-D attention-mask cumulative positions on all three
            M-RoPE axes (what the released weights were trained with); "mrope" = the family's image grid
            M-RoPE positions, queries continuing after the last position.
    """

    num_of_query: int = 64
    if_use_qwen_connector: bool = True
    connector_depth: int = 4
    connector_heads: int = 16
    connector_mlp_ratio: float = 4.0
    sam_variant: str = "sam2_hiera_l"
    sam_image_size: int = 1024
    sam_overrides: list | None = None
    sam_dynamic_multimask: bool = True
    query_position_mode: str = "upstream"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.query_position_mode not in QUERY_POSITION_MODES:
            raise ValueError(
                f"query_position_mode={self.query_position_mode!r}; expected one of {QUERY_POSITION_MODES}"
            )
        if self.num_of_query < 1:
            raise ValueError(f"num_of_query must be >= 1, got {self.num_of_query}")


class LensConfig(LensFields, Qwen2_5_VLConfig):
    """Configuration of `LensForConditionalGeneration` (Qwen2.5-VL policy); fields: see `LensFields`."""

    model_type = "lens"
    lens_family = "qwen2_5_vl"


class LensQwen2VLConfig(LensFields, Qwen2VLConfig):
    """Configuration of `LensQwen2VLForConditionalGeneration` (Qwen2-VL policy, e.g. LENS-2B)."""

    model_type = "lens_qwen2_vl"
    lens_family = "qwen2_vl"


class LensQwen3VLConfig(LensFields, Qwen3VLConfig):
    """Configuration of `LensQwen3VLForConditionalGeneration` (Qwen3-VL policy)."""

    model_type = "lens_qwen3_vl"
    lens_family = "qwen3_vl"


LENS_CONFIGS = {cls.lens_family: cls for cls in (LensConfig, LensQwen2VLConfig, LensQwen3VLConfig)}


def lens_config_class(family: str) -> type:
    """The LENS config class of a family name (ValueError naming the valid ones)."""
    return LENS_CONFIGS[get_family(family).name]


def lens_config(raw: dict[str, Any]):
    """A LENS config from a dict; its optional `backbone` entry names the family (default Qwen2.5-VL)."""
    raw = dict(raw)
    return lens_config_class(raw.pop("backbone", None) or DEFAULT_FAMILY)(**raw)

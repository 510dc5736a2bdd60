"""LensConfig: a Qwen2.5-VL configuration plus the context-query and SAM2 fields of LENS."""

from __future__ import annotations

from transformers import Qwen2_5_VLConfig

QUERY_POSITION_MODES = ("upstream", "mrope")


class LensConfig(Qwen2_5_VLConfig):
    """Configuration of `LensForConditionalGeneration`.

    Extra fields (names of the upstream fields kept where they exist):
        num_of_query: number of learnable context queries appended after the text (64).
        if_use_qwen_connector: run the 4-block connector over the query states (True).
        connector_depth / connector_heads / connector_mlp_ratio: connector shape (4 / 16 / 4.0).
        sam_variant: a key of `lens.modeling.sam.SAM2_CONFIGS` (upstream: SAM 2.0 hiera-L).
        sam_image_size: SAM input side (1024 in released checkpoints).
        sam_overrides: extra Hydra overrides for the SAM2 config (used by small presets).
        sam_dynamic_multimask: in eval mode, fall back to SAM2's best multimask output when the single
            mask is unstable (upstream's build_sam2 post-processing; True for released checkpoints).
        query_position_mode: "upstream" = 1-D attention-mask cumulative positions on all three
            M-RoPE axes (what the released weights were trained with); "mrope" = the image grid
            M-RoPE positions of Qwen2.5-VL, queries continuing after the last position.
    """

    model_type = "lens"

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

"""Data: Reference records, loaders for REFER / gRefCOCO / ReasonSeg / GroundingSuite / custom JSONL,
synthetic scenes, transforms and torch datasets.

Heavy dependencies (torch, qwen_vl_utils) load lazily; import the torch dataset from
``lens.data.dataset``.
"""

from lens.data.base import CocoMask, Reference
from lens.data.custom import load_custom, write_custom_jsonl
from lens.data.grefcoco import load_grefcoco
from lens.data.groundingsuite import load_groundingsuite
from lens.data.reasonseg import load_reasonseg
from lens.data.refer import load_refer
from lens.data.registry import BENCHMARKS, EVAL_BENCHMARKS, load_benchmark

__all__ = [
    "BENCHMARKS",
    "EVAL_BENCHMARKS",
    "CocoMask",
    "Reference",
    "load_benchmark",
    "load_custom",
    "load_grefcoco",
    "load_groundingsuite",
    "load_reasonseg",
    "load_refer",
    "write_custom_jsonl",
]

"""Evaluation options, benchmark specs and the scored expressions (shared by the model and predictions runs)."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from lens.config import DTYPE_NAMES, ConfigError, unknown_key
from lens.data.base import Reference
from lens.data.dataset import expand_expressions
from lens.data.registry import BENCHMARKS, CUSTOM_PREFIX
from lens.evaluation.metrics import PROTOCOLS

PLAIN_TEMPLATE, COT_TEMPLATE = "pr1_grounding", "samr1_v4"
COT_SUFFIX = ":cot"
REASONSEG_LONGEST_SIDE = 640
DEFAULT_MAX_NEW_TOKENS = {False: 256, True: 512}
OVERLAY_FILTERS = ("extremes", "mask_rescues_box", "box_rescues_mask")


def log(msg: str, rank: int = 0) -> None:
    """Progress messages on stderr, rank 0 only."""
    if rank == 0:
        print(f"[lens.evaluation] {msg}", file=sys.stderr, flush=True)


# ============================================================================ configuration


@dataclass
class EvalConfig:
    """Resolved evaluation options (CLI flags and ``configs/eval/*.yaml`` keys share these names)."""

    model: str | None = None
    benchmarks: list[str] | None = None  # None: the 11 evaluation splits (predictions: the file's benchmarks)
    data_root: str = "datasets"
    out: str | None = None
    protocol: str = "lens"
    batch_size: int = 16
    max_new_tokens: int | None = None
    limit: int | None = None
    save_predictions: bool = False
    save_overlays: int = 0
    dtype: str = "auto"
    device: str = "auto"
    cot: bool = False
    overwrite: bool = False
    predictions: str | None = None  # score this predictions file / folder instead of running a model
    allow_missing: bool = False  # predictions: score a partial file (coverage reported) instead of failing
    overlays_filter: str = "extremes"  # extremes | mask_rescues_box | box_rescues_mask

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str | Path | None = None) -> EvalConfig:
        """Build from a dict (YAML keys may use ``-`` or ``_``); an unknown key raises ``ValueError`` naming
        ``source`` (the YAML file), the key and the closest valid names."""
        names = [f.name for f in fields(cls)]
        clean = {str(k).replace("-", "_"): v for k, v in values.items()}
        for key in clean:
            if key not in names:
                where = f"{source}" if source is not None else "evaluation config"
                raise unknown_key(where, key, names, what="evaluation option", hint=f"valid: {', '.join(names)}")
        if isinstance(clean.get("benchmarks"), str):
            clean["benchmarks"] = [clean["benchmarks"]]
        return cls(**clean)

    @classmethod
    def from_file(cls, path: str | Path, **flags: Any) -> EvalConfig:
        """A ``configs/eval/*.yaml`` file, with ``flags`` (option names) over its values."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of option names to values")
        return cls.from_dict({**data, **flags}, source=path)

    def validate(self) -> None:
        """Raise ``ValueError`` for missing or out-of-range options."""
        if not self.model and not self.predictions:
            raise ValueError("no model given: pass --model <checkpoint folder or preset name> "
                             "(or 'model:' in the YAML), or --predictions <file or folder> to score saved masks")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; valid: {', '.join(PROTOCOLS)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.save_overlays < 0:
            raise ValueError(f"save_overlays must be >= 0, got {self.save_overlays}")
        if self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {self.dtype!r}; valid: auto, {', '.join(DTYPE_NAMES)}")
        if self.benchmarks is not None and not self.benchmarks:
            raise ValueError("no benchmarks given")
        if self.overlays_filter not in OVERLAY_FILTERS:
            raise ValueError(f"unknown overlays_filter {self.overlays_filter!r}; valid: {', '.join(OVERLAY_FILTERS)}")
        if self.allow_missing and not self.predictions:
            raise ValueError("allow_missing only applies to --predictions runs")

    @property
    def suffix(self) -> str:
        """File-stem suffix: ``.standard`` for the standard protocol, ``.limitN`` for smoke runs."""
        return ("" if self.protocol == "lens" else f".{self.protocol}") + (f".limit{self.limit}" if self.limit else "")

    @property
    def label(self) -> str:
        """The model identity in results: the preset / folder name, or ``predictions:<name>``."""
        if self.predictions and not self.model:
            return f"predictions:{Path(self.predictions).name}"
        return model_name(str(self.model))

    def out_dir(self) -> Path:
        """``--out``, else ``<model>/evaluations`` for a checkpoint, ``outputs/eval/<preset>``, or
        ``outputs/eval/predictions-<name>`` when scoring a predictions file without ``--model``."""
        if self.out:
            return Path(self.out)
        if self.predictions and not self.model:
            return Path("outputs/eval") / f"predictions-{Path(self.predictions).name}"
        if is_preset(str(self.model)):
            return Path("outputs/eval") / str(self.model)
        return Path(str(self.model)) / "evaluations"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_preset(model: str) -> bool:
    from lens.modeling.presets import PRESETS

    return model in PRESETS


def model_name(model: str) -> str:
    """Short model identity stored in results and resume signatures (preset name or folder name)."""
    if model.startswith("predictions:") or is_preset(model):
        return model
    return Path(model).resolve().name


# ============================================================================ benchmarks and expressions


@dataclass(frozen=True)
class SplitSpec:
    """One evaluated split: a registry name (or ``custom:<path.jsonl>``) with or without CoT."""

    benchmark: str
    cot: bool = False

    @property
    def is_custom(self) -> bool:
        return self.benchmark.startswith(CUSTOM_PREFIX)

    @property
    def dataset(self) -> str:
        if self.is_custom:
            return "custom"
        return self.benchmark if self.benchmark == "groundingsuite" else self.benchmark.rsplit("_", 1)[0]

    @property
    def split(self) -> str:
        if self.is_custom:
            return Path(self.benchmark[len(CUSTOM_PREFIX):]).stem
        return "eval" if self.benchmark == "groundingsuite" else self.benchmark.rsplit("_", 1)[1]

    @property
    def token(self) -> str:
        """The benchmark as given on the command line (``reasonseg_val:cot``); predictions files use it."""
        return self.benchmark + (COT_SUFFIX if self.cot else "")

    @property
    def is_gres(self) -> bool:
        """gRefCOCO (generalized RES): no-target answers are allowed and GRES metrics reported."""
        return self.dataset == "grefcoco"

    @property
    def name(self) -> str:
        """File-safe split name, e.g. ``refcoco+_testA``, ``reasonseg_val_cot``, ``custom_mydata``."""
        base = f"custom_{self.split}" if self.is_custom else self.benchmark
        return re.sub(r"[^A-Za-z0-9_+-]", "_", base) + ("_cot" if self.cot else "")

    @property
    def is_reasonseg(self) -> bool:
        return self.dataset == "reasonseg"

    @property
    def llm_longest_side(self) -> int | None:
        """ReasonSeg images are capped at 640 px (longest side) before smart_resize, as upstream."""
        return REASONSEG_LONGEST_SIDE if self.is_reasonseg else None

    @property
    def template(self) -> str:
        return COT_TEMPLATE if self.cot else PLAIN_TEMPLATE

    def loader_kwargs(self, protocol: str) -> dict[str, Any]:
        """GroundingSuite: upstream caption cleanup under ``lens``, the raw caption under ``standard``."""
        if self.dataset == "groundingsuite":
            return {"upstream_caption_cleanup": protocol == "lens"}
        return {}


def valid_benchmark_names() -> list[str]:
    return sorted(BENCHMARKS)


def parse_benchmarks(names: Iterable[str], cot: bool = False) -> list[SplitSpec]:
    """Validate names (``name``, ``name:cot``, ``custom:<path.jsonl>[:cot]``); ``cot`` adds CoT to all."""
    specs: list[SplitSpec] = []
    for raw in names:
        for token in str(raw).split(","):
            token = token.strip()
            if not token:
                continue
            with_cot = token.endswith(COT_SUFFIX)
            name = token[: -len(COT_SUFFIX)] if with_cot else token
            if not name.startswith(CUSTOM_PREFIX) and name not in BENCHMARKS:
                raise ValueError(
                    f"unknown benchmark {name!r}; valid names: {', '.join(valid_benchmark_names())}, "
                    f"or custom:<path.jsonl>; append ':cot' for chain-of-thought prompting"
                )
            spec = SplitSpec(name, with_cot or cot)
            if spec not in specs:
                specs.append(spec)
    names_seen = [s.name for s in specs]
    clash = sorted({n for n in names_seen if names_seen.count(n) > 1})
    if clash:
        raise ValueError(f"benchmarks map to the same output name(s) {clash}; rename the custom files")
    if not specs:
        raise ValueError("no benchmarks given")
    return specs


def allows_no_target(spec: SplitSpec, refs: Sequence[Reference]) -> bool:
    """gRefCOCO, or any data whose references carry ``meta["no_target"]`` (e.g. custom JSONL)."""
    return spec.is_gres or any("no_target" in ref.meta for ref in refs)


@dataclass(frozen=True)
class Expression:
    """One scored expression: ``ref.expressions[index]`` against ``ref``'s mask."""

    id: str
    ref: Reference
    index: int

    @property
    def text(self) -> str:
        return self.ref.expressions[self.index]

    @property
    def image_key(self) -> str:
        return self.ref.image_key


def build_expressions(
    refs: Sequence[Reference], spec: SplitSpec, protocol: str | None, limit: int | None
) -> list[Expression]:
    """Expand, apply protocol rules (``lens`` ReasonSeg: first text only), ``limit``, order by image.

    ``protocol=None`` and ``limit=None``: every expression of the data (used to tell a prediction for an
    expression that this protocol or limit leaves out from one that names nothing in the data).
    """
    pairs = expand_expressions(refs)
    if protocol == "lens" and spec.is_reasonseg:
        pairs = [(ref, i) for ref, i in pairs if i == 0]
    if limit is not None:
        pairs = pairs[:limit]
    exprs = [Expression(f"{ref.ref_id}#{i}", ref, i) for ref, i in pairs]
    ids = [e.id for e in exprs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{spec.benchmark}: duplicate reference id {dup.rsplit('#', 1)[0]!r}")
    return order_by_image(exprs)


def order_by_image(exprs: Sequence[Expression]) -> list[Expression]:
    """Stable reorder so that expressions of one image are adjacent (images in first-seen order)."""
    first: dict[str, int] = {}
    for k, e in enumerate(exprs):
        first.setdefault(e.image_key, k)
    return sorted(exprs, key=lambda e: first[e.image_key])


def make_batches(n: int, batch_size: int) -> list[list[int]]:
    """Consecutive index batches over the image-ordered expressions."""
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


def shard_batches(batches: Sequence[list[int]], rank: int, world: int) -> list[list[int]]:
    """Round-robin batches over ranks: every batch goes to exactly one rank, nothing is padded."""
    return list(batches[rank::world])


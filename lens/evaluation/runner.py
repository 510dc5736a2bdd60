"""Benchmark evaluation runner: references -> batched :class:`Segmenter` -> per-expression records -> metrics.

Per split: load the references, expand them to scored expressions (protocol rules), order them by
image, cut the ordered list into batches of ``batch_size`` and deal the batches round-robin to the
ranks (no padding, no duplication; every batch is computed exactly as a single process would).
Each finished batch appends its records to ``<out>/<split>.partial[.rankR].jsonl``; a restarted
run skips the recorded ids. Rank 0 gathers all records, computes the metrics and writes
``<out>/<split>.json`` atomically; at the end ``results.json`` and ``results.md``.

File stems carry a suffix so runs never clobber each other: ``.standard`` for the standard
protocol and ``.limitN`` for ``--limit N`` smoke runs (e.g. ``refcoco_val.limit32.json``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import json
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lens.data.base import Reference
from lens.data.dataset import expand_expressions
from lens.data.registry import BENCHMARKS, CUSTOM_PREFIX, EVAL_BENCHMARKS, load_benchmark
from lens.evaluation.metrics import PROTOCOLS, SegmentationMetrics, expression_iou, intersection_union
from lens.geometry import box_iou

PLAIN_TEMPLATE, COT_TEMPLATE = "pr1_grounding", "samr1_v4"
COT_SUFFIX = ":cot"
REASONSEG_LONGEST_SIDE = 640
DEFAULT_MAX_NEW_TOKENS = {False: 256, True: 512}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def log(msg: str, rank: int = 0) -> None:
    """Progress messages on stderr, rank 0 only."""
    if rank == 0:
        print(f"[lens.evaluation] {msg}", file=sys.stderr, flush=True)


# ============================================================================ configuration


@dataclass
class EvalConfig:
    """Resolved evaluation options (CLI flags and ``configs/eval/*.yaml`` keys share these names)."""

    model: str | None = None
    benchmarks: list[str] = field(default_factory=lambda: list(EVAL_BENCHMARKS))
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

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EvalConfig:
        """Build from a dict (YAML keys may use ``-`` or ``_``); unknown keys raise ``ValueError``."""
        names = {f.name for f in fields(cls)}
        clean = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(clean) - names)
        if unknown:
            raise ValueError(f"unknown evaluation option(s) {unknown}; valid: {sorted(names)}")
        if isinstance(clean.get("benchmarks"), str):
            clean["benchmarks"] = [clean["benchmarks"]]
        return cls(**clean)

    def validate(self) -> None:
        """Raise ``ValueError`` for missing or out-of-range options."""
        if not self.model:
            raise ValueError("no model given: pass --model <checkpoint folder or preset name> "
                             "(or 'model:' in the YAML)")
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
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; valid: auto, {', '.join(DTYPES)}")
        if not self.benchmarks:
            raise ValueError("no benchmarks given")

    @property
    def suffix(self) -> str:
        """File-stem suffix: ``.standard`` for the standard protocol, ``.limitN`` for smoke runs."""
        return ("" if self.protocol == "lens" else f".{self.protocol}") + (f".limit{self.limit}" if self.limit else "")

    def out_dir(self) -> Path:
        """``--out``, else ``<model>/evaluations`` for a checkpoint or ``outputs/eval/<preset>``."""
        if self.out:
            return Path(self.out)
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
    return model if is_preset(model) else Path(model).resolve().name


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


def build_expressions(refs: Sequence[Reference], spec: SplitSpec, protocol: str, limit: int | None) -> list[Expression]:
    """Expand, apply protocol rules (``lens`` ReasonSeg: first text only), ``limit``, order by image."""
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


# ============================================================================ distributed


@dataclass
class DistContext:
    """Rank information; collectives are no-ops in a single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def from_env(cls, device: str) -> DistContext:
        """Init the process group when torchrun / accelerate env vars are set (nccl on CUDA, gloo on CPU)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        if "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=_dt.timedelta(hours=3))
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)

    @property
    def active(self) -> bool:
        import torch.distributed as dist

        return self.world > 1 and dist.is_initialized()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def resolve_device(device: str, local_rank: int) -> str:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; bare ``cuda`` gets the local rank."""
    if device == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    return f"cuda:{local_rank}" if device == "cuda" else device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[dtype]


# ============================================================================ files: atomic JSON, partial records


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def partial_path(out: Path, stem: str, rank: int) -> Path:
    return out / (f"{stem}.partial.jsonl" if rank == 0 else f"{stem}.partial.rank{rank}.jsonl")


def partial_files(out: Path, stem: str) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(out / f"{glob.escape(stem)}.partial*.jsonl")))


def read_partial(path: Path, signature: dict[str, Any]) -> list[dict[str, Any]]:
    """Records of one partial file; its header must match ``signature``. A torn last line is dropped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if k == len(lines) - 1:
                log(f"{path}: dropping an incomplete last line (interrupted write)")
                continue
            raise ValueError(f"{path}:{k + 1}: corrupt record line; delete the file or pass --overwrite") from None
        if "header" in obj:
            check_signature(obj["header"], signature, path)
        else:
            records.append(obj)
    return records


def check_signature(found: dict[str, Any], expected: dict[str, Any], where: Path) -> None:
    """Refuse to mix records or results made under different settings."""
    diff = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: {a!r} there vs {b!r} now" for k, (a, b) in diff.items())
        raise ValueError(f"{where} was written with different settings ({detail}); "
                         "pass --overwrite or use another --out")


class PartialWriter:
    """Appends per-batch records (one JSON line each, flushed and fsynced) after a header line."""

    def __init__(self, path: Path, signature: dict[str, Any]) -> None:
        self.path, self.signature = path, signature
        self._fh = None

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        if self._fh is None:
            new = not self.path.exists() or self.path.stat().st_size == 0
            self._fh = open(self.path, "a", encoding="utf-8")
            if new:
                self._fh.write(json.dumps({"header": self.signature}) + "\n")
        self._fh.write("".join(json.dumps(r) + "\n" for r in records))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def split_files(out: Path, stem: str) -> list[Path]:
    """Everything a split writes (removed by ``--overwrite``)."""
    files = [out / f"{stem}.json", out / f"{stem}.predictions.jsonl", *partial_files(out, stem)]
    return [p for p in files if p.exists()]


# ============================================================================ per-batch work


def load_batch(exprs: Sequence[Expression]) -> tuple[list[Any], list[np.ndarray]]:
    """PIL images and RAW target masks for a batch (each image / mask decoded once)."""
    images: dict[str, Any] = {}
    masks: dict[str, np.ndarray] = {}
    for e in exprs:
        if e.image_key not in images:
            images[e.image_key] = e.ref.load_image()
        if e.ref.ref_id not in masks:
            masks[e.ref.ref_id] = e.ref.load_mask()
    return [images[e.image_key] for e in exprs], [masks[e.ref.ref_id] for e in exprs]


def prefetched(batches: Sequence[list[Expression]], load: Callable, depth: int = 2) -> Iterator[tuple[list, Any]]:
    """Yield ``(batch, load(batch))`` while the next ``depth`` batches load in worker threads."""
    with ThreadPoolExecutor(max_workers=depth) as pool:
        queue: deque = deque()
        it = iter(batches)
        for batch in it:
            queue.append((batch, pool.submit(load, batch)))
            if len(queue) > depth:
                head, future = queue.popleft()
                yield head, future.result()
        while queue:
            head, future = queue.popleft()
            yield head, future.result()


def encode_rles(masks: np.ndarray) -> list[dict[str, Any]]:
    """``(G, H, W)`` bool -> compressed COCO RLEs with str counts (one pycocotools call)."""
    from pycocotools import mask as coco_mask

    rles = coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def upsample_and_score(
    logits: torch.Tensor, targets: Sequence[np.ndarray], protocol: str
) -> tuple[list[int], list[int], list[dict[str, Any]]]:
    """Upsample each row to its target's size (one interpolate per size), ``> 0``, then I, U and RLE."""
    from lens.modeling.sam import upsample_masks

    n = len(targets)
    inters, unions, rles = [0] * n, [0] * n, [{}] * n
    groups: dict[tuple[int, int], list[int]] = {}
    for k, t in enumerate(targets):
        groups.setdefault(tuple(t.shape), []).append(k)
    for size, idx in groups.items():
        pred = upsample_masks(logits[idx], size) > 0
        tgt = torch.from_numpy(np.stack([targets[k] for k in idx])).to(pred.device)
        i, u = intersection_union(pred, tgt, protocol)
        for k, iv, uv, rle in zip(idx, i.tolist(), u.tolist(), encode_rles(pred.cpu().numpy())):
            inters[k], unions[k], rles[k] = iv, uv, rle
    return inters, unions, rles


def score_batch(
    out: Any, exprs: Sequence[Expression], targets: Sequence[np.ndarray], protocol: str
) -> list[dict[str, Any]]:
    """Per-expression records: I, U, box IoU in LLM pixels (gt converted as upstream), text, RLE."""
    from lens.data.transforms import box_to_llm_pixels

    for e, t, hw in zip(exprs, targets, out.orig_sizes):
        if tuple(t.shape) != tuple(hw):
            raise ValueError(f"{e.ref.ref_id}: mask size {tuple(t.shape)} differs from image "
                             f"{e.ref.image_path} size {tuple(hw)}")
    inters, unions, rles = upsample_and_score(out.mask_logits, targets, protocol)
    records = []
    for k, e in enumerate(exprs):
        gt = e.ref.target_box(targets[k])
        gt_llm = box_to_llm_pixels(gt, out.orig_sizes[k], out.llm_sizes[k]) if gt is not None else None
        records.append({
            "id": e.id, "I": inters[k], "U": unions[k],
            "box_iou": box_iou(out.boxes_llm[k], gt_llm) if gt_llm is not None else None,
            "text": out.texts[k], "box_llm": out.boxes_llm[k], "score": float(out.scores[k]),
            "orig_hw": list(out.orig_sizes[k]), "llm_hw": list(out.llm_sizes[k]), "rle": rles[k],
        })
    return records


@contextlib.contextmanager
def configured(segmenter: Any, **attrs: Any) -> Iterator[Any]:
    """Temporarily set Segmenter attributes (template, max_new_tokens, llm_longest_side)."""
    old = {k: getattr(segmenter, k) for k in attrs}
    for k, v in attrs.items():
        setattr(segmenter, k, v)
    try:
        yield segmenter
    finally:
        for k, v in old.items():
            setattr(segmenter, k, v)


def run_batches(
    segmenter: Any,
    exprs: Sequence[Expression],
    batches: Sequence[list[int]],
    cot: bool,
    protocol: str,
    writer: PartialWriter,
    progress: Any,
) -> list[dict[str, Any]]:
    """Run, score and record ``batches`` (lists of indices into ``exprs``)."""
    records: list[dict[str, Any]] = []
    for batch, (images, targets) in prefetched([[exprs[i] for i in b] for b in batches], load_batch):
        keys = [e.image_key for e in batch]
        out = segmenter.run_batch(images, [e.text for e in batch], cot=cot, image_keys=keys)
        new = score_batch(out, batch, targets, protocol)
        writer.write(new)
        records.extend(new)
        progress.update(len(batch))
    return records


# ============================================================================ one split


@dataclass
class SplitRun:
    """Everything one split evaluation needs."""

    spec: SplitSpec
    cfg: EvalConfig
    ctx: DistContext
    out: Path

    @property
    def stem(self) -> str:
        return self.spec.name + self.cfg.suffix

    @property
    def json_path(self) -> Path:
        return self.out / f"{self.stem}.json"

    @property
    def max_new_tokens(self) -> int:
        return self.cfg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[self.spec.cot]

    def signature(self) -> dict[str, Any]:
        """Settings that must match to reuse finished results or partial records."""
        return {
            "model": model_name(str(self.cfg.model)), "benchmark": self.spec.benchmark, "cot": self.spec.cot,
            "template": self.spec.template, "protocol": self.cfg.protocol, "limit": self.cfg.limit,
            "max_new_tokens": self.max_new_tokens, "llm_longest_side": self.spec.llm_longest_side,
        }


def plan_split(run: SplitRun) -> dict[str, Any]:
    """Rank 0: honour ``--overwrite``, return a finished result or the resumed records."""
    if run.cfg.overwrite:
        for path in split_files(run.out, run.stem):
            path.unlink()
    sig = run.signature()
    if run.json_path.exists():
        result = json.loads(run.json_path.read_text(encoding="utf-8"))
        check_signature(result.get("signature", {}), sig, run.json_path)
        return {"finished": result}
    records: dict[str, dict[str, Any]] = {}
    for path in partial_files(run.out, run.stem):
        for rec in read_partial(path, sig):
            records.setdefault(rec["id"], rec)
    return {"finished": None, "records": records}


def evaluate_split(run: SplitRun, get_segmenter: Callable[[], Any]) -> dict[str, Any]:
    """Evaluate one split (all ranks); returns the result dict (identical on every rank)."""
    ctx, spec, cfg = run.ctx, run.spec, run.cfg
    plan = plan_split(run) if ctx.rank == 0 else {"finished": None, "records": {}}
    finished = ctx.broadcast(plan["finished"])
    if finished is not None:
        log(f"{run.stem}: finished results found in {run.json_path}, skipping (--overwrite recomputes)", ctx.rank)
        return finished
    done = set(ctx.broadcast(sorted(plan["records"])))
    refs = load_benchmark(spec.benchmark, cfg.data_root, **spec.loader_kwargs(cfg.protocol))
    exprs = build_expressions(refs, spec, cfg.protocol, cfg.limit)
    check_resumed_ids(done, exprs, run)
    if done:
        log(f"{run.stem}: resuming, {len(done)}/{len(exprs)} expressions already recorded", ctx.rank)
    mine = shard_batches(make_batches(len(exprs), cfg.batch_size), ctx.rank, ctx.world)
    batches = [kept for b in mine if (kept := [i for i in b if exprs[i].id not in done])]
    segmenter = get_segmenter() if batches else None
    start = time.perf_counter()
    gathered = ctx.all_gather(compute_records(run, segmenter, exprs, batches))
    elapsed = time.perf_counter() - start
    result = None
    if ctx.rank == 0:
        computed = [r for part in gathered for r in part]
        result = finish_split(run, exprs, plan["records"], computed, elapsed)
    return ctx.broadcast(result)


def check_resumed_ids(done: set[str], exprs: Sequence[Expression], run: SplitRun) -> None:
    extra = done - {e.id for e in exprs}
    if extra:
        raise ValueError(
            f"{run.stem}: partial records hold {len(extra)} id(s) that are not in the data "
            f"(e.g. {sorted(extra)[0]!r}); the data changed: pass --overwrite"
        )


def compute_records(run: SplitRun, segmenter: Any, exprs: Sequence[Expression], batches: list[list[int]]) -> list[dict]:
    """This rank's batches, with a tqdm bar on rank 0 and records appended to its partial file."""
    from tqdm.auto import tqdm

    if not batches:
        return []
    writer = PartialWriter(partial_path(run.out, run.stem, run.ctx.rank), run.signature())
    total = sum(len(b) for b in batches)
    desc = run.stem if run.ctx.world == 1 else f"{run.stem} [rank 0/{run.ctx.world}]"
    progress = tqdm(total=total, desc=desc, unit="expr", disable=run.ctx.rank != 0, file=sys.stderr)
    attrs = dict(template=PLAIN_TEMPLATE, cot_template=COT_TEMPLATE, max_new_tokens=run.max_new_tokens,
                 llm_longest_side=run.spec.llm_longest_side)
    try:
        with configured(segmenter, **attrs):
            return run_batches(segmenter, exprs, batches, run.spec.cot, run.cfg.protocol, writer, progress)
    finally:
        writer.close()
        progress.close()


def finish_split(
    run: SplitRun, exprs: Sequence[Expression], resumed: dict[str, dict], computed: list[dict], elapsed: float
) -> dict[str, Any]:
    """Rank 0: merge, order, compute metrics, write ``<split>.json`` (+ predictions, overlays)."""
    by_id = dict(resumed)
    for rec in computed:
        by_id.setdefault(rec["id"], rec)
    missing = [e.id for e in exprs if e.id not in by_id]
    if missing:
        raise RuntimeError(f"{run.stem}: {len(missing)} expression(s) have no record (e.g. {missing[0]!r})")
    records = [by_id[e.id] for e in exprs]
    metrics = SegmentationMetrics.from_records(records, run.cfg.protocol).compute()
    result = split_result(run, metrics, len(computed), elapsed)
    if run.cfg.save_predictions:
        write_predictions(run.out / f"{run.stem}.predictions.jsonl", exprs, records)
    if run.cfg.save_overlays:
        save_overlays(run.out / "overlays" / run.stem, exprs, records, run.cfg.save_overlays, run.cfg.protocol)
    write_json_atomic(run.json_path, result)
    log(f"{run.stem}: n={result['n']} cIoU={result['ciou']:.4f} gIoU={result['giou']:.4f} -> {run.json_path}")
    return result


def split_result(run: SplitRun, metrics: dict[str, Any], n_computed: int, elapsed: float) -> dict[str, Any]:
    spec, cfg = run.spec, run.cfg
    return {
        "name": spec.name, "benchmark": spec.benchmark, "dataset": spec.dataset, "split": spec.split,
        "cot": spec.cot, "template": spec.template, "protocol": cfg.protocol, "model": str(cfg.model),
        "n": metrics["n"], "ciou": metrics["ciou"], "giou": metrics["giou"],
        "box_acc": metrics["box_acc"], "box_miou": metrics["box_miou"], "n_box": metrics["n_box"],
        "time_s": elapsed, "n_computed": n_computed,
        "expressions_per_s": n_computed / elapsed if elapsed > 0 and n_computed else None,
        "limit": cfg.limit, "batch_size": cfg.batch_size, "max_new_tokens": run.max_new_tokens,
        "llm_longest_side": spec.llm_longest_side, "world_size": run.ctx.world, "data_root": str(cfg.data_root),
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "signature": run.signature(),
    }


# ============================================================================ predictions and overlays


def write_predictions(path: Path, exprs: Sequence[Expression], records: Sequence[dict]) -> None:
    """One JSON line per expression: ids, expression, answer text, boxes (LLM and original px), IoU, RLE."""
    from lens.data.transforms import box_from_llm_pixels

    lines = []
    for e, r in zip(exprs, records):
        box = box_from_llm_pixels(r["box_llm"], r["llm_hw"], r["orig_hw"]) if r["box_llm"] else None
        lines.append(json.dumps({
            "id": e.id, "ref_id": e.ref.ref_id, "image": str(e.ref.image_path), "expression": e.text,
            "text": r["text"], "box_llm": r["box_llm"], "box": box, "score": r["score"],
            "I": r["I"], "U": r["U"], "iou": expression_iou(r["I"], r["U"]), "box_iou": r["box_iou"], "mask": r["rle"],
        }))
    write_atomic(path, "\n".join(lines) + "\n")


def pick_extremes(records: Sequence[dict], k: int) -> list[tuple[str, int, int]]:
    """``(kind, position, index)`` of the ``k`` best and ``k`` worst expressions by IoU (ties: earlier first)."""
    ious = np.array([expression_iou(r["I"], r["U"]) for r in records])
    best = np.argsort(-ious, kind="stable")[:k]
    worst = np.argsort(ious, kind="stable")[:k]
    return [("best", p, int(i)) for p, i in enumerate(best)] + [("worst", p, int(i)) for p, i in enumerate(worst)]


def save_overlays(folder: Path, exprs: Sequence[Expression], records: Sequence[dict], k: int, protocol: str) -> None:
    """PNG per picked expression: prediction overlay (left) next to the ground truth (right)."""
    from PIL import Image
    from pycocotools import mask as coco_mask

    from lens.data.transforms import box_from_llm_pixels
    from lens.evaluation.metrics import foreground_mask
    from lens.visualize import overlay

    folder.mkdir(parents=True, exist_ok=True)
    for kind, pos, i in pick_extremes(records, k):
        e, r = exprs[i], records[i]
        image, raw = e.ref.load_image(), e.ref.load_mask()
        rle = {"size": r["rle"]["size"], "counts": r["rle"]["counts"].encode("ascii")}
        pred = coco_mask.decode(rle).astype(bool)
        box = box_from_llm_pixels(r["box_llm"], r["llm_hw"], r["orig_hw"]) if r["box_llm"] else None
        iou = expression_iou(r["I"], r["U"])
        left = overlay(image, pred, box, f"IoU {iou:.3f} | {e.text} -> {r['text']}")
        gt = foreground_mask(torch.from_numpy(raw), protocol)[0].numpy()
        right = overlay(image, gt, e.ref.target_box(raw), f"GT | {e.text}")
        canvas = Image.new("RGB", (left.width * 2, left.height))
        canvas.paste(left, (0, 0))
        canvas.paste(right, (left.width, 0))
        safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", e.id)
        canvas.save(folder / f"{kind}_{pos:02d}_iou{iou:.3f}_{safe}.png")


# ============================================================================ whole run


def collect_results(out: Path, suffix: str, current: dict[str, dict], model: str, protocol: str) -> dict[str, dict]:
    """This run's results plus other finished splits in ``out`` with the same suffix, model and protocol."""
    merged = dict(current)
    pattern = re.compile(r"^([A-Za-z0-9_+-]+)" + re.escape(suffix) + r"\.json$")
    for path in sorted(out.glob("*.json")):
        m = pattern.match(path.name)
        if not m or m.group(1) in merged or m.group(1) in ("results", "config"):
            continue
        try:
            res = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError):
            continue
        sig = res.get("signature", {}) if isinstance(res, dict) else {}
        if sig.get("model") == model and sig.get("protocol") == protocol:
            merged[m.group(1)] = res
    return merged


def write_config(out: Path, cfg: EvalConfig, extra: dict[str, Any]) -> None:
    import yaml

    write_atomic(out / f"config{cfg.suffix}.yaml", yaml.safe_dump({**cfg.to_dict(), **extra}, sort_keys=False))


def run_evaluation(cfg: EvalConfig, segmenter: Any = None) -> dict[str, dict]:
    """Evaluate every benchmark of ``cfg``; returns ``{split name: result}`` (also on non-zero ranks).

    ``segmenter``: an already loaded :class:`~lens.inference.Segmenter` (else built from ``cfg.model``
    on first need, so re-rendering finished results loads no model).
    """
    cfg.validate()
    specs = parse_benchmarks(cfg.benchmarks, cfg.cot)
    device0 = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    ctx = DistContext.from_env(device0)
    try:
        device = resolve_device(cfg.device, ctx.local_rank)
        dtype = resolve_dtype(cfg.dtype, device)
        out = cfg.out_dir()
        if ctx.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            write_config(out, cfg, {"resolved_device": device, "resolved_dtype": str(dtype).replace("torch.", ""),
                                    "world_size": ctx.world})
        cache: dict[str, Any] = {"seg": segmenter}

        def get_segmenter() -> Any:
            if cache["seg"] is None:
                from lens.inference import Segmenter

                log(f"loading {cfg.model} on {device} ({dtype})", ctx.rank)
                cache["seg"] = Segmenter.from_pretrained(str(cfg.model), device=device, dtype=dtype)
            return cache["seg"]

        results = {s.name: evaluate_split(SplitRun(s, cfg, ctx, out), get_segmenter) for s in specs}
        if ctx.rank == 0:
            write_summary(out, cfg, results)
        return results
    finally:
        ctx.close()


def write_summary(out: Path, cfg: EvalConfig, results: dict[str, dict]) -> None:
    """``results<suffix>.json`` and the paper-style ``results<suffix>.md``."""
    from lens.evaluation.report import results_markdown

    name = model_name(str(cfg.model))
    merged = collect_results(out, cfg.suffix, results, name, cfg.protocol)
    summary = {"model": str(cfg.model), "protocol": cfg.protocol, "limit": cfg.limit, "splits": merged}
    write_json_atomic(out / f"results{cfg.suffix}.json", summary)
    write_atomic(out / f"results{cfg.suffix}.md", results_markdown(merged, str(cfg.model), cfg.protocol, cfg.limit))
    log(f"wrote {out / f'results{cfg.suffix}.json'} and results{cfg.suffix}.md")

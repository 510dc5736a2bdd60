"""Benchmark evaluation runner: references -> batched :class:`Segmenter` -> per-expression records -> metrics.

Per split: load the references, expand them to scored expressions (protocol rules), order them by
image, cut the ordered list into batches of ``batch_size`` and deal the batches round-robin to the
ranks (no padding, no duplication; every batch is computed exactly as a single process would).
Each finished batch appends its records to ``<out>/<split>.partial[.rankR].jsonl``; a restarted
run skips the recorded ids. Rank 0 gathers all records, computes the metrics and writes
``<out>/<split>.json`` atomically; at the end ``results.json`` and ``results.md``.

With ``--predictions FILE_OR_DIR`` no model is loaded: the lines of a predictions file (LENS's
``--save-predictions`` output or another system's masks, see :mod:`lens.evaluation.predictions`)
become the records, scored with the same loaders, protocols and metrics.

File stems carry a suffix so runs never clobber each other: ``.standard`` for the standard
protocol and ``.limitN`` for ``--limit N`` smoke runs (e.g. ``refcoco_val.limit32.json``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lens.data.registry import EVAL_BENCHMARKS, load_benchmark
from lens.evaluation.analysis import box_mask_analysis, gres_metrics
from lens.evaluation.batches import configured, run_batches
from lens.evaluation.config import (  # noqa: F401  (re-exported: tools and tests import them from here)
    COT_TEMPLATE,
    DEFAULT_MAX_NEW_TOKENS,
    PLAIN_TEMPLATE,
    REASONSEG_LONGEST_SIDE,
    EvalConfig,
    Expression,
    SplitSpec,
    allows_no_target,
    build_expressions,
    is_preset,
    log,
    make_batches,
    model_name,
    order_by_image,
    parse_benchmarks,
    shard_batches,
    valid_benchmark_names,
)
from lens.evaluation.distributed import DTYPES, DistContext, resolve_device, resolve_dtype  # noqa: F401
from lens.evaluation.files import (
    PartialWriter,
    check_signature,
    partial_files,
    partial_path,
    read_partial,
    split_files,
    write_atomic,
    write_json_atomic,
)
from lens.evaluation.metrics import SegmentationMetrics
from lens.evaluation.overlays import pick_extremes, save_overlays  # noqa: F401
from lens.evaluation.predictions import prediction_line

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
        if self.cfg.predictions:
            return {"model": self.cfg.label, "benchmark": self.spec.benchmark, "cot": self.spec.cot,
                    "protocol": self.cfg.protocol, "limit": self.cfg.limit,
                    "predictions": str(Path(self.cfg.predictions).resolve()), "allow_missing": self.cfg.allow_missing}
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
    gathered = ctx.all_gather(compute_records(run, segmenter, exprs, batches, allows_no_target(spec, refs)))
    elapsed = time.perf_counter() - start
    result = None
    if ctx.rank == 0:
        computed = [r for part in gathered for r in part]
        by_id = dict(plan["records"])
        for rec in computed:
            by_id.setdefault(rec["id"], rec)
        missing = [e.id for e in exprs if e.id not in by_id]
        if missing:
            raise RuntimeError(f"{run.stem}: {len(missing)} expression(s) have no record (e.g. {missing[0]!r})")
        result = finish_split(run, exprs, [by_id[e.id] for e in exprs], allows_no_target(spec, refs),
                              len(computed), elapsed)
    return ctx.broadcast(result)


def check_resumed_ids(done: set[str], exprs: Sequence[Expression], run: SplitRun) -> None:
    extra = done - {e.id for e in exprs}
    if extra:
        raise ValueError(
            f"{run.stem}: partial records hold {len(extra)} id(s) that are not in the data "
            f"(e.g. {sorted(extra)[0]!r}); the data changed: pass --overwrite"
        )


def compute_records(run: SplitRun, segmenter: Any, exprs: Sequence[Expression], batches: list[list[int]],
                    no_target_ok: bool = False) -> list[dict]:
    """This rank's batches, with a tqdm bar on rank 0 and records appended to its partial file."""
    import sys

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
            return run_batches(segmenter, exprs, batches, run.spec.cot, run.cfg.protocol, writer, progress,
                               no_target_ok)
    finally:
        writer.close()
        progress.close()


def with_target_info(e: Expression, rec: dict[str, Any]) -> dict[str, Any]:
    """The record plus the ground-truth facts GRES needs (``no_target``, ``target_count``, ``pred_area``)."""
    rec = dict(rec)
    rec["no_target"] = bool(e.ref.meta.get("no_target", False))
    rec["target_count"] = e.ref.meta.get("target_count")
    if rec.get("pred_area") is None:  # records written before the area was kept: recompute it from the RLE
        from pycocotools import mask as coco_mask

        counts = rec["rle"]["counts"]
        rec["pred_area"] = int(coco_mask.area({"size": rec["rle"]["size"], "counts": counts.encode("ascii")}))
    return rec


def finish_split(
    run: SplitRun, exprs: Sequence[Expression], records: list[dict], no_target_ok: bool, n_computed: int,
    elapsed: float, extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Rank 0: metrics of ``records`` (one per ``exprs`` entry, same order), write ``<split>.json``
    (+ predictions, overlays)."""
    records = [with_target_info(e, r) for e, r in zip(exprs, records)]
    metrics = SegmentationMetrics.from_records(records, run.cfg.protocol).compute()
    result = split_result(run, metrics, n_computed, elapsed)
    if no_target_ok:
        result["gres"] = gres_metrics(records)
    bvm = box_mask_analysis(records)
    if bvm is not None:
        result["box_vs_mask"] = bvm
    result.update(extra or {})
    if run.cfg.save_predictions:
        lines = [json.dumps(prediction_line(run.spec, e, r)) for e, r in zip(exprs, records)]
        write_atomic(run.out / f"{run.stem}.predictions.jsonl", "".join(line + "\n" for line in lines))
    if run.cfg.save_overlays:
        save_overlays(run.out / "overlays" / run.stem, exprs, records, run.cfg.save_overlays, run.cfg.protocol,
                      run.cfg.overlays_filter)
    write_json_atomic(run.json_path, result)
    log(f"{run.stem}: n={result['n']} cIoU={result['ciou']:.4f} gIoU={result['giou']:.4f} -> {run.json_path}")
    return result


def split_result(run: SplitRun, metrics: dict[str, Any], n_computed: int, elapsed: float) -> dict[str, Any]:
    spec, cfg = run.spec, run.cfg
    return {
        "name": spec.name, "benchmark": spec.benchmark, "dataset": spec.dataset, "split": spec.split,
        "cot": spec.cot, "template": spec.template, "protocol": cfg.protocol,
        "model": str(cfg.model) if cfg.model else cfg.label,
        "n": metrics["n"], "ciou": metrics["ciou"], "giou": metrics["giou"],
        "box_acc": metrics["box_acc"], "box_miou": metrics["box_miou"], "n_box": metrics["n_box"],
        "time_s": elapsed, "n_computed": n_computed,
        "expressions_per_s": n_computed / elapsed if elapsed > 0 and n_computed else None,
        "limit": cfg.limit, "batch_size": cfg.batch_size, "max_new_tokens": run.max_new_tokens,
        "llm_longest_side": spec.llm_longest_side, "world_size": run.ctx.world, "data_root": str(cfg.data_root),
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "signature": run.signature(),
    }


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
    on first need, so re-rendering finished results loads no model). With ``cfg.predictions`` no
    model is used at all.
    """
    cfg.validate()
    if cfg.predictions:
        from lens.evaluation.from_predictions import run_predictions

        return run_predictions(cfg)
    specs = parse_benchmarks(cfg.benchmarks or EVAL_BENCHMARKS, cfg.cot)
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


def write_summary(out: Path, cfg: EvalConfig, results: dict[str, dict], extra: dict[str, Any] | None = None) -> None:
    """``results<suffix>.json`` and the paper-style ``results<suffix>.md``."""
    from lens.evaluation.report import results_markdown

    merged = collect_results(out, cfg.suffix, results, cfg.label, cfg.protocol)
    label = str(cfg.model) if cfg.model else cfg.label
    summary = {"model": label, "protocol": cfg.protocol, "limit": cfg.limit, **(extra or {}), "splits": merged}
    write_json_atomic(out / f"results{cfg.suffix}.json", summary)
    write_atomic(out / f"results{cfg.suffix}.md", results_markdown(merged, label, cfg.protocol, cfg.limit))
    log(f"wrote {out / f'results{cfg.suffix}.json'} and results{cfg.suffix}.md")

"""``--predictions``: score a predictions file or folder with the same loaders, protocols and metrics as
a model run, in one process and without loading a model (format: :mod:`lens.evaluation.predictions`)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from lens.data.registry import load_benchmark
from lens.evaluation.config import EvalConfig, SplitSpec, allows_no_target, build_expressions, log, parse_benchmarks
from lens.evaluation.distributed import DistContext
from lens.evaluation.files import split_files, write_json_atomic
from lens.evaluation.predictions import (
    PredictionError,
    PredLine,
    benchmarks_in,
    check_matching,
    lines_for,
    match_predictions,
    read_predictions,
    score_line,
)
from lens.evaluation.runner import SplitRun, finish_split, write_config, write_summary


def evaluate_predictions_split(run: SplitRun, lines: list[PredLine]) -> dict[str, Any]:
    """Score the predictions of one split (one process, no model): match, check, score, finish."""
    from lens.data.groundingsuite import clean_caption_upstream

    spec, cfg = run.spec, run.cfg
    if run.json_path.exists():
        old = json.loads(run.json_path.read_text(encoding="utf-8")).get("signature", {})
        if "predictions" not in old and not cfg.overwrite:
            raise ValueError(f"{run.json_path} holds a model run's results; scoring predictions would replace them: "
                             "pass another --out (or --overwrite)")
    for path in split_files(run.out, run.stem):
        path.unlink()
    start = time.perf_counter()
    refs = load_benchmark(spec.benchmark, cfg.data_root, **spec.loader_kwargs(cfg.protocol))
    scored = build_expressions(refs, spec, cfg.protocol, cfg.limit)
    every = build_expressions(refs, spec, None, None)
    lens_gs = spec.dataset == "groundingsuite" and cfg.protocol == "lens"
    mine = lines_for(spec, lines)
    matching = match_predictions(mine, scored, every, clean_caption_upstream if lens_gs else None)
    issues_path = run.out / f"{run.stem}.prediction_issues.json"
    write_json_atomic(issues_path, {"split": run.stem, "n_expected": len(scored), "n_lines": len(mine),
                                    **matching.issues()})
    check_matching(matching, run.stem, len(scored), cfg.allow_missing, issues_path)
    covered = [e for e in scored if e.id in matching.matched]
    if not covered:
        raise PredictionError(f"{run.stem}: no expression has a prediction; every issue is listed in {issues_path}")
    records, masks = [], {}
    for e in covered:
        if e.ref.ref_id not in masks:
            masks = {e.ref.ref_id: e.ref.load_mask()}  # expressions are ordered by image: one mask at a time
        records.append(score_line(matching.matched[e.id], e, masks[e.ref.ref_id], cfg.protocol))
    counts = matching.counts()
    coverage = {"n_expected": len(scored), "n_scored": len(covered), "coverage": len(covered) / len(scored),
                "files": sorted({str(pl.file) for pl in mine}), "issues_file": str(issues_path), **counts}
    times = [r["time_s"] for r in records]
    if all(t is not None for t in times):
        coverage["prediction_time_s"] = float(sum(times))
    for kind, key in (("missing", "n_missing"), ("duplicate", "n_duplicate"), ("excluded", "n_excluded"),
                      ("ambiguous", "n_ambiguous")):
        if counts[key]:
            log(f"{run.stem}: {counts[key]} {kind} prediction(s), listed in {issues_path}")
    return finish_split(run, covered, records, allows_no_target(spec, refs), len(records),
                        time.perf_counter() - start, {"predictions": coverage})


def prediction_specs(cfg: EvalConfig, lines: list[PredLine]) -> tuple[list[SplitSpec], dict[str, int]]:
    """The splits to score (``--benchmarks``, else every benchmark in the file) and the lines left out."""
    if cfg.benchmarks:
        specs = parse_benchmarks(cfg.benchmarks, cfg.cot)
    else:
        specs = []
        for name in benchmarks_in(lines):
            try:
                specs += [s for s in parse_benchmarks([name], cfg.cot) if s not in specs]
            except ValueError as exc:
                first = next(pl for pl in lines if pl.data["benchmark"] == name)
                raise PredictionError(f"{first.where}: field 'benchmark': {exc}") from None
    keys = {k for s in specs for k in (s.token, s.name)}
    ignored: dict[str, int] = {}
    for pl in lines:
        if pl.data["benchmark"] not in keys:
            ignored[pl.data["benchmark"]] = ignored.get(pl.data["benchmark"], 0) + 1
    return specs, ignored


def run_predictions(cfg: EvalConfig) -> dict[str, dict]:
    """Score a predictions file or folder: same loaders, protocols and metrics, one process, no model."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--predictions runs in one process (no model); start it without torchrun (GPUS=0)")
    lines = read_predictions(cfg.predictions)
    specs, ignored = prediction_specs(cfg, lines)
    out = cfg.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, cfg, {"world_size": 1, "n_prediction_lines": len(lines)})
    if ignored:
        log(f"ignoring {sum(ignored.values())} prediction line(s) of benchmarks not requested: {ignored}")
    ctx = DistContext()
    results = {s.name: evaluate_predictions_split(SplitRun(s, cfg, ctx, out), lines) for s in specs}
    write_summary(out, cfg, results, {"predictions": str(cfg.predictions), "ignored_lines": ignored})
    return results

#!/usr/bin/env python
"""Evaluation throughput (expressions/s) of the runner at several batch sizes, same expressions, same process.

Runs are interleaved (b16, b1, b16, b1, ...) after one warm-up so that load changes on the machine
hit every batch size alike; the median over repeats is reported. Time = the runner's own per-split
wall time (data loading, generation, query forward, upsampling, scoring, partial-record writes).

Example (CPU, tiny preset, synthetic data generated on the fly):
    python tools/eval_throughput.py --model tiny --benchmark refcoco_val --limit 64 --batch-sizes 16 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

try:
    from lens.evaluation.runner import EvalConfig, run_evaluation
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lens.evaluation.runner import EvalConfig, run_evaluation


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="checkpoint folder or preset (default: tiny)")
    p.add_argument("--data-root", type=Path, help="dataset root (default: synthetic data in a temp dir)")
    p.add_argument("--benchmark", default="refcoco_val")
    p.add_argument("--limit", type=int, default=64, help="expressions per run")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 1])
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    return p.parse_args(argv)


def synthetic_root(tmp: Path) -> Path:
    from lens.data.synthetic import generate_synthetic

    root = tmp / "synthetic"
    generate_synthetic(root, seed=0, n_train=1, n_val=24, n_test=8, image_size=224)
    return root


def measure(args: argparse.Namespace, data_root: Path, tmp: Path, segmenter) -> dict[int, list[float]]:
    """``{batch_size: [expressions/s per repeat]}`` (one unrecorded warm-up run first)."""
    speeds: dict[int, list[float]] = {b: [] for b in args.batch_sizes}
    plan = [(0, args.batch_sizes[0])] + [(r + 1, b) for r in range(args.repeats) for b in args.batch_sizes]
    for rep, bs in plan:
        cfg = EvalConfig(model=args.model, benchmarks=[args.benchmark], data_root=str(data_root), limit=args.limit,
                         out=str(tmp / f"run{rep}_b{bs}"), batch_size=bs, max_new_tokens=args.max_new_tokens,
                         device=args.device, dtype=args.dtype)
        res = next(iter(run_evaluation(cfg, segmenter).values()))
        if rep:
            speeds[bs].append(res["expressions_per_s"])
        print(f"{'warm-up' if not rep else f'repeat {rep}'}: batch {bs:>3}: n={res['n']} "
              f"{res['expressions_per_s']:.2f} expr/s ({res['time_s']:.2f} s)", file=sys.stderr)
    return speeds


def main(argv: list[str] | None = None) -> int:
    import torch

    from lens.evaluation.runner import resolve_device, resolve_dtype
    from lens.inference import Segmenter

    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        data_root = args.data_root or synthetic_root(tmp)
        device = resolve_device(args.device, 0)
        seg = Segmenter.from_pretrained(args.model, device=device, dtype=resolve_dtype(args.dtype, device))
        speeds = measure(args, data_root, tmp, seg)
    medians = {b: statistics.median(v) for b, v in speeds.items()}
    base = medians[args.batch_sizes[-1]]
    print(f"\n{args.model} on {device} ({torch.get_num_threads()} threads), {args.benchmark}, "
          f"{args.limit} expressions, max_new_tokens={args.max_new_tokens}, median of {args.repeats}:")
    for b, m in medians.items():
        print(f"  batch {b:>3}: {m:8.2f} expressions/s  (x{m / base:.2f} vs batch {args.batch_sizes[-1]}; "
              f"runs: {', '.join(f'{v:.2f}' for v in speeds[b])})")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "device": device, "benchmark": args.benchmark,
                                         "limit": args.limit, "max_new_tokens": args.max_new_tokens,
                                         "expressions_per_s": {str(b): v for b, v in speeds.items()},
                                         "median": {str(b): m for b, m in medians.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

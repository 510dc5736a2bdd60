"""Command line, data and checkpoint preparation, the worker subprocesses, and the final summary."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import __doc__ as DOC
from .evaluation import EVAL_MODES, compare_eval, eval_summary, eval_worker, runner_worker, summarize_eval
from .grpo_step import GRPO_FLOWS, grpo_summary, grpo_worker, summarize_grpo

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "tools" / "benchmark.py"  # what the workers re-invoke

# Per-preset defaults (a command-line value wins).
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": dict(device="cpu", prompts=2, generations=4, micro_batch=8, new_tokens=64, eval_new_tokens=32,
                 eval_exprs=32, image_size=160, steps=3, queries=64, recipe="configs/recipes/tiny/stage2.yaml"),
    "qwen2.5-vl-3b": dict(device="cuda", prompts=8, generations=8, micro_batch=8, new_tokens=64, eval_new_tokens=32,
                          eval_exprs=64, image_size=480, steps=3, queries=64, recipe="configs/recipes/stage2.yaml"),
}
PARTS = ("grpo", "eval", "runner")
DEFAULT_PARTS = ("grpo", "eval")
VARIANTS = {"grpo": GRPO_FLOWS, "eval": EVAL_MODES, "runner": EVAL_MODES}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/benchmark.py", description=DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESET_DEFAULTS),
                   help="model preset with random weights (default: tiny)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cpu for tiny, cuda for qwen2.5-vl-3b")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(DEFAULT_PARTS),
                   help="what to measure (default: grpo eval; runner: the evaluation runner end to end)")
    p.add_argument("--steps", type=int, help="timed GRPO optimizer steps per flow, after 1 warm-up step (default 3)")
    p.add_argument("--prompts", type=int, help="prompts per optimizer step (default: tiny 2, 3b 8)")
    p.add_argument("--generations", type=int, help="G, rollouts per prompt (default: tiny 4, 3b 8)")
    p.add_argument("--micro-batch", type=int,
                   help="rollouts per forward/backward (per_device_train_batch_size; gradient accumulation = "
                        "prompts x G / micro-batch; default 8)")
    p.add_argument("--new-tokens", type=int, help="fixed GRPO completion length (default 64)")
    p.add_argument("--image-tokens", type=int,
                   help="LM image tokens per GRPO prompt: the images are resized to about this many 28 x 28 px "
                        "tokens (data.min_pixels = data.max_pixels; a 640 x 480 image gives ~390; default: the "
                        "recipe's pixel limits)")
    p.add_argument("--queries", type=int, help="context queries of the preset checkpoint (default 64, as the real model)")
    p.add_argument("--eval-batch", type=int, default=16, help="batched evaluation batch size (default 16)")
    p.add_argument("--eval-exprs", type=int, help="expressions per evaluation pass (default: tiny 32, 3b 64)")
    p.add_argument("--eval-new-tokens", type=int, help="fixed generated length in evaluation (default 32)")
    p.add_argument("--eval-repeats", type=int, default=2, help="timed passes per evaluation mode (median; default 2)")
    p.add_argument("--data", type=Path, help="dataset root (REFER layout: refcoco train/val); default: synthetic")
    p.add_argument("--image-size", type=int, help="synthetic image height in px (default: tiny 160, 3b 480)")
    p.add_argument("--workdir", type=Path,
                   help="keeps the checkpoint, data and per-worker outputs (reused when they match); default: temp")
    p.add_argument("--recipe", type=Path, help="stage-2 recipe to start from (default: tiny or paper stage2.yaml)")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra recipe overrides for the GRPO workers, e.g. train.max_grad_norm=0")
    p.add_argument("--attn", default="auto", choices=("auto", "sdpa", "flash_attention_2", "eager"),
                   help="attention implementation on CUDA (auto: flash_attention_2 if flash_attn imports, else sdpa)")
    p.add_argument("--no-grad-ckpt", action="store_true", help="CUDA: disable gradient checkpointing")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="peak dense bf16 TFLOP/s of the GPU for MFU (default 989: H100 SXM)")
    p.add_argument("--threads", type=int, help="torch threads in the workers (default: torch's choice / OMP_NUM_THREADS)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every measurement this many times, alternating (fast, reference, fast, ...), and pool "
                        "the timings: evens out load changes on a shared machine (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the final JSON to this file")
    # internal
    p.add_argument("--worker", help=argparse.SUPPRESS)  # <part>:<variant>, e.g. grpo:fast, eval:single
    p.add_argument("--ckpt", type=Path,
                   help="a LENS checkpoint folder to measure instead of the preset with random weights")
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in PRESET_DEFAULTS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    recipe = Path(args.recipe)
    args.recipe = recipe.resolve() if recipe.exists() else ROOT / recipe  # as given, else relative to the repo
    if not args.recipe.is_file():
        p.error(f"--recipe {recipe} not found")
    total = args.prompts * args.generations
    if total % args.micro_batch:
        p.error(f"prompts x G = {total} must be a multiple of --micro-batch {args.micro_batch}")
    for name in ("image_tokens", "queries", "new_tokens", "generations"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


# ============================================================================ workers
def quiet() -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


WORKERS = {"grpo": grpo_worker, "eval": eval_worker, "runner": runner_worker}


def worker_main(args) -> int:
    import torch

    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    part, _, what = args.worker.partition(":")
    result = WORKERS[part](args, what)
    result["threads"] = torch.get_num_threads()
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        result["device_name"] = f"{props.name} ({props.total_memory / 1024**3:.0f} GiB)"
    args.result.write_text(json.dumps(result))
    return 0


WORKER_OPTIONS = ("preset", "device", "steps", "prompts", "generations", "micro_batch", "new_tokens", "image_tokens",
                  "queries", "eval_batch",
                  "eval_exprs", "eval_new_tokens", "eval_repeats", "recipe", "attn", "peak_tflops", "threads", "seed")


def worker_command(args, job: str, result: Path) -> list[str]:
    """The command line of one worker subprocess (this tool re-invoked with --worker)."""
    cmd = [sys.executable, str(ENTRY), "--worker", job, "--result", str(result),
           "--ckpt", str(args.ckpt), "--data", str(args.data)]
    for key in WORKER_OPTIONS:
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    if args.no_grad_ckpt:
        cmd.append("--no-grad-ckpt")
    if args.override:
        cmd += ["--override", *args.override]
    return cmd


def run_worker(args, job: str, work: Path) -> dict[str, Any]:
    result = work / f"{job.replace(':', '_')}.json"
    result.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false"}
    log(f"{job} ...")
    t0 = time.perf_counter()
    proc = subprocess.run(worker_command(args, job, result), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not result.is_file():
        sys.stderr.write(proc.stdout[-6000:])
        raise SystemExit(f"worker {job} failed (exit {proc.returncode})")
    log(f"{job} done in {time.perf_counter() - t0:.0f}s")
    return json.loads(result.read_text())


def run_rounds(args, part: str, work: Path) -> dict[str, list[dict[str, Any]]]:
    """`args.rounds` rounds of one worker per variant, interleaved so that machine drift hits all variants alike."""
    variants = VARIANTS[part]
    rounds: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            rounds[variant].append(run_worker(args, f"{part}:{variant}", work))
    return rounds


# ============================================================================ parent
def versions() -> dict[str, str]:
    import torch
    import transformers
    import trl

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__}
    try:
        import flash_attn

        info["flash_attn"] = flash_attn.__version__
    except ImportError:
        pass
    return info


def machine() -> str:
    """The CPU (the parent never touches CUDA, so that no context of its own holds GPU memory)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs"


def prepare(args, work: Path) -> None:
    """Synthetic data and the preset checkpoint in `work` (reused when their stamp matches)."""
    if args.data is None:
        n_train = max(8, args.prompts * (args.steps + 1))
        n_val = max(4, args.eval_exprs // 4)
        stamp = {"seed": args.seed, "n_train": n_train, "n_val": n_val, "image_size": args.image_size}
        args.data = work / "data"
        if not stamp_matches(args.data, stamp):
            from lens.data.synthetic import generate_synthetic

            log(f"writing synthetic data ({n_train} train / {n_val} val images, {args.image_size} px) to {args.data}")
            generate_synthetic(args.data, seed=args.seed, n_train=n_train, n_val=n_val, n_test=1, image_size=args.image_size)
            write_stamp(args.data, stamp)
    if args.ckpt is not None:  # the user's checkpoint
        return
    args.ckpt = work / f"ckpt_{args.preset}"
    stamp = {"preset": args.preset, "seed": args.seed, "queries": args.queries}
    if not stamp_matches(args.ckpt, stamp):
        import torch

        from lens.modeling import build_preset

        log(f"building the {args.preset} preset (random weights) into {args.ckpt}")
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        model, processor = build_preset(args.preset, seed=args.seed, dtype=dtype, num_of_query=args.queries)
        model.save_pretrained(args.ckpt)
        processor.save_pretrained(args.ckpt)
        del model
        write_stamp(args.ckpt, stamp)


def stamp_matches(folder: Path, stamp: dict) -> bool:
    path = folder / "benchmark_stamp.json"
    return path.is_file() and json.loads(path.read_text()) == stamp


def write_stamp(folder: Path, stamp: dict) -> None:
    (folder / "benchmark_stamp.json").write_text(json.dumps(stamp))


def log(msg: str) -> None:
    print(f"[benchmark] {msg}", file=sys.stderr, flush=True)


def measure(args, work: Path, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the requested parts into `summary`; returns every worker's result."""
    results: list[dict[str, Any]] = []
    for part in PARTS:
        if part not in args.parts:
            continue
        rounds = run_rounds(args, part, work)
        results += [r for variant in rounds.values() for r in variant]
        if part == "grpo":
            summary["grpo"] = grpo_summary({flow: summarize_grpo(rounds[flow], args) for flow in GRPO_FLOWS}, args)
        else:
            summary[part] = eval_summary({mode: summarize_eval(rounds[mode]) for mode in EVAL_MODES}, args.rounds)
            if part == "eval":
                summary["eval"]["agreement"] = compare_eval(work)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    import torch

    from .report import report

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    ctx = tempfile.TemporaryDirectory(prefix="lens_bench_") if args.workdir is None else None
    work = Path(ctx.name) if ctx else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        prepare(args, work)
        summary: dict[str, Any] = {
            "preset": args.preset, "device": args.device, "machine": machine(),
            "date": _dt.datetime.now().isoformat(timespec="seconds"), "versions": versions(),
            "threads": args.threads or torch.get_num_threads(), "peak_tflops": args.peak_tflops,
        }
        names = {r.get("device_name") for r in measure(args, work, summary)} - {None}
        if names:
            summary["machine"] = f"{', '.join(sorted(names))}; host {summary['machine']}"
        report(summary)
        line = json.dumps(summary, separators=(",", ":"))
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(line, flush=True)
    finally:
        if ctx:
            ctx.cleanup()
    return 0

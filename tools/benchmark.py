#!/usr/bin/env python
"""Side-by-side benchmark: this implementation's fast paths vs a flow that does what the original does.

Measured in one run, on the same checkpoint, data and seeds:

  (a) GRPO: one stage-2 optimizer step (generation with a FIXED completion length, mask-IoU scoring,
      reference log-probs, policy forward + backward, optimizer step) with `flow=fast` and
      `flow=reference` (SAM2 encodes per rollout, per-sample mask decoding, separate forwards for the
      log-probs and the masks). 1 warm-up step, then --steps timed steps; median step time, per-phase
      medians, ratio reference/fast. On CUDA also the MFU of the training forward+backward.
  (b) Evaluation: `Segmenter.run_batch` on --eval-exprs expressions, batched (--eval-batch) vs one at a
      time (batch 1: one generation and one SAM2 encoding per expression); expressions/s and ratio.
  (c) Peak memory of every measurement: each runs in its own subprocess (this script re-invoked with
      --worker). CUDA: torch.cuda.max_memory_allocated, reset after the warm-up. CPU: the process's
      ru_maxrss (whole lifetime, includes imports and model loading) and VmHWM reset after the warm-up
      (via /proc/self/clear_refs, when the kernel allows it).

The checkpoint is the preset with random weights (saved once to the work directory); data is a synthetic
dataset written there too (--data to use another REFER-layout root). Completion lengths are forced with
min_new_tokens = max_new_tokens so that random weights give repeatable work.

The LAST line of stdout is one JSON object with every figure and ratio.

Examples:
  OMP_NUM_THREADS=1 python tools/benchmark.py --steps 2 --eval-exprs 16          # CPU, tiny (quick look)
  python tools/benchmark.py --preset qwen2.5-vl-3b --device cuda                  # one GPU, bf16, 8 prompts x G=8
  python tools/benchmark.py --preset qwen2.5-vl-3b --device cuda --parts grpo --workdir /tmp/lensbench
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

# Per-preset defaults (a command-line value wins).
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": dict(device="cpu", prompts=2, generations=4, micro_batch=8, new_tokens=64, eval_new_tokens=32,
                 eval_exprs=32, image_size=160, steps=3, recipe="configs/recipes/tiny/stage2.yaml"),
    "qwen2.5-vl-3b": dict(device="cuda", prompts=8, generations=8, micro_batch=8, new_tokens=64, eval_new_tokens=32,
                          eval_exprs=64, image_size=480, steps=3, recipe="configs/recipes/stage2.yaml"),
}
PARTS = ("grpo", "eval")
GRPO_FLOWS = ("fast", "reference")
EVAL_MODES = ("batched", "single")


# ============================================================================ arguments
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESET_DEFAULTS),
                   help="model preset with random weights (default: tiny)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cpu for tiny, cuda for qwen2.5-vl-3b")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default: both)")
    p.add_argument("--steps", type=int, help="timed GRPO optimizer steps per flow, after 1 warm-up step (default 3)")
    p.add_argument("--prompts", type=int, help="prompts per optimizer step (default: tiny 2, 3b 8)")
    p.add_argument("--generations", type=int, help="G, rollouts per prompt (default: tiny 4, 3b 8)")
    p.add_argument("--micro-batch", type=int,
                   help="rollouts per forward/backward (per_device_train_batch_size; gradient accumulation = "
                        "prompts x G / micro-batch; default 8)")
    p.add_argument("--new-tokens", type=int, help="fixed GRPO completion length (default 64)")
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
    p.add_argument("--worker", help=argparse.SUPPRESS)  # grpo:fast | grpo:reference | eval:batched | eval:single
    p.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
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
    return args


# ============================================================================ measuring helpers
def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


class PhaseTimer:
    """Inclusive wall time per named phase, accumulated until `take()` (CUDA-synchronised)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.acc: dict[str, float] = {}
        self.stack: list[str] = []  # phases now open (outermost first)

    @contextmanager
    def phase(self, name: str):
        sync(self.device)
        t0 = time.perf_counter()
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()
            sync(self.device)
            self.acc[name] = self.acc.get(name, 0.0) + time.perf_counter() - t0

    def wrap(self, fn, name_of):
        """`fn` timed under `name_of(*args, **kwargs)` (a name, or None for untimed calls)."""

        def timed(*args, **kwargs):
            name = name_of(*args, **kwargs)
            if name is None:
                return fn(*args, **kwargs)
            with self.phase(name):
                return fn(*args, **kwargs)

        return timed

    def take(self) -> dict[str, float]:
        out, self.acc = self.acc, {}
        return out


def reset_peak_memory(device: str) -> bool:
    """Reset the peak-memory counter; False where the platform does not allow it."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return True
    try:  # Linux >= 4.0: "5" resets the peak resident set size (VmHWM) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(device: str, reset_ok: bool) -> dict[str, float]:
    mib = 1024.0**2
    out = {"ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}  # KiB on Linux
    if device == "cuda":
        import torch

        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / mib
        out["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved() / mib
    elif reset_ok:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out["vmhwm_after_warmup_mib"] = int(line.split()[1]) / 1024.0
        except OSError:
            pass
    return out


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# ============================================================================ FLOPs
def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def flop_model(policy) -> dict[str, Any]:
    """Per-token parameter counts and attention sizes of the trained towers (LM and ViT)."""
    cfg = policy.config
    tc, vc = cfg.text_config, cfg.vision_config
    lm = policy.model.language_model
    embed = lm.embed_tokens.weight.numel()
    visual = policy.model.visual
    merger = count_params(visual.merger)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    v_head = vc.hidden_size // vc.num_heads
    window_patches = (vc.window_size // vc.patch_size) ** 2
    return {
        "lm_params": count_params(lm) - embed,  # embedding lookups are no matmuls
        "lm_head_params": tc.hidden_size * tc.vocab_size,
        "lm_layers": tc.num_hidden_layers,
        "lm_attn_width": tc.num_attention_heads * head_dim,
        "vit_params": count_params(visual) - merger,  # patch embedding + blocks, per patch
        "merger_params": merger,  # per merged token (patches / merge^2)
        "vit_attn_width": vc.num_heads * v_head,
        "vit_full_layers": len(vc.fullatt_block_indexes),
        "vit_window_layers": vc.depth - len(vc.fullatt_block_indexes),
        "vit_window_patches": window_patches,
        "merge": vc.spatial_merge_size**2,
        "queries": cfg.num_of_query,
    }


def training_flops(fm: dict[str, Any], seq_lens: list[int], completion_lens: list[int], grids: list[list[int]]) -> float:
    """Model FLOPs of one training forward+backward (3x forward; no recomputation counted).

    LM, per sequence of S real tokens (prompt + completion + queries) with C completion tokens:
        6 * N_lm * S + 6 * H * V * C + 6 * L * d * S^2            (causal attention: QK^T and AV, halved)
    ViT, per image of P patches:
        6 * N_vit * P + 6 * N_merger * P / merge^2 + 12 * d_v * P * (L_full * P + L_window * W)
    """
    total = 0.0
    for s, c in zip(seq_lens, completion_lens):
        total += 6 * fm["lm_params"] * s + 6 * fm["lm_head_params"] * c + 6 * fm["lm_layers"] * fm["lm_attn_width"] * s * s
    for t, h, w in grids:
        p = t * h * w
        total += 6 * fm["vit_params"] * p + 6 * fm["merger_params"] * p / fm["merge"]
        total += 12 * fm["vit_attn_width"] * p * (fm["vit_full_layers"] * p + fm["vit_window_layers"] * min(p, fm["vit_window_patches"]))
    return total


# ============================================================================ workers
def quiet() -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def set_key(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def attn_choice(args) -> str:
    if args.device != "cuda":
        return "sdpa"
    if args.attn != "auto":
        return args.attn
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2"
    except ImportError:
        return "sdpa"


def grpo_recipe(args, flow: str, out: Path) -> dict:
    from lens.training.recipe import load_recipe, parse_override

    recipe = load_recipe(args.recipe, [f"model.init={args.ckpt}"])
    cuda = args.device == "cuda"
    n = args.new_tokens
    settings = {
        "flow": flow,
        "model.init": str(args.ckpt),
        "model.dtype": "bfloat16" if cuda else "float32",
        "data.root": str(args.data),
        "data.train": ["refcoco:train"],
        "grpo.num_generations": args.generations,
        "grpo.max_completion_length": n,
        "grpo.generation_kwargs": {"min_new_tokens": n},  # fixed length: EOS is suppressed until n tokens
        "grpo.log_completions": False,
        "grpo.use_vllm": False,
        "train.output_dir": str(out),
        "train.per_device_train_batch_size": args.micro_batch,
        "train.gradient_accumulation_steps": args.prompts * args.generations // args.micro_batch,
        "train.max_steps": 1 + args.steps,
        "train.save_strategy": "no",
        "train.logging_steps": 1,
        "train.report_to": "none",
        "train.disable_tqdm": True,
        "train.seed": args.seed,
        "train.deepspeed": None,
        "train.use_cpu": not cuda,
        "train.bf16": cuda,
        "train.dataloader_num_workers": 4 if cuda else 0,
    }
    if cuda:
        settings["model.attn_implementation"] = attn_choice(args)
        settings["train.gradient_checkpointing"] = not args.no_grad_ckpt
    for key, value in settings.items():
        set_key(recipe, key, value)
    for text in args.override:
        keys, value = parse_override(text)
        set_key(recipe, ".".join(keys), value)
    return recipe


def grpo_worker(args, flow: str) -> dict[str, Any]:
    from transformers import TrainerCallback

    from lens.training.grpo import lens_module
    from lens.training.recipe import build_trainer

    out = args.result.parent / f"grpo_{flow}"
    trainer = build_trainer(grpo_recipe(args, flow, out))
    policy = lens_module(trainer.model)
    timer = PhaseTimer(args.device)
    fm = flop_model(policy)
    step_tokens: dict[str, list] = {"seq": [], "comp": [], "grids": []}

    trainer._generate_and_score_completions = timer.wrap(trainer._generate_and_score_completions, lambda *a, **k: "gen_and_score")
    trainer._generate = timer.wrap(trainer._generate, lambda *a, **k: "generate")
    trainer._score_masks = timer.wrap(trainer._score_masks, lambda *a, **k: "score_masks")
    policy.encode_sam_images = timer.wrap(policy.encode_sam_images, lambda *a, **k: "sam_encode")
    # the reference flow's extra query forward for the masks (inside the loss; scoring forwards are score_masks)
    policy.forward_with_queries = timer.wrap(
        policy.forward_with_queries, lambda *a, **k: "mask_forward" if "loss_forward" in timer.stack else None
    )
    policy.masks_from_queries = timer.wrap(  # connector + SAM2 decoder in the loss (batched or per-sample loop)
        policy.masks_from_queries, lambda *a, **k: "mask_decode" if "loss_forward" in timer.stack else None
    )
    trainer._get_per_token_logps_and_entropies = timer.wrap(
        trainer._get_per_token_logps_and_entropies,
        lambda model, *a, **k: "ref_logps" if model is trainer.ref_model else "policy_forward",
    )
    compute_loss = timer.wrap(trainer._compute_loss, lambda *a, **k: "loss_forward")

    def counted_loss(model, inputs):
        lens = (inputs["prompt_mask"].sum(1) + inputs["completion_mask"].sum(1) + fm["queries"]).tolist()
        step_tokens["seq"].extend(int(x) for x in lens)
        step_tokens["comp"].extend(int(x) for x in inputs["completion_mask"].sum(1).tolist())
        step_tokens["grids"].extend(inputs["image_grid_thw"].tolist())
        return compute_loss(model, inputs)

    trainer._compute_loss = counted_loss
    trainer.accelerator.backward = timer.wrap(trainer.accelerator.backward, lambda *a, **k: "backward")

    record: dict[str, Any] = {"steps": [], "reset_ok": False}

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.last = None

        def on_train_begin(self, *a, **k):
            sync(args.device)
            self.last = time.perf_counter()

        def on_step_end(self, a, state, control, **k):
            sync(args.device)
            now = time.perf_counter()
            phases = timer.take()
            tokens = {key: list(v) for key, v in step_tokens.items()}
            for v in step_tokens.values():
                v.clear()
            record["steps"].append({"time": now - self.last, "phases": phases, "tokens": tokens})
            if state.global_step == 1:  # end of the warm-up step
                record["reset_ok"] = reset_peak_memory(args.device)
            sync(args.device)
            self.last = time.perf_counter()

    trainer.add_callback(StepClock())
    trainer.train()

    return {
        "flow": flow,
        "warmup_step_s": record["steps"][0]["time"],
        "steps": [{"time": st["time"], "phases": st["phases"],
                   "flops": training_flops(fm, st["tokens"]["seq"], st["tokens"]["comp"], st["tokens"]["grids"]),
                   "lm_tokens": sum(st["tokens"]["seq"]), "completion_tokens": sum(st["tokens"]["comp"]),
                   "vit_patches": sum(t * h * w for t, h, w in st["tokens"]["grids"])} for st in record["steps"][1:]],
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "flop_model": fm,
        "attn_implementation": getattr(policy.config, "_attn_implementation", None),
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "memory": peak_memory(args.device, record["reset_ok"]),
    }


def summarize_grpo(rounds: list[dict[str, Any]], args) -> dict[str, Any]:
    """Pool the timed steps of every round of one flow: medians per phase, FLOPs, MFU, peak memory."""
    steps = [st for r in rounds for st in r["steps"]]
    times = [st["time"] for st in steps]
    per_step: dict[str, list[float]] = {}
    for st in steps:
        p = dict(st["phases"])
        p["gen_other"] = p.get("gen_and_score", 0) - sum(p.get(k, 0) for k in ("generate", "sam_encode", "score_masks", "ref_logps"))
        p["train_fwd_bwd"] = p.get("loss_forward", 0) + p.get("backward", 0)
        p["optimizer_and_other"] = st["time"] - p.get("gen_and_score", 0) - p["train_fwd_bwd"]
        for k, v in p.items():
            per_step.setdefault(k, []).append(v)
    flops = [st["flops"] for st in steps]
    fwd_bwd = per_step["train_fwd_bwd"]
    out = {
        "step_s": times,
        "step_s_median": median(times),
        "warmup_step_s": [r["warmup_step_s"] for r in rounds],
        "phases_s_median": {k: median(v) for k, v in sorted(per_step.items())},
        "losses": [r["losses"] for r in rounds],
        "rollouts_per_step": args.prompts * args.generations,
        "trained_tokens_per_step": median([st["lm_tokens"] for st in steps]),
        "completion_tokens_per_step": median([st["completion_tokens"] for st in steps]),
        "vit_patches_per_step": median([st["vit_patches"] for st in steps]),
        "train_flops_per_step": median(flops),
        "train_fwd_bwd_tflops_per_s": median([f / t / 1e12 for f, t in zip(flops, fwd_bwd) if t > 0]),
        "flop_model": rounds[0]["flop_model"],
        "attn_implementation": rounds[0]["attn_implementation"],
        "gradient_checkpointing": rounds[0]["gradient_checkpointing"],
        "memory": {k: max(r["memory"].get(k, 0.0) for r in rounds) for k in rounds[0]["memory"]},
    }
    if args.device == "cuda":
        peak = args.peak_tflops * 1e12
        out["mfu_train_fwd_bwd"] = median([f / (t * peak) for f, t in zip(flops, fwd_bwd) if t > 0])
        out["mfu_step"] = median([f / (t * peak) for f, t in zip(flops, times) if t > 0])
    return out


def eval_worker(args, mode: str) -> dict[str, Any]:
    import torch
    from transformers import AutoProcessor

    from lens.evaluation.runner import SplitSpec, build_expressions, make_batches
    from lens.data.registry import load_benchmark
    from lens.inference import Segmenter
    from lens.modeling import LensForConditionalGeneration

    cuda = args.device == "cuda"
    kwargs = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if cuda:
        kwargs["attn_implementation"] = attn_choice(args)
    model = LensForConditionalGeneration.from_pretrained(args.ckpt, **kwargs).to(args.device)
    processor = AutoProcessor.from_pretrained(args.ckpt)
    n = args.eval_new_tokens
    seg = Segmenter(model, processor, max_new_tokens=n)
    model.generation_config.min_new_tokens = n  # fixed answer length (random weights), merged by generate()

    spec = SplitSpec("refcoco_val")
    exprs = build_expressions(load_benchmark(spec.benchmark, args.data), spec, "lens", args.eval_exprs)
    images = {}
    for e in exprs:  # decoded once, outside the timed region (same for both modes)
        if e.image_key not in images:
            images[e.image_key] = e.ref.load_image()
    bs = args.eval_batch if mode == "batched" else 1
    batches = make_batches(len(exprs), bs)

    def run(batch):
        sel = [exprs[i] for i in batch]
        return seg.run_batch([images[e.image_key] for e in sel], [e.text for e in sel],
                             image_keys=[e.image_key for e in sel])

    run(batches[0])  # warm-up
    reset_ok = reset_peak_memory(args.device)
    speeds, texts, logits = [], [], []
    for r in range(args.eval_repeats):
        sync(args.device)
        t0 = time.perf_counter()
        outs = [run(b) for b in batches]
        sync(args.device)
        speeds.append(len(exprs) / (time.perf_counter() - t0))
        if r == 0:
            texts = [t for o in outs for t in o.texts]
            logits = torch.cat([o.mask_logits.float().cpu() for o in outs])
    torch.save({"texts": texts, "mask_logits": logits}, args.result.with_suffix(".pt"))
    return {
        "mode": mode,
        "batch_size": bs,
        "expressions": len(exprs),
        "distinct_images": len(images),
        "new_tokens": n,
        "expr_per_s": speeds,
        "memory": peak_memory(args.device, reset_ok),
    }


def worker_main(args) -> int:
    import torch

    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    part, _, what = args.worker.partition(":")
    result = grpo_worker(args, what) if part == "grpo" else eval_worker(args, what)
    result["threads"] = torch.get_num_threads()
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        result["device_name"] = f"{props.name} ({props.total_memory / 1024**3:.0f} GiB)"
    args.result.write_text(json.dumps(result))
    return 0


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
    args.ckpt = work / f"ckpt_{args.preset}"
    stamp = {"preset": args.preset, "seed": args.seed}
    if not stamp_matches(args.ckpt, stamp):
        import torch

        from lens.modeling import build_preset

        log(f"building the {args.preset} preset (random weights) into {args.ckpt}")
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        model, processor = build_preset(args.preset, seed=args.seed, dtype=dtype)
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


def run_rounds(args, part: str, variants: tuple[str, ...], work: Path) -> dict[str, list[dict[str, Any]]]:
    """`args.rounds` rounds of one worker per variant, interleaved so that machine drift hits all variants alike."""
    rounds: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            rounds[variant].append(run_worker(args, f"{part}:{variant}", work))
    return rounds


def run_worker(args, job: str, work: Path) -> dict[str, Any]:
    result = work / f"{job.replace(':', '_')}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", job, "--result", str(result),
           "--ckpt", str(args.ckpt), "--data", str(args.data)]
    for key in ("preset", "device", "steps", "prompts", "generations", "micro_batch", "new_tokens", "eval_batch",
                "eval_exprs", "eval_new_tokens", "eval_repeats", "recipe", "attn", "peak_tflops", "threads", "seed"):
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    if args.no_grad_ckpt:
        cmd.append("--no-grad-ckpt")
    if args.override:
        cmd += ["--override", *args.override]
    env = {**os.environ, "PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false"}
    log(f"{job} ...")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not result.is_file():
        sys.stderr.write(proc.stdout[-6000:])
        raise SystemExit(f"worker {job} failed (exit {proc.returncode})")
    log(f"{job} done in {time.perf_counter() - t0:.0f}s")
    return json.loads(result.read_text())


def upstream_estimate(res: dict[str, Any]) -> float:
    """Step time of the original's flow, estimated from the reference flow's phases.

    The original takes the log-probs, the masks and the mask-IoU reward from ONE policy forward (reference
    notes section 3.3), whereas `flow=reference` runs a no-grad scoring forward and a second query forward
    for the masks. Estimate = reference step - score_masks - 3 x (mask_forward - mask_decode): the extra
    language-model/ViT forward and its ~2x backward go, the per-sample decoder loop stays. The fast flow
    keeps its scoring forward (TRL computes rewards before the loss), so this ratio is the conservative one.
    """
    ref = res["reference"]["phases_s_median"]
    extra = max(ref.get("mask_forward", 0.0) - ref.get("mask_decode", 0.0), 0.0)
    return res["reference"]["step_s_median"] - ref.get("score_masks", 0.0) - 3 * extra


def summarize_eval(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    speeds = [v for r in rounds for v in r["expr_per_s"]]
    out = {k: v for k, v in rounds[0].items() if k not in ("expr_per_s", "memory")}
    out.update(expr_per_s=speeds, expr_per_s_median=median(speeds),
               memory={k: max(r["memory"].get(k, 0.0) for r in rounds) for k in rounds[0]["memory"]})
    return out


def compare_eval(work: Path) -> dict[str, Any]:
    import torch

    a, b = (torch.load(work / f"eval_{m}.pt") for m in EVAL_MODES)
    same = sum(x == y for x, y in zip(a["texts"], b["texts"]))
    diff = (a["mask_logits"].float() - b["mask_logits"].float()).abs()
    return {"same_texts": f"{same}/{len(a['texts'])}", "max_mask_logit_diff": float(diff.max())}


def mib(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f} MiB"


def memory_figure(mem: dict[str, float]) -> float | None:
    return mem.get("cuda_max_allocated_mib", mem.get("vmhwm_after_warmup_mib", mem.get("ru_maxrss_mib")))


def report(summary: dict[str, Any]) -> None:
    """Human-readable table (stdout, before the JSON line)."""
    print(f"\nLENS benchmark: preset {summary['preset']} on {summary['device']} ({summary['machine']}), "
          f"{summary['date']}; torch {summary['versions']['torch']}, transformers {summary['versions']['transformers']}, "
          f"trl {summary['versions']['trl']}")
    g = summary.get("grpo")
    if g:
        f, r = g["fast"], g["reference"]
        print(f"\n(a) GRPO optimizer step: {g['prompts']} prompts x G={g['generations']} = {f['rollouts_per_step']} rollouts, "
              f"{g['new_tokens']} completion tokens each, median of {len(f['step_s'])} steps "
              f"({g['rounds']} round(s), 1 warm-up step each)")
        print(f"    {'phase (median s)':<22}{'fast':>10}{'reference':>12}")
        names = ["step", "gen_and_score", "  generate", "  sam_encode", "  score_masks", "  ref_logps", "  gen_other",
                 "loss_forward", "  policy_forward", "    mask_forward", "    mask_decode", "backward",
                 "optimizer_and_other"]
        for name in names:
            key = name.strip()
            fv = f["step_s_median"] if key == "step" else f["phases_s_median"].get(key)
            rv = r["step_s_median"] if key == "step" else r["phases_s_median"].get(key)
            if fv is None and rv is None:
                continue
            print(f"    {name:<22}{(fv or 0):>10.3f}{(rv or 0):>12.3f}")
        print(f"    speed-up reference/fast: x{g['speedup']:.2f}; train fwd+bwd {f['train_flops_per_step'] / 1e12:.3g} TFLOP "
              f"per step ({f['trained_tokens_per_step']:.0f} LM tokens, {f['vit_patches_per_step']:.0f} ViT patches)")
        print(f"    estimated original flow (one policy forward, no scoring forward): "
              f"x{g['speedup_vs_upstream_estimate']:.2f} of fast")
        print(f"    peak memory: fast {mib(memory_figure(f['memory']))}, reference {mib(memory_figure(r['memory']))}")
        if "mfu_train_fwd_bwd" in f:
            print(f"    MFU (train fwd+bwd, {summary['peak_tflops']:.0f} TFLOP/s peak): fast {f['mfu_train_fwd_bwd']:.1%}, "
                  f"reference {r['mfu_train_fwd_bwd']:.1%}; whole step: fast {f['mfu_step']:.1%}, reference {r['mfu_step']:.1%}")
        print(f"    logged losses (round 1) fast {['%.5f' % x for x in f['losses'][0]]}, "
              f"reference {['%.5f' % x for x in r['losses'][0]]}")
    e = summary.get("eval")
    if e:
        b, s = e["batched"], e["single"]
        print(f"\n(b) evaluation: {b['expressions']} expressions on {b['distinct_images']} images, {b['new_tokens']} "
              f"generated tokens each, median of {len(b['expr_per_s'])} passes ({e['rounds']} round(s))")
        print(f"    batch {b['batch_size']:>3}: {b['expr_per_s_median']:8.2f} expressions/s, peak {mib(memory_figure(b['memory']))}")
        print(f"    batch   1: {s['expr_per_s_median']:8.2f} expressions/s, peak {mib(memory_figure(s['memory']))}")
        print(f"    speed-up: x{e['speedup']:.2f}; same texts {e['agreement']['same_texts']}, "
              f"max |mask logit diff| {e['agreement']['max_mask_logit_diff']:.2e}")
    print()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    import torch

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
        worker_results: dict[str, list] = {}
        if "grpo" in args.parts:
            rounds = run_rounds(args, "grpo", GRPO_FLOWS, work)
            worker_results["grpo"] = [r for variant in rounds.values() for r in variant]
            res = {flow: summarize_grpo(rounds[flow], args) for flow in GRPO_FLOWS}
            summary["grpo"] = {
                **res, "prompts": args.prompts, "generations": args.generations, "new_tokens": args.new_tokens,
                "micro_batch": args.micro_batch, "rounds": args.rounds,
                "speedup": res["reference"]["step_s_median"] / res["fast"]["step_s_median"],
                "speedup_vs_upstream_estimate": upstream_estimate(res) / res["fast"]["step_s_median"],
                "memory_ratio": (memory_figure(res["reference"]["memory"]) or 0) / (memory_figure(res["fast"]["memory"]) or 1),
            }
        if "eval" in args.parts:
            rounds = run_rounds(args, "eval", EVAL_MODES, work)
            worker_results["eval"] = [r for variant in rounds.values() for r in variant]
            res = {mode: summarize_eval(rounds[mode]) for mode in EVAL_MODES}
            summary["eval"] = {
                **res, "rounds": args.rounds,
                "speedup": res["batched"]["expr_per_s_median"] / res["single"]["expr_per_s_median"],
                "agreement": compare_eval(work),
            }
        names = {r.get("device_name") for part in ("grpo", "eval") for r in worker_results.get(part, [])} - {None}
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


if __name__ == "__main__":
    raise SystemExit(main())

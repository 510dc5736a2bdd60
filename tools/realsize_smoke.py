"""Real-size smoke test: the `qwen2.5-vl-3b` preset (random weights, bf16, SAM2 hiera-L at 1024) runs end to end.

Five phases on ONE model object (built once):
  1. build        build_preset(preset, dtype=bfloat16)
  2. forward      one query forward of a processor-encoded prompt + a small image (log-probs + mask logits)
  3. segmenter    one `Segmenter` call (greedy generation of a few tokens, then masks)
  4. stage1       one stage-1 optimizer step (configs/recipes/stage1.yaml, context module, synthetic data)
  5. lora_grpo    one LoRA stage-2 GRPO step (configs/recipes/lora.yaml, G = 2, a few completion tokens)
On the CPU the two training phases step with plain SGD (--optim; the recipes' AdamW with --optim recipe): the
context module alone is 475 M parameters (conv_1d: 268 M), and AdamW's state for phase 5's 599 M took the
process to a 22.4 GB peak.

With --budget-s (as .ci/run passes what is left of its 30 minutes) build and forward always run, and each later
phase runs only when its predicted time fits in what is left: PHASE_COST x the forward phase's seconds (the
largest ratios measured, see PHASE_COST). A phase left out is printed as skipped, with the prediction, and listed
under "skipped"; it does not make the run fail, but "complete" is then false. Where the CPU has no native bf16
(no AVX512-BF16 / AMX: "host" in the JSON) bf16 matrix products are emulated and the 3B preset's forward alone
takes minutes, so on such a host CI runs the build and the forward and skips the training steps.

Each phase prints its wall time, the process's peak RSS so far (ru_maxrss), the phase's own peak (VmHWM, reset at
the start of the phase) and the current RSS; the last line is one JSON
object `{"ok": ..., "phases": {...}, ...}`; "ok" is true only when every phase ran (or was skipped for the
budget) and all its outputs (mask logits, log-probs, losses, updated weights) are finite. The exit code is 1 when not ok.

    .venv/bin/python tools/realsize_smoke.py                          # CPU, within 24 GB and 10 minutes
    python tools/realsize_smoke.py --device cuda --attn flash_attention_2
    python tools/realsize_smoke.py --preset tiny                      # seconds: the logic alone (tests)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

RECIPES = ROOT / "configs" / "recipes"
PHASES = ("build", "forward", "segmenter", "stage1", "lora_grpo")
REQUIRED = ("build", "forward")  # run even under --budget-s; the later phases' predictions scale the forward's time
# Predicted seconds of a phase = PHASE_COST[phase] x the forward phase's seconds: the largest ratio measured on the
# 2-core machines (docs/benchmarks.md: segmenter 1.3-1.6, stage1 2.4-3.1, lora_grpo 6.7-11.5), rounded up.
PHASE_COST = {"segmenter": 1.8, "stage1": 3.5, "lora_grpo": 12.0}
PROMPT = "the red object on the left"

# Sizes per device: the CPU lane keeps every sequence short (a 112 x 112 image = 16 visual tokens); a GPU can
# afford more. The SAM2 input is always the preset's (1024 for the real preset).
SIZES: dict[str, dict[str, int]] = {
    "cpu": dict(image=112, max_pixels=112 * 112, new_tokens=4, completion=4, generations=2),
    "cuda": dict(image=448, max_pixels=448 * 448, new_tokens=16, completion=16, generations=2),
}


# ---------------------------------------------------------------------- measurements
def rss_gb() -> tuple[float, float]:
    """(peak RSS, current RSS) of this process in GB (ru_maxrss is in KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    current = float("nan")
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                current = int(line.split()[1]) * 1024 / 1e9
                break
    except OSError:
        pass
    return round(peak, 3), round(current, 3)


def phase_peak_gb() -> float | None:
    """Peak RSS since the last `reset_phase_peak` (VmHWM), in GB; None where the kernel does not report it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) * 1024 / 1e9, 3)
    except OSError:
        pass
    return None


def reset_phase_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def host_info() -> dict[str, Any]:
    """What decides the CPU speed of bf16 here: torch's CPU kernel level and whether the CPU has bf16 instructions."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "native_bf16": bool({"avx512_bf16", "amx_bf16"} & flags)}


def gpu_peak_gb() -> float | None:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 1e9, 3)


def finite(*values: Any) -> bool:
    """True when every tensor / number given is finite (None counts as missing: False)."""
    for v in values:
        if v is None:
            return False
        if isinstance(v, torch.Tensor):
            if v.numel() == 0 or not bool(torch.isfinite(v.detach().float()).all()):
                return False
        elif not math.isfinite(float(v)):
            return False
    return True


def sample_trainable(model: torch.nn.Module, per_param: int = 4096) -> dict[str, torch.Tensor]:
    """A small fp32 slice of every trainable parameter (a full copy of the 3B preset's would cost GBs)."""
    return {n: p.detach().flatten()[:per_param].float().clone() for n, p in model.named_parameters() if p.requires_grad}


def weight_check(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> dict[str, Any]:
    """How many sampled trainable parameters changed, and whether every trainable parameter is finite."""
    params = dict(model.named_parameters())
    changed = sum(1 for n, b in before.items()
                  if n in params and not torch.equal(params[n].detach().flatten()[: b.numel()].float(), b))
    all_finite = all(finite(p) for p in model.parameters() if p.requires_grad)
    return {"trainable_tensors": len(before), "changed_tensors": changed, "weights_finite": all_finite}


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc keeps them otherwise), so that the next
    phase's peak is its own."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------------- inputs
def test_image(size: int, seed: int = 0) -> Image.Image:
    """A small RGB image: noise with a red square (so that the prompt has something to point at)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    s = size // 4
    arr[s : 2 * s, s : 2 * s] = (220, 30, 30)
    return Image.fromarray(arr)


def set_limits(processor, max_pixels: int, min_pixels: int = 3136) -> None:
    from lens.training.recipe import set_pixel_limits

    set_pixel_limits(processor, min_pixels, max_pixels)


# ---------------------------------------------------------------------- phases
def phase_build(state: dict) -> dict:
    from lens.modeling import build_preset

    args = state["args"]
    dtype = getattr(torch, args.dtype)
    if args.device == "cuda":
        with torch.device("cuda"):  # allocate (and randomly initialise) on the GPU: no CPU copy of the 3B model
            model, processor = build_preset(args.preset, seed=args.seed, dtype=dtype)
        model.to("cuda")
    else:
        model, processor = build_preset(args.preset, seed=args.seed, dtype=dtype)
    if args.attn and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(args.attn)
    set_limits(processor, state["sizes"]["max_pixels"])
    state["model"], state["processor"] = model, processor
    n = sum(p.numel() for p in model.parameters())
    return {
        "params_b": round(n / 1e9, 3), "dtype": str(model.dtype).removeprefix("torch."),
        "sam_dtype": str(model.sam.no_mem_embed.dtype).removeprefix("torch."), "sam_image_size": model.config.sam_image_size,
        "attn": getattr(model.config, "_attn_implementation", None), "finite": True,
    }


def phase_forward(state: dict) -> dict:
    from lens.data.transforms import resize_for_llm, sam_image
    from lens.modeling.families import image_factor
    from lens.prompts import build_messages

    model, processor, sizes = state["model"], state["processor"], state["sizes"]
    model.eval()
    img = test_image(sizes["image"])
    ip = processor.image_processor
    llm_img = resize_for_llm(img, ip.size["shortest_edge"], ip.size["longest_edge"], factor=image_factor(processor))
    text = processor.apply_chat_template(build_messages(PROMPT), add_generation_prompt=True, tokenize=False)
    answer = "the red object" + processor.tokenizer.eos_token
    enc = processor(text=[text + answer], images=[llm_img], return_tensors="pt").to(model.device)
    labels = enc["input_ids"].clone()
    with torch.no_grad():
        out = model(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=enc["pixel_values"],
            image_grid_thw=enc["image_grid_thw"], sam_images=sam_image(img, model.config.sam_image_size)[None].to(model.device),
            labels=labels,
        )
    return {
        "tokens": int(enc["input_ids"].shape[1]), "queries": model.config.num_of_query,
        "mask_shape": list(out.mask_logits.shape), "loss": float(out.loss),
        "finite": finite(out.mask_logits, out.log_probs, out.entropy, out.loss, out.iou_scores),
    }


def phase_segmenter(state: dict) -> dict:
    from lens import Segmenter

    model, processor, sizes = state["model"], state["processor"], state["sizes"]
    seg = Segmenter(model, processor, max_new_tokens=sizes["new_tokens"])
    img = test_image(sizes["image"], seed=1)
    batch = seg.run_batch([img], [PROMPT])  # one call: greedy generation, then the query forward (raw logits)
    return {
        "text": batch.texts[0][:80], "mask_shape": list(batch.mask_logits.shape), "score": float(batch.scores[0]),
        "box_llm": batch.boxes_llm[0], "finite": finite(batch.mask_logits, batch.scores),
    }


def common_overrides(state: dict, out: str) -> list[str]:
    args, sizes = state["args"], state["sizes"]
    return [
        f"data.root={state['data_root']}", "data.train=[refcoco:train]", f"data.max_pixels={sizes['max_pixels']}",
        f"train.output_dir={out}", f"train.use_cpu={str(args.device == 'cpu').lower()}", "train.deepspeed=null",
        "train.max_steps=1", "train.per_device_train_batch_size=1", "train.gradient_accumulation_steps=1",
        "train.bf16=true", f"train.gradient_checkpointing={str(args.grad_ckpt).lower()}", "train.report_to=none",
        "train.dataloader_num_workers=0", "train.logging_steps=1", 'train.save_strategy="no"', "train.disable_tqdm=true",
        "train.warmup_steps=0", f"train.seed={args.seed}",
    ] + ([] if args.optim == "recipe" else [f"train.optim={args.optim}"])


def logged_losses(trainer) -> list[float]:
    return [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]


def train_one_step(recipe: dict, model, processor, extra: tuple[str, ...] = ()) -> tuple[object, dict]:
    """Train `recipe` on the given model (max_steps in the recipe) -> (trainer, figures): losses, the last log's
    `extra` fields, the weight check, and `finite` only when all of them are finite and some weight changed."""
    from lens.training.recipe import build_trainer

    # the recipe's positions, as load_policy would build them (lora.yaml: mrope, so the adapter-off reference
    # matches generation); a public config field read at every forward
    model.config.query_position_mode = recipe["model"].get("query_position_mode") or model.config.query_position_mode
    trainer = build_trainer(recipe, policy=(model, processor))
    before = sample_trainable(trainer.model)
    result = trainer.train()
    losses = logged_losses(trainer)
    check = weight_check(trainer.model, before)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    last = {k: float(logs[-1][k]) for k in extra if logs and k in logs[-1]}
    fig = {"losses": losses, "train_loss": float(result.training_loss), **check, **last,
           "trainable_m": round(sum(p.numel() for p in trainer.model.parameters() if p.requires_grad) / 1e6, 2)}
    fig["finite"] = (bool(losses) and finite(*losses, result.training_loss, *last.values())
                     and check["weights_finite"] and check["changed_tensors"] > 0)
    return trainer, fig


def phase_stage1(state: dict) -> dict:
    from lens.training.recipe import load_recipe

    model, processor = state["model"], state["processor"]
    overrides = common_overrides(state, str(Path(state["workdir"]) / "stage1")) + ["cache_sam_features=false"]
    recipe = load_recipe(RECIPES / "stage1.yaml", overrides)
    trainer, fig = train_one_step(recipe, model, processor)
    del trainer  # drop the optimizer state before the next phase
    # stage 2 starts from stage 1's final checkpoint, which is saved in the model dtype (recipe.save_final): cast
    # the fp32 master weights of the context module back, so that phase 5 holds no extra fp32 copy of it
    dtype = getattr(torch, state["args"].dtype)
    for part in model.context_modules.values():
        for param in part.parameters() if isinstance(part, torch.nn.Module) else [part]:
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
    release_memory()
    return fig


def phase_lora_grpo(state: dict) -> dict:
    from lens.training.recipe import load_recipe

    model, processor, sizes = state["model"], state["processor"], state["sizes"]
    g = sizes["generations"]
    overrides = common_overrides(state, str(Path(state["workdir"]) / "lora")) + [
        f"grpo.num_generations={g}", f"train.per_device_train_batch_size={g}",
        f"grpo.max_completion_length={sizes['completion']}", "grpo.log_completions=false",
    ]
    recipe = load_recipe(RECIPES / "lora.yaml", overrides)
    trainer, fig = train_one_step(recipe, model, processor, extra=("reward", "kl", "entropy", "grad_norm"))
    fig.update(peft=hasattr(trainer.model, "peft_config"), reference="adapter-disabled policy (no copy)")
    state["peft_model"] = trainer.model
    del trainer
    release_memory()
    return fig


PHASE_FUNCS: dict[str, Callable[[dict], dict]] = {
    "build": phase_build, "forward": phase_forward, "segmenter": phase_segmenter,
    "stage1": phase_stage1, "lora_grpo": phase_lora_grpo,
}


# ---------------------------------------------------------------------- driver
def run_phases(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """Run the selected phases in order on one model; a failed phase stops the rest. Returns the summary dict."""
    from lens.data.synthetic import generate_synthetic

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = {**SIZES[args.device], **{k: v for k, v in (args.sizes or {}).items() if v is not None}}
    summary: dict[str, Any] = {
        "ok": False, "preset": args.preset, "device": args.device, "dtype": args.dtype, "attn": args.attn,
        "optim": args.optim, "grad_ckpt": args.grad_ckpt,
        "threads": torch.get_num_threads(), "sizes": sizes, "host": host_info(), "budget_s": args.budget_s,
        "phases": {}, "skipped": {},
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lens-smoke-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        data_root = workdir / "data"
        generate_synthetic(data_root, seed=0, n_train=2, n_val=1, n_test=1, image_size=sizes["image"])
        state = {"args": args, "sizes": sizes, "workdir": str(workdir), "data_root": str(data_root)}
        for name in args.phases:
            skip = budget_skip(args, name, summary["phases"], time.perf_counter() - start)
            if skip:
                summary["skipped"][name] = skip
                log(f"[smoke] {name}: skipped ({skip})")
                continue
            t0 = time.perf_counter()
            can_reset = reset_phase_peak()
            if torch.cuda.is_available() and args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                fig = PHASE_FUNCS[name](state)
                error = None
            except Exception as exc:  # report, then stop: later phases need this one's model
                fig, error = {"finite": False}, f"{type(exc).__name__}: {exc}"
                log(traceback.format_exc())
            peak, current = rss_gb()
            fig = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_gb": peak,
                   "phase_peak_rss_gb": phase_peak_gb() if can_reset else None, "rss_gb": current, **fig}
            if args.device == "cuda":
                fig["gpu_peak_gb"] = gpu_peak_gb()
            if error:
                fig["error"] = error[:2000]
            fig["ok"] = error is None and bool(fig.get("finite"))
            summary["phases"][name] = fig
            shown = ("seconds", "peak_rss_gb", "phase_peak_rss_gb", "rss_gb", "ok")
            log(f"[smoke] {name}: {fig['seconds']:.1f} s, peak RSS {peak:.2f} GB (this phase "
                f"{fig['phase_peak_rss_gb'] or float('nan'):.2f}), RSS {current:.2f} GB, ok={fig['ok']} "
                + json.dumps({k: v for k, v in fig.items() if k not in shown}))
            if error:
                break
    summary["total_seconds"] = round(time.perf_counter() - start, 1)
    summary["peak_rss_gb"] = rss_gb()[0]
    ran = summary["phases"]
    summary["complete"] = len(ran) == len(args.phases)
    summary["ok"] = (len(ran) + len(summary["skipped"]) == len(args.phases) and all(f["ok"] for f in ran.values())
                     and all(name in ran for name in REQUIRED if name in args.phases))
    return summary


def budget_skip(args: argparse.Namespace, name: str, done: dict[str, dict], elapsed: float) -> str | None:
    """Why phase `name` does not fit in what is left of --budget-s (None: run it). Build and forward always run."""
    if args.budget_s is None or name in REQUIRED or "forward" not in done:
        return None
    left = args.budget_s - elapsed
    predicted = PHASE_COST[name] * done["forward"]["seconds"]
    if predicted <= left:
        return None
    return (f"predicted {predicted:.1f} s = {PHASE_COST[name]} x the forward's {done['forward']['seconds']:.1f} s, "
            f"more than the {max(left, 0):.1f} s left of --budget-s {args.budget_s:g}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen2.5-vl-3b", help="model preset (default qwen2.5-vl-3b; tiny for tests)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--attn", default=None, choices=("sdpa", "flash_attention_2", "eager"),
                   help="attention implementation (default: the preset's)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="model dtype")
    p.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES,
                   help="phases to run, in order (each needs the build before it)")
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None,
                   help="gradient checkpointing in the training phases (default: off on CPU, on on CUDA)")
    p.add_argument("--optim", default=None,
                   help="optimizer of the training phases: 'recipe' (the recipes' AdamW) or a TrainingArguments optim "
                        "name (default: sgd on CPU, whose step holds no state: AdamW's 8 bytes per trainable parameter "
                        "take phase 5 of the 3B preset to ~22 GB, too close to a 24 GB machine; recipe on CUDA)")
    p.add_argument("--image-size", type=int, help="test image side in px (default: cpu 112, cuda 448)")
    p.add_argument("--max-pixels", type=int, help="processor max_pixels (default: image side squared)")
    p.add_argument("--new-tokens", type=int, help="Segmenter tokens to generate (default: cpu 4, cuda 16)")
    p.add_argument("--completion", type=int, help="GRPO max_completion_length (default: cpu 4, cuda 16)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--workdir", help="keep data and trainer outputs here (default: a temp dir)")
    p.add_argument("--budget-s", type=float, help="seconds this run may take: build and forward always run, a later "
                   "phase only when its predicted time (PHASE_COST x the forward's) fits in what is left; default: no limit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the final JSON to this file")
    args = p.parse_args(argv)
    if args.phases[0] != "build":
        p.error("--phases must start with build")
    if args.budget_s is not None and args.budget_s <= 0:
        p.error(f"--budget-s must be positive seconds, got {args.budget_s}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    if args.optim is None:
        args.optim = "recipe" if args.device == "cuda" else "sgd"
    if args.grad_ckpt is None:
        args.grad_ckpt = args.device == "cuda"
    max_pixels = args.max_pixels or (args.image_size * args.image_size if args.image_size else None)
    args.sizes = {"image": args.image_size, "max_pixels": max_pixels, "new_tokens": args.new_tokens,
                  "completion": args.completion}
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    summary = run_phases(args, log=lambda s: print(s, flush=True))
    line = json.dumps(summary)
    if args.json:
        args.json.write_text(line + "\n")
    print(line, flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

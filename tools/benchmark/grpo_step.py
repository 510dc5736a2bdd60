"""(a) The GRPO optimizer step: the recipe of a worker, per-phase timers, FLOPs and the summary of its steps."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lens.config import set_dotted

from .flops import flop_model, mfu, phase_flops
from .timing import PhaseTimer, derived_phases, median, peak_memory, reset_peak_memory, sync

# shared: grpo_shared_prefix + single_pass_rewards; fast: the product trainer without them; reference: the original's
GRPO_FLOWS = ("shared", "fast", "reference")
FLOW_SWITCHES = {"shared": True, "fast": False, "reference": False}
PIXELS_PER_TOKEN = 28 * 28  # Qwen2.5-VL: one LM image token per 2 x 2 patches of 14 px

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


def grpo_settings(args, out: Path) -> dict[str, Any]:
    """The recipe keys a GRPO worker sets (dotted), on top of the stage-2 recipe; the flow is not among them."""
    cuda = args.device == "cuda"
    n = args.new_tokens
    settings = {
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
    if getattr(args, "image_tokens", None):
        settings["data.min_pixels"] = settings["data.max_pixels"] = args.image_tokens * PIXELS_PER_TOKEN
    if cuda:
        settings["model.attn_implementation"] = attn_choice(args)
        settings["train.gradient_checkpointing"] = not args.no_grad_ckpt
    return settings


def grpo_recipe(args, out: Path, flow: str = "fast") -> dict:
    from lens.training.recipe import load_recipe, parse_override

    recipe = load_recipe(args.recipe, [f"model.init={args.ckpt}"])
    whole_groups = args.micro_batch % args.generations == 0  # single-pass rewards need whole-group micro-batches
    settings = {**grpo_settings(args, out), "grpo_shared_prefix": FLOW_SWITCHES[flow],
                "single_pass_rewards": FLOW_SWITCHES[flow] and whole_groups}
    for key, value in settings.items():
        set_dotted(recipe, key, value)
    for text in args.override:
        keys, value = parse_override(text)
        set_dotted(recipe, keys, value)
    return recipe


class TimedTrainerMixin:
    """Times the trainer's phases (see docs/benchmarks.md, "per-phase times") and counts each trained sequence's
    tokens and image grid for the FLOPs. Mixed in front of the trainer's class by `timed`."""

    bench_timer: PhaseTimer
    bench_groups: dict[int, dict]

    def _generate_and_score_completions(self, inputs):
        with self.bench_timer.phase("gen_and_score"):
            return super()._generate_and_score_completions(inputs)

    def _generate(self, *args, **kwargs):
        with self.bench_timer.phase("generate"):
            return super()._generate(*args, **kwargs)

    def _score_masks(self, *args, **kwargs):
        with self.bench_timer.phase("score_masks"):
            return super()._score_masks(*args, **kwargs)

    def _mask_forward(self, *args, **kwargs):  # the reference flow's extra query forward (inside the loss)
        with self.bench_timer.phase("mask_forward"):
            return super()._mask_forward(*args, **kwargs)

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        with self.bench_timer.phase("ref_logps" if model is self.ref_model else "policy_forward"):
            return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)

    def _compute_loss(self, model, inputs):
        count_groups(self.bench_groups, inputs)
        with self.bench_timer.phase("loss_forward"):
            return super()._compute_loss(model, inputs)


def count_groups(acc: dict[int, dict], inputs: dict) -> None:
    """Add a micro-batch's rollouts to their GRPO groups (`lens_group`): real prompt length, completion lengths,
    image grid (the FLOPs of every phase are counted from these, per step)."""
    prompts = inputs["prompt_mask"].sum(1).tolist()
    comps = inputs["completion_mask"].sum(1).tolist()
    for g, p, c, grid in zip(inputs["lens_group"].tolist(), prompts, comps, inputs["image_grid_thw"].tolist()):
        acc.setdefault(int(g), {"prompt": int(p), "comp": [], "grid": grid})["comp"].append(int(c))


def timed(trainer, timer: PhaseTimer, queries: int):
    """`trainer` with `TimedTrainerMixin` in front of its class; the policy's SAM2 encoding, its mask decoding in
    the loss and the backward are timed through their public calls."""
    from lens.training.grpo import lens_module

    base = type(trainer)
    trainer.__class__ = type(f"Timed{base.__name__}", (TimedTrainerMixin, base), {})
    trainer.bench_timer, trainer.bench_queries = timer, queries
    trainer.bench_groups = {}
    policy = lens_module(trainer.model)
    policy.encode_sam_images = timer.wrap(policy.encode_sam_images, lambda *a, **k: "sam_encode")
    policy.masks_from_queries = timer.wrap(  # connector + SAM2 decoder in the loss (batched or per-sample loop)
        policy.masks_from_queries, lambda *a, **k: "mask_decode" if timer.inside("loss_forward") else None
    )
    trainer.accelerator.backward = timer.wrap(trainer.accelerator.backward, lambda *a, **k: "backward")
    return trainer


def build_flow_trainer(args, flow: str, out: Path):
    from lens.training.recipe import build_trainer

    from .reference_flow import ReferenceFlowTrainer

    trainer = build_trainer(grpo_recipe(args, out, flow))
    return ReferenceFlowTrainer.adopt(trainer) if flow == "reference" else trainer


def grpo_worker(args, flow: str) -> dict[str, Any]:
    from transformers import TrainerCallback

    from lens.training.grpo import lens_module

    out = args.result.parent / f"grpo_{flow}"
    trainer = build_flow_trainer(args, flow, out)
    policy = lens_module(trainer.model)
    timer = PhaseTimer(args.device)
    fm = flop_model(policy)
    timed(trainer, timer, fm["queries"])
    step_groups = trainer.bench_groups
    counting = {"flow": flow, "beta": float(trainer.beta), "single_pass": bool(trainer.single_pass_rewards),
                "shared_generation": bool(getattr(trainer, "shared_generation", False))}
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
            groups = list(step_groups.values())
            step_groups.clear()
            record["steps"].append({"time": now - self.last, "phases": phases, "groups": groups})
            if state.global_step == 1:  # end of the warm-up step
                record["reset_ok"] = reset_peak_memory(args.device)
            sync(args.device)
            self.last = time.perf_counter()

    trainer.add_callback(StepClock())
    trainer.train()
    return {
        "flow": flow,
        "warmup_step_s": record["steps"][0]["time"],
        "steps": [step_record(fm, st, counting) for st in record["steps"][1:]],
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "flop_model": fm,
        "attn_implementation": getattr(policy.config, "_attn_implementation", None),
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "memory": peak_memory(args.device, record["reset_ok"]),
    }


def step_record(fm: dict[str, Any], st: dict[str, Any], counting: dict[str, Any]) -> dict[str, Any]:
    groups = st["groups"]
    per_phase = phase_flops(fm, counting["flow"], groups, counting["beta"], counting["single_pass"],
                            counting["shared_generation"])
    comp = [c for g in groups for c in g["comp"]]
    return {"time": st["time"], "phases": st["phases"], "flops": per_phase["train_fwd_bwd"], "phase_flops": per_phase,
            "lm_tokens": sum(g["prompt"] * len(g["comp"]) for g in groups) + sum(comp) + fm["queries"] * len(comp),
            "prompt_tokens": median([g["prompt"] for g in groups]), "completion_tokens": sum(comp),
            "vit_patches": sum(len(g["comp"]) * t * h * w for g in groups for t, h, w in [g["grid"]])}


def summarize_grpo(rounds: list[dict[str, Any]], args) -> dict[str, Any]:
    """Pool the timed steps of every round of one flow: medians per phase, FLOPs, MFU, peak memory."""
    steps = [st for r in rounds for st in r["steps"]]
    times = [st["time"] for st in steps]
    per_step: dict[str, list[float]] = {}
    for st in steps:
        for k, v in derived_phases(st["phases"], st["time"]).items():
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
        "phase_flops_per_step": {k: median([st["phase_flops"][k] for st in steps]) for k in steps[0]["phase_flops"]}
        if steps and "phase_flops" in steps[0] else {},
        "prompt_tokens_median": median([st.get("prompt_tokens") for st in steps if st.get("prompt_tokens")]),
        "train_fwd_bwd_tflops_per_s": median([f / t / 1e12 for f, t in zip(flops, fwd_bwd) if t > 0]),
        "flop_model": rounds[0]["flop_model"],
        "attn_implementation": rounds[0]["attn_implementation"],
        "gradient_checkpointing": rounds[0]["gradient_checkpointing"],
        "memory": {k: max(r["memory"].get(k, 0.0) for r in rounds) for k in rounds[0]["memory"]},
    }
    if args.device == "cuda":
        out["mfu_train_fwd_bwd"] = median([mfu(f, t, args.peak_tflops) for f, t in zip(flops, fwd_bwd) if t > 0])
        out["mfu_step"] = median([mfu(f, t, args.peak_tflops) for f, t in zip(flops, times) if t > 0])
    return out


def upstream_estimate(res: dict[str, Any]) -> float:
    """Step time of the original's flow, estimated from the reference flow's phases.

    The original takes the log-probs, the masks and the mask-IoU reward from ONE policy forward, whereas the
    reference flow runs a no-grad scoring forward and a second query forward for the masks. Estimate = reference
    step - score_masks - 3 x (mask_forward - mask_decode): the extra language-model/ViT forward and its ~2x backward
    go, the per-sample decoder loop stays. The fast flow keeps its scoring forward (TRL computes rewards before
    the loss), so this ratio is the conservative one.
    """
    ref = res["reference"]["phases_s_median"]
    extra = max(ref.get("mask_forward", 0.0) - ref.get("mask_decode", 0.0), 0.0)
    return res["reference"]["step_s_median"] - ref.get("score_masks", 0.0) - 3 * extra


def grpo_summary(res: dict[str, dict[str, Any]], args) -> dict[str, Any]:
    """The `grpo` block of the JSON: every flow's summary and the ratios. `speedup_vs_upstream_estimate` is the
    estimated original step over this flow's (`shared`; today's `fast` when only fast and reference ran)."""
    from .timing import memory_figure

    ref, fast = res["reference"], res["fast"]
    best = res.get("shared", fast)
    out = {
        **res, "prompts": args.prompts, "generations": args.generations, "new_tokens": args.new_tokens,
        "micro_batch": args.micro_batch, "rounds": args.rounds,
        "image_tokens": getattr(args, "image_tokens", None), "queries": getattr(args, "queries", None),
        "speedup": ref["step_s_median"] / best["step_s_median"],
        "speedup_fast": ref["step_s_median"] / fast["step_s_median"],
        "speedup_vs_upstream_estimate": upstream_estimate(res) / best["step_s_median"],
        "speedup_fast_vs_upstream_estimate": upstream_estimate(res) / fast["step_s_median"],
        "memory_ratio": (memory_figure(ref["memory"]) or 0) / (memory_figure(best["memory"]) or 1),
    }
    if ref.get("train_flops_per_step"):
        out["train_flops_vs_reference"] = best["train_flops_per_step"] / ref["train_flops_per_step"]
        out["train_flops_vs_reference_fast"] = fast["train_flops_per_step"] / ref["train_flops_per_step"]
    return out

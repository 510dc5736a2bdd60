"""(b) Evaluation throughput, in expressions/s, batched against one expression per call.

Two scopes of the same measurement (same checkpoint, synthetic `refcoco_val` expressions, fixed answer length):
- `eval` (default): `Segmenter.run_batch` alone, on images decoded beforehand; it also records the texts and mask
  logits so that the parent can check that both modes agree.
- `runner` (`--parts runner`): the whole evaluation runner (`lens.evaluation.runner.run_evaluation`), data loading,
  scoring and record writing included; the time is the runner's own per-split wall time.
"""

from __future__ import annotations

import time
from typing import Any

from .grpo_step import attn_choice
from .timing import median, peak_memory, reset_peak_memory, sync

EVAL_MODES = ("batched", "single")
BENCHMARK = "refcoco_val"


def load_segmenter(args):
    """The benchmark checkpoint as a Segmenter whose answers have exactly `--eval-new-tokens` tokens."""
    import torch
    from transformers import AutoProcessor

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
    return seg


def batch_size(args, mode: str) -> int:
    return args.eval_batch if mode == "batched" else 1


def eval_worker(args, mode: str) -> dict[str, Any]:
    import torch

    from lens.data.registry import load_benchmark
    from lens.evaluation.runner import SplitSpec, build_expressions, make_batches

    seg = load_segmenter(args)
    spec = SplitSpec(BENCHMARK)
    exprs = build_expressions(load_benchmark(spec.benchmark, args.data), spec, "lens", args.eval_exprs)
    images = {}
    for e in exprs:  # decoded once, outside the timed region (same for both modes)
        if e.image_key not in images:
            images[e.image_key] = e.ref.load_image()
    bs = batch_size(args, mode)
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
        "new_tokens": args.eval_new_tokens,
        "expr_per_s": speeds,
        "memory": peak_memory(args.device, reset_ok),
    }


def runner_worker(args, mode: str) -> dict[str, Any]:
    """The evaluation runner end to end: one warm-up run, then `--eval-repeats` timed runs (fresh output folders,
    so that no run resumes another's records)."""
    from lens.evaluation.runner import EvalConfig, run_evaluation

    seg = load_segmenter(args)
    bs = batch_size(args, mode)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    speeds, reset_ok, res = [], False, {}
    for rep in range(1 + args.eval_repeats):
        cfg = EvalConfig(model=str(args.ckpt), benchmarks=[BENCHMARK], data_root=str(args.data),
                         limit=args.eval_exprs, out=str(args.result.parent / f"runner_{mode}_{rep}"), batch_size=bs,
                         max_new_tokens=args.eval_new_tokens, device=args.device, dtype=dtype)
        res = next(iter(run_evaluation(cfg, seg).values()))
        if rep == 0:
            reset_ok = reset_peak_memory(args.device)
        else:
            speeds.append(res["expressions_per_s"])
    return {
        "mode": mode,
        "batch_size": bs,
        "expressions": res["n"],
        "new_tokens": args.eval_new_tokens,
        "expr_per_s": speeds,
        "memory": peak_memory(args.device, reset_ok),
    }


def summarize_eval(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    speeds = [v for r in rounds for v in r["expr_per_s"]]
    out = {k: v for k, v in rounds[0].items() if k not in ("expr_per_s", "memory")}
    out.update(expr_per_s=speeds, expr_per_s_median=median(speeds),
               memory={k: max(r["memory"].get(k, 0.0) for r in rounds) for k in rounds[0]["memory"]})
    return out


def compare_eval(work) -> dict[str, Any]:
    """Do both modes give the same texts and mask logits (from the files the eval workers saved)?"""
    import torch

    a, b = (torch.load(work / f"eval_{m}.pt") for m in EVAL_MODES)
    same = sum(x == y for x, y in zip(a["texts"], b["texts"]))
    diff = (a["mask_logits"].float() - b["mask_logits"].float()).abs()
    return {"same_texts": f"{same}/{len(a['texts'])}", "max_mask_logit_diff": float(diff.max())}


def eval_summary(res: dict[str, dict[str, Any]], rounds: int) -> dict[str, Any]:
    return {**res, "rounds": rounds,
            "speedup": res["batched"]["expr_per_s_median"] / res["single"]["expr_per_s_median"]}

"""The human-readable table printed before the JSON line."""

from __future__ import annotations

from typing import Any

from .timing import memory_figure

PHASE_ROWS = ["step", "gen_and_score", "  generate", "  sam_encode", "  score_masks", "  ref_logps", "  gen_other",
              "loss_forward", "  policy_forward", "    mask_forward", "    mask_decode", "backward",
              "optimizer_and_other"]


def mib(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f} MiB"


def report(summary: dict[str, Any]) -> None:
    print(f"\nLENS benchmark: preset {summary['preset']} on {summary['device']} ({summary['machine']}), "
          f"{summary['date']}; torch {summary['versions']['torch']}, transformers {summary['versions']['transformers']}, "
          f"trl {summary['versions']['trl']}")
    if summary.get("grpo"):
        report_grpo(summary["grpo"], summary)
    if summary.get("eval"):
        report_eval("(b) evaluation", summary["eval"])
    if summary.get("runner"):
        report_eval("(b') evaluation runner end to end", summary["runner"])
    print()


def report_grpo(g: dict[str, Any], summary: dict[str, Any]) -> None:
    flows = [k for k in ("shared", "fast", "reference") if k in g]
    f = g[flows[0]]
    print(f"\n(a) GRPO optimizer step: {g['prompts']} prompts x G={g['generations']} = {f['rollouts_per_step']} rollouts, "
          f"{g['new_tokens']} completion tokens each, ~{f.get('prompt_tokens_median') or 0:.0f} prompt tokens, "
          f"{g.get('queries')} queries; median of {len(f['step_s'])} steps ({g['rounds']} round(s), 1 warm-up step each)")
    print(f"    {'phase (median s)':<22}" + "".join(f"{k:>12}" for k in flows))
    for name in PHASE_ROWS:
        key = name.strip()
        vals = [g[k]["step_s_median"] if key == "step" else g[k]["phases_s_median"].get(key) for k in flows]
        if all(v is None for v in vals):
            continue
        print(f"    {name:<22}" + "".join(f"{(v or 0):>12.3f}" for v in vals))
    print(f"    {'TFLOP counted':<22}" + "".join(f"{k:>12}" for k in flows))
    for phase in g[flows[0]].get("phase_flops_per_step", {}):
        print(f"    {'  ' + phase:<22}" + "".join(f"{g[k]['phase_flops_per_step'].get(phase, 0) / 1e12:>12.4f}" for k in flows))
    print(f"    speed-up reference/{flows[0]}: x{g['speedup']:.2f} (fast: x{g['speedup_fast']:.2f}); estimated original "
          f"flow / {flows[0]}: x{g['speedup_vs_upstream_estimate']:.2f} (fast: x{g['speedup_fast_vs_upstream_estimate']:.2f})")
    if "train_flops_vs_reference" in g:
        print(f"    train fwd+bwd FLOPs vs reference: {flows[0]} {g['train_flops_vs_reference']:.1%}, "
              f"fast {g['train_flops_vs_reference_fast']:.1%}")
    print("    peak memory: " + ", ".join(f"{k} {mib(memory_figure(g[k]['memory']))}" for k in flows))
    if "mfu_train_fwd_bwd" in f:
        print(f"    MFU (train fwd+bwd, {summary['peak_tflops']:.0f} TFLOP/s peak): "
              + ", ".join(f"{k} {g[k]['mfu_train_fwd_bwd']:.1%}" for k in flows)
              + "; whole step: " + ", ".join(f"{k} {g[k]['mfu_step']:.1%}" for k in flows))
    print("    logged losses (round 1) " + ", ".join(f"{k} {[f'{x:.5f}' for x in g[k]['losses'][0]]}" for k in flows))


def report_eval(title: str, e: dict[str, Any]) -> None:
    b, s = e["batched"], e["single"]
    images = f" on {b['distinct_images']} images" if "distinct_images" in b else ""
    print(f"\n{title}: {b['expressions']} expressions{images}, {b['new_tokens']} "
          f"generated tokens each, median of {len(b['expr_per_s'])} passes ({e['rounds']} round(s))")
    print(f"    batch {b['batch_size']:>3}: {b['expr_per_s_median']:8.2f} expressions/s, peak {mib(memory_figure(b['memory']))}")
    print(f"    batch   1: {s['expr_per_s_median']:8.2f} expressions/s, peak {mib(memory_figure(s['memory']))}")
    agreement = e.get("agreement")
    tail = (f"; same texts {agreement['same_texts']}, max |mask logit diff| {agreement['max_mask_logit_diff']:.2e}"
            if agreement else "")
    print(f"    speed-up: x{e['speedup']:.2f}{tail}")

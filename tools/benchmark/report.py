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
    f, r = g["fast"], g["reference"]
    print(f"\n(a) GRPO optimizer step: {g['prompts']} prompts x G={g['generations']} = {f['rollouts_per_step']} rollouts, "
          f"{g['new_tokens']} completion tokens each, median of {len(f['step_s'])} steps "
          f"({g['rounds']} round(s), 1 warm-up step each)")
    print(f"    {'phase (median s)':<22}{'fast':>10}{'reference':>12}")
    for name in PHASE_ROWS:
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
    print(f"    logged losses (round 1) fast {[f'{x:.5f}' for x in f['losses'][0]]}, "
          f"reference {[f'{x:.5f}' for x in r['losses'][0]]}")


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

"""Model FLOPs of one GRPO training forward + backward, and MFU (see docs/benchmarks.md, "MFU").

    F_step = sum over sequences [ 6 N_lm S + 6 H V C + 6 L d S^2 ]
           + sum over images   [ 6 N_vit P + 6 N_merger P / merge + 12 d_v P (L_full P + L_win min(P, W)) ]

3x the forward (no gradient-checkpointing recomputation); the SAM2 decoder and the context module are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def flop_model(policy) -> dict[str, Any]:
    """Per-token parameter counts and attention sizes of the trained towers (LM and ViT) of a LENS policy."""
    cfg = policy.config
    tc, vc = cfg.text_config, cfg.vision_config
    lm = policy.model.language_model
    embed = lm.embed_tokens.weight.numel()
    visual = policy.model.visual
    merger = count_params(visual.merger)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    v_head = vc.hidden_size // vc.num_heads
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
        "vit_window_patches": (vc.window_size // vc.patch_size) ** 2,
        "merge": vc.spatial_merge_size**2,
        "queries": cfg.num_of_query,
    }


def sequence_flops(fm: dict[str, Any], seq_len: int, completion_len: int) -> float:
    """LM FLOPs of one sequence of S real tokens (prompt + completion + queries) with C completion tokens:
    6 N_lm S (matmuls) + 6 H V C (LM head, scored on the completion only) + 6 L d S^2 (causal QK^T and AV)."""
    s, c = seq_len, completion_len
    return 6 * fm["lm_params"] * s + 6 * fm["lm_head_params"] * c + 6 * fm["lm_layers"] * fm["lm_attn_width"] * s * s


def image_flops(fm: dict[str, Any], grid: Sequence[int]) -> float:
    """ViT FLOPs of one image of P = t h w patches: blocks, the merger on P / merge tokens, and attention
    (full blocks over all P patches, windowed blocks over min(P, W))."""
    t, h, w = grid
    p = t * h * w
    total = 6 * fm["vit_params"] * p + 6 * fm["merger_params"] * p / fm["merge"]
    attn_span = fm["vit_full_layers"] * p + fm["vit_window_layers"] * min(p, fm["vit_window_patches"])
    return total + 12 * fm["vit_attn_width"] * p * attn_span


def training_flops(fm: dict[str, Any], seq_lens: Sequence[int], completion_lens: Sequence[int],
                   grids: Sequence[Sequence[int]]) -> float:
    """Model FLOPs of one training forward + backward over the given sequences and their images."""
    total = 0.0
    for s, c in zip(seq_lens, completion_lens):
        total += sequence_flops(fm, s, c)
    for grid in grids:
        total += image_flops(fm, grid)
    return total


def group_lm_flops(fm: dict[str, Any], prefix: int, suffixes: Sequence[int], scored: int, factor: int,
                   shared: bool) -> float:
    """LM FLOPs of one GRPO group: a prefix of `prefix` real tokens (the prompt) and one suffix per rollout (its
    completion, plus the queries where appended), `scored` LM-head positions; `factor` 1 for a forward, 3 for a
    forward + backward. Unshared, every rollout runs prefix + suffix (as `sequence_flops`); shared, the prefix runs
    once and each suffix attends to it and to itself: attention prefix^2 + sum(2 prefix s + s^2)."""
    if shared:
        tokens = prefix + sum(suffixes)
        attn = prefix * prefix + sum(2 * prefix * s + s * s for s in suffixes)
    else:
        tokens = sum(prefix + s for s in suffixes)
        attn = sum((prefix + s) ** 2 for s in suffixes)
    width = fm["lm_layers"] * fm["lm_attn_width"]
    return factor * (2 * fm["lm_params"] * tokens + 2 * fm["lm_head_params"] * scored + 2 * width * attn)


# What each flow runs per GRPO group, by phase: (LM factor, queries appended, prefix shared, image encodings per group
# = "group" or "row", ViT factor). None: the phase does not run. The reference flow's loss runs two query forwards
# with gradients (masks, then log-probs).
FLOW_PHASES: dict[str, dict[str, list[tuple[int, bool, bool, str, int]] | None]] = {
    "reference": {"generate": [(1, False, False, "row", 1)], "score_forward": [(1, True, False, "row", 1)],
                  "ref_forward": [(1, False, False, "row", 1)],
                  "train_fwd_bwd": [(3, True, False, "row", 3), (3, True, False, "row", 3)]},
    "fast": {"generate": [(1, False, False, "row", 1)], "score_forward": [(1, True, False, "group", 1)],
             "ref_forward": [(1, False, False, "row", 1)], "train_fwd_bwd": [(3, True, False, "group", 3)]},
    "shared": {"generate": [(1, False, False, "row", 1)], "score_forward": [(1, True, True, "group", 1)],
               "ref_forward": [(1, False, True, "group", 1)], "train_fwd_bwd": [(3, True, True, "group", 3)]},
}


def phase_flops(fm: dict[str, Any], flow: str, groups: Sequence[dict[str, Any]], beta: float = 0.0,
                single_pass: bool = False, shared_generation: bool = False) -> dict[str, float]:
    """Counted FLOPs per phase of `flow` over GRPO groups, each {"prompt": real prompt tokens, "comp": [completion
    lengths], "grid": the image's (t, h, w)}. Generation counts as one forward over prompt + completion (KV cache);
    the scoring forward scores no token (masks only)."""
    q = fm["queries"]
    plan = dict(FLOW_PHASES[flow])
    if beta == 0.0:
        plan["ref_forward"] = None
    if single_pass and flow == "shared":
        plan["score_forward"] = None
    if shared_generation:
        plan["generate"] = [(1, False, True, "group", 1)]
    out: dict[str, float] = {}
    for phase, passes in plan.items():
        total = 0.0
        for factor, queries, shared, images, vit in passes or ():
            for g in groups:
                scored = 0 if phase == "score_forward" else sum(g["comp"])
                suffixes = [c + (q if queries else 0) for c in g["comp"]]
                total += group_lm_flops(fm, g["prompt"], suffixes, scored, factor, shared)
                n_images = 1 if images == "group" else len(g["comp"])
                total += n_images * image_flops(fm, g["grid"]) * vit / 3
        out[phase] = total
    return out


def mfu(flops: float, seconds: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: flops / (seconds x peak)."""
    return flops / (seconds * peak_tflops * 1e12)

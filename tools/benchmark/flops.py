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


def mfu(flops: float, seconds: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: flops / (seconds x peak)."""
    return flops / (seconds * peak_tflops * 1e12)

"""The stage-2 reward of a policy on fixed prompts.

GRPO's logged reward is the reward of each step's batch, so a rise over the run mixes in which prompts came
late (with the learning rate at 0, the tiny stage 2's logged reward "rises" as much: docs/design.md). Scoring
two checkpoints on the same references, with the same sampling and seed, measures what training changed.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm import tqdm

from lens.data.base import Reference
from lens.evaluation.swap import target_llm_box
from lens.losses import mask_iou_from_logits
from lens.rewards import get_reward_funcs


def policy_reward(
    segmenter,
    refs: Sequence[Reference],
    reward_names: Sequence[str],
    num_generations: int = 4,
    sampling: dict | None = None,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[str, float]:
    """Mean reward of `num_generations` completions per reference (each reference's first expression),
    sampled with `sampling` (`generate` keyword arguments; greedy if None) and scored by the named rewards of
    `lens.rewards`. Returns `reward` (the sum of the rewards, averaged over completions) and `reward/<name>`."""
    if num_generations < 1 or batch_size < num_generations:
        raise ValueError(f"num_generations={num_generations} must be >= 1 and <= batch_size={batch_size}")
    funcs = get_reward_funcs(reward_names)
    torch.manual_seed(seed)
    totals = {name: 0.0 for name in reward_names}
    per_batch = batch_size // num_generations
    n = 0
    for s in tqdm(range(0, len(refs), per_batch), desc="reward", leave=False):
        batch = [ref for ref in refs[s : s + per_batch] for _ in range(num_generations)]  # G rows per reference
        prompts = [r.expressions[0] for r in batch]
        out = segmenter.run_batch([str(r.image_path) for r in batch], prompts, sampling=sampling)
        targets = [torch.from_numpy(r.load_mask() == 1) for r in batch]
        ious = mask_iou_from_logits(out.mask_logits, targets).tolist()
        gt_boxes = [target_llm_box(r, out.orig_sizes[k], out.llm_sizes[k]) for k, r in enumerate(batch)]
        for name, func in zip(reward_names, funcs):
            totals[name] += sum(func(prompts, out.texts, box_llm=gt_boxes, mask_iou=ious))
        n += len(batch)
    result = {f"reward/{name}": total / n for name, total in totals.items()}
    result["reward"] = sum(result.values())
    return result

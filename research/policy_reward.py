"""The stage-2 reward of a policy on fixed prompts.

GRPO's logged reward is the reward of each step's batch, so a rise over the run mixes in which prompts came
late (with the learning rate at 0, the tiny stage 2's logged reward "rises" as much: docs/lab-notebook.md).
Scoring two checkpoints on the same references, with the same sampling and seed, measures what training changed.
The mask IoU is the training reward's own (:func:`lens.losses.mask_iou_from_logits`, which counts pixels with
evaluation's :func:`lens.evaluation.metrics.score_mask_logits`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from lens.data.base import Reference
from lens.losses import mask_iou_from_logits
from lens.rewards import get_reward_funcs
from research.swap import target_llm_box


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
    `lens.rewards`. Returns `reward` (the sum of the rewards, averaged over completions) and `reward/<name>`.
    The draws depend on `seed` and on `batch_size` (which rows share a `generate` call)."""
    if num_generations < 1 or batch_size < num_generations:
        raise ValueError(f"num_generations={num_generations} must be >= 1 and <= batch_size={batch_size}")
    funcs = get_reward_funcs(reward_names)
    torch.manual_seed(seed)
    totals = {name: 0.0 for name in reward_names}
    per_batch = batch_size // num_generations
    n = 0
    for s in tqdm(range(0, len(refs), per_batch), desc="reward", leave=False):
        chunk = refs[s : s + per_batch]
        images = [ref.load_image() for ref in chunk]  # decoded once, shared by the G rows of each reference
        masks = [torch.from_numpy(ref.load_mask() == 1) for ref in chunk]
        pick = [k for k in range(len(chunk)) for _ in range(num_generations)]  # G rows per reference
        batch = [chunk[k] for k in pick]
        prompts = [r.expressions[0] for r in batch]
        out = segmenter.run_batch([images[k] for k in pick], prompts, sampling=sampling,
                                  image_keys=[r.image_key for r in batch])
        ious = mask_iou_from_logits(out.mask_logits, [masks[k] for k in pick]).tolist()
        gt_boxes = [target_llm_box(r, out.orig_sizes[k], out.llm_sizes[k]) for k, r in enumerate(batch)]
        for name, func in zip(reward_names, funcs):
            totals[name] += sum(func(prompts, out.texts, box_llm=gt_boxes, mask_iou=ious))
        n += len(batch)
    result = {f"reward/{name}": total / n for name, total in totals.items()}
    result["reward"] = sum(result.values())
    return result

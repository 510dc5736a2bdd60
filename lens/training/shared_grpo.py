"""Shared-prefix GRPO and single-pass rewards, mixed into `LensGRPOTrainer` (lens/training/grpo.py).

- `shared_prefix`: the policy's query forwards (scoring, old/loss log-probs, masks) and the reference forward run
  each group's prompt once (lens/modeling/shared_prefix.py); rows are grouped by prompt tokens and image, so any
  micro-batch works, and one that holds whole groups shares the most. With `steps_per_generation` > 1, TRL shuffles
  the ROWS of the generation batch before splitting it into micro-batches; here whole groups are shuffled instead
  (`_prepare_inputs`), so every micro-batch holds whole groups (or one run of a group when it is smaller than G).
  The update is the same sum over the generation batch; what changes is which rows share a micro-batch: a loss
  normalised per micro-batch (`loss_type` bnpo, or grpo with unequal lengths) weighs rows differently, and with
  `num_iterations` > 1 every iteration reuses the same (group-wise) micro-batches, as TRL reuses its row-wise ones.
- `single_pass_rewards`: the mask-IoU reward and the advantages come from the loss forward's own masks (as the
  original does); the no-grad scoring forward goes. Needs `num_iterations` 1 (old log-probs are then the loss
  pass's own, detached), micro-batches of whole groups and group-local advantages (`scale_rewards` group or none,
  `multi_objective_aggregation` sum_then_normalize); elsewhere the two-pass flow runs (with a warning). At
  generation the mask rewards are NaN; once the loss passes have seen the whole generation batch they write the
  real `reward`, `reward_std`, `frac_reward_zero_std` and `rewards/<name>/mean|std` into the entries TRL logged.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
from trl.trainer.utils import nanstd, split_pixel_values_by_grid, split_tensor_dict, unsplit_pixel_values_by_grid

from lens.distinct import distinct_index
from lens.losses import mask_iou_from_logits
from lens.modeling.shared_prefix import prefix_groups, shared_reference_log_probs

MASK_REWARDS = ("mask_iou", "mask_iou_linear")
logger = logging.getLogger(__name__)


def shuffle_groups(batch: dict, group_size: int) -> dict:
    """`shuffle_sequence_dict` with whole groups of `group_size` consecutive rows moved together."""
    n = len(batch["prompt_ids"])
    perm = (torch.randperm(n // group_size)[:, None] * group_size + torch.arange(group_size)).flatten()
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1:
            out[key] = value[perm]
        elif isinstance(value, (list, tuple)) and len(value) == n:
            out[key] = [value[i] for i in perm.tolist()]
        else:
            out[key] = value
    return out


class SharedPrefixMixin:
    """The two switches of the module docstring (attributes `shared_prefix`, `single_pass_rewards`)."""

    shared_prefix: bool = False
    single_pass_rewards: bool = False

    def _check_single_pass(self) -> bool:
        """Whether the single pass can give TRL's advantages here; logs what is missing where it cannot."""
        args = self.args
        need = {
            "num_iterations == 1": args.num_iterations == 1,
            "per_device_train_batch_size a multiple of num_generations (whole groups per micro-batch)":
                args.per_device_train_batch_size % args.num_generations == 0,
            "scale_rewards 'group' or 'none'": self.scale_rewards in ("group", "none"),
            "multi_objective_aggregation 'sum_then_normalize'":
                self.multi_objective_aggregation == "sum_then_normalize",
            "no vLLM importance sampling": not (self.use_vllm and self.vllm_importance_sampling_correction),
            "grpo_shared_prefix when steps_per_generation > 1 (whole-group micro-batches)":
                args.steps_per_generation == 1 or self.shared_prefix,
        }
        missing = [k for k, ok in need.items() if not ok]
        if missing:
            logger.warning("single_pass_rewards: the two-pass flow (a scoring forward) runs instead; the single pass "
                           "needs %s", ", ".join(missing))
        return not missing

    @property
    def _single_pass_now(self) -> bool:
        return self.single_pass_rewards and self.needs_mask_iou

    def _prefix_kwargs(self, input_ids, attention_mask, prefix_length: int, image_index) -> dict:
        """`prefix_groups`/`prefix_length` for a query forward of (B, P + C) rows (empty when sharing is off)."""
        if not self.shared_prefix or image_index is None:  # without each row's image, equal tokens may hide two images
            return {}
        p = prefix_length
        return {"prefix_groups": prefix_groups(input_ids[:, :p], attention_mask[:, :p], image_index), "prefix_length": p}

    def _shared_reference_logps(self, model, input_ids, attention_mask, logits_to_keep, batch_size, pixel_values,
                                image_grid_thw, mm_token_type_ids=None):
        """The reference log-probs (B, C) in chunks of `batch_size` rows, each group's prompt run once."""
        inner = self.accelerator.unwrap_model(model)
        patches = image_grid_thw.prod(-1) if image_grid_thw is not None else None
        p = input_ids.shape[1] - logits_to_keep
        out, step = [], batch_size or input_ids.shape[0]
        for s in range(0, input_ids.shape[0], step):
            e = min(s + step, input_ids.shape[0])
            ids, att = input_ids[s:e], attention_mask[s:e]
            kwargs = {}
            if pixel_values is not None:
                kwargs = dict(pixel_values=pixel_values[int(patches[:s].sum()):int(patches[:e].sum())],
                              image_grid_thw=image_grid_thw[s:e])
            mm = mm_token_type_ids[s:e] if mm_token_type_ids is not None else None
            groups = prefix_groups(ids[:, :p], att[:, :p], self._gen_rows[s:e])
            with self.accelerator.autocast():
                out.append(shared_reference_log_probs(model, inner, ids, att, logits_to_keep, groups, **kwargs,
                                                      mm_token_type_ids=mm))
        return torch.cat(out)

    # ------------------------------------------------------------------ micro-batches of whole groups
    def _prepare_inputs(self, generation_batch):
        if not (self.shared_prefix and self.model.training and self.args.steps_per_generation > 1):
            return super()._prepare_inputs(generation_batch)
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = split_pixel_values_by_grid(self._generate_and_score_completions(generation_batch))
            batch = shuffle_groups(batch, self.num_generations)
            self._buffered_inputs = [unsplit_pixel_values_by_grid(b)
                                     for b in split_tensor_dict(batch, self.args.steps_per_generation)]
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    # ------------------------------------------------------------------ single-pass rewards
    def _single_pass_columns(self, rewards_per_func: torch.Tensor, n_local: int) -> torch.Tensor:
        """Blank the mask rewards of TRL's (N, F) table at generation; returns this rank's (B, F) rows."""
        cols = [i for i, name in enumerate(self.reward_func_names) if name in MASK_REWARDS]
        rewards_per_func[:, cols] = torch.nan
        start = self.accelerator.process_index * n_local
        return rewards_per_func[start:start + n_local].clone()

    def _single_pass_advantages(self, inputs: dict, mask_logits: torch.Tensor) -> torch.Tensor:
        """Advantages (B,) of a micro-batch of whole groups from its own masks (TRL's sum_then_normalize)."""
        iou = mask_iou_from_logits(mask_logits.detach(), inputs["target_masks"])
        self._pass_mask_iou = iou  # the loss's seg/mask_iou metric is the same numbers (LensGRPOTrainer._compute_loss)
        table = inputs["lens_rewards"].clone()  # (B, F), mask columns NaN
        n = table.shape[0]
        for i, (name, func) in enumerate(zip(self.reward_func_names, self.reward_funcs)):
            if name in MASK_REWARDS:
                values = func(prompts=[None] * n, completions=[""] * n, mask_iou=iou.tolist())
                table[:, i] = torch.tensor(values, dtype=table.dtype, device=table.device)
        weights = self.reward_weights.to(table.device)
        rewards = (table * weights).nansum(1)
        rewards[torch.isnan(table).all(1)] = torch.nan
        mode = "train" if self.model.training else "eval"
        g = self.num_generations if mode == "train" else self.num_generations_eval
        order = torch.argsort(inputs["lens_group"], stable=True)  # rows of a group together (TRL shuffles rows)
        if not bool((torch.unique(inputs["lens_group"], return_counts=True)[1] == g).all()):
            raise RuntimeError("single_pass_rewards: a micro-batch must hold whole groups")
        grouped = rewards[order].view(-1, g)
        centred = grouped - torch.nanmean(grouped, 1, keepdim=True)
        if self.scale_rewards != "none":
            std = nanstd(grouped, dim=1) if g > 1 else torch.zeros_like(grouped[:, 0])
            centred = centred / (std[:, None] + 1e-4)
        advantages = torch.empty_like(rewards).index_put_((order,), centred.flatten())
        zero_std = None
        if self.scale_rewards != "none":
            zero_std = torch.isclose(std, torch.zeros_like(std)).repeat_interleave(g)
        self._log_single_pass(table, rewards, zero_std)
        return torch.nan_to_num(advantages, nan=0.0)

    def _mark_single_pass_metrics(self, rows: int) -> None:
        """After TRL logged a generation batch's rewards (mask rewards blank): remember where, so that the loss
        passes of that batch write the real figures there once they have seen its `rows` rows."""
        metrics = self._metrics["train" if self.model.training else "eval"]
        keys = ["reward", "reward_std", "frac_reward_zero_std"] + [
            f"rewards/{n}/{s}" for n in self.reward_func_names for s in ("mean", "std")]
        self._sp_log = {"slots": {k: len(metrics[k]) - 1 for k in keys if metrics.get(k)}, "rows": rows, "seen": []}

    def _log_single_pass(self, table, rewards, zero_std) -> None:
        log = getattr(self, "_sp_log", None)
        if log is None:
            return
        log["seen"].append((table, rewards, zero_std))
        if sum(t.shape[0] for t, _, _ in log["seen"]) < log["rows"]:
            return
        table = self.accelerator.gather(torch.cat([t for t, _, _ in log["seen"]]))
        rewards = self.accelerator.gather(torch.cat([r for _, r, _ in log["seen"]]))
        values = {"reward": torch.nanmean(rewards).item(), "reward_std": nanstd(rewards).item()}
        if all(z is not None for _, _, z in log["seen"]):
            zero = torch.cat([z for _, _, z in log["seen"]]).float()
            values["frac_reward_zero_std"] = self.accelerator.gather(zero).mean().item()
        for i, name in enumerate(self.reward_func_names):
            values[f"rewards/{name}/mean"] = torch.nanmean(table[:, i]).item()
            values[f"rewards/{name}/std"] = nanstd(table[:, i]).item()
        metrics = self._metrics["train" if self.model.training else "eval"]
        for key, slot in log["slots"].items():
            if key in values and slot < len(metrics[key]):
                metrics[key][slot] = values[key]
        self._sp_log = None

    # ------------------------------------------------------------------ generation: each prompt prefilled once
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        plain = (not self.shared_prefix or self.use_vllm or self.use_transformers_continuous_batching
                 or has_tool_images or self._gen_rows is None or len(prompt_ids) != len(self._gen_rows))
        if plain:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        import functools

        from lens.modeling.shared_generation import shared_prefill_generate

        unwrapped = self.accelerator.unwrap_model(self.model_wrapped)
        _, groups = distinct_index([(int(i), tuple(p)) for i, p in zip(self._gen_rows.tolist(), prompt_ids)])
        unwrapped.generate = functools.partial(shared_prefill_generate, unwrapped, type(unwrapped).generate.__get__(
            unwrapped), groups)
        try:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        finally:
            del unwrapped.generate

    @property
    def shared_generation(self) -> bool:
        """Whether HF generation prefills each group's prompt once (with `shared_prefix`, without vLLM)."""
        return self.shared_prefix and not self.use_vllm and not self.use_transformers_continuous_batching


class DistinctImages:
    """An image processor that processes each distinct image object of a call once (a GRPO group's G rows hold
    the same object) and repeats its patches: the same `pixel_values` and `image_grid_thw` as the wrapped one."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, images, **kwargs):
        from transformers.image_utils import make_flat_list_of_images

        flat = make_flat_list_of_images(images)
        first, index = distinct_index([id(image) for image in flat])
        out = self.inner([flat[i] for i in first] if len(first) < len(flat) else images, **kwargs)
        if len(first) == len(flat):
            return out
        grid, pixels = out["image_grid_thw"], out["pixel_values"]  # (N, 3), (sum of N images' patches, D)
        starts = np.cumsum([0] + [int(x) for x in grid.prod(-1).tolist()])
        pieces = [pixels[starts[i]:starts[i + 1]] for i in index.tolist()]
        tensor = isinstance(pixels, torch.Tensor)
        out["pixel_values"] = torch.cat(pieces) if tensor else np.concatenate(pieces)
        out["image_grid_thw"] = grid[index] if isinstance(grid, torch.Tensor) else np.asarray(grid)[index.numpy()]
        return out


@contextlib.contextmanager
def distinct_image_processing(processor, rows: list[dict]):
    """Within the block, rows with the same `image_id` share one image object and `processor` processes it once."""
    first: dict = {}
    for row in rows:
        if row.get("image") is not None and "image_id" in row:
            row["image"] = first.setdefault(row["image_id"], row["image"])
    inner = getattr(processor, "image_processor", None)
    if inner is None or isinstance(inner, DistinctImages):
        yield
        return
    processor.image_processor = DistinctImages(inner)
    try:
        yield
    finally:
        processor.image_processor = inner

"""Stage 2: GRPO on TRL with unified rewards and the segmentation loss.

A thin subclass of `trl.GRPOTrainer`. What it changes:
- Every policy computation is a call of the wrapped model (ZeRO-3 gathers, DDP sees one graph per step).
- SAM2 image features are computed once per distinct image of a generation batch (every GRPO group
  shares its image) and reused by the scoring forward and the loss forward (the image encoder is frozen).
- Scoring: before the rewards, one no-grad query forward per chunk gives each rollout's mask IoU, which
  the segment-level reward (`mask_iou`) reads as a column.
- Loss: the policy log-probs (a chunked LM head, no (B, L, V) logits), the query states and the masks come
  from ONE pass over prompt + completion + appended queries; BCE + dice is added to TRL's policy loss.
- The reference model is the policy family's stock model (Qwen2.5-VL, Qwen2-VL or Qwen3-VL) with the policy's
  initial weights (M-RoPE positions, as upstream), built by us so that TRL does not have to resolve our model class.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging
from trl import GRPOTrainer
from trl.data_utils import apply_chat_template
from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model, pad

from lens.distinct import distinct_index
from lens.losses import mask_iou_from_logits, segmentation_loss
from lens.modeling.families import family_of
from lens.modeling.loading import LEGACY_KEY_MAPPING
from lens.modeling.sam import SamFeatures
from lens.training.data import unique_images
from lens.training.sam_cache import make_sam_cache
from lens.training.shared_grpo import SharedPrefixMixin, distinct_image_processing
from lens.training.trainable import CountedFlopsMixin, GroupLRMixin, prepare_model_for_training
from lens.training.vllm import VLLMViewMixin

MASK_REWARDS = ("mask_iou", "mask_iou_linear")


def lens_module(model):
    """The LensForConditionalGeneration inside accelerate/DeepSpeed/PEFT wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def qwen_config(config):
    """The stock config of the policy's family (Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig) from a LENS config."""
    return family_of(config).stock_config(
        text_config=config.text_config.to_dict(), vision_config=config.vision_config.to_dict(),
        image_token_id=config.image_token_id, video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def build_reference_model(policy, init_path: str | Path | None = None):
    """Frozen stock model of the policy's family holding the policy's initial language and vision weights.

    From `init_path` when it is a checkpoint folder (works under ZeRO-3), else copied from `policy`. It uses the
    policy's attention implementation (flash-attn or SDPA).
    """
    attn = {"attn_implementation": policy.config._attn_implementation} if policy.config._attn_implementation else {}
    stock = family_of(policy.config).stock_model
    if init_path is not None and Path(init_path).is_dir():
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the LENS-only keys are expected to be left out
        try:
            ref = stock.from_pretrained(
                init_path, config=qwen_config(policy.config), key_mapping=LEGACY_KEY_MAPPING, dtype=policy.dtype, **attn
            )
        finally:
            hf_logging.set_verbosity(verbosity)
    else:
        config = qwen_config(policy.config)
        config._attn_implementation = policy.config._attn_implementation
        ref = stock(config).to(policy.dtype)
        own = {k: v for k, v in policy.state_dict().items() if k.startswith(("model.", "lm_head."))}
        ref.load_state_dict(copy.deepcopy(own), strict=True)
    ref.generation_config = copy.deepcopy(policy.generation_config)
    return ref.eval().requires_grad_(False)


class LensGRPOTrainer(SharedPrefixMixin, VLLMViewMixin, GroupLRMixin, CountedFlopsMixin, GRPOTrainer):
    """GRPO for LENS. Dataset rows: `prompt`, `image`, `box_llm`, `mask`, `sam_image`, `image_id`.

    Every LENS computation of the policy is a call of the (DDP/DeepSpeed-wrapped) model: SAM2 encoding, the
    scoring forward and the loss forward (see `LensForConditionalGeneration.forward`).

    SAM2 features of a generation batch live in a bank (one per mode, so that an evaluation during training does
    not replace the features of the buffered training batch); every row carries its bank id and its image's
    index in the bank.

    The original's data flow (SAM2 once per rollout, a per-sample decoder loop, separate forwards for the log-probs
    and the masks) is a subclass in the benchmark (`tools/benchmark/reference_flow.py`); it overrides the three
    seams `_generation_sam_images`, `_scoring_forward` and `_policy_chunk_forward`.
    """

    def __init__(
        self,
        *args,
        seg_weight: float = 1.0,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        reference_init: str | Path | None = None,
        lr_multipliers: dict[str, float] | None = None,
        shared_prefix: bool = False,
        single_pass_rewards: bool = False,
        cache_sam_features: bool = False,
        **kwargs,
    ) -> None:
        config = kwargs["args"]
        per_rank = config.per_device_train_batch_size * config.steps_per_generation
        if per_rank % config.num_generations:
            raise ValueError(
                f"per_device_train_batch_size x steps_per_generation = {per_rank} must be a multiple of "
                f"num_generations = {config.num_generations}, so that every GRPO group stays on one rank"
            )
        beta, config.beta = config.beta, 0.0  # TRL would rebuild the reference from a hub id; we build it below
        try:
            super().__init__(*args, **kwargs)
        finally:
            config.beta = beta
        self.beta = beta
        self.seg_weight, self.bce_weight, self.dice_weight = seg_weight, bce_weight, dice_weight
        self.lr_multipliers = dict(lr_multipliers or {})
        self.needs_mask_iou = any(name in MASK_REWARDS for name in self.reward_func_names)
        self.shared_prefix, self.single_pass_rewards = shared_prefix, single_pass_rewards  # lens/training/shared_grpo.py
        self.single_pass_rewards = single_pass_rewards and self._check_single_pass()
        self.sam_cache = make_sam_cache(cache_sam_features)  # each image encoded once over the run (LRU)
        self._banks: dict[str, tuple[int, SamFeatures]] = {}  # mode -> (bank id, features of its images)
        self._next_bank = 0
        self._gen_rows: torch.Tensor | None = None  # row -> image of the generation batch being scored
        self._seg_inputs: dict | None = None
        self._mask_logits: torch.Tensor | None = None
        self._pass_mask_iou: torch.Tensor | None = None  # (B,) the loss pass's mask IoU, when the single pass scored it
        if beta != 0.0 and self.ref_model is None and not hasattr(self.model, "peft_config"):
            self.ref_model = self._prepare_reference(build_reference_model(lens_module(self.model), reference_init))
        prepare_model_for_training(self)  # after the reference copied the policy's 16-bit weights

    def _prepare_reference(self, ref):
        if self.args.disable_dropout:
            disable_dropout_in_model(ref)
        add_fused_lm_head(ref, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        if self.is_deepspeed_enabled:
            from trl.models.utils import prepare_deepspeed

            return prepare_deepspeed(ref, self.accelerator)
        return self.accelerator.prepare_model(ref, evaluation_mode=True)

    @property
    def _policy_call(self):
        """The policy as training calls it: the DDP/DeepSpeed wrapper once training has started."""
        wrapped = getattr(self, "model_wrapped", None)
        return wrapped if wrapped is not None else self.model

    # ------------------------------------------------------------------ generation + scoring
    def _generation_sam_images(self, inputs) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
        """SAM2 inputs of a generation batch, once per distinct image (N, 3, S, S), each row's image (B,) and the
        N image keys (None: do not cache these features)."""
        return unique_images(inputs)

    def _generation_features(self, inputs) -> tuple[SamFeatures, torch.Tensor]:
        """SAM2 features of a generation batch's distinct images (from the cache where there, see
        `cache_sam_features`) and each row's image (B,)."""
        sam_images, index, keys = self._generation_sam_images(inputs)
        device = self.accelerator.device
        with torch.no_grad(), self.accelerator.autocast():
            if self.sam_cache is not None and keys is not None:
                encode = lambda x: self._policy_call(sam_images=x.to(device))  # noqa: E731
                return self.sam_cache.features(encode, sam_images, keys, device), index
            return self._policy_call(sam_images=sam_images.to(device)), index

    def _generate_and_score_completions(self, inputs):
        policy = lens_module(self.model)
        if any(p.requires_grad for p in policy.sam.image_encoder.parameters()):
            raise ValueError("stage 2 caches SAM2 image features: keep trainable.sam_image_encoder false")
        features, index = self._generation_features(inputs)
        mode = "train" if self.model.training else "eval"
        bank = self._next_bank
        self._next_bank += 1
        self._banks[mode] = (bank, features)
        self._gen_rows = index.to(self.accelerator.device)
        images = distinct_image_processing(self.processing_class, inputs) if self.shared_prefix else nullcontext()
        try:
            with images:  # shared prefixes: each group's image preprocessed once
                output = super()._generate_and_score_completions(inputs)
        finally:
            rows, self._gen_rows = self._gen_rows, None
        output["sam_image_index"] = rows
        output["sam_bank"] = torch.full_like(rows, bank)
        g = self.num_generations if mode == "train" else self.num_generations_eval
        output["lens_group"] = torch.arange(len(rows), device=rows.device) // g  # rows of one GRPO group
        if self._single_pass_now:
            output["lens_rewards"] = self._lens_rewards
            self._mark_single_pass_metrics(len(rows))
        output["target_masks"] = [torch.from_numpy(row["mask"] == 1).to(self.accelerator.device) for row in inputs]
        return output

    def _bank_features(self, inputs) -> tuple[SamFeatures, torch.Tensor]:
        """The SAM2 features of a micro-batch's images and each row's index among them."""
        mode = "train" if self.model.training else "eval"
        bank, features = self._banks[mode]
        ids = inputs["sam_bank"]
        if not bool((ids == bank).all()):
            raise RuntimeError(f"rows of SAM feature banks {ids.unique().tolist()} but the {mode} bank is {bank}")
        rows = inputs["sam_image_index"]
        first, local = distinct_index(rows.tolist())
        return features.index(rows[first].to(features.image_embed.device)), local.to(rows.device)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        if self._single_pass_now:  # the mask rewards come from the loss pass (lens/training/shared_grpo.py)
            for row in inputs:
                row["mask_iou"] = float("nan")
            table = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            self._lens_rewards = self._single_pass_columns(table, len(inputs))
            return table
        if self.needs_mask_iou:
            ious = self._score_masks(inputs, prompts, completion_ids_list)
            for row, value in zip(inputs, ious.tolist()):
                row["mask_iou"] = value
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    @torch.no_grad()
    def _score_masks(self, inputs, prompts, completion_ids_list) -> torch.Tensor:
        """Mask IoU of every rollout from a no-grad query forward (chunks of the per-device batch size)."""
        device = self.accelerator.device
        tok = self.processing_class.tokenizer
        _, features = self._banks["train" if self.model.training else "eval"]
        step = self.args.per_device_train_batch_size
        ious = []
        for s in range(0, len(inputs), step):
            rows = inputs[s : s + step]
            texts = [
                apply_chat_template({"prompt": p}, self.processing_class, **self.chat_template_kwargs)["prompt"]
                for p in prompts[s : s + step]
            ]
            enc = self.processing_class(
                images=[[r["image"]] for r in rows], text=texts, padding=True, padding_side="left", return_tensors="pt"
            ).to(device)
            comp = [torch.tensor(c, dtype=torch.long) for c in completion_ids_list[s : s + step]]
            comp_ids = pad(comp, padding_value=tok.pad_token_id, padding_side="right").to(device)
            comp_mask = pad([torch.ones_like(c) for c in comp], padding_value=0, padding_side="right").to(device)
            ids = torch.cat([enc["input_ids"], comp_ids], 1)
            att = torch.cat([enc["attention_mask"], comp_mask], 1)
            index = self._gen_rows[s : s + step]
            with self.accelerator.autocast():
                out = self._scoring_forward(
                    input_ids=ids, attention_mask=att, pixel_values=enc["pixel_values"],
                    image_grid_thw=enc["image_grid_thw"], sam_features=features, sam_image_index=index,
                    return_logits=False, **self._prefix_kwargs(ids, att, enc["input_ids"].shape[1], index),
                )
            targets = [torch.from_numpy(r["mask"] == 1).to(device) for r in rows]
            ious.append(mask_iou_from_logits(out.mask_logits, targets))
        return torch.cat(ious)

    def _scoring_forward(self, **kwargs):
        """The no-grad query forward of `_score_masks` (masks only; the vision tower encodes each image once)."""
        return self._policy_call(**kwargs)

    # ------------------------------------------------------------------ log-probs, masks, loss
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, pixel_values=None,
                                           image_grid_thw=None, **kwargs):
        """Policy: the query forward of `model` (the same positions in every pass), in chunks of `batch_size`
        rows; the loss pass (inside `_compute_loss`) also decodes the masks. Reference: TRL's stock forward."""
        if model is self.ref_model and self.shared_prefix and self._gen_rows is not None:
            logps = self._shared_reference_logps(model, input_ids, attention_mask, logits_to_keep, batch_size,
                                                 pixel_values, image_grid_thw, kwargs.get("mm_token_type_ids"))
            return logps, None, None
        if model is self.ref_model:  # stock Qwen2.5-VL with M-RoPE, as upstream's reference
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                pixel_values=pixel_values, image_grid_thw=image_grid_thw, **kwargs,
            )
        loss_pass = self._seg_inputs is not None
        rows_image = self._seg_inputs["sam_image_index"] if loss_pass else self._gen_rows
        features = None
        if loss_pass:
            features, rows_image = self._bank_features(self._seg_inputs)
        batch_size = batch_size or input_ids.shape[0]
        patches = image_grid_thw.prod(-1) if image_grid_thw is not None else None  # (B,) one image per row
        logps, entropies, masks = [], [], []
        for s in range(0, input_ids.shape[0], batch_size):
            e = min(s + batch_size, input_ids.shape[0])
            chunk = {"input_ids": input_ids[s:e], "attention_mask": attention_mask[s:e]}
            if pixel_values is not None:
                start, stop = int(patches[:s].sum()), int(patches[:e].sum())
                chunk.update(pixel_values=pixel_values[start:stop], image_grid_thw=image_grid_thw[s:e])
            labels = chunk["input_ids"].masked_fill(chunk["attention_mask"] == 0, -100)
            labels[:, :-logits_to_keep] = -100
            index = None if rows_image is None else rows_image[s:e]
            chunk.update(self._prefix_kwargs(chunk["input_ids"], chunk["attention_mask"],
                                             input_ids.shape[1] - logits_to_keep, index))
            log_probs, entropy, mask_logits = self._policy_chunk_forward(model, chunk, labels, features, index)
            logps.append(log_probs[:, -logits_to_keep:])
            entropies.append(entropy[:, -logits_to_keep:])
            if mask_logits is not None:
                masks.append(mask_logits)
        if loss_pass:
            self._mask_logits = torch.cat(masks)
            if self._single_pass_now:
                self._seg_inputs["advantages"] = self._single_pass_advantages(self._seg_inputs, self._mask_logits)
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

    def _policy_chunk_forward(self, model, chunk: dict, labels, features: SamFeatures | None, index):
        """ONE query forward of `model` over a chunk: per-token log-probs and entropies (B, L - 1), and the mask
        logits (B, 1, h, w) when `features` are given (the loss pass), else None."""
        with self.accelerator.autocast():
            out = model(**chunk, labels=labels, temperature=self.temperature, append_queries=True,
                        sam_features=features, sam_image_index=index)
        return out.log_probs, out.entropy, out.mask_logits

    def _compute_loss(self, model, inputs):
        self._seg_inputs, self._pass_mask_iou = inputs, None
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._seg_inputs = None
        mask_logits, self._mask_logits = self._mask_logits, None
        seg, parts = segmentation_loss(mask_logits, inputs["target_masks"], self.bce_weight, self.dice_weight)
        mode = "train" if self.model.training else "eval"
        scale = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        metrics = self._metrics[mode]
        metrics["seg/loss"].append(self.accelerator.gather(seg.detach()).mean().item())
        for name, value in parts.items():
            metrics[f"seg/{name}"].append(self.accelerator.gather(value.detach()).mean().item())
        iou, self._pass_mask_iou = self._pass_mask_iou, None  # set by the single pass from these very logits
        if iou is None:
            iou = mask_iou_from_logits(mask_logits.detach(), inputs["target_masks"])
        metrics["seg/mask_iou"].append(self.accelerator.gather(iou).mean().item())
        return loss + self.seg_weight * seg / scale

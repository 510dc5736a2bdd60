"""Stage 2: GRPO on TRL with unified rewards and the segmentation loss.

A thin subclass of `trl.GRPOTrainer`. What it changes:
- SAM2 image features are computed once per distinct image of a generation batch (every GRPO group
  shares its image) and reused by the scoring forward and the loss forward (the image encoder is frozen).
- Scoring: before the rewards, one no-grad query forward per chunk gives each rollout's mask IoU, which
  the segment-level reward (`mask_iou`) reads as a column.
- Loss: the policy log-probs (TRL's fused LM head), the query states and the masks come from ONE pass
  over prompt + completion + appended queries; BCE + dice is added to TRL's policy loss.
- The reference model is a stock Qwen2.5-VL with the policy's initial weights (M-RoPE positions, as
  upstream), built by us so that TRL does not have to resolve our model class.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.utils import logging as hf_logging
from trl import GRPOTrainer
from trl.data_utils import apply_chat_template
from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model, pad

from lens.losses import mask_iou_from_logits, segmentation_loss
from lens.modeling.loading import LEGACY_KEY_MAPPING
from lens.modeling.sam import SamFeatures
from lens.training.data import unique_images
from lens.training.trainable import GroupLRMixin

MASK_REWARDS = ("mask_iou", "mask_iou_linear")


def lens_module(model):
    """The LensForConditionalGeneration inside accelerate/DeepSpeed/PEFT wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def qwen_config(config) -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        text_config=config.text_config.to_dict(), vision_config=config.vision_config.to_dict(),
        image_token_id=config.image_token_id, video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def build_reference_model(policy, init_path: str | Path | None = None) -> Qwen2_5_VLForConditionalGeneration:
    """Frozen stock Qwen2.5-VL holding the policy's initial language and vision weights.

    From `init_path` when it is a checkpoint folder (works under ZeRO-3), else copied from `policy`.
    """
    if init_path is not None and Path(init_path).is_dir():
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the LENS-only keys are expected to be left out
        try:
            ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                init_path, config=qwen_config(policy.config), key_mapping=LEGACY_KEY_MAPPING, dtype=policy.dtype
            )
        finally:
            hf_logging.set_verbosity(verbosity)
    else:
        ref = Qwen2_5_VLForConditionalGeneration(qwen_config(policy.config)).to(policy.dtype)
        own = {k: v for k, v in policy.state_dict().items() if k.startswith(("model.", "lm_head."))}
        ref.load_state_dict(copy.deepcopy(own), strict=True)
    ref.generation_config = copy.deepcopy(policy.generation_config)
    return ref.eval().requires_grad_(False)


FLOWS = ("fast", "reference")


class LensGRPOTrainer(GroupLRMixin, GRPOTrainer):
    """GRPO for LENS. Dataset rows: `prompt`, `image`, `box_llm`, `mask`, `sam_image`, `image_id`.

    `flow="reference"` reproduces the original's data flow for benchmarking (same numbers, more work): SAM2
    encodes the image once per rollout, the mask decoder runs in a per-sample loop, and the policy log-probs
    and the masks come from two separate forwards.
    """

    def __init__(
        self,
        *args,
        seg_weight: float = 1.0,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        reference_init: str | Path | None = None,
        flow: str = "fast",
        lr_multipliers: dict[str, float] | None = None,
        **kwargs,
    ) -> None:
        if flow not in FLOWS:
            raise ValueError(f"flow={flow!r}; expected one of {FLOWS}")
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
        self.flow = flow
        self.lr_multipliers = dict(lr_multipliers or {})
        self.needs_mask_iou = any(name in MASK_REWARDS for name in self.reward_func_names)
        self._sam: SamFeatures | None = None
        self._seg_inputs: dict | None = None
        self._mask_logits: torch.Tensor | None = None
        if beta != 0.0 and self.ref_model is None and not hasattr(self.model, "peft_config"):
            self.ref_model = self._prepare_reference(build_reference_model(lens_module(self.model), reference_init))

    def _prepare_reference(self, ref):
        if self.args.disable_dropout:
            disable_dropout_in_model(ref)
        add_fused_lm_head(ref, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        if self.is_deepspeed_enabled:
            from trl.models.utils import prepare_deepspeed

            return prepare_deepspeed(ref, self.accelerator)
        return self.accelerator.prepare_model(ref, evaluation_mode=True)

    # ------------------------------------------------------------------ generation + scoring
    def _generate_and_score_completions(self, inputs):
        sam_images, index, _ = unique_images(inputs)
        policy = lens_module(self.model)
        if any(p.requires_grad for p in policy.sam.image_encoder.parameters()):
            raise ValueError("stage 2 caches SAM2 image features: keep trainable.sam_image_encoder false")
        if self.flow == "reference":  # one encoding per rollout
            sam_images, index = sam_images[index], torch.arange(len(index))
        with torch.no_grad(), self.accelerator.autocast():
            self._sam = policy.encode_sam_images(sam_images.to(self.accelerator.device))
        self._row_image = index.to(self.accelerator.device)
        output = super()._generate_and_score_completions(inputs)
        output["sam_image_index"] = self._row_image
        output["target_masks"] = [torch.from_numpy(row["mask"] == 1).to(self.accelerator.device) for row in inputs]
        return output

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        if self.needs_mask_iou:
            ious = self._score_masks(inputs, prompts, completion_ids_list)
            for row, value in zip(inputs, ious.tolist()):
                row["mask_iou"] = value
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    @torch.no_grad()
    def _score_masks(self, inputs, prompts, completion_ids_list) -> torch.Tensor:
        """Mask IoU of every rollout from a no-grad query forward (chunks of the per-device batch size)."""
        policy, device = lens_module(self.model), self.accelerator.device
        tok = self.processing_class.tokenizer
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
            with self.accelerator.autocast():
                out = policy.forward_with_queries(
                    torch.cat([enc["input_ids"], comp_ids], 1), torch.cat([enc["attention_mask"], comp_mask], 1),
                    enc["pixel_values"], enc["image_grid_thw"], sam_features=self._sam,
                    sam_image_index=self._row_image[s : s + step], return_logits=False,
                    per_sample_decoding=self.flow == "reference", share_vision=self.flow == "fast",
                )
            targets = [torch.from_numpy(r["mask"] == 1).to(device) for r in rows]
            ious.append(mask_iou_from_logits(out.mask_logits, targets))
        return torch.cat(ious)

    # ------------------------------------------------------------------ loss
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, pixel_values=None,
                                           image_grid_thw=None, **kwargs):
        if model is self.ref_model:  # stock Qwen2.5-VL with M-RoPE, as upstream's reference
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                pixel_values=pixel_values, image_grid_thw=image_grid_thw, **kwargs,
            )
        policy = lens_module(model)
        rows_image = None if self._seg_inputs is None else self._seg_inputs["sam_image_index"]
        if self.flow == "reference" and rows_image is not None:  # masks from a forward of their own
            with self.accelerator.autocast():
                self._mask_logits = policy.forward_with_queries(
                    input_ids, attention_mask, pixel_values, image_grid_thw, sam_features=self._sam,
                    sam_image_index=rows_image, return_logits=False, per_sample_decoding=True, share_vision=False,
                ).mask_logits
        fast = self.flow == "fast"
        logps, entropy, query_states = self._query_logps(
            model, policy, input_ids, attention_mask, logits_to_keep, pixel_values, image_grid_thw,
            rows_image if fast else None,  # fast: the vision tower encodes each distinct image once
        )
        if fast and rows_image is not None:  # fast: the same pass gives the masks
            self._mask_logits, _, _ = policy.masks_from_queries(query_states, self._sam, rows_image)
        return logps, entropy if compute_entropy else None, None

    def _query_logps(self, model, policy, input_ids, attention_mask, logits_to_keep, pixel_values, image_grid_thw,
                     image_index):
        """One pass over tokens + appended queries through TRL's fused LM head (no (B, L, V) logits).

        Returns completion log-probs and entropies (B, logits_to_keep) and the query states (B, Q, H), captured
        by a hook on the final norm (the pass runs inside the DDP/DeepSpeed-wrapped `model`)."""
        q = policy.config.num_of_query
        embeds, full_mask, positions = policy.query_inputs(
            input_ids, attention_mask, pixel_values, image_grid_thw, image_index
        )
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-logits_to_keep] = -100
        labels = torch.cat([labels, labels.new_full((labels.shape[0], q), -100)], dim=1)  # queries score nothing
        captured = {}
        hook = policy.model.language_model.norm.register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
        try:
            with self.accelerator.autocast():
                out = model(inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions,
                            labels=labels, fused_lm_head=True)
        finally:
            hook.remove()
        window = slice(-(logits_to_keep + q), -q)  # log_probs[:, j] scores token j + 1
        return out.log_probs[:, window], out.entropy[:, window], captured["h"][:, -q:]

    def _compute_loss(self, model, inputs):
        self._seg_inputs = inputs
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
        iou = mask_iou_from_logits(mask_logits.detach(), inputs["target_masks"])
        metrics["seg/mask_iou"].append(self.accelerator.gather(iou).mean().item())
        return loss + self.seg_weight * seg / scale

"""Teacher-forced training: stage 1 alignment (segmentation loss through the queries) and the tiny
preset's warm-up (next-token loss on the answer, optionally plus the segmentation loss)."""

from __future__ import annotations

import torch
from transformers import Trainer

from lens.losses import segmentation_loss
from lens.modeling.sam import SamFeatures
from lens.training.sam_cache import make_sam_cache
from lens.training.trainable import CountedFlopsMixin, GroupLRMixin, prepare_model_for_training

OBJECTIVE_PARTS = ("lm", "seg")  # next-token loss on the answer, BCE + dice of the query-forward masks


class SupervisedLensTrainer(GroupLRMixin, CountedFlopsMixin, Trainer):
    """`Trainer` whose loss is a sum of parts named in `objective` ("seg", "lm" or "lm+seg"): `seg` = BCE + dice
    of the masks of the query forward (stage 1), `lm` = next-token loss on the answer (the tiny warm-up).
    Frozen SAM2 image features can be cached across steps."""

    def __init__(
        self,
        *args,
        objective: str = "seg",
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        lm_weight: float = 1.0,
        seg_weight: float = 1.0,
        cache_sam_features: bool = False,
        lr_multipliers: dict[str, float] | None = None,
        **kwargs,
    ) -> None:
        parts = objective.split("+")
        if not parts or any(p not in OBJECTIVE_PARTS for p in parts):
            raise ValueError(f"objective={objective!r}; expected parts of {OBJECTIVE_PARTS} joined by '+'")
        super().__init__(*args, **kwargs)
        prepare_model_for_training(self)
        self.objective = parts
        self.lr_multipliers = dict(lr_multipliers or {})
        self.weights = {"bce": bce_weight, "dice": dice_weight, "lm": lm_weight, "seg": seg_weight}
        self.sam_cache = make_sam_cache(cache_sam_features)
        self._parts: dict[str, list[float]] = {}

    def sam_features(self, model, inputs) -> SamFeatures:
        """SAM2 features of the batch's distinct images, encoded by a call of the (wrapped) `model`, or cached
        across steps while the image encoder is frozen."""
        lens = self.accelerator.unwrap_model(model)
        encoder_frozen = not any(p.requires_grad for p in lens.sam.image_encoder.parameters())
        if self.sam_cache is not None and encoder_frozen:
            device = inputs["input_ids"].device
            return self.sam_cache.features(lambda x: model(sam_images=x.to(device)), inputs["sam_images"],
                                           inputs["image_keys"], device)
        return model(sam_images=inputs["sam_images"])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Sum of the objective's parts. With "seg", one query forward of the wrapped model gives the masks and
        (for "lm") the answer tokens' log-probs: the queries sit after the text, so these are the stock
        forward's."""
        lm_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
        total = 0.0
        if "seg" in self.objective:
            out = model(
                **lm_inputs, sam_features=self.sam_features(model, inputs), sam_image_index=inputs["sam_image_index"],
                labels=inputs["labels"] if "lm" in self.objective else None, return_logits=False,
            )
            targets = [t.to(out.mask_logits.device) for t in inputs["target_masks"]]
            seg, parts = segmentation_loss(out.mask_logits, targets, self.weights["bce"], self.weights["dice"])
            total = total + self.weights["seg"] * seg
            self._record("seg", seg)
            for k, v in parts.items():
                self._record(k, v)
            if "lm" in self.objective:
                total = total + self.weights["lm"] * out.loss
                self._record("lm", out.loss)
        elif "lm" in self.objective:
            out = model(**lm_inputs, mm_token_type_ids=inputs.get("mm_token_type_ids"), labels=inputs["labels"])
            total = total + self.weights["lm"] * out.loss
            self._record("lm", out.loss)
        return (total, None) if return_outputs else total

    def _record(self, name: str, value: torch.Tensor) -> None:
        self._parts.setdefault(name, []).append(float(value.detach()))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        for name, values in self._parts.items():
            if values and "loss" in logs:
                logs[f"loss/{name}"] = sum(values) / len(values)
        if "loss" in logs:
            self._parts = {}
        super().log(logs, *args, **kwargs)

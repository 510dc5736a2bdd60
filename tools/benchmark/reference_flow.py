"""The original's data flow as a `LensGRPOTrainer` subclass (benchmarking and the equivalence tests only).

Same numbers as the product trainer, more work:
- SAM2 encodes the image once per rollout instead of once per distinct image of the generation batch;
- the mask decoder runs in a per-sample Python loop, and the vision tower encodes each row's image again;
- in the loss pass the masks come from a query forward of their own, then a second forward gives the log-probs.

Every computation is still a call of the wrapped model (`model(...)`), as in the product trainer; the subclass only
overrides the product's three seams. One process only.
"""

from __future__ import annotations

import torch

from lens.training.grpo import LensGRPOTrainer


class ReferenceFlowTrainer(LensGRPOTrainer):
    """`LensGRPOTrainer` with the original's data flow (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _one_process(self)

    @classmethod
    def adopt(cls, trainer: LensGRPOTrainer) -> ReferenceFlowTrainer:
        """Turn a built `LensGRPOTrainer` (e.g. from `lens.training.recipe.build_trainer`) into this flow in place.

        The subclass adds no state, so changing the instance's class is all it takes."""
        if not isinstance(trainer, LensGRPOTrainer):
            raise TypeError(f"expected a LensGRPOTrainer, got {type(trainer).__name__}")
        _one_process(trainer)
        trainer.__class__ = cls
        return trainer

    def _generation_sam_images(self, inputs) -> tuple[torch.Tensor, torch.Tensor, None]:
        sam_images, index, _ = super()._generation_sam_images(inputs)
        return sam_images[index], torch.arange(len(index)), None  # one encoding per rollout, never cached

    def _scoring_forward(self, **kwargs):
        return self._policy_call(**kwargs, per_sample_decoding=True, share_vision=False)

    def _mask_forward(self, model, chunk: dict, features, index) -> torch.Tensor:
        """The extra query forward that gives the masks (its own pass over the prompt + completion)."""
        with self.accelerator.autocast():
            return model(**chunk, sam_features=features, sam_image_index=index, return_logits=False,
                         per_sample_decoding=True, share_vision=False).mask_logits

    def _policy_chunk_forward(self, model, chunk: dict, labels, features, index):
        masks = None if features is None else self._mask_forward(model, chunk, features, index)
        with self.accelerator.autocast():
            out = model(**chunk, labels=labels, temperature=self.temperature, append_queries=True,
                        sam_features=None, sam_image_index=index, share_vision=False)
        return out.log_probs, out.entropy, masks


def _one_process(trainer) -> None:
    trainer.shared_prefix = trainer.single_pass_rewards = False  # the original runs every row's prompt
    if trainer.args.world_size > 1:
        raise ValueError("the reference flow (the benchmark's original-like flow) runs in one process only")

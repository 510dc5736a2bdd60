"""Worker for tests/test_distributed.py: tiny stage-2 GRPO under torchrun (gloo, CPU), recording which
reference every rollout of every generation batch answered, per rank."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lens.training.grpo import LensGRPOTrainer
from lens.training.recipe import build_trainer, close_distributed, load_recipe


def main() -> None:
    recipe_path, out, *overrides = sys.argv[1:]
    seen: list[list[str]] = []
    original = LensGRPOTrainer._generate_and_score_completions

    def recording(self, inputs):
        seen.append([row["ref_id"] for row in inputs])
        return original(self, inputs)

    LensGRPOTrainer._generate_and_score_completions = recording
    trainer = build_trainer(load_recipe(recipe_path, overrides))
    trainer.train()
    rank = trainer.accelerator.process_index
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "world": trainer.accelerator.num_processes, "batches": seen,
        "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }))
    close_distributed()


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Two override sets of one training recipe, side by side: R interleaved rounds of N steps each, seconds per step
after the first K steps of every run (build and warm-up excluded), and the ratio. For the tiny quickstart recipes,
whose run-to-run speed on a shared 2-core host drifts by 10-15%, so that only interleaved figures compare.

    python tools/benchmark/recipe_ab.py configs/recipes/tiny/stage2.yaml \
        --a grpo.max_completion_length=40 cache_sam_features=false --b "" --steps 40 --skip 5 --rounds 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def seconds_per_step(recipe_path: str, overrides: list[str], steps: int, skip: int, out: Path) -> float:
    """Train `skip + steps` steps of the recipe with `overrides`; wall seconds per step of the last `steps`."""
    from transformers import TrainerCallback

    from lens.training.recipe import build_trainer, load_recipe

    recipe = load_recipe(recipe_path, [*overrides, f"train.output_dir={out}", f"train.max_steps={skip + steps}",
                                       "train.save_steps=100000", "train.report_to=none", "train.disable_tqdm=true"])
    trainer = build_trainer(recipe)
    marks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == skip:
                marks["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == skip + steps:
                marks["end"] = time.perf_counter()

    trainer.add_callback(Clock())
    trainer.train()
    return (marks["end"] - marks["start"]) / steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--a", nargs="*", default=[], help="overrides of variant A (section.key=value ...)")
    ap.add_argument("--b", nargs="*", default=[], help="overrides of variant B")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=5, help="steps of each run left out of its timing")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    variants = {"A": [o for o in args.a if o], "B": [o for o in args.b if o]}
    times: dict[str, list[float]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, overrides in variants.items():
                spt = seconds_per_step(args.recipe, overrides, args.steps, args.skip, Path(tmp) / f"{name}{r}")
                times[name].append(spt)
                print(f"[recipe_ab] round {r + 1} {name} {' '.join(overrides) or '(recipe as is)'}: {spt:.4f} s/step",
                      flush=True)
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    print(f"[recipe_ab] A {mean['A']:.4f} s/step, B {mean['B']:.4f} s/step, A/B = {mean['A'] / mean['B']:.3f} "
          f"({args.rounds} interleaved rounds of {args.steps} steps after {args.skip})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

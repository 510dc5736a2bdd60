"""python -m lens.training --recipe configs/recipes/stage1.yaml [--resume] [section.key=value ...]"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from lens.training.recipe import load_recipe, run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lens.training", description=__doc__)
    ap.add_argument("--recipe", required=True, help="YAML recipe under configs/recipes/")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint-* in train.output_dir")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.learning_rate=1e-5 model.init=path")
    args = ap.parse_args(argv)
    # torch.distributed's deprecation notices fire on every DeepSpeed collective
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    final = run(load_recipe(args.recipe, args.overrides), resume=args.resume)
    print(f"final checkpoint: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

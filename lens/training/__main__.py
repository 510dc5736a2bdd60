"""python -m lens.training --recipe configs/recipes/stage1.yaml [--resume] [section.key=value ...]"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from lens.config import ConfigError
from lens.training.config import load_config


def main(argv: list[str] | None = None) -> int:
    """A recipe mistake (missing file, unknown key, wrong value) ends with one `error: ...` line and exit status 2,
    before anything heavy is imported; `LENS_DEBUG=1` shows the traceback instead."""
    ap = argparse.ArgumentParser(prog="python -m lens.training", description=__doc__)
    ap.add_argument("--recipe", required=True, help="YAML recipe under configs/recipes/")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint-* in train.output_dir")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.learning_rate=1e-5 model.init=path")
    args = ap.parse_args(argv)
    try:
        recipe = load_config(args.recipe, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        if os.environ.get("LENS_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # torch.distributed's deprecation notices fire on every DeepSpeed collective
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from lens.training.recipe import close_distributed, run

    final = run(recipe, resume=args.resume)
    print(f"final checkpoint: {final}")
    close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())

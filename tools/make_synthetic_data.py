#!/usr/bin/env python
"""Generate the synthetic LENS benchmark in every supported format (see lens/data/synthetic/).

Example: python tools/make_synthetic_data.py --out data/synthetic --seed 0
Bad arguments (a count below 1, a tiny image size, an output path that is a file or cannot be written) end
with one `error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    from lens.data.synthetic import generate_synthetic
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lens.data.synthetic import generate_synthetic

MIN_IMAGE_SIZE = 32


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (upstream datasets/ layout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=64, help="training images")
    parser.add_argument("--n-val", type=int, default=16, help="validation images")
    parser.add_argument("--n-test", type=int, default=16, help="test images")
    parser.add_argument("--image-size", type=int, default=224, help="image height (width: same or 1.25x)")
    args = parser.parse_args(argv)
    for flag in ("n_train", "n_val", "n_test"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: every split needs at least 1 image")
    if args.image_size < MIN_IMAGE_SIZE:
        parser.error(f"--image-size {args.image_size}: at least {MIN_IMAGE_SIZE} pixels (the scenes' objects must fit)")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out}: exists and is not a folder")
    start = time.perf_counter()
    try:
        counts = generate_synthetic(args.out, args.seed, args.n_train, args.n_val, args.n_test, args.image_size)
    except OSError as exc:  # read-only or full disk, a file where a folder must go
        print(f"{parser.prog}: error: --out {args.out}: cannot write there: {exc.strerror or exc} "
              f"({exc.filename or args.out})", file=sys.stderr)
        return 2
    print(f"wrote synthetic data to {args.out} in {time.perf_counter() - start:.1f}s (seed {args.seed})")
    print(f"  images: {counts.pop('images')} ({args.n_train} train / {args.n_val} val / {args.n_test} test)")
    for fmt, n in sorted(counts.items()):
        print(f"  {fmt:>15}: {n} references")
    print("  side files: swap.json, synthetic_meta.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

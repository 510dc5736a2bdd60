#!/usr/bin/env bash
# What the tiny CPU recipes stand on: synthetic data and, for stage 1/2, the earlier stages' checkpoints.
# Usage: bash scripts/tiny_prereqs.sh warmup|stage1|stage2   (creates only what is missing)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="python"; [ -x .venv/bin/python ] && PY=".venv/bin/python"
OUT=outputs/quickstart
if [ ! -f "$OUT/data/synthetic_meta.json" ]; then
  # the same data as tools/quickstart.py writes
  $PY tools/make_synthetic_data.py --out "$OUT/data" --seed 0 --n-train 2000 --n-val 32 --n-test 32
fi
case "$1" in
  stage1) [ -f "$OUT/warmup/final/config.json" ] || $PY -m lens.training --recipe configs/recipes/tiny/warmup.yaml ;;
  stage2) bash "$0" stage1
          [ -f "$OUT/stage1/final/config.json" ] || $PY -m lens.training --recipe configs/recipes/tiny/stage1.yaml ;;
esac

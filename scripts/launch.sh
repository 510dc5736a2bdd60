#!/usr/bin/env bash
# Shared launcher: bash scripts/launch.sh STAGE [RECIPE.yaml] [--resume] [section.key=value ...]
# GPU nodes: torchrun (or accelerate with LAUNCHER=accelerate) over NNODES x GPUS_PER_NODE processes,
#   rendezvous from NODE_RANK, MASTER_ADDR, MASTER_PORT (set them on every node; same command everywhere).
#   DeepSpeed ZeRO-3 comes from the recipe's train.deepspeed (configs/deepspeed/zero3.json).
# No GPU:
#   - no recipe and no GPUS_PER_NODE: the tiny recipe of STAGE in one CPU process (preparing synthetic data and
#     the earlier tiny stages if missing);
#   - GPUS_PER_NODE=N: N CPU processes over gloo (DeepSpeed's CPU accelerator for train.deepspeed) with RECIPE
#     (default: the tiny one);
#   - a GPU recipe (train.use_cpu not true) stops with a message, unless LENS_ALLOW_CPU=1.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STAGE="${1:?usage: launch.sh stage1|stage2 [recipe.yaml] [--resume] [key=value ...]}"; shift
case "$STAGE" in warmup|stage1|stage2) ;; *) echo "[launch] unknown stage '$STAGE': expected warmup, stage1 or stage2" >&2; exit 2 ;; esac
PY="python"; [ -x .venv/bin/python ] && PY=".venv/bin/python"
RECIPE=""
if [ $# -gt 0 ] && [[ "$1" == *.yaml ]]; then RECIPE="$1"; shift; fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
OVERRIDES=(); for a in "$@"; do [[ "$a" == --* ]] || OVERRIDES+=("$a"); done

# One Python process, before any rank starts: the GPU count, then the recipe checked (default: the tiny recipe of
# STAGE without a GPU, configs/recipes/STAGE.yaml with one). It prints "<gpus> <use_cpu> <prereqs> <recipe>", where
# prereqs names the missing files the recipe stands on: the quickstart's tiny outputs (outputs/quickstart/...), the
# evaluation smoke data (data/synthetic, the backbone twins' data) or none. A bad recipe or override (unknown key,
# missing file) prints one line and stops with exit status 2.
INFO="$($PY - "$STAGE" "$RECIPE" "${OVERRIDES[@]}" <<'PYEOF'
import sys
from pathlib import Path

import torch

from lens.config import ConfigError
from lens.training.config import load_recipe

stage, recipe = sys.argv[1], sys.argv[2]
gpus = torch.cuda.device_count()
recipe = recipe or (f"configs/recipes/{stage}.yaml" if gpus else f"configs/recipes/tiny/{stage}.yaml")
try:
    r = load_recipe(recipe, sys.argv[3:])
except (ConfigError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
paths = [str(r["data"].get("root", "")), str(r["model"]["init"])]
need = [k for k in ("outputs/quickstart", "data/synthetic") if any(p.startswith(k) and not Path(p).exists() for p in paths)]
print(gpus, str(bool(r["train"].get("use_cpu"))).lower(), need[0].split("/")[1] if need else "none", recipe)
PYEOF
)" || exit 2
read -r GPUS_DETECTED ON_CPU PREREQS RECIPE <<< "$INFO"  # the recipe last: its path may hold spaces

if [ "$GPUS_DETECTED" -eq 0 ]; then
  if [ "$ON_CPU" != "true" ] && [ "${LENS_ALLOW_CPU:-0}" != "1" ]; then
    echo "[launch] no GPU found and $RECIPE is a GPU recipe (train.use_cpu is not true): stopping." >&2
    echo "[launch] Use a CPU recipe (configs/recipes/tiny/), or run it on the CPU anyway with LENS_ALLOW_CPU=1 and train.use_cpu=true." >&2
    exit 2
  fi
  [ "$PREREQS" = "quickstart" ] && bash scripts/tiny_prereqs.sh "$STAGE"
  [ "$PREREQS" = "synthetic" ] && $PY tools/make_synthetic_data.py --out data/synthetic --seed 0  # as eval.sh makes it
  NPROC="${GPUS_PER_NODE:-1}"
  echo "[launch] no GPU found: $RECIPE on $NNODES node(s) x $NPROC CPU process(es)"
  if [ "$NPROC" -eq 1 ] && [ "$NNODES" -eq 1 ]; then
    exec $PY -m lens.training --recipe "$RECIPE" "$@"
  fi
  exec $PY -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m lens.training --recipe "$RECIPE" "$@"
fi

GPUS_PER_NODE="${GPUS_PER_NODE:-$GPUS_DETECTED}"
echo "[launch] $RECIPE on $NNODES node(s) x $GPUS_PER_NODE GPU(s), node rank $NODE_RANK, master $MASTER_ADDR:$MASTER_PORT"
if [ "${LAUNCHER:-torchrun}" = "accelerate" ]; then
  exec $PY -m accelerate.commands.launch --num_machines "$NNODES" --num_processes "$((NNODES * GPUS_PER_NODE))" \
    --machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
    --config_file configs/accelerate/multi_gpu.yaml -m lens.training --recipe "$RECIPE" "$@"
fi
exec $PY -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m lens.training --recipe "$RECIPE" "$@"

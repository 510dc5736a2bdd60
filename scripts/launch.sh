#!/usr/bin/env bash
# Shared launcher: bash scripts/launch.sh STAGE [RECIPE.yaml] [--resume] [section.key=value ...]
# GPU nodes: torchrun (or accelerate with LAUNCHER=accelerate) over NNODES x GPUS_PER_NODE processes,
#   rendezvous from NODE_RANK, MASTER_ADDR, MASTER_PORT (set them on every node; same command everywhere).
#   DeepSpeed ZeRO-3 comes from the recipe's train.deepspeed (configs/deepspeed/zero3.json).
# No GPU: runs the tiny recipe of STAGE on the CPU (preparing synthetic data and the warm-up if missing).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STAGE="${1:?usage: launch.sh stage1|stage2 [recipe.yaml] [--resume] [key=value ...]}"; shift
PY="python"; [ -x .venv/bin/python ] && PY=".venv/bin/python"
GPUS_DETECTED="$($PY -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"

RECIPE=""
if [ $# -gt 0 ] && [[ "$1" == *.yaml ]]; then RECIPE="$1"; shift; fi

if [ "$GPUS_DETECTED" -eq 0 ]; then
  RECIPE="${RECIPE:-configs/recipes/tiny/$STAGE.yaml}"
  echo "[launch] no GPU found: running $RECIPE on the CPU"
  bash scripts/tiny_prereqs.sh "$STAGE"
  exec $PY -m lens.training --recipe "$RECIPE" "$@"
fi

RECIPE="${RECIPE:-configs/recipes/$STAGE.yaml}"
NNODES="${NNODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-$GPUS_DETECTED}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
echo "[launch] $RECIPE on $NNODES node(s) x $GPUS_PER_NODE GPU(s), node rank $NODE_RANK, master $MASTER_ADDR:$MASTER_PORT"
if [ "${LAUNCHER:-torchrun}" = "accelerate" ]; then
  exec $PY -m accelerate.commands.launch --num_machines "$NNODES" --num_processes "$((NNODES * GPUS_PER_NODE))" \
    --machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
    --config_file configs/accelerate/multi_gpu.yaml -m lens.training --recipe "$RECIPE" "$@"
fi
exec $PY -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m lens.training --recipe "$RECIPE" "$@"

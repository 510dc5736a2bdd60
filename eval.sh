#!/usr/bin/env bash
# Evaluate a LENS model; all arguments go to `python -m lens.evaluation` (see --help, docs/evaluation.md).
#   bash eval.sh --config configs/eval/paper.yaml --model weights/LENS
# With CUDA GPUs it runs one process per GPU under torchrun (GPUS=N picks how many, default: all
# visible ones; GPUS=0 forces one CPU process); without GPUs it runs plain python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY=python
if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')"
GPUS="${GPUS:-$NGPU}"
if [ "$GPUS" -gt 0 ]; then
  exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" -m lens.evaluation "$@"
fi
exec "$PY" -m lens.evaluation "$@"

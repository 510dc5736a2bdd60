#!/usr/bin/env bash
# Evaluate a LENS model; all arguments go to `python -m lens.evaluation` (see --help, docs/evaluation.md).
#   bash eval.sh --config configs/eval/paper.yaml --model weights/LENS
#   bash eval.sh --predictions preds.jsonl --benchmarks refcoco_val   # score saved masks, no model
#   bash eval.sh          # no arguments: tiny preset on synthetic data (generated into data/synthetic if missing)
# With CUDA GPUs it runs one process per GPU under torchrun (GPUS=N picks how many, default: all
# visible ones; GPUS=0 forces one CPU process); without GPUs it runs plain python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY=python
if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ $# -eq 0 ]; then  # no arguments: the CPU smoke run, tiny preset on synthetic data in every format
  # (re)generate when missing or written before the synthetic gRefCOCO existed
  if [ ! -f "$ROOT/data/synthetic/synthetic_meta.json" ] || [ ! -f "$ROOT/data/synthetic/refer_seg/grefcoco/grefs(unc).json" ]; then
    "$PY" "$ROOT/tools/make_synthetic_data.py" --out "$ROOT/data/synthetic" --seed 0
  fi
  cd "$ROOT"
  set -- --config configs/eval/synthetic.yaml
fi
for arg in "$@"; do  # scoring a predictions file loads no model: one plain process
  case "$arg" in --predictions|--predictions=*) exec "$PY" -m lens.evaluation "$@" ;; esac
done
NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')"
GPUS="${GPUS:-$NGPU}"
if [ "$GPUS" -gt 0 ]; then
  exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" -m lens.evaluation "$@"
fi
exec "$PY" -m lens.evaluation "$@"

#!/usr/bin/env bash
# Evaluate a LENS model; all arguments go to `python -m lens.evaluation` (see --help, docs/evaluation.md).
#   bash eval.sh --config configs/eval/paper.yaml --model weights/LENS
#   bash eval.sh --predictions preds.jsonl --benchmarks refcoco_val   # score saved masks, no model
#   bash eval.sh          # no arguments: tiny preset on synthetic data (generated into data/synthetic if missing)
#   bash eval.sh --model tiny-qwen3-vl --config configs/eval/synthetic.yaml --limit 8   # any preset, same data
# With CUDA GPUs it runs one process per GPU under torchrun (GPUS=N picks how many, default: all
# visible ones; GPUS=0 forces one CPU process); without GPUs it runs plain python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY=python
if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ $# -eq 0 ]; then  # no arguments: the CPU smoke run, tiny preset on synthetic data in every format
  cd "$ROOT"
  set -- --config configs/eval/synthetic.yaml
fi
SYNTHETIC=0; OTHER_ROOT=0  # the synthetic smoke config (any --model) on its own data: make the data when missing
for arg in "$@"; do
  case "$arg" in *configs/eval/synthetic.yaml) SYNTHETIC=1 ;; --data-root|--data-root=*) OTHER_ROOT=1 ;; esac
done
if [ "$SYNTHETIC" -eq 1 ] && [ "$OTHER_ROOT" -eq 0 ]; then  # its data_root, data/synthetic, is relative to the working directory
  # (re)generate when missing or written before the synthetic gRefCOCO existed
  if [ ! -f data/synthetic/synthetic_meta.json ] || [ ! -f "data/synthetic/refer_seg/grefcoco/grefs(unc).json" ]; then
    "$PY" "$ROOT/tools/make_synthetic_data.py" --out data/synthetic --seed 0
  fi
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

#!/usr/bin/env bash
# GPU acceptance run for ONE H100/H200, in about 10 minutes: the real-size preset (qwen2.5-vl-3b, random weights,
# bf16, SAM2 hiera-L at 1024) on CUDA. Prints one JSON line with every figure at the end (exit 1 when not ok).
#
#   1. smoke      python tools/realsize_smoke.py --device cuda --attn <flash_attention_2 if flash_attn imports, else sdpa>
#   2. benchmark  python tools/benchmark.py --preset qwen2.5-vl-3b --device cuda --prompts 8 --generations 8
#                 (GRPO step fast vs reference flow, batched vs single evaluation; --steps/--eval-* trimmed to fit)
#   3. zero3      GPUS_PER_NODE=1 bash train_stage2.sh configs/recipes/stage2.yaml model.init=preset:qwen2.5-vl-3b
#                 with synthetic data and a couple of steps (ZeRO-3 from the recipe's train.deepspeed)
#
# How to run it (the GPU machine has no network; the wheels travel with the working tree, see
# ../shared/tools/gpu-wheels.sh):
#   here:      bash tools/gpu_acceptance.sh --prepare      # = bash ../shared/tools/gpu-wheels.sh -> ./.whl
#   on the GPU (device `run`, carry [".whl"]):  bash tools/gpu_acceptance.sh
#   anywhere:  bash tools/gpu_acceptance.sh --dry-run      # prints the commands and the (empty) summary; no GPU needed
#
# Environment: OUT (where logs and JSON files go; the device machine sets it), SMOKE_TIMEOUT, BENCH_TIMEOUT,
# ZERO3_TIMEOUT (seconds per step), BENCH_ARGS (extra benchmark options), ZERO3_STEPS, PYTHON.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --prepare) exec bash ../shared/tools/gpu-wheels.sh ;;
    -h|--help) sed -n '2,19p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "[accept] unknown option $arg (expected --dry-run, --prepare or --help)" >&2; exit 2 ;;
  esac
done

START=$(date +%s)
OUT="${OUT:-$(mktemp -d /tmp/lens-accept-XXXX)}"
mkdir -p "$OUT"
WORK="$(mktemp -d /tmp/lens-accept-work-XXXX)"
trap 'rm -rf "$WORK"' EXIT  # the benchmark's 3B checkpoint and the trainer outputs; logs and JSON stay in $OUT
STEPS="$OUT/steps.tsv"
: > "$STEPS"
SMOKE_TIMEOUT="${SMOKE_TIMEOUT:-150}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-270}"
ZERO3_TIMEOUT="${ZERO3_TIMEOUT:-180}"
ZERO3_STEPS="${ZERO3_STEPS:-2}"
BENCH_ARGS="${BENCH_ARGS:---steps 1 --eval-exprs 32 --eval-repeats 1}"

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# train_stage2.sh (scripts/launch.sh) calls `python` when there is no .venv
if ! command -v python >/dev/null 2>&1; then
  mkdir -p "$WORK/bin" && ln -sf "$(command -v python3)" "$WORK/bin/python" && export PATH="$WORK/bin:$PATH"
fi

# ------------------------------------------------------------------ wheels (as ../shared/tools/gpu-wheels.sh says)
install_wheels() {
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "[accept] no .whl/*.whl: run 'bash tools/gpu_acceptance.sh --prepare' where PyPI is reachable and carry .whl" >&2
    return 0
  fi
  local cmd=("$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl)
  if [ "$DRY" = 1 ]; then echo "[accept] would run: ${cmd[*]}"; return 0; fi
  "${cmd[@]}" && export PYTHONPATH="/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
}
install_wheels
export PYTHONPATH="${PYTHONPATH:-$ROOT}"
export TOKENIZERS_PARALLELISM=false

# ------------------------------------------------------------------ attention
if "$PY" -c "import flash_attn" >/dev/null 2>&1; then ATTN=flash_attention_2; else ATTN=sdpa; fi
GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)"
echo "[accept] python $PY, attention $ATTN, GPU ${GPU:-none}, out $OUT"

# step NAME TIMEOUT CMD...: run (or, with --dry-run, print) one step; appends "name<TAB>rc<TAB>seconds" to $STEPS
step() {
  local name="$1" limit="$2"; shift 2
  if [ "$DRY" = 1 ]; then
    echo "[accept] would run ($name, ${limit}s): $*"
    printf '%s\t%s\t%s\n' "$name" "dry-run" "0" >> "$STEPS"
    return 0
  fi
  echo "[accept] $name (limit ${limit}s): $*"
  local t0 rc
  t0=$(date +%s%N)
  timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/$name.log"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( ($(date +%s%N) - t0) / 1000000 ))" >> "$STEPS"
}

# ------------------------------------------------------------------ 1. real-size smoke on CUDA
step smoke "$SMOKE_TIMEOUT" "$PY" tools/realsize_smoke.py --device cuda --attn "$ATTN" --json "$OUT/smoke.json"

# ------------------------------------------------------------------ 2. benchmark: 8 prompts x G = 8
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
step benchmark "$BENCH_TIMEOUT" "$PY" tools/benchmark.py --preset qwen2.5-vl-3b --device cuda --prompts 8 --generations 8 \
  --attn "$ATTN" $BENCH_ARGS --workdir "$WORK/bench" --json "$OUT/benchmark.json"

# ------------------------------------------------------------------ 3. ZeRO-3 stage 2 on one GPU, synthetic data
if [ "$DRY" = 1 ]; then
  echo "[accept] would run: $PY tools/make_synthetic_data.py --out $WORK/data --n-train 8 --n-val 1 --n-test 1 --image-size 224"
else
  "$PY" tools/make_synthetic_data.py --out "$WORK/data" --n-train 8 --n-val 1 --n-test 1 --image-size 224 > "$OUT/data.log" 2>&1
fi
step zero3 "$ZERO3_TIMEOUT" env GPUS_PER_NODE=1 MASTER_PORT="${MASTER_PORT:-29533}" bash train_stage2.sh configs/recipes/stage2.yaml \
  model.init=preset:qwen2.5-vl-3b "data.root=$WORK/data" "data.train=[refcoco:train]" data.max_pixels=200704 \
  "train.output_dir=$WORK/zero3" "train.max_steps=$ZERO3_STEPS" train.per_device_train_batch_size=8 \
  train.gradient_accumulation_steps=1 grpo.num_generations=8 grpo.max_completion_length=32 train.report_to=none \
  'train.save_strategy="no"' train.dataloader_num_workers=0 train.logging_steps=1
[ -f "$WORK/zero3/final/trainer_state.json" ] && cp "$WORK/zero3/final/trainer_state.json" "$OUT/zero3_trainer_state.json"

# ------------------------------------------------------------------ summary: one JSON line
"$PY" - "$OUT" "$START" "$ATTN" "${GPU:-}" "$DRY" <<'PYEOF'
import json, math, sys, time
from pathlib import Path

out, start, attn, gpu, dry = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5] == "1"

def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None

steps = {}
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, secs = line.split("\t")
    try:
        secs = round(float(secs) / 1000, 1)  # milliseconds
    except ValueError:
        secs = None
    steps[name] = {"rc": int(rc) if rc.lstrip("-").isdigit() else rc, "seconds": secs}
    if steps[name]["rc"] in (124, 137):
        steps[name]["timed_out"] = True

smoke = load("smoke.json")
if "smoke" in steps:
    steps["smoke"]["ok"] = bool(smoke and smoke.get("ok")) and steps["smoke"]["rc"] == 0
    steps["smoke"]["result"] = smoke
bench = load("benchmark.json")
if "benchmark" in steps:
    steps["benchmark"]["ok"] = bench is not None and steps["benchmark"]["rc"] == 0
    steps["benchmark"]["result"] = bench
state = load("zero3_trainer_state.json")
if "zero3" in steps:
    hist = (state or {}).get("log_history", [])
    losses = [h["loss"] for h in hist if "loss" in h]
    steps["zero3"].update(losses=losses, step_times=[h["step_time"] for h in hist if "step_time" in h],
                          ok=steps["zero3"]["rc"] == 0 and bool(losses) and all(math.isfinite(float(x)) for x in losses))
summary = {
    "ok": (not dry) and bool(steps) and all(s.get("ok") for s in steps.values()),
    "dry_run": dry, "gpu": gpu or None, "attn": attn, "total_seconds": round(time.time() - start, 1),
    "steps": steps,
}
print(json.dumps(summary, separators=(",", ":")))
sys.exit(0 if summary["ok"] or dry else 1)
PYEOF

#!/usr/bin/env bash
# The LENS miniature on CPU (about 15 minutes on 2 cores): synthetic data, tiny warm-up, stage 1, stage 2 (GRPO),
# evaluation of every stage with the swap check, a demo overlay; results in outputs/quickstart/results.json.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
export TOKENIZERS_PARALLELISM=false
python tools/quickstart.py "$@"

#!/usr/bin/env bash
# The LENS miniature on CPU (9.5 min on 2 idle AMD EPYC cores, 2026-12-04; docs/lab-notebook.md): synthetic data, tiny warm-up, stage 1, stage 2 (GRPO),
# evaluation of every stage with the swap check, the stage-2 reward on fixed prompts, a demo overlay; results
# (with each phase's seconds) in outputs/quickstart/results.json. Findings: docs/lab-notebook.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
export TOKENIZERS_PARALLELISM=false
python tools/quickstart.py "$@"

#!/usr/bin/env bash
# The test suite: creates or reuses .venv, installs what is missing, runs `ruff check .` and then pytest (CPU).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/test_model.py -x`; LENS_LINT=0 skips ruff.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
lens_ensure_browser
if [ "${LENS_LINT:-1}" != "0" ]; then
  echo "[test] ruff check ."
  if ! "$VENV/bin/ruff" check . ; then
    echo "[test] ruff found problems: fix them (many with '.venv/bin/ruff check --fix .'); LENS_LINT=0 skips lint" >&2
    exit 1
  fi
fi
export PYTHONHASHSEED=0 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
set +e
python -m pytest --timeout=900 -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"

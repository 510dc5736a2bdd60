#!/usr/bin/env bash
# Create or reuse .venv and install what is missing. Sourced by test.sh and quickstart.sh.
# Re-runs are cheap: a stamp records the hash of the requirement files last installed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LENS_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.lens-installed"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$ROOT/pyproject.toml" 2>/dev/null | sha256sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
  echo "[setup] installing torch (from local disk where available)"
  "${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1"
  echo "[setup] installing requirements"
  "${PIP[@]}" -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt" setuptools wheel
  if ! "$VENV/bin/python" -c "import sam2" 2>/dev/null; then
    echo "[setup] building sam2 1.1.0 (pure Python, no CUDA extension)"
    SAM2_BUILD_CUDA=0 SAM2_BUILD_ALLOW_ERRORS=1 "${PIP[@]}" --no-build-isolation --no-deps "sam2==1.1.0"
  fi
  "${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"

#!/usr/bin/env bash
# Create or reuse .venv and install what is missing. Sourced by test.sh and quickstart.sh.
# Re-runs are cheap: a stamp records the hash of the requirement files last installed.
# sam2 cannot be a declared dependency of pyproject.toml (it must build against the installed torch, without its
# CUDA extension): it is installed here with SAM2_BUILD_CUDA=0 --no-build-isolation --no-deps, then lens itself
# with --no-deps (its dependencies are the pins of requirements.txt, installed first).
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

# The browser of tests/test_web_demo.py: Debian's chromium + chromium-driver (test.sh calls this; apt-get needs
# root, as in CI). Runs apt-get only when one of them is missing; LENS_NO_BROWSER=1 skips it.
lens_ensure_browser() {
  if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then return 0; fi
  if [ "${LENS_NO_BROWSER:-0}" = "1" ]; then return 0; fi
  if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null; then
    echo "[setup] chromium/chromedriver missing and apt-get unavailable (not root?): the web demo test will skip" >&2
    return 0
  fi
  local log="$VENV/.apt-browser.log"
  echo "[setup] installing chromium + chromium-driver with apt-get (log: $log)"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
         chromium chromium-driver; } >"$log" 2>&1; then
    echo "[setup] apt-get could not install chromium (see $log): the web demo test will skip" >&2
  fi
  return 0
}

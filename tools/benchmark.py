#!/usr/bin/env python
"""Entry point of the benchmark package `tools/benchmark/` (see its docstring, or run with --help)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tools"):  # this checkout's `lens`, and `tools` as a namespace package
    if str(path) in sys.path:
        sys.path.remove(str(path))
sys.path.insert(0, str(ROOT))  # `tools/` would otherwise shadow the package with this very file

from tools.benchmark.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())

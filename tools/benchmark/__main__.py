"""`python -m tools.benchmark` (from the repository root): the same tool as `python tools/benchmark.py`."""

from tools.benchmark.cli import main

raise SystemExit(main())

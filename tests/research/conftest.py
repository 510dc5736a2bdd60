"""The research probes are a top-level package of the checkout (not installed with `lens`): import them from here."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

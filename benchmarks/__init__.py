"""Performance benchmarks: scripts that print ratios measured in one run.

Each writes its figures into results.json through `store`; `python -m benchmarks`
runs them all and tabulates the headline figures in RESULTS.md.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).with_name("results.json")


def store(entries: dict) -> None:
    """Merge `entries` (key -> {"value", ..., "date"}) into results.json; each
    benchmark owns its keys, the others' stay as they were."""
    stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    stored.update(entries)
    RESULTS.write_text(json.dumps(stored, indent=2) + "\n")

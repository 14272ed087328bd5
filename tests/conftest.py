"""Run order: the tests tests/durations.json lists as slow start first, slowest first (the rest
keep their order after them). Under pytest-xdist a long test that starts last keeps one worker
busy after the others have finished; started first, it runs beside the many short ones. The file
comes from `--durations` logs (tests/support/record_durations.py); a test it does not list, or a
missing file, only loses that head start."""
from __future__ import annotations

import json
import os

DURATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "durations.json")


def pytest_collection_modifyitems(config, items):
    try:
        with open(DURATIONS, encoding="utf-8") as f:
            known = json.load(f)
    except (OSError, ValueError):
        return
    items.sort(key=lambda item: -float(known.get(item.nodeid, 0.0)))      # stable: ties keep their order

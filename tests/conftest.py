"""Run order: the tests tests/durations.json lists as slow start first, slowest first (the rest
keep their order after them). Under pytest-xdist a long test that starts last keeps one worker
busy after the others have finished; started first, it runs beside the many short ones. The file
comes from `--durations` logs (tests/support/record_durations.py); a test it does not list, or a
missing file, only loses that head start.

With PARED_TEST_CPU_LOG=FILE each test appends a line to FILE: its wall time and the CPU time its
worker (and the children it waited for) spent meanwhile. A test whose CPU time is far below its
wall time leaves its core idle (sleeps, waits on a server or a link); tests/support/cpu_report.py
sums a run's lines."""
from __future__ import annotations

import json
import os
import resource
import time

import pytest

DURATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "durations.json")
CPU_LOG = "PARED_TEST_CPU_LOG"


def _cpu_s() -> float:
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    path = os.environ.get(CPU_LOG)
    if not path:
        yield
        return
    wall, cpu = time.perf_counter(), _cpu_s()
    yield
    line = json.dumps({"test": item.nodeid, "wall_s": round(time.perf_counter() - wall, 3),
                       "cpu_s": round(_cpu_s() - cpu, 3), "worker": os.environ.get("PYTEST_XDIST_WORKER", "main")})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)   # one write per line: workers interleave whole lines
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def pytest_collection_modifyitems(config, items):
    try:
        with open(DURATIONS, encoding="utf-8") as f:
            known = json.load(f)
    except (OSError, ValueError):
        return
    items.sort(key=lambda item: -float(known.get(item.nodeid, 0.0)))      # stable: ties keep their order

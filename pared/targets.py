"""Targets: which backend and device a Program is lowered for (the front door's name).

The Target dataclass, the named targets and device-profile loading live in
`pared.ir.target` (targets are data, read by passes, analyses and backends alike);
this module re-exports them so that `pared.targets.get_target("cpu")` and
`pared.Target` keep working. See pared.ir.target for the fields and the profiles.
"""
from __future__ import annotations

from pared.ir.target import (BACKENDS, CPU_PROVIDERS, CPU_SLOW_FUSIONS, INT8_WEIGHT_QMAX, INT8_WEIGHTS, NAMED,
                             ORT_OPT_LEVELS, Target, get_target)

__all__ = ["BACKENDS", "CPU_PROVIDERS", "CPU_SLOW_FUSIONS", "INT8_WEIGHT_QMAX", "INT8_WEIGHTS", "NAMED",
           "ORT_OPT_LEVELS", "Target", "get_target"]

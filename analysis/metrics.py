"""Fidelity metrics shared by the passes that search a trade-off and the
workloads that report one (numpy only, so the torch-free side can use them)."""
from __future__ import annotations

import math

import numpy as np

#: PSNR of identical arrays (JSON has no infinity)
PSNR_CAP_DB = 200.0


def psnr_db(reference: np.ndarray, candidate: np.ndarray, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of `candidate` against `reference`;
    identical inputs give PSNR_CAP_DB."""
    mse = float(np.mean((np.asarray(reference, np.float64) - np.asarray(candidate, np.float64)) ** 2))
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(peak * peak / mse))

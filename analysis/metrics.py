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


def compare_outputs(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """A run's outputs (float64 [rows, features], analysis.recorder.replay) against the reference
    run's: rel_l2, sqnr_db, the smallest and the mean per-row cosine, top-1 (argmax per row)
    agreement, and PSNR with the reference's range as peak. The metrics a Goal names."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    err = float(np.linalg.norm(got - ref))
    norm = float(np.linalg.norm(ref))
    rel = err / norm if norm > 0 else (0.0 if err == 0 else math.inf)
    rn, gn = np.linalg.norm(ref, axis=1), np.linalg.norm(got, axis=1)
    ok = (rn > 0) & (gn > 0)
    cos = np.sum(ref * got, axis=1)[ok] / (rn[ok] * gn[ok])
    return {"rel_l2": rel, "sqnr_db": -20.0 * math.log10(rel) if rel > 0 else math.inf,
            "cosine": float(cos.min()) if cos.size else 1.0,
            "cosine_mean": float(cos.mean()) if cos.size else 1.0,
            "agreement": float(np.mean(np.argmax(ref, axis=1) == np.argmax(got, axis=1))),
            "psnr_db": psnr_db(ref, got, peak=float(ref.max() - ref.min()) or 1.0) if ref.size else PSNR_CAP_DB}

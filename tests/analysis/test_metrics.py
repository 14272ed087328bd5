"""analysis.metrics: PSNR, and that it (and the workloads module) import without torch."""
import numpy as np

from pared.analysis.metrics import PSNR_CAP_DB, psnr_db
from pared.testing import run_torch_free


def test_psnr():
    a = np.zeros(16, np.float32)
    assert psnr_db(a, a) == PSNR_CAP_DB
    assert abs(psnr_db(a, a + 0.1) - 20.0) < 1e-5
    assert abs(psnr_db(a, a + 0.1, peak=2.0) - (20.0 + 20 * np.log10(2.0))) < 1e-5


def test_metrics_and_workloads_import_without_torch():
    out = run_torch_free("import sys, pared.analysis.metrics, pared.workloads, pared.workloads.samplers\n"
                         "print('torch' in sys.modules)")
    assert out.strip().splitlines()[-1] == "False"

"""backends.common.compare: the lowering check's error figures, with infinities and NaN."""
import numpy as np

from pared.backends.common import compare


def test_equal_infinities_agree():
    e = np.array([[0.5, -np.inf], [1.0, 2.0]], np.float32)
    r = compare([e], [e.copy()])
    assert r == {"max_abs": 0.0, "rel_l2": 0.0}


def test_a_nan_or_a_one_sided_infinity_is_an_error():
    e = np.array([1.0, 2.0, -np.inf], np.float32)
    for g in (np.array([1.0, np.nan, -np.inf], np.float32), np.array([1.0, 2.0, 0.0], np.float32),
              np.array([np.inf, 2.0, -np.inf], np.float32)):
        r = compare([e], [g])
        assert r["max_abs"] == np.inf and r["rel_l2"] == np.inf


def test_relative_error_is_over_the_finite_values():
    e = np.array([3.0, 4.0, -np.inf], np.float32)
    g = np.array([3.0, 4.5, -np.inf], np.float32)
    r = compare([e], [g])
    assert np.isclose(r["max_abs"], 0.5) and np.isclose(r["rel_l2"], 0.5 / 5.0)

"""pared.testing's golden comparison: structure and integers exact, floats within another CPU's noise."""
import pytest

from pared.testing import assert_golden, same_up_to_float_noise

GOLD = "q = quantize(view_10, 0.0052059125155210495, 122, 0, 255)\nclamp(x, -2.8329808712005615, 3.2e-05)\n"


def test_an_ulp_apart_is_the_same():
    now = GOLD.replace("0.0052059125155210495", "0.005205912049859762").replace("-2.8329808712005615",
                                                                               "-2.8329803943634033")
    assert same_up_to_float_noise(GOLD, now)


@pytest.mark.parametrize("old,new", [("0.0052059125155210495", "0.00521"),     # a real change of scale
                                     ("122", "123"),                          # an integer (zero point)
                                     ("view_10", "view_11"),                  # a name
                                     ("3.2e-05", "3.2e-05, 1.0")])            # another argument
def test_anything_else_differs(old, new):
    assert not same_up_to_float_noise(GOLD, GOLD.replace(old, new))


def test_assert_golden_uses_it(tmp_path):
    p = tmp_path / "g.txt"
    p.write_text(GOLD)
    assert_golden(GOLD.replace("0.0052059125155210495", "0.005205912049859762"), str(p))
    with pytest.raises(AssertionError, match="differs from the golden"):
        assert_golden(GOLD.replace("122", "121"), str(p))

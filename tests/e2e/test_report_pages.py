"""`pared optimize --report` on three shipped workloads (the cached DiT, the mixed-precision ViT,
the composed VLA policy): each page renders in headless chromium with every plot drawn, and shows
what its pipeline decided. examples/report_pages.py makes the screenshots in docs/ the same way."""
from __future__ import annotations

import importlib.util
import json
import os
import re

import pytest

from pared.testing import assert_page_rendered, browse_page, browser_missing, plots_declared, skip_or_fail_if_missing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("report_pages", os.path.join(ROOT, "examples", "report_pages.py"))
report_pages = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report_pages)

#: page -> (sections that must hold plots, record types the manifest must keep)
EXPECT = {
    "dit_cache": ({"measured", "plan", "redundancy"}, {"RedundancyProfile", "CachePlan"}),
    "vit_mnist_mixed": ({"measured", "precision", "searches"}, {"MixedPrecisionPlan", "SensitivityProfile"}),
    "vla_composed": ({"measured", "plan", "redundancy"}, {"ActionCachePlan", "DynamicPrecisionDecisions",
                                                           "TokenReuseDecisions"}),
}
#: pass options changed for the test (the page and its records are the same kinds): one token
#: reuse level instead of the file's five lowers 5 encoder graphs instead of 13 (~17 s each here)
FASTER = {"vla_composed": {"token_reuse": {"levels": [32]}}}


@pytest.mark.heavy
@pytest.mark.parametrize("name", list(EXPECT))
def test_shipped_workload_report_renders(name, tmp_path):
    skip_or_fail_if_missing(browser_missing(), "the browser test", "PARED_REQUIRE_BROWSER")
    page = report_pages.build(name, str(tmp_path), repeats=2, options=FASTER.get(name))
    with open(page, encoding="utf-8") as f:
        html = f.read()
    sections, records = EXPECT[name]
    drawn = {k for k, n in re.findall(r'<section id="([\w-]+)" data-plots="(\d+)">', html) if int(n) > 0}
    assert sections <= drawn, drawn
    with open(os.path.join(str(tmp_path), name, "manifest.json")) as f:
        m = json.load(f)
    kept = {r["type"] for r in m["records"].values()} | {v["record"]["type"] for v in m["superseded_records"].values()}
    assert records <= kept, kept
    if name in FASTER:      # the changed option took effect
        (reuse,) = [r for r in m["records"].values() if r["type"] == "TokenReuseDecisions"]
        assert [lv["reuse"] for lv in reuse["levels"]] == [32], reuse["levels"]
    assert_page_rendered(browse_page(page, str(tmp_path / "page.png")), plots_declared(html))

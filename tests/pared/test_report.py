"""`pared report`: the HTML page drawn from an artifact's manifest (what the compiler saw and
decided), checked for its content here and rendered in a real headless browser (Debian's
chromium driven by Playwright): no errors, nothing fetched, every plot drawn, a screenshot.

Three artifacts of tiny models cover the sections: a DiT cached with a threshold search
(redundancy heatmap under the schedule, the search's points, attention maps measured before the
rewrite), a transformer at mixed precision (sensitivity, bits, the budget search), and a
partitioned patch net (the sweep and the cut costs)."""
from __future__ import annotations

import functools
import html
import json
import os
import re
import shutil

import pytest
import torch

import pared
from pared.analysis.placement import modeled_cost
from pared.cli import EXIT_ERROR, EXIT_OK, main
from pared.ir.capture import capture
from pared.ir.errors import ArtifactError
from pared.ir.target import Deployment
from pared.ir.transform import PassContext, PassManager
from pared.passes.partition.partition import Partition
from pared.registry import get_pass
from pared.report import default_path, pareto, render_report, write_report
from pared.testing import (SLOW_EDGE_FAST_CLOUD, assert_page_rendered, browse_page, browser_missing, plots_declared,
                           save_program, skip_or_fail_if_missing, tiny_dit, tiny_patchnet,
                           tiny_sampler_loop, tiny_transformer)


@functools.cache
def _artifacts(root: str) -> dict[str, str]:
    out = {}
    m, (x, t) = tiny_dit(attention=True)
    opt = pared.optimize(m, (x, t), target="cpu", calibration=tiny_sampler_loop(x, 10), bench_repeats=2,
                         allow_fidelity_loss=True,
                         pipeline=["attention_entropy", "token_importance", "temporal_redundancy",
                                   {"residual_cache": {"target": {"psnr_db": 30}}}])
    out["cached"] = opt.save(os.path.join(root, "cached"))
    m, (ids,) = tiny_transformer()
    torch.manual_seed(1)
    calib = [(torch.randint(0, 50, tuple(ids.shape)),) for _ in range(4)]
    opt = pared.optimize(m, (ids,), target="cpu", calibration=calib, bench_repeats=0, allow_fidelity_loss=True,
                         pipeline=[{"quant_sensitivity": {"formats": ["w8a8", "w4"], "block_size": 16}},
                                   {"mixed_precision": {"weight_bytes": 0.6, "target": {"cosine": 0.999},
                                                        "block_size": 16}}])
    out["mixed"] = opt.save(os.path.join(root, "mixed"))
    m, (x, t) = tiny_dit()
    skip, _ = PassManager([get_pass("layer_skip")(target={"psnr_db": 55.0})]).run(
        capture(m, (x, t)), PassContext(calibration=tiny_sampler_loop(x, 8)))
    out["skip"] = save_program(skip, os.path.join(root, "skip"), {"name": "cpu", "backend": "onnxruntime",
                                                                  "provider": "CPUExecutionProvider"})
    m, x = tiny_patchnet()
    prog = capture(m, x)
    at = ("patch", "blocks.*", "blocks.*.mlp.0")
    prog = prog.with_record(modeled_cost(prog, "main", Deployment.from_json(SLOW_EDGE_FAST_CLOUD),
                                         ("edge", "cloud"), at), "main")
    res = Partition(deployment=SLOW_EDGE_FAST_CLOUD, at=list(at), mbit=[1, 10, 100, 1000])(prog, PassContext())
    out["partition"] = save_program(res.program, os.path.join(root, "partition"),
                                    {"name": "cpu", "backend": "onnxruntime", "provider": "CPUExecutionProvider"})
    return out


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return _artifacts(str(tmp_path_factory.mktemp("report")))


def _sections(page: str) -> dict[str, int]:
    """section id -> the plots it says it holds"""
    return {k: int(v) for k, v in re.findall(r'<section id="([\w-]+)" data-plots="(\d+)">', page)}


def _manifest(path):
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)


def test_cached_dit_page_shows_the_heatmap_schedule_search_and_superseded_maps(artifacts):
    page = render_report(artifacts["cached"])
    secs = _sections(page)
    assert {"summary", "measured", "passes", "plan", "redundancy", "tokens", "searches", "records"} <= set(secs)
    assert secs["redundancy"] >= 1 and secs["searches"] == 1 and secs["tokens"] == 2 and secs["plan"] == 1
    m = _manifest(artifacts["cached"])
    plan = m["records"]["CachePlan"]
    # every threshold the search tried is a row of its table, the one kept among them
    assert plan["search"] and plan["threshold"] in [p[0] for p in plan["search"]]
    for th, psnr, speedup in plan["search"]:
        assert f"<td>{th:.4g}</td>" in page
    # how the search ran (in this process, how many trials)
    how = m["report"]["search"]
    assert how["executor"] == "in_process" and how["trials_run"] == len(plan["search"])
    assert "How the searches ran" in page and f"<td>{how['trials_run']}</td>" in page
    # the attention analyses ran before the cache rewrote the graph: the manifest keeps them as
    # superseded, and the page draws them
    sup = m["superseded_records"]
    assert {"AttentionEntropyProfile", "TokenImportanceProfile"} <= {v["record"]["type"] for v in sup.values()}
    assert all(v["by"] == "residual_cache" for v in sup.values())
    assert "measured before residual_cache rewrote the program" in page
    # the measured figures with their run conditions
    sp = m["report"]["speed"]
    assert f"{sp['artifact_ms']:.4g} ms" in page and "OMP_WAIT_POLICY" in page
    assert html.escape(m["report"]["fidelity"]["judged_on"]) in page


def test_mixed_precision_page_shows_sensitivity_bits_and_probes(artifacts):
    page = render_report(artifacts["mixed"])
    secs = _sections(page)
    assert secs["precision"] == 2 and secs["searches"] == 1
    m = _manifest(artifacts["mixed"])
    mp = m["records"]["MixedPrecisionPlan"]
    assert mp["probes"] and mp["target_met"]
    assert "SensitivityProfile" in {v["record"]["type"] for v in m["superseded_records"].values()}
    for lay in mp["layers"]:
        assert html.escape(lay["layer"]) in page


def test_partition_page_shows_the_sweep_and_the_cut_costs(artifacts):
    page = render_report(artifacts["partition"])
    secs = _sections(page)
    assert secs["partition"] == 2
    plan = _manifest(artifacts["partition"])["records"]["PartitionPlan@main"]
    for case in plan["cases"]:
        assert f"<td>{case['label']}</td>" in page
    # the plan tree shows the transfers between the devices
    assert "transfer" in page


def test_a_knob_search_shows_each_knob_tried_and_the_one_kept(artifacts):
    page = render_report(artifacts["skip"])
    d = _manifest(artifacts["skip"])["records"]["LayerSkipDecisions"]
    assert d["trials"] and len(d["blocks"]) == 2
    assert _sections(page)["searches"] == 1
    assert "each blocks skipped tried for psnr_db 55.0" in page and "kept: 2" in page


def test_pareto_front_is_the_non_dominated_points():
    pts = [(1.0, 40.0), (2.0, 35.0), (1.5, 30.0), (3.0, 20.0), (3.0, 10.0), (0.5, 40.0)]
    front = pareto(pts)
    assert front == [0, 1, 3]
    for i in front:   # nothing beats a front point on both coordinates
        assert not any(a >= pts[i][0] and b >= pts[i][1] and (a, b) != pts[i] for a, b in pts)
    for j in set(range(len(pts))) - set(front):   # every other point is beaten by one on the front
        assert any(pts[i][0] >= pts[j][0] and pts[i][1] >= pts[j][1] for i in front)


def test_page_is_self_contained(artifacts):
    page = render_report(artifacts["cached"])
    assert "<script" not in page
    refs = re.findall(r'(?:src|href)="([^"#][^"]*)"', page)
    assert [r for r in refs if not r.startswith("data:")] == []
    assert "default-src 'none'" in page     # the browser itself refuses anything fetched


def test_written_beside_the_artifact_atomically_and_readable(artifacts, tmp_path):
    art = shutil.copytree(artifacts["mixed"], str(tmp_path / "a"))
    path = write_report(art)
    assert path == default_path(art) == art + ".report.html"
    assert os.stat(path).st_mode & 0o044 == 0o044          # a page to share, not mkstemp's 0600
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []         # no temporary file left
    # the artifact itself is untouched: a signed one would refuse an unlisted file
    assert sorted(os.listdir(art)) == sorted(os.listdir(artifacts["mixed"]))


def test_tampered_or_untrusted_artifacts_are_refused(artifacts, tmp_path):
    art = shutil.copytree(artifacts["mixed"], str(tmp_path / "a"))
    from pared.backends.signing import generate_key
    _, pub = generate_key(str(tmp_path / "k"))
    with pytest.raises(ArtifactError, match="signature"):
        render_report(art, trusted_keys=[pub])
    onnx = next(f for f in os.listdir(art) if f.endswith(".onnx"))
    with open(os.path.join(art, onnx), "ab") as f:
        f.write(b"x")
    with pytest.raises(ArtifactError, match=onnx):
        render_report(art)


def test_cli_report_and_optimize_report(artifacts, tmp_path, capsys):
    out = str(tmp_path / "r.html")
    assert main(["report", artifacts["partition"], "--out", out]) == EXIT_OK
    assert "wrote " + out in capsys.readouterr().out.replace("\n", "")
    assert os.path.getsize(out) > 10_000
    assert main(["report", str(tmp_path / "nothing")]) == EXIT_ERROR
    assert "not an artifact" in capsys.readouterr().err


# -- the browser -----------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["cached", "mixed", "partition"])
def test_page_renders_in_headless_chromium(artifacts, which, tmp_path):
    skip_or_fail_if_missing(browser_missing(), "the browser test", "PARED_REQUIRE_BROWSER")
    page_file = write_report(artifacts[which], str(tmp_path / f"{which}.html"))
    with open(page_file, encoding="utf-8") as f:
        expected = plots_declared(f.read())
    assert expected >= 2
    seen = browse_page(page_file, str(tmp_path / f"{which}.png"))
    assert_page_rendered(seen, expected)
    from PIL import Image
    with Image.open(seen["screenshot"]) as im:
        assert im.size[0] == 1280

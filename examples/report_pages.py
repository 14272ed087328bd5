"""The `pared report` pages of three shipped workloads, and their screenshots in docs/.

    python examples/report_pages.py [--only dit_cache vit_mnist_mixed vla_composed]

Each pipeline file is optimized as `pared optimize FILE --out artifacts/NAME --report` would
(the report lands beside the artifact: artifacts/NAME.report.html), the page is opened in
headless chromium (pared.testing.browse_page: Debian's chromium driven by Playwright), checked
(no errors, nothing fetched, every plot drawn) and screenshot to docs/report_NAME.png, reduced
to a 256-colour palette to keep the repository small. Takes ~5 minutes on 2 cores, most of it
the VLA's pipeline.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: page name -> the pipeline file it comes from
PAGES = {
    "dit_cache": "pipelines/dit_cache.yaml",             # TaylorSeer over the DiT's blocks
    "vit_mnist_mixed": "pipelines/vit_mnist_mixed.yaml",  # per-layer 4/8/32 bits searched for agreement 1.0
    "vla_composed": "pipelines/vla_composed.yaml",        # token reuse + BAC action cache + DyQ precision
}


def build(name: str, artifacts: str, repeats: int = 10, options: dict | None = None) -> str:
    """Optimize PAGES[name] into `artifacts`/NAME with its report beside it; returns the page's path.
    `options` ({pass: {option: value}}) changes pass options of the file first: the changed copy
    is written to `artifacts`/NAME.yaml (its references made absolute) and optimized instead."""
    from pared.cli import EXIT_OK, main
    out = os.path.join(artifacts, name)
    pipeline = os.path.join(HERE, PAGES[name])
    if options:
        from pared.testing import pipeline_with_options
        pipeline = pipeline_with_options(pipeline, options, os.path.join(artifacts, f"{name}.yaml"))
    rc = main(["optimize", pipeline, "--out", out, "--report", "--repeats", str(repeats), "-q"])
    if rc != EXIT_OK:
        raise SystemExit(f"pared optimize {PAGES[name]} exited {rc}")
    from pared.report import default_path
    return default_path(out)


def screenshot(page: str, png: str) -> dict:
    """Render `page` in the browser, check it, and write its screenshot to `png` (palette PNG)."""
    from PIL import Image

    from pared.testing import assert_page_rendered, browse_page, plots_declared
    with tempfile.TemporaryDirectory() as tmp:
        seen = browse_page(page, os.path.join(tmp, "full.png"))
        with open(page, encoding="utf-8") as f:
            assert_page_rendered(seen, plots_declared(f.read()))
        with Image.open(seen["screenshot"]) as im:
            small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
            tmp_png = png + ".tmp.png"
            small.save(tmp_png, optimize=True)
            os.replace(tmp_png, png)
    return seen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=list(PAGES), default=list(PAGES))
    ap.add_argument("--artifacts", default=os.path.join(ROOT, "artifacts"))
    ap.add_argument("--docs", default=os.path.join(ROOT, "docs"))
    a = ap.parse_args(argv)
    os.makedirs(a.docs, exist_ok=True)
    for name in a.only:
        t0 = time.perf_counter()
        page = build(name, a.artifacts)
        png = os.path.join(a.docs, f"report_{name}.png")
        seen = screenshot(page, png)
        print(f"{name}: {page} ({len(seen['plots'])} plots) -> {png} in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

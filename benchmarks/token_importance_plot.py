"""Token importance on the Meta-World VLA's backbone, seen before tokens are dropped: the
token_importance analysis on 64 calibration observations (training demonstrations), drawn on the
4x4 grid of visual tokens, per backbone layer.

    MUJOCO_GL=egl .venv/bin/python benchmarks/token_importance_plot.py [--observations 64]

PNG (benchmarks/token_importance_vla.png), per backbone layer (columns):
    row 1   relevance: attention the 12 instruction tokens pay each visual token (EfficientVLA's
            task relevance, what token_prune's default score keeps), mean over heads and calls
    row 2   nearest-duplicate similarity of each visual token's values (cos to its closest other
            token; EfficientVLA's diversity keeps the low ones, ToMe merges the high ones)
JSON (benchmarks/results/token_importance.json): per layer, the share of the instruction's attention
that lands on visual tokens, the top-4 visual tokens, top-k stability across calls, and the mean
and range of the nearest-duplicate similarity. Not timed.
"""
from __future__ import annotations

import argparse
import os

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("MUJOCO_GL", "egl")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pared.analysis.token_importance import TokenImportanceProfile  # noqa: E402
from pared.bench import write_results  # noqa: E402
from pared.ir.capture import capture  # noqa: E402
from pared.ir.transform import PassContext  # noqa: E402
from pared.registry import get_pass  # noqa: E402
from pared.workloads import get_workload  # noqa: E402

TEXT, VISUAL = (0, 12), (12, 28)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--observations", type=int, default=64)
    ap.add_argument("--png", default=os.path.join(HERE, "token_importance_vla.png"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "token_importance.json"))
    a = ap.parse_args()
    wl = get_workload("vla_metaworld", head="diffusion", decoder="loop", episodes=1,
                      calibration_steps=a.observations)
    program = capture(wl.build(), wl.example_inputs())
    res = get_pass("token_importance")(graphs=["encoder"], layers=["blocks.*"],
                                       query_groups=[["instruction", *TEXT]], keep_fraction=0.25)(
        program, PassContext(calibration=wl.calibration()))
    prof = res.program.records.of(TokenImportanceProfile)
    sites = prof.graph("encoder").sites
    fig, axes = plt.subplots(2, len(sites), figsize=(2.2 * len(sites), 4.6))
    layers = {}
    for i, s in enumerate(sites):
        rel = np.array(dict(s.relevance)["instruction"])
        vis = rel[VISUAL[0]:VISUAL[1]]
        near = np.array(s.nearest_similarity)[VISUAL[0]:VISUAL[1]]
        for row, (v, cmap, title) in enumerate(((vis, "viridis", "relevance"), (near, "magma", "nearest cos"))):
            ax = axes[row, i]
            im = ax.imshow(v.reshape(4, 4), cmap=cmap)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{s.layer}: {title}", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046)
        top = [int(j) for j in np.argsort(-vis)[:4]]
        layers[s.layer] = {"instruction_attention_on_visual": round(float(vis.sum() / rel.sum()), 4),
                           "top4_visual_tokens": top, "stability": dict(s.stability),
                           "relevance_visual": {"min": round(float(vis.min()), 5), "max": round(float(vis.max()), 5)},
                           "nearest_similarity_visual": {"mean": round(float(near.mean()), 4),
                                                         "min": round(float(near.min()), 4),
                                                         "max": round(float(near.max()), 4)}}
        print(f"{s.layer}: instruction -> visual {layers[s.layer]['instruction_attention_on_visual']:.3f} of its "
              f"attention, top-4 {top}, stability {dict(s.stability)}", flush=True)
    fig.suptitle(f"VLA backbone, {a.observations} calibration observations: visual tokens on the 4x4 grid")
    fig.tight_layout()
    fig.savefig(a.png, dpi=100)
    write_results(a.out, {"benchmark": "token_importance_plot", "observations": a.observations,
                          "png": os.path.relpath(a.png, HERE), "layers": layers})
    print("wrote", a.out, a.png)


if __name__ == "__main__":
    main()

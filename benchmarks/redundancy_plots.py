"""Spatial redundancy, seen before it is removed: the issue-15 analyses (attention_entropy,
layer_redundancy, activation_sparsity) on vit_mnist and dit_mnist, each on its workload's own
calibration run (vit_mnist: one batch of held-out digits; dit_mnist: one DDIM-50 request with
CFG), drawn as PNGs next to this script and summarized as JSON.

    .venv/bin/python benchmarks/redundancy_plots.py [--workloads vit_mnist dit_mnist] [--steps 50]
        [--out benchmarks/results/redundancy_analyses.json] [--png-dir benchmarks]

PNGs:
    redundancy_entropy.png          normalized attention entropy H / log(keys) per layer x head (each
                                    workload; dit_mnist averaged over the steps) and, for dit_mnist,
                                    the mean entropy per layer along the denoising steps
    redundancy_attention_mass.png   attention mass each patch receives, on the image grid: vit_mnist's
                                    [CLS] -> patches in the first and last layers, all queries averaged over
                                    layers; dit_mnist's per layer (mean over heads and steps)
    redundancy_layers.png           EfficientVLA's I(l) = 1 - mean cos(x_l, x_l+1) per block (dit_mnist:
                                    also per step)
    redundancy_activations.png      |x| quantiles of every linear layer's input and TEAL's thresholds

Not timed (the analyses' wall time is reported, for orientation only).
"""
from __future__ import annotations

import argparse
import math
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pared.analysis.activation_sparsity import ActivationSparsityProfile  # noqa: E402
from pared.analysis.attention_entropy import AttentionEntropyProfile  # noqa: E402
from pared.analysis.layer_redundancy import LayerRedundancyProfile  # noqa: E402
from pared.bench import write_results  # noqa: E402
from pared.ir.capture import capture  # noqa: E402
from pared.ir.transform import PassContext  # noqa: E402
from pared.registry import get_pass  # noqa: E402
from pared.workloads import get_workload  # noqa: E402

SPARSITIES = (0.25, 0.4, 0.5)
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def analyse(name: str, steps: int) -> dict:
    """Capture the workload's model and run the three analyses on its calibration run."""
    if name == "vit_mnist":
        wl = get_workload(name, batch=100, samples=500)
        groups = [["cls", 0, 1]]
    else:
        wl = get_workload(name, batch=10, samples=10, steps=steps)
        groups = []
    model = wl.build()
    program = capture(model, wl.example_inputs())
    out: dict = {"workload": name, "seconds": {}}
    for pass_name, opts, rec in (
            ("attention_entropy", {"query_groups": groups}, AttentionEntropyProfile),
            ("layer_redundancy", {}, LayerRedundancyProfile),
            ("activation_sparsity", {"sparsities": SPARSITIES, "quantiles": QUANTILES}, ActivationSparsityProfile)):
        ctx = PassContext(calibration=wl.calibration())
        t0 = time.perf_counter()
        measured = get_pass(pass_name)(**opts)(program, ctx).program
        out["seconds"][pass_name] = round(time.perf_counter() - t0, 2)
        out[pass_name] = measured.records.of(rec)
        print(f"{name}: {pass_name} in {out['seconds'][pass_name]:.1f}s", flush=True)
    return out


def _short(layer: str) -> str:
    """'vit.layers.3.attention' -> 'L3'; 'dit.transformer_blocks.2.attn1' -> 'B2.attn1'."""
    parts = layer.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            head = "L" if "layers" in parts[i - 1] else "B"
            rest = ".".join(parts[i + 1:])
            return f"{head}{p}" + (f".{rest}" if rest and rest not in ("attention", "attention.attention") else "")
    return layer


def summary(res: dict) -> dict:
    ae: AttentionEntropyProfile = res["attention_entropy"]
    lr: LayerRedundancyProfile = res["layer_redundancy"]
    sp: ActivationSparsityProfile = res["activation_sparsity"]
    sites = ae.graph().sites
    norm = np.array([s.head_normalized for s in sites])
    blocks = lr.graph().blocks
    lins = sp.graph().linears
    return {
        "calls": ae.graph().calls,
        "seconds": res["seconds"],
        "attention": {
            "sites": [{"layer": s.layer, "source": s.source, "heads": s.heads, "queries": s.queries, "keys": s.keys,
                       "head_entropy_nats": [round(x, 4) for x in s.head_entropy],
                       "head_normalized": [round(x, 4) for x in s.head_normalized],
                       "head_kind": list(s.head_kind), "layer_kind": s.layer_kind} for s in sites],
            "normalized_range": [round(float(norm.min()), 4), round(float(norm.max()), 4)],
            "heads_by_kind": {k: int(sum(s.head_kind.count(k) for s in sites)) for k in ("local", "mixed", "global")},
            "thresholds": {"local_below": ae.local_threshold, "global_above": ae.global_threshold},
        },
        "layer_redundancy": {
            "blocks": [{"block": b.block, "importance": round(b.importance, 5), "cos_min": round(b.cos_min, 4)}
                       for b in blocks],
            "lowest_first": [b.block for b in lr.graph().ranked()],
        },
        "activation_sparsity": {
            "sparsities": list(sp.sparsities), "quantiles": list(sp.quantiles),
            "relative_resolution": sp.relative_resolution,
            "linears": [{"layer": x.layer, "in": x.in_features, "out": x.out_features,
                         "teal_thresholds": [round(t, 5) for t in x.abs_x.thresholds],
                         "wina_thresholds": [round(t, 5) for t in x.wina.thresholds],
                         "abs_quantiles": [round(q, 5) for q in x.abs_x.quantiles],
                         "zero_fraction": round(x.abs_x.zero_fraction, 5)} for x in lins],
            "teal_threshold_50_median": round(float(np.median([x.abs_x.thresholds[SPARSITIES.index(0.5)]
                                                               for x in lins])), 5),
        },
    }


# -- plots -------------------------------------------------------------------------------------
def plot_entropy(results: list[dict], path: str) -> None:
    dit = next((r for r in results if r["workload"] == "dit_mnist"), None)
    n = len(results) + (1 if dit is not None else 0)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.2), squeeze=False)
    for ax, r in zip(axes[0], results):
        sites = r["attention_entropy"].graph().sites
        norm = np.array([s.head_normalized for s in sites])
        im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_yticks(range(len(sites)), [_short(s.layer) for s in sites], fontsize=7)
        ax.set_xticks(range(norm.shape[1]), [f"h{j}" for j in range(norm.shape[1])])
        for i in range(norm.shape[0]):
            for j in range(norm.shape[1]):
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] < 0.6 else "black")
        ax.set_title(f"{r['workload']}: H / log(keys) per layer x head", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    if dit is not None:
        ax = axes[0][-1]
        sites = dit["attention_entropy"].graph().sites
        for s in sites:
            per_call = np.array(s.entropy).mean(1) / math.log(s.keys)
            ax.plot(s.calls, per_call, label=_short(s.layer), lw=1)
        ax.set_xlabel("denoising step (call)")
        ax.set_ylabel("mean H / log(keys)")
        ax.set_title("dit_mnist: entropy along the steps", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _grid(v: np.ndarray) -> np.ndarray:
    side = int(round(math.sqrt(len(v))))
    return v.reshape(side, side)


def plot_mass(results: list[dict], path: str) -> None:
    panels = []
    for r in results:
        sites = r["attention_entropy"].graph().sites
        if r["workload"] == "vit_mnist":
            for s in (sites[0], sites[-1]):
                panels.append((f"vit_mnist {_short(s.layer)}: [CLS] -> patches",
                               _grid(np.array(s.group("cls")).mean(0)[1:])))
            allq = np.mean([np.array(s.received).mean(0)[1:] / s.queries for s in sites], 0)
            panels.append(("vit_mnist: all queries, mean over layers", _grid(allq)))
        else:
            for s in sites:
                panels.append((f"dit_mnist {_short(s.layer)}", _grid(np.array(s.received).mean(0) / s.queries)))
    cols = min(6, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (title, g) in zip(axes.ravel(), panels):
        ax.imshow(g, cmap="magma")
        ax.set_title(title, fontsize=7)
    fig.suptitle("attention mass each patch receives (column sums / queries; uniform = 1/keys; each panel on "
                 "its own scale, bright = most)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_layers(results: list[dict], path: str) -> None:
    dit = next((r for r in results if r["workload"] == "dit_mnist"), None)
    n = len(results) + (1 if dit is not None else 0)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        blocks = r["layer_redundancy"].graph().blocks
        vals = [b.importance for b in blocks]
        low = set(b.block for b in r["layer_redundancy"].graph().ranked()[:2])
        ax.bar(range(len(blocks)), vals, color=["tab:red" if b.block in low else "tab:blue" for b in blocks])
        ax.set_xticks(range(len(blocks)), [_short(b.block) for b in blocks], fontsize=7)
        ax.set_ylabel("I(l) = 1 - mean cos(x_l, x_l+1)")
        ax.set_title(f"{r['workload']}: layer importance (red: lowest two)", fontsize=9)
    if dit is not None:
        ax = axes[0][-1]
        for b in dit["layer_redundancy"].graph().blocks:
            ax.plot(b.calls, b.call_importance, label=_short(b.block), lw=1)
        ax.set_xlabel("denoising step (call)")
        ax.set_ylabel("I(l) per step")
        ax.set_title("dit_mnist: I(l) along the steps", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _linear_label(layer: str) -> str:
    for a, b in (("vit.layers.", "L"), ("dit.transformer_blocks.", "B"), ("attention.", ""), ("intermediate.", ""),
                 ("norm1.emb.timestep_embedder.linear_", "t_mlp"), ("norm1.linear", "adaLN"), ("dit.", "")):
        layer = layer.replace(a, b)
    return layer


def plot_activations(results: list[dict], path: str) -> None:
    fig, axes = plt.subplots(len(results), 1, figsize=(14, 3.8 * len(results)), squeeze=False)
    for ax, r in zip(axes[:, 0], results):
        sp: ActivationSparsityProfile = r["activation_sparsity"]
        lins = sp.graph().linears
        x = np.arange(len(lins))
        q = np.array([lin.abs_x.quantiles for lin in lins])
        for j, lvl in enumerate(sp.quantiles):
            ax.plot(x, q[:, j], marker=".", lw=0.8, label=f"|x| q{lvl:g}")
        # TEAL's threshold at sparsity p is the p-quantile of |x|: drawn where it is not a line already
        for j, p in enumerate(sp.sparsities):
            if p not in sp.quantiles:
                ax.scatter(x, [lin.abs_x.thresholds[j] for lin in lins], marker="_", s=60, color="k",
                           label=f"TEAL t at {p:g} sparsity")
        ax.set_yscale("log")
        ax.set_xticks(x, [_linear_label(lin.layer) for lin in lins], rotation=90, fontsize=5)
        ax.set_ylabel("|x|")
        ax.set_title(f"{r['workload']}: |x| quantiles of each linear layer's input over the calibration run "
                     "(TEAL's threshold at sparsity p = the p-quantile)", fontsize=9)
        ax.legend(fontsize=6, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=["vit_mnist", "dit_mnist"])
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps of dit_mnist's calibration request")
    ap.add_argument("--png-dir", default=HERE)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "redundancy_analyses.json"))
    a = ap.parse_args()
    torch.manual_seed(0)
    results = [analyse(w, a.steps) for w in a.workloads]
    os.makedirs(a.png_dir, exist_ok=True)
    pngs = {}
    for stem, fn in (("entropy", plot_entropy), ("attention_mass", plot_mass), ("layers", plot_layers),
                     ("activations", plot_activations)):
        path = os.path.join(a.png_dir, f"redundancy_{stem}.png")
        fn(results, path)
        pngs[stem] = os.path.relpath(path, HERE)
    data = {"benchmark": "redundancy_plots", "steps": a.steps, "pngs": pngs,
            "workloads": {r["workload"]: summary(r) for r in results}}
    print("wrote", write_results(a.out, data))
    for r in results:
        s = data["workloads"][r["workload"]]
        print(f"{r['workload']}: H/log(keys) in {s['attention']['normalized_range']}, "
              f"heads {s['attention']['heads_by_kind']}; "
              f"lowest I(l): {s['layer_redundancy']['lowest_first'][:3]}; median TEAL t at 50%: "
              f"{s['activation_sparsity']['teal_threshold_50_median']}")


if __name__ == "__main__":
    main()

"""`pared report`: one self-contained HTML page of what the compiler saw and decided.

The page is built from an artifact's manifest alone (torch-free): its records (the analyses'
profiles and the passes' decisions), the Plan, the pipeline's report (fidelity and speed with
their run conditions) and the signature. Plots are matplotlib figures inlined as SVG, so the
page opens offline, from any folder, with no script and nothing fetched.

Sections, each present when its record is:
  summary          the artifact, its target, build CPU, files and signature
  fidelity, speed  the measured figures beside their bounds and run conditions
  passes           what ran, what changed, their stats and seconds
  plan             the Plan drawn as a tree of routines (calls, selects and their cases, loops,
                   transfers), with its state buffers and per-step values
  redundancy       RedundancyProfile: block x step change heatmap, the chosen cache schedule
                   (CachePlan) over it; ActionCachePlan: the per-block update table
  precision        SensitivityProfile: per-layer error per format; MixedPrecisionPlan: the bits
                   chosen; DynamicPrecisionDecisions / QuantPlan / WeightQuantPlan: tables
  tokens           TokenImportanceProfile: attention received per key; AttentionEntropyProfile:
                   per-head entropy maps
  partition        PartitionPlan: modeled latency across bandwidths (chosen vs either device
                   alone); PlacementCost: bytes crossing and time before each cut
  searches         every recorded search's tried points (speed vs fidelity) with the Pareto
                   front and the point kept
  records          every record as JSON (what the sections above did not draw is still here)

`write_report(artifact, out)` writes it atomically; the default path is beside the artifact
(``<artifact>.report.html``: a file inside a signed artifact would be refused as unlisted).
"""
from __future__ import annotations

import datetime
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from pared.analysis.search import pareto_front
from pared.backends.artifact import read_manifest
from pared.backends.signing import atomic_write
from pared.ir.errors import ParedError
from pared.ir.records import GRAPH_SEP

__all__ = ["write_report", "render_report", "default_path", "Section"]

#: (larger is better) for metrics a search can record, to draw its Pareto front
_FIDELITY = ("psnr_db", "cosine", "cosine_mean", "agreement", "accuracy", "sqnr_db", "success")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_path(artifact: str) -> str:
    """Where the report of `artifact` goes by default: beside it, ``<artifact>.report.html``."""
    return os.path.normpath(artifact).rstrip(os.sep) + ".report.html"


def write_report(artifact: str, out: str | None = None, *, trusted_keys: Iterable[Any] | None = None) -> str:
    """Render the report of `artifact` and write it atomically to `out` (default: beside it).

    Args:
        artifact: an artifact directory (pared.optimize(...).save or `pared optimize`).
        out: the HTML file to write.
        trusted_keys: as pared.load: with keys, an unsigned or wrongly signed artifact is refused.
    Returns:
        The path written.
    Raises:
        ArtifactError: not an artifact, damaged, or (with trusted_keys) not trusted.
    """
    page = render_report(artifact, trusted_keys=trusted_keys)
    out = out or default_path(artifact)
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    atomic_write(out, page.encode("utf-8"), 0o666 & ~_umask())     # a page to share, not 0600
    return out


# -- the page ------------------------------------------------------------------------------------
@dataclass
class Section:
    """One part of the page: a title, HTML, and how many plots it holds."""
    key: str
    title: str
    body: list[str] = field(default_factory=list)
    plots: int = 0

    def add(self, fragment: str) -> None:
        self.body.append(fragment)

    def plot(self, fig: Any, name: str, caption: str) -> None:
        self.body.append(_figure(fig, f"{self.key}-{name}", caption))
        self.plots += 1


def render_report(artifact: str, *, trusted_keys: Iterable[Any] | None = None) -> str:
    """The report of `artifact` as one HTML string (see the module docstring)."""
    manifest = read_manifest(artifact, trusted_keys=trusted_keys)
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:   # figures are matplotlib.figure.Figure: no pyplot
        raise ParedError("pared report draws its plots with matplotlib, which is not installed: "
                         "pip install 'pared[report]'")
    records = _records(manifest)
    sections = [
        _summary(artifact, manifest, trusted_keys is not None),
        _fidelity_speed(manifest.get("report") or {}),
        _passes(manifest.get("report") or {}, manifest.get("pipeline") or []),
        _plan(manifest["plan"]),
        _redundancy(records),
        _precision(records),
        _tokens(records),
        _partition(records),
        _searches(records, (manifest.get("report") or {}).get("search")),
        _all_records(records),
    ]
    sections = [s for s in sections if s.body]
    return _page(artifact, manifest, sections)


def _records(manifest: Mapping[str, Any]) -> list[tuple[str, str | None, dict]]:
    """(type, graph or None, JSON) per record, in the manifest's order: the final program's, then
    the measurements a later rewrite superseded (their JSON gains "superseded_by": the pass)."""
    out = []
    raw = manifest.get("records") or {}
    old = manifest.get("superseded_records") or {}
    entries = list(raw.items()) if isinstance(raw, Mapping) else []
    if isinstance(old, Mapping):
        entries += [(k, {**v["record"], "superseded_by": v.get("by")}) for k, v in old.items()
                    if isinstance(v, Mapping) and isinstance(v.get("record"), Mapping)]
    for key, value in entries:
        if not isinstance(value, Mapping):
            continue
        name, _, graph = str(key).partition(GRAPH_SEP)
        out.append((str(value.get("type", name)), graph or None, dict(value)))
    return out


def _of(records, *types: str) -> list[tuple[str | None, dict]]:
    return [(g, r) for t, g, r in records if t in types]


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
header{background:#1d2a3a;color:#fff;padding:18px 28px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#c5cfdb}nav{padding:8px 28px;background:#e8ecf1;position:sticky;top:0}
nav a{margin-right:14px;color:#1d4f91;text-decoration:none}main{padding:8px 28px 40px;max-width:1200px}
section{background:#fff;border:1px solid #dde2e8;border-radius:6px;margin:18px 0;padding:6px 18px 14px}
h2{font-size:17px;border-bottom:1px solid #e4e8ee;padding-bottom:6px}h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #e1e5ea;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f1f4f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:10px 0}figure svg{max-width:100%;height:auto}figcaption{color:#555;font-size:13px}
pre{background:#f4f6f8;padding:8px;overflow:auto;max-height:420px;font-size:12px}
.ok{color:#17794a;font-weight:600}.bad{color:#b3261e;font-weight:600}.dim{color:#6b7580}
"""


def _page(artifact: str, manifest: Mapping[str, Any], sections: list[Section]) -> str:
    name = html.escape(os.path.basename(os.path.normpath(artifact)))
    nav = "".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{s.key}" data-plots="{s.plots}"><h2>{html.escape(s.title)}</h2>'
                   + "".join(s.body) + "</section>" for s in sections)
    made = html.escape(str(manifest.get("created", "")))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
            "img-src data:\">"
            f"<title>pared report: {name}</title><style>{_CSS}</style></head><body>"
            f"<header><h1>pared report: {name}</h1><p>artifact built {made} by pared "
            f"{html.escape(str(manifest.get('pared_version', '?')))}; report written {now}</p></header>"
            f"<nav>{nav}</nav><main>{body}</main></body></html>")


# -- HTML and plot helpers -------------------------------------------------------------------------
def _esc(v: Any) -> str:
    return html.escape(str(v))


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(
        f'<td class="num">{_esc(_fmt(c))}</td>' if isinstance(c, (int, float)) and not isinstance(c, bool)
        else f"<td>{c if isinstance(c, _Raw) else _esc(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


class _Raw(str):
    """HTML that a table cell takes as it is."""


def _kv(mapping: Mapping[str, Any]) -> str:
    return _table([(k, _short_json(v)) for k, v in mapping.items()])


def _short_json(v: Any, n: int = 160) -> str:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return _fmt(v)
    if isinstance(v, Mapping) and all(isinstance(x, (str, int, float, bool)) or x is None for x in v.values()):
        s = ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
        return s if len(s) <= n else s[:n] + "..."
    s = json.dumps(v)
    return s if len(s) <= n else s[:n] + f"... ({len(s)} chars)"


def _fig(w: float, h: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _figure(fig: Any, ident: str, caption: str) -> str:
    import matplotlib
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": ident, "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    return f'<figure class="plot" id="{_esc(ident)}">{svg}<figcaption>{_esc(caption)}</figcaption></figure>'


def _num(v: Any) -> float:
    """A record's number (NaN / Infinity come back from JSON as strings)."""
    if isinstance(v, str):
        return float({"NaN": "nan", "Infinity": "inf", "-Infinity": "-inf"}.get(v, v))
    return float(v) if v is not None else math.nan


def _heatmap(rows: Sequence[Sequence[float]], labels: Sequence[str], *, cmap: str, bar: str, xlabel: str,
             width: float = 10, fontsize: int = 7, **limits: float):
    """A figure of ragged rows as a heatmap (missing cells blank), one labelled row each."""
    import numpy as np
    z = np.full((len(rows), max(len(r) for r in rows)), np.nan)
    for i, r in enumerate(rows):
        z[i, :len(r)] = r
    fig = _fig(width, 1.3 + 0.3 * len(rows))
    ax = fig.add_subplot()
    im = ax.imshow(z, aspect="auto", cmap=cmap, interpolation="nearest", **limits)
    fig.colorbar(im, ax=ax, label=bar)
    ax.set_yticks(range(len(rows)), list(labels), fontsize=fontsize)
    ax.set_xlabel(xlabel)
    return fig, ax


def _counts(labels: Sequence[str]) -> str:
    seen: dict[str, int] = {}
    for x in labels:
        seen[x] = seen.get(x, 0) + 1
    return ", ".join(f"{k}x{v}" for k, v in seen.items())


# -- summary, fidelity, passes ---------------------------------------------------------------------
def _summary(artifact: str, m: Mapping[str, Any], verified: bool) -> Section:
    s = Section("summary", "Artifact")
    t = m.get("target") or {}
    cpu = m.get("build_cpu") or {}
    files = m.get("files") or {}
    total = sum(int(f.get("bytes", 0)) for f in files.values() if isinstance(f, Mapping))
    sig = os.path.join(artifact, "signature.json")
    signed = "unsigned"
    if os.path.isfile(sig):
        try:
            with open(sig, encoding="utf-8") as f:
                doc = json.load(f)
            signed = f"signed ({doc.get('algorithm', '?')}, key {doc.get('key', '?')})" + (
                ": verified against the trusted keys given" if verified else
                ": not verified (give trusted keys to check it)")
        except (OSError, ValueError):
            signed = "signature.json present but unreadable"
    rows = [
        ("path", os.path.abspath(artifact)),
        ("target", f"{t.get('name')} ({t.get('backend')}, {t.get('provider') or t.get('tvm_target')}); "
                   f"{t.get('description', '')}"),
        ("built on", f"{cpu.get('model', '?')} {cpu.get('arch', '')}, ISA {', '.join(cpu.get('features', []))}"),
        ("inputs", ", ".join(m.get("inputs") or [])),
        ("graphs", f"{len(m.get('graphs') or {})}: " + ", ".join(
            f"{g} ({e.get('backend')})" for g, e in (m.get("graphs") or {}).items())),
        ("files", f"{len(files)}, {total / 1e6:.2f} MB"),
        ("signature", signed),
    ]
    s.add(_table(rows))
    return s


def _fidelity_speed(report: Mapping[str, Any]) -> Section:
    s = Section("measured", "Fidelity and speed")
    f, sp = report.get("fidelity") or {}, report.get("speed") or {}
    if f:
        ok = f.get("passed")
        verdict = _Raw(f'<span class="{"ok" if ok else "bad"}">{"within" if ok else "outside"} the bounds</span>')
        rows = [("verdict", verdict)]
        b = f.get("bounds") or {}
        for key, bound, word in (("cosine_min", "min_cosine", ">="), ("rel_l2_max", "max_rel_l2", "<="),
                                 ("max_abs", "max_abs", "<=")):
            if key in f:
                rows.append((key, f"{_fmt(f[key])}" + (f"  (bound {word} {_fmt(b[bound])})"
                                                       if b.get(bound) is not None else "")))
        for key in ("cosine_mean", "checked_inputs", "judged_on", "in_sample"):
            if key in f:
                rows.append((key, f[key]))
        s.add("<h3>Fidelity (artifact vs. the eager model)</h3>" + _table(rows))
    if sp:
        cond = {k: v for k, v in sp.items() if k not in ("eager_ms", "artifact_ms", "speedup_vs_eager")}
        rows = [("eager", f"{_fmt(sp.get('eager_ms'))} ms"), ("artifact", f"{_fmt(sp.get('artifact_ms'))} ms"),
                ("speedup", f"{_fmt(sp.get('speedup_vs_eager'))}x")]
        s.add("<h3>Speed (median of alternating rounds, one process)</h3>" + _table(rows)
              + "<h3>Run conditions</h3>" + _kv(cond))
        if isinstance(sp.get("eager_ms"), (int, float)) and isinstance(sp.get("artifact_ms"), (int, float)):
            fig = _fig(5.0, 1.8)
            ax = fig.add_subplot()
            ax.barh(["artifact", "eager"], [sp["artifact_ms"], sp["eager_ms"]], color=["#2f7d55", "#8a96a3"])
            for y, v in enumerate([sp["artifact_ms"], sp["eager_ms"]]):
                ax.text(v, y, f" {v:.3g} ms", va="center")
            ax.set_xlabel("ms per call")
            ax.set_xlim(0, 1.25 * max(sp["artifact_ms"], sp["eager_ms"]))
            s.plot(fig, "speed", f"Latency per call, median of {sp.get('repeats', '?')} alternating rounds, "
                                 f"{sp.get('threads', '?')} thread(s) each")
    return s


def _passes(report: Mapping[str, Any], pipeline: Sequence[Mapping[str, Any]]) -> Section:
    s = Section("passes", "Passes")
    ran = report.get("passes") or pipeline
    if not ran:
        return s
    rows = [(p.get("name"), "yes" if p.get("modified") else "no", p.get("seconds", ""),
             ", ".join(f"{k}={_short_json(v, 60)}" for k, v in (p.get("stats") or {}).items()))
            for p in ran]
    s.add(_table(rows, ("pass", "changed the program", "seconds", "stats")))
    if report.get("timings"):
        s.add("<h3>Build time</h3>" + _kv(report["timings"]))
    return s


# -- the plan ----------------------------------------------------------------------------------------
def _plan_rows(node: Mapping[str, Any], depth: int, label: str, rows: list, limit: int = 160) -> None:
    """Flatten a plan tree into (depth, edge label, text, kind) rows, parents first."""
    if len(rows) >= limit:
        return
    op = node.get("op")
    if op == "call":
        dev = f" on {node['device']}" if node.get("device") else ""
        text = f"call {node.get('graph')}{dev}  ({len(node.get('inputs', []))} in, {len(node.get('outputs', []))} out)"
        rows.append((depth, label, text, "call"))
    elif op == "seq":
        rows.append((depth, label, f"seq of {len(node.get('nodes', []))}", "seq"))
        for n in node.get("nodes", []):
            _plan_rows(n, depth + 1, "", rows, limit)
    elif op == "select":
        sel = node.get("selector") or {}
        kind = sel.get("kind", "?")
        extra = ""
        if kind == "table":
            extra = f": {len(sel.get('cases', []))} steps, {_counts(sel.get('cases', []))}; then {sel.get('default')}"
        elif "input" in sel:
            extra = f" on {sel['input']}"
        key = f" key {node['key']}" if node.get("key") else ""
        rows.append((depth, label, f"select by {kind}{extra}{key}", "select"))
        for lab, n in node.get("cases", []):
            _plan_rows(n, depth + 1, str(lab), rows, limit)
    elif op == "loop":
        what = f"{node['count']} times" if node.get("count") is not None else f"until {node.get('until')}"
        rows.append((depth, label, f"loop {what}" + (" (steps)" if node.get("steps") else ""), "loop"))
        _plan_rows(node.get("body") or {}, depth + 1, "", rows, limit)
    elif op == "transfer":
        rows.append((depth, label, f"transfer {node.get('ref')}: {node.get('src')} -> {node.get('dst')}",
                     "transfer"))
    else:
        rows.append((depth, label, f"{op}", "other"))


_KIND_COLOR = {"call": "#dcefe3", "seq": "#eef0f3", "select": "#e3ecf9", "loop": "#f8ecd9", "transfer": "#f4e1e1",
               "other": "#eeeeee"}


def _plan(plan: Mapping[str, Any]) -> Section:
    s = Section("plan", "Plan: the routines the artifact runs")
    rows: list = []
    _plan_rows(plan.get("body") or {}, 0, "", rows)
    if not rows:
        return s
    fig = _fig(9.5, 0.6 + 0.36 * len(rows))
    ax = fig.add_subplot()
    ax.set_xlim(0, 10)
    ax.set_ylim(len(rows), -0.6)
    ax.axis("off")
    stack: dict[int, int] = {}
    for i, (depth, label, text, kind) in enumerate(rows):
        x = 0.2 + 0.55 * depth
        if depth > 0 and depth - 1 in stack:
            px = 0.2 + 0.55 * (depth - 1) + 0.12
            ax.plot([px, px, x], [stack[depth - 1] + 0.25, i, i], color="#8a96a3", lw=0.9)
        stack[depth] = i
        for d in [d for d in stack if d > depth]:
            del stack[d]
        shown = (f"[{label}] " if label else "") + text
        ax.text(x, i, shown, va="center", ha="left", fontsize=9, family="monospace",
                bbox={"boxstyle": "round,pad=0.25", "fc": _KIND_COLOR.get(kind, "#eee"), "ec": "#9aa5b1", "lw": 0.6})
    s.plot(fig, "tree", "The Plan as a tree: each row a routine; [label] is the selector's case it runs under.")
    state = plan.get("state") or []
    if state:
        s.add("<h3>State carried across calls</h3>" + _table(
            [(b.get("name"), b.get("shape"), b.get("dtype"), b.get("device")) for b in state],
            ("buffer", "shape", "dtype", "device")))
    steps = plan.get("step_values") or {}
    if steps:
        s.add("<h3>Per-step values</h3>" + _table(
            [(k, len(v), _short_json(v, 120)) for k, v in steps.items()], ("name", "steps", "values")))
    return s


# -- redundancy and caching --------------------------------------------------------------------------
def _reused_blocks(cache: Mapping[str, Any], steps: int) -> list[set[str]]:
    """Per call, the blocks a CachePlan reuses rather than computes."""
    spans = {sp["name"]: set(sp.get("blocks", [])) for sp in cache.get("spans", [])}
    reuse = {v: set().union(*[spans.get(n, set()) for n in names]) if names else set()
             for v, names in cache.get("variants", [])}
    sched = list(cache.get("schedule", []))
    return [reuse.get(sched[i] if i < len(sched) else cache.get("default"), set()) for i in range(steps)]


def _redundancy(records) -> Section:
    import numpy as np
    s = Section("redundancy", "Redundancy across steps and the cache schedule")
    caches = _of(records, "CachePlan")
    for graph, prof in _of(records, "RedundancyProfile"):
        regions = prof.get("regions") or []
        if not regions:
            continue
        depth = min(r["path"].count(".") for r in regions)
        rows = [r for r in regions if r["path"].count(".") == depth and len(r.get("output_rel_l1", [])) > 1]
        if not rows:
            continue
        calls = max(len(r["output_rel_l1"]) for r in rows)
        logs = [[math.log10(max(_num(v), 1e-6)) if math.isfinite(_num(v)) else math.nan for v in r["output_rel_l1"]]
                for r in rows]
        fig, ax = _heatmap(logs, [r["path"] for r in rows], cmap="viridis", fontsize=8,
                           bar="log10 rel. L1 change vs. previous step", xlabel="step (call of the calibration run)")
        caption = (f"Graph {prof.get('graph')}: how much each block's output changes from one step to the next "
                   f"over {prof.get('calls')} calls.")
        plan = next((c for g, c in caches if prof.get("graph") in (c.get("graphs") or [prof.get("graph")])), None)
        if plan is not None:
            reused = _reused_blocks(plan, calls)
            xs, ys = [], []
            for i, r in enumerate(rows):
                for t in range(calls):
                    if any(r["path"] == b or r["path"].startswith(b + ".") for b in reused[t]):
                        xs.append(t)
                        ys.append(i)
            ax.scatter(xs, ys, marker="o", s=14, facecolors="none", edgecolors="white", linewidths=0.9,
                       label="reused from the cache")
            if xs:
                ax.legend(loc="upper right", fontsize=8, framealpha=0.6)
            caption += (f" Circles: the steps where {plan.get('method')} reuses the block instead of computing it "
                        f"({sum(1 for x in reused if x)} of {calls} steps reuse something).")
        s.plot(fig, f"heatmap-{len(s.body)}", caption)
    for graph, plan in caches:
        sched = list(plan.get("schedule", []))
        rows = [("method", plan.get("method")), ("spans", ", ".join(
            f"{sp['name']}: {len(sp.get('blocks', []))} blocks" for sp in plan.get("spans", []))),
            ("schedule", f"{len(sched)} steps: {_counts(sched)}; then {plan.get('default')}")]
        if plan.get("threshold") is not None:
            rows.append(("threshold", plan["threshold"]))
        for v, f in plan.get("flops", []):
            rows.append((f"FLOPs per call, {v}", f"{f:,}"))
        s.add(f"<h3>{_esc(plan.get('method'))} decisions</h3>" + _table(rows))
    for graph, plan in _of(records, "ActionCachePlan"):
        blocks, updates, steps = plan.get("blocks", []), plan.get("updates", []), int(plan.get("steps", 0))
        if not blocks or not steps:
            continue
        z = np.zeros((len(blocks), steps))
        for i, ups in enumerate(updates):
            for t in ups:
                if 0 <= t < steps:
                    z[i, t] = 1
        fig = _fig(8, 1.2 + 0.28 * len(blocks))
        ax = fig.add_subplot()
        ax.imshow(z, aspect="auto", cmap="Greens", vmin=0, vmax=1.3, interpolation="nearest")
        ax.set_yticks(range(len(blocks)), blocks, fontsize=7)
        ax.set_xticks(range(steps))
        ax.set_xlabel("denoising step")
        sim = plan.get("similarity") or []
        if sim:
            for i, v in enumerate(sim):
                ax.text(steps - 0.5, i, f" {_num(v):.3f}", va="center", ha="left", fontsize=7)
        s.plot(fig, f"action-{len(s.body)}", f"{plan.get('method')} on {plan.get('graph')}: green = the sub-block is "
                                             "computed at that step, white = reused; right: mean cosine similarity of "
                                             "the reused outputs on the calibration run"
                                             + (f"; bubbled: {', '.join(plan['bubbled'])}" if plan.get("bubbled")
                                                else ""))
    return s


# -- precision ---------------------------------------------------------------------------------------
def _precision(records) -> Section:
    import numpy as np
    s = Section("precision", "Precision: sensitivity and the bits chosen")
    mixed = _of(records, "MixedPrecisionPlan")
    chosen = {lay["layer"]: lay for _, mp in mixed for lay in mp.get("layers", [])}
    for graph, prof in _of(records, "SensitivityProfile"):
        layers = prof.get("layers") or []
        if not layers:
            continue
        formats = list(layers[0].get("formats", []))
        fig = _fig(10, 3.6)
        ax = fig.add_subplot()
        x = np.arange(len(layers))
        width = 0.8 / max(1, len(formats))
        for j, fmt in enumerate(formats):
            vals = [max(_num(lay["rel_l2"][j]), 1e-7) for lay in layers]
            ax.bar(x + (j - (len(formats) - 1) / 2) * width, vals, width, label=fmt)
        if chosen:
            for i, lay in enumerate(layers):
                c = chosen.get(lay["layer"])
                if c and c.get("format") in formats:
                    j = formats.index(c["format"])
                    ax.plot(x[i] + (j - (len(formats) - 1) / 2) * width, max(_num(lay["rel_l2"][j]), 1e-7) * 1.5,
                            marker="v", color="black", ms=4)
        ax.set_yscale("log")
        ax.set_xticks(x, [lay["layer"] for lay in layers], rotation=90, fontsize=6)
        ax.set_ylabel("rel. L2 of the output")
        ax.legend(fontsize=8)
        s.plot(fig, f"sensitivity-{len(s.body)}", f"Graph {prof.get('graph')}: the output's error with that one layer "
                                                  "quantized to each format (calibration run)"
                                                  + ("; triangles mark the format chosen" if chosen else ""))
    for graph, mp in mixed:
        layers = mp.get("layers") or []
        if not layers:
            continue
        colors = {4: "#c0392b", 8: "#e69f00", 16: "#56b4e9", 32: "#8a96a3"}
        fig = _fig(10, 3.0)
        ax = fig.add_subplot()
        ax.bar(range(len(layers)), [lay["bits"] for lay in layers],
               color=[colors.get(int(lay["bits"]), "#555") for lay in layers])
        ax.set_xticks(range(len(layers)), [lay["layer"] for lay in layers], rotation=90, fontsize=6)
        ax.set_ylabel("weight bits")
        ax.set_yticks([4, 8, 32])
        frac = mp.get("bytes", 0) / mp["fp32_bytes"] if mp.get("fp32_bytes") else math.nan
        s.plot(fig, f"bits-{len(s.body)}", f"Bits chosen per layer ({mp.get('solver')}, objective "
                                           f"{mp.get('objective')}): weights at {frac:.1%} of fp32")
        rows = [("formats", _counts([lay["format"] for lay in layers])),
                ("weight bytes", f"{mp.get('bytes'):,} of {mp.get('fp32_bytes'):,} fp32"),
                ("predicted rel. L2", mp.get("predicted_rel_l2")),
                ("measured (calibration)", _short_json(mp.get("measured"))),
                ("target", ", ".join(f"{k} {v}" for k, v in mp.get("target", [])) or "none (budget only)"),
                ("target met", mp.get("target_met"))]
        s.add(_table(rows))
    for graph, dp in _of(records, "DynamicPrecisionDecisions"):
        levels = dp.get("levels") or []
        s.add("<h3>Motion-driven precision levels</h3>" + _table(
            [tuple(_short_json(v, 60) for v in lv.values()) for lv in levels],
            tuple(levels[0].keys()) if levels else None)
            + _table([("speed edges", dp.get("edges")), ("dwell", dp.get("dwell")), ("weights", dp.get("weights")),
                      ("quantized weight bytes", f"{dp.get('weight_bytes', 0):,} (fp32 "
                                                 f"{dp.get('float_weight_bytes', 0):,})")]))
    return s


# -- tokens --------------------------------------------------------------------------------------------
def _tokens(records) -> Section:
    s = Section("tokens", "Tokens: importance and attention entropy")
    for graph, prof in _of(records, "TokenImportanceProfile"):
        for g in prof.get("graphs", []):
            sites = [st for st in g.get("sites", []) if st.get("received")]
            if not sites:
                continue
            fig, _ = _heatmap([[_num(v) for v in st["received"]] for st in sites], [st["layer"] for st in sites],
                              cmap="magma", bar="attention received", xlabel="key token")
            s.plot(fig, f"importance-{len(s.body)}", f"Graph {g.get('graph')}: attention each token receives, per "
                                                     f"attention layer, mean over {g.get('calls')} calibration calls")
    for graph, prof in _of(records, "AttentionEntropyProfile"):
        for g in prof.get("graphs", []):
            sites = g.get("sites", [])
            if not any(st.get("head_normalized") for st in sites):
                continue
            fig, _ = _heatmap([[_num(v) for v in st.get("head_normalized", [])] for st in sites],
                              [f"{st['layer']} ({st.get('layer_kind')})" for st in sites], width=6, cmap="coolwarm",
                              bar="entropy / log(keys)", xlabel="head", vmin=0, vmax=1)
            s.plot(fig, f"entropy-{len(s.body)}", f"Graph {g.get('graph')}: normalized attention entropy per head "
                                                  f"(0 = one key, 1 = uniform); local < {prof.get('local_threshold')}"
                                                  f" <= mixed < {prof.get('global_threshold')} <= global")
    for graph, d in _of(records, "TokenPruneDecisions", "TokenMergeDecisions", "TokenReuseDecisions",
                        "AttentionSparsityDecisions", "LayerSkipDecisions", "ActivationSparsityDecisions"):
        s.add(f"<h3>{_esc(d.get('type'))}</h3>" + _kv({k: v for k, v in d.items() if k != "type"}))
    return s


# -- partition -----------------------------------------------------------------------------------------
def _partition(records) -> Section:
    s = Section("partition", "Partition: where the graph is cut")
    for graph, p in _of(records, "PartitionPlan"):
        sweep = p.get("sweep") or []
        if sweep:
            bw = [_num(pt["mbit"]) for pt in sweep]
            fig = _fig(7, 3.4)
            ax = fig.add_subplot()
            ax.plot(bw, [1e3 * _num(pt["latency_s"]) for pt in sweep], "o-", color="#2f7d55", label="chosen cut")
            ax.plot(bw, [1e3 * _num(pt["first_only_s"]) for pt in sweep], "s--", color="#8a96a3",
                    label=f"all on {p.get('first')}")
            ax.plot(bw, [1e3 * _num(pt["second_only_s"]) for pt in sweep], "^--", color="#b3261e",
                    label=f"all on {p.get('second')}")
            for pt in sweep:
                ax.annotate(pt["chosen"], (_num(pt["mbit"]), 1e3 * _num(pt["latency_s"])), fontsize=7,
                            textcoords="offset points", xytext=(3, 5))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("link bandwidth (Mbit/s)")
            ax.set_ylabel("modeled latency per call (ms)")
            ax.legend(fontsize=8)
            s.plot(fig, f"sweep-{len(s.body)}", f"Graph {p.get('graph')}, deployment {p.get('deployment')} over "
                                                f"{p.get('link')} (RTT {_num(p.get('rtt')) * 1e3:.1f} ms): the "
                                                f"cost model's latency of the cut it picks per bandwidth (search "
                                                f"{p.get('search')})")
        rows = [(c.get("label"), c.get("cut"), c.get("position"), c.get("compression"), c.get("bytes"),
                 len(c.get("moved") or [])) for c in p.get("cases", [])]
        s.add("<h3>Cases in the artifact</h3>" + _table(rows, ("case", "cut", "position", "compression",
                                                                 "bytes per call", "moved nodes")))
        if p.get("bands"):
            s.add(_table([("bands (low to high)", ", ".join(p["bands"])),
                          ("edges (Mbit/s)", ", ".join(_fmt(_num(e)) for e in p.get("edges_mbit", []))),
                          ("trigger", p.get("trigger"))]))
    for graph, c in _of(records, "PlacementCost"):
        cuts, devices = c.get("cuts") or [], c.get("devices") or []
        if len(cuts) < 2 or not devices:
            continue
        fig = _fig(9, 3.4)
        ax = fig.add_subplot()
        pos = list(range(len(cuts)))
        ax.bar(pos, [cut.get("nbytes", 0) / 1e3 for cut in cuts], color="#c9d6e6", label="bytes crossing (kB)")
        ax.set_ylabel("kB crossing at the cut")
        ax.set_xticks(pos, [cut["name"] for cut in cuts], rotation=90, fontsize=6)
        ax2 = ax.twinx()
        for d in devices:
            seg = [_num(v) for v in d.get("segment_s", [])]
            before = [1e3 * sum(seg[:k]) for k in range(len(cuts))]
            ax2.plot(pos, before, marker=".", label=f"{d['device']}: time before the cut (ms)")
        ax2.set_ylabel("ms before the cut")
        ax2.legend(fontsize=7, loc="upper center")
        s.plot(fig, f"cuts-{len(s.body)}", f"Graph {c.get('graph')}: per candidate cut, the bytes that cross and "
                                           "each device's time for the part before it (measured segments)")
    return s


# -- searches ------------------------------------------------------------------------------------------
def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both larger-is-better):
    analysis.search.pareto_front, the one the searches use."""
    return pareto_front(points, (True, True))


def _scatter(s: Section, name: str, xs, ys, labels, xlabel: str, ylabel: str, kept: int | None, caption: str,
             logx: bool = False, front: list[int] | None = None) -> None:
    fig = _fig(6.5, 3.8)
    ax = fig.add_subplot()
    ax.scatter(xs, ys, color="#8a96a3", label="tried")
    front = sorted(pareto(list(zip(xs, ys))) if front is None else front, key=lambda i: xs[i])
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "o-", color="#1d4f91", label="Pareto front")
    if kept is not None:
        ax.scatter([xs[kept]], [ys[kept]], s=140, facecolors="none", edgecolors="#b3261e", linewidths=2,
                   label="kept")
    for x, y, lab in zip(xs, ys, labels):
        ax.annotate(lab, (x, y), fontsize=7, textcoords="offset points", xytext=(4, 3))
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    s.plot(fig, name, caption)


def _searches(records, how: Mapping[str, Any] | None = None) -> Section:
    s = Section("searches", "Searches: the points tried")
    if how and how.get("trials_run"):
        s.add("<h3>How the searches ran</h3>" + _kv(how))
    for graph, c in _of(records, "CachePlan"):
        pts = c.get("search") or []
        if not pts:
            continue
        ths, ps, sps = [_num(p[0]) for p in pts], [_num(p[1]) for p in pts], [_num(p[2]) for p in pts]
        if c.get("pareto"):      # a two-objective search: its own front (the same points pareto() finds)
            s.add("<p>Two-objective search: front " + _esc(", ".join(
                f"{_num(p[0]):.4g} ({_num(p[1]):.1f} dB, {_num(p[2]):.2f}x)" for p in c["pareto"])) + "</p>")
        th = c.get("threshold")
        kept = next((i for i, t in enumerate(ths) if th is not None and abs(t - _num(th)) <= 1e-12 * max(1, abs(t))),
                    None)
        _scatter(s, f"cache-{len(s.body)}", sps, ps, [f"{t:.3g}" for t in ths], "FLOPs speedup",
                 "PSNR (dB) vs. the uncached run", kept,
                 f"{c.get('method')}: each threshold tried on the calibration run (label), its speed and fidelity; "
                 f"kept: {_fmt(th)}")
        s.add(_table([(f"{_num(t):.4g}", p, sp) for t, p, sp in zip(ths, ps, sps)],
                     ("threshold", "PSNR (dB)", "FLOPs speedup")))
    for graph, mp in _of(records, "MixedPrecisionPlan"):
        probes = mp.get("probes") or []
        if not probes:
            continue
        metric = ", ".join(k for k, _ in mp.get("target", [])) or "metric"
        fr, nbytes, pred, meas = ([_num(p[i]) for p in probes] for i in range(4))
        fp32 = mp.get("fp32_bytes") or 1
        saved = [1 - b / fp32 for b in nbytes]
        kept = next((i for i, b in enumerate(nbytes) if b == mp.get("bytes")), None)
        larger = metric.split(",")[0].strip() in _FIDELITY
        ys = meas if larger else [-v for v in meas]
        _scatter(s, f"mixed-{len(s.body)}", saved, ys, [f"{f:.2f}" for f in fr], "weight bytes saved (of fp32)",
                 metric if larger else f"-{metric}", kept,
                 f"mixed_precision: each budget probed (label: the budget as a fraction of the {mp.get('objective')} "
                 f"of fp32), the bytes it saves and the measured {metric}; kept: the cheapest that met "
                 f"{', '.join(f'{k} {v}' for k, v in mp.get('target', []))}")
        s.add(_table([(f"{f:.3f}", int(b), p, m) for f, b, p, m in zip(fr, nbytes, pred, meas)],
                     ("budget fraction", "bytes", "predicted rel. L2", f"measured {metric}")))
    for graph, d in _of(records, *_KNOB_SEARCHES):
        _knob_search(s, d)
    for graph, rec in [(g, r) for t, g, r in records if isinstance(r.get("pareto"), list) and r.get("tried")]:
        _generic_search(s, rec)
    return s


#: decisions whose goal search tried one integer knob: record type -> (knob, +1 when a larger knob is
#: faster, -1 when a smaller one is, the knob the pass kept)
_KNOB_SEARCHES = {
    "LayerSkipDecisions": ("blocks skipped", 1, lambda d: len(d.get("blocks", []))),
    "TokenPruneDecisions": ("tokens kept", -1, lambda d: (d.get("graphs") or [{}])[0].get("keep")),
    "AttentionSparsityDecisions": ("heads made local", 1, lambda d: sum(len(x.get("local", []))
                                                                        for x in d.get("sites", []))),
}


def _knob_search(s: Section, d: Mapping[str, Any]) -> None:
    """A pass that searched one integer knob for its goal: the goal's metric per knob tried, the
    front over (speed direction of the knob, metric) and the knob kept."""
    trials = [t for t in d.get("trials") or [] if isinstance(t, (list, tuple)) and len(t) == 2]
    goal = [k for k, _ in d.get("target") or []]
    if not trials or not goal:
        return
    what, faster, kept_of = _KNOB_SEARCHES[d["type"]]
    metric = goal[0]
    xs = [_num(t[0]) for t in trials]
    ys = [_num(dict(t[1]).get(metric)) for t in trials]
    larger = metric in _FIDELITY or metric not in ("rel_l2", "rel_l1", "max_abs")
    front = pareto([(faster * x, y if larger else -y) for x, y in zip(xs, ys)])
    kept = kept_of(d)
    k = next((i for i, x in enumerate(xs) if kept is not None and x == kept), None)
    _scatter(s, f"knob-{len(s.body)}", xs, ys, [str(int(x)) for x in xs], what, metric, k,
             f"{d['type']}: each {what} tried for {', '.join(f'{a} {b}' for a, b in d['target'])} on the calibration "
             f"run; kept: {kept}", front=front)


def _generic_search(s: Section, rec: Mapping[str, Any]) -> None:
    """A record with `tried` points as mappings of metric -> value and a `pareto` list of their indices."""
    tried = [t for t in rec["tried"] if isinstance(t, Mapping)]
    keys = [k for k in (tried[0] if tried else {}) if isinstance(tried[0][k], (int, float))]
    if len(keys) < 2:
        return
    xk, yk = keys[-2], keys[-1]
    _scatter(s, f"search-{len(s.body)}", [_num(t[xk]) for t in tried], [_num(t[yk]) for t in tried],
             [str(i) for i in range(len(tried))], xk, yk, rec.get("chosen") if isinstance(rec.get("chosen"), int)
             else None, f"{rec.get('type')}: every trial of the search")


# -- every record ------------------------------------------------------------------------------------------
def _all_records(records) -> Section:
    s = Section("records", "Records (what the analyses measured and the passes decided)")
    for t, g, r in records:
        text = json.dumps(r, indent=1)
        if len(text) > 60_000:
            text = text[:60_000] + f"\n... ({len(text):,} characters; the whole record is in manifest.json)"
        was = f" (measured before {r['superseded_by']} rewrote the program)" if r.get("superseded_by") else ""
        s.add(f"<details><summary>{_esc(t)}{' @ ' + _esc(g) if g else ''}{_esc(was)} "
              f"<span class='dim'>({len(text):,} chars)</span></summary><pre>{_esc(text)}</pre></details>")
    return s



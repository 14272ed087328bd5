"""The placement benchmark (issue 17): the cut the cost model picks per bandwidth against the
oracle (every cut measured), end to end over an emulated link, a bandwidth trace that changes
mid-episode (the adaptive plan against every fixed cut), RAPID's offload trigger closed loop, and
the cloud half served by Triton under faults.

    pared bench --placement sweep|served|adapt|dads|trigger|faults|plot|all [--workload vla_metaworld|dit_mnist]
        [--episodes 5] [--json benchmarks/results/placement.json]
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/placement.py --part sweep [--workloads vla dit]
        [--mbit 1 5 20 100 1000] [--rounds 15] [--artifact vla=PATH]

The deployment is examples/targets/deploy_emulated.yaml: the cloud is this host's CPU at one
thread (ONNX Runtime), the edge the same CPU made 4x slower (each edge graph call takes 4x as
long: the runtime waits the difference), the link emulated in process (backends/link.
EmulatedLink: RTT 5 ms, the bandwidth of the sweep). Both devices share this host's 2 cores,
one at a time (a call runs its parts in sequence).

Workloads:
  vla  the Meta-World VLA's diffusion policy call as one graph (ViT + 6-block backbone + the 10
       DDIM steps of the action head, unrolled), batch 1: the image (49 KB) in, 8x4 actions out;
       cuts after the ViT, its blocks, each backbone block, its attention and MLP expansion, the
       backbone, and each head step
  dit  dit_mnist's denoiser (one DDIM step, batch 20 = 10 samples x CFG), every cut of the
       default set (after each block, its attention, its MLP expansion)

For each: `partition` with cases: all (every cut, sent as fp32 or fp16, is in the artifact) builds
the artifact; its PlacementCost is measured on this host as the pass does it. Then:
  parts    every graph of the artifact timed alone, alternating rounds, medians (an edge graph:
           the host's time x 4): each case's latency at a bandwidth is its parts' times plus the
           link's transfer times (RTT/2 + bytes / bandwidth, each way): the oracle is the least
  e2e      the cut the model chose at each bandwidth, end to end through the Executor over the
           emulated link (it sleeps the transfers and the edge's slowdown), median of 30 rounds
           after 8 calls of warm-up (the selector's window fills), the three arms alternating in
           rotating order; edge-only and cloud-only the same way (the
           artifact's `first` and `second` cases pinned: Executor(pin=...)); the values crossing
           one way travel as one message (one RTT/2), as the model charges them
  trigger  (--part trigger) RAPID's offload trigger (ir/selectors/offload.py) on the VLA closed
           loop (6 tasks x --episodes) at 20 Mbit/s: one artifact, three arms pinned or not --
           every call on the edge, every call offloaded at the model's cut, offloaded only when
           the trigger fires -- alternating episode by episode (rotating order); success, offload
           share (per task), mean call latency, link bytes, the trigger's cost per decision
  served   (--part served) the VLA's sweep end to end with the cloud half served by Triton (PyTriton
           in .venv-serve) behind the shaped loopback link (backends/link.ShapingProxy, one per
           bandwidth), beside the same artifact (partition's winners) over the in-process emulated
           link and the cost model's latency; 30 calls each after 8 of warm-up, alternating
  dads     (--part dads) DADS against the chain search: per workload two artifacts (partition with
           search: chain, and search: dads -- the DAG min-cut per bandwidth and compression), each
           measuring its own cost model; every graph of both timed in the same alternating rounds;
           per bandwidth each plan's chosen case measured (parts + link)
  adapt    (--part adapt) runtime adaptation closed loop: one artifact planned for 0.2-1000 Mbit/s
           (its cases: the cuts that win somewhere, edge-only among them); the link follows a trace
           (100 -> 3 -> 30 -> 0.2 -> 400 Mbit/s, 20 policy calls each, cycled over each arm's calls,
           so it changes mid-episode); the adaptive plan against each case pinned for the whole run,
           alternating episode by episode; success and mean policy call per arm and per bandwidth
  trace    a bandwidth trace (100 -> 3 -> 30 -> 400 Mbit/s, 40 calls each): total time of the
           adaptive artifact against each of its cases pinned for the whole episode, every arm
           over its own link on the same schedule, the arms alternating call by call
  faults   (--part faults) the VLA's cloud half served by Triton (PyTriton in .venv-serve) behind a
           shaped loopback link (backends/link.ShapingProxy, 100 Mbit/s), an artifact with one case
           (the cut the model picks at 100 Mbit/s); closed-loop Meta-World episodes (6 tasks x
           --episodes) fault-free, then with faults in cycles of 150 policy calls: the link
           blackholed from call 20 to 25 (requests time out after 0.5 s), the server killed at call
           60 and started again at 65 in the background (a cycle whose server is still starting
           skips its faults). Every call must act; success against the fault-free run; fallbacks
           and their latency
Writes benchmarks/results/placement.json (or --json) and, beside the results folder,
placement.png (latency vs bandwidth per cut); keeps the parts of an earlier results file it
does not redo.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch

import pared
from pared.backends.executor import Executor
from pared.backends.link import EmulatedLink
from pared.ir.target import Link, get_deployment

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
DEPLOYMENT = os.path.join(ROOT, "examples", "targets", "deploy_emulated.yaml")
RESULTS = os.path.join(ROOT, "benchmarks", "results", "placement.json")
MBIT = 1e6 / 8
AT = {"vla": ["*", "backbone.vit", "backbone.vit.blocks.*", "backbone.blocks.*", "backbone.blocks.*.attn",
              "backbone.blocks.*.mlp.fc1"],
      "dit": None}
TRACE = [(100, 40), (3, 40), (30, 40), (400, 40)]
E2E_WARMUP, E2E_ROUNDS = 8, 30
SERVED_WARMUP_S = 3.0


def say(*a):
    print(*a, flush=True)


def build(name: str):
    from pared.workloads import get_workload
    if name == "vla":
        wl = get_workload("vla_metaworld", head="diffusion", decoder="unrolled")
    else:
        wl = get_workload("dit_mnist")
    return wl.build(), wl.example_inputs()


def time_graphs(exe: Executor, names: list[str], inputs: dict[str, list], rounds: int) -> dict[str, float]:
    """Median seconds of one call of each graph, alternating rounds in rotating order."""
    return time_calls({n: (exe.graphs[n], inputs[n]) for n in names}, rounds)


def time_calls(calls: dict, rounds: int) -> dict:
    """Median seconds of each `fn(inputs)` of `calls` (key -> (fn, inputs)), alternating rounds in
    rotating order, after a warm-up call each."""
    keys = list(calls)
    times = {k: [] for k in keys}
    for k in keys:
        calls[k][0](calls[k][1])
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            fn, x = calls[k]
            t0 = time.perf_counter()
            fn(x)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def graph_inputs(exe: Executor, pp, xs: list) -> dict[str, list]:
    """The inputs of every graph of a partitioned artifact: `main.whole` and the first parts take
    the program's inputs, the second parts what crosses (the first part's outputs on the program's
    inputs, and inputs crossing as they are)."""
    out: dict[str, list] = {}
    if "main.whole" in exe.graphs:
        out["main.whole"] = xs
    for c in pp.cases:
        if c.label in ("first", "second"):
            continue
        first, second = f"main.{c.label}_first", f"main.{c.label}_second"
        sent = dict(zip([o["name"] for o in exe.manifest["graphs"][first]["outputs"]], exe.graphs[first](xs)))
        sent.update({i["name"]: x for i, x in zip(exe.inputs, xs)})
        out[first] = xs
        out[second] = [np.ascontiguousarray(sent[i["name"]]) for i in exe.manifest["graphs"][second]["inputs"]]
    return out


def case_s(t_graph: dict[str, float], label: str, nbytes: int, out_bytes: int, link: Link, slowdown: float) -> float:
    """A case's latency from its parts timed alone: the edge's part times its slowdown, the
    cloud's, and the link's transfers (what crosses, the outputs back)."""
    if label == "first":
        return t_graph["main.whole"] * slowdown
    if label == "second":
        return t_graph["main.whole"] + link.transfer_s(nbytes) + link.transfer_s(out_bytes)
    return (t_graph[f"main.{label}_first"] * slowdown + t_graph[f"main.{label}_second"]
            + link.transfer_s(nbytes) + link.transfer_s(out_bytes))


def replan(model, inputs, name: str):
    """The cost model measured now, by this code, on the same graph and devices as the artifact's
    (what `partition` would plan with if it were built again here)."""
    from pared.analysis.placement import DEFAULT_AT, placement_cost
    from pared.backends.measure import default_profiler
    from pared.ir.capture import capture
    from pared.ir.transform import PassContext
    t0 = time.perf_counter()
    pc = placement_cost(capture(model, inputs), "main", get_deployment(DEPLOYMENT), ("edge", "cloud"),
                        PassContext(measure=default_profiler()), tuple(AT[name] or DEFAULT_AT), repeats=10,
                        min_time=3.0, compressions=("none", "fp16"))
    say(f"{name}: cost model measured again in {time.perf_counter() - t0:.0f} s: edge call overhead "
        f"{pc.device('edge').overhead_s * 1e6:.0f} us, input fp16 encoder "
        f"{pc.device('edge').input_encode_s.get('fp16', float('nan')) * 1e6:.0f} us")
    return pc


def build_partitioned(model, inputs, label: str, mbit: list[float], calibration=None, **options):
    """An artifact of `model` partitioned for the emulated deployment (the VLA's cuts unless `at` is
    given; fp32 or fp16 across): (its path, its PartitionPlan, build seconds)."""
    opts = {"deployment": DEPLOYMENT, "at": AT["vla"], "mbit": mbit, "compress": ["none", "fp16"], "repeats": 10,
            "min_time": 3.0, **options}
    if opts["at"] is None:
        del opts["at"]
    t0 = time.perf_counter()
    # fp16 across the cut moves the VLA's sampled chunk by ~1% (rel L2) after the head's 10 DDIM steps
    opt = pared.optimize(model, inputs, calibration=calibration, pipeline=[{"partition": opts}],
                         fidelity={"min_cosine": 0.999, "max_rel_l2": 0.02} if calibration else None)
    build_s = time.perf_counter() - t0
    path = os.path.join(tempfile.mkdtemp(prefix=f"pared-{label}-"), "artifact")
    opt.save(path)
    return path, opt.program.records.of("PartitionPlan", "main"), build_s


def run(name: str, mbits: list[float], rounds: int, slowdown: float, rtt: float, artifact: str | None = None,
        again: bool = False) -> dict:
    model, inputs = build(name)
    if artifact is None:
        path, _, build_s = build_partitioned(model, inputs, "placement", mbits, at=AT[name], cases="all")
    else:   # an artifact this script built before (its records hold the cost model and the plan)
        path, build_s = artifact, 0.0
    from pared.backends.artifact import read_manifest, read_records
    records = read_records(path, read_manifest(path))
    pp = records.of("PartitionPlan", "main")
    pc = records.of("PlacementCost", "main")
    pc_now = replan(model, inputs, name) if again else None
    if pc_now is not None and [c.name for c in pc_now.cuts] != [c.name for c in pc.cuts]:
        raise SystemExit(f"{name}: the graph captured now has other cuts than the artifact's; rebuild it")
    say(f"{name}: {len(pc.cuts)} cuts, {len(pp.cases)} cases, built in {build_s:.0f} s; bands {pp.bands} "
        f"edges {[round(e, 2) for e in pp.edges_mbit]} Mbit/s")
    exe = Executor(path, threads=1)
    xs = [np.ascontiguousarray(t.numpy()) for t in inputs]
    inputs_of = graph_inputs(exe, pp, xs)
    names = list(inputs_of)
    say(f"{name}: timing {len(names)} graphs x {rounds} rounds")
    t_graph = time_graphs(exe, names, inputs_of, rounds)
    out_bytes = pc.output_bytes

    index = {c.name: i for i, c in enumerate(pc.cuts)}
    sweep = []
    for p in pp.sweep:
        link = Link("x", bandwidth=p.mbit * MBIT, rtt=rtt)
        measured = {}
        for c in pp.cases:
            measured[c.label] = case_s(t_graph, c.label, c.bytes, out_bytes, link, slowdown)
        oracle = min(measured, key=measured.get)
        chosen = p.chosen
        modeled = p.latency_s
        if pc_now is not None:   # the case the cost model measured now picks among the artifact's
            now = {c.label: pc_now.latency(index[c.cut], "edge", "cloud", link, c.compression) for c in pp.cases
                   if c.cut in index}
            pick = min(now, key=now.get)
            replanned = {"replanned_chosen": pick, "replanned_modeled_ms": now[pick] * 1e3,
                         "replanned_measured_ms": measured[pick] * 1e3,
                         "replanned_over_oracle": measured[pick] / measured[oracle],
                         "replanned_model_error": abs(now[pick] - measured[pick]) / measured[pick]}
            say(f"  {p.mbit:g} Mbit/s: the cost model measured now picks {pick} ({pp.case(pick).cut}) measured "
                f"{measured[pick] * 1e3:.2f} ms, model {now[pick] * 1e3:.2f} ({measured[pick] / measured[oracle]:.3f}x "
                "the oracle)")
        else:
            replanned = {}
        sweep.append({**replanned, "mbit": p.mbit, "chosen": chosen, "chosen_cut": pp.case(chosen).cut,
                      "chosen_bytes": pp.case(chosen).bytes,
                      "modeled_ms": modeled * 1e3, "measured_ms": measured[chosen] * 1e3,
                      "oracle": oracle, "oracle_cut": pp.case(oracle).cut, "oracle_ms": measured[oracle] * 1e3,
                      "chosen_over_oracle": measured[chosen] / measured[oracle],
                      "edge_only_ms": measured["first"] * 1e3, "cloud_only_ms": measured["second"] * 1e3,
                      "speedup_vs_edge": measured["first"] / measured[chosen],
                      "speedup_vs_cloud": measured["second"] / measured[chosen],
                      "model_error": abs(modeled - measured[chosen]) / measured[chosen],
                      "every_case_ms": {lab: round(v * 1e3, 4) for lab, v in measured.items()}})
        say(f"  {p.mbit:g} Mbit/s: chose {chosen} ({pp.case(chosen).cut}) measured {measured[chosen]*1e3:.2f} ms, "
            f"model {modeled*1e3:.2f}; oracle {oracle} {measured[oracle]*1e3:.2f} ms "
            f"({measured[chosen]/measured[oracle]:.3f}x); edge-only {measured['first']*1e3:.2f}, "
            f"cloud-only {measured['second']*1e3:.2f}")
    # end to end through the Executor over the emulated link (sleeping), the selector adapting
    e2e = []
    for p in pp.sweep:
        row = {"mbit": p.mbit}
        arms = {}
        for arm, case in (("adaptive", None), ("edge_only", "first"), ("cloud_only", "second")):
            link = EmulatedLink(Link.mbit("wifi", p.mbit, rtt_ms=rtt * 1e3))
            arms[arm] = Executor(path, threads=1, links={("edge", "cloud"): link}, emulate={"edge": slowdown},
                                 pin={"partition.main": case} if case else None)
            for _ in range(E2E_WARMUP):        # the adaptive arm's window fills
                arms[arm](*xs)
        ts = {arm: [] for arm in arms}
        names = list(arms)
        for r in range(E2E_ROUNDS):            # alternating, in rotating order
            for arm in names[r % 3:] + names[:r % 3]:
                t0 = time.perf_counter()
                arms[arm](*xs)
                ts[arm].append(time.perf_counter() - t0)
        for arm in names:
            row[f"{arm}_ms"] = statistics.median(ts[arm]) * 1e3
        row["adaptive_case"] = arms["adaptive"].trace[-1]
        sweep_row = next(s for s in sweep if s["mbit"] == p.mbit)
        row["parts_estimate_ms"] = sweep_row["measured_ms"]
        e2e.append(row)
        # each Executor holds its ORT sessions (~1 GB for this artifact's 131 graphs) in a reference
        # cycle with its plan runner: collect them before the next arms load
        arms.clear()
        gc.collect()
        say(f"  e2e {p.mbit:g} Mbit/s: adaptive ({row['adaptive_case']}) {row['adaptive_ms']:.2f} ms "
            f"(parts {sweep_row['measured_ms']:.2f}), edge-only {row['edge_only_ms']:.2f}, "
            f"cloud-only {row['cloud_only_ms']:.2f}")
    # a bandwidth trace that changes mid-episode: adaptive against each band's case pinned
    bands = list(pp.bands)
    arms_t = ["adaptive", *bands]
    links = {arm: EmulatedLink(Link.mbit("wifi", TRACE[0][0], rtt_ms=rtt * 1e3)) for arm in arms_t}
    exes = {arm: Executor(path, threads=1, links={("edge", "cloud"): links[arm]}, emulate={"edge": slowdown},
                          pin=None if arm == "adaptive" else {"partition.main": arm}) for arm in arms_t}
    totals = {arm: 0.0 for arm in arms_t}
    chosen: dict[str, list] = {arm: [] for arm in arms_t}
    i = 0
    for mbit, calls in TRACE:               # every arm sees the same schedule, call by call, alternating
        for arm in arms_t:
            links[arm].set_link(Link.mbit("wifi", mbit, rtt_ms=rtt * 1e3))
        for _ in range(calls):
            for arm in arms_t[i % len(arms_t):] + arms_t[:i % len(arms_t)]:
                t0 = time.perf_counter()
                exes[arm](*xs)
                totals[arm] += time.perf_counter() - t0
                chosen[arm].append(exes[arm].trace[-1])
            i += 1
    trace = {arm: {"total_s": totals[arm], "cases": {lab: chosen[arm].count(lab) for lab in dict.fromkeys(chosen[arm])}}
             for arm in arms_t}
    for arm in arms_t:
        say(f"  trace {arm}: {totals[arm]:.3f} s {trace[arm]['cases']}")
    best_fixed = min((a for a in trace if a != "adaptive"), key=lambda a: trace[a]["total_s"])
    with torch.no_grad():
        ref = model(*inputs)
    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    out = exe(*xs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return {"cuts": len(pc.cuts), "cases": len(pp.cases), "build_s": build_s, "bands": list(pp.bands),
            "edges_mbit": list(pp.edges_mbit),
            "cost_model": {"loo_error": pc.loo_error, "fit_device": pc.fit_device,
                           "devices": {d.device: {"whole_ms": (d.whole_s or 0) * 1e3, "sum_error": d.sum_error,
                                                  "overhead_us": d.overhead_s * 1e6,
                                                  "estimate_error": d.estimate_error} for d in pc.devices}},
            **({"replanned_cost_model": {
                "edge_call_overhead_us": pc_now.device("edge").overhead_s * 1e6,
                "edge_input_fp16_encoder_us": pc_now.device("edge").input_encode_s.get("fp16", float("nan")) * 1e6,
                "loo_error": pc_now.loo_error}} if pc_now is not None else {}),
            "sweep": sweep, "e2e": e2e,
            "trace": {"schedule_mbit_calls": TRACE, "arms": trace, "best_fixed": best_fixed,
                      "adaptive_over_best_fixed": trace["adaptive"]["total_s"] / trace[best_fixed]["total_s"]},
            "max_abs_error_vs_eager": float(np.abs(np.asarray(out) - ref.detach().numpy()).max())}


def dads(names: list[str], mbits: list[float], rounds: int, slowdown: float, rtt: float) -> dict:
    """DADS against the chain search: per workload two artifacts built the same way but for
    `search` (chain: cuts in graph order at region boundaries; dads: also the DAG min-cut), each
    measuring its own cost model as a user's build does; every graph of both timed alternating in
    one process; per bandwidth each plan's chosen case measured (its parts plus the link)."""
    out = {}
    for name in names:
        model, inputs = build(name)
        xs = [np.ascontiguousarray(t.numpy()) for t in inputs]
        plans, exes = {}, {}
        for search in ("chain", "dads"):
            path, plans[search], build_s = build_partitioned(model, inputs, f"dads-{search}", mbits, at=AT[name],
                                                             search=search)
            exes[search] = Executor(path, threads=1)
            say(f"{name} {search}: built in {build_s:.0f} s; bands {plans[search].bands}")
        calls = {(s, g): (exes[s].graphs[g], x) for s in plans for g, x in graph_inputs(exes[s], plans[s], xs).items()}
        say(f"{name}: timing {len(calls)} graphs of both artifacts x {rounds} rounds")
        t = time_calls(calls, rounds)
        out_bytes = exes["chain"].records.of("PlacementCost", "main").output_bytes
        rows = []
        for pc_, pd_ in zip(plans["chain"].sweep, plans["dads"].sweep):
            link = Link("x", bandwidth=pc_.mbit * MBIT, rtt=rtt)
            row = {"mbit": pc_.mbit}
            for s, p in (("chain", pc_), ("dads", pd_)):
                c = plans[s].case(p.chosen)
                t_graph = {g: v for (s2, g), v in t.items() if s2 == s}
                row[s] = {"chosen": p.chosen, "cut": c.cut, "moved": len(c.moved), "bytes": c.bytes,
                          "modeled_ms": p.latency_s * 1e3,
                          "measured_ms": case_s(t_graph, p.chosen, c.bytes, out_bytes, link, slowdown) * 1e3}
            row["dads_over_chain"] = row["dads"]["measured_ms"] / row["chain"]["measured_ms"]
            rows.append(row)
            say(f"  {pc_.mbit:g} Mbit/s: chain {row['chain']['chosen']} {row['chain']['measured_ms']:.2f} ms "
                f"(model {row['chain']['modeled_ms']:.2f}); dads {row['dads']['chosen']} ({row['dads']['moved']} "
                f"moved, {row['dads']['bytes']} B) {row['dads']['measured_ms']:.2f} ms (model "
                f"{row['dads']['modeled_ms']:.2f}): {row['dads_over_chain']:.3f}x")
        dag_cases = [c for c in plans["dads"].cases if c.label.startswith("d")]
        out[name] = {"sweep": rows, "dads_cases": [{"label": c.label, "cut": c.cut, "position": c.position,
                                                    "moved": len(c.moved), "bytes": c.bytes} for c in dag_cases]}
        exes.clear()
        gc.collect()
    return out


def served(mbits: list[float], slowdown: float, rtt: float) -> dict:
    """The VLA's sweep end to end with the cloud half served by Triton behind the shaped loopback
    link (backends/link.ShapingProxy), beside the same artifact over the in-process emulated link
    and the cost model: per bandwidth, both arms alternating call by call after a warm-up, medians."""
    from pared.backends.link import ShapingProxy
    from pared.backends.remote import ServerProcess, TritonDevice
    model, inputs = build("vla")
    path, pp, build_s = build_partitioned(model, inputs, "served", mbits)
    xs = [np.ascontiguousarray(t.numpy()) for t in inputs]
    say(f"served: built in {build_s:.0f} s; cases {pp.bands}; starting Triton")
    srv = ServerProcess(path, python=os.path.join(ROOT, ".venv-serve", "bin", "python")).start()
    out = {"build_s": build_s, "bands": list(pp.bands), "edges_mbit": list(pp.edges_mbit), "rows": []}
    try:
        for p in pp.sweep:
            link = Link.mbit("wifi", p.mbit, rtt_ms=rtt * 1e3)
            with ShapingProxy(("127.0.0.1", srv.grpc_port), link) as px:
                dev = TritonDevice(f"{px.address[0]}:{px.address[1]}", timeout=5.0, backoff=1.0)
                arms = {"triton": Executor(path, threads=1, remote={"cloud": dev}, emulate={"edge": slowdown}),
                        "emulated": Executor(path, threads=1, links={("edge", "cloud"): EmulatedLink(link)},
                                             emulate={"edge": slowdown})}
                # warm-up: the selector's window fills (Triton's probes are spaced: at least 3 s of calls)
                t1, n = time.perf_counter(), 0
                while n < E2E_WARMUP or time.perf_counter() - t1 < SERVED_WARMUP_S:
                    for exe in arms.values():
                        exe(*xs)
                    n += 1
                ts = {a: [] for a in arms}
                names = list(arms)
                dev_payload = dev.bytes_sent
                for r in range(E2E_ROUNDS):
                    for a in names[r % 2:] + names[:r % 2]:
                        t1 = time.perf_counter()
                        arms[a](*xs)
                        ts[a].append(time.perf_counter() - t1)
                row = {"mbit": p.mbit, "modeled_case": p.chosen, "modeled_ms": p.latency_s * 1e3,
                       **{f"{a}_ms": statistics.median(v) * 1e3 for a, v in ts.items()},
                       **{f"{a}_case": arms[a].trace[-1] for a in arms},
                       "triton_fallbacks": dev.fallbacks, "triton_calls": dev.calls,
                       "triton_measured_mbit": float(dev.signal()[0]) / MBIT, "triton_fixed_ms": dev.fixed_s * 1e3,
                       "sent_kb_timed_rounds": (dev.bytes_sent - dev_payload) / 1e3}   # payload and probes
                # the model with the deployment's RTT replaced by the fixed part the device measured (RTT
                # plus Triton's own cost per request)
                row["modeled_with_fixed_ms"] = row["modeled_ms"] - rtt * 1e3 + row["triton_fixed_ms"]
                row["triton_over_model"] = row["triton_ms"] / row["modeled_ms"]
                row["triton_over_model_with_fixed"] = row["triton_ms"] / row["modeled_with_fixed_ms"]
                row["triton_over_emulated"] = row["triton_ms"] / row["emulated_ms"]
                out["rows"].append(row)
                say(f"  {p.mbit:g} Mbit/s: Triton ({row['triton_case']}) {row['triton_ms']:.2f} ms, emulated "
                    f"({row['emulated_case']}) {row['emulated_ms']:.2f} ms, model ({p.chosen}) "
                    f"{row['modeled_ms']:.2f} ms; {dev.fallbacks} fallbacks of {dev.calls}; the device measures "
                    f"{row['triton_measured_mbit']:.1f} Mbit/s, fixed part {row['triton_fixed_ms']:.2f} ms")
                dev.close()
                arms.clear()
                gc.collect()
    finally:
        srv.stop()
    return out


CYCLE = 150     # policy calls per fault cycle (faults)


def faults(episodes: int, slowdown: float, rtt: float, mbit: float = 100.0) -> dict:
    """The VLA's cloud half served by Triton (PyTriton, .venv-serve) behind a shaped loopback link;
    closed-loop episodes with the server killed and restarted, and the link blackholed, against the
    same episodes fault-free. The artifact has one case: the cut the model picks at `mbit`."""
    import threading
    from pared.backends.link import ShapingProxy
    from pared.backends.remote import ServerProcess, TritonDevice
    from pared.workloads import get_workload
    wl = get_workload("vla_metaworld", head="diffusion", decoder="unrolled", episodes=episodes)
    model, inputs = wl.build(), wl.example_inputs()
    path, pp, _ = build_partitioned(model, inputs, "faults", [mbit])
    say(f"faults: the artifact's case {pp.bands} ({pp.case(pp.bands[0]).cut}); starting Triton")
    srv = ServerProcess(path, python=os.path.join(ROOT, ".venv-serve", "bin", "python")).start()
    out = {"case": pp.bands[0], "cut": pp.case(pp.bands[0]).cut, "mbit": mbit, "episodes_per_task": episodes}
    try:
        with ShapingProxy(("127.0.0.1", srv.grpc_port), Link.mbit("wifi", mbit, rtt_ms=rtt * 1e3)) as px:
            for arm in ("fault_free", "faults"):
                dev = TritonDevice(f"{px.address[0]}:{px.address[1]}", timeout=0.5, backoff=1.0)
                exe = Executor(path, threads=1, remote={"cloud": dev}, emulate={"edge": slowdown})
                counter = {"calls": 0, "acted": 0, "events": []}
                restarting: list = []

                def fn(*args):
                    n = counter["calls"]
                    counter["calls"] += 1
                    if arm == "faults":
                        # a cycle of CYCLE calls: the link blackholed for 5 calls, then the server killed
                        # mid-episode and started again in the background (Triton takes 10-40 s to come
                        # up: a cycle whose server is still starting skips its faults)
                        up = not restarting or not restarting[-1].is_alive()
                        if n % CYCLE == 20 and up:
                            px.blackhole()
                            counter["events"].append((n, "blackhole"))
                        if n % CYCLE == 25 and px.blackholed:
                            px.heal()
                            counter["events"].append((n, "heal"))
                        if n % CYCLE == 60 and up:             # the server dies mid-episode ...
                            srv.kill()
                            counter["events"].append((n, "kill"))
                        if n % CYCLE == 65 and (srv.proc is None or srv.proc.poll() is not None):
                            t = threading.Thread(target=srv.start, daemon=True)     # ... and is started again
                            t.start()
                            restarting.append(t)
                            counter["events"].append((n, "restart"))
                        if restarting and not restarting[-1].is_alive() and counter["events"][-1][1] == "restart":
                            counter["events"].append((n, "up"))
                    a = exe(*args)
                    counter["acted"] += 1
                    return a
                t0 = time.perf_counter()
                res = wl.run(fn, reset=exe.reset)
                for t in restarting:
                    t.join()
                eps = [e for v in res["episodes"].values() for e in v]
                call_s = [c for e in eps for c in e["call_s"]]
                out[arm] = {"success": float(np.mean([e["success"] for e in eps])),
                            "per_task": {k: float(np.mean([e["success"] for e in v])) for k, v in res["episodes"].items()},
                            "calls": counter["calls"], "acted": counter["acted"],
                            "remote_calls": dev.calls - dev.fallbacks, "fallbacks": dev.fallbacks,
                            "failures": dev.failures,
                            "fallback_ms_median": statistics.median(dev.fallback_s) * 1e3 if dev.fallback_s else None,
                            "fallback_ms_max": max(dev.fallback_s) * 1e3 if dev.fallback_s else None,
                            "call_ms_median": statistics.median(call_s) * 1e3, "wall_s": time.perf_counter() - t0,
                            "events": counter["events"][:40]}
                say(f"  {arm}: success {out[arm]['success']:.3f}, {counter['acted']}/{counter['calls']} calls acted, "
                    f"remote {out[arm]['remote_calls']}, fallbacks {dev.fallbacks} (median "
                    f"{out[arm]['fallback_ms_median']} ms), call median {out[arm]['call_ms_median']:.1f} ms")
                dev.close()
                if srv.proc is None or srv.proc.poll() is not None:
                    srv.start()
    finally:
        srv.stop()
    return out


def closed_loop(wl, arms: list[str], step) -> dict[str, dict[str, list]]:
    """The closed-loop episodes of every arm, alternating: for each task and episode, each arm's
    episode in turn (the order rotating), so the arms share this host's state over the run.
    `step(arm, task_id, episode)` runs one episode; returns arm -> task -> its episodes."""
    T = wl.tasks_module()
    out: dict[str, dict[str, list]] = {arm: {} for arm in arms}
    i = 0
    for name in wl.task_names:
        tid = T.TASK_NAMES.index(name)
        for ep in range(wl.episodes):
            for arm in arms[i % len(arms):] + arms[:i % len(arms)]:
                out[arm].setdefault(name, []).append(step(arm, tid, ep))
            i += 1
    for sim, cam in wl._envs.values():
        cam.close()
    wl._envs = {}
    return out


#: the link's bandwidth in the closed-loop adaptation run (adapt): (Mbit/s, policy calls), cycled over
#: each arm's calls across episodes (an episode is ~16 calls, so most changes fall mid-episode)
ADAPT_TRACE = [(100, 20), (3, 20), (30, 20), (0.2, 20), (400, 20)]
#: the bandwidths the adaptation artifact is planned for (the trace's range; 0.2 Mbit/s: edge-only wins)
ADAPT_MBIT = [0.2, 1, 5, 20, 100, 1000]


def trace_mbit(call: int, trace=ADAPT_TRACE) -> float:
    """The bandwidth of a trace at a call index (the trace cycles)."""
    k = call % sum(n for _, n in trace)
    for mbit, n in trace:
        if k < n:
            return mbit
        k -= n
    raise AssertionError("unreachable")


def adapt(episodes: int, slowdown: float, rtt: float) -> dict:
    """Runtime adaptation closed loop: one artifact planned over ADAPT_MBIT; the link follows
    ADAPT_TRACE call by call (changing mid-episode); the adaptive plan against each of its cases
    pinned for the whole run, every arm over its own link on the same schedule of its own calls,
    the arms alternating episode by episode. Total policy time and success per arm."""
    from pared.workloads import get_workload
    wl = get_workload("vla_metaworld", head="diffusion", decoder="unrolled", episodes=episodes)
    model, inputs = wl.build(), wl.example_inputs()
    calib = [x for seq in wl.calibration_sequences(per_task=3, calls=40) for x in seq]
    path, pp, build_s = build_partitioned(model, inputs, "adapt", ADAPT_MBIT, calibration=calib)
    bands = list(pp.bands)
    say(f"adapt: built in {build_s:.0f} s; cases {bands} (edges {[round(e, 2) for e in pp.edges_mbit]} Mbit/s)")
    names = ["adaptive", *bands]
    arms = {}
    for arm in names:
        link = EmulatedLink(Link.mbit("wifi", trace_mbit(0), rtt_ms=rtt * 1e3))
        arms[arm] = {"exe": Executor(path, threads=1, links={("edge", "cloud"): link}, emulate={"edge": slowdown},
                                     pin=None if arm == "adaptive" else {"partition.main": arm}),
                     "link": link, "calls": 0, "by_mbit": {}}

    def step(arm, tid, ep):
        a = arms[arm]

        def fn(*args):
            mbit = trace_mbit(a["calls"])
            a["link"].set_link(Link.mbit("wifi", mbit, rtt_ms=rtt * 1e3))
            t0 = time.perf_counter()
            y = a["exe"](*args)
            dt = time.perf_counter() - t0
            a["calls"] += 1
            d = a["by_mbit"].setdefault(str(mbit), {"calls": 0, "s": 0.0, "cases": {}})
            d["calls"] += 1
            d["s"] += dt
            lab = a["exe"].trace[-1]
            d["cases"][lab] = d["cases"].get(lab, 0) + 1
            return y
        return wl.episode(fn, tid, ep, a["exe"].reset)
    t0 = time.perf_counter()
    per_episode = closed_loop(wl, names, step)
    out = {"trace_mbit_calls": ADAPT_TRACE, "planned_mbit": ADAPT_MBIT, "bands": bands,
           "edges_mbit": list(pp.edges_mbit), "cuts": {b: pp.case(b).cut for b in bands}, "build_s": build_s,
           "episodes_per_task": episodes, "wall_s": time.perf_counter() - t0, "arms": {}}
    for arm in names:
        eps = [e for v in per_episode[arm].values() for e in v]
        calls_s = [c for e in eps for c in e["call_s"]]
        out["arms"][arm] = {
            "success": float(np.mean([e["success"] for e in eps])),
            "per_task": {k: float(np.mean([e["success"] for e in v])) for k, v in per_episode[arm].items()},
            "calls": len(calls_s), "policy_s": float(sum(calls_s)), "call_ms_mean": 1e3 * float(np.mean(calls_s)),
            "by_mbit": {k: {"calls": v["calls"], "call_ms_mean": 1e3 * v["s"] / v["calls"], "cases": v["cases"]}
                        for k, v in arms[arm]["by_mbit"].items()}}
        r = out["arms"][arm]
        say(f"  {arm}: success {r['success']:.3f}, {r['calls']} calls, policy time {r['policy_s']:.2f} s "
            f"(mean call {r['call_ms_mean']:.1f} ms); per bandwidth "
            + ", ".join(f"{k}: {v['call_ms_mean']:.1f} ms {v['cases']}" for k, v in r["by_mbit"].items()))
    fixed = [a for a in names if a != "adaptive"]
    # compare per call: an arm whose episodes ran longer made more calls
    best = min(fixed, key=lambda a: out["arms"][a]["call_ms_mean"])
    out["best_fixed"] = best
    out["adaptive_over_best_fixed"] = out["arms"]["adaptive"]["call_ms_mean"] / out["arms"][best]["call_ms_mean"]
    out["adaptive_policy_s_over_best_fixed"] = out["arms"]["adaptive"]["policy_s"] / out["arms"][best]["policy_s"]
    say(f"  adapt: adaptive {out['adaptive_over_best_fixed']:.3f}x the best fixed case ({best}) per call")
    return out


#: RAPID's trigger on the Meta-World state (39-D, normalized): the hand's position (0-2) against its copy
#: one tick earlier (18-20); effort-like values, which Meta-World has no torques for: the gripper
#: opening (3) and the first object's position (4-6) against their copies one tick earlier (21-24)
TRIGGER = {"input": "state", "position": [0, 1, 2], "previous": [18, 19, 20], "effort": [3, 4, 5, 6],
           "effort_previous": [21, 22, 23, 24], "window": 16, "smooth": 3, "threshold": 2.0, "hold": 2}


def trigger(episodes: int, slowdown: float, rtt: float, mbit: float = 20.0) -> dict:
    """RAPID's offload trigger on the VLA, closed loop: one artifact (partition at `mbit` with the
    trigger), three arms over the same emulated link and episodes: every call on the edge, every
    call offloaded (the partition's cut), and offloaded only when the trigger fires."""
    from pared.ir.selectors.offload import Offload
    from pared.workloads import get_workload
    wl = get_workload("vla_metaworld", head="diffusion", decoder="unrolled", episodes=episodes)
    model, inputs = wl.build(), wl.example_inputs()
    calib = [x for seq in wl.calibration_sequences(per_task=3, calls=40) for x in seq]
    path, pp, build_s = build_partitioned(model, inputs, "trigger", [mbit], calibration=calib, trigger=TRIGGER)
    say(f"trigger: built in {build_s:.0f} s; offload case {pp.bands} ({pp.case(pp.bands[0]).cut}); the trigger "
        f"offloads {pp.trigger_calibration_share:.2f} of {len(calib)} calibration calls")
    out = {"mbit": mbit, "case": pp.bands[0], "cut": pp.case(pp.bands[0]).cut, "trigger": TRIGGER,
           "calibration_calls": len(calib), "calibration_offload_share": pp.trigger_calibration_share,
           "episodes_per_task": episodes, "build_s": build_s, "arms": {}}
    pins = {"edge_only": {"partition.main.trigger": "edge"}, "always_offload": {"partition.main.trigger": "offload"},
            "trigger": None}
    arms = {}
    for arm, pin in pins.items():
        link = EmulatedLink(Link.mbit("wifi", mbit, rtt_ms=rtt * 1e3))
        arms[arm] = {"exe": Executor(path, threads=1, links={("edge", "cloud"): link}, emulate={"edge": slowdown},
                                     pin=pin), "link": link, "labels": [], "episodes": {}}

    def step(arm, tid, ep):
        a = arms[arm]
        start = len(a["labels"])

        def fn(*args):
            y = a["exe"](*args)
            a["labels"].append(a["exe"].trace[-1])
            return y
        e = wl.episode(fn, tid, ep, a["exe"].reset)
        e["labels"] = a["labels"][start:]
        return e
    per_episode = closed_loop(wl, list(pins), step)
    for arm in pins:
        eps_by_task = per_episode[arm]
        labels = arms[arm]["labels"]
        link = arms[arm]["link"]
        calls_s = [c for eps in eps_by_task.values() for e in eps for c in e["call_s"]]
        per_task = {k: float(np.mean([e["success"] for e in eps])) for k, eps in eps_by_task.items()}
        offloaded_by_task = {k: sum(lab != "edge" for e in eps for lab in e["labels"])
                             / max(1, sum(len(e["labels"]) for e in eps)) for k, eps in eps_by_task.items()}
        n = len(labels)
        off = sum(lab != "edge" for lab in labels)
        out["arms"][arm] = {
            "success": float(np.mean(list(per_task.values()))), "per_task": per_task, "calls": n,
            "offload_share": off / n, "offload_share_by_task": offloaded_by_task,
            "policy_s": float(sum(calls_s)), "call_ms_mean": 1e3 * float(np.mean(calls_s)),
            "call_ms_median": 1e3 * statistics.median(calls_s), "link_bytes": link.bytes_sent,
            "probe_bytes": link.probe_bytes_sent, "link_messages": link.transfers}
        r = out["arms"][arm]
        say(f"  {arm}: success {r['success']:.3f}, {n} calls, offloaded {r['offload_share']:.2f}, policy time "
            f"{r['policy_s']:.1f} s (mean call {r['call_ms_mean']:.1f} ms), link {r['link_bytes'] / 1e6:.2f} MB")
    a = out["arms"]
    out["speedup_vs_edge_only"] = a["edge_only"]["call_ms_mean"] / a["trigger"]["call_ms_mean"]
    out["always_offload_speedup_vs_edge_only"] = a["edge_only"]["call_ms_mean"] / a["always_offload"]["call_ms_mean"]
    out["link_bytes_vs_always_offload"] = a["trigger"]["link_bytes"] / max(1, a["always_offload"]["link_bytes"])
    # the trigger's own cost: its score per call, over the calibration states, against a call
    sel = Offload("in:state", ("edge", "offload"), **{k: tuple(v) if isinstance(v, list) else v
                                                       for k, v in TRIGGER.items() if k != "input"})
    states = [x[2].numpy()[0] for x in calib]
    t0 = time.perf_counter()
    for _ in range(5):
        sel.scores_over(states)
    per = (time.perf_counter() - t0) / (5 * len(states))
    out["trigger_us_per_call"] = per * 1e6
    out["trigger_overhead_vs_edge_call"] = per / (a["edge_only"]["call_ms_mean"] / 1e3)
    say(f"  trigger: {out['speedup_vs_edge_only']:.2f}x vs edge-only (always offload "
        f"{out['always_offload_speedup_vs_edge_only']:.2f}x), link bytes {out['link_bytes_vs_always_offload']:.2f} "
        f"of always offloading, {per * 1e6:.0f} us per decision")
    return out


def plot(results: dict, path: str) -> None:
    """Latency vs bandwidth per case (measured parts + link), the chosen case marked, per workload."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n in ("vla", "dit") if n in results]
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        sweep = results[name]["sweep"]
        mbits = [p["mbit"] for p in sweep]
        labels = list(sweep[0]["every_case_ms"])
        for lab in labels:
            ys = [p["every_case_ms"][lab] for p in sweep]
            strong = lab in ("first", "second") or any(p["chosen"] == lab for p in sweep)
            ax.plot(mbits, ys, lw=1.6 if strong else 0.5, alpha=1.0 if strong else 0.35,
                    label=lab if strong else None)
        ax.plot(mbits, [p["measured_ms"] for p in sweep], "ko", ms=6, label="chosen (model)")
        ax.plot(mbits, [p["oracle_ms"] for p in sweep], "r+", ms=10, label="oracle (measured)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link bandwidth (Mbit/s)")
        ax.set_ylabel("latency per call (ms)")
        ax.set_title(f"{name}: every cut (thin), edge-only / cloud-only / chosen (thick)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PARTS = ("all", "sweep", "served", "adapt", "dads", "faults", "trigger", "plot")


def main(argv: list[str] | None = None) -> dict:
    """Run the parts asked for (argv as on the command line); returns the results written."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ap = argparse.ArgumentParser(prog="placement", description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=["vla", "dit"], choices=["vla", "dit"])
    ap.add_argument("--mbit", nargs="+", type=float, default=[1, 5, 20, 100, 1000])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--part", choices=PARTS, default="all",
                    help="sweep: the bandwidth sweep, e2e and trace per workload; faults: the VLA served by Triton "
                         "with the server killed and the link blackholed, closed loop; trigger: RAPID's offload "
                         "trigger closed loop against edge-only and always offloading; plot: only redraw the plot")
    ap.add_argument("--episodes", type=int, default=5, help="faults, trigger: closed-loop episodes per task and arm")
    ap.add_argument("--artifact", action="append", default=[], metavar="NAME=PATH",
                    help="sweep: time an artifact this script built before instead of building it again")
    ap.add_argument("--replan", action="store_true",
                    help="sweep with --artifact: also measure the cost model again with this code and report the "
                         "case it would pick per bandwidth against the oracle")
    ap.add_argument("--json", default=RESULTS, help="the results file (default benchmarks/results/placement.json)")
    args = ap.parse_args(argv)
    out_json = os.path.abspath(args.json)
    torch.set_num_threads(1)
    dep = get_deployment(DEPLOYMENT)
    slowdown = dep.slowdown("edge")
    rtt = dep.link("edge", "cloud").rtt
    results = {"about": {"what": "edge/cloud partition: the model's cut per bandwidth vs the oracle, end to end "
                                 "over an emulated link, a bandwidth trace, the offload trigger, faults",
                         "deployment": os.path.relpath(DEPLOYMENT, ROOT), "edge_slowdown": slowdown,
                         "rtt_s": rtt, "threads": 1, "host_cpus": os.cpu_count(),
                         "date": time.strftime("%Y-%m-%d")}}
    if os.path.exists(out_json):
        with open(out_json) as f:
            old = json.load(f)
        if args.part == "plot":
            results = old
        redo = [*(args.workloads if args.part in ("all", "sweep") else []),
                *(["faults"] if args.part in ("all", "faults") else []),
                *(["trigger"] if args.part in ("all", "trigger") else []),
                *(["adapt"] if args.part in ("all", "adapt") else []),
                *(["dads"] if args.part in ("all", "dads") else []),
                *(["served"] if args.part in ("all", "served") else [])]
        results.update({k: v for k, v in old.items() if k not in ("about", *redo)})

    def write():
        os.makedirs(os.path.dirname(out_json), exist_ok=True)
        tmp = out_json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, out_json)
    if args.part in ("all", "sweep"):
        for name in args.workloads:
            given = dict(a.split("=", 1) for a in args.artifact)
            results[name] = run(name, args.mbit, args.rounds, slowdown, rtt, given.get(name), args.replan)
            write()
    if args.part in ("all", "served"):
        results["served"] = served(args.mbit, slowdown, rtt)
        write()
    if args.part in ("all", "dads"):
        results["dads"] = dads(args.workloads, args.mbit, args.rounds, slowdown, rtt)
        write()
    if args.part in ("all", "adapt"):
        results["adapt"] = adapt(args.episodes, slowdown, rtt)
        write()
    if args.part in ("all", "trigger"):
        results["trigger"] = trigger(args.episodes, slowdown, rtt)
        write()
    if args.part in ("all", "faults"):
        results["faults"] = faults(args.episodes, slowdown, rtt)
        write()
    if any(n in results for n in ("vla", "dit")):
        plot(results, os.path.join(os.path.dirname(os.path.dirname(out_json)), "placement.png"))
    for line in summary(results):
        say(line)
    say(f"wrote {out_json}")
    return results


def summary(results: dict) -> list[str]:
    """The headline figures of a results file, a line each."""
    lines = []
    for name in ("vla", "dit"):
        r = results.get(name)
        if not r:
            continue
        lines.append(f"{name}: {r['cuts']} cuts, bands {r['bands']} (edges {[round(e, 2) for e in r['edges_mbit']]} "
                     "Mbit/s)")
        e2e = {row["mbit"]: row for row in r.get("e2e", [])}
        for p in r["sweep"]:
            row = e2e.get(p["mbit"], {})
            lines.append(f"  {p['mbit']:g} Mbit/s: {p['chosen']} ({p['chosen_cut']}) {p['measured_ms']:.1f} ms, "
                         f"oracle {p['oracle_ms']:.1f} ms ({p['chosen_over_oracle']:.3f}x), "
                         f"{p['speedup_vs_edge']:.2f}x vs edge, {p['speedup_vs_cloud']:.2f}x vs cloud"
                         + (f"; measured again, the model picks {p['replanned_chosen']} "
                            f"({p['replanned_over_oracle']:.3f}x)" if "replanned_chosen" in p else "")
                         + (f"; end to end {row['adaptive_ms']:.1f} ms vs edge-only {row['edge_only_ms']:.1f}, "
                            f"cloud-only {row['cloud_only_ms']:.1f}" if row else ""))
        t = r.get("trace")
        if t:
            lines.append(f"  trace: adaptive {t['arms']['adaptive']['total_s']:.2f} s, best fixed {t['best_fixed']} "
                         f"{t['arms'][t['best_fixed']]['total_s']:.2f} s ({t['adaptive_over_best_fixed']:.3f}x)")
    t = results.get("trigger")
    if t:
        a = t["arms"]
        lines.append(f"trigger at {t['mbit']:g} Mbit/s: offloads {a['trigger']['offload_share']:.2f} of calls, "
                     f"{t['speedup_vs_edge_only']:.2f}x vs edge-only (always offloading "
                     f"{t['always_offload_speedup_vs_edge_only']:.2f}x), link bytes "
                     f"{t['link_bytes_vs_always_offload']:.2f} of always offloading; success "
                     + ", ".join(f"{k} {v['success']:.3f}" for k, v in a.items()))
    sv = results.get("served")
    if sv:
        lines.append("served by Triton over the shaped link: " + "; ".join(
            f"{row['mbit']:g} Mbit/s {row['triton_case']} {row['triton_ms']:.1f} ms (emulated {row['emulated_ms']:.1f}, "
            f"model {row['modeled_ms']:.1f}, with the measured fixed part {row.get('modeled_with_fixed_ms', 0):.1f})"
            for row in sv["rows"]))
    for name, r in (results.get("dads") or {}).items():
        lines.append(f"dads on {name}: " + "; ".join(
            f"{row['mbit']:g} Mbit/s {row['dads']['chosen']} {row['dads']['measured_ms']:.1f} ms vs chain "
            f"{row['chain']['chosen']} {row['chain']['measured_ms']:.1f} ms ({row['dads_over_chain']:.3f}x)"
            for row in r["sweep"]))
    a = results.get("adapt")
    if a:
        lines.append(f"adapt (closed loop, trace {a['trace_mbit_calls']}): adaptive "
                     f"{a['arms']['adaptive']['call_ms_mean']:.1f} ms per call, success "
                     f"{a['arms']['adaptive']['success']:.3f}; best fixed {a['best_fixed']} "
                     f"{a['arms'][a['best_fixed']]['call_ms_mean']:.1f} ms ({a['adaptive_over_best_fixed']:.3f}x); "
                     + ", ".join(f"{k} {v['success']:.3f}" for k, v in a["arms"].items() if k != "adaptive"))
    f = results.get("faults")
    if f:
        lines.append(f"faults: {f['faults']['acted']}/{f['faults']['calls']} calls acted, success "
                     f"{f['faults']['success']:.3f} (fault-free {f['fault_free']['success']:.3f}), "
                     f"{f['faults']['fallbacks']} fallbacks, median fallback {f['faults']['fallback_ms_median']} ms")
    return lines


if __name__ == "__main__":
    main()

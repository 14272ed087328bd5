"""`partition`: split a graph between two devices at the cut that minimizes end-to-end
latency for the link's bandwidth, and choose the cut per call by the measured bandwidth
(Neurosurgeon's split search, "Neurosurgeon", Kang et al., ASPLOS 2017; RoboECC's
network-aware adjustment, arXiv 2603.20711).

The cost model (analysis/placement.py) gives, for every candidate cut of the graph
(ir/cuts.py: region boundaries, inside blocks too), the time of the part before it on
the first device, of the part after it on the second, and the bytes crossing it. For
each bandwidth of a sweep (the link's RTT kept) the pass finds the (cut, compression)
pair of least modeled latency:

    T(cut, c) = first(cut) + transfer(bytes_c(cut)) + second(cut) + transfer(outputs)

over the cuts and the allowed compressions of the crossing values (none; fp16; int8
with a per-tensor scale: lossy, so not allowed unless listed). `output` (everything on
the first device) and `input` (everything on the second: the inputs cross) are cuts
like the others. The winners over the sweep are the eligible cases; the weights of the
layers between them are on both sides (the first device holds every prefix, the second
every suffix: RoboECC's parameter-sharing pool), so switching moves no weights.

The graph G becomes a variant pair per interior case, `G.k<pos>[_fp16|_int8]_first` and
`..._second` (the cut after `pos` compute nodes), plus `G.whole` (the `output` case and,
on the second device, the `input` case); each Call of G becomes a `Select` with the
`bandwidth` selector (ir/selectors/bandwidth.py) over the cases, each a Seq of
`Call(first part, device=first)`, a `Transfer` per crossing value, `Call(second part,
device=second)` and a `Transfer` of each output back. The selector's band edges are
the crossover bandwidths between neighbouring winners (where the model's latencies of
the two are equal).

Option `trigger` adds RAPID's decision of *when* to offload (arXiv 2603.07949): an
`offload` select (ir/selectors/offload.py) in front of the bandwidth select, whose `edge`
case runs the whole graph on the first device and whose `offload` case is the bandwidth
select. It scores each call's robot state (the program input `trigger.input`): the
end-effector's acceleration and the change of effort-like values (torques, or contact
proxies), each against its own sliding window, weighted by a softmax of the two; a call
above `threshold` (or, with `share`, the threshold that offloads that share of the
calibration stream, read in order as one episode) and the `hold` calls after it are
offloaded, smooth calls stay on the edge. The record gives the threshold and the share of
the calibration calls it offloads.

The cost model is measured unless the program already holds a PlacementCost of the graph for
the same cuts and devices (from a `placement_cost` analysis earlier in the pipeline, or
`analysis.placement.modeled_cost`); a graph that runs fastest on the first device alone at
every bandwidth of the sweep is left as it is.

Records: PlacementCost (the model) and PartitionPlan (the sweep: per bandwidth the
chosen case, its modeled latency, first-only, second-only, and the best over every cut).

The record keeps each device's target (`device_targets`): the lowering builds every graph for
the targets of the devices the Plan runs it on (backends/lower.py).

Option `search: dads` adds DADS (Hu et al., INFOCOM 2019; analysis/dads.py): for each
bandwidth of the sweep and each allowed compression, the minimum s-t cut of the graph's DAG
with the cost model's per-node times, a set of nodes to run first that need not be a prefix
(its case `d<position>[m<digest>]`, split by ir/cuts.first_set); it competes with the chain's
cuts by modeled latency. One graph is partitioned; other graphs of the program run on the
first device.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from pared.analysis.placement import DEFAULT_AT, PlacementCost, cut_features, placement_cost
from pared.ir import cuts as _cuts
from pared.ir.errors import OptionError, PassError, PlanError, TargetError
from pared.ir.plan import Call, Node, Select, Seq, Transfer
from pared.ir.records import plain
from pared.ir.program import Graph, Program
from pared.ir.selectors.bandwidth import FALLS, Bandwidth
from pared.ir.selectors.offload import Offload, calibrated_threshold
from pared.ir.target import Deployment, Link, get_deployment
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, Record, RewritePass, check_range, register_pass

MBIT = 1e6 / 8
#: how the cuts are searched: in graph order at region boundaries, or also by a DAG min-cut (DADS)
SEARCHES = ("chain", "dads")


@dataclass(frozen=True)
class PartitionCase:
    label: str               # the select's case label: "whole", "cloud" style names below
    cut: str                 # the cut's name (ir/cuts.py)
    position: int
    compression: str         # none | fp16 | int8
    bytes: int               # crossing per call (with compression)
    moved: tuple[str, ...] = ()   # a DAG cut (search: dads): the nodes where its first side differs from
    #                               the first `position` compute nodes (ir/cuts.first_set)


@dataclass(frozen=True)
class SweepPoint:
    mbit: float
    chosen: str              # the case label of least modeled latency
    latency_s: float         # its modeled latency
    first_only_s: float      # everything on the first device
    second_only_s: float     # everything on the second (inputs and outputs cross)


@dataclass(frozen=True)
class PartitionPlan(Record):
    graph: str
    first: str               # device names in the Deployment
    second: str
    deployment: str
    link: str
    rtt: float
    cases: tuple[PartitionCase, ...]   # the cases in the artifact: the selector's, lowest bandwidth first, then
    #                                    (option cases: all) every other cut
    bands: tuple[str, ...]             # the selector's cases, lowest bandwidth first
    edges_mbit: tuple[float, ...]      # band edges between them (len(bands) - 1)
    sweep: tuple[SweepPoint, ...]
    window: int
    hysteresis: float
    trigger: str | None = None               # the offload trigger's state input (option trigger), or None
    trigger_threshold: float | None = None   # its score threshold (given, or calibrated to `share`)
    trigger_calibration_share: float | None = None   # share of calibration calls it offloads (hold included)
    # device -> its target's JSON (the deployment's): the lowering builds each graph for the devices
    # that run it (backends.lower.device_targets)
    device_targets: dict = dataclasses.field(default_factory=dict)
    search: str = "chain"    # chain: cuts in graph order at region boundaries; dads: also a DAG min-cut per
    #                          bandwidth and compression

    def case(self, label: str) -> PartitionCase:
        for c in self.cases:
            if c.label == label:
                return c
        raise KeyError(label)


def _label(cut: _cuts.Cut, compression: str, last: int) -> str:
    if cut.position == last:
        return "first"
    if cut.position == 0:
        return "second" if compression == "none" else f"second_{compression}"
    return f"k{cut.position}" + ("" if compression == "none" else f"_{compression}")


@register_pass("partition")
class Partition(RewritePass):
    """Edge/cloud cuts chosen per bandwidth (see module docstring)."""

    path_options = ("deployment",)

    @dataclass(frozen=True, kw_only=True)
    class Options:
        deployment: str | dict | None = None         # a deployment YAML file (or mapping): devices and links
        first: str = "edge"                          # the device that runs the graph's start
        second: str = "cloud"                        # the device the rest may go to
        graph: str | None = None                     # the graph to split (default: the one the plan calls)
        at: tuple[str, ...] = DEFAULT_AT             # region patterns to cut after (ir/cuts.py)
        cases: str = "winners"                       # winners: the sweep's best cuts; all: every cut (runtime choice,
        #                                              and what a benchmark's oracle measures)
        compress: tuple[str, ...] = ("none", "fp16")  # how the crossing values may travel (int8 is lossy)
        mbit: tuple[float, ...] = (1, 5, 20, 100, 1000)   # the bandwidth sweep (Mbit/s) the cases come from
        window: int = 5                              # measurements averaged to predict the bandwidth
        hysteresis: float = 0.1                      # band margin before the cut moves (fraction)
        fall: str = "immediate"                      # a measured drop moves the cut at once; average: the mean only
        repeats: int = 10                            # timing rounds of the cost model
        min_time: float = 2.0                        # ... and at least this long (s)
        search: str = "chain"                        # chain: the candidate cuts in graph order; dads: also the DAG
        #                                              min-cut (analysis/dads.py) per bandwidth and compression
        trigger: dict | None = None                  # offload only on anomalous steps (RAPID): input (the state
        #                                              input, default "state"), position, previous, effort,
        #                                              effort_previous, window, smooth, threshold | share, hold,
        #                                              warmup (ir/selectors/offload.py)

        def __post_init__(self):
            if self.deployment is None:
                raise OptionError("pass 'partition': option 'deployment' is required: a deployment file naming "
                                  "the devices and the link between them (examples/targets/*.yaml)")
            for name in ("at", "compress", "mbit"):
                v = getattr(self, name)
                object.__setattr__(self, name, (v,) if isinstance(v, (str, int, float)) else tuple(v))
            bad = [c for c in self.compress if c not in _cuts.COMPRESSION]
            if bad or not self.compress:
                raise OptionError(f"pass 'partition': option 'compress' takes {list(_cuts.COMPRESSION)}, "
                                  f"got {list(self.compress)}")
            if not self.mbit or any(isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m)
                                    or m <= 0 for m in self.mbit):
                raise OptionError(f"pass 'partition': option 'mbit' must be bandwidths > 0 in Mbit/s, "
                                  f"got {list(self.mbit)}")
            object.__setattr__(self, "mbit", tuple(sorted(set(float(m) for m in self.mbit))))
            if self.first == self.second:
                raise OptionError(f"pass 'partition': options 'first' and 'second' name the same device "
                                  f"{self.first!r}")
            if self.search not in SEARCHES:
                raise OptionError(f"pass 'partition': option 'search' must be one of {list(SEARCHES)}, "
                                  f"got {self.search!r}")
            if self.cases not in ("winners", "all"):
                raise OptionError(f"pass 'partition': option 'cases' must be 'winners' or 'all', got {self.cases!r}")
            check_range("partition", "window", self.window, lo=1)
            check_range("partition", "hysteresis", self.hysteresis, lo=0.0, hi=0.99)
            if self.fall not in FALLS:
                raise OptionError(f"pass 'partition': option 'fall' must be one of {list(FALLS)}, got {self.fall!r}")
            check_range("partition", "repeats", self.repeats, lo=3)
            check_range("partition", "min_time", self.min_time, lo=0.0, hi=600.0)
            if self.trigger is not None:
                self.offload_selector(2.0)      # validates the fields

        def offload_selector(self, threshold: float | None = None) -> Offload:
            """The trigger's selector (`threshold` overrides the option's)."""
            t = self.trigger
            if not isinstance(t, Mapping):
                raise OptionError(f"pass 'partition': option 'trigger' is a mapping (input, position, previous, "
                                  f"effort, effort_previous, window, smooth, threshold or share, hold, warmup), "
                                  f"got {t!r}")
            known = {f.name for f in dataclasses.fields(Offload)} - {"cases"} | {"share"}
            bad = sorted(set(t) - known)
            if bad:
                raise OptionError(f"pass 'partition': option 'trigger' has unknown key(s) {bad}; known: {sorted(known)}")
            if "threshold" in t and "share" in t:
                raise OptionError("pass 'partition': option 'trigger' takes a threshold or a share to calibrate "
                                  "one from, not both")
            if "share" in t:
                sh = t["share"]
                if isinstance(sh, bool) or not isinstance(sh, (int, float)) or not 0 < sh < 1:
                    raise OptionError(f"pass 'partition': option 'trigger.share' must be in (0, 1), got {sh!r}")
            if "position" not in t:
                raise OptionError("pass 'partition': option 'trigger' needs 'position': the state indices of the "
                                  "end-effector position")
            kw = {k: v for k, v in t.items() if k not in ("input", "share", "threshold")}
            for k in ("position", "previous", "effort", "effort_previous"):
                if k in kw:
                    kw[k] = (kw[k],) if isinstance(kw[k], int) else tuple(kw[k])
            thr = threshold if threshold is not None else t.get("threshold", 2.0)
            try:
                return Offload("in:" + str(t.get("input", "state")), ("edge", "offload"), threshold=thr, **kw)
            except (PlanError, TypeError) as e:
                raise OptionError(f"pass 'partition' option 'trigger': {e}") from None

    def deployment(self) -> Deployment:
        o = self.options
        try:
            dep = get_deployment(o.deployment)
            dep.device(o.first)
            dep.device(o.second)
            dep.link(o.first, o.second)
        except TargetError as e:
            raise OptionError(f"pass 'partition' option 'deployment': {e}") from None
        return dep

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        o = self.options
        dep = self.deployment()
        called = program.called_graphs()
        if any(program.graphs[n].made_by(self.name) for n in called):
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"cases": 0})
        gname = o.graph
        if gname is None:
            if len(called) != 1:
                raise OptionError(f"pass 'partition': the program calls {len(called)} graphs {called}; "
                                  "name the one to split with option 'graph'")
            gname = called[0]
        if gname not in called:
            raise OptionError(f"pass 'partition' option 'graph': the plan does not call {gname!r}; it calls {called}")
        for c in program.plan.calls():
            if c.graph == gname and any(r.startswith("state:") for r in (*c.inputs, *c.outputs)):
                raise PassError(f"pass 'partition': graph {gname!r} reads or writes carried state; splitting a "
                                "graph with state across devices is not supported yet (partition before the "
                                "pass that added the state)")
        cost = self._cost(program, gname, dep, ctx)
        link = dep.link(o.first, o.second)
        cands = [c.cut() for c in cost.cuts]
        last = cands[-1].position
        # every option: label -> (its latency over a link, where it cuts: (cut name, position, moved,
        # compression, bytes))
        lat_of: dict[str, object] = {}
        where: dict[str, tuple] = {}
        for k, c in enumerate(cands):
            comps = ["none"] if c.position == last or c.float_bytes == 0 else list(o.compress)
            for comp in comps:
                lab = _label(c, comp, last)
                lat_of[lab] = (lambda lk, k=k, comp=comp: cost.latency(k, o.first, o.second, lk, comp))
                where[lab] = (c.name, c.position, (), comp, c.bytes_as(comp) if k < len(cands) - 1 else 0)
        if o.search == "dads":
            self._dads(program, gname, cost, link, lat_of, where, {c.position for c in cands}, ctx)
        sweep = []
        for mb in o.mbit:
            lk = Link("sweep", bandwidth=mb * MBIT, rtt=link.rtt)
            lat = {lab: f(lk) for lab, f in lat_of.items()}
            best = min(lat, key=lambda lab: (lat[lab], lab))
            sweep.append(SweepPoint(mb, best, lat[best], lat["first"], lat["second"]))
        # bands in sweep order; a case that wins again after another keeps its first band only
        order, edges = [sweep[0].chosen], []
        for p, q in zip(sweep, sweep[1:]):
            if q.chosen != p.chosen and q.chosen not in order and p.chosen == order[-1]:
                edges.append(self._crossover(lat_of[p.chosen], lat_of[q.chosen], link, p.mbit * MBIT, q.mbit * MBIT))
                order.append(q.chosen)
        if order == ["first"] and o.cases == "winners":
            ctx.log.info("partition: %s runs fastest on %s alone at every bandwidth of the sweep %s Mbit/s; "
                         "left as it is", gname, o.first, list(o.mbit))
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"cases": 0})
        labels = order + ([lab for lab in lat_of if lab not in order] if o.cases == "all" else [])
        cases = tuple(PartitionCase(lab, where[lab][0], where[lab][1], where[lab][3], where[lab][4], where[lab][2])
                      for lab in labels)
        trigger, share = self._trigger(program, ctx)
        record = PartitionPlan(gname, o.first, o.second, dep.name, link.name, link.rtt, cases, tuple(order),
                               tuple(e / MBIT for e in edges), tuple(sweep), o.window, o.hysteresis,
                               trigger.input[3:] if trigger else None, trigger.threshold if trigger else None, share,
                               {d: plain(dep.device(d).to_json()) for d in (o.first, o.second)}, o.search)
        selector = Bandwidth(f"link:{link.name}", tuple(order), tuple(edges),
                             link.bandwidth if link.bandwidth else o.mbit[-1] * MBIT, o.window, o.hysteresis,
                             o.fall)
        new = self._rewrite(program, gname, cost, record, selector, trigger)
        new = new.with_record(cost, gname).with_record(record, gname)
        ctx.log.info("partition: %s split between %s and %s over %s: %s", gname, o.first, o.second, link.name,
                     ", ".join(f"{p.mbit:g} Mbit/s -> {p.chosen} ({p.latency_s * 1e3:.2f} ms; first only "
                               f"{p.first_only_s * 1e3:.2f}, second only {p.second_only_s * 1e3:.2f})" for p in sweep))
        # the cost model stays beside the decision it supports (it describes the graph before the split)
        return PassResult(new, modified=True, preserved=(PlacementCost,),
                          stats={"cases": len(cases), "cuts": len(cands)})

    def _cost(self, program: Program, gname: str, dep: Deployment, ctx: PassContext) -> PlacementCost:
        """The program's PlacementCost of the graph when it has one for these cuts and devices
        (a `placement_cost` analysis run before, or a modeled one), else measured now."""
        o = self.options
        for rec in (program.records.get(PlacementCost, graph=gname), program.records.get(PlacementCost)):
            if not isinstance(rec, PlacementCost) or rec.graph != gname:
                continue
            have = {d.device: (d.peak_flops, d.mem_bandwidth) for d in rec.devices}
            if all(have.get(d) == (dep.device(d).peak_flops, dep.device(d).mem_bandwidth) for d in (o.first, o.second)):
                names = [c.name for c in cut_features(program, gname, o.at, self.name)[1]]
                if names == [c.name for c in rec.cuts]:
                    ctx.log.info("partition: using the PlacementCost of %s already in the program", gname)
                    return rec
        return placement_cost(program, gname, dep, (o.first, o.second), ctx, o.at, o.repeats, o.min_time,
                              where=self.name, compressions=o.compress)

    @staticmethod
    def _crossover(a, b, link: Link, lo: float, hi: float) -> float:
        """The bandwidth in [lo, hi] where case a (winning at lo) and case b (winning at hi) have
        equal modeled latency (bisection in log bandwidth); a and b: latency over a link."""
        def diff(bw: float) -> float:
            lk = Link("x", bandwidth=bw, rtt=link.rtt)
            return a(lk) - b(lk)
        for _ in range(60):
            mid = math.sqrt(lo * hi)
            if diff(mid) <= 0:
                lo = mid
            else:
                hi = mid
        return math.sqrt(lo * hi)

    def _dads(self, program: Program, gname: str, cost: PlacementCost, link: Link, lat_of: dict, where: dict,
              chain_positions: set[int], ctx: PassContext) -> None:
        """Add the DAG min-cut of each bandwidth of the sweep and each compression to the options
        (a cut the chain search has already is not added twice)."""
        from pared.analysis.dads import dads_cut
        o = self.options
        gm = cut_features(program, gname, o.at, self.name)[0]
        found = 0
        for mb in o.mbit:
            for comp in o.compress:
                dc = dads_cut(cost, gm, o.first, o.second, Link("sweep", bandwidth=mb * MBIT, rtt=link.rtt), comp)
                if dc is None or (not dc.moved and dc.position in chain_positions) or dc.label in lat_of:
                    continue
                lat_of[dc.label] = (lambda lk, dc=dc: dc.latency(lk, cost.output_bytes))
                where[dc.label] = (dc.name, dc.position, dc.moved, comp, dc.nbytes)
                found += 1
                ctx.log.info("partition: DADS at %g Mbit/s (%s): %d nodes first, %d moved from graph order, %d bytes "
                             "cross (%d values)", mb, comp, dc.position, len(dc.moved), dc.nbytes, len(dc.live))
        ctx.progress(f"partition: DADS found {found} cut(s) the chain search does not have")

    def _trigger(self, program: Program, ctx: PassContext) -> tuple[Offload | None, float | None]:
        """The offload trigger (option trigger), its threshold calibrated to `share` of the calibration
        observations when asked, and the share of them it offloads (hold included), or (None, None)."""
        o = self.options
        if o.trigger is None:
            return None, None
        sel = o.offload_selector()
        name = sel.input[3:]
        if name not in program.input_names:
            raise OptionError(f"pass 'partition' option 'trigger.input': the program has no input {name!r}; "
                              f"its inputs are {list(program.input_names)}")
        at = list(program.input_names).index(name)
        calib = ctx.calibration
        states = []
        for x in calib or ():
            if len(x) <= at:
                raise PassError(f"pass 'partition': a calibration input has {len(x)} values; the program's input "
                                f"{name!r} is number {at + 1}")
            v = x[at].detach().cpu().numpy() if hasattr(x[at], "detach") else x[at]
            states.append(v.reshape(v.shape[0] if v.ndim > 1 else 1, -1)[0])
        if "share" in o.trigger:
            if not states:
                raise PassError("pass 'partition': option 'trigger.share' calibrates the offload threshold on the "
                                "calibration observations (in time order); none were given. Pass calibration=[...] "
                                "or a trigger threshold")
            thr = calibrated_threshold(sel.scores_over(states), float(o.trigger["share"]), "pass 'partition'")
            sel = o.offload_selector(thr)
        share = None
        if states:
            picks = sel.offloads_over(states)
            share = sum(picks) / len(picks)
            ctx.log.info("partition: the offload trigger (threshold %.3g) offloads %.0f%% of %d calibration calls",
                         sel.threshold, 100 * share, len(picks))
        return sel, share

    def _rewrite(self, program: Program, gname: str, cost: PlacementCost, record: PartitionPlan,
                 selector: Bandwidth, trigger: Offload | None = None) -> Program:
        o = self.options
        g = program.graphs[gname]
        variants: dict[str, Graph] = {}
        parts: dict[str, tuple[str, str, tuple[str, ...]]] = {}   # case -> (first graph, second graph, crossing)
        needs_whole = trigger is not None or any(c.label in ("first", "second") for c in record.cases)
        if needs_whole:
            variants["whole"] = g
        gm = g.copy_module()
        _cuts.propagate_shapes(gm, g.example_inputs)
        for case in record.cases:
            if case.label in ("first", "second"):
                continue
            a, b, live = _cuts.split(gm, case.position, case.moved)
            with torch.no_grad():
                crossing = list(a(*g.example_inputs))
            names = _cuts.compress(a, b, case.compression, crossing) if case.compression != "none" else live
            with torch.no_grad():
                sent = tuple(a(*g.example_inputs))
            # an input that crosses as it is does not go through the first part (a graph returning
            # its own input is no ONNX graph): the Transfer reads the program's value directly
            direct = _cuts.pass_through(a)
            if direct:
                _cuts.drop_outputs(a, set(direct))
            variants[f"{case.label}_first"] = Graph(
                a, g.input_names, tuple(n for i, n in enumerate(names) if i not in direct), g.example_inputs)
            variants[f"{case.label}_second"] = Graph(b, tuple(names), g.output_names, sent)
            parts[case.label] = (f"{case.label}_first", f"{case.label}_second", tuple(names), direct)
        first, second = o.first, o.second

        def node(c: Call, graph_of) -> Node:
            ns = f"{self.name}.{gname}"
            cases = []
            for case in record.cases:
                if case.label == "first":
                    body: Node = Call(graph_of("whole"), c.inputs, c.outputs, first)
                elif case.label == "second":
                    sent = tuple(f"{ns}.{case.label}.in{j}" for j in range(len(c.inputs)))
                    got = tuple(f"{ns}.{case.label}.out{j}" for j in range(len(c.outputs)))
                    body = Seq((*(Transfer(r, first, second, s) for r, s in zip(c.inputs, sent)),
                                Call(graph_of("whole"), sent, got, second),
                                *(Transfer(r, second, first, out) for r, out in zip(got, c.outputs))))
                else:
                    fa, fb, names, direct = parts[case.label]
                    h = tuple(c.inputs[direct[i]] if i in direct else f"{ns}.{case.label}.{n}"
                              for i, n in enumerate(names))
                    h2 = tuple(f"{ns}.{case.label}.{n}@{second}" for n in names)
                    got = tuple(f"{ns}.{case.label}.out{j}" for j in range(len(c.outputs)))
                    body = Seq((Call(graph_of(fa), c.inputs, tuple(r for i, r in enumerate(h) if i not in direct),
                                     first),
                                *(Transfer(x, first, second, y) for x, y in zip(h, h2)),
                                Call(graph_of(fb), h2, got, second),
                                *(Transfer(r, second, first, out) for r, out in zip(got, c.outputs))))
                cases.append((case.label, body))
            sel = Select(selector, tuple(cases), f"{self.name}.{gname}")
            if trigger is None:
                return sel
            return Select(trigger, (("edge", Call(graph_of("whole"), c.inputs, c.outputs, first)), ("offload", sel)),
                          f"{self.name}.{gname}.trigger")
        return program.expand(gname, variants, node, by=self.name)

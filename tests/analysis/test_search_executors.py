"""Searches through an executor (analysis/search.py): batched bisection (width 1 is the old
sequential search, width > 1 fewer rounds), a threshold search and a mixed-precision search
on a local Ray giving the in-process result, the Optuna two-objective search (deterministic,
its Pareto front non-dominated, a clear error when nothing meets both bounds), and the
`search` setting's errors (optimize, pipeline files, the CLI flag)."""
import math
import os
import textwrap

import pytest
import torch

import pared
from pared.analysis.search import (InProcess, RayTrials, Trials, as_trials, bisect_log, make_trials,
                                   pareto_front, parse_search)
from pared.ir import portable
from pared.ir.capture import capture
from pared.ir.errors import OptionError, PassError, PipelineError
from pared.ir.transform import PassContext
from pared.pipeline import load_pipeline
from pared.registry import get_pass
from pared.testing import tiny_dit, tiny_sampler_loop, tiny_transformer

STEPS = 10


# -- bisect_log: width 1 is the old search; width > 1 needs fewer rounds ----------------------------
def _old_bisect_log(ok, lo, hi, *, holds_above, iters=7, digits=4):
    """bisect_log as it was before rounds (commit a3e1304), the reference width 1 must reproduce."""
    at = lambda m: float(f"{math.exp(m):.{digits}g}")   # noqa: E731
    if ok(hi) != holds_above:
        return (hi, False) if holds_above else (hi, True)
    best, a, b = (hi if holds_above else None), math.log(lo), math.log(hi)
    for _ in range(iters):
        m = (a + b) / 2
        if ok(at(m)):
            best = at(m)
            a, b = (a, m) if holds_above else (m, b)
        else:
            a, b = (m, b) if holds_above else (a, m)
    return (lo, False) if best is None else (best, True)


@pytest.mark.parametrize("boundary", [2e-3, 0.0137, 0.3, 1.9, 3.99, 5.0])
@pytest.mark.parametrize("above", [True, False])
def test_width_1_tries_the_old_sequence(boundary, above):
    ok = (lambda x: x >= boundary) if above else (lambda x: x <= boundary)
    old, new = [], []
    want = _old_bisect_log(lambda x: old.append(x) or ok(x), 1e-3, 4.0, holds_above=above, iters=9)
    got = bisect_log(lambda x: new.append(x) or ok(x), 1e-3, 4.0, holds_above=above, iters=9)
    rounds = []
    batched = bisect_log(None, 1e-3, 4.0, holds_above=above, iters=9, width=1,
                         batch=lambda xs: rounds.append(list(xs)) or [ok(x) for x in xs])
    assert got == want == batched and new == old == [x for r in rounds for x in r]


@pytest.mark.parametrize("width", [2, 3, 7])
@pytest.mark.parametrize("above", [True, False])
def test_wider_rounds_meet_the_goal_in_fewer_rounds(width, above):
    boundary = 0.0421
    ok = (lambda x: x >= boundary) if above else (lambda x: x <= boundary)
    rounds = {}
    for w in (1, width):
        calls = []
        knob, met = bisect_log(None, 1e-3, 4.0, holds_above=above, iters=9, width=w,
                               batch=lambda xs: calls.append(len(xs)) or [ok(x) for x in xs])
        assert met and ok(knob)
        rounds[w] = (len(calls), knob, max(calls))
        assert max(calls) <= w
        # the bracket is at least as tight as bisection's: within 2^-9 of the range in log space
        assert abs(math.log(knob) - math.log(boundary)) <= math.log(4.0 / 1e-3) / 2 ** 9 + 1e-3
    assert rounds[width][0] < rounds[1][0]


def test_bisect_log_refuses_bad_width_and_missing_measure():
    with pytest.raises(ValueError, match="width must be an integer >= 1"):
        bisect_log(lambda x: True, 1e-3, 1.0, holds_above=True, width=0)
    with pytest.raises(ValueError, match="give ok"):
        bisect_log(None, 1e-3, 1.0, holds_above=True)


# -- the Pareto front ---------------------------------------------------------------------------------
def test_pareto_front_keeps_exactly_the_non_dominated():
    pts = [(30.0, 1.0), (25.0, 2.0), (25.0, 1.5), (20.0, 2.0), (40.0, 0.5), (25.0, 2.0)]
    assert pareto_front(pts, [True, True]) == [0, 1, 4, 5]
    # a smaller-is-better objective flips its comparisons
    assert pareto_front([(1.0, 0.05), (2.0, 0.1), (2.0, 0.2)], [True, False]) == [0, 1]


# -- the threshold search through an executor -------------------------------------------------------
def _dit():
    m, (x, t) = tiny_dit()
    return capture(m, (x, t)), tiny_sampler_loop(x, STEPS)


def _searched(prog, loop, trials, target, name="magnitude_cache"):
    said = []
    ctx = PassContext(calibration=loop, trials=trials, progress=said.append)
    rec = get_pass(name)(target=target)(prog, ctx).program.records["CachePlan"]
    return rec, [m for m in said if ": threshold " in m]       # one per trial


class Counting(InProcess):
    """In process, counting the rounds (one per call of a bound runner)."""

    def bind(self, fn, shared):
        run = super().bind(fn, shared)

        def counted(points, on_result=None):
            self.rounds = getattr(self, "rounds", 0) + 1
            return run(points, on_result)
        return counted


def test_threshold_search_width_1_is_the_default_search_and_wider_takes_fewer_rounds():
    prog, loop = _dit()
    default, said = _searched(prog, loop, None, {"psnr_db": 80.0})
    one = Counting(width=1)
    same, _ = _searched(prog, loop, one, {"psnr_db": 80.0})
    assert same == default and len(said) == len(default.search)
    wide = Counting(width=3)
    rec, _ = _searched(prog, loop, wide, {"psnr_db": 80.0})
    assert wide.rounds < one.rounds and wide.ran > one.ran
    assert rec.threshold == max(p[0] for p in rec.search if p[1] >= 80.0)
    # the same settings give the same record whatever object runs them
    assert _searched(prog, loop, InProcess(width=3), {"psnr_db": 80.0})[0] == rec


def test_two_objective_goal_runs_a_seeded_pareto_search():
    prog, loop = _dit()
    goal = {"psnr_db": 70.0, "speedup": 1.3}
    rec, said = _searched(prog, loop, InProcess(width=4, trials=12, seed=3), goal)
    again, _ = _searched(prog, loop, InProcess(width=4, trials=12, seed=3), goal)
    assert rec == again and len(said) == len(rec.search) >= 4
    # every point of the front is non-dominated by every tried point, and every other tried point
    # is dominated by a point of the front
    dominates = lambda p, q: p[1] >= q[1] and p[2] >= q[2] and (p[1] > q[1] or p[2] > q[2])   # noqa: E731
    assert rec.pareto and set(rec.pareto) <= set(rec.search)
    assert not any(dominates(q, p) for p in rec.pareto for q in rec.search)
    assert all(any(dominates(p, q) for p in rec.pareto) for q in rec.search if q not in rec.pareto)
    # the pick meets both terms and is the best by the first-named metric among those that do
    chosen = next(p for p in rec.search if p[0] == rec.threshold)
    meeting = [p for p in rec.search if p[1] >= 70.0 and p[2] >= 1.3]
    assert chosen in meeting and chosen[1] == max(p[1] for p in meeting)
    other = _searched(prog, loop, InProcess(width=4, trials=12, seed=4), goal)[0]
    assert [p[0] for p in other.search] != [p[0] for p in rec.search]     # the seed is the sampler's


def test_two_objective_goal_no_trial_meets_lists_the_front():
    prog, loop = _dit()
    with pytest.raises(PassError, match=r"pass 'magnitude_cache': no threshold in \[0.001, 4\] of the \d+ tried "
                                        r"meets psnr_db >= 150, speedup >= 3 .*Pareto front measured: threshold"):
        _searched(prog, loop, InProcess(width=4, trials=8), {"psnr_db": 150.0, "speedup": 3.0})


def test_a_program_travels_with_its_metadata():
    prog, loop = _dit()
    back = portable.loads(portable.dumps(prog))
    a, b = prog.main.module.graph, back.main.module.graph
    assert [(n.name, n.op, str(n.target)) for n in a.nodes] == [(n.name, n.op, str(n.target)) for n in b.nodes]
    for n, m in zip(a.nodes, b.nodes):
        assert set(n.meta) == set(m.meta)
        if hasattr(n.meta.get("val"), "shape"):
            assert tuple(n.meta["val"].shape) == tuple(m.meta["val"].shape)
    r1, r2 = prog.runner(), back.runner()
    torch.testing.assert_close(loop(lambda *v: r2(list(v))[0]), loop(lambda *v: r1(list(v))[0]), rtol=0, atol=0)


# -- the `search` setting ------------------------------------------------------------------------------
@pytest.mark.parametrize("value, message", [
    ({"widht": 2}, "search: unknown option 'widht'; did you mean 'width'?"),
    ({"width": 0}, "search: option 'width' must be an integer >= 1, got 0"),
    ({"seed": -1}, "search: option 'seed' must be an integer >= 0"),
    ({"trials": 2.5}, "search: option 'trials' must be an integer >= 1, got 2.5"),
    ({"executor": "dask"}, "search: option 'executor' takes one of \\['in_process', 'ray'\\], got 'dask'"),
    ({"executor": "in_process", "address": "auto"}, "search: option 'address' is for executor ray"),
    ({"address": ""}, "search: option 'address' takes a Ray address"),
    ({"executor": "ray", "address": "auto", "num_cpus": 2}, "search: option 'num_cpus' sizes a local Ray"),
    (3, "search takes 'ray', 'in_process' or a mapping"),
])
def test_bad_search_settings_name_the_option(value, message):
    with pytest.raises(OptionError, match=message) as e:
        make_trials(value)
    assert "\n" not in str(e.value)


def test_search_settings_spell_out_and_ray_missing_says_what_to_install(monkeypatch):
    assert parse_search(None) == {"executor": "in_process"}
    assert parse_search("ray") == {"executor": "ray"}
    assert parse_search({"address": "auto"}) == {"executor": "ray", "address": "auto"}
    t = make_trials({"width": 4, "seed": 2, "trials": 9})
    assert isinstance(t, InProcess) and (t.width, t.seed, t.trials) == (4, 2, 9)
    assert make_trials(t) is t and as_trials(t) is t and isinstance(as_trials(None), InProcess)
    with pytest.raises(TypeError, match="trials must be a pared.analysis.search.Trials .*got str 'ray'"):
        as_trials("ray")        # PassContext(trials=...) takes an executor, not a setting
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(OptionError, match=r"search: option 'executor' ray needs ray, which is not installed: "
                                          r"pip install 'pared\[search\]'"):
        make_trials("ray")


def test_optimize_refuses_a_bad_search_before_capturing():
    m, (x, t) = tiny_dit()
    with pytest.raises(OptionError, match="search: option 'width' must be an integer >= 1"):
        pared.optimize(m, (x, t), search={"width": 0})


def test_pipeline_file_search_errors_name_file_line_and_option(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent("""\
        version: 1
        search:
          executor: ray
          width: 0
        passes: []
        """))
    with pytest.raises(PipelineError, match=rf"^{path}:4: search: option 'width' must be an integer >= 1, got 0$"):
        load_pipeline(str(path))
    path.write_text("version: 1\nsearch: {executer: ray}\npasses: []\n")
    with pytest.raises(PipelineError, match=rf"^{path}:2: search: unknown option 'executer'; did you mean 'executor'"):
        load_pipeline(str(path))
    path.write_text("version: 1\nsearch: [ray]\npasses: []\n")
    with pytest.raises(PipelineError, match=rf"^{path}:2: 'search' expects a mapping"):
        load_pipeline(str(path))
    path.write_text("version: 1\nsearch: {executor: ray, address: auto, width: 4, seed: 1}\npasses: []\n")
    spec = load_pipeline(str(path))
    assert spec.search == {"executor": "ray", "address": "auto", "width": 4, "seed": 1}


def test_cli_search_address_flag():
    from pared.cli import build_parser
    a = build_parser().parse_args(["optimize", "p.yaml", "--search-address", "ray://head:10001"])
    assert a.search_address == "ray://head:10001"
    assert build_parser().parse_args(["optimize", "p.yaml"]).search_address is None


# -- on a local Ray ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.ray
def test_threshold_search_on_ray_matches_in_process(local_ray):
    prog, loop = _dit()
    for width, name in ((1, "residual_cache"), (3, "magnitude_cache")):
        here, said_here = _searched(prog, loop, InProcess(width=width), {"psnr_db": 80.0}, name)
        ray_trials = RayTrials(width=width)
        there, said_there = _searched(prog, loop, ray_trials, {"psnr_db": 80.0}, name)
        assert there == here and there.threshold == here.threshold and there.search == here.search
        assert ray_trials.ran == len(there.search) and sorted(said_there) == sorted(said_here)
        ray_trials.close()
        assert local_ray.is_initialized()          # a Ray someone else started stays up


@pytest.mark.ray
def test_two_objective_search_on_ray_matches_in_process(local_ray):
    prog, loop = _dit()
    goal = {"psnr_db": 70.0, "speedup": 1.3}
    here, _ = _searched(prog, loop, InProcess(width=4, trials=12, seed=3), goal, name="residual_cache")
    there, _ = _searched(prog, loop, RayTrials(width=4, trials=12, seed=3), goal, name="residual_cache")
    assert there == here and there.pareto == here.pareto


def _mixed(trials):
    m, (x,) = tiny_transformer()
    prog = capture(m, (x,))
    g = torch.Generator().manual_seed(1)
    ctx = PassContext(calibration=[(torch.randint(0, 50, (2, 16), generator=g),) for _ in range(3)], trials=trials)
    prog = get_pass("quant_sensitivity")()(prog, ctx).program
    res = get_pass("mixed_precision")(target={"cosine": 0.99995})(prog, ctx)
    return res


@pytest.mark.ray
def test_mixed_precision_target_search_on_ray_matches_in_process(local_ray):
    here = _mixed(InProcess(width=3))
    there = _mixed(RayTrials(width=3))
    a, b = here.program.records["MixedPrecisionPlan"], there.program.records["MixedPrecisionPlan"]
    assert a == b and a.target_met and a.probes == b.probes and dict(here.stats) == dict(there.stats)
    x = tiny_transformer()[1][0]
    torch.testing.assert_close(there.program(x)["tokens"], here.program(x)["tokens"], rtol=0, atol=0)


def test_mixed_precision_width_1_is_the_default_search_and_wider_takes_fewer_rounds():
    one, wide = Counting(width=1), Counting(width=3)
    plan = _mixed(one).program.records["MixedPrecisionPlan"]
    assert plan == _mixed(None).program.records["MixedPrecisionPlan"]
    assert _mixed(wide).program.records["MixedPrecisionPlan"].bytes == plan.bytes    # the same first choice met
    assert wide.rounds < one.rounds


@pytest.mark.ray
def test_optimize_on_ray_reports_how_the_search_ran(local_ray, tmp_path):
    m, (x, t) = tiny_dit()
    loop = tiny_sampler_loop(x, STEPS)
    pipeline = [{"residual_cache": {"target": {"psnr_db": 80.0}}}]
    opt = pared.optimize(m, (x, t), pipeline=pipeline, calibration=loop, bench_repeats=0,
                         allow_fidelity_loss=True, search={"executor": "ray", "width": 2, "seed": 5})
    s = opt.report["search"]
    assert (s["executor"], s["address"], s["width"], s["seed"]) == ("ray", "local", 2, 5)
    assert s["trials_run"] == len(opt.program.records["CachePlan"].search) and s["cpus"] == 2
    here, _ = _searched(capture(m, (x, t)), loop, InProcess(width=2, seed=5), {"psnr_db": 80.0}, "residual_cache")
    assert here == opt.program.records["CachePlan"]
    saved = opt.save(str(tmp_path / "art"))
    import json
    with open(os.path.join(saved, "manifest.json")) as f:
        assert json.load(f)["report"]["search"]["executor"] == "ray"
    assert isinstance(make_trials("ray"), Trials)


def test_smallest_meeting_finds_the_boundary_asking_each_point_once():
    from pared.analysis.search import smallest_meeting
    for boundary in range(1, 20):
        asked = []

        def met(n, b=boundary):
            asked.append(n)
            return n >= b
        assert smallest_meeting(met, 1, 19) == boundary
        assert len(asked) == len(set(asked)) and len(asked) <= 5     # bisection, not a scan
    assert smallest_meeting(lambda n: False, 7, 7) == 7              # hi is taken as meeting

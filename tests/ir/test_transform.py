from dataclasses import dataclass

import pytest

from pared.analysis.cost import CostProfile
from pared.ir.capture import capture
from pared.ir.errors import OptionError, PassError
from pared.ir.transform import (PRESERVE_ALL, Analysis, PassContext, PassManager, PassResult, Record, RewritePass,
                                check_range, make_options, register_pass)
from pared.registry import get_pass
from pared.testing import tiny_transformer


@dataclass(frozen=True)
class _CountProfile(Record):
    nodes: int


def _copied(program):
    """The program with its graph copied: a real new Program."""
    g = program.main
    return program.with_graph("main", g.with_module(g.copy_module()))


@register_pass("_t_count")
class _Count(Analysis):
    record = _CountProfile

    def analyze(self, program, ctx):
        return _CountProfile(len(program.main.module.graph.nodes))


@register_pass("_t_touch")
class _Touch(RewritePass):
    """Modifies: copies the graph (a real new Program)."""

    @dataclass(frozen=True, kw_only=True)
    class Options:
        ratio: float = 0.5   # a fraction
        steps: int = 4       # a count
        name: str = "x"

        def __post_init__(self):
            check_range("_t_touch", "ratio", self.ratio, lo=0.0, hi=1.0)

    def __call__(self, program, ctx):
        return PassResult(_copied(program), modified=True, preserved=(), stats={"touched": 1})


@dataclass(frozen=True)
class _Decision(Record):
    what: str


@register_pass("_t_lies")
class _Lies(RewritePass):
    """Says modified=False, but copies the graph."""

    def __call__(self, program, ctx):
        return PassResult(_copied(program), modified=False)


@register_pass("_t_boom")
class _Boom(RewritePass):
    def __call__(self, program, ctx):
        raise RuntimeError("kaboom")


@register_pass("_t_bad_return")
class _BadReturn(RewritePass):
    def __call__(self, program, ctx):
        return program


@pytest.fixture(scope="module")
def program():
    m, inputs = tiny_transformer()
    return capture(m, inputs)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        @register_pass("_t_touch")
        class Other(RewritePass):
            pass


def test_unknown_pass_suggests_close_name():
    with pytest.raises(OptionError, match="did you mean 'dead_code_elimination'"):
        get_pass("dead_code_elimnation")


def test_options_checked():
    assert make_options(_Touch, {"ratio": 1, "steps": 3}).ratio == 1.0
    with pytest.raises(OptionError, match="unknown option 'ratoi'; did you mean 'ratio'"):
        make_options(_Touch, {"ratoi": 0.1})
    with pytest.raises(OptionError, match="option 'steps' expects int, got str"):
        make_options(_Touch, {"steps": "four"})
    with pytest.raises(OptionError, match=r"option 'ratio' must be in \[0, 1\], got 1.5"):
        make_options(_Touch, {"ratio": 1.5})
    with pytest.raises(OptionError, match="expects int, got bool"):
        make_options(_Touch, {"steps": True})


def test_analyses_add_their_record_to_the_program_and_leave_the_rest(program):
    out, hist = PassManager([_Count(), get_pass("cost")()]).run(program, PassContext())
    assert set(out.records) == {"_CountProfile", "CostProfile"} and not program.records
    assert out.plan is program.plan and out.main is program.main
    assert all(h[1].modified is False for h in hist)
    assert out.records.of(_CountProfile).nodes == len(program.main.module.graph.nodes)


def test_manager_drops_stale_measurements_and_keeps_decisions(program):
    out, hist = PassManager([_Count(), get_pass("cost")(), _Touch()]).run(program, PassContext())
    assert [h[0] for h in hist] == ["_t_count", "cost", "_t_touch"]
    assert not out.records  # _t_touch preserved nothing
    out2, _ = PassManager([_Count(), get_pass("dead_code_elimination")()]).run(program, PassContext())
    assert "_CountProfile" in out2.records  # an unmodified pass keeps records
    # a pass's decision is not a measurement: a later rewrite keeps it
    decided = program.with_record(_Decision("kept"))
    out3, _ = PassManager([_Count(), _Touch()]).run(decided, PassContext())
    assert set(out3.records) == {"_Decision"}


def test_an_unmodified_result_may_only_add_records(program):
    with pytest.raises(PassError, match="_t_lies.*modified=False but returned a Program with other graphs"):
        PassManager([_Lies()]).run(program, PassContext())


def test_the_context_holds_no_records():
    with pytest.raises(AttributeError, match="they live on the Program"):
        PassContext().records


def test_rewrite_never_edits_its_input(program):
    before = program.main.module.code
    out, _ = PassManager([_Touch()]).run(program, PassContext())
    assert out is not program and program.main.module.code == before
    assert out.main.module is not program.main.module


def test_pass_error_names_pass_and_predecessors(program):
    with pytest.raises(PassError, match=r"pass '_t_boom' failed \(after _t_count, cost\): RuntimeError: kaboom"):
        PassManager([_Count(), get_pass("cost")(), _Boom()]).run(program, PassContext())


def test_wrong_return_type_is_an_error(program):
    with pytest.raises(PassError, match="_t_bad_return.*expected PassResult"):
        PassManager([_BadReturn()]).run(program, PassContext())


def test_cost_profile(program):
    out, _ = PassManager([get_pass("cost")()]).run(program, PassContext())
    rec = out.records.of(CostProfile)
    # qkv: 2 * (2*16) tokens * 32 in * 96 out
    assert rec.region("blocks.0.qkv").flops == 2 * 32 * 32 * 96
    assert rec.total_flops > rec.region("blocks.0").flops > 0
    assert rec.param_count == sum(p.numel() for p in tiny_transformer()[0].parameters())
    assert rec.to_json()["type"] == "CostProfile"


@dataclass(frozen=True)
class _OrphanProfile(Record):
    n: int


@register_pass("_t_keep_all")
class _KeepAll(RewritePass):
    """Modifies the program and says every record still holds."""

    def __call__(self, program, ctx):
        return PassResult(_copied(program), modified=True, preserved=PRESERVE_ALL)


@register_pass("_t_needs_count")
class _NeedsCount(RewritePass):
    requires = (_CountProfile,)

    def __call__(self, program, ctx):
        return PassResult(program, modified=False, stats={"nodes": ctx.require(_CountProfile, self.name, program).nodes})


@register_pass("_t_needs_orphan")
class _NeedsOrphan(RewritePass):
    requires = (_OrphanProfile,)

    def __call__(self, program, ctx):
        return PassResult(program, modified=False)


def test_preserve_all_keeps_every_record_through_a_modifying_pass(program):
    out, _ = PassManager([_Count(), get_pass("cost")(), _KeepAll()]).run(program, PassContext())
    assert set(out.records) == {"_CountProfile", "CostProfile"}
    out, _ = PassManager([_Touch()]).run(out, PassContext())
    assert not out.records


def test_a_required_record_is_computed_on_demand_by_its_analysis(program):
    ctx = PassContext()
    out, hist = PassManager([_NeedsCount()]).run(program, ctx)
    assert [h[0] for h in hist] == ["_t_count (for _t_needs_count)", "_t_needs_count"]
    assert hist[1][1].stats["nodes"] == len(program.main.module.graph.nodes) == out.records.of(_CountProfile).nodes
    # computed once: a record already there is used as is
    _, hist = PassManager([_NeedsCount()]).run(program.with_record(_CountProfile(-1)), ctx)
    assert [h[0] for h in hist] == ["_t_needs_count"] and hist[0][1].stats["nodes"] == -1


def test_a_required_record_no_analysis_produces_is_an_error_naming_it(program):
    with pytest.raises(PassError, match="pass '_t_needs_orphan' needs a _OrphanProfile; run its analysis before it"):
        PassManager([_NeedsOrphan()]).run(program, PassContext())

"""Records: Record.from_json rebuilds what to_json wrote (every record pared defines, from the
contract cases' runs), the RecordStore keyed by (record type, graph) that Program.records is,
and the manifest's records loading back as Record objects (and as JSON without torch)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

import pytest
import torch
from torch import nn

from pared.backends.artifact import import_record_classes, read_records
from pared.backends.executor import Executor
from pared.ir.capture import capture
from pared.ir.errors import ArtifactError, RecordError
from pared.ir.records import Record, RecordStore, record_key, record_type, record_types
from pared.ir.transform import Analysis
from pared.ir import transform
from pared.testing import run_torch_free, save_program

CPU = {"backend": "onnxruntime", "provider": "CPUExecutionProvider", "threads": 1}


# -- records of every shape a field takes -------------------------------------------------------
@dataclass(frozen=True)
class _Leaf:
    name: str
    values: tuple[float, ...]
    pair: tuple[int, float] | None = None


@dataclass(frozen=True)
class _ShapesPlan(Record):
    leaves: tuple[_Leaf, ...]
    nested: tuple[tuple[str, tuple[tuple[float, ...], ...]], ...]
    by_index: Mapping[int, float]
    by_name: dict[str, tuple[int, ...]]
    threshold: float | None
    flag: bool | None
    count: int
    anything: Any = None
    note: str = "x"


def _shapes() -> _ShapesPlan:
    return _ShapesPlan(
        leaves=(_Leaf("a", (0.1, 1e-300, float("inf"))), _Leaf("b", (), (3, 2.5))),
        nested=(("q", ((1.0, 2.0), ())), ("k", ((0.30000000000000004,),))),
        by_index={0: 0.5, 7: -1.25}, by_name={"x": (1, 2)}, threshold=None, flag=False, count=3,
        anything=(1, ("two", 3.0)), note="y")


def _through_json(rec: Record) -> Any:
    return Record.from_json(json.loads(json.dumps(rec.to_json())))


def test_from_json_rebuilds_nested_dataclasses_tuples_optionals_and_mappings():
    rec = _shapes()
    back = _through_json(rec)
    assert back == rec and type(back) is _ShapesPlan
    assert type(back.leaves[0]) is _Leaf and back.leaves[1].pair == (3, 2.5)
    assert type(back.nested[0][1][0]) is tuple           # JSON lists are tuples again, however deep
    assert dict(back.by_index) == {0: 0.5, 7: -1.25}       # int keys come back as ints (JSON wrote "0")
    assert back.by_name == {"x": (1, 2)} and type(back.by_name) is dict
    assert back.anything == (1, ("two", 3.0))
    assert _ShapesPlan.from_json(rec.to_json()) == rec    # on the class itself too
    # a float field given an int (a JSON writer may drop the .0) reads as a float
    d = rec.to_json()
    d["leaves"][1]["pair"] = [3, 2]
    assert Record.from_json(d).leaves[1].pair == (3, 2.0) and type(Record.from_json(d).leaves[1].pair[1]) is float


def test_every_subclass_registers_by_name():
    assert record_type("_ShapesPlan") is _ShapesPlan
    assert record_types()["_ShapesPlan"] is _ShapesPlan
    assert transform.Record is Record                     # passes import it from ir.transform


def test_unknown_type_names_it_and_the_known_ones():
    with pytest.raises(RecordError, match=r"unknown record type '_ShapesPlam'; did you mean '_ShapesPlan'\? "
                                          r"\(known: .*_ShapesPlan"):
        Record.from_json({"type": "_ShapesPlam"})
    with pytest.raises(RecordError, match="needs a \"type\""):
        Record.from_json({"leaves": []})
    with pytest.raises(RecordError, match="must be an object"):
        Record.from_json([1, 2])


def test_field_mismatches_name_the_record_type_and_the_field():
    d = _shapes().to_json()
    with pytest.raises(RecordError, match=r"_ShapesPlan: unknown field 'treshold' for _ShapesPlan; did you mean "
                                          r"'threshold'\?"):
        Record.from_json({**{k: v for k, v in d.items() if k != "threshold"}, "treshold": 0.1})
    with pytest.raises(RecordError, match=r"_ShapesPlan: missing field 'count' of _ShapesPlan"):
        Record.from_json({k: v for k, v in d.items() if k != "count"})
    with pytest.raises(RecordError, match=r"_ShapesPlan\.count: expected int, got a string '3'"):
        Record.from_json({**d, "count": "3"})
    with pytest.raises(RecordError, match=r"_ShapesPlan\.leaves\[1\]\.values\[0\]: expected float, got a string"):
        Record.from_json({**d, "leaves": [d["leaves"][0], {"name": "b", "values": ["x"]}]})
    with pytest.raises(RecordError, match=r"_ShapesPlan\.leaves\[0\]: missing field 'values' of _Leaf"):
        Record.from_json({**d, "leaves": [{"name": "a"}]})
    with pytest.raises(RecordError, match=r"_ShapesPlan\.leaves\[1\]\.pair: expected null or "
                                          r"tuple\[int, float\] \(2 items\), got 3 items"):
        Record.from_json({**d, "leaves": [d["leaves"][0], {"name": "b", "values": [], "pair": [1, 2, 3]}]})
    with pytest.raises(RecordError, match=r"_ShapesPlan\.by_index: mapping key 'a' does not read back as int"):
        Record.from_json({**d, "by_index": {"a": 1.0}})
    with pytest.raises(RecordError, match=r"_ShapesPlan\.flag: expected null or bool, got a number 1"):
        Record.from_json({**d, "flag": 1})


def test_from_json_on_a_subclass_refuses_another_record():
    @dataclass(frozen=True)
    class _OtherProfile(Record):
        n: int
    with pytest.raises(RecordError, match="the JSON is a _OtherProfile, which is not a _ShapesPlan"):
        _ShapesPlan.from_json(_OtherProfile(1).to_json())


def test_two_classes_of_one_name_are_ambiguous_and_a_non_dataclass_cannot_be_rebuilt():
    def make():
        class _TwiceProfile(Record):
            pass
        return _TwiceProfile
    a = make()
    assert record_type("_TwiceProfile") is a              # redefined under the same qualname: replaced, not doubled
    with pytest.raises(RecordError, match="is not a dataclass"):
        Record.from_json({"type": "_TwiceProfile"})
    b = type("_TwiceProfile", (Record,), {"__module__": "elsewhere"})
    with pytest.raises(RecordError, match=r"record type '_TwiceProfile' is ambiguous: 2 imported Record classes "
                                          r"have that name \(elsewhere\._TwiceProfile, "):
        Record.from_json({"type": "_TwiceProfile"})
    del b


# -- every record pared defines --------------------------------------------------------------
def _contract():
    """tests/passes/test_contract.py, loaded once under the name test_contract_variants uses."""
    spec = importlib.util.spec_from_file_location(
        "_pared_contract_cases", os.path.join(os.path.dirname(os.path.dirname(__file__)), "passes", "test_contract.py"))
    mod = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    if not hasattr(mod, "CASES"):
        spec.loader.exec_module(mod)
    return mod


def _pared_record_classes() -> dict[str, type]:
    assert import_record_classes(), "a module of pared.analysis or pared.passes does not import"
    return {n: c for n, c in record_types().items() if c.__module__.startswith("pared.")}


def _leaves(v: Any, where: str):
    """(where, value) for every scalar in a record, however nested."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        for f in dataclasses.fields(v):
            yield from _leaves(getattr(v, f.name), f"{where}.{f.name}")
    elif isinstance(v, (tuple, list)):
        for i, x in enumerate(v):
            yield from _leaves(x, f"{where}[{i}]")
    elif isinstance(v, Mapping):
        for k, x in v.items():
            yield from _leaves(k, f"{where} key")
            yield from _leaves(x, f"{where}[{k!r}]")
    else:
        yield where, v


def _same(a: Any, b: Any) -> bool:
    """a == b with NaN equal to NaN, and of the same types all the way down."""
    if type(a) is not type(b):
        return False
    if dataclasses.is_dataclass(a):
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


@pytest.fixture(scope="module")
def pared_records() -> dict[str, list[Record]]:
    """Every record the contract cases produce: each rewrite's main run (Program.records) and
    each analysis (its record in the program it returns), by type name."""
    c = _contract()
    out: dict[str, list[Record]] = {}
    for name in c.REWRITES:
        _, res = c._first_run(name)
        for _, rec in res.program.records.entries():
            out.setdefault(type(rec).__name__, []).append(rec)
    for name in c.ANALYSES:
        case = c._case(name)
        fx_ = case.fixture()
        ctx = case.ctx(fx_, fx_.program)
        res = c.get_pass(name)(**case.options)(fx_.program, ctx)
        for _, rec in res.program.records.entries():
            out.setdefault(type(rec).__name__, []).append(rec)
    # built here: kv_policy's budget search (its contract case sets a budget by head types)
    fx_ = c.streamer()
    res = c.get_pass("kv_policy")(policy="window", target={"psnr_db": 30})(
        fx_.program, c.PassContext(calibration=c.testing.tiny_stream_calls(8)))
    out.setdefault("KVBudgetSearch", []).append(res.program.records["KVBudgetSearch"])
    return out


@pytest.mark.slow
def test_every_pared_record_type_is_produced_by_a_contract_case(pared_records):
    classes = _pared_record_classes()
    assert len(classes) >= 16
    missing = sorted(set(classes) - set(pared_records))
    assert not missing, f"record types no contract case produces (add a case, or build one here): {missing}"
    analyses = {c.record.__name__ for c in _contract().REGISTRY.values()
                if issubclass(c, Analysis) and c.__module__.startswith("pared.")}
    assert analyses <= set(classes)


@pytest.mark.slow
def test_every_pared_record_round_trips_through_json(pared_records):
    for name, recs in sorted(pared_records.items()):
        for rec in recs:
            odd = [(w, type(v).__name__) for w, v in _leaves(rec, name)
                   if type(v) not in (str, int, float, bool, type(None))]
            assert not odd, f"{name} holds values JSON does not give back as themselves: {odd[:5]}"
            text = json.dumps(rec.to_json())
            back = Record.from_json(json.loads(text))
            assert type(back) is type(rec)
            if any(isinstance(v, float) and v != v for _, v in _leaves(rec, name)):
                # NaN != NaN, so such a record is not == even to a copy of itself (RedundancyProfile
                # has no change at its first call): compare field by field with NaN equal to NaN
                assert _same(back, rec), f"{name} changed through JSON"
            else:
                assert back == rec, f"{name} changed through JSON"
            assert json.dumps(back.to_json()) == text


def test_every_pared_record_class_resolves_its_field_types():
    """from_json reads each field by its hint: each must resolve (classes at module level), and no
    field may be called "type" (to_json writes the class name there)."""
    for name, cls in _pared_record_classes().items():
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, name
        seen, todo = set(), [cls]
        while todo:
            k = todo.pop()
            if k in seen:
                continue
            seen.add(k)
            hints = typing.get_type_hints(k)
            assert "type" not in {f.name for f in dataclasses.fields(k)}, f"{k.__qualname__} has a field 'type'"
            for h in hints.values():
                stack = [h]
                while stack:
                    x = stack.pop()
                    stack.extend(typing.get_args(x))
                    if isinstance(x, type) and dataclasses.is_dataclass(x):
                        todo.append(x)


# -- the store ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _NodesProfile(Record):
    nodes: int
    per_op: tuple[tuple[str, int], ...] = field(default=())


def test_store_reads_program_wide_records_as_the_dict_did():
    a, b = _NodesProfile(3), _shapes()
    s = RecordStore({"_NodesProfile": a, "_ShapesPlan": b})
    assert s["_NodesProfile"] is a and "_NodesProfile" in s and s.get("_NodesProfile") is a
    assert s.get("_Nope") is None and s.get("_Nope", 1) == 1 and "_Nope" not in s and 3 not in s
    assert list(s) == ["_NodesProfile", "_ShapesPlan"] and dict(s.items()) == {"_NodesProfile": a, "_ShapesPlan": b}
    assert s == {"_NodesProfile": a, "_ShapesPlan": b} and len(s) == 2
    grown = RecordStore({**s, "_NodesProfile": _NodesProfile(4)})      # what passes write
    assert grown["_NodesProfile"].nodes == 4 and s["_NodesProfile"] is a
    with pytest.raises(TypeError):
        s["_NodesProfile"] = a                                         # immutable
    with pytest.raises(KeyError, match=r"no record '_Nope' in the store \(it holds: '_NodesProfile', '_ShapesPlan'\)"):
        s["_Nope"]


def test_store_keys_records_by_type_and_graph():
    whole, on_main, on_edge = _NodesProfile(1), _NodesProfile(2), _NodesProfile(3)
    s = RecordStore({"_NodesProfile": whole}).with_record(on_main, "main").with_record(on_edge, graph="main.full")
    assert s["_NodesProfile"] is whole
    assert s.get("_NodesProfile", graph="main") is on_main and s.get(_NodesProfile, graph="nope") is None
    assert s.of(_NodesProfile, "main.full") is on_edge and s.of("_NodesProfile") is whole
    assert s[("_NodesProfile", "main")] is on_main and s["_NodesProfile@main"] is on_main
    assert ("_NodesProfile", "main") in s and ("_NodesProfile", "edge") not in s
    assert list(s) == ["_NodesProfile", "_NodesProfile@main", "_NodesProfile@main.full"]
    assert [k for k, _ in s.entries()] == [("_NodesProfile", None), ("_NodesProfile", "main"),
                                           ("_NodesProfile", "main.full")]
    assert RecordStore({**s}) == s and RecordStore(dict(s.entries())) == s     # string keys and pairs read back
    assert record_key(_NodesProfile, "main") == "_NodesProfile@main" and record_key("QuantPlan") == "QuantPlan"
    with pytest.raises(KeyError, match="no record '_NodesProfile@edge'"):
        s.of(_NodesProfile, "edge")
    with pytest.raises(RecordError, match="is a dict, not a _NodesProfile"):
        RecordStore({"_NodesProfile": {"type": "_NodesProfile", "nodes": 1}}).of(_NodesProfile)


def test_store_refuses_a_record_under_another_name_and_malformed_keys():
    with pytest.raises(RecordError, match=r"record key 'QuantPlan' holds a _NodesProfile; store a record under its "
                                          r"own type's name \('_NodesProfile'\)"):
        RecordStore({"QuantPlan": _NodesProfile(1)})
    with pytest.raises(RecordError, match="graph must be a non-empty name without '@'"):
        RecordStore().with_record(_NodesProfile(1), graph="a@b")
    with pytest.raises(RecordError, match="names a record type"):
        RecordStore({3: _NodesProfile(1)})
    with pytest.raises(RecordError, match="with_record takes a Record"):
        RecordStore().with_record({"type": "X"})


def test_program_records_is_a_store_and_keeps_per_graph_records_through_passes_updates():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4)).eval()
    p = capture(m, (torch.randn(2, 4),))
    assert isinstance(p.records, RecordStore) and len(p.records) == 0
    q = p.with_record(_NodesProfile(5), "main")
    assert q.records.of(_NodesProfile, "main").nodes == 5 and p.records == {}
    # a pass adding its plan the way passes do keeps the per-graph record
    r = q.replace(records={**q.records, "_ShapesPlan": _shapes()})
    assert isinstance(r.records, RecordStore)
    assert set(r.records) == {"_NodesProfile@main", "_ShapesPlan"} and r.records.of(_NodesProfile, "main").nodes == 5
    assert q.replace().records is q.records                    # shared, not copied


def test_store_json_round_trip_and_lenient_load():
    s = RecordStore({"_ShapesPlan": _shapes()}).with_record(_NodesProfile(2, (("mm", 1),)), "main")
    d = json.loads(json.dumps(s.to_json()))
    assert set(d) == {"_ShapesPlan", "_NodesProfile@main"} and d["_NodesProfile@main"]["type"] == "_NodesProfile"
    assert RecordStore.from_json(d) == s
    alien = {**d, "FromElsewherePlan": {"type": "FromElsewherePlan", "x": 1}}
    with pytest.raises(RecordError, match="record 'FromElsewherePlan': unknown record type 'FromElsewherePlan'"):
        RecordStore.from_json(alien)
    lenient = RecordStore.from_json(alien, strict=False)
    assert lenient["FromElsewherePlan"] == {"type": "FromElsewherePlan", "x": 1}
    assert lenient.of(_NodesProfile, "main") == s.of(_NodesProfile, "main")
    bad = {**d, "_NodesProfile@main": {"type": "_NodesProfile", "nodez": 1}}
    with pytest.raises(RecordError, match=r"record '_NodesProfile@main': _NodesProfile: unknown field 'nodez'"):
        RecordStore.from_json(bad, strict=False)               # lenient only about types it cannot import
    with pytest.raises(RecordError, match="holds a _NodesProfile"):
        RecordStore.from_json({"Other": {"type": "_NodesProfile", "nodes": 1}})


# -- the manifest ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A one-linear artifact carrying a program-wide GuidancePlan and a CostProfile of graph main."""
    from pared.analysis.cost import CostProfile, RegionCost
    from pared.passes.cache.cfg_skip import GuidancePlan
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4)).eval()
    p = capture(m, (torch.randn(2, 4),))
    p = p.with_record(GuidancePlan(threshold=0.5, warmup=2, graphs=("main",), flops=(("main", 64),)))
    p = p.with_record(CostProfile(graph="main", total_flops=64, param_bytes=80, param_count=20,
                                  regions=(RegionCost("0", 64, 80),)), graph="main")
    return p, save_program(p, tmp_path_factory.mktemp("rec") / "a", CPU)


def test_manifest_records_load_back_as_records(artifact):
    p, path = artifact
    ex = Executor(path)
    with open(os.path.join(path, "manifest.json")) as f:
        assert set(json.load(f)["records"]) == {"GuidancePlan", "CostProfile@main"}
    assert isinstance(ex.records, RecordStore)
    assert ex.records == p.records
    assert ex.records["GuidancePlan"] == p.records["GuidancePlan"]
    assert ex.records.of("CostProfile", "main").regions[0].path == "0"


def test_an_analysis_record_a_pipeline_keeps_reaches_the_artifact(tmp_path):
    """An analysis's record is the program's: through the pass manager into the manifest and back;
    a later rewrite that does not preserve it drops it, the rewrite's own decision stays."""
    from pared.analysis.cost import CostProfile
    from pared.ir.transform import PassContext, PassManager
    from pared.registry import get_pass
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).eval()
    p = capture(m, (torch.randn(2, 8),))
    measured, _ = PassManager([get_pass("cost")()]).run(p, PassContext())
    ex = Executor(save_program(measured, tmp_path / "a", CPU))
    assert ex.records.of("CostProfile") == measured.records.of(CostProfile)
    assert ex.records.of("CostProfile").region("0").flops == 2 * 2 * 8 * 8     # 2 rows x 8 x 8 multiply-adds
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(2, 8, generator=g),) for _ in range(2)]
    quantized, _ = PassManager([get_pass("cost")(), get_pass("quantize_linears")()]).run(
        p, PassContext(calibration=calib))
    assert set(quantized.records) == {"QuantPlan"}


def test_the_front_doors_manifest_writes_the_store(artifact):
    from pared.api import _manifest
    p, _ = artifact
    man = json.loads(json.dumps(_manifest(p, dict(CPU), {}, [])))
    assert RecordStore.from_json(man["records"]) == p.records


def test_a_record_that_does_not_rebuild_is_an_artifact_error(artifact, tmp_path):
    import shutil
    _, path = artifact
    dest = tmp_path / "b"
    shutil.copytree(path, dest)
    mpath = dest / "manifest.json"
    man = json.loads(mpath.read_text())
    man["records"]["CostProfile@main"]["total_flop"] = man["records"]["CostProfile@main"].pop("total_flops")
    mpath.write_text(json.dumps(man))
    ex = Executor(str(dest))                                   # loading and running do not read records
    with pytest.raises(ArtifactError, match=r"record 'CostProfile@main': CostProfile: unknown field 'total_flop' "
                                            r"for CostProfile; did you mean 'total_flops'\?"):
        ex.records
    with pytest.raises(ArtifactError, match="'records' must be an object"):
        read_records(str(dest), {"records": [1]})


def test_records_stay_json_without_torch(artifact):
    p, path = artifact
    out = run_torch_free(f"""
        import json, sys
        import pared
        ex = pared.load({str(path)!r})
        recs = ex.records
        assert "torch" not in sys.modules
        print(json.dumps({{"kind": type(recs).__name__, "keys": list(recs),
                          "guidance": recs["GuidancePlan"], "cost": recs.get("CostProfile", graph="main")}}))
    """)
    got = json.loads(out.strip().splitlines()[-1])
    assert got["kind"] == "RecordStore" and got["keys"] == ["GuidancePlan", "CostProfile@main"]
    assert got["guidance"] == p.records["GuidancePlan"].to_json()
    assert got["cost"] == p.records.of("CostProfile", "main").to_json()


@pytest.mark.slow
def test_a_fresh_process_with_torch_imports_the_record_classes_on_demand(artifact):
    """pared.load imports no pass; reading the records imports the modules that define them."""
    _, path = artifact
    code = textwrap.dedent(f"""
        import sys
        import pared
        ex = pared.load({str(path)!r})
        assert "pared.passes.cache.cfg_skip" not in sys.modules
        print(type(ex.records["GuidancePlan"]).__name__, type(ex.records.of("CostProfile", "main")).__name__)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["GuidancePlan", "CostProfile"]


def test_non_finite_floats_go_to_strict_json_and_come_back():
    rec = _ShapesPlan(leaves=(_Leaf("a", (float("nan"), float("-inf"), 1.5)),), nested=(), by_index={1: float("inf")},
                      by_name={}, threshold=float("nan"), flag=None, count=0)
    text = json.dumps(rec.to_json(), allow_nan=False)          # strict JSON: no bare NaN / Infinity
    back = Record.from_json(json.loads(text))
    assert math.isnan(back.threshold) and math.isnan(back.leaves[0].values[0])
    assert back.leaves[0].values[1:] == (float("-inf"), 1.5) and back.by_index == {1: float("inf")}

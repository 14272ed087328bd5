"""Tuning databases (backends/tvm/tuning.py): where a TVM build finds tuned schedules, how it
replays them, and the pruned databases shipped beside the reference workloads."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from torch import nn

pytest.importorskip("tvm")

from pared.backends.tvm import tuning  # noqa: E402
from pared.ir.errors import BackendError  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
#: a database tuned (MetaSchedule, 16 trials) for TinyMLP on tvm-cpu, pruned; regenerate with
#: PARED_REGEN_TUNING=1 pytest -m tuning tests/backends/test_tvm_tuning.py
FIXTURE = os.path.join(HERE, "data", "tvm_tuning_mlp")


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _mlp():
    torch.manual_seed(0)
    return TinyMLP().eval(), (torch.randn(8, 32),)


def _build(tmp_path, name, **options):
    import warnings

    import pared
    from pared.backends.executor import Executor
    m, ex = _mlp()
    opt = pared.optimize(m, ex, target="tvm-cpu", pipeline=[], backend_options=options, bench_repeats=0,
                         allow_fidelity_loss=True, holdout=[], progress=lambda s: None)
    path = opt.save(str(tmp_path / name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner = Executor(path)
    return runner, runner.manifest["graphs"]["main"]


def _db(path, workloads, records):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, tuning.WORKLOAD_FILE), "w") as f:
        f.writelines(json.dumps(w) + "\n" for w in workloads)
    with open(os.path.join(path, tuning.RECORD_FILE), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def test_prune_keeps_the_fastest_record_of_each_workload(tmp_path):
    src = _db(tmp_path / "src", ["w0", "w1", "w2"], [
        [0, ["trace-a", [3.0, 3.2], "t", "args"]],
        [0, ["trace-b", [1.0, 1.4], "t", "args"]],
        [2, ["trace-c", None, "t", "args"]],          # failed to build: no run seconds
        [1, ["trace-d", [2.0], "t", "args"]],
        [0, ["trace-e", [1.3, 1.3], "t", "args"]],
    ])
    info = tuning.prune(src, str(tmp_path / "dst"))
    assert info == {"workloads": 2, "records_before": 5}
    with open(tmp_path / "dst" / tuning.WORKLOAD_FILE) as f:
        assert [json.loads(x) for x in f] == ["w0", "w1"]          # w2 has no working record: dropped
    with open(tmp_path / "dst" / tuning.RECORD_FILE) as f:
        recs = [json.loads(x) for x in f]
    assert [(i, r[0]) for i, r in recs] == [(0, "trace-b"), (1, "trace-d")]   # renumbered, fastest mean


def test_databases_option_names_what_is_wrong(tmp_path):
    assert tuning.databases_option(None) == [] and tuning.databases_option(True) == []
    assert tuning.databases_option(False) is False
    with pytest.raises(BackendError, match=r"databases.*holds no MetaSchedule database"):
        tuning.databases_option(str(tmp_path))
    with pytest.raises(BackendError, match="takes a directory"):
        tuning.databases_option(3)
    d = _db(tmp_path / "d", [], [])
    assert tuning.databases_option(d) == [d] and tuning.databases_option([d]) == [d]


def test_sources_are_consulted_user_first_then_option_env_shipped(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    own = _db(cache / "meta_schedule", [], [])
    opt = _db(tmp_path / "opt", [], [])
    env = _db(tmp_path / "env", [], [])
    examples = tmp_path / "examples"
    shipped = _db(examples / "wl" / "tvm_tuning" / "tvm-cpu", [], [])
    _db(examples / "wl" / "tvm_tuning" / "tvm-native", [], [])             # another target's: not used
    monkeypatch.setattr(tuning, "EXAMPLES", str(examples))
    monkeypatch.setenv(tuning.ENV, os.pathsep.join([env, opt]))            # a repeat is consulted once
    assert tuning.sources("tvm-cpu", str(cache), [opt]) == [own, opt, env, shipped]
    assert tuning.sources("tvm-cpu", str(cache), False) == []
    assert tuning.describe(shipped) == "examples/wl/tvm_tuning/tvm-cpu"


def test_a_tuned_database_is_replayed_and_false_turns_it_off(tmp_path):
    """The fixture's records are found by structure in a fresh build (no tuning, an empty cache):
    its functions are scheduled as tuned, the rest by default; the result is the model's."""
    if not tuning.is_database(FIXTURE):
        pytest.fail(f"{FIXTURE} is missing: regenerate it (see FIXTURE)")
    m, (x,) = _mlp()
    ref = m(x).detach().numpy()
    tuned, entry = _build(tmp_path, "tuned", cache_dir=str(tmp_path / "c"), databases=[FIXTURE])
    s = entry["schedules"]
    assert s["tuned_functions"] >= 1 and s["functions"] > s["tuned_functions"]
    assert s["databases"][0] == os.path.realpath(FIXTURE)      # first consulted; then the shipped ones
    untuned, entry2 = _build(tmp_path, "untuned", cache_dir=str(tmp_path / "c"), databases=False)
    assert entry2["schedules"]["tuned_functions"] == 0 and entry2["schedules"]["databases"] == []
    for run in (tuned, untuned):
        out = run(x.numpy())
        assert float(((out - ref) ** 2).sum() ** 0.5 / (ref ** 2).sum() ** 0.5) < 1e-5


def test_replay_changes_the_schedule_of_exactly_the_recorded_functions():
    import tvm

    from pared.backends.tvm import schedule
    from pared.backends.tvm.lower import _tvm_target, to_relax
    from pared.ir.capture import capture
    from pared.targets import get_target

    m, ex = _mlp()
    prog = capture(m, ex)
    (g,) = prog.graphs.values()
    target = _tvm_target(get_target("tvm-cpu").to_json())
    fused = schedule.fuse(target)(to_relax(g, "main"))
    with target:
        replayed = tuning.replay(tuning.open_databases([FIXTURE]))(fused)
        none = tuning.replay(None)(fused)
    assert tuning.scheduled_count(none)[0] == 0
    done, total = tuning.scheduled_count(replayed)
    with open(os.path.join(FIXTURE, tuning.WORKLOAD_FILE)) as f:
        recorded = sum(1 for line in f if line.strip())
    assert done == recorded and total == tuning.scheduled_count(fused)[1]
    from tvm_ffi import structural_equal
    changed = [gv.name_hint for gv, f in replayed.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
               and not structural_equal(f.without_attr("tirx.is_scheduled"), fused[gv])]
    assert len(changed) == recorded


def test_every_shipped_database_is_well_formed():
    """examples/*/tvm_tuning/*: pruned (one record per workload, each with run seconds)."""
    dirs = [os.path.join(root) for root, _, files in os.walk(tuning.EXAMPLES) if tuning.RECORD_FILE in files]
    for d in dirs:
        with open(os.path.join(d, tuning.WORKLOAD_FILE)) as f:
            n = sum(1 for line in f if line.strip())
        with open(os.path.join(d, tuning.RECORD_FILE)) as f:
            recs = [json.loads(line) for line in f if line.strip()]
        assert sorted(i for i, _ in recs) == list(range(n)), d
        assert all(r[1] for _, r in recs), d


def test_tuning_loads_only_the_intrinsics_of_the_targets_architecture():
    """MetaSchedule imports TVM's whole package of tensor intrinsics (its CUDA module alone took
    30 s on a 2-core host, past the builder's 30 s timeout per candidate): for a CPU target tuning
    registers only its architecture's, and the package still imports any other family on demand."""
    import tvm
    assert tuning.intrinsic_families(tvm.target.Target("llvm")) == ("x86",)
    assert tuning.intrinsic_families(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})) == ("arm_cpu",)
    assert tuning.intrinsic_families(tvm.target.Target({"kind": "cuda"})) is None
    builder = tuning._builder(("x86",))      # what tune() hands MetaSchedule: its workers load the same
    assert builder.initializer.func is tuning.load_intrinsics and builder.initializer.args == (("x86",),)
    code = (
        "import sys\n"
        "from pared.backends.tvm import tuning\n"
        "tuning.load_intrinsics(('x86',))\n"
        "import tvm.s_tir.tensor_intrin as ti\n"   # what MetaSchedule does: now a no-op
        "from tvm.s_tir import TensorIntrin\n"
        "assert TensorIntrin.get('dot_16x4_vnni') is not None\n"
        "assert not [m for m in sys.modules if m.startswith(ti.__name__ + '.') and not m.endswith('.x86')], "
        "sorted(sys.modules)\n"
        "import tvm.s_tir.tensor_intrin.riscv_cpu\n")  # another family, on demand
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.tuning
def test_tune_prune_and_replay_from_the_pruned_database_alone(tmp_path):
    """Tuning writes the user's database; its pruned copy, given as `databases` to a build with an
    empty cache, replays the same functions. PARED_REGEN_TUNING=1 also rewrites the fixture."""
    cache = tmp_path / "cache"
    _, entry = _build(tmp_path, "tuned", tune=True, tune_trials=4, cache_dir=str(cache), databases=False)
    assert entry["tuned"] is True
    assert tuning.build_timeouts(tuning.work_dir(str(cache))) == 0
    assert entry["schedules"]["tuned_functions"] >= 1
    pruned = tmp_path / "pruned"
    info = tuning.prune(tuning.work_dir(str(cache)), str(pruned))
    assert info["workloads"] >= 1 and info["records_before"] >= info["workloads"]
    _, again = _build(tmp_path, "replayed", cache_dir=str(tmp_path / "empty"), databases=[str(pruned)])
    assert again["schedules"]["tuned_functions"] == entry["schedules"]["tuned_functions"]
    if os.environ.get("PARED_REGEN_TUNING"):
        shutil.rmtree(FIXTURE, ignore_errors=True)
        shutil.copytree(pruned, FIXTURE)

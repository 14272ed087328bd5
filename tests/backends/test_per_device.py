"""Per-device lowering: a partitioned program's graphs are built for the targets of the devices
that run them (backends.lower.placements / device_targets), the manifest names the devices, and
the Executor loads the graphs of the devices it is asked for, each with its own target."""
from __future__ import annotations

import functools
import os
import warnings

import numpy as np
import pytest
import torch

from pared.analysis.placement import modeled_cost
from pared.backends.artifact import read_manifest
from pared.backends.executor import Executor
from pared.backends.lower import lowering_key, placements
from pared.backends.signing import UnsignedCodeWarning
from pared.ir.capture import capture
from pared.ir.errors import ArtifactError
from pared.ir.target import Deployment, get_target
from pared.ir.transform import PassContext
from pared.passes.partition.partition import Partition, PartitionPlan
from pared.testing import save_program, tiny_patchnet

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AT = ("patch", "blocks.*")
ORT = {"name": "cpu", "backend": "onnxruntime", "provider": "CPUExecutionProvider"}


def _deployment(edge: dict) -> dict:
    return {"name": "mixed", "devices": {
        "edge": edge,
        "cloud": {"name": "server", "backend": "onnxruntime", "provider": "CPUExecutionProvider",
                  "peak_flops": 1e12, "mem_bandwidth": 1e11, "threads": 1}},
        "links": [{"between": ["edge", "cloud"], "name": "wifi", "mbit": 20, "rtt_ms": 1}]}


#: the edge runs TVM on this host (so every case can be checked here), the cloud ONNX Runtime
TVM_EDGE = _deployment(dict(get_target("tvm-cpu").to_json(), name="board", peak_flops=1e8, mem_bandwidth=1e9,
                            threads=1))
#: the edge is a Raspberry Pi 5: TVM cross-built for aarch64 (it cannot load here)
PI5_EDGE = _deployment(dict(get_target(os.path.join(ROOT, "examples", "targets", "pi5.yaml")).to_json(),
                            peak_flops=1e8))


@functools.cache
def partitioned(dep_name: str):
    dep = {"tvm": TVM_EDGE, "pi5": PI5_EDGE}[dep_name]
    m, x = tiny_patchnet()
    prog = capture(m, x)
    prog = prog.with_record(modeled_cost(prog, "main", Deployment.from_json(dep), ("edge", "cloud"), AT), "main")
    res = Partition(deployment=dep, at=list(AT), mbit=[1, 30, 1000], compress=["none"])(prog, PassContext())
    return m, x, res.program


@pytest.fixture(scope="module")
def tvm_artifact(tmp_path_factory):
    m, x, prog = partitioned("tvm")
    return m, x, prog, save_program(prog, str(tmp_path_factory.mktemp("mixed") / "a"), ORT)


def test_each_graph_is_built_for_the_devices_that_run_it(tvm_artifact):
    _, _, prog, path = tvm_artifact
    man = read_manifest(path)
    pp = prog.records.of(PartitionPlan, "main")
    assert set(man["devices"]) == {"edge", "cloud"} == set(pp.device_targets)
    assert man["devices"]["edge"]["backend"] == "tvm" and man["devices"]["cloud"]["backend"] == "onnxruntime"
    where = placements(prog)
    for graph, devs in where.items():
        entries = [e for e in man["graphs"].values() if e["graph"] == graph]
        # one entry per distinct lowering; together they serve every device that runs the graph
        assert sorted(d for e in entries for d in e["devices"]) == sorted(devs)
        assert len(entries) == len({lowering_key(man["devices"][d]) for d in devs})
        for e in entries:
            assert {man["devices"][d]["backend"] for d in e["devices"]} == {e["backend"]}
    # the whole graph runs on both devices (edge alone, and all on the cloud): built twice
    whole = {k: e for k, e in man["graphs"].items() if e["graph"] == "main.whole"}
    assert sorted(e["backend"] for e in whole.values()) == ["onnxruntime", "tvm"]
    assert "main.whole@cloud" in whole
    # a second part runs on the cloud; the edge holds its own build for a failed remote call
    second = next(c.graph for c in prog.plan.calls() if c.device == "cloud" and c.graph != "main.whole")
    assert where[second] == ["cloud", "edge"]


def test_every_case_runs_on_its_devices_and_matches_eager(tvm_artifact):
    m, x, prog, path = tvm_artifact
    with torch.no_grad():
        ref = m(*x).numpy()
    pp = prog.records.of(PartitionPlan, "main")
    for case in pp.cases:
        exe = Executor(path, pin={"partition.main": case.label})
        out = exe(x[0].numpy())
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)
        # each graph ran with the runtime built for the device the plan put it on
        for c in prog.plan.calls():
            if c.graph in exe.graph_trace[-1]:
                rt = exe.graph_on(c.graph, c.device)
                assert type(rt).__name__ == ("TvmGraph" if c.device == "edge" else "OrtGraph")


def test_a_process_loads_only_the_devices_it_runs(tvm_artifact):
    m, x, prog, path = tvm_artifact
    man = read_manifest(path)
    # it loads no TVM library, so it does not warn about running the artifact's code; the edge does
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsignedCodeWarning)
        cloud = Executor(path, devices=["cloud"], pin={"partition.main": "second"})
    with pytest.warns(UnsignedCodeWarning, match=r"main\.whole\.so"):
        Executor(path, devices=["edge"])
    assert {e["backend"] for k, e in man["graphs"].items() if k in cloud.graphs} == {"onnxruntime"}
    with torch.no_grad():
        ref = m(*x).numpy()
    np.testing.assert_allclose(cloud(x[0].numpy()), ref, rtol=0, atol=1e-4)
    # a case that needs the edge names it
    edge_case = Executor(path, devices=["cloud"], pin={"partition.main": "first"})
    with pytest.raises(ArtifactError, match=r"graph 'main.whole' on device 'edge'.*loaded the graphs of \['cloud'\]"):
        edge_case(x[0].numpy())
    with pytest.raises(ValueError, match=r"devices: \['gpu'\] not in the artifact; its devices are \['cloud', 'edge'\]"):
        Executor(path, devices=["gpu"])


def test_threads_override_reaches_every_device(tvm_artifact):
    *_, path = tvm_artifact
    exe = Executor(path, threads=2)
    assert exe._device_target("edge")["threads"] == 2 and exe._device_target("cloud")["threads"] == 2
    assert Executor(path)._device_target("cloud")["threads"] == 1     # the deployment's


def test_a_one_target_artifact_refuses_devices(tmp_path):
    m, x = tiny_patchnet()
    path = save_program(capture(m, x), str(tmp_path / "a"), ORT)
    assert "devices" not in read_manifest(path)
    with pytest.raises(ValueError, match="built for one target"):
        Executor(path, devices=["cloud"])


def test_cross_built_edge_loads_only_where_it_runs(tmp_path):
    """The Pi 5 edge's graphs are TVM aarch64 objects: this host cannot load them, and says which
    devices to load instead; the cloud's half loads and runs alone."""
    m, x, prog = partitioned("pi5")
    path = save_program(prog, str(tmp_path / "a"), ORT)
    man = read_manifest(path)
    edge = [e for e in man["graphs"].values() if "edge" in e["devices"]]
    assert edge and all(e["backend"] == "tvm" and e["check"]["triple"] == "aarch64-linux-gnu" for e in edge)
    with pytest.raises(ArtifactError, match=r"built for aarch64.*device 'edge'.*devices=\[\.\.\.\]"):
        Executor(path)
    cloud = Executor(path, devices=["cloud"], pin={"partition.main": "second"})
    with torch.no_grad():
        ref = m(*x).numpy()
    np.testing.assert_allclose(cloud(x[0].numpy()), ref, rtol=0, atol=1e-4)

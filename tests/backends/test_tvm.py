"""TVM lowering (host and aarch64 cross builds) and the TVM runtime, against eager PyTorch."""
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
from torch import nn

from pared.backends.artifact import read_manifest, write_artifact
from pared.backends.executor import Executor
from pared.backends.lower import lower_program
from pared.backends.tvm import lower as tvm_lower
from pared.ir.capture import capture
from pared.ir.errors import ArtifactError, BackendError
from pared.targets import get_target
from pared.testing import assert_close_to_eager, run_torch_free, tiny_transformer, two_graph_program

TVM_CPU = get_target("tvm-cpu").to_json()
AARCH64 = get_target("tvm-aarch64").to_json()


def _save(program, path, target=TVM_CPU, **options):
    def build(tmp):
        graphs = lower_program(program, target, tmp, **options)
        return {"graphs": graphs, "plan": program.plan.to_json(), "target": target,
                "output_structure": program.output_structure}
    return write_artifact(str(path), build)


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    m, inputs = tiny_transformer()
    return m, _save(capture(m, inputs), tmp_path_factory.mktemp("tvm") / "a")


def test_tiny_transformer_matches_eager(tiny_artifact):
    m, art = tiny_artifact
    ex = Executor(art)
    entry = ex.manifest["graphs"]["main"]
    assert entry["backend"] == "tvm" and entry["file"] == "main.so" and entry["linked"] is True
    assert entry["check"]["rel_l2"] <= 1e-4 and not entry["tuned"]
    # main's planned intermediates are allocated once at load (schedule.hoist_workspace), and the
    # calls below run through that one workspace
    assert entry["workspace"] == "main_workspace" and len(ex.graphs["main"].workspace) >= 1
    for seed in (1, 2):
        ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(seed))
        out = ex(ids.numpy())
        assert set(out) == {"tokens", "logits"}
        assert_close_to_eager(m(ids), out, rel_l2=1e-5)


def test_runs_without_torch(tiny_artifact):
    m, art = tiny_artifact
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(3))
    np.save(os.path.join(os.path.dirname(art), "ids.npy"), ids.numpy())
    out = run_torch_free(f"""
        import numpy as np, pared
        ex = pared.load({art!r})
        out = ex(np.load({os.path.join(os.path.dirname(art), 'ids.npy')!r}))
        np.save({os.path.join(os.path.dirname(art), 'logits.npy')!r}, out["logits"])
        print("ok")
    """)
    assert "ok" in out
    got = np.load(os.path.join(os.path.dirname(art), "logits.npy"))
    assert_close_to_eager(m(ids)["logits"], got, rel_l2=1e-5)


def test_dynamic_batch(tmp_path):
    m, (ids,) = tiny_transformer()
    p = capture(m, (ids,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    ex = Executor(_save(p, tmp_path / "a"))
    assert isinstance(ex.inputs[0]["shape"][0], str)
    for b in (1, 5):
        x = torch.randint(0, 50, (b, 16))
        assert_close_to_eager(m(x), ex(x.numpy()), rel_l2=1e-5)


def test_multi_graph_plan_same_on_torch_and_executor(tmp_path):
    full, program = two_graph_program()
    ex = Executor(_save(program, tmp_path / "a"))
    runner = program.runner()
    xs = [torch.randn(2, 8) for _ in range(4)]
    for x in xs:
        assert_close_to_eager(runner([x])[0], ex(x.numpy()), rel_l2=1e-5)
    assert ex.trace == runner.trace == ["full", "reuse", "reuse", "full"]
    ex.reset()
    ex(xs[0].numpy())
    assert_close_to_eager(full.shallow(xs[1]) + full.deep(xs[0]), ex(xs[1].numpy()), rel_l2=1e-5)


class _Special(nn.Module):
    def forward(self, x):
        return torch.special.i1e(x) + 1


def test_unsupported_op_is_named(tmp_path):
    p = capture(_Special(), (torch.randn(4),))
    with pytest.raises(BackendError, match=r"graph 'main': TVM does not support op\(s\) special_i1e.*target 'cpu'"):
        _save(p, tmp_path / "a")
    assert not os.path.exists(tmp_path / "a")


def test_workspace_option_off_allocates_per_call_as_tvm_does(tmp_path, tiny_artifact):
    m, on = tiny_artifact
    program = capture(*tiny_transformer())
    off = _save(program, tmp_path / "off", workspace=False)
    entry = read_manifest(off)["graphs"]["main"]
    assert "workspace" not in entry
    ex_off, ex_on = Executor(off), Executor(on)
    assert ex_off.graphs["main"].workspace == [] and ex_on.graphs["main"].workspace
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(4))
    for k, v in ex_on(ids.numpy()).items():
        np.testing.assert_array_equal(ex_off(ids.numpy())[k], v)          # the same kernels: bit for bit
    with pytest.raises(BackendError, match=r"tvm backend option 'workspace' must be true/false, got 'no'"):
        _save(program, tmp_path / "bad", workspace="no")


def test_unknown_backend_option(tmp_path):
    m, inputs = tiny_transformer()
    with pytest.raises(BackendError, match=r"unknown option 'tunes'; did you mean 'tune'"):
        _save(capture(m, inputs), tmp_path / "a", tunes=True)


def test_cross_build_without_linker_ships_checked_objects(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    m, inputs = tiny_transformer()
    art = _save(capture(m, inputs), tmp_path / "arm", target=AARCH64)
    entry = read_manifest(art)["graphs"]["main"]  # loading it must refuse: read the manifest
    assert entry["file"] == "main.tar" and entry["linked"] is False
    assert "gcc-aarch64-linux-gnu" in entry["link"] and "gcc-aarch64-linux-gnu" in caplog.text
    assert set(entry["check"]["elf_objects"]) >= {"lib0.o"} and entry["check"]["triple"] == "aarch64-linux-gnu"
    with tarfile.open(os.path.join(art, "main.tar")) as tf:
        head = tf.extractfile("lib0.o").read(20)
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 0xB7
    with pytest.raises(ArtifactError, match="built for aarch64-linux-gnu"):
        Executor(art)


def test_elf_check_refuses_wrong_machine(tmp_path):
    obj = tmp_path / "x.so"
    head = bytearray(64)
    head[:4] = b"\x7fELF"
    head[5] = 1
    head[18:20] = (0x3E).to_bytes(2, "little")  # x86-64
    obj.write_bytes(bytes(head))
    with pytest.raises(BackendError, match="expected 0xb7"):
        tvm_lower._check_elf(str(obj), "aarch64-linux-gnu")
    assert tvm_lower._check_elf(str(obj), "x86_64-linux-gnu") == ["x.so"]


def test_unsupported_op_parsing():
    assert tvm_lower._unsupported_ops("Unsupported function types ['nonzero.default', 'foo.bar']") == \
        ["nonzero.default", "foo.bar"]
    assert tvm_lower._unsupported_ops("something else") == []


@pytest.mark.tuning
def test_metaschedule_tuning_keeps_a_database(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU()).eval()
    x = torch.randn(2, 16)
    art = _save(capture(m, (x,)), tmp_path / "a", tune=True, tune_trials=4, cache_dir=str(tmp_path / "cache"))
    ex = Executor(art)
    assert ex.manifest["graphs"]["main"]["tuned"] is True
    assert os.path.getsize(tmp_path / "cache" / "meta_schedule" / "database_tuning_record.json") > 0
    # a record that failed to build is written too: a working one must have been replayed
    from pared.backends.tvm import tuning
    assert tuning.build_timeouts(str(tmp_path / "cache" / "meta_schedule")) == 0
    assert ex.manifest["graphs"]["main"]["schedules"]["tuned_functions"] >= 1
    assert_close_to_eager(m(x), ex(x.numpy()), rel_l2=1e-5)


@pytest.fixture
def rpc_device():
    """A TVM RPC tracker and one device server (this host) registered under key 'pared-test'."""
    import socket
    import time

    from tvm import rpc
    from tvm.rpc.tracker import Tracker
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    base = s.getsockname()[1]
    s.close()
    tracker = Tracker("127.0.0.1", port=base, port_end=base + 50, silent=True)
    server = rpc.Server("127.0.0.1", port=base + 60, port_end=base + 120, key="pared-test",
                        tracker_addr=("127.0.0.1", tracker.port), silent=True)
    try:
        for _ in range(50):          # until the server has registered its key
            if rpc.connect_tracker("127.0.0.1", tracker.port).summary()["queue_info"].get("pared-test"):
                break
            time.sleep(0.2)
        yield f"127.0.0.1:{tracker.port}"
    finally:
        server.terminate()
        tracker.terminate()


@pytest.mark.tuning
def test_metaschedule_tuning_measures_on_an_rpc_device(tmp_path, rpc_device):
    """Tuning for a device reached through TVM's RPC tracker: MetaSchedule's RPCRunner measures the
    candidates on the device server, the records go to a database of that device key."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU()).eval()
    x = torch.randn(2, 16)
    art = _save(capture(m, (x,)), tmp_path / "a", tune=True, tune_trials=4, cache_dir=str(tmp_path / "cache"),
                rpc={"tracker": rpc_device, "key": "pared-test"})
    ex = Executor(art)
    entry = ex.manifest["graphs"]["main"]
    assert entry["tuned"] is True and entry["tuned_on"] == {"tracker": rpc_device, "key": "pared-test"}
    db = tmp_path / "cache" / "meta_schedule-rpc-pared-test" / "database_tuning_record.json"
    assert db.stat().st_size > 0 and not (tmp_path / "cache" / "meta_schedule").exists()
    assert_close_to_eager(m(x), ex(x.numpy()), rel_l2=1e-5)


@pytest.mark.parametrize("rpc,msg", [
    ({"tracker": "localhost", "key": "k"}, "'tracker' must be HOST:PORT"),
    ({"tracker": "h:9190"}, "'key' must name the device key"),
    ({"tracker": "h:9190", "key": "k", "session_timeout": 0}, "'session_timeout' must be seconds"),
    ({"tracker": "h:9190", "key": "k", "timeout": 3}, "unknown field 'timeout'"),
    ("h:9190", "takes {tracker: HOST:PORT, key: NAME}"),
])
def test_bad_rpc_options_are_named(rpc, msg):
    with pytest.raises(BackendError, match=msg):
        tvm_lower.rpc_config(rpc)


def test_rpc_without_tuning_is_refused(tmp_path):
    m, inputs = tiny_transformer()
    with pytest.raises(BackendError, match="give tune: true too"):
        _save(capture(m, inputs), tmp_path / "a", rpc={"tracker": "h:9190", "key": "k"})


def test_cross_build_cannot_be_tuned(tmp_path):
    m, inputs = tiny_transformer()
    with pytest.raises(BackendError, match="cross build cannot be tuned"):
        _save(capture(m, inputs), tmp_path / "a", target=AARCH64, tune=True)


# -- weights as parameters, stored once ----------------------------------------------------------
@pytest.fixture(scope="module")
def cached_dit(tmp_path_factory):
    from pared.ir.transform import PassContext
    from pared.registry import get_pass
    from pared.testing import tiny_dit, tiny_sampler_loop

    m, (x, t) = tiny_dit()
    ctx = PassContext(calibration=tiny_sampler_loop(x, 8))
    program = get_pass("interval_cache")(interval=3, steps=8)(capture(m, (x, t)), ctx).program
    return m, x, program, _save(program, tmp_path_factory.mktemp("tvm") / "cached")


def test_variants_store_each_weight_once_as_parameters(cached_dit):
    from pared.backends.tvm.weights import ALIGN, WEIGHTS_FILE

    m, x, program, art = cached_dit
    graphs = read_manifest(art)["graphs"]
    assert set(graphs) == {"main.full", "main.reuse"}
    keys = {g: [p["key"] for p in e["params"]] for g, e in graphs.items()}
    unique = {p["key"]: p["bytes"] for e in graphs.values() for p in e["params"]}
    # `reuse` reads a subset of `full`'s weights; both point at the same offsets of one file
    assert set(keys["main.reuse"]) < set(keys["main.full"])
    offsets = {g: {p["key"]: p["offset"] for p in e["params"]} for g, e in graphs.items()}
    assert all(offsets["main.full"][k] == o for k, o in offsets["main.reuse"].items())
    assert graphs["main.reuse"]["shared_params"] == len(set(keys["main.reuse"])) > 0
    for e in graphs.values():
        assert e["weights_file"] == WEIGHTS_FILE and WEIGHTS_FILE in e["files"]
    size = os.path.getsize(os.path.join(art, WEIGHTS_FILE))
    assert sum(unique.values()) <= size < sum(unique.values()) + ALIGN * len(unique)
    assert not [f for f in os.listdir(art) if f.endswith(".weights") and f != WEIGHTS_FILE]
    # a float graph's weights are stored as the model holds them (none broadcast over the batch)
    assert size <= 1.05 * sum(v.numel() * v.element_size() for v in m.state_dict().values())
    # the libraries hold code, not weights: the largest weight's bytes are in no .so
    big = max(program.graphs["main.full"].module.state_dict().values(), key=lambda v: v.numel())
    for e in graphs.values():
        with open(os.path.join(art, e["file"]), "rb") as f:
            assert big.detach().numpy().tobytes() not in f.read()


def test_variants_share_weight_tensors_in_memory_and_match_the_fx_plan(cached_dit):
    from pared.testing import tiny_sampler_loop

    m, x, program, art = cached_dit
    ex = Executor(art)
    full, reuse = ex.graphs["main.full"], ex.graphs["main.reuse"]
    by_key = dict(zip([p["key"] for p in full.entry["params"]], full.params))
    for p, t in zip(reuse.entry["params"], reuse.params):
        assert t is by_key[p["key"]]
    runner = program.runner()
    want = tiny_sampler_loop(x, 8)(lambda *a: runner(list(a))[0])
    got = tiny_sampler_loop(x, 8)(lambda *a: torch.from_numpy(ex(*[v.numpy() for v in a])))
    assert ex.trace == runner.trace and "reuse" in ex.trace
    assert_close_to_eager(want, got, rel_l2=1e-5)


def test_a_weight_record_that_does_not_fit_its_file_is_refused(tmp_path):
    import tvm

    from pared.backends.tvm.weights import WeightStore, write

    path = str(tmp_path / "w.weights")
    rec = write(path, [("k", np.ones((4, 64), np.float32))])[0]
    store = WeightStore(path, tvm.cpu(0))
    assert store.tensors([rec], "here")[0].numpy().sum() == 256
    with pytest.raises(ArtifactError, match=r"here: weight k .*float32 \[8, 64\].* does not fit w.weights"):
        WeightStore(path, tvm.cpu(0)).tensors([dict(rec, shape=[8, 64], bytes=2048)], "here")


def test_a_splat_constant_is_made_at_run_time_not_stored():
    import tvm
    from tvm import relax

    from pared.backends.tvm.weights import lift

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 256), "float32"))
    w = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    with bb.function("main", [x]):
        y = bb.emit(relax.op.matmul(x, relax.const(w)))
        z = bb.emit(relax.op.add(y, relax.const(np.full((4, 256), 2.0, np.float32))))
        bb.emit_func_output(z)
    mod, values = lift(bb.get())
    assert [v.shape for _, v in values] == [(256, 256)]
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu(0))
    a = np.ones((4, 256), np.float32)
    got = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(w)).numpy()
    # sums of 256 terms of size ~1 (|a @ w| ~ 16): float32 rounding of another summation order is ~1e-5 absolute
    np.testing.assert_allclose(got, a @ w + 2.0, rtol=1e-5, atol=1e-4)


class _ReadEnds(nn.Module):
    def forward(self, x):
        return x[:, -1] * 2 + x[:, 0] - x[-2, :, -3].sum()


def test_negative_select_reads_the_token_from_the_end(tmp_path):
    """x[:, -1] (a VLA's readout token): TVM's own converter read it out of bounds, silently."""
    x = torch.randn(3, 5, 4)
    path = _save(capture(_ReadEnds(), (x,)), tmp_path / "a")
    got = Executor(path).run_flat(x.numpy())[0]
    assert_close_to_eager(_ReadEnds()(x), torch.from_numpy(got), rel_l2=1e-6)

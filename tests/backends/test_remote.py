"""The remote half of a partitioned artifact: served by Triton (PyTriton, in .venv-serve), called
over gRPC by the edge's Executor, falling back to running the half locally when the server is
killed, stops answering, or is down; every control step acts once.

The server tests are heavy (a Triton server starts twice: ~10-40 s each); the fallback logic is
also checked without a server, against a fake client."""
from __future__ import annotations

import functools
import math
import os
import time

import numpy as np
import pytest
import torch

from pared.analysis.placement import modeled_cost
from pared.backends.executor import Executor
from pared.backends.link import ShapingProxy
from pared.backends.remote import RemoteError, ServerProcess, TritonDevice
from pared.ir.capture import capture
from pared.ir.target import Deployment, Link
from pared.ir.transform import PassContext
from pared.passes.partition.partition import Partition
from pared.testing import SLOW_EDGE_FAST_CLOUD, save_program, tiny_patchnet

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVE_PYTHON = os.path.join(ROOT, ".venv-serve", "bin", "python")
AT = ("patch", "blocks.*")


@functools.cache
def artifact(tmp: str) -> tuple[str, np.ndarray, np.ndarray]:
    """A partition of TinyPatchNet with one case, the cut after the patch embedding (fp16 across):
    every call sends its second part to the cloud."""
    m, (x,) = tiny_patchnet()
    prog = capture(m, (x,))
    prog = prog.with_record(modeled_cost(prog, "main", Deployment.from_json(SLOW_EDGE_FAST_CLOUD),
                                         ("edge", "cloud"), AT), "main")
    res = Partition(deployment=SLOW_EDGE_FAST_CLOUD, at=list(AT), mbit=[10])(prog, PassContext())
    assert res.program.plan.selects()[0].selector.cases == ("k1_fp16",)
    path = save_program(res.program, os.path.join(tmp, "art"), {"name": "cpu", "backend": "onnxruntime",
                                                                 "provider": "CPUExecutionProvider"})
    xs = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = m(xs).numpy()
    return path, xs.numpy(), ref


class _FakeClient:
    """tritonclient's surface TritonDevice uses: fails while `down`, else answers from `fn`."""

    def __init__(self, fn):
        self.fn, self.down, self.requests = fn, False, 0

    def infer(self, model, inputs, outputs=None, client_timeout=None):
        self.requests += 1
        if self.down:
            raise ConnectionError("failed to connect to all addresses")
        outs = self.fn(model, [i._arr for i in inputs])

        class Res:
            def as_numpy(self, name, outs=outs):
                return outs[name]
        return Res()

    def close(self):
        pass


def _fake_device(exe: Executor, backoff: float = 0.2) -> tuple[TritonDevice, _FakeClient]:
    import tritonclient.grpc as g
    dev = TritonDevice("127.0.0.1:1", timeout=0.5, backoff=backoff)

    class Input(g.InferInput):
        def set_data_from_numpy(self, a):
            self._arr = a
            return super().set_data_from_numpy(a)

    def answer(model, arrays):
        if model == "pared_echo":
            return {"n": np.array([arrays[0].nbytes]), "pared_compute_s": np.zeros(1)}
        entry = exe.manifest["graphs"][model]
        outs = exe.graphs[model](arrays)
        return {**{o["name"]: v for o, v in zip(entry["outputs"], outs)}, "pared_compute_s": np.zeros(1)}
    client = _FakeClient(answer)
    dev._client = client
    dev._connect = lambda: client          # a reconnect after a failure gets the same fake
    dev._grpc = type("G", (), {"InferInput": Input, "InferRequestedOutput": g.InferRequestedOutput})
    return dev, client


def test_fallback_runs_the_half_locally_and_every_step_acts(tmp_path_factory):
    path, x, ref = artifact(str(tmp_path_factory.mktemp("remote")))
    local = Executor(path)
    dev, client = _fake_device(local)
    exe = Executor(path, remote={"cloud": dev})
    outs = []
    for step in range(12):
        client.down = 3 <= step < 6            # the server dies at step 3 and is back at 6
        outs.append(exe(x))
        if step == 5:
            time.sleep(0.25)                   # past the backoff: the next probe may bring it back
            client.down = False
            dev.probe()
            time.sleep(0.05)
    assert len(outs) == 12
    for o in outs:
        np.testing.assert_allclose(o, ref, atol=2e-3)
    assert dev.calls == 12
    assert dev.fallbacks >= 3 and dev.failures >= 1
    assert not dev.down
    # the steps before the failure and after the recovery went to the server
    assert dev.calls - dev.fallbacks >= 8
    assert exe.trace == ["k1_fp16"] * 12


def test_bandwidth_is_measured_apart_from_the_links_fixed_time(tmp_path_factory):
    """A request costs a fixed part (RTT, overheads) plus its bytes / bandwidth. A small request only
    refines the fixed part; the probe (echoes of 1 byte and of probe_bytes) measures the bandwidth
    net of it, so a link read off small requests is not taken for a slow one; probes are spaced
    so they take at most a tenth of the link's time."""
    path, x, ref = artifact(str(tmp_path_factory.mktemp("remote")))
    local = Executor(path)
    dev, client = _fake_device(local)
    # 50 ms and 1.6 Mbit/s: what is timed is tens of milliseconds, well above a loaded host's jitter
    fixed, bw = 0.05, 2e5
    answer = client.fn

    def slow(model, arrays):
        out = answer(model, arrays)
        time.sleep(fixed + (sum(a.nbytes for a in arrays) + sum(v.nbytes for v in out.values())) / bw)
        return out
    client.fn = slow
    exe = Executor(path, remote={"cloud": dev})
    out = exe(x)                                  # sends 1 KB: the fixed part, no bandwidth sample
    np.testing.assert_allclose(out, ref, atol=2e-3)
    assert dev.count == 0 and not np.isfinite(dev.signal()[0])
    assert fixed <= dev.fixed_s < fixed + 0.025
    for _ in range(300):                          # the Executor probed after the call (nothing measured)
        if dev.count:
            break
        time.sleep(0.01)
    assert dev.count == 1
    assert bw * 0.75 < dev.signal()[0] < bw * 1.25, dev.signal()
    assert dev._probe_s > 0.1
    before = client.requests
    dev.probe()                                   # too soon after the last: refused
    assert client.requests == before and dev.count == 1
    # the next probe is sized to take PROBE_FIXED times the fixed part at the bandwidth measured
    assert dev.probe_size() == pytest.approx(dev.PROBE_FIXED * dev.fixed_s * dev.signal()[0], rel=0.01)
    assert dev.probe_size() >= dev.probe_bytes
    dev.estimate = 1e9
    assert dev.probe_size() == dev.max_probe_bytes
    # a request whose bytes took less than a quarter of the fixed part gives no sample (jitter)
    count = dev.count
    assert not dev._measure(100_000, dev.fixed_s * 1.1, 0.0) and dev.count == count
    assert dev._measure(100_000, dev.fixed_s * 2, 0.0) and dev.count == count + 1
    assert dev.signal()[0] == pytest.approx(100_000 / dev.fixed_s)


def test_a_probe_too_small_to_measure_doubles_the_next(tmp_path_factory):
    """On a fast link a 16 KB echo's bytes take far less than the fixed part (its jitter): no
    sample, and the next probe is twice as large, until one measures."""
    path, x, ref = artifact(str(tmp_path_factory.mktemp("remote")))
    dev, client = _fake_device(Executor(path))
    answer = client.fn

    def fast(model, arrays):
        out = answer(model, arrays)
        time.sleep(0.05 + sum(a.nbytes for a in arrays) / 2e8)       # 50 ms fixed, 1.6 Gbit/s
        return out
    client.fn = fast
    sizes = []
    for _ in range(3):
        sizes.append(dev.probe_size())
        dev._last_probe = -math.inf                    # not spaced: the test asks for each probe
        dev.probe()
        for _ in range(100):
            if not dev._probing:
                break
            time.sleep(0.01)
    assert sizes == [dev.probe_bytes, 2 * dev.probe_bytes, 4 * dev.probe_bytes]
    assert dev.probe_size() == 8 * dev.probe_bytes
    assert dev.count == 0 and not np.isfinite(dev.signal()[0])      # none took a quarter of 50 ms


def test_device_needs_its_environment(tmp_path):
    with pytest.raises(RemoteError, match="its own environment"):
        ServerProcess(str(tmp_path), python=str(tmp_path / "nope" / "python"))


needs_server = pytest.mark.skipif(not os.path.exists(SERVE_PYTHON),
                                  reason=f"no Triton environment at {SERVE_PYTHON}: `make install` builds it")


@pytest.mark.heavy
@needs_server
def test_served_by_triton_killed_restarted_and_blackholed(tmp_path_factory):
    """Triton serves the cloud half; the edge calls it over a shaped loopback link. The server is
    killed mid-episode (the steps fall back to the edge at once: connection refused), started
    again (a probe brings the device back), then the link stops delivering (the steps wait out the
    timeout, then fall back). Every step acts once, with the eager model's answer."""
    path, x, ref = artifact(str(tmp_path_factory.mktemp("remote")))
    srv = ServerProcess(path, python=SERVE_PYTHON).start()
    try:
        with ShapingProxy(("127.0.0.1", srv.grpc_port), Link.mbit("wifi", 50, rtt_ms=4)) as px:
            dev = TritonDevice(f"{px.address[0]}:{px.address[1]}", timeout=1.0, backoff=0.5)
            exe = Executor(path, remote={"cloud": dev})
            outs, remote_calls = [], []
            step, deadline = 0, None
            # 40 steps; then, on a loaded machine (a probe or a call timing out behind the shaping
            # proxy's thread), more steps with probes until the healed link answers or 20 s pass
            while step < 40 or (not any(remote_calls[36:]) and time.perf_counter() < deadline):
                if step == 10:
                    srv.kill()
                if step == 16:
                    srv.start()
                    time.sleep(0.6)
                if step == 30:
                    px.blackhole()
                if step == 34:
                    px.heal()
                    time.sleep(0.6)
                before = dev.calls - dev.fallbacks
                outs.append(exe(x))
                remote_calls.append(dev.calls - dev.fallbacks > before)
                if step in (16, 17, 18, 34, 35, 36) or step >= 40:
                    dev.probe()
                    time.sleep(0.3)
                if step == 39:
                    deadline = time.perf_counter() + 20.0
                step += 1
            assert len(outs) >= 40
            for o in outs:
                np.testing.assert_allclose(o, ref, atol=2e-3)
            assert all(remote_calls[:10]), "the server answered before it was killed"
            assert not any(remote_calls[10:16]), "a killed server answered"
            assert any(remote_calls[17:30]), "the restarted server never came back"
            assert any(remote_calls[36:]), "the healed link never came back"
            assert dev.fallbacks >= 6 and dev.failures >= 2
            assert max(dev.fallback_s) < 1.0 + 0.5, "a fallback waited longer than the timeout"
            assert np.isfinite(dev.signal()[0])
    finally:
        srv.stop()


@pytest.mark.heavy
@needs_server
def test_vla_closed_loop_episode_survives_a_server_killed_mid_episode(tmp_path):
    """The Meta-World VLA's policy call split after its backbone (the head's 10 DDIM steps in the
    cloud, served by Triton over a shaped link), one closed-loop episode in the simulator; the
    server is killed at the 5th policy call and started again at the 10th (in the background, as
    a supervisor would). Every policy call acts (the edge runs the head itself while the server is
    gone), with the actions the artifact computes locally."""
    import threading
    from pared.workloads import get_workload
    wl = get_workload("vla_metaworld", head="diffusion", decoder="unrolled", episodes=1)
    model, inputs = wl.build(), wl.example_inputs()
    prog = capture(model, inputs)
    at = ("backbone",)
    prog = prog.with_record(modeled_cost(prog, "main", Deployment.from_json(SLOW_EDGE_FAST_CLOUD),
                                         ("edge", "cloud"), at), "main")
    res = Partition(deployment=SLOW_EDGE_FAST_CLOUD, at=list(at), mbit=[0.1], compress=["none"])(prog, PassContext())
    (case,) = res.program.records.of("PartitionPlan", "main").cases
    assert case.cut == "after:backbone#1"
    path = save_program(res.program, str(tmp_path / "vla"), {"name": "cpu", "backend": "onnxruntime",
                                                             "provider": "CPUExecutionProvider"})
    local = Executor(path, threads=1)
    srv = ServerProcess(path, python=SERVE_PYTHON).start()
    try:
        with ShapingProxy(("127.0.0.1", srv.grpc_port), Link.mbit("wifi", 100, rtt_ms=2)) as px:
            dev = TritonDevice(f"{px.address[0]}:{px.address[1]}", timeout=2.0, backoff=0.5)
            exe = Executor(path, threads=1, remote={"cloud": dev})
            calls, acted, remote, restart = [0], [0], [], []

            def fn(*args):
                n = calls[0]
                calls[0] += 1
                if n == 5:
                    srv.kill()
                if n == 10:
                    t = threading.Thread(target=srv.start, daemon=True)
                    t.start()
                    restart.append(t)
                before = dev.calls - dev.fallbacks
                a = exe(*args)
                remote.append(dev.calls - dev.fallbacks > before)
                np.testing.assert_allclose(a, local(*args), atol=1e-4)
                acted[0] += 1
                return a
            ep = wl.episode(fn, 0, 0, reset=exe.reset)
            for t in restart:
                t.join()
            assert calls[0] == acted[0] == len(ep["call_s"]) > 10
            assert all(remote[:5]) and not any(remote[5:10])
            assert dev.fallbacks >= 5
    finally:
        srv.stop()

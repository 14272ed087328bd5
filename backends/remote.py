"""The remote half of a partitioned artifact: served by NVIDIA Triton (through PyTriton), called
by the edge's Executor with tritonclient over gRPC (the KServe v2 inference protocol), falling
back to running the half locally when the server does not answer.

Server (`pared serve ARTIFACT --part cloud`, or `serve(...)`): loads the artifact torch-free
and binds each graph the Plan runs on that device as a Triton model of the same name (inputs
and outputs as the manifest declares them, no batching dimension), plus `pared_echo`, which
returns the size of what it was sent (the edge's bandwidth probe). Each answer carries
`pared_compute_s`, the seconds the graph took on the server.

Client (`TritonDevice`, given to `pared.load(path, remote={"cloud": TritonDevice(url)})`): a
Call the Plan places on that device is sent as one inference request (binary tensors; gRPC's
message limits raised past the 4 MB default, which activation transfers exceed: Triton server
issues #1776, #4972), with a timeout. Its measurement of the link, bound as ``link:NAME`` for
the Plan's bandwidth selector, separates the link's latency from its bandwidth: a request's time
beyond the server's compute is a fixed part (RTT, the request's own overhead: the least such
time of the last few small requests) plus its bytes / bandwidth. A request of at least
`min_bytes` gives a bandwidth sample, bytes / (time - fixed part); a smaller one (an action, a
cut after the backbone) only updates the fixed part; so does a larger one whose bytes took less
than a quarter of the fixed part (within its jitter). When a call gave no sample the Executor
probes: an echo of one byte and one of the probe's size, in the background, at most every
`probe_interval` s and so that probes take at most a tenth of the link's time. The probe's size
follows the bandwidth it measured (its bytes take about twice the fixed part, from
`probe_bytes` up to `max_probe_bytes`; doubled after a probe too small to measure): a 16 KB echo
takes 1.3 ms at 100 Mbit/s, less than the fixed part's jitter over Triton (~10 ms here).
(Bytes / time alone read a 450-byte request over a 5 ms RTT as 0.7 Mbit/s on any link: the
selector never left its lowest band.) When a request fails or times out, the Executor runs the same
graph locally (the artifact holds every graph) and the device counts a fallback: no control
step is lost, and none is computed twice on the edge's side (the late answer of a request
that timed out is dropped). After a failure the device is `down` for `backoff` seconds:
Calls go straight to the local fallback and the link reads as 1 byte/s, so the selector moves
the cut to the edge; a probe in the background (`pared_echo`) brings it back up.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Any, Sequence

import numpy as np

#: gRPC message limit for activation tensors (bytes)
MAX_MESSAGE = 1 << 30
ECHO = "pared_echo"
COMPUTE = "pared_compute_s"


class RemoteError(RuntimeError):
    """A remote call that failed (timeout, connection, server error)."""


class TritonDevice:
    """Runs a device's graphs on a Triton server (see module docstring).

    Args:
        url: the server's gRPC address, host:port (through a ShapingProxy to shape the link).
        link: the name of the link the Plan's bandwidth selector reads (``link:NAME``).
        timeout: seconds a request may take before the step falls back to the edge.
        backoff: seconds the device stays down after a failure before a probe may bring it back.
        probe_bytes: the probe's least payload (see `probe_size`); max_probe_bytes: its most.
        min_bytes: the least bytes (sent and received) of a request that measures the bandwidth.
        probe_interval: the least seconds between two probes while the device is up (more where a
            probe takes longer: probes use at most PROBE_SHARE of the link's time).
    """

    #: small requests whose least time (beyond compute) is the link's fixed part
    FIXED_WINDOW = 8
    #: the most of the link's time the probes may take
    PROBE_SHARE = 0.1
    #: a probe's bytes take this many times the fixed part (at the bandwidth measured last)
    PROBE_FIXED = 2.0

    def __init__(self, url: str, *, link: str = "wifi", timeout: float = 1.0, backoff: float = 1.0,
                 probe_bytes: int = 16384, min_bytes: int = 4096, probe_interval: float = 0.1,
                 max_probe_bytes: int = 1 << 20):
        import tritonclient.grpc as grpcclient
        self._grpc = grpcclient
        self.url, self.name, self.timeout, self.backoff = url, link, timeout, backoff
        self.probe_bytes, self.min_bytes, self.probe_interval = probe_bytes, min_bytes, probe_interval
        self.max_probe_bytes = max(max_probe_bytes, probe_bytes)
        self._fixed: list[float] = []            # the last small requests' times beyond compute
        self._last_probe = -math.inf
        self._probe_s = 0.0                      # the last probe's duration
        self._grow = 0                           # the next probe's size after one too small to measure
        self._client = self._connect()
        self.estimate = float("nan")
        self.count = 0
        self.down_until = 0.0
        self.calls = self.fallbacks = self.failures = 0
        self.fallback_s: list[float] = []       # time from the failed request's start to the local answer
        self.bytes_sent = 0
        self._lock = threading.Lock()
        self._probing = False

    def _connect(self):
        return self._grpc.InferenceServerClient(self.url, channel_args=[
            ("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)])

    @property
    def down(self) -> bool:
        return time.perf_counter() < self.down_until

    @property
    def fixed_s(self) -> float:
        """The link's fixed part of a request (RTT and overheads): the least time beyond the server's
        compute of the last small requests (inf before any)."""
        with self._lock:
            return min(self._fixed, default=math.inf)

    def probe_size(self) -> int:
        """The next probe's payload: bytes that take PROBE_FIXED times the fixed part at the
        bandwidth measured last (twice the last probe's size after a probe too small to measure),
        within [probe_bytes, max_probe_bytes]."""
        with self._lock:
            est, fixed, grow = self.estimate, min(self._fixed, default=math.inf), self._grow
        if grow:
            return grow
        if not (math.isfinite(est) and math.isfinite(fixed) and est > 1.0):
            return self.probe_bytes
        return int(min(max(self.PROBE_FIXED * fixed * est, self.probe_bytes), self.max_probe_bytes))

    def _measure(self, nbytes: int, elapsed: float, compute: float) -> bool:
        """Take a request's time (beyond the server's compute) into the link's measurement; True
        when it gave a bandwidth sample: its bytes took at least a quarter of the fixed part (less
        is within the fixed part's jitter)."""
        t = max(elapsed - compute, 0.0)
        with self._lock:
            if nbytes < self.min_bytes:
                self._fixed = (self._fixed + [t])[-self.FIXED_WINDOW:]
                return False
            if not self._fixed:     # nothing to tell the fixed part from the bytes' time yet
                return False
            fixed = min(self._fixed)
            if t - fixed < 0.25 * fixed:
                return False
            self.estimate = nbytes / (t - fixed)
            self.count += 1
            return True

    def _fail(self) -> None:
        with self._lock:
            self.failures += 1
            self.down_until = time.perf_counter() + self.backoff
            self.estimate = 1.0          # the link reads as 1 byte/s: the selector moves to the edge
            self.count += 1
            # a fresh channel: gRPC's own reconnect backoff would keep a restarted server unreachable
            # for seconds after it is back
            old, self._client = self._client, self._connect()
        try:
            old.close()
        except Exception:
            pass

    def infer(self, graph: str, names: Sequence[str], arrays: Sequence[np.ndarray],
              outputs: Sequence[str]) -> list[np.ndarray]:
        """One inference request; RemoteError when it fails or times out."""
        return self._request(graph, names, arrays, outputs)[0]

    def _request(self, graph: str, names: Sequence[str], arrays: Sequence[np.ndarray],
                 outputs: Sequence[str]) -> tuple[list[np.ndarray], bool]:
        """One inference request: (its outputs, whether it gave a bandwidth sample)."""
        g = self._grpc
        inputs = []
        nbytes = 0
        for n, a in zip(names, arrays):
            a = np.ascontiguousarray(a)
            inp = g.InferInput(n, list(a.shape), _triton_dtype(a.dtype))
            inp.set_data_from_numpy(a)
            inputs.append(inp)
            nbytes += a.nbytes
        want = [g.InferRequestedOutput(o) for o in (*outputs, COMPUTE)]
        t0 = time.perf_counter()
        try:
            res = self._client.infer(graph, inputs, outputs=want, client_timeout=self.timeout)
        except Exception as e:   # InferenceServerException: timeout, unavailable, server error
            raise RemoteError(f"{self.url}: {graph}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        elapsed = time.perf_counter() - t0
        outs = [res.as_numpy(o) for o in outputs]
        compute = float(res.as_numpy(COMPUTE).reshape(-1)[0])
        measured = self._measure(nbytes + sum(o.nbytes for o in outs), elapsed, compute)
        self.bytes_sent += nbytes
        return outs, measured

    def run(self, graph: str, names: Sequence[str], arrays: Sequence[np.ndarray], outputs: Sequence[str],
            local) -> list[np.ndarray]:
        """The graph's outputs: from the server, or from `local(arrays)` when it fails or is down."""
        self.calls += 1
        t0 = time.perf_counter()
        if not self.down:
            try:
                return self.infer(graph, names, arrays, outputs)
            except RemoteError:
                self._fail()
        self.fallbacks += 1
        out = local(list(arrays))
        self.fallback_s.append(time.perf_counter() - t0)
        return out

    def probe(self) -> None:
        """Measure the link in the background (once at a time, at most every `probe_interval` s
        while the device is up): an echo of one byte (the fixed part), then one of `probe_size()`
        (the bandwidth). While the device is down, a successful probe brings it back up."""
        now = time.perf_counter()
        with self._lock:
            gap = max(self.probe_interval, self._probe_s / self.PROBE_SHARE)
            if self._probing or (now - self._last_probe < gap and now >= self.down_until):
                return
            self._probing = True
            self._last_probe = now

        def go():
            try:
                t0 = time.perf_counter()
                self.infer(ECHO, ["x"], [np.zeros(1, np.uint8)], ["n"])
                size = self.probe_size()
                _, measured = self._request(ECHO, ["x"], [np.zeros(size, np.uint8)], ["n"])
                self._probe_s = time.perf_counter() - t0
                with self._lock:
                    self._grow = 0 if measured else min(2 * size, self.max_probe_bytes)
                with self._lock:
                    self.down_until = 0.0
            except RemoteError:
                self._fail()
            finally:
                with self._lock:
                    self._probing = False
        threading.Thread(target=go, daemon=True).start()

    def signal(self) -> np.ndarray:
        with self._lock:
            return np.array([self.estimate, float(self.count)])

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:
            pass


_DTYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16", np.dtype(np.float64): "FP64",
           np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.int8): "INT8",
           np.dtype(np.uint8): "UINT8", np.dtype(np.bool_): "BOOL"}


def _triton_dtype(dt: np.dtype) -> str:
    try:
        return _DTYPES[np.dtype(dt)]
    except KeyError:
        raise RemoteError(f"no Triton type for numpy dtype {dt}") from None


def _np_dtype(name: str) -> Any:
    from pared.backends.executor import _DTYPES as EXE
    return np.dtype(EXE.get(name, name))


def serve(path: str, part: str = "cloud", *, grpc_port: int = 8001, http_port: int = 8000,
          metrics_port: int = 8002, trusted_keys: "Sequence | None" = None,
          ready: "threading.Event | None" = None, log=print) -> None:
    """Serve the graphs an artifact's Plan runs on device `part` with Triton (blocking until
    the process is stopped). `ready` is set once the models are bound and the server answers."""
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    from pared.backends.executor import Executor
    from pared.backends.artifact import read_manifest
    per_device = read_manifest(path, trusted_keys=trusted_keys).get("devices") or {}
    if per_device and part not in per_device:
        raise RemoteError(f"{path}: no device {part!r} in the artifact (its devices: {sorted(per_device)})")
    # a per-device artifact: only this device's graphs load (the others may be built for another CPU)
    exe = Executor(path, trusted_keys=trusted_keys, devices=[part] if per_device else None)
    graphs = sorted({c.graph for c in exe.plan.calls() if c.device == part})
    if not graphs:
        devices = sorted({str(c.device) for c in exe.plan.calls()})
        raise RemoteError(f"{path}: the plan runs no graph on device {part!r} (its devices: {devices})")
    config = TritonConfig(grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
                          log_verbose=0)
    with Triton(config=config) as triton:
        for name in graphs:
            entry = exe.manifest["graphs"][name]
            ins = [i["name"] for i in entry["inputs"]]
            outs = [o["name"] for o in entry["outputs"]]

            def infer(requests, name=name, ins=ins, outs=outs):
                answers = []
                for req in requests:
                    t0 = time.perf_counter()
                    res = exe.graph_on(name, part)([req[n] for n in ins])
                    d = {o: np.ascontiguousarray(v) for o, v in zip(outs, res)}
                    d[COMPUTE] = np.array([time.perf_counter() - t0], np.float64)
                    answers.append(d)
                return answers
            triton.bind(model_name=name, infer_func=infer,
                        inputs=[Tensor(name=i["name"], dtype=_np_dtype(i["dtype"]), shape=tuple(
                            -1 if not isinstance(d, int) else d for d in i["shape"])) for i in entry["inputs"]],
                        outputs=[*(Tensor(name=o["name"], dtype=_np_dtype(o.get("dtype", "float32")), shape=(-1,) * len(
                            o.get("shape") or [0])) for o in entry["outputs"]),
                                 Tensor(name=COMPUTE, dtype=np.float64, shape=(1,))],
                        config=ModelConfig(batching=False), strict=False)

        def echo(requests):
            return [{"n": np.array([req["x"].nbytes], np.int64), COMPUTE: np.zeros(1, np.float64)}
                    for req in requests]
        triton.bind(model_name=ECHO, infer_func=echo, inputs=[Tensor(name="x", dtype=np.uint8, shape=(-1,))],
                    outputs=[Tensor(name="n", dtype=np.int64, shape=(1,)), Tensor(name=COMPUTE, dtype=np.float64,
                                                                               shape=(1,))],
                    config=ModelConfig(batching=False), strict=False)
        log(f"pared serve: {len(graphs)} graph(s) of {path} on device {part!r} at grpc://127.0.0.1:{grpc_port}: "
            f"{', '.join(graphs)}")
        if ready is not None:
            ready.set()
        triton.serve()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`pared serve` in a child process (its own interpreter: the environment with nvidia-pytriton,
    `make` builds it as .venv-serve), for tests and benchmarks: start, wait until every model
    answers, kill (a server dying mid-request), start again.

    Args:
        path: the artifact. part: the device whose graphs it serves.
        python: the interpreter with nvidia-pytriton installed.
    """

    def __init__(self, path: str, part: str = "cloud", *, python: str, startup_timeout: float = 120.0):
        import os
        self.path, self.part, self.python, self.startup_timeout = path, part, python, startup_timeout
        if not os.path.exists(python):
            raise RemoteError(f"no interpreter at {python}: the Triton server runs in its own environment "
                              "(nvidia-pytriton pins numpy < 2); `make install` builds it as .venv-serve")
        self.grpc_port = free_port()
        self.proc = None
        self.log_path = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> "ServerProcess":
        import os
        import subprocess
        import sysconfig
        import tempfile
        libdir = subprocess.run([self.python, "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                                capture_output=True, text=True, check=True).stdout.strip()
        env = dict(os.environ)
        # PyTriton's stub loads the interpreter's libpython
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, sysconfig.get_config_var("LIBDIR"),
                                                              env.get("LD_LIBRARY_PATH", "")) if p)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        fd, self.log_path = tempfile.mkstemp(prefix="pared-serve-", suffix=".log")
        self._log = os.fdopen(fd, "w")
        self.proc = subprocess.Popen(
            [self.python, "-m", "pared.cli", "serve", self.path, "--part", self.part, "--grpc-port",
             str(self.grpc_port), "--http-port", str(free_port()), "--metrics-port", str(free_port())],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import tritonclient.grpc as grpcclient
        deadline = time.perf_counter() + self.startup_timeout
        client = grpcclient.InferenceServerClient(self.url)
        try:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise RemoteError(f"pared serve exited with {self.proc.returncode}: {self.tail()}")
                try:
                    if client.is_server_ready(client_timeout=1.0) and client.is_model_ready(ECHO, client_timeout=1.0):
                        return
                except Exception:
                    pass
                time.sleep(0.2)
            raise RemoteError(f"pared serve did not answer within {self.startup_timeout:.0f} s: {self.tail()}")
        finally:
            client.close()

    def tail(self, n: int = 2000) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def kill(self) -> None:
        """Kill the server and its children at once (no goodbye: a crash)."""
        import os
        import signal
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        self.kill()
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

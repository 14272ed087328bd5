"""The Executor: runs an artifact's Plan on numpy arrays. Torch-free.

    run = pared.load("artifact/")
    y = run(x)                  # one array, a tuple or a dict, as the model returned
    run.reset()                 # between requests of an iterative model

Each graph runs with ONNX Runtime or the TVM runtime, as the manifest says;
the Plan (ir.plan) decides which graphs run per call and carries state between
calls of one request.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import time
import warnings
from typing import Any, Mapping

import numpy as np

from pared.backends.artifact import read_manifest, read_records
from pared.backends.link import wait
from pared.backends.signing import SIGNATURE, UnsignedCodeWarning
from pared.ir import isa
from pared.ir import structure as _structure
from pared.ir.errors import ArtifactError
from pared.ir.plan import Plan, PlanError, PlanRunner
from pared.ir.records import RecordStore

_RUNTIMES = {
    "onnxruntime": ("pared.backends.onnxruntime.runtime", "OrtGraph"),
    "tvm": ("pared.backends.tvm.runtime", "TvmGraph"),
}

_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "int64": np.int64,
           "int32": np.int32, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}


def check_cpu(path: str, manifest: Mapping[str, Any], target: Mapping[str, Any], allow: bool = False) -> None:
    """Refuse (or, with `allow`, warn about) an artifact whose ONNX Runtime integer kernels would
    saturate on this CPU: int8 weights beyond 7 bits (the lowering records their largest |q|)
    run by a CPU provider on an x86 CPU without VNNI or AMX (ir.isa).

    Raises:
        ArtifactError: naming the graph, this CPU, the features it lacks and how to rebuild.
    """
    if target.get("provider") not in isa.CPU_EXECUTION_PROVIDERS:
        return
    worst, graph = 0, None
    for name, entry in manifest["graphs"].items():
        code = int(((entry.get("int8") or {}).get("exact") or {}).get("max_weight_code", 0))
        if entry.get("backend") == "onnxruntime" and code > worst:
            worst, graph = code, name
    why = isa.saturation_risk(isa.host_cpu(), worst)
    if why is None:
        return
    built = manifest["target"].get("isa")
    msg = (f"{path}: graph '{graph}' runs ONNX Runtime integer kernels, built for a CPU with "
           f"{', '.join(built) if built else 'unrecorded features'}; {why}, and its outputs would be wrong. "
           f"Rebuild it on this machine (target 'cpu' reads this CPU) or for a target with int8_weights: 7bit, "
           f"or load it with allow_isa_mismatch=True to run it anyway")
    if not allow:
        raise ArtifactError(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def check_tvm_features(path: str, graph: str, target: Mapping[str, Any]) -> None:
    """Refuse a TVM graph built with CPU extensions this CPU lacks (target `tvm-native`, or a
    `mattr` list): its code would stop the process on an illegal instruction, so no flag allows it.

    Raises:
        ArtifactError: naming the graph, the features missing here and what to build instead.
    """
    tvm_target = target.get("tvm_target") or {}
    mattr = tvm_target.get("mattr") or []
    host = isa.host_cpu()
    if not isinstance(mattr, (list, tuple)) or str(tvm_target.get("mtriple", "")).split("-")[0] not in ("", host.arch):
        return
    missing = isa.missing_mattr(mattr, host)
    if missing:
        raise ArtifactError(
            f"{path}: graph '{graph}' was built by TVM for a CPU with {', '.join(m.lstrip('+') for m in mattr)} "
            f"(target '{target.get('name')}'); this CPU ({host.model or host.arch}) lacks {', '.join(missing)}, and the "
            f"code would stop on an illegal instruction. Rebuild it here (target tvm-native reads this CPU) or for "
            f"target tvm-cpu (the {host.arch} baseline, runs on any such CPU)")


@contextlib.contextmanager
def _malformed(path: str, what: str):
    """The manifest is data: a field of the wrong shape in `what` is an ArtifactError naming it, never a
    KeyError or AttributeError from deep inside the loader."""
    try:
        yield
    except (PlanError, ArtifactError) as e:
        raise ArtifactError(f"{path}: {e}" if not str(e).startswith(path) else str(e)) from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise ArtifactError(f"{path}: the manifest's {what} is malformed ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120] if str(e) else ''}); the artifact is damaged") from None


def _warn_unverified_code(path: str, manifest: Mapping[str, Any], devices: "set | None" = None) -> None:
    """Warn that loading runs the artifact's TVM libraries unverified (those of `devices` only,
    for a per-device artifact)."""
    libs = sorted({e["file"] for e in manifest["graphs"].values() if e.get("backend") == "tvm"
                   and (devices is None or any(d in devices for d in e.get("devices", ())))})
    if not libs:
        return
    why = ("its signature was not checked (no trusted_keys given)" if os.path.isfile(os.path.join(path, SIGNATURE))
           else "it is not signed")
    warnings.warn(f"{path}: loading it executes code from the artifact (TVM shared libraries {', '.join(libs)}) "
                  f"and {why}; load it with trusted_keys=[...] to accept only artifacts signed by a key you trust "
                  "(pared sign)", UnsignedCodeWarning, stacklevel=3)


class Executor:
    """A loaded artifact.

    Args:
        path: the artifact directory.
        threads: override the target's intra-op thread count.
        provider: run the ONNX Runtime graphs on this execution provider instead of
            the target's (e.g. check a cuda or openvino-cpu artifact on a CPU-only host).
        allow_isa_mismatch: load an artifact whose integer kernels would saturate on this
            CPU (full-range int8 weights, no VNNI or AMX here) with a warning instead of
            refusing it: its INT8 layers will be wrong.
        share_weights: ONNX Runtime graphs on the CPU provider read the weights variants
            share (`shared.weights`) from one buffer instead of a copy each, with ORT's
            prepacking off in those sessions: N variants hold them once, a few percent
            slower (backends/onnxruntime/runtime.py). TVM graphs always share theirs.
        shared_arena: ONNX Runtime graphs on the CPU provider take their intermediate
            tensors from one arena per process (the default), so a request moving from
            one variant to another finds its buffers in cache; False: an arena each, as
            ORT does by itself (backends/onnxruntime/runtime.py).
        trusted_keys: Ed25519 public keys (paths to `pared keygen`'s .pub files, PEM or
            raw bytes). When given, the artifact must be signed by one of them: the
            signature over manifest.json, then every file's sha256, are checked before
            any model file is parsed or library loaded. Without them, an artifact with
            TVM shared libraries warns (UnsignedCodeWarning, a RuntimeWarning) that
            loading it runs code from it unverified.
        links: for a partitioned artifact (its Plan names devices and has Transfers), what
            carries each Transfer: a mapping from a (device, device) pair, either order, to a
            link object with `send(array) -> array`, `probe()`, `signal()` and `name`
            (backends.link.EmulatedLink). The Plan's `bandwidth` selectors read each link's
            `signal()` as ``link:NAME``. Without one, a Transfer hands the array over in
            process and the selectors keep their initial bandwidth.
        remote: device name -> a remote device (backends.remote.TritonDevice): the graphs the
            Plan runs on that device are sent to its server (the Transfers to and from it travel
            inside the request), run here when it fails or times out (no step is lost; here is
            the first device the Plan names that is not remote, its `emulate` slowdown applied);
            its measurement of the link is bound as ``link:NAME`` like a link's.
        emulate: device name -> slowdown (>= 1): each graph the Plan runs on that device
            takes `slowdown` times as long as it took here (the runtime sleeps the
            difference), to stand in for a slower device when measuring a partition.
        devices: for an artifact lowered per device (its manifest's `devices`: each graph built
            for the target of the device that runs it), the devices whose graphs this process
            loads and runs, each with its own target (`threads` and `provider` still override).
            None: every device the artifact names except those in `remote`. A graph built for
            another CPU (a TVM cross build for the edge board) cannot load here: leave its device
            out (``devices=["cloud"]``, what `pared serve --part cloud` does) or serve it
            remotely. A Plan call on a device not loaded is an ArtifactError naming it.
        pin: select key -> case label: those selects of the Plan take that case on every call
            instead of choosing (e.g. ``{"partition.main": "first"}`` keeps a partitioned policy
            on the edge; a benchmark's fixed arms). A key or label the Plan lacks is an error
            naming what it has.

    Inputs are checked for count, dtype and shape (TypeError / ValueError naming the
    input). Values are not: NaN and Inf pass through to the runtime and propagate
    through the arithmetic as IEEE floats do (no error, no crash).
    Raises:
        ArtifactError: see backends.artifact.read_manifest; also a graph whose
            backend is unknown or whose runtime cannot load it, and an artifact whose
            integer kernels would saturate on this CPU (see check_cpu). With trusted_keys:
            unsigned, signed by another key, or modified after signing.
    """

    def __init__(self, path: str, *, threads: int | None = None, provider: str | None = None,
                 allow_isa_mismatch: bool = False, share_weights: bool = False, shared_arena: bool = True,
                 trusted_keys: "list | tuple | None" = None, links: "Mapping[Any, Any] | None" = None,
                 emulate: "Mapping[str, float] | None" = None, remote: "Mapping[str, Any] | None" = None,
                 pin: "Mapping[str, str] | None" = None, devices: "list | tuple | None" = None):
        self.path = path
        self.manifest = read_manifest(path, trusted_keys=trusted_keys)
        self.devices = self._device_set(devices, remote)
        if trusted_keys is None:
            _warn_unverified_code(path, self.manifest, self.devices)
        with _malformed(path, "plan"):
            self.plan = Plan.from_json(self.manifest["plan"])
        target = dict(self.manifest["target"])
        over: dict[str, Any] = {}
        if threads is not None:
            over["threads"] = threads
        if provider is not None:
            over["provider"] = provider
        if share_weights:
            over["share_weights"] = True
        if not shared_arena:
            over["shared_arena"] = False
        target.update(over)
        self._overrides = over
        self.target = target
        with _malformed(path, "graphs' int8 checks"):
            check_cpu(path, self.manifest, target, allow_isa_mismatch)
        self.graphs: dict[str, Any] = {}
        self._on: dict[tuple, Any] = {}     # (graph, device) -> its runtime, for a per-device artifact
        for name, entry in self.manifest["graphs"].items():
            backend = entry.get("backend")
            if backend not in _RUNTIMES:
                raise ArtifactError(f"{path}: graph '{name}' has unknown backend {backend!r}")
            mine = target
            if self.devices is not None:
                with _malformed(path, f"graph '{name}' devices"):
                    serve = [d for d in entry["devices"] if d in self.devices]
                    if not serve:
                        continue
                    mine = self._device_target(serve[0]) if serve[0] is not None else target
            if backend == "tvm":
                with _malformed(path, f"graph '{name}' target"):
                    check_tvm_features(path, name, mine)
            modname, clsname = _RUNTIMES[backend]
            cls = getattr(importlib.import_module(modname), clsname)
            try:
                self.graphs[name] = cls(path, entry, mine)
            except ArtifactError as e:
                if self.devices is None:
                    raise
                raise ArtifactError(f"{e}; the artifact builds it for device '{serve[0]}': load only the devices "
                                    f"this host runs (devices=[...], as `pared serve --part NAME` does) or serve "
                                    f"'{serve[0]}' remotely (remote={{'{serve[0]}': ...}})") from None
            except Exception as e:
                raise ArtifactError(f"{path}: graph '{name}' could not be loaded by {backend}: "
                                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
            if self.devices is not None:
                for d in serve:
                    self._on[(entry["graph"], d)] = self.graphs[name]
        with _malformed(path, "plan"):
            self.plan.validate({n: (len(e["inputs"]), len(e["outputs"])) for n, e in self.manifest["graphs"].items()})
        self.structure = self.manifest.get("output_structure", _structure.TENSOR)
        with _malformed(path, "input specs"):
            self._inputs = self._program_inputs()
        self._links = {frozenset(k): v for k, v in (links or {}).items()}
        self._remote = dict(remote or {})
        for pair in self._links:
            if len(pair) != 2:
                raise ValueError(f"links: keys must be pairs of two device names, got {sorted(pair)}")
        self._emulate = dict(emulate or {})
        for dev, k in self._emulate.items():
            if not isinstance(k, (int, float)) or isinstance(k, bool) or not k >= 1:
                raise ValueError(f"emulate: device {dev!r} needs a slowdown >= 1, got {k!r}")
        try:
            self._runner = PlanRunner(self.plan, self._run_graph, transfer=self._transfer,
                                      signals=self._signals if (self._links or self._remote) else None,
                                      transfer_many=self._transfer_many, pin=pin)
        except PlanError as e:
            raise ValueError(f"{path}: {e}") from None
        self._records: RecordStore | None = None

    def _device_set(self, devices, remote) -> "set | None":
        """The devices whose graphs load here (None: not a per-device artifact)."""
        if not self.manifest.get("devices"):
            if devices is not None:
                raise ValueError(f"{self.path}: devices={list(devices)} given, and the artifact is built for one "
                                 f"target ({self.manifest['target'].get('name')}), not per device")
            return None
        # devices with a target of their own, and those a graph names that run on the build target
        with _malformed(self.path, "devices"):
            named = {*self.manifest["devices"], *(d for e in self.manifest["graphs"].values() for d in e["devices"]
                                                  if d is not None)}
        if devices is None:
            return {None, *(d for d in named if d not in (remote or {}))}
        if isinstance(devices, str):
            raise TypeError(f"devices must be a list of device names like [{devices!r}], got the string {devices!r}")
        unknown = [d for d in devices if d not in named]
        if unknown:
            raise ValueError(f"devices: {unknown} not in the artifact; its devices are {sorted(named)}")
        return {None, *devices}

    def _device_target(self, device: str) -> dict:
        """Device's target from the manifest, with this Executor's overrides (threads, provider, ...)."""
        t = dict(self.manifest["devices"].get(device) or self.manifest["target"])
        t.update({k: v for k, v in self._overrides.items() if k != "provider" or t.get("backend") == "onnxruntime"})
        return t

    def graph_on(self, graph: str, device: "str | None") -> Any:
        """The runtime that runs `graph` when the Plan calls it on `device`.

        Raises:
            ArtifactError: a per-device artifact whose graphs for `device` this Executor did not load."""
        if self.devices is None:
            return self.graphs[graph]
        rt = self._on.get((graph, device))
        if rt is None:
            raise ArtifactError(f"{self.path}: the plan runs graph '{graph}' on device {device!r}, and this Executor "
                                f"loaded the graphs of {sorted(d for d in self.devices if d is not None)} only; "
                                "load it with that device in devices=[...] or give it in remote={...}")
        return rt

    def _program_inputs(self) -> list[dict]:
        specs: dict[str, dict] = {}
        for c in self.plan.calls():
            entry = self.manifest["graphs"][c.graph]
            for ref, spec in zip(c.inputs, entry["inputs"]):
                if ref.startswith("in:"):
                    specs.setdefault(ref[3:], spec)
        return [dict(specs.get(n, {"dtype": None, "shape": None}), name=n) for n in self.plan.inputs]

    @property
    def inputs(self) -> list[dict]:
        """Name, dtype and shape (str for a dynamic dim) of each input, in order."""
        return [dict(s) for s in self._inputs]

    @property
    def report(self) -> Mapping[str, Any]:
        """Fidelity and speed measured when the artifact was made."""
        return self.manifest.get("report", {})

    @property
    def records(self) -> RecordStore:
        """What the passes decided and measured, as the Program held them: a RecordStore
        (pared.ir.records) keyed by (record type, graph), `records["QuantPlan"]` for a
        program-wide record. Read on first use. Each is a Record object where its class
        can be imported here (pared's own need torch); without torch they stay the JSON
        objects of the manifest (`{"type": "QuantPlan", ...}`).

        Raises:
            ArtifactError: a record that does not rebuild (see backends.artifact.read_records).
        """
        if self._records is None:
            self._records = read_records(self.path, self.manifest)
        return self._records

    @property
    def trace(self) -> list[str]:
        """The cases the plan chose at each call of the current request ("/"-joined when selects nest)."""
        return list(self._runner.trace)

    @property
    def graph_trace(self) -> list[tuple[str, ...]]:
        """The graphs run at each call since the last reset."""
        return list(self._runner.graph_trace)

    @property
    def state_bytes(self) -> int:
        """Bytes of the state the plan carries now (a KV cache, features reused across calls): 0
        before the request's first call and after reset()."""
        return int(sum(getattr(v, "nbytes", 0) for v in self._runner.state.values()))

    def _run_graph(self, name: str, arrays: list) -> list:
        dev = self._remote.get(self._runner.device) if self._remote else None
        if dev is not None:
            entry = self.manifest["graphs"][name]
            # a fallback runs here, on the first device the plan names that is not remote
            here = next((c.device for c in self.plan.calls() if c.device not in self._remote), None)
            return dev.run(name, [i["name"] for i in entry["inputs"]], arrays,
                           [o["name"] for o in entry["outputs"]], lambda a: self._local(name, a, here))
        return self._local(name, arrays, self._runner.device)

    def _local(self, name: str, arrays: list, device: str | None) -> list:
        run = self.graph_on(name, device)
        k = self._emulate.get(device, 1.0) if self._emulate else 1.0
        if k == 1.0:
            return run(arrays)
        t0 = time.perf_counter()
        out = run(arrays)
        wait((k - 1.0) * (time.perf_counter() - t0))
        return out

    def _transfer(self, value: Any, src: str, dst: str) -> Any:
        if src in self._remote or dst in self._remote:
            return value       # it travels inside the remote call
        link = self._links.get(frozenset((src, dst)))
        if link is None:
            if self._links:
                raise ArtifactError(f"{self.path}: the plan transfers from {src!r} to {dst!r}, and no link between "
                                    f"them was given (links: {[sorted(k) for k in self._links]})")
            return value
        return link.send(value)

    def _transfer_many(self, values: list, src: str, dst: str) -> list:
        """Values crossing together: one message over a link that can send several
        (`send_many`), else one each."""
        link = self._links.get(frozenset((src, dst)))
        if link is not None and hasattr(link, "send_many") and not (src in self._remote or dst in self._remote):
            return list(link.send_many(values))
        return [self._transfer(v, src, dst) for v in values]

    def _signals(self) -> dict:
        return {f"link:{lk.name}": lk.signal() for lk in (*self._links.values(), *self._remote.values())}

    def _check(self, arrays: list) -> list[np.ndarray]:
        out = []
        for spec, a in zip(self._inputs, arrays):
            try:
                a = np.asarray(a)
            except (ValueError, TypeError) as e:
                raise ValueError(f"input '{spec['name']}' is not an array ({str(e).splitlines()[0][:100]})") from None
            want = spec.get("dtype")
            if want and a.dtype != np.dtype(_DTYPES.get(want, want)):
                raise TypeError(f"input '{spec['name']}' must be {want}, got {a.dtype}")
            shape = spec.get("shape")
            if shape is not None:
                if a.ndim != len(shape) or any(isinstance(d, int) and d != s for d, s in zip(shape, a.shape)):
                    raise ValueError(f"input '{spec['name']}' must have shape {shape}, got {list(a.shape)}")
            out.append(np.ascontiguousarray(a))
        return out

    def run_flat(self, *arrays: np.ndarray, **named: np.ndarray) -> list[np.ndarray]:
        """Run one call; outputs as a flat list."""
        names = [s["name"] for s in self._inputs]
        args = list(arrays)
        if named:
            unknown = [k for k in named if k not in names[len(args):]]
            if unknown:
                raise TypeError(f"unknown or duplicate input(s) {unknown}; inputs are {names}")
            args += [named[n] for n in names[len(args):] if n in named]
        if len(args) != len(names):
            raise TypeError(f"expected {len(names)} inputs {names}, got {len(args)}")
        measured = [*self._links.values(), *self._remote.values()]
        counts = [lk.count for lk in measured]
        out = self._runner(self._check(args))
        for lk, n in zip(measured, counts):
            if lk.count == n:   # nothing measured this call (all local, or too few bytes): keep the estimate fresh
                lk.probe()
        return out

    def __call__(self, *arrays: np.ndarray, **named: np.ndarray) -> Any:
        """Run one call; outputs in the model's structure (an array, a tuple or a dict)."""
        return _structure.unflatten(self.structure, self.run_flat(*arrays, **named))

    def reset(self) -> None:
        """Start a new request: clear carried state and the call counter."""
        self._runner.reset()

"""Run one lowered ONNX graph with ONNX Runtime. Torch-free.

The graphs of one artifact store the initializers they have in common once
(`shared.weights`, see shared). By default each session reads and prepacks its own
copy, as ORT does. Loaded with `share_weights=True` (pared.load / Executor), on the
CPU provider each of them is read once per process and every session is handed the
same buffer (SessionOptions.add_initializer), so N variants hold those weights once,
not N times: for a device short of memory. ORT then runs its kernels
without prepacking in those sessions: a kernel that prepacks (MatMul, Gemm, QGemm,
MatMulInteger, ... on the CPU provider) copies its weight into a packed buffer of
its own session, and this onnxruntime's Python API has no shared prepacked-weights
container (the C API's CreateSessionWithPrepackedWeightsContainer), so a prepacked
session would hold its packed copy besides the shared one (more memory than not
sharing). Measured: four variants sharing 10 MB of weights (fp32 MatMul and Gemm,
int8 QGemm and MatMulInteger) grew the process by 11.7 MB shared, 45.9 MB with
per-session copies (tests/backends/test_ort_shared.py); outputs bit-identical. The
price: those kernels pack their weight panels on every call instead of once
(dit_full, 4 timestep buckets under taylor_cache: 452.1 vs. 440.2 ms a batch,
benchmarks/results/compose_buckets.json), hence not the default.
A graph with an op whose unprepacked kernel dequantizes its whole weight on every
call (MatMulNBits) keeps its own prepacked copies even when sharing.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from pared.backends.onnxruntime.shared import SHARED_FILE, SharedWeights, shared_references
from pared.ir.errors import ArtifactError

#: ops whose ORT CPU kernel, unprepacked, dequantizes its whole weight to fp32 on every call
#: (MatMulNBits: +16 MB per call for a 2048x2048 int4 weight): a graph with one is not shared
UNPACKED_SLOW_OPS = frozenset({"MatMulNBits"})

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}


def make_session(path: str, target: Mapping[str, Any], optimized_model_path: str | None = None,
                 profile_prefix: str | None = None, initializers: Mapping[str, Any] | None = None):
    """An InferenceSession with explicit options from the target.

    Thread spinning is off: on a shared machine a spinning pool slowed every
    other process (and our own timings) several-fold. The target's
    `ort_disabled_optimizers` are left out of ORT's graph rewrites.
    For inspection: `optimized_model_path`, where ORT writes the graph it runs;
    `profile_prefix`, ORT's profiler on (session.end_profiling() returns its file).
    `initializers` (name -> OrtValue): used instead of the file's, without prepacking
    (see the module docstring); the session holds them, so they outlive it.

    Raises:
        ArtifactError: when the target's execution provider is not in this onnxruntime.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[target.get("ort_opt_level", "extended")])
    threads = int(target.get("threads") or 0)
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    if optimized_model_path:
        opts.optimized_model_filepath = optimized_model_path
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    for name, value in (initializers or {}).items():
        opts.add_initializer(name, value)
    if initializers:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    provider = target.get("provider") or "CPUExecutionProvider"
    available = ort.get_available_providers()
    if provider not in available:
        raise ArtifactError(f"target '{target.get('name')}' needs {provider}, which this onnxruntime lacks "
                            f"(available: {', '.join(available)}); install the matching onnxruntime build "
                            "(e.g. onnxruntime-gpu for CUDAExecutionProvider, onnxruntime-openvino for "
                            "OpenVINOExecutionProvider)")
    first: Any = provider
    if provider == "OpenVINOExecutionProvider":
        # OpenVINO keeps its own thread pool: the intra-op setting does not reach it
        ov = {"device_type": "CPU"}
        if threads:
            ov["num_of_threads"] = str(threads)
        first = (provider, ov)
    providers = [first] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
    session = ort.InferenceSession(path, sess_options=opts, providers=providers,
                                   disabled_optimizers=disabled_optimizers(target))
    if initializers:
        # ORT keeps only pointers to them; set after the native session, so released after it
        session._pared_initializers = dict(initializers)
    return session


def disabled_optimizers(target: Mapping[str, Any]) -> list[str]:
    """The target's ORT graph rewrites to leave out (`ort_disabled_optimizers`; none in older manifests)."""
    return [str(n) for n in target.get("ort_disabled_optimizers") or ()]


class OrtGraph:
    """One graph of an artifact, run by ONNX Runtime.

    `shared_initializers`: name -> OrtValue of the initializers this session reads from
    the artifact's SharedWeights (the same objects in every graph of the artifact; empty
    when not shared, see the module docstring).

    Raises:
        ArtifactError: `shared.weights` missing or too short for a range the graph reads.
    """

    def __init__(self, artifact_dir: str, entry: Mapping[str, Any], target: Mapping[str, Any]):
        self.entry = entry
        path = os.path.join(artifact_dir, entry["file"])
        self.weights: SharedWeights | None = None       # held: the store lives while any graph of it does
        self.shared_initializers: dict[str, Any] = {}
        if self._shares(entry, target):
            import onnx

            model = onnx.load(path, load_external_data=False)
            if not any(n.op_type in UNPACKED_SLOW_OPS for n in model.graph.node):
                where = f"{artifact_dir}: {entry['file']}"
                self.weights = SharedWeights.get(os.path.join(artifact_dir, SHARED_FILE), where)
                self.shared_initializers = self.weights.initializers(shared_references(model), where)
            del model
        self.session = make_session(path, target, initializers=self.shared_initializers)
        self.input_names = [i["name"] for i in entry["inputs"]]
        self.output_names = [o["name"] for o in entry["outputs"]]

    def __call__(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        feed = {n: a for n, a in zip(self.input_names, arrays)}
        return self.session.run(self.output_names, feed)

    @staticmethod
    def _shares(entry: Mapping[str, Any], target: Mapping[str, Any]) -> bool:
        # only the CPU provider runs on host buffers; other providers place (and copy) weights themselves
        return (SHARED_FILE in entry.get("files", ()) and bool(target.get("share_weights"))
                and (target.get("provider") or "CPUExecutionProvider") == "CPUExecutionProvider")

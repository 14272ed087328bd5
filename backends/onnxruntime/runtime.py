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
(dit_full, 4 timestep buckets under taylor_cache: 470.2 vs. 459.2 ms a batch,
benchmarks/results/compose_buckets.json), hence not the default.
A graph with an op whose unprepacked kernel dequantizes its whole weight on every
call (MatMulNBits) keeps its own prepacked copies even when sharing.

Activations: the sessions on the CPU provider allocate their intermediate tensors from
one arena per process (an ORT environment allocator, `session.use_env_allocators`), not
an arena each. A request that moves between variants (a timestep bucket after another,
every few steps) then finds the buffers the previous session just used in cache; with an
arena each, the first call after a switch ran from memory the other session had evicted:
+3 ms on a 33 ms dit_mnist full step (36.1 vs. 32.8 ms alternating the full graphs of two
buckets vs. one alone; 33.8 vs. 34.2 with one arena), three times per DDIM-50 request with 4
buckets. It also keeps the activation memory of N variants at one variant's: the first
request through dit_full's 12 sessions grew the process by 47 MB, 193 MB with an arena
each. Weights are not shared by this (see share_weights for that): initializers come
from the device allocator, not the arena, which never returns memory while the process
lives. `shared_arena=False` (Executor) gives each session an arena of its own.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from pared.backends.onnxruntime.shared import SHARED_FILE, SharedWeights, shared_references
from pared.ir.errors import ArtifactError

#: ops whose ORT CPU kernel, unprepacked, dequantizes its whole weight to fp32 on every call
#: (MatMulNBits: +16 MB per call for a 2048x2048 int4 weight): a graph with one is not shared
UNPACKED_SLOW_OPS = frozenset({"MatMulNBits"})

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}
_ARENA_LOCK = threading.Lock()
_arena_registered = False


def _shared_arena(ort) -> None:
    """Register the process's CPU arena that sessions with `session.use_env_allocators` share
    (once; ORT keeps it for the life of the process). Extended by what is asked, not the next
    power of two: it holds only activations, whose size the memory pattern plans exactly."""
    global _arena_registered
    with _ARENA_LOCK:
        if not _arena_registered:
            mem = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(mem, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
            _arena_registered = True


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
    On the CPU provider the session takes its activations from the process's shared arena
    unless the target says `shared_arena: false` (see the module docstring).

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
    if provider == "CPUExecutionProvider" and target.get("shared_arena", True):
        _shared_arena(ort)
        opts.add_session_config_entry("session.use_env_allocators", "1")
        # weights from the device allocator: the shared arena keeps what it holds until exit
        opts.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
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
        self.entry, self.target = entry, target
        self.path = path = os.path.join(artifact_dir, entry["file"])
        self.calls = 0                                  # session runs (backends/profile.py counts its warmup by them)
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
        self.calls += 1
        return self.session.run(self.output_names, feed)

    @staticmethod
    def _shares(entry: Mapping[str, Any], target: Mapping[str, Any]) -> bool:
        # only the CPU provider runs on host buffers; other providers place (and copy) weights themselves
        return (SHARED_FILE in entry.get("files", ()) and bool(target.get("share_weights"))
                and (target.get("provider") or "CPUExecutionProvider") == "CPUExecutionProvider")

"""Run one lowered ONNX graph with ONNX Runtime. Torch-free."""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from pared.ir.errors import ArtifactError

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}


def make_session(path: str, target: Mapping[str, Any], optimized_model_path: str | None = None,
                 profile_prefix: str | None = None):
    """An InferenceSession with explicit options from the target.

    Thread spinning is off: on a shared machine a spinning pool slowed every
    other process (and our own timings) several-fold. The target's
    `ort_disabled_optimizers` are left out of ORT's graph rewrites.
    For inspection: `optimized_model_path`, where ORT writes the graph it runs;
    `profile_prefix`, ORT's profiler on (session.end_profiling() returns its file).

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
    return ort.InferenceSession(path, sess_options=opts, providers=providers,
                                disabled_optimizers=disabled_optimizers(target))


def disabled_optimizers(target: Mapping[str, Any]) -> list[str]:
    """The target's ORT graph rewrites to leave out (`ort_disabled_optimizers`; none in older manifests)."""
    return [str(n) for n in target.get("ort_disabled_optimizers") or ()]


class OrtGraph:
    """One graph of an artifact, run by ONNX Runtime."""

    def __init__(self, artifact_dir: str, entry: Mapping[str, Any], target: Mapping[str, Any]):
        self.entry = entry
        self.session = make_session(os.path.join(artifact_dir, entry["file"]), target)
        self.input_names = [i["name"] for i in entry["inputs"]]
        self.output_names = [o["name"] for o in entry["outputs"]]

    def __call__(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        feed = {n: a for n, a in zip(self.input_names, arrays)}
        return self.session.run(self.output_names, feed)

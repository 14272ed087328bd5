"""Run one lowered graph with the TVM runtime (Relax VM). Torch-free.

The graph is a shared library exported by ``tvm.compile(...).export_library``;
its weights are trailing parameters of ``main`` whose values the artifact's
``tvm.weights`` file holds (backends/tvm/weights.py; an artifact built before
that kept them as constants in the library, and its entry lists no params).
When the build moved weight repacks out of ``main`` (the entry's
``transform_params`` names the function, schedule.prepack_weights), that
function runs once at load and ``main`` takes its outputs as its weights. A graph built for another architecture
(a cross build) or left unlinked (no cross linker here) is refused with a
message saying where it can run.
"""
from __future__ import annotations

import os
import platform
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from pared.ir.errors import ArtifactError

_threads_set: int | None = None

#: manifest-entry keys naming functions of the graph's library that run once at load
LOAD_FUNCTIONS = ("transform_params", "workspace")


def _set_threads(n: int) -> None:
    """Size TVM's thread pool once per process (0: leave TVM's default)."""
    global _threads_set
    if not n or _threads_set == n:
        return
    import tvm
    fn = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
    if fn is not None:
        fn(0, int(n))  # affinity mode 0 (big cores), n workers
        _threads_set = n


class TvmGraph:
    """One graph of an artifact, run by TVM's Relax virtual machine on the CPU."""

    def __init__(self, artifact_dir: str, entry: Mapping[str, Any], target: Mapping[str, Any]):
        triple = str((target.get("tvm_target") or {}).get("mtriple", ""))
        if triple and not triple.startswith(platform.machine()):
            raise ArtifactError(f"{artifact_dir}: graph file '{entry.get('file')}' was built for {triple}; it runs on that "
                                f"architecture, not on this {platform.machine()} host")
        if not entry.get("linked", True):
            raise ArtifactError(f"{artifact_dir}: graph file {entry['file']} holds unlinked objects; link them on the target "
                                "(see the manifest's 'link' note) before loading")
        import tvm
        from tvm import relax

        _set_threads(int(target.get("threads") or 0))
        self.entry = entry
        self.lib = tvm.runtime.load_module(os.path.join(artifact_dir, entry["file"]))
        self.device = tvm.cpu(0)
        self.vm = relax.VirtualMachine(self.lib, self.device)
        self.fn = self.vm[entry.get("function", "main")]
        self._tensor = tvm.runtime.tensor
        self.params: list = []
        if entry.get("params"):
            from pared.backends.tvm.weights import WeightStore
            path = os.path.join(artifact_dir, entry["weights_file"])
            if not os.path.isfile(path):
                raise ArtifactError(f"{artifact_dir}: graph file '{entry['file']}' reads its weights from "
                                    f"{entry['weights_file']}, which is missing")
            self._store = WeightStore.get(path, self.device)      # held: graphs of one artifact share it
            self.params = self._store.tensors(entry["params"], f"{artifact_dir}: graph file '{entry['file']}'")
            if entry.get("transform_params"):
                # weight repacks the build moved out of `main` (schedule.prepack_weights): run once here,
                # and `main` takes their outputs in place of the stored weights
                prepack = self.vm[entry["transform_params"]]
                self.params = list(prepack(self.params))
        # main's intermediates, allocated once (schedule.hoist_workspace); reused by every call
        self.workspace: list = list(self.vm[entry["workspace"]]()) if entry.get("workspace") else []
        self._lock = threading.Lock()

    def __call__(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        args = [self._tensor(np.ascontiguousarray(a), self.device) for a in arrays]
        with self._lock:        # the workspace holds one call's intermediates
            out = self.fn(*args, *self.params, *self.workspace)
        if hasattr(out, "numpy"):
            return [out.numpy()]
        return [o.numpy() for o in out]

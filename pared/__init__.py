"""pared: a compiler for redundancy in generative and embodied models.

    import pared
    opt = pared.optimize(model, example_inputs, target="cpu", pipeline="pipeline.yaml")
    opt.save("artifact/")
    run = pared.load("artifact/")       # torch-free
    out = run(*numpy_inputs)

Importing `pared` does not import torch: `pared.load` and the Executor run
where torch is not installed. `optimize` imports it on first use.
"""
from __future__ import annotations

from typing import Any

from pared.ir.errors import (ArtifactError, BackendError, CaptureError, FidelityError, OptionError, ParedError,
                             PassError, PipelineError, TargetError)

__version__ = "0.1.0"

__all__ = [
    "optimize", "load", "Optimized", "Executor", "capture", "get_target", "Target",
    "ParedError", "CaptureError", "OptionError", "PipelineError", "PassError", "TargetError",
    "BackendError", "ArtifactError", "FidelityError", "__version__",
]


def load(path: str, *, trusted_keys: Any = None, **kwargs: Any):
    """Load an artifact directory and return a torch-free Executor (see backends.executor).

    With ``trusted_keys=[...]`` (public key files from `pared keygen`, PEM or raw bytes)
    the artifact must be signed by one of them (`pared sign`); an unsigned, otherwise
    signed or modified artifact is refused before any model file is read.
    """
    from pared.backends.executor import Executor
    return Executor(path, trusted_keys=trusted_keys, **kwargs)


def __getattr__(name: str) -> Any:
    if name in ("optimize", "Optimized"):
        from pared import api
        return getattr(api, name)
    if name == "capture":
        from pared.ir.capture import capture
        return capture
    if name == "Executor":
        from pared.backends.executor import Executor
        return Executor
    if name in ("get_target", "Target"):
        from pared import targets
        return getattr(targets, name)
    raise AttributeError(f"module 'pared' has no attribute {name!r}")

"""Errors pared raises. Torch-free: the Executor raises them too.

Each error's message is one line a user can act on: what failed, where (the
file and line, the pass, the region or node) and what to try.
"""
from __future__ import annotations


class ParedError(Exception):
    """Base of every error pared raises on purpose."""


class CaptureError(ParedError):
    """The model could not be captured to a graph (torch.export failed)."""


class OptionError(ParedError, ValueError):
    """A pass was given an unknown option, a wrong type or an out-of-range value."""


class PipelineError(ParedError):
    """A pipeline file or pass list is malformed."""


class PassError(ParedError):
    """A pass failed; the message names it and the passes that ran before it."""


class PlanError(ParedError):
    """A Plan is malformed: a reference is never produced, a graph is unknown, ..."""


class TargetError(ParedError):
    """Unknown target name or malformed device profile."""


class BackendError(ParedError):
    """Lowering a graph to ONNX Runtime or TVM failed, or its result did not match eager."""


class RecordError(ParedError, ValueError):
    """A record does not rebuild from its JSON (unknown type, unknown or missing field, a value of
    another type than its field's), or a record store was given a malformed key."""


class ArtifactError(ParedError):
    """An artifact directory is missing, tampered, truncated or of a newer schema."""


class FidelityError(ParedError):
    """The optimized model is further from the original than the requested bound.

    Attributes:
        report: the fidelity figures that failed the bound.
    """

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}

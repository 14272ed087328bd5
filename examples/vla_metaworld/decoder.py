"""The token-head policy as a pared Decoder, for pipeline files (model / example_inputs /
calibration hooks): backbone -> 16 greedy action tokens -> 4 actions, with the decoding loop
in the Plan so decoding passes (speculative_decode) can rewrite it.

    pared optimize examples/pipelines/vla_tokens_speculative.yaml
"""
from __future__ import annotations


def _workload():
    from pared.workloads import get_workload
    return get_workload("vla_metaworld", head="tokens", decoder="loop")


def build_model():
    return _workload().build()


def example_inputs() -> tuple:
    """One held-out demonstration observation: (image, instruction ids, normalized state)."""
    return _workload().example_inputs()


def calibration() -> list[tuple]:
    """1024 observations spread over the training demonstration episodes."""
    return _workload().calibration()

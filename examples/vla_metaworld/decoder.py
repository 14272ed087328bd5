"""The policy with its head's loop in the pared Plan, for pipeline files (model /
example_inputs / calibration hooks):

- the token head as a pared Decoder: backbone -> 16 greedy action tokens -> 4 actions, the
  decoding loop in the Plan so decoding passes (speculative_decode) can rewrite it;
- the diffusion head as a pared Denoiser (`*_denoiser` hooks): backbone -> 10 DDIM steps of
  the head -> 8 actions, the steps a steps loop of the Plan so cache passes (action_cache)
  schedule them.

    pared optimize examples/pipelines/vla_tokens_speculative.yaml
    pared optimize examples/pipelines/vla_action_cache.yaml
    pared optimize examples/pipelines/vla_token_reuse.yaml       (the 64-visual-token policy)
"""
from __future__ import annotations


def _workload(head: str = "tokens", policy: str = "base"):
    from pared.workloads import get_workload
    return get_workload("vla_metaworld", head=head, decoder="loop", policy=policy)


def build_model():
    return _workload().build()


def example_inputs() -> tuple:
    """One held-out demonstration observation: (image, instruction ids, normalized state)."""
    return _workload().example_inputs()


def calibration() -> list[tuple]:
    """1024 observations spread over the training demonstration episodes."""
    return _workload().calibration()


def draft_denoiser(steps: int | None = None):
    """The diffusion head of the same backbone as the token head's drafter (speculative_decode's
    `drafter: denoiser`, examples/pipelines/vla_four_composed.yaml): (a pared Denoiser over the
    backbone's cond whose finish bins the first 4 of its 8 actions, its fixed initial noise); its
    10 DDIM steps, or `steps`."""
    import os
    from pared.workloads import example_module
    M, here = example_module("vla_metaworld"), os.path.dirname(os.path.abspath(__file__))
    backbone = os.path.join(here, "vla_diffusion.safetensors")
    policy, _, _ = M.load_policy(backbone)
    head, _ = M.load_token_head(os.path.join(here, "vla_tokens.safetensors"), check_backbone=backbone)
    return M.diffusion_drafter(policy.eval(), head.cfg, steps=steps)


def draft_denoiser_4():
    """draft_denoiser over a 4-step DDIM schedule of the same head: a cheaper, rougher draft."""
    return draft_denoiser(4)


def build_denoiser():
    return _workload("diffusion").build()


def example_inputs_denoiser() -> tuple:
    """One held-out demonstration observation and its noise: (image, ids, state, noise)."""
    return _workload("diffusion").example_inputs()


def calibration_denoiser() -> list[tuple]:
    """1024 observations (with noise) spread over the training demonstration episodes."""
    return _workload("diffusion").calibration()


def holdout_denoiser() -> list[tuple]:
    """64 held-out demonstration observations (with noise): what `pared optimize` judges on."""
    wl = _workload("diffusion")
    import torch
    return [tuple(torch.from_numpy(a) for a in wl._demo_inputs(int(i))) for i in wl.heldout_steps(64)]


def build_policy_call():
    """The diffusion policy as one graph: backbone + the 10 DDIM steps unrolled (what layer_skip
    and token_prune rewrite in examples/pipelines/vla_efficient.yaml)."""
    from pared.workloads import get_workload
    return get_workload("vla_metaworld", head="diffusion", decoder="unrolled").build()


def holdout_policy_call() -> list[tuple]:
    """64 held-out demonstration observations (with noise), as holdout_denoiser."""
    return holdout_denoiser()


def calibration_policy_episodes() -> list[tuple]:
    """The policy calls of 3 training demonstration episodes per task (every 4th step, at most 40
    each), in time order: a stream whose consecutive calls an offload trigger scores."""
    from pared.workloads import get_workload
    wl = get_workload("vla_metaworld", head="diffusion", decoder="unrolled")
    return [x for seq in wl.calibration_sequences(per_task=3, calls=40) for x in seq]


def build_denoiser_64():
    """The diffusion policy whose backbone sees all 64 visual tokens (vla_diffusion_64.safetensors),
    as a pared Denoiser: what token_reuse rewrites in examples/pipelines/vla_token_reuse.yaml."""
    return _workload("diffusion", "all_tokens").build()


def example_inputs_denoiser_64() -> tuple:
    return _workload("diffusion", "all_tokens").example_inputs()


def calibration_denoiser_64() -> list[tuple]:
    """1024 observations (with noise) spread over the training demonstration episodes."""
    return _workload("diffusion", "all_tokens").calibration()


def holdout_denoiser_64() -> list[tuple]:
    """64 held-out demonstration observations (with noise)."""
    return holdout_denoiser()

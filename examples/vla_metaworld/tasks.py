"""Meta-World v3 tasks, instructions, seeded environments and the camera.

Everything here comes from installed packages (mujoco 3.3.0, metaworld 3.1.1);
nothing is downloaded.

Observation choice: the goal is part of the state vector.  We build the
``*-goal-observable`` variant of each environment, whose 39-D observation is
[hand xyz, gripper, object features (14), the same 18 values one step earlier,
goal xyz].  That is the vector the scripted experts read, so the policy sees
exactly the information the expert acted on.  The camera image shows the arm,
the object and (for most tasks) the goal site as well, but the policy is not
required to find the goal in 64x64 pixels.

Rendering is headless (MUJOCO_GL=egl, which here is Mesa llvmpipe on the CPU).
Shadows, reflections, skybox, fog and haze are switched off: 64x64 images
render about 5x faster (~15 ms instead of ~85 ms) and look the same otherwise.
"""
from __future__ import annotations

import os

# Must be set before mujoco creates a GL context.  llvmpipe spawns one thread
# per core unless told otherwise; one is plenty for 64x64.
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("LP_NUM_THREADS", "1")

import warnings

import mujoco
import numpy as np
import metaworld.policies as mw_policies
from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE as _GOAL_OBS_ENVS

# The experts warn about gains > 1 every step; the env clips anyway.
warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")

# (environment name, instruction, scripted expert class)
TASKS: list[tuple[str, str, type]] = [
    ("reach-v3", "reach to the goal position",
     mw_policies.SawyerReachV3Policy),
    ("push-v3", "push the puck to the goal",
     mw_policies.SawyerPushV3Policy),
    ("pick-place-v3", "pick up the puck and place it at the goal",
     mw_policies.SawyerPickPlaceV3Policy),
    ("door-open-v3", "open the door",
     mw_policies.SawyerDoorOpenV3Policy),
    ("drawer-close-v3", "close the drawer",
     mw_policies.SawyerDrawerCloseV3Policy),
    ("button-press-topdown-v3", "press the button from the top",
     mw_policies.SawyerButtonPressTopdownV3Policy),
]
TASK_NAMES = [t[0] for t in TASKS]
INSTRUCTIONS = [t[1] for t in TASKS]

STATE_DIM = 39
ACTION_DIM = 4
IMAGE_SIZE = 64
CAMERA = "corner"

# Seed ranges: demonstrations use [TRAIN_SEED_BASE, ...) and evaluation uses
# [EVAL_SEED_BASE, ...); the task index is folded in so tasks never share seeds.
TRAIN_SEED_BASE = 0
EVAL_SEED_BASE = 100_000


def episode_seed(task_id: int, episode: int, base: int) -> int:
    return base + 1000 * task_id + episode


def make_env(task_id: int):
    """One goal-observable environment for task ``task_id``.

    The metaworld constructor freezes the random object/goal placement; we
    unfreeze it and draw it from the env's own seeded generator, so that
    ``reset_episode(env, seed)`` gives a reproducible, seed-dependent layout.
    """
    name = TASK_NAMES[task_id]
    env = _GOAL_OBS_ENVS[f"{name}-goal-observable"](seed=0)
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    return env


def reset_episode(env, seed: int) -> np.ndarray:
    """Reset ``env`` to the layout determined by ``seed``; returns the state."""
    env.seed(seed)
    obs, _ = env.reset()
    return obs.astype(np.float32)


def make_expert(task_id: int):
    return TASKS[task_id][2]()


def expert_action(expert, obs: np.ndarray) -> np.ndarray:
    return np.clip(expert.get_action(obs), -1.0, 1.0).astype(np.float32)


class Camera:
    """64x64 RGB renderer of one camera, headless, shadows off."""

    def __init__(self, env, camera: str = CAMERA, size: int = IMAGE_SIZE):
        self.env = env
        self.camera = camera
        self.renderer = mujoco.Renderer(env.model, size, size)
        flags = self.renderer.scene.flags
        for f in ("mjRND_SHADOW", "mjRND_REFLECTION", "mjRND_SKYBOX",
                  "mjRND_FOG", "mjRND_HAZE"):
            flags[getattr(mujoco.mjtRndFlag, f)] = 0

    def __call__(self) -> np.ndarray:
        self.renderer.update_scene(self.env.data, camera=self.camera)
        # Meta-World's corner cameras render upside down; flip rows.
        return np.ascontiguousarray(self.renderer.render()[::-1])

    def close(self):
        self.renderer.close()

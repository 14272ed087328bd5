"""Cache passes: reuse features across the calls of an iterative model.

Each pass turns the single denoiser graph into variants (a `full` graph that
also emits the features to cache, `reuse` graphs that take them as inputs and
skip the cached regions) and a Plan that picks the variant per call. All cache
state is explicit graph inputs and outputs carried by the Plan, per request;
each batch row (and each CFG half of a doubled batch) has its own rows of it.
"""
from pared.passes.cache import (action_cache, cfg_skip, delta_cache, expert_cache, interval_cache,  # noqa: F401
                                magnitude_cache, residual_cache, taylor_cache)

"""Generic clean-up rewrites, and fusing plan calls into one graph."""
from pared.passes.generic import constant_folding, dead_code_elimination, fuse_calls  # noqa: F401
from pared.passes.generic import softmax_guard_elimination  # noqa: F401

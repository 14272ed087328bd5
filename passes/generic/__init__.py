"""Generic clean-up rewrites."""
from pared.passes.generic import constant_folding, dead_code_elimination  # noqa: F401
from pared.passes.generic import softmax_guard_elimination  # noqa: F401

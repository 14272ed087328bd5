"""The registry of pared's own passes: every built-in pass and analysis, by pipeline name.

    get_pass("quantize_linears")     the pass class
    REGISTRY                         name -> class, every built-in pass in it once this module is imported

Passes register themselves (`@register_pass` in pared.ir.transform) when their
module is imported. Importing them is the front door's job: ir/ sits below the
passes and analyses and never imports them.
"""
from __future__ import annotations

import pared.analysis.activation_sparsity  # noqa: F401  (each import registers the passes it defines)
import pared.analysis.attention_entropy  # noqa: F401
import pared.analysis.cost  # noqa: F401
import pared.analysis.head_types  # noqa: F401
import pared.analysis.latency  # noqa: F401
import pared.analysis.layer_redundancy  # noqa: F401
import pared.analysis.quant_sensitivity  # noqa: F401
import pared.analysis.redundancy  # noqa: F401
import pared.analysis.token_importance  # noqa: F401
import pared.passes.cache  # noqa: F401
import pared.passes.decode  # noqa: F401
import pared.passes.partition  # noqa: F401
import pared.passes.generic  # noqa: F401
import pared.passes.kv  # noqa: F401
import pared.passes.quant  # noqa: F401
import pared.passes.sparsity  # noqa: F401
from pared.ir.transform import REGISTRY, Pass, UnknownPassError, registered_pass

__all__ = ["REGISTRY", "UnknownPassError", "get_pass"]


def get_pass(name: str) -> type[Pass]:
    """The pass class registered under `name` (built-in passes, and any other pass
    whose module was imported).

    Raises:
        UnknownPassError: naming the closest registered name.
    """
    return registered_pass(name)

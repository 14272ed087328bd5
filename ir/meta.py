"""Every `node.meta` key pared writes, defined once, with its value type.

torch's own keys (`val`, `tensor_meta`, `nn_module_stack`, `stack_trace`) are
read-only for pared. Values stored under these keys must be immutable (str,
int, tuple, frozen dataclass): fx copies `meta` shallowly between graphs.
"""
from __future__ import annotations

from typing import Final

#: str — the region (module path, e.g. "blocks.3.attn") a node was attributed to.
REGION: Final = "pared.ir.region"
#: str — name of the pass that created this node.
CREATED_BY: Final = "pared.ir.created_by"
#: tuple[str, ...] — the target names of the constant nodes folded into this get_attr.
FOLDED_FROM: Final = "pared.generic.folded_from"

#: ir.formats.LinearSpec | ir.formats.ExpertsSpec — a quantization decision still to convert
#: (annotate -> validate -> convert, passes/quant/convert.py): written by a policy on the node it
#: decides for (a linear layer's output node, a stacked expert weight's get_attr), read by the converter.
QUANT_SPEC: Final = "pared.quant.spec"
#: the same value, once converted: on the node that now computes the layer's output (or the
#: dequantized expert stack), so the rewritten graph shows what was decided.
QUANT_CONVERTED: Final = "pared.quant.converted"

ALL_KEYS: Final = (REGION, CREATED_BY, FOLDED_FROM, QUANT_SPEC, QUANT_CONVERTED)

# torch-owned keys pared reads but never writes.
TORCH_NN_MODULE_STACK: Final = "nn_module_stack"
TORCH_STACK_TRACE: Final = "stack_trace"
TORCH_VAL: Final = "val"

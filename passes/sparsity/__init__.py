"""Sparsity passes: remove tokens, neurons and layers that barely change the output.

Each pass decides what to drop or merge (a `...Decisions` record that goes into the
manifest) and rewrites the graph with ordinary ops (gather, matmul, top-k), so the
result lowers to ONNX Runtime and TVM with no custom op.
"""
from pared.passes.sparsity import (layer_skip, moe_dispatch, sparse_attention, sparsify_activations,  # noqa: F401
                                   token_merge, token_prune, token_reuse)

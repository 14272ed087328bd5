"""Decoding passes: rewrite the decoding loop of a captured `pared.ir.decode.Decoder`
(tokens produced one at a time) into cheaper loops: speculative decoding with drafters."""
from pared.passes.decode import speculative_decode  # noqa: F401

"""KV-cache passes: what a streamed generator (a captured pared.ir.stream.Streamer) keeps of the
keys and values of earlier frames, per layer and head (Pyramid Forcing, Dummy Forcing)."""
from pared.passes.kv import kv_policy  # noqa: F401
from pared.passes.kv import kv_drop  # noqa: F401

"""pared.analysis: read-only analyses; each returns one frozen record."""
from pared.analysis import cost, redundancy  # noqa: F401  (registers `cost`, `temporal_redundancy`)

"""pared.analysis: read-only analyses; each returns one frozen record."""
from pared.analysis import cost  # noqa: F401  (registers `cost`)

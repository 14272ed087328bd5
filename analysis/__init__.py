"""pared.analysis: read-only analyses; each returns one frozen record.

Submodules are imported where used (pared.registry imports the analyses it
registers), so that `pared.analysis.metrics` stays importable without torch."""

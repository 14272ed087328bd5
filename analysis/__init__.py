"""pared.analysis: read-only analyses; each returns one frozen record.

Submodules are imported where used (the pass registry imports the analyses it
registers: ir.transform.load_builtin_passes), so that `pared.analysis.metrics`
stays importable without torch."""

"""pared.ir: the Program (named graphs + a Plan), capture, regions and the pass
infrastructure.

Submodules that need torch (capture, program, regions, transform) are imported
on use; `pared.ir.errors`, `pared.ir.plan`, `pared.ir.records` (Record,
RecordStore) and `pared.ir.structure` are torch-free so the Executor can use
them without torch installed.
"""

"""pared.backends: lowering to ONNX Runtime and TVM, the artifact format and the
torch-free Executor.

Lowering modules (`*/lower.py`) import torch; `artifact`, `executor` and the
`*/runtime.py` modules do not.
"""

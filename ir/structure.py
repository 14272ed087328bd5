"""The nested structure of a model's outputs, as JSON, and (un)flattening.

Torch-free: the Executor rebuilds outputs from flat arrays with it. A structure
is a JSON tree:

    {"kind": "tensor"}
    {"kind": "none"}
    {"kind": "tuple" | "list", "items": [structure, ...]}
    {"kind": "dict", "keys": [str, ...], "items": [structure, ...]}

Leaves are counted depth-first in the order torch.export flattens outputs.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

TENSOR = {"kind": "tensor"}


def count_leaves(structure: dict) -> int:
    kind = structure["kind"]
    if kind == "tensor":
        return 1
    if kind == "none":
        return 0
    return sum(count_leaves(s) for s in structure["items"])


def leaf_paths(structure: dict, prefix: str = "") -> list[str]:
    """Names for each leaf, from the keys and indices on its path ("last_hidden_state", "aux.0")."""
    kind = structure["kind"]
    if kind == "tensor":
        return [prefix or "output"]
    if kind == "none":
        return []
    names = structure["keys"] if kind == "dict" else [str(i) for i in range(len(structure["items"]))]
    out: list[str] = []
    for name, item in zip(names, structure["items"]):
        out += leaf_paths(item, f"{prefix}.{name}" if prefix else str(name))
    return out


def output_names(structure: dict) -> list[str]:
    """Leaf names made safe for ONNX and unique."""
    names = [re.sub(r"[^0-9A-Za-z_.]", "_", p) for p in leaf_paths(structure)]
    if structure["kind"] in ("tuple", "list"):
        names = ["output_" + n for n in names]
    seen: dict[str, int] = {}
    unique = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        unique.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return unique


def mark_none(structure: dict, none: Sequence[bool]) -> dict:
    """`structure` with its tensor leaves turned into {"kind": "none"} where `none` (one flag per
    tensor leaf, depth-first) is true: outputs that are always None."""
    it = iter(none)

    def walk(s: dict) -> dict:
        if s["kind"] == "tensor":
            return {"kind": "none"} if next(it) else dict(s)
        if s["kind"] == "none":
            return dict(s)
        return {**s, "items": [walk(i) for i in s["items"]]}

    return walk(structure)


def unflatten(structure: dict, leaves: Sequence[Any]) -> Any:
    """Rebuild the nested outputs from flat leaves. Dicts come back as plain dicts."""
    it = iter(leaves)

    def build(s: dict) -> Any:
        kind = s["kind"]
        if kind == "tensor":
            return next(it)
        if kind == "none":
            return None
        items = [build(i) for i in s["items"]]
        if kind == "tuple":
            return tuple(items)
        if kind == "list":
            return items
        return dict(zip(s["keys"], items))

    result = build(structure)
    rest = list(it)
    if rest:
        raise ValueError(f"{len(rest)} more outputs than the structure holds")
    return result

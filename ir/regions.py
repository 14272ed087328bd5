"""Regions: the module-path tree of a captured graph.

A region is every node that came from one module (`blocks.3`, `blocks.3.attn`),
read from the `nn_module_stack` torch.export keeps on each node. Passes name
regions; users name them with patterns in pipeline options.

Patterns: `*` matches one path component, `**` any number (including none),
`?` one character; everything else is literal. `blocks.*` matches `blocks.3`
but not `blocks.3.attn`; `blocks.**.attn` matches `blocks.3.attn`.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch.fx as fx

from . import meta


@dataclass(frozen=True)
class Region:
    path: str                  # "blocks.3.attn"
    module_type: str           # "torch.nn.modules.linear.Linear"
    nodes: tuple[str, ...]     # names of the call_function nodes inside, in graph order
    inputs: tuple[str, ...]    # names of nodes outside the region read inside it (parameters excluded)
    outputs: tuple[str, ...]   # names of nodes inside the region read outside it
    params: tuple[str, ...]    # get_attr targets (parameters, buffers) read inside it
    children: tuple[str, ...]  # paths of the direct sub-regions

    @property
    def depth(self) -> int:
        return self.path.count(".") + 1


@functools.lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            # "a.**.b" also matches "a.b"
            if out and out[-1] == r"\." and pattern.startswith("**.", i):
                out[-1] = r"(?:\.(?:.*\.)?|\.)"
                i += 3
                continue
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^.]+")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^.]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def match(pattern: str, path: str) -> bool:
    """Whether a region path matches a pattern (see module docstring)."""
    return _compile(pattern).match(path) is not None


def node_module_path(node: fx.Node) -> tuple[tuple[str, str], ...]:
    """(path, type) of each module on the node's stack, outermost first, root excluded."""
    stack = node.meta.get(meta.TORCH_NN_MODULE_STACK) or {}
    out = []
    for path, mtype in stack.values():
        if not path:
            continue
        path = _normalize(path)
        tname = mtype if isinstance(mtype, str) else f"{mtype.__module__}.{mtype.__qualname__}"
        out.append((path, tname))
    return tuple(out)


def _normalize(path: str) -> str:
    # strict-mode export spells paths as L['self'].blocks[0]; keep the dotted form.
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"@\d+$", "", path)
    return path


def region_of(node: fx.Node) -> str:
    """The innermost region a node belongs to ("" for the root)."""
    tag = node.meta.get(meta.REGION)
    if tag is not None:
        return tag
    stack = node_module_path(node)
    return stack[-1][0] if stack else ""


def build_regions(gm: fx.GraphModule) -> dict[str, Region]:
    """All regions of a graph, by path, outer regions before inner ones."""
    members: dict[str, list[fx.Node]] = {}
    types: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        stack = node_module_path(node)
        tag = node.meta.get(meta.REGION)
        if tag is not None and (not stack or stack[-1][0] != tag):
            # a pass re-attributed the node: place it under every prefix of the tag
            stack = tuple((".".join(tag.split(".")[: i + 1]), types.get(tag, "")) for i in range(tag.count(".") + 1))
        for path, tname in stack:
            members.setdefault(path, []).append(node)
            types.setdefault(path, tname)
    regions: dict[str, Region] = {}
    for path in sorted(members, key=lambda p: (p.count("."), _natural(p))):
        nodes = members[path]
        inside = set(nodes)
        inputs: dict[str, None] = {}
        params: dict[str, None] = {}
        outputs: dict[str, None] = {}
        for n in nodes:
            for a in n.all_input_nodes:
                if a in inside:
                    continue
                if a.op == "get_attr":
                    params.setdefault(str(a.target))
                else:
                    inputs.setdefault(a.name)
            if any(u not in inside for u in n.users):
                outputs.setdefault(n.name)
        prefix = path + "."
        children = tuple(p for p in members if p.startswith(prefix) and "." not in p[len(prefix):])
        regions[path] = Region(path, types[path], tuple(n.name for n in nodes), tuple(inputs),
                               tuple(outputs), tuple(params), tuple(sorted(children, key=_natural)))
    return regions


def _natural(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def select(regions: dict[str, Region], pattern: str) -> list[Region]:
    """Regions whose path matches the pattern, in tree order."""
    return [r for p, r in regions.items() if match(pattern, p)]

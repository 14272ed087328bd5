"""Programs, and the functions that close over them, as bytes another process loads back.

A search's trials may run in other processes (analysis/search.py: Ray). What they
need, a Program with its fx graphs, the calibration, a pass's closure that
rebuilds the program at a knob value, travels as one blob:

    blob = dumps(obj)     # in the driver
    obj = loads(blob)     # in a worker (same pared, same torch)

Python objects go through cloudpickle (closures and lambdas by value). fx's own
pickling re-traces a GraphModule from its code, which fails on captured graphs
and drops node metadata, so GraphModules, fake tensors and ops go through
torch's GraphPickler parts instead (torch/fx/_graph_pickler.py, what Inductor's
compile workers use) with every op and every metadata key kept: a loaded graph
has the nodes, names, `val`s and `nn_module_stack`s of the original, so a pass
rewrites it as it would the original.

A loader first imports the pared modules the dumping process had loaded (the ops
they register resolve by name), and a module that another process cannot import
by name (a pipeline file's model.py, loaded by path; a test module) travels by
value.
"""
from __future__ import annotations

import importlib
import io
import pickle
import sys
import types
from typing import Any

#: modules whose loading registers ops a graph may call (the ones the dumping process loaded are
#: imported before loading)
_OP_MODULES = ("pared.ir", "pared.analysis", "pared.passes", "torch.ao.quantization.fx._decomposed")


def _graph_pickler():
    from torch.fx import _graph_pickler as gp
    return gp


def _load_graph_module(data: Any, state: Any) -> Any:
    gm = data.unpickle(state)
    gm.recompile()              # a fresh GraphModule class has no forward until its code is made
    return gm


def _pickler_class():
    import cloudpickle
    import torch
    import torch.fx as fx
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    gp = _graph_pickler()

    class Pickler(cloudpickle.Pickler):
        def __init__(self, file: io.BytesIO):
            super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
            # what GraphPickler's helpers read off their pickler: every op and meta key kept
            self.options = gp.Options(ops_filter=None, node_metadata_key_filter=None)
            self._unpickle_state = gp._UnpickleStateToken(object())
            self._meta_tensor_describer = gp.MetaTensorDescriber(copy_data=False)

        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, FakeTensor):
                return gp._TensorPickleData.reduce_helper(self, obj)
            if isinstance(obj, fx.GraphModule):
                return _load_graph_module, (gp._GraphModulePickleData(obj, self.options), self._unpickle_state)
            if isinstance(obj, (torch._ops.OperatorBase, torch._ops.OpOverloadPacket)):
                return gp._OpPickleData.reduce_helper(self, obj)
            if isinstance(obj, ShapeEnv):
                return gp._ShapeEnvPickleData.reduce_helper(self, obj)
            if isinstance(obj, torch.SymInt):
                return gp._SymNodePickleData.reduce_helper(self, obj)
            return super().reducer_override(obj)

        def persistent_id(self, obj: Any) -> Any:
            return "unpickle_state" if obj is self._unpickle_state else None

    return Pickler


_IMPORTABLE: dict[str, bool] = {}


def _importable(name: str) -> bool:
    """Whether another process finds top-level module `name` by name (sys.meta_path's finders,
    asked afresh rather than through sys.modules)."""
    top = name.split(".")[0]
    if top not in _IMPORTABLE:
        found = False
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            try:
                found = find is not None and find(top, None) is not None
            except Exception:      # a finder that cannot answer for this name
                found = False
            if found:
                break
        _IMPORTABLE[top] = found
    return _IMPORTABLE[top]


def _by_value() -> list[types.ModuleType]:
    """Loaded modules of files another process cannot import by name."""
    out = []
    for name, mod in list(sys.modules.items()):
        if name == "__main__" or not isinstance(mod, types.ModuleType) or not getattr(mod, "__file__", None):
            continue
        if name.startswith("pared_user_") or not _importable(name):
            out.append(mod)
    return out


def dumps(obj: Any) -> bytes:
    """`obj` as bytes for `loads` in another process with the same pared and torch.

    Raises:
        TypeError: something in `obj` cannot travel (an open file, a lock, a C++ object), naming it.
    """
    import cloudpickle
    gp = _graph_pickler()
    mods = sorted(m for m in sys.modules if m.startswith(_OP_MODULES) and sys.modules[m] is not None)
    by_value = _by_value()
    registered = []
    for mod in by_value:
        try:
            cloudpickle.register_pickle_by_value(mod)
            registered.append(mod)
        except ValueError:       # a module that is already registered, or not in sys.modules under its name
            pass
    try:
        with gp.patch_pytree_map_over_slice(), io.BytesIO() as f:
            _pickler_class()(f).dump(obj)
            body = f.getvalue()
    except Exception as e:
        raise TypeError(f"cannot send this search's state to another process: {type(e).__name__}: {e}") from e
    finally:
        for mod in registered:
            cloudpickle.unregister_pickle_by_value(mod)
    return pickle.dumps(mods, protocol=pickle.HIGHEST_PROTOCOL) + body


def loads(data: bytes) -> Any:
    """The object `dumps` wrote (its fake tensors in one new FakeTensorMode)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    gp = _graph_pickler()
    f = io.BytesIO(data)
    for name in pickle.load(f):
        if name not in sys.modules:
            try:
                importlib.import_module(name)
            except ImportError:   # a module of the dumping process this one lacks: its ops are not needed
                pass
    with gp.patch_pytree_map_over_slice():
        state = gp._UnpickleState(FakeTensorMode(shape_env=ShapeEnv()))
        return gp._GraphUnpickler(f, state).load()

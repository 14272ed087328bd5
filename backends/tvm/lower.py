"""Lower one graph with TVM: from_exported_program → tvm.compile → export_library.

The graph's weights are folded as constants, then lifted out as parameters
(backends/tvm/weights.py): the shared library holds code, and one `tvm.weights`
file holds every weight of the artifact once, however many graph variants read
it. A host build
is loaded back and compared with the fx graph before it is shipped. A cross
build (an ``mtriple`` other than this host's) is linked with the target's
cross compiler when one is on PATH; otherwise the compiled objects are shipped
as a ``.tar`` to link on the target, with a warning that says so. Either way
the objects are checked to be ELF files for the target's machine.

Every build fuses the graph (schedule.fuse), replays the schedules tuning databases hold for
its fused functions (tuning.py: the user's own, `databases`, the ones shipped beside the
reference workloads) and gives the rest pared's default schedules (schedule.py: tiled,
vectorized, parallel matmuls; dlight's CPU reduction rule; parallel elementwise loops).
Tuning (``tune=True``) runs MetaSchedule first, into the persistent database under
``cache_dir`` (default ``~/.cache/pared/tvm``); it is off by default and takes minutes.
"""
from __future__ import annotations

import contextlib
import io
import logging
import operator
import os
import platform
import re

import torch.fx as fx
import shutil
import tarfile
from typing import Any, Mapping

from pared.backends.common import (compare, io_spec, judge_forced, needs_retrace, retrace,
                                   to_numpy, where_in_model, with_forced_outputs)
from pared.ir.errors import BackendError
from pared.ir.program import Graph

log = logging.getLogger("pared.backends.tvm")

#: relative L2 error between TVM and the fx graph above which a lowering is refused. A graph that
#: quantizes activations is held to it too, following TVM's own codes (_check_quantized): unforced,
#: one-step flips at rounding boundaries grew to rel L2 0.02-0.03 on all-MiniLM-L6-v2, which a 0.1
#: bound used to absorb.
CHECK_REL_L2 = 1e-4
#: linker options of a shipped library: stripped of its static symbol table (a third of an untuned
#: dit_mnist library; the runtime finds its entry points in the dynamic symbol table, which stays)
LINK_OPTIONS = ["-s"]
#: store the float weights weight-only layers dequantize to as their codes (weights.weight_only_codes); off:
#: the float32 values, as before packing existed (benchmarks/artifact_bytes.py compares the two)
PACK_WEIGHT_ONLY = True
#: ELF e_machine codes for the triples we build for
ELF_MACHINES = {"aarch64": 0xB7, "arm64": 0xB7, "x86_64": 0x3E, "riscv64": 0xF3, "armv7": 0x28, "arm": 0x28}
#: options this backend takes (pipeline `backend:` or optimize(backend_options=...))
OPTIONS = ("tune", "tune_trials", "cache_dir", "rpc", "databases", "fast_math", "workspace")
LINK_HINT = ("install an aarch64 cross linker (Debian/Ubuntu: apt install gcc-aarch64-linux-gnu) and rebuild, "
             "or link the objects on the target: tar xf {file} && gcc -shared -o {name}.so *.o")


def _triple(target: Mapping[str, Any]) -> str:
    return str((target.get("tvm_target") or {}).get("mtriple", ""))


def is_cross(target: Mapping[str, Any]) -> bool:
    t = _triple(target)
    return bool(t) and not t.startswith(platform.machine())


def _unsupported_ops(message: str) -> list[str]:
    """Op names TVM's frontend reported as unsupported, from its error text."""
    m = re.search(r"Unsupported function types?\s*\[([^\]]*)\]", message)
    if m:
        return [s.strip().strip("'\"") for s in m.group(1).split(",") if s.strip()]
    m = re.search(r"[Uu]nsupported (?:op|operator|function)[^:']*[:']\s*'?([\w.:]+)", message)
    return [m.group(1)] if m else []


def _min_dim(node, imp):
    """aten.min.dim -> (values, indices): torch's (min, first index of the min) as a
    min and an argmin (TVM's argmin also takes the first of equal values). Read by
    timestep_quant's table lookup (the nearest calibrated timestep)."""
    from tvm import relax

    x = imp.env[node.args[0]]
    dim = int(node.args[1]) if len(node.args) > 1 else int(node.kwargs.get("dim", 0))
    keep = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    values = imp.block_builder.emit(relax.op.min(x, axis=[dim], keepdims=keep))
    indices = imp.block_builder.emit(relax.op.argmin(x, axis=dim, keepdims=keep))
    return imp.block_builder.emit(relax.Tuple([values, indices]))


def _shift(op_name: str, python_op):
    """x << n / x >> n (tensor or scalar n) in x's integer dtype: unpacking codes stored
    several to a byte (code i = (p >> 4 * i) & 15). A shift by the dtype's width or more
    is not defined in LLVM, where torch gives 0 (or the sign); unpacking never shifts
    that far."""
    def convert(node, imp):
        from tvm import relax
        return imp._binary_op(getattr(relax.op, op_name), python_op)(node)
    return convert


def _select(node, imp):
    """aten.select.int with a negative index taken modulo the dim's size: TVM's own converter
    reads x[:, -1] (a readout token) out of bounds, silently (garbage, not an error)."""
    from tvm import relax

    shape = node.args[0].meta["val"].shape
    dim = int(node.args[1]) % len(shape)
    index = int(node.args[2]) % int(shape[dim])
    return imp.block_builder.emit(relax.op.take(imp.env[node.args[0]], relax.const(index, "int64"), axis=dim))


def _dtype(node) -> str:
    """The TVM dtype name of an fx node's value (torch.float32 -> 'float32')."""
    return str(node.meta["val"].dtype).replace("torch.", "")


def _arg(node, i: int, name: str, default):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _histc(node, imp):
    """aten.histc(x, bins, min, max) with static min < max: each value's bin
    floor((x - min) / (max - min) * bins), the last bin closed (x == max counts in it),
    values outside [min, max] not counted -- torch's CPU rule, as a one-hot sum (static
    shapes). Mixtral's and Qwen3-MoE's count of the tokens routed to each expert."""
    from tvm import relax
    bins = int(_arg(node, 1, "bins", 100))
    lo, hi = float(_arg(node, 2, "min", 0)), float(_arg(node, 3, "max", 0))
    if not lo < hi:
        raise ValueError(f"histc with min {lo} >= max {hi} (a range read from the data) has no static form")
    bb, op = imp.block_builder, relax.op
    x = imp.env[node.args[0]]
    dtype = _dtype(node.args[0])
    flat = bb.emit(op.reshape(x, [-1]))
    pos = bb.emit(op.multiply(op.divide(op.subtract(flat, relax.const(lo, dtype)), relax.const(hi - lo, dtype)),
                              relax.const(float(bins), dtype)))
    idx = bb.emit(op.astype(op.clip(op.floor(pos), 0, bins - 1), "int64"))
    inside = bb.emit(op.logical_and(op.greater_equal(flat, relax.const(lo, dtype)),
                                    op.less_equal(flat, relax.const(hi, dtype))))
    hit = bb.emit(op.logical_and(op.equal(op.expand_dims(idx, 1), op.arange(0, bins, 1, "int64")),
                                 op.expand_dims(inside, 1)))
    return bb.emit(op.sum(op.astype(hit, dtype), axis=[0]))


def _grouped_mm(node, imp):
    """transformers.grouped_mm_fallback(a [S, K], w [E, K, N], offs [E]): rows sorted by
    expert, expert e's rows between offs[e-1] and offs[e] (rows past the last offset are
    zero, as in transformers' loop). Static form: every expert's product of every row
    ([E, S, N], dense stacked experts), each row then takes its own expert's (a one-hot
    sum: exact, the other terms are zeros). E times the work of the grouped loop; the
    shapes no longer depend on the routing."""
    from tvm import relax
    s, e = node.args[0].meta["val"].shape[0], node.args[1].meta["val"].shape[0]
    if not isinstance(s, int) or not isinstance(e, int):
        raise ValueError("transformers.grouped_mm_fallback: the rows and experts must be static for TVM")
    bb, op = imp.block_builder, relax.op
    a, w, offs = (imp.env[n] for n in node.args[:3])
    rows = op.expand_dims(op.arange(0, s, 1, "int64"), 1)
    expert = bb.emit(op.sum(op.astype(op.greater_equal(rows, op.expand_dims(op.astype(offs, "int64"), 0)), "int64"),
                            axis=[1]))                                             # [S]: offsets at or below the row
    mine = bb.emit(op.equal(op.expand_dims(op.arange(0, e, 1, "int64"), 1), op.expand_dims(expert, 0)))   # [E, S]
    every = bb.emit(op.matmul(op.expand_dims(a, 0), w))                            # [E, S, N]
    return bb.emit(op.sum(op.multiply(every, op.astype(op.expand_dims(mine, 2), _dtype(node.args[0]))), axis=[0]))


def _div(node, imp):
    """aten.div.Tensor / div.Tensor_mode (rounding None, 'floor' or 'trunc') in the dtype
    torch gives the result, each operand cast to it (a Python number made a constant of
    it). TVM's own converter typed a Python divisor int32 beside int64 indices, and then
    refused the pair (Mixtral's `index // top_k`), and divided integers as integers where
    torch's true division gives floats."""
    from tvm import relax
    bb, op = imp.block_builder, relax.op
    mode = _arg(node, 2, "rounding_mode", None)
    out = _dtype(node)

    def operand(v):
        if not isinstance(v, fx.Node):
            return relax.const(v, out)
        return imp.env[v] if _dtype(v) == out else op.astype(imp.env[v], out)
    x, y = operand(node.args[0]), operand(node.args[1])
    if "int" not in out:
        q = op.divide(x, y)
        return bb.emit(q if mode is None else op.floor(q) if mode == "floor" else op.trunc(q))
    if mode == "floor":
        return bb.emit(op.floor_divide(x, y))
    # trunc: the quotient of the magnitudes, with the sign of the product
    return bb.emit(op.multiply(op.floor_divide(op.abs(x), op.abs(y)), op.multiply(op.sign(x), op.sign(y))))


def _cumsum(node, imp):
    """aten.cumsum with torch's result dtype: a bool or integer input sums as int64 unless
    `dtype` says otherwise. TVM's converter keeps bool, whose sum LLVM codegen refuses
    (transformers' position ids from the attention mask: `mask.ne(pad).cumsum(-1)`)."""
    from tvm import relax
    x = imp.env[node.args[0]]
    dim = int(_arg(node, 1, "dim", 0))
    want = _arg(node, 2, "dtype", None)
    out = str(want).replace("torch.", "") if want is not None else _dtype(node)
    if _dtype(node.args[0]) != out:
        x = imp.block_builder.emit(relax.op.astype(x, out))
    return imp.block_builder.emit(relax.op.cumsum(x, axis=dim))


def _masked_scatter(node, imp):
    """aten.masked_scatter(self, mask, source): the positions where `mask` (broadcast to
    self's shape) is true take source's values in order, the k-th true position source's
    k-th element (row-major): a cumulative count of the mask gathers them, so the shape
    does not depend on the mask. LLaVA's image features written into the text embedding."""
    from tvm import relax
    bb, op = imp.block_builder, relax.op
    x, mask, src = (imp.env[n] for n in node.args[:3])
    shape = [int(d) for d in node.args[0].meta["val"].shape]
    n_src = 1
    for d in node.args[2].meta["val"].shape:
        n_src *= int(d)
    m = bb.emit(op.reshape(bb.emit(op.broadcast_to(mask, shape)), [-1]))
    k = bb.emit(op.subtract(bb.emit(op.cumsum(bb.emit(op.astype(m, "int64")), axis=0)), relax.const(1, "int64")))
    # positions before the first true one read element 0 (not taken); none reads past the end
    k = bb.emit(op.minimum(bb.emit(op.maximum(k, relax.const(0, "int64"))), relax.const(max(n_src - 1, 0), "int64")))
    picked = bb.emit(op.take(bb.emit(op.reshape(src, [-1])), k, axis=0))
    out = bb.emit(op.where(m, picked, bb.emit(op.reshape(x, [-1]))))
    return bb.emit(op.reshape(out, shape))


def needs_decomposition(ep: Any) -> bool:
    """Whether TVM's frontend should decompose `ep` to core ATen first (its default: a retrace of
    the whole program). pared's graphs are core ATen when captured, so only a graph with an op of
    the default decomposition table, or a nested graph, is decomposed."""
    import torch.export
    return needs_retrace(ep, torch.export.default_decompositions())


RUNTIME_CHECKS = ("_assert_scalar.default", "_assert_async.default", "_assert_async.msg")


def drop_runtime_checks(ep: Any) -> int:
    """Remove the exported program's runtime assertions (`torch._check` on data-dependent
    values: LLaVA's "as many image tokens as image features") and what only they used.
    TVM's frontend converts none of them, and an ONNX file keeps none either; the build's
    check against the fx graph still runs. Returns how many were removed."""
    g = ep.graph_module.graph
    gone = [n for n in g.nodes if n.op == "call_function" and getattr(n.target, "__name__", "") in RUNTIME_CHECKS]
    for n in gone:
        g.erase_node(n)
    if gone:
        changed = True
        while changed:               # what only the checks read: data-dependent scalars, sym_ite, comparisons
            changed = False
            for n in reversed(list(g.nodes)):
                if n.op == "call_function" and not n.users and not _impure(n):
                    g.erase_node(n)
                    changed = True
        ep.graph_module.recompile()
    return len(gone)


def _impure(n: fx.Node) -> bool:
    try:
        return n.is_impure()
    except Exception:
        return True


#: converters for aten ops TVM's PyTorch frontend lacks or gets wrong (its name -> converter(node, importer))
CONVERTERS = {
    "min.dim": _min_dim,
    "select.int": _select,
    "histc.default": _histc,
    "masked_scatter.default": _masked_scatter,
    "cumsum.default": _cumsum,
    "div.Tensor": _div,
    "div.Tensor_mode": _div,
    "grouped_mm_fallback.default": _grouped_mm,
    **{f"{prefix}.{kind}": _shift(op, python_op)
       for op, python_op, prefixes in (("right_shift", operator.rshift, ("bitwise_right_shift", "__rshift__")),
                                       ("left_shift", operator.lshift, ("bitwise_left_shift", "__lshift__")))
       for prefix in prefixes for kind in ("Tensor", "Scalar", "Tensor_Scalar")},
}


def to_relax(graph: Graph, name: str, quant_stats: dict | None = None):
    """The graph as a Relax IRModule with its weights bound as constants.

    A graph holding quantizers lowers its quantized linear layers to uint8 x int8 ->
    int32 matmuls (see backends/tvm/quant.py); `quant_stats` (when given) receives
    the counts of layers lowered each way. Ops the frontend lacks and pared's
    passes emit are converted by CONVERTERS.

    Raises:
        BackendError: naming the ops TVM's frontend does not support.
    """
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from pared.backends.tvm import quant

    ep = retrace(graph)
    drop_runtime_checks(ep)
    stats = quant_stats if quant_stats is not None else {}
    quantized = quant.has_quantizers(ep)
    custom = dict(CONVERTERS)
    if quantized:
        custom.update(quant.convert_map(ep, stats))
        stats.setdefault("int8_matmul", 0)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            mod = from_exported_program(ep, keep_params_as_input=False, unwrap_unit_return_tuple=False,
                                        custom_convert_map=custom, run_ep_decomposition=needs_decomposition(ep))
        if quantized:
            # the fake-quant bindings the integer layers replaced, and the weight-side
            # constants (column sums, s_x * s_w) folded at build time
            mod = relax.transform.DeadCodeElimination()(mod)
            mod = relax.transform.FoldConstant()(mod)
        return mod
    except Exception as e:
        msg = str(e)
        ops = _unsupported_ops(msg)
        if ops:
            where = "; ".join(f"'{op}' is {w}" for op in ops for w in [where_in_model(graph, None, op)] if w)
            raise BackendError(f"graph '{name}': TVM does not support op(s) {', '.join(ops)}"
                               f"{f' ({where})' if where else ''}; use target 'cpu' (ONNX Runtime) or express "
                               "that computation with other torch ops") from e
        first = msg.strip().splitlines()[0] if msg.strip() else ""
        raise BackendError(f"graph '{name}': TVM's PyTorch frontend failed: {type(e).__name__}: {first[:400]}; "
                           "use target 'cpu' (ONNX Runtime)") from e


def _lift_weights(mod, outdir: str, fname: str, gm: Any = None) -> tuple[Any, dict]:
    """Lift the module's constants into parameters and write their values to
    `outdir/fname`; the manifest fields that say so. (A quantized graph's weight-side
    work was folded into constants by to_relax; a float graph is not folded here,
    since FoldConstant would also materialize weights broadcast over the batch, except
    for transposes of constants: weights.fold_transposes, no per-call weight transpose.)
    The float weights that `gm`'s weight-only layers dequantize their codes to are
    stored as those codes (weights.weight_only_codes; dequantized again at load)."""
    from pared.backends.tvm import weights

    mod, _ = weights.fold_transposes(mod)       # weights stored as their matmuls read them
    mod, values = weights.lift(mod)
    if not values:
        return mod, {}
    codes = weights.weight_only_codes(gm) if gm is not None and PACK_WEIGHT_ONLY else None
    return mod, {"params": weights.write(os.path.join(outdir, fname), values, codes), "weights_file": fname}


def _tvm_target(target: Mapping[str, Any]):
    import tvm
    try:
        return tvm.target.Target(dict(target["tvm_target"]))
    except Exception as e:
        raise BackendError(f"target '{target.get('name')}': TVM rejects tvm_target {target['tvm_target']}: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def rpc_config(value: Any) -> dict | None:
    """The `rpc` backend option: {tracker: "HOST:PORT", key: "DEVICE_KEY", session_timeout: seconds}
    (a TVM RPC tracker and the key its device servers registered under), or None.

    Raises:
        BackendError: naming the field that is missing or of the wrong type.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise BackendError(f"tvm backend option 'rpc' takes {{tracker: HOST:PORT, key: NAME}}, got {value!r}")
    unknown = set(value) - {"tracker", "key", "session_timeout"}
    if unknown:
        raise BackendError(f"tvm backend option 'rpc': unknown field {sorted(unknown)[0]!r} (fields: tracker, key, "
                           "session_timeout)")
    host, _, port = str(value.get("tracker", "")).rpartition(":")
    if not host or not port.isdigit():
        raise BackendError(f"tvm backend option 'rpc': 'tracker' must be HOST:PORT, got {value.get('tracker')!r}")
    if not isinstance(value.get("key"), str) or not value["key"]:
        raise BackendError(f"tvm backend option 'rpc': 'key' must name the device key its servers registered "
                           f"with the tracker, got {value.get('key')!r}")
    timeout = value.get("session_timeout", 60)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise BackendError(f"tvm backend option 'rpc': 'session_timeout' must be seconds > 0, got {timeout!r}")
    return {"tracker": f"{host}:{port}", "key": value["key"], "session_timeout": timeout}


def _runner(rpc: Mapping[str, Any] | None):
    """MetaSchedule's runner: this host's ("local"), or an RPCRunner on the tracker's devices."""
    if rpc is None:
        return "local"
    from tvm.s_tir import meta_schedule as ms
    host, _, port = rpc["tracker"].rpartition(":")
    return ms.runner.RPCRunner(ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=rpc["key"],
                                                   session_timeout_sec=int(rpc["session_timeout"])))


def _compile(mod, tvm_target, *, tune: bool, tune_trials: int, cache_dir: str | None, name: str,
             rpc: Mapping[str, Any] | None = None, target_name: str = "", databases: Any = (),
             stats: dict | None = None, fast_math: bool = False, load: dict | None = None,
             workspace: bool = True):
    """Fuse, tune when asked, replay the tuning databases (tuning.py) and schedule the rest by default;
    `load` receives the functions the runtime calls once at load (schedule.finish), for the manifest entry;
    `workspace`: main's planned intermediates allocated once at load (schedule.hoist_workspace)."""
    import tvm

    from pared.backends.tvm import schedule, tuning

    fused = schedule.fuse(tvm_target, fast_math)(mod)
    dirs: list[str] = []
    if tune:
        if "num-cores" not in tvm_target.attrs:
            # MetaSchedule sizes its search by the physical core count the target declares
            tvm_target = tvm.target.Target(dict(tvm_target.export(), **{"num-cores": _physical_cores()}))
        work = tuning.work_dir(cache_dir, rpc)
        tuning.tune(fused, tvm_target, trials=tune_trials, work=work, rpc=rpc, name=name, runner=_runner(rpc))
        dirs.append(work)
    if databases is not False:
        dirs += tuning.sources(target_name, cache_dir, databases)
    dirs = list(dict.fromkeys(dirs))
    with tvm_target:
        replayed = tuning.replay(tuning.open_databases(dirs))(fused)
    done, total = tuning.scheduled_count(replayed)
    if stats is not None:
        stats.update(tuned_functions=done, functions=total,
                     databases=[tuning.describe(d) for d in dirs])
    if dirs:
        log.info("graph '%s': %d of %d fused functions replayed from tuning databases %s", name, done, total,
                 ", ".join(tuning.describe(d) for d in dirs))
    return tvm.compile(replayed, target=tvm_target,
                       relax_pipeline=schedule.finish(tvm_target, load=load, workspace=workspace))


def _physical_cores() -> int:
    try:
        import psutil
        return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:
        return int(os.cpu_count() or 1)


def _check_elf(path: str, triple: str) -> list[str]:
    """Names of the ELF objects in a .so or .tar whose machine matches the triple.

    Raises:
        BackendError: a member is not ELF or is built for another machine.
    """
    want = ELF_MACHINES.get(triple.split("-")[0])
    blobs: list[tuple[str, bytes]] = []
    if path.endswith(".tar"):
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                if m.isfile() and m.name.endswith(".o"):
                    blobs.append((m.name, tf.extractfile(m).read(64)))
    else:
        with open(path, "rb") as f:
            blobs.append((os.path.basename(path), f.read(64)))
    if not blobs:
        raise BackendError(f"{path}: no object files were produced")
    checked = []
    for member, head in blobs:
        if head[:4] != b"\x7fELF":
            raise BackendError(f"{path}: {member} is not an ELF object")
        little = head[5] == 1
        machine = int.from_bytes(head[18:20], "little" if little else "big")
        if want is not None and machine != want:
            raise BackendError(f"{path}: {member} is built for ELF machine {machine:#x}, expected {want:#x} "
                               f"for {triple}")
        checked.append(member)
    return checked


def lower_graph(graph: Graph, name: str, target: Mapping[str, Any], outdir: str, *, tune: bool = False,
                tune_trials: int = 64, cache_dir: str | None = None, rpc: Mapping[str, Any] | None = None,
                databases: Any = None, fast_math: bool = False, workspace: bool = True) -> dict:
    """Compile one graph for a TVM target and return its manifest entry. `workspace` (backend option,
    default true): `main`'s intermediates allocated once at load and reused by every call
    (schedule.hoist_workspace); false: allocated at every call, as TVM's VM does by default.

    Raises:
        BackendError: unsupported ops (named), a TVM compile failure, a host
            build that disagrees with the fx graph, or a cross build whose
            objects are not for the target machine.
    """
    import tvm

    from pared.backends.tvm import quant

    for option, value in (("fast_math", fast_math), ("workspace", workspace)):
        if not isinstance(value, bool):
            raise BackendError(f"tvm backend option '{option}' must be true/false, got {value!r}")
    if not isinstance(tune, bool) or not isinstance(tune_trials, int) or tune_trials < 1:
        raise BackendError(f"tvm backend options: 'tune' must be true/false and 'tune_trials' an int >= 1, "
                           f"got tune={tune!r}, tune_trials={tune_trials!r}")
    rpc = rpc_config(rpc)
    from pared.backends.tvm import tuning
    databases = tuning.databases_option(databases)
    if rpc is not None and not tune:
        raise BackendError("tvm backend option 'rpc' sets where tuning measures candidates; give tune: true too")
    if tune and is_cross(target):
        raise BackendError(f"target '{target.get('name')}': tuning measures candidates on the device; a cross "
                           "build cannot be tuned here (tune on the target, or build untuned; over RPC pared "
                           "tunes only a device of this host's architecture so far)")
    tvm_target = _tvm_target(target)
    inputs, outputs = io_spec(graph)
    quant_stats: dict = {}
    schedules: dict = {}
    load: dict = {}
    mod, lifted = _lift_weights(to_relax(graph, name, quant_stats), outdir, f"{name}.weights", graph.module)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ex = _compile(mod, tvm_target, tune=tune, tune_trials=tune_trials, cache_dir=cache_dir, name=name,
                          rpc=rpc, target_name=str(target.get("name", "")), databases=databases,
                          stats=schedules, fast_math=fast_math, load=load, workspace=workspace)
    except BackendError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BackendError(f"graph '{name}': TVM compile for {target.get('name')} failed: {first[:400]}; "
                           "use target 'cpu' (ONNX Runtime)") from e
    entry: dict[str, Any] = {"backend": "tvm", "function": "main", "inputs": inputs, "outputs": outputs,
                             "tuned": tune, "schedules": schedules, **({"fast_math": True} if fast_math else {}),
                             "tvm_version": tvm.__version__, **lifted,
                             **({"tuned_on": {"tracker": rpc["tracker"], "key": rpc["key"]}} if rpc else {})}
    # run once at load: weight repacks ("transform_params"), main's workspace ("workspace")
    entry.update(load)
    extra = [lifted["weights_file"]] if lifted else []
    triple = _triple(target)
    if not is_cross(target):
        fname = f"{name}.so"
        path = os.path.join(outdir, fname)
        ex.export_library(path, options=LINK_OPTIONS)
        entry.update(file=fname, files=[fname] + extra, linked=True)
        from pared.backends.tvm.runtime import TvmGraph
        got = TvmGraph(outdir, entry, target)(to_numpy(graph.example_inputs))
        if quant.quantizes_activations(graph.module):
            err = _check_quantized(graph, name, tvm_target, outdir, entry, target, got, cache_dir, databases,
                                   fast_math, workspace)
        else:
            # weight-only layers dequantize their codes exactly as the fx graph does
            err = compare(to_numpy(graph.run(*graph.example_inputs)), got)
        if not err["rel_l2"] <= CHECK_REL_L2:
            why = err.get("why") or (f"max abs {err['max_abs']:.3g}, rel L2 {err['rel_l2']:.3g}, "
                                     f"limit {CHECK_REL_L2}")
            raise BackendError(f"graph '{name}': TVM output differs from eager ({why}); use target 'cpu'")
        entry["check"] = err
        _record_quant(entry, quant_stats)
        return entry

    # cross build: link with the cross compiler if there is one, else ship objects
    cc = target.get("cross_compiler")
    if cc and shutil.which(cc):
        from tvm.support import cc as tvm_cc     # TVM 0.27 (tvm.contrib.cc before)
        fname = f"{name}.so"
        path = os.path.join(outdir, fname)
        ex.export_library(path, fcompile=tvm_cc.cross_compiler(cc), options=LINK_OPTIONS)
        entry.update(file=fname, files=[fname] + extra, linked=True)
    else:
        fname = f"{name}.tar"
        path = os.path.join(outdir, fname)
        ex.export_library(path)
        entry.update(file=fname, files=[fname] + extra, linked=False,
                     link=LINK_HINT.format(file=fname, name=name))
        log.warning("graph '%s': no cross linker %s on PATH; shipped unlinked objects %s. %s", name,
                    repr(cc) if cc else "(target has no cross_compiler)", fname, entry["link"])
    entry["check"] = {"structural": True, "elf_objects": _check_elf(path, triple), "triple": triple}
    _record_quant(entry, quant_stats)
    return entry


def _check_quantized(graph: Graph, name: str, tvm_target: Any, outdir: str, entry: dict,
                     target: Mapping[str, Any], got: list, cache_dir: str | None = None,
                     databases: Any = (), fast_math: bool = False, workspace: bool = True) -> dict:
    """A graph that quantizes activations, compared as the ONNX Runtime backend compares one
    (backends/onnxruntime/lower.check_quantized): a second build of the graph that also outputs
    its quantizers' codes, and the fx graph run as the backends round following those codes,
    to CHECK_REL_L2; codes one step away at a rounding boundary are counted, not tolerated."""
    import tempfile

    from pared.backends.tvm.runtime import LOAD_FUNCTIONS, TvmGraph

    check_graph, names = with_forced_outputs(graph)
    n_out = len(graph.output_names)
    with tempfile.TemporaryDirectory(prefix="pared-check-", dir=outdir) as tmp:
        # built as the shipped graph is (weights lifted), so the codes compared are the ones it computes
        mod, lifted = _lift_weights(to_relax(check_graph, name + "_check"), tmp, "check.weights")
        load: dict = {}
        with contextlib.redirect_stdout(io.StringIO()):
            ex = _compile(mod, tvm_target, tune=False, tune_trials=1, cache_dir=cache_dir, name=name + "_check",
                          target_name=str(target.get("name", "")), databases=databases, fast_math=fast_math,
                          load=load, workspace=workspace)
        path = os.path.join(tmp, "check.so")
        ex.export_library(path, options=LINK_OPTIONS)
        outputs = [{"name": n} for n in check_graph.output_names]
        check_entry = {k: v for k, v in entry.items() if k not in ("params", "weights_file", *LOAD_FUNCTIONS)}
        check_entry.update(load)
        values = TvmGraph(tmp, dict(check_entry, file="check.so", outputs=outputs, **lifted), target)(
            to_numpy(graph.example_inputs))
    theirs = dict(zip(names, values[n_out:]))
    return judge_forced(graph.module, graph.example_inputs, theirs, values[:n_out], got, len(names), CHECK_REL_L2)


def finish_program(entries: Mapping[str, dict], outdir: str) -> dict:
    """After every graph is lowered: one `tvm.weights` file holds each weight once
    (see backends/tvm/weights.merge)."""
    from pared.backends.tvm import weights
    return weights.merge(entries, outdir)


def _record_quant(entry: dict, stats: Mapping[str, int]) -> None:
    """The manifest's account of how the quantized layers were lowered: `int8` the
    integer layers (as before), `weight_only` the block-wise weight-only ones, whose
    codes were dequantized to float32 constants at build (see backends/tvm/quant.py)
    and are stored as codes, dequantized again at load (backends/tvm/weights.py)."""
    if not stats:
        return
    entry["int8"] = {k: v for k, v in stats.items() if not k.startswith("weight_only_")}
    wo = {k[len("weight_only_"):-len("_matmul")]: v for k, v in stats.items() if k.startswith("weight_only_")}
    if wo:
        packed = sum(1 for p in entry.get("params", []) if "derive" in p)
        entry["weight_only"] = dict(wo, weights=f"float32 in memory; {packed} stored as their codes, dequantized "
                                                f"at load" if packed else "float32, dequantized at build")

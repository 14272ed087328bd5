"""Lower one graph to ONNX with torch.onnx.export(dynamo=True), then check it.

The exported file is run with ONNX Runtime on the graph's example inputs and
compared with the fx graph; on a mismatch the export is retried without the
exporter's optimizer (it once silently collapsed two chained index_add ops into
an Identity here), and a graph that still differs is refused. No graph is
shipped unchecked.

A graph holding quantizers (`quantized_decomposed` ops, from the quantization
passes) is held to the same bound, compared with the fx graph run as the
backends round and following ORT's own codes (check_quantized: a code one step
away at a rounding boundary is counted, not tolerated as error). It is also
checked for integer kernels: ORT's optimized model must hold QGemm /
MatMulInteger-family ops and no DequantizeLinear feeding a float matmul, and
each integer node unit, run alone on codes at the top of the uint8 range, must
equal exact integer math (int8_check; this catches the u8s8 kernels that
saturate on CPUs without VNNI); the counts go into the manifest entry as `int8`.

pared's own quantized ops (`pared_quant.*`, from quantize_linears' dynamic mode)
are exported through a custom translation table: `dynamic_linear` becomes
DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul -> (Add), the pattern ORT
fuses into DynamicQuantizeMatMul.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import threading
from typing import Any, Callable, Iterator, Mapping

import torch

from pared.backends.common import (compare, export_failure, forced_values, io_spec, judge_forced,
                                   local_decomposition, plain, retrace, to_numpy, where_in_model)
from pared.ir.errors import ArtifactError, BackendError
from pared.ir.program import Graph

log = logging.getLogger("pared.backends.onnxruntime")

#: graphs whose weights exceed this are saved with external data (protobuf caps a file at 2 GB)
EXTERNAL_DATA_BYTES = 1 << 30
#: relative L2 error between ORT and the fx graph above which a lowering is refused. A quantized
#: graph is held to the same bound, compared with the fx graph run as the backends round and
#: following ORT's own codes (check_quantized); the float noise of another summation order then
#: stays at 1e-7..1e-6 where, unforced, one-step flips at rounding boundaries grew to 0.016 on
#: all-MiniLM-L6-v2 (issue 22); a 0.1 bound had hidden saturating kernels.
CHECK_REL_L2 = 1e-4
#: options this backend takes (none yet)
OPTIONS: tuple[str, ...] = ()


def _quiet_exporter() -> None:
    for name in ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch._export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _dynamic_linear_onnx(x, wq, w_scale, bias=None):
    """pared_quant.dynamic_linear in standard ONNX ops (what ORT's quantize_dynamic writes)."""
    from onnxscript import opset18 as op

    xq, x_scale, x_zero_point = op.DynamicQuantizeLinear(x)
    acc = op.MatMulInteger(xq, wq, x_zero_point)
    y = op.Mul(op.Cast(acc, to=1), op.Mul(x_scale, w_scale))     # to=1: FLOAT
    return y if bias is None else op.Add(y, bias)


def custom_translations() -> dict:
    """Translations for pared's own ops that may appear in a graph (torch op -> onnxscript function)."""
    from pared.backends.onnxruntime.translations import gap_translations
    table = gap_translations()
    ns = getattr(torch.ops, "pared_quant", None)
    if ns is not None and hasattr(ns, "dynamic_linear"):
        table[ns.dynamic_linear.default] = _dynamic_linear_onnx
    return table


#: onnxscript rewrite rules left out of the exporter's optimizer: SlicesSplit (Slice pairs -> Split) is
#: the one multi-output rule; its matcher walks the whole graph on every attempt, which made it
#: about 40% of a 1900-node policy graph's export (32 s -> 19.5 s without it, the same graph out)
SKIPPED_REWRITE_RULES = frozenset({"SlicesSplit"})


class _RootOpRule:
    """A rewrite rule tried only at nodes of the op type its pattern's single output node has.
    The rewriter tries each of its rules (46 by default) at every node (353,000 tries for one
    3,100-node graph: a third of the optimizer's time), and a rule whose pattern ends in another op fails at
    its first check (the root node's op type); this one fails before the call. Anything else
    is the rule's own (attribute access goes to it)."""

    def __init__(self, rule: Any, op_type: str):
        self._rule, self._op_type = rule, op_type

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rule, name)

    def try_rewrite(self, model: Any, graph_or_function: Any, node: Any, **kwargs: Any) -> Any:
        if node.op_type != self._op_type:
            return None
        return self._rule.try_rewrite(model, graph_or_function, node, **kwargs)


def _at_root_op(rule: Any) -> Any:
    """`rule` behind a _RootOpRule where its pattern (onnxscript's default single-output matcher)
    ends in one node of a constant op type; else `rule` as it is."""
    try:
        from onnxscript.rewriter import _matcher, _pattern_ir
    except ImportError:                 # another onnxscript layout: every rule at every node
        return rule
    pattern, matcher = getattr(rule, "_target_pattern", None), getattr(rule, "_matcher", None)
    if not (isinstance(pattern, _pattern_ir.GraphPattern) and type(matcher) is _matcher.SimplePatternMatcher
            and pattern.has_single_output_node):
        return rule
    op = pattern.output_node.op
    return _RootOpRule(rule, op.value()) if isinstance(op, _pattern_ir.StringConstantPattern) else rule


def optimize_onnx(model: Any) -> None:
    """The exporter's own optimizer (onnxscript's optimize_ir, then its ONNX fusions) on an
    onnx_ir Model, in place, with the rules in SKIPPED_REWRITE_RULES left out."""
    from onnxscript import optimizer, rewriter
    from onnxscript.rewriter import onnx_fusions

    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    folding = getattr(optimizer, "_constant_folding", None)
    if rules is None or folding is None:    # another onnxscript layout: its optimizer as it is
        optimizer.optimize_ir(model)
        onnx_fusions.fuse(model)
        return
    import onnx_ir as ir
    common = ir.passes.common
    kept = [_at_root_op(r) for r in rules if getattr(r, "name", None) not in SKIPPED_REWRITE_RULES]
    passes = ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager([folding.FoldConstantsPass(shape_inference=True,
                                                         input_size_limit=folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                                         output_size_limit=folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                                                         should_fold=lambda node: None),
                               rewriter.RewritePass(kept), common.RemoveUnusedNodesPass(),
                               common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()],
                              steps=2, early_stop=True),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )
    passes(model)
    onnx_fusions.fuse(model)


_SHORTCUT_LOCK = threading.Lock()
_SHORTCUT_DEPTH = 0
_REGISTRIES: dict[Any, Any] = {}
_TABLES: dict[frozenset, dict] = {}


@contextlib.contextmanager
def exporter_shortcuts() -> Iterator[bool]:
    """Two shortcuts through the pinned exporter's internals (torch.onnx._internal.exporter), each
    giving what the exporter itself would; yields whether they are on.

    - Decomposition: the exporter retraces the program with its decomposition table (ops without
      an ONNX translation, rewritten into ops with one): about half the time of an export. pared's
      graphs are decomposed when captured, so mostly no op is in that table (`decomposed_ops`) and
      the retrace gives back the same ops; then the program goes on as it is (a copy of its graph:
      the exporter edits the graph it translates). Where its only such ops have a rewrite node by
      node (`backends.common.LOCAL_DECOMPOSITIONS`: `aten.squeeze.dims`, in PixArt-α, Flux, Wan,
      HunyuanVideo, LTX-Video, LLaVA), they are rewritten in the copy as the table would; any
      other program with such an op is decomposed.
    - The registry of torchlib's translations, built once per process and opset (about 0.9 s per
      export) and copied for each export (the exporter adds the custom translations to its copy).

    With another layout of the exporter's internals nothing is patched (yields False)."""
    global _SHORTCUT_DEPTH
    try:
        from torch.onnx._internal.exporter import _decomp, _fx_passes, _registration
        decompose = _fx_passes.decompose_with_registry
        from_torchlib = _registration.ONNXRegistry.__dict__["from_torchlib"]
        implemented, table_of = _decomp.get_onnx_implemented_overloads, _decomp.create_onnx_friendly_decomposition_table
    except (ImportError, AttributeError, KeyError):
        yield False
        return

    def lean_decompose(ep: Any, registry: Any) -> Any:
        ops = frozenset(implemented(registry))
        if ops not in _TABLES:
            _TABLES[ops] = table_of(set(ops))
        gm = local_decomposition(ep, _TABLES[ops])
        if gm is None:
            return decompose(ep, registry)
        return ep._update(gm, ep.graph_signature)

    def cached_registry(cls: Any, opset_version: Any = None, **kwargs: Any) -> Any:
        args = {} if opset_version is None else {"opset_version": opset_version}
        key = (cls, opset_version, tuple(sorted(kwargs.items())))
        if key not in _REGISTRIES:
            _REGISTRIES[key] = from_torchlib.__func__(cls, **args, **kwargs)
        base = _REGISTRIES[key]
        registry = cls()
        registry.__dict__.update(base.__dict__)
        registry.functions = {k: list(v) for k, v in base.functions.items()}
        return registry

    with _SHORTCUT_LOCK:
        if _SHORTCUT_DEPTH == 0:
            _fx_passes.decompose_with_registry = lean_decompose
            _registration.ONNXRegistry.from_torchlib = classmethod(cached_registry)
        _SHORTCUT_DEPTH += 1
    try:
        yield True
    finally:
        with _SHORTCUT_LOCK:
            _SHORTCUT_DEPTH -= 1
            if _SHORTCUT_DEPTH == 0:
                _fx_passes.decompose_with_registry = decompose
                _registration.ONNXRegistry.from_torchlib = from_torchlib


def _torch_onnx_export(ep: "torch.export.ExportedProgram", translations: Mapping[Any, Callable]) -> Any:
    """torch.onnx.export of `ep` (dynamo, unoptimized, quiet), through `exporter_shortcuts`; if
    that fails, once more without them (the error then is the exporter's own)."""
    def run() -> Any:
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            return torch.onnx.export(ep, (), dynamo=True, optimize=False, verbose=False, report=False,
                                     custom_translation_table=translations or None)
    with exporter_shortcuts() as on:
        try:
            return run()
        except Exception:
            if not on:
                raise
            log.debug("export through the shortcuts failed; exporting as the exporter does", exc_info=True)
    return run()


def export_onnx(graph: Graph, path: str, *, optimize: bool = True) -> "torch.export.ExportedProgram | None":
    """Write `graph` as an ONNX model at `path` (+ `path.data` when large); returns the
    ExportedProgram it was exported from (the file's value names are its nodes' names), or None
    when the file came from the export cache (PARED_EXPORT_CACHE; `retrace(graph)` gives the same
    program)."""
    import onnx

    from pared.backends.onnxruntime import export_cache

    translations = custom_translations()
    key = export_cache.export_key(graph, optimize=optimize, translations=translations) \
        if export_cache.cache_dir() else None
    if key is not None and export_cache.fetch(key, path):
        log.debug("graph exported from the cache (%s)", key[:12])
        return None
    _quiet_exporter()
    ep = retrace(graph)
    onnx_program = _torch_onnx_export(ep, translations)
    model = onnx_program.model
    if optimize:
        optimize_onnx(model)
    # named after the optimizer, as the exporter does: its CSE and output fixes may replace an output's value
    for values, names in ((model.graph.inputs, graph.input_names), (model.graph.outputs, graph.output_names)):
        for v, name in zip(values, names):
            v.name = name
    weight_bytes = sum(t.numel() * t.element_size() for t in ep.state_dict.values())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    onnx_program.save(path, external_data=external)
    if external:
        onnx.checker.check_model(path, full_check=False)
    else:
        model = onnx.load(path)
        _strip_node_metadata(model)
        onnx.checker.check_model(model, full_check=False)
        onnx.save(model, path)
    if key is not None:
        export_cache.store(key, path)
    return ep


def _strip_node_metadata(model: Any) -> None:
    """Drop the exporter's per-node metadata (torch stack traces, module paths): about 0.85 MB
    of a DiT graph's 1 MB, once per variant file; nothing reads it at run time."""
    for n in model.graph.node:
        del n.metadata_props[:]
    for f in model.functions:
        for n in f.node:
            del n.metadata_props[:]


def _has_quantizers(graph: Graph) -> bool:
    return any(n.op == "call_function" and str(n.target).startswith(("quantized_decomposed.", "pared_quant."))
               for n in graph.module.graph.nodes)


def forced_names(gm: "torch.fx.GraphModule", model: Any) -> dict[str, str]:
    """fx node name -> the ONNX value holding the same thing, for forced_values(gm): by name (the
    exporter names values after the nodes), else, where its optimizer renamed one, the next
    unmatched QuantizeLinear with the same scale and zero point (calibrated scales tell quantizers
    apart; one merged with others of the same input and range by the optimizer is shared) or, for
    a dynamic layer's input, the next unmatched DynamicQuantizeLinear's input. A wrong match shows:
    its codes are many steps away."""
    import numpy as np
    import torch.fx as fx

    from pared.backends.onnxruntime.int8_check import _constants
    consts = _constants(model)
    produced = {o for n in model.graph.node for o in n.output}
    qnodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[1] in consts]
    dqls = [n.input[0] for n in model.graph.node if n.op_type == "DynamicQuantizeLinear"]
    wanted = set(forced_values(gm))
    out: dict[str, str] = {}
    used: set[str] = set()
    for n in gm.graph.nodes:
        if n.name in wanted and n.name in produced:
            out[n.name] = n.name
            used.add(n.name)
    d = 0
    for n in gm.graph.nodes:
        if n.name not in wanted or n.name in out:
            continue
        if str(n.target).startswith("quantized_decomposed.quantize_per_tensor"):
            scale, zp = np.float32(n.args[1]), int(n.args[2])
            same = [q.output[0] for q in qnodes if np.float32(consts[q.input[1]]) == scale and
                    (int(consts[q.input[2]]) if len(q.input) > 2 and q.input[2] in consts else 0) == zp]
            # an unmatched one first; else one the optimizer merged it with (several layers reading
            # one activation with one calibrated range become a single QuantizeLinear)
            pick = next((o for o in same if o not in used), same[0] if same else None)
            if pick is not None:
                out[n.name] = pick
                used.add(pick)
    for n in gm.graph.nodes:                  # dynamic layers' inputs, in order
        if n.op == "call_function" and str(n.target).startswith("pared_quant.dynamic_linear") and \
                isinstance(n.args[0], fx.Node):
            if n.args[0].name not in out and d < len(dqls) and dqls[d] not in used:
                out[n.args[0].name] = dqls[d]
            d += 1
    return out


def with_outputs(path: str, names: list[str], out: str) -> list[str]:
    """Write a copy of the ONNX model at `path` to `out` that also outputs the values `names`
    (those the file has, with a known type); returns the names added."""
    import onnx
    model = onnx.load(path)
    produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    types = {v.name: v for v in list(model.graph.value_info) + list(model.graph.input)}
    have = {o.name for o in model.graph.output}
    added = [n for n in names if n in produced and n in types and n not in have]
    model.graph.output.extend(types[n] for n in added)
    large = sum(i.ByteSize() for i in model.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save(model, out, save_as_external_data=large, location=os.path.basename(out) + ".data")
    return added


def check_quantized(graph: Graph, ep: "torch.export.ExportedProgram", path: str, entry: dict,
                    target: Mapping[str, Any], feed: list, got: list) -> dict:
    """Compare ORT's run of a quantized graph with the fx graph run as the backends round and
    following ORT's own quantized values (backends.common.forced_reference): each quantizer's
    codes may differ by one step on at most CODE_FLIP_SHARE of its elements (float noise upstream
    crossing a rounding boundary), and the outputs then agree to CHECK_REL_L2, as a float graph's.

    Returns:
        compare()'s figures of the outputs, with "codes": the forced run's statistics. A
        difference the bounds do not allow shows as rel_l2 = inf with "why" (the caller refuses it).
    """
    import tempfile

    import onnx

    from pared.backends.onnxruntime.runtime import OrtGraph

    gm = ep.module()
    names = forced_values(gm)
    onnx_name = forced_names(gm, onnx.load(path, load_external_data=False))
    with tempfile.TemporaryDirectory(prefix="pared-check-", dir=os.path.dirname(path)) as tmp:
        probe = os.path.join(tmp, "check.onnx")
        added = with_outputs(path, sorted(set(onnx_name.values())), probe)
        check_entry = dict(entry, file=os.path.relpath(probe, os.path.dirname(path)),
                           outputs=list(entry["outputs"]) + [{"name": n} for n in added])
        values = OrtGraph(os.path.dirname(path), check_entry, target)(feed)
    n_out = len(entry["outputs"])
    by_onnx = dict(zip(added, values[n_out:]))
    theirs = {fx_name: by_onnx[o] for fx_name, o in onnx_name.items() if o in by_onnx}
    return judge_forced(gm, graph.example_inputs, theirs, values[:n_out], got, len(names), CHECK_REL_L2)


def _checks_as_u8(target: Mapping[str, Any], path: str) -> bool:
    """Whether this build checks a copy with uint8 weights: a target whose integer kernels are not
    this CPU's (a GPU provider) holding weights this CPU's u8s8 kernels would saturate on."""
    from pared.backends.onnxruntime.int8_check import max_int8_weight_code
    from pared.ir import isa
    if target.get("provider") in isa.CPU_EXECUTION_PROVIDERS:
        return False
    cpu = isa.host_cpu()
    return isa.u8s8_saturates(cpu.arch, cpu.features) and max_int8_weight_code(path) > isa.QMAX_NO_SATURATION


def layer_names(graph: Graph) -> dict[str, str]:
    """Constant name -> the region (module path) of the layer it belongs to, for messages."""
    from pared.ir import meta
    return {str(n.target): n.meta[meta.REGION] for n in graph.module.graph.nodes
            if n.op == "get_attr" and n.meta.get(meta.REGION)}


_ORT_NODE = (re.compile(r"Node \((?P<node>[^)\s]+)\) Op \((?P<op>\w+)\)"),
             re.compile(r"implementation for (?P<op>\w+)\(\d+\) node with name '(?P<node>[^']+)'"))


def ort_failure(e: BaseException, graph: Graph, name: str) -> str:
    """What went wrong when ONNX Runtime refused or failed on the exported file of graph `name`:
    the ONNX node and op it names, the torch node (the exporter names an ONNX node `node_<fx
    name>`) and its module, and ORT's own first line."""
    text = plain(str(e))
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    m = next((m for m in (p.search(text) for p in _ORT_NODE) if m), None)
    if m is None:
        return (f"graph '{name}': ONNX Runtime cannot run the exported file: {type(e).__name__}: {first[:400]} "
                "(ORT names no node); try target 'tvm-cpu'")
    fx_name = m["node"][len("node_"):] if m["node"].startswith("node_") else m["node"]
    node = next((n for n in graph.module.graph.nodes if n.name == fx_name), None)
    where = where_in_model(graph, fx_name, None) if node is not None else ""
    torch_op = f" (torch op '{node.target}')" if node is not None and node.op == "call_function" else ""
    where = (f"; it is {where}" if where else
             "; that node is not in the captured graph: the exporter's own decompositions made it")
    return (f"graph '{name}': ONNX Runtime cannot run the exported file at ONNX node '{m['node']}' (op {m['op']})"
            f"{torch_op}{where}: a translation of this op, or of one feeding it, gives a shape or type ORT refuses "
            f"or has no kernel for. ORT says: {first[:400]}. Add a translation (backends/onnxruntime/translations.py) "
            "or try target 'tvm-cpu'")


def lower_graph(graph: Graph, name: str, target: Mapping[str, Any], outdir: str) -> dict:
    """Export, check against the fx graph, and return the manifest entry.

    Raises:
        BackendError: naming the graph, when export fails or ORT disagrees with
            eager after the retry without the exporter's optimizer.
    """
    from pared.backends.onnxruntime.runtime import OrtGraph

    fname = f"{name}.onnx"
    path = os.path.join(outdir, fname)
    inputs, outputs = io_spec(graph)
    quantized = _has_quantizers(graph)
    expected = to_numpy(graph.run(*graph.example_inputs))
    feed = to_numpy(graph.example_inputs)
    last_err: dict = {}
    from pared.backends.onnxruntime.matmul_nbits import int4_layers, lower_matmul_nbits
    int4 = int4_layers(graph) if quantized else {}
    for optimize in (True, False):
        for f in (path, path + ".data"):
            if os.path.exists(f):
                os.remove(f)
        try:
            ep = export_onnx(graph, path, optimize=optimize)
            if int4:
                lower_matmul_nbits(path, int4, name)
        except BackendError:
            raise
        except Exception as e:  # exporter and checker raise many types
            raise BackendError(export_failure(e, graph, name)) from e
        entry = {"backend": "onnxruntime", "file": fname, "inputs": inputs, "outputs": outputs,
                 "files": [fname] + ([fname + ".data"] if os.path.exists(path + ".data") else []),
                 "exporter_optimized": optimize}
        # the check always runs on the CPU provider: the build machine may lack the target's device
        check_target = dict(target, provider="CPUExecutionProvider")
        check_path, check_entry = path, entry
        if quantized and _checks_as_u8(target, path):
            # a GPU target's full-range int8 weights on a CPU whose u8s8 kernels saturate: check the
            # same integers as uint8 around 128, which ORT's U8U8 kernels compute exactly
            from pared.backends.onnxruntime.int8_check import as_u8_weights
            check_path = os.path.join(outdir, f".{name}.check-u8.onnx")
            as_u8_weights(path, check_path)
            check_entry = dict(entry, file=os.path.basename(check_path))
        try:
            if quantized:
                # each integer kernel against exact integer math first: a saturating kernel is named
                # by its layer and this CPU's features rather than by the quantizer it throws off
                from pared.backends.onnxruntime.int8_check import check_integer_exactness, max_int8_weight_code
                exact = check_integer_exactness(check_path, check_target, name, layer_names(graph))
                exact["max_weight_code"] = max(exact["max_weight_code"], max_int8_weight_code(path))
                if check_path != path:
                    exact["checked_as"] = "uint8 weights (U8U8) on the build CPU, whose u8s8 kernels saturate"
            try:
                got = OrtGraph(outdir, check_entry, check_target)(feed)
            except (BackendError, ArtifactError):
                raise
            except Exception as e:  # ORT's load and run errors (Fail, NotImplemented, InvalidGraph, ...)
                raise BackendError(ort_failure(e, graph, name)) from e
            if quantized:
                err = check_quantized(graph, ep or retrace(graph), check_path, check_entry, check_target, feed, got)
            else:
                err = compare(expected, got)
            if err["rel_l2"] <= CHECK_REL_L2 and quantized:
                from pared.backends.onnxruntime.int8_check import check_integer_kernels
                kernels = check_integer_kernels(check_path, check_target, name)
        finally:
            if check_path != path and os.path.exists(check_path):
                os.remove(check_path)
        if err["rel_l2"] <= CHECK_REL_L2:
            entry["check"] = err
            if quantized:
                entry["int8"] = kernels
                entry["int8"]["exact"] = exact
                if int4:
                    from pared.backends.onnxruntime.int8_check import check_int4_kernels
                    entry["int4"] = check_int4_kernels(entry["int8"], len(int4), name)
            if not optimize:
                log.warning("graph '%s': the ONNX exporter's optimizer changed results; exported without it", name)
            return entry
        last_err = err
    if last_err.get("why"):
        raise BackendError(f"graph '{name}': ONNX Runtime's quantized run differs from the graph's after export: "
                           f"{last_err['why']}, with and without the exporter's optimizer; try target 'tvm-cpu'")
    raise BackendError(f"graph '{name}': ONNX Runtime output differs from eager after export "
                       f"(max abs {last_err['max_abs']:.3g}, rel L2 {last_err['rel_l2']:.3g}, limit {CHECK_REL_L2}), "
                       "with and without the exporter's optimizer; try target 'tvm-cpu'")


def finish_program(entries: Mapping[str, dict], outdir: str) -> dict:
    """After every graph is lowered: store the initializers several graph files
    hold (the weights graph variants share) once, in `shared.weights` (see shared)."""
    from pared.backends.onnxruntime.shared import share_initializers
    return share_initializers(entries, outdir)

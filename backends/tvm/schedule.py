"""Default CPU schedules for graphs nobody has tuned: a dlight-style rule for dense and
batched matmul (float, and uint8 x int8 -> int32 tensorized with AVX-512 VNNI where the target has it), applied between TVM's fusion and its
lowering, plus dlight's own CPU reduction rule (softmax, norms) and a rule for spatial
functions (parallel, vectorized; transposing copies in square tiles). Before fusion, a
weight broadcast to a batched matmul's batch is dropped (unbroadcast_matmul_weights).

TVM 0.27's CPU pipeline (relax/backend/cpu_generic) legalizes and fuses, then lowers
every PrimFunc as written: one scalar loop nest per op, single-threaded. This module
schedules the PrimFuncs left after FuseOps/FuseTIR:

Before (a fused linear layer, as legalized):
    for i, j, k: C[i, j] += A[i, k] * B[k, j]              "matmul" block, SSR
    for i, j:    D[i, j] = gelu(C[i, j] + bias[j])          epilogue blocks
After (`Matmul`):
    parallel for (io, jo):                                 MR x NR tiles over the cores
        for ii, ji(vec):  acc[ii, ji] = 0                  the accumulator tile, NR = 2 SIMD vectors
        for k, ii(unroll), ji(vec): acc[ii, ji] += A[i, k] * B[k, j]
        for ii, ji(vec):  D[i, j] = gelu(acc[ii, ji] + bias[j])   epilogue on the tile
The tiles run row tile by row tile, or, where the [K, N] operand is larger than
COLUMN_ORDER_BYTES (it would not stay in cache while each row tile reads all of it), column
panel by column panel (jo outer): on a 4096 x 384 x 1536 product, 2.3x faster on AVX-512
(timed by hand; MiniLM's fp32 build in benchmarks/results/tvm_int8_native.json is the workload figure).

The pattern is recognized from the block structure, not the function's name: one
reduction block with spatial iterators S.. and a single reduction iterator k, whose
body is C[s..] = C[s..] + cast(X) * cast(Y), where the output's last index j is the
last index of one operand (contiguous, vectorized) and absent from the other
(broadcast). Every other block must be spatial. Each output element still sums over
k in the same order, so results are bitwise those of the unscheduled function.

The SIMD width is read from the target (LLVM's CPU features for its mcpu / mattr:
AVX-512 16 floats, AVX/AVX2 8, SSE/NEON 4). A target without mcpu builds for the
architecture's baseline (x86-64: SSE2), which LLVM also does.

Reads: PrimFuncs of an IRModule. Writes: the same functions scheduled, marked
``tirx.is_scheduled`` (dlight's mark; scheduled functions are left alone by later rules).
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("pared.backends.tvm")

#: rows of one accumulator tile (unrolled); with NR = 2 vectors, 8 accumulator registers
MR = 4
#: SIMD vectors per accumulator tile row
NR_VECTORS = 2
#: above this many bytes of the [K, N] operand (per batch), tiles run column panel by column
#: panel: each [K, NR] panel of it is read once from cache for every row tile, and the rows are
#: streamed; below it the whole operand stays in cache while the row tiles run across it
COLUMN_ORDER_BYTES = 1 << 20


def _cpu_features(target: Any) -> set[str]:
    """LLVM's CPU features of a target (its mcpu / mattr); empty for a target LLVM cannot describe."""
    from tvm.target import codegen

    try:
        return set(str(f) for f in codegen.llvm_get_cpu_features(target))
    except Exception:
        return set()


def simd_bits(target: Any) -> int:
    """The widest SIMD register, in bits, of an LLVM target's CPU (its mcpu / mattr); the 128-bit
    baseline for a target LLVM cannot describe."""
    feats = _cpu_features(target)
    if "avx512f" in feats:
        return 512
    if "avx" in feats or "avx2" in feats:
        return 256
    return 128


def has_vnni(target: Any) -> bool:
    """Whether an LLVM target's CPU has AVX-512 VNNI (vpdpbusd: u8 x s8 dot products into int32)."""
    return {"avx512vnni", "avx512f"} <= _cpu_features(target)


def _lanes(target: Any, dtype_bits: int) -> int:
    return max(simd_bits(target) // max(dtype_bits, 8), 1)


def _const(expr: Any) -> int | None:
    from tvm import tirx
    return int(expr.value) if isinstance(expr, tirx.IntImm) else None


def _loads(expr: Any) -> list:
    """The buffer loads of a product of (cast) loads, or [] if it is anything else."""
    from tvm.ir import TensorLoad
    from tvm.ir.prim import Cast, Mul
    if isinstance(expr, Cast):
        return _loads(expr.value)
    if isinstance(expr, TensorLoad):
        return [expr]
    if isinstance(expr, Mul):
        a, b = _loads(expr.a), _loads(expr.b)
        return a + b if a and b else []
    return []


def _is_var(expr: Any, var: Any) -> bool:
    from tvm import tirx
    return isinstance(expr, tirx.Var) and expr.same_as(var)


def _uses(expr: Any, var: Any) -> bool:
    from tvm.tirx.analysis import undefined_vars
    return any(v.same_as(var) for v in undefined_vars(expr, []))


def _product(store: Any) -> Any:
    """X * Y of a store C[..] = C[..] + X * Y (either order of the sum); None for another form."""
    from tvm.ir import TensorLoad as Load
    from tvm.ir.prim import Add

    value = store.value
    if not isinstance(value, Add):
        return None
    for acc, prod in ((value.a, value.b), (value.b, value.a)):
        if isinstance(acc, Load) and acc.source.same_as(store.buffer):
            return prod
    return None


def match_matmul(block: Any) -> tuple[int, int] | None:
    """(spatial iterator count, index of the vectorized operand) when the block computes
    C[s0, .., j] += X * Y with one reduction iterator k, j last in C and in one operand
    and absent from the other; else None."""
    from tvm import tirx

    iters = list(block.iter_vars)
    kinds = [iv.iter_type for iv in iters]
    if kinds.count(tirx.IterVar.CommReduce) != 1 or kinds[-1] != tirx.IterVar.CommReduce:
        return None
    if any(k not in (tirx.IterVar.DataPar, tirx.IterVar.CommReduce) for k in kinds) or len(iters) < 3:
        return None
    if block.init is None or not isinstance(block.body, tirx.BufferStore):
        return None
    store = block.body
    spatial = [iv.var for iv in iters[:-1]]
    k = iters[-1].var
    if len(store.indices) != len(spatial) or not all(_is_var(i, v) for i, v in zip(store.indices, spatial)):
        return None
    prod = _product(store)
    if prod is None:
        return None
    ops = _loads(prod)
    if len(ops) != 2:
        return None
    j = spatial[-1]

    def uses(load, var):
        return any(_uses(i, var) for i in load.indices)

    if not all(uses(op, k) for op in ops):
        return None
    contiguous = [n for n, op in enumerate(ops) if op.indices and _is_var(op.indices[-1], j)
                  and not any(_uses(i, j) for i in op.indices[:-1])]
    broadcast = [n for n, op in enumerate(ops) if not uses(op, j)]
    if len(contiguous) != 1 or len(broadcast) != 1:
        return None
    return len(spatial), contiguous[0]


def _output_buffers(func: Any) -> list:
    """The function's parameter buffers (inputs and outputs: neither may be inlined away)."""
    return list(func.params)


def _in(buf: Any, bufs: list) -> bool:
    return any(buf.same_as(b) for b in bufs)


def _pick(extent: int | None, choices: tuple[int, ...]) -> int:
    """The first choice that divides the extent (no tail), else the first choice."""
    if extent is None:
        return choices[0]
    for c in choices:
        if c <= extent and extent % c == 0:
            return c
    return min(choices[0], extent)


def _vectorize_inner(sch: Any, block: Any, lanes: int) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-1]
    extent = _const(sch.get(inner).extent)
    if extent is None or extent < 2:
        return
    if extent <= lanes:
        sch.vectorize(inner)
    else:
        _, vec = sch.split(inner, factors=[None, _pick(extent, (lanes,))])
        sch.vectorize(vec)


def _base():
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
    return CPUScheduleRule


class Matmul(_base()):
    """Dense and batched matmul, float or integer, with fused prologue/epilogue ops."""

    def apply(self, func: Any, target: Any, _tunable: bool) -> Any:
        from tvm import s_tir, tirx

        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root") if _has_root(sch) else None
        if root is None:
            return None
        blocks = list(sch.get_child_blocks(root))
        found = [(b, match_matmul(sch.get(b))) for b in blocks]
        mm = [(b, m) for b, m in found if m is not None]
        if len(mm) != 1:
            return None
        block, (n_spatial, _) = mm[0]
        others = [b for b in blocks if not sch.get(b).same_as(sch.get(block))]
        if any(any(iv.iter_type != tirx.IterVar.DataPar for iv in sch.get(b).iter_vars) for b in others):
            return None  # a second reduction (softmax, norm) shares the function: not ours
        loops = sch.get_loops(block)
        if len(loops) != n_spatial + 1:
            return None
        # the block's iterators must be bound to its loops one to one (as legalized)
        realize = _realize(sch, block)
        if realize is None or not all(_is_var(v, sch.get(l).loop_var) for v, l in zip(realize.iter_values, loops)):
            return None

        if has_vnni(target) and _vnni_operands(sch, block, mm[0][1][1]) is not None:
            try:
                return _schedule_vnni(func, sch.get(block).name_hint, mm[0][1], target)
            except Exception as e:  # a shape or body the intrinsic does not match: the float-style tiles
                log.debug("matmul: VNNI schedule not applied (%s)", str(e).splitlines()[0] if str(e) else e)
        # fused producers and consumers: inline what can be, so the epilogue is one block
        outputs = _output_buffers(func)
        _inline_spatial(sch, block, outputs)
        out_dtype = sch.get(block).writes[0].source.dtype
        lanes = _lanes(target, _bits(out_dtype))
        extents = [_const(sch.get(l).extent) for l in loops]
        if any(e is None for e in extents):
            return None  # symbolic shapes: left to the unscheduled lowering
        n_ext, m_ext = extents[n_spatial - 1], extents[n_spatial - 2]
        nr = _pick(n_ext, (NR_VECTORS * lanes, lanes)) if n_ext >= lanes else n_ext
        # rows of a tile divide the row extent: a tile never spans two batches, which would
        # make its write-back cover rows another tile computes
        mr = _pick(m_ext, (MR, 3, 2, 1))

        batch, (i, j), k = loops[: n_spatial - 2], loops[n_spatial - 2: n_spatial], loops[-1]
        mo, mi = sch.split(i, factors=[None, mr])
        no, ni = sch.split(j, factors=[None, nr])
        k_ext = extents[-1]
        # summation order per element is the same either way (k ascending in each tile)
        by_columns = k_ext * n_ext * _bits(out_dtype) // 8 > COLUMN_ORDER_BYTES
        first, tile = (no, mo) if by_columns else (mo, no)
        sch.reorder(*batch, first, tile, k, mi, ni)
        acc = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(acc, tile, preserve_unit_loops=True)
        # the epilogue (bias, activation, residual...) on the tile while it is hot
        for consumer in _consumers_chain(sch, acc):
            try:
                sch.reverse_compute_at(consumer, tile, preserve_unit_loops=True)
            except Exception:  # an epilogue that is not tile-wise: it runs after, on its own loops
                break
        epilogue = _blocks_under(sch, tile, exclude=(block,))
        outer = sch.fuse(*batch, first, tile)
        sch.parallel(outer)
        for b in epilogue:
            _vectorize_inner(sch, b, lanes)
        sch.unroll(mi)
        sch.vectorize(ni)
        init = sch.decompose_reduction(block, k)
        _vectorize_inner(sch, init, lanes)
        # whatever stayed outside the tile loop (prologue copies, non-tile epilogues)
        for b in sch.get_child_blocks(root):
            if not sch.get(b).same_as(sch.get(block)) and sch.get_loops(b) and \
                    not any(sch.get(lp).same_as(sch.get(outer)) for lp in sch.get_loops(b)):
                _parallel_spatial(sch, b, lanes)
        log.debug("matmul schedule: M=%d N=%d K=%d tile %dx%d, %d lanes, %s", m_ext, n_ext, k_ext, mr, nr, lanes,
                  "column panels outer" if by_columns else "row tiles outer")
        return sch


#: the VNNI intrinsic's tile: 16 int32 columns, 4 values of k per dot product
VNNI_COLS, VNNI_K = 16, 4
#: a block that only repacks a function parameter (MetaSchedule's mark, which TVM's
#: SplitLayoutRewritePreproc splits out of the function)
PREPACK_ANNOTATION = "meta_schedule.layout_rewrite_preproc"


def _vnni_operands(sch: Any, block: Any, contiguous: int) -> tuple[int, int] | None:
    """(read index of A, read index of B) when the matmul block is C[.., i, j] += int32(A[.., i, k])
    * int32(B[k, j]) with A uint8, B an int8 [K, N] matrix, C int32, N a multiple of 16 and K of 4:
    the form VNNI_U8S8 computes. None otherwise."""
    stmt = sch.get(block)
    ops = _loads(_product(stmt.body))    # match_matmul checked the form
    if len(ops) != 2 or str(stmt.body.buffer.dtype) != "int32":
        return None
    b_load, a_load = ops[contiguous], ops[1 - contiguous]
    if str(a_load.source.dtype) != "uint8" or str(b_load.source.dtype) != "int8":
        return None
    k, j = stmt.iter_vars[-1].var, stmt.iter_vars[-2].var
    if len(b_load.indices) != 2 or not (_is_var(b_load.indices[0], k) and _is_var(b_load.indices[1], j)):
        return None
    if not a_load.indices or not _is_var(a_load.indices[-1], k):
        return None
    n_ext, k_ext = _const(stmt.iter_vars[-2].dom.extent), _const(stmt.iter_vars[-1].dom.extent)
    if n_ext is None or k_ext is None or n_ext % VNNI_COLS or k_ext % VNNI_K:
        return None
    reads = [r.source for r in stmt.reads]
    idx = lambda load: next((n for n, r in enumerate(reads) if r.same_as(load.source)), None)
    a_idx, b_idx = idx(a_load), idx(b_load)
    return None if a_idx is None or b_idx is None else (a_idx, b_idx)


def _schedule_vnni(func: Any, name: str, match: tuple[int, int], target: Any) -> Any:
    """The integer matmul tensorized with VNNI_U8S8 (AVX-512 VNNI), on a fresh schedule of `func`:

        B [K, N] int8 -> Bp [N/16, K/4, 16, 4]        repacked in the function (parallel copy)
        parallel for (io, jo):                          MR rows x 16 or 32 columns
            for ko, ii, jt:  C[i, jt*16 : +16] += vpdpbusd(A[i, 4ko : +4], Bp[j/16, ko])
            epilogue on the tile
    A (the quantized activations) stays a buffer of its own block. The sums are exact, in another
    order than the unscheduled loop's: the same int32 results."""
    from tvm import s_tir

    from pared.backends.tvm import intrin

    n_spatial, contiguous = match
    sch = s_tir.Schedule(func)
    block = sch.get_sblock(name)
    outputs = _output_buffers(func)
    _inline_spatial(sch, block, outputs, keep_inputs=True)
    a_idx, b_idx = _vnni_operands(sch, block, contiguous)
    packed = sch.cache_read(block, b_idx, "global")
    sch.transform_layout(packed, ("write", 0),
                         lambda k, j: (j // VNNI_COLS, k // VNNI_K, j % VNNI_COLS, k % VNNI_K))
    # the repack reads only B: split out of the function and, where B is a weight, run once at load
    # (prepack_weights)
    sch.annotate(packed, PREPACK_ANNOTATION, True)
    loops = sch.get_loops(block)
    extents = [_const(sch.get(lp).extent) for lp in loops]
    batch, (i, j), k = loops[: n_spatial - 2], loops[n_spatial - 2: n_spatial], loops[-1]
    mr = _pick(extents[n_spatial - 2], (MR, 3, 2, 1))
    groups = _pick(extents[n_spatial - 1] // VNNI_COLS, (2, 1))
    io, ii = sch.split(i, factors=[None, mr])
    jo, jt, ji = sch.split(j, factors=[None, groups, VNNI_COLS])
    ko, ki = sch.split(k, factors=[None, VNNI_K])
    sch.reorder(*batch, io, jo, ko, ii, jt, ji, ki)
    for consumer in _consumers_chain(sch, block):
        try:
            sch.reverse_compute_at(consumer, jo, preserve_unit_loops=True)
        except Exception:
            break
    epilogue = _blocks_under(sch, jo, exclude=(block,))
    outer = sch.fuse(*batch, io, jo)
    sch.parallel(outer)
    lanes = _lanes(target, 32)
    for b in epilogue:
        _vectorize_inner(sch, b, lanes)
    init = sch.decompose_reduction(block, ko)
    _vectorize_inner(sch, init, lanes)
    sch.tensorize(ji, intrin.VNNI_U8S8)
    root = sch.get_sblock("root")
    for b in sch.get_child_blocks(root):
        if sch.get_loops(b) and not any(sch.get(lp).same_as(sch.get(outer)) for lp in sch.get_loops(b)):
            _parallel_spatial(sch, b, _lanes(target, 8) if sch.get(b).same_as(sch.get(packed)) else lanes)
    log.debug("matmul schedule: VNNI, tile %dx%d", mr, groups * VNNI_COLS)
    return sch


class Elementwise(_base()):
    """Functions of spatial blocks only (transposes, reshapes, activations): the outer
    loops fused and parallel, the innermost vectorized when it has a constant extent."""

    #: below this many elements the thread pool costs more than it saves
    min_parallel = 4096

    def apply(self, func: Any, target: Any, _tunable: bool) -> Any:
        from tvm import s_tir, tirx

        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        if not _has_root(sch):
            return None
        blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
        if not blocks or any(any(iv.iter_type != tirx.IterVar.DataPar for iv in sch.get(b).iter_vars)
                             for b in blocks):
            return None
        _inline_spatial(sch, None, _output_buffers(func))
        blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
        for b in blocks:
            _parallel_spatial(sch, b, _lanes(target, 32), self.min_parallel)
        return sch


def _bits(dtype: str) -> int:
    import re
    m = re.search(r"(\d+)$", str(dtype))
    return int(m.group(1)) if m else 32


def _has_root(sch: Any) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:
        return False


def _realize(sch: Any, block: Any) -> Any:
    """The block's realize, when it is the body of its innermost loop."""
    loops = sch.get_loops(block)
    body = sch.get(loops[-1]).body if loops else None
    return body if hasattr(body, "iter_values") and body.block.same_as(sch.get(block)) else None


def _inline_spatial(sch: Any, keep: Any, outputs: list, keep_inputs: bool = False) -> None:
    """Inline spatial blocks into their consumers (or producers) until none moves; with
    `keep_inputs`, the blocks that write what `keep` reads stay blocks (a tensorized operand
    must be a buffer)."""
    from tvm import tirx
    root = sch.get_sblock("root")
    kept_reads = [r.source for r in sch.get(keep).reads] if keep_inputs and keep is not None else []
    progress = True
    while progress:
        progress = False
        for b in sch.get_child_blocks(root):
            if keep is not None and sch.get(b).same_as(sch.get(keep)):
                continue
            if any(iv.iter_type != tirx.IterVar.DataPar for iv in sch.get(b).iter_vars):
                continue
            for op in (sch.compute_inline, sch.reverse_compute_inline):
                if op is sch.compute_inline and any(_in(w.source, outputs + kept_reads) for w in sch.get(b).writes):
                    continue
                if op is sch.reverse_compute_inline and keep is not None and \
                        any(r.source.same_as(sch.get(keep).writes[0].source) for r in sch.get(b).reads):
                    continue  # the epilogue stays a block of its own, computed at the tile
                try:
                    op(b)
                except Exception:
                    continue
                progress = True
                break
            if progress:
                break


def _consumers_chain(sch: Any, block: Any) -> list:
    """The blocks downstream of `block`, producers first."""
    out, frontier, seen = [], [block], set()
    while frontier:
        nxt = []
        for b in frontier:
            for c in sch.get_consumers(b):
                name = sch.get(c).name_hint
                if name not in seen:
                    seen.add(name)
                    out.append(c)
                    nxt.append(c)
        frontier = nxt
    return out


def _blocks_under(sch: Any, loop: Any, exclude: tuple) -> list:
    ex = [sch.get(b) for b in exclude]
    return [b for b in sch.get_child_blocks(loop) if not any(sch.get(b).same_as(e) for e in ex)]


#: side of the square tiles of a transposing copy
TILE = 16


def _transposes(sch: Any, block: Any, loops: list) -> bool:
    """Whether a read of the block does not run along its innermost iterator (a transpose)."""
    stmt = sch.get(block)
    realize = _realize(sch, block)
    if realize is None or len(loops) < 2 or not _is_var(realize.iter_values[-1], sch.get(loops[-1]).loop_var):
        return False
    inner = stmt.iter_vars[-1].var
    for r in stmt.reads:
        idx = [rg.min for rg in r.region]
        if len(idx) >= 2 and any(_uses(i, inner) for i in idx) and not _uses(idx[-1], inner):
            return True
    return False


def _parallel_spatial(sch: Any, block: Any, lanes: int, min_parallel: int = 0) -> None:
    """Vectorize the innermost loop of a spatial block and run its outer loops in parallel."""
    loops = sch.get_loops(block)
    extents = [_const(sch.get(lp).extent) for lp in loops]
    if not loops or any(e is None for e in extents):
        return
    total = 1
    for e in extents:
        total *= e
    if total < 2:
        return
    if _transposes(sch, block, loops) and extents[-1] >= TILE and extents[-2] >= TILE:
        # read along one axis, written along another: square tiles keep both in cache
        i1, i0 = loops[-2], loops[-1]
        o1, t1 = sch.split(i1, factors=[None, TILE])
        o0, t0 = sch.split(i0, factors=[None, TILE])
        sch.reorder(o1, o0, t1, t0)
        _vectorize_inner(sch, block, lanes)
        if total >= min_parallel:
            sch.parallel(sch.fuse(*sch.get_loops(block)[:len(loops)]))
        return
    _vectorize_inner(sch, block, lanes)
    loops = sch.get_loops(block)
    if total >= min_parallel and len(loops) > 1:
        outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        sch.parallel(outer)


def rules() -> list:
    """The default rules, in the order they are tried on each PrimFunc."""
    from tvm.s_tir import dlight
    return [Matmul(), dlight.cpu.Reduction(), Elementwise()]


def default_schedule():
    """The pass: pared's rules applied to every PrimFunc not scheduled yet."""
    from tvm.s_tir import dlight
    return dlight.ApplyDefaultSchedule(*rules())


def _shape(expr: Any) -> tuple | None:
    """The static shape of a Relax tensor expression, or None."""
    try:
        return tuple(int(d) for d in expr.ty.shape)
    except Exception:
        return None


def unbroadcast_matmul_weights():
    """A Relax pass: matmul(A [b.., m, k], broadcast_to(W [k, n], [b.., k, n])) ->
    matmul(A, W), and broadcast_to(x, shape of x) -> x. torch's decomposition of a linear
    layer on a batched input (nn.MultiheadAttention's in_proj: bmm(expand(x), expand(W.T)))
    copies the weight once per batch at every call; relax.matmul broadcasts by itself, and
    each output element is the same sum in the same order."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    a, w, shape = wildcard(), wildcard(), wildcard()
    matmul = is_op("relax.matmul")(a, is_op("relax.broadcast_to")(w, shape))
    x, xshape = wildcard(), wildcard()
    noop = is_op("relax.broadcast_to")(x, xshape)

    def drop_weight_broadcast(call, m):
        if not isinstance(call, relax.Call):  # rewrite_call also offers the bound variable
            return call
        sa, sw, sb = _shape(m[a]), _shape(m[w]), _shape(call.args[1])
        if None in (sa, sw, sb) or len(sw) != 2 or len(sa) < 3 or sb[-2:] != sw or sa[:-2] != sb[:-2]:
            return call
        return relax.op.matmul(m[a], m[w], out_dtype=call.attrs.out_dtype)

    def drop_noop_broadcast(call, m):
        if not isinstance(call, relax.Call):
            return call
        sx, sb = _shape(m[x]), _shape(call)
        return m[x] if sx is not None and sx == sb else call

    @tvm.transform.module_pass(opt_level=0, name="pared.tvm.unbroadcast_matmul_weights")
    def _pass(mod, _ctx):
        for gv, f in list(mod.functions_items()):
            if isinstance(f, relax.Function):
                mod[gv] = rewrite_call(noop, drop_noop_broadcast, rewrite_call(matmul, drop_weight_broadcast, f))
        return mod

    return _pass


def patch_convs_as_matmuls():
    """A Relax pass: a patchifying conv2d (stride = kernel, no padding, no dilation, one group,
    NCHW / OIHW, the input's height and width multiples of the kernel's: a ViT's patch embedding)
    becomes the matmul it is:
        x [N, C, H, W] -> [N, C, H/p, p, W/q, q] -> [N, H/p, W/q, C, p, q] -> [N*H/p*W/q, C*p*q]
        @ w [O, C, p, q] -> [O, C*p*q] -> transposed; -> [N, H/p, W/q, O] -> [N, O, H/p, W/q]
    so pared's matmul schedule covers it (TVM's default conv2d is a scalar loop nest: 1.24 ms a
    call for the VLA's 8x8 patch embedding, against 0.09 ms in ONNX Runtime). Each output sums the
    same products in another order (float rounding, held to the build's check)."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    x, w = wildcard(), wildcard()
    conv = is_op("relax.nn.conv2d")(x, w)

    def as_matmul(call, m):
        if not isinstance(call, relax.Call):
            return call
        at = call.attrs
        sx, sw = _shape(m[x]), _shape(m[w])
        if sx is None or sw is None or len(sx) != 4 or len(sw) != 4:
            return call
        n, c, h, wd = sx
        o, ci, p, q = sw
        if (str(at.data_layout), str(at.kernel_layout), str(at.out_layout)) != ("NCHW", "OIHW", "NCHW") or \
                int(at.groups) != 1 or ci != c or [int(v) for v in at.strides] != [p, q] or \
                any(int(v) != 0 for v in at.padding) or any(int(v) != 1 for v in at.dilation) or \
                h % p or wd % q or (at.out_dtype and str(at.out_dtype) not in ("", str(m[x].ty.dtype))):
            return call
        hp, wq = h // p, wd // q
        op = relax.op
        cols = op.reshape(op.permute_dims(op.reshape(m[x], (n, c, hp, p, wq, q)), [0, 2, 4, 1, 3, 5]),
                          (n * hp * wq, c * p * q))
        y = op.matmul(cols, op.permute_dims(op.reshape(m[w], (o, c * p * q)), [1, 0]))
        return op.permute_dims(op.reshape(y, (n, hp, wq, o)), [0, 3, 1, 2])

    @tvm.transform.module_pass(opt_level=0, name="pared.tvm.patch_convs_as_matmuls")
    def _pass(mod, _ctx):
        for gv, f in list(mod.functions_items()):
            if isinstance(f, relax.Function):
                mod[gv] = rewrite_call(conv, as_matmul, f)
        return mod

    return _pass


def fast_math_legalizations() -> dict:
    """Legalizations of erf, tanh, exp, GELU (both forms) and softmax with TVM's polynomial
    approximations (topi.fast_erf / fast_tanh / fast_exp, Eigen's): plain arithmetic that the
    schedules vectorize, where the exact ones are scalar libm calls per element (GELU's erf or tanh
    was 36-39% of the DiTs' untuned time). Not bit-identical: each is within a few float32 ulps
    except exp, clamped to [-88.38, 88.38] (exp(-inf) gives 6e-39, not 0); the build's check
    against the fx graph holds it to CHECK_REL_L2 like any other build."""
    import math

    from tvm import te, tirx, topi

    def unary(fn, hint):
        return lambda bb, call: bb.call_te(fn, call.args[0], primfunc_name_hint=hint)

    def gelu(x: te.Tensor):
        erf = topi.fast_erf(x * tirx.const(0.5 ** 0.5, x.dtype))
        return x * (tirx.const(0.5, x.dtype) + erf * tirx.const(0.5, x.dtype))

    def gelu_tanh(x: te.Tensor):
        c = tirx.const(math.sqrt(2.0 / math.pi), x.dtype)
        inner = topi.fast_tanh(c * x * (1 + tirx.const(0.044715, x.dtype) * x * x))
        return tirx.const(0.5, x.dtype) * x * (tirx.const(1.0, x.dtype) + inner)

    def softmax(bb, call):
        return bb.call_te(topi.nn.fast_softmax, call.args[0], int(call.attrs.axis), primfunc_name_hint="fast_softmax")

    return {"relax.erf": unary(topi.fast_erf, "fast_erf"), "relax.tanh": unary(topi.fast_tanh, "fast_tanh"),
            "relax.exp": unary(topi.fast_exp, "fast_exp"), "relax.nn.gelu": unary(gelu, "fast_gelu"),
            "relax.nn.gelu_tanh": unary(gelu_tanh, "fast_gelu_tanh"), "relax.nn.softmax": softmax}


def fuse(target: Any, fast_math: bool = False):
    """The first half of every pared TVM build: weight broadcasts dropped, patchifying convs as
    matmuls (patch_convs_as_matmuls), then TVM's CPU
    library dispatch, legalization and fusion (relax/backend/cpu_generic). Its PrimFuncs are
    what tuning measures and what a tuning database is keyed by (tuning.py). `fast_math`:
    erf / tanh / exp / GELU / softmax legalized as polynomial approximations
    (fast_math_legalizations)."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    legalize = cpu.legalize_passes(target)
    if fast_math:
        assert legalize[0].info.name == "LegalizeOps", legalize[0].info.name
        legalize = [relax.transform.LegalizeOps(customize_legalize_map=fast_math_legalizations())] + legalize[1:]

    @tvm.transform.module_pass(opt_level=0, name="pared.tvm.fuse")
    def _fuse(mod, _ctx):
        with target:
            return tvm.transform.Sequential([unbroadcast_matmul_weights(), patch_convs_as_matmuls(),
                                             relax.transform.DeadCodeElimination()]
                                            + cpu.library_dispatch_passes(target) + legalize)(mod)

    return _fuse


def finish(target: Any, database: Any = None, load: dict | None = None, workspace: bool = True):
    """The second half: schedules replayed from a tuning database (None: none), pared's default
    schedules for every PrimFunc still unscheduled, weight repacks moved to load time
    (prepack_weights), then TVM's CPU lowering. With `load` (a dict the caller reads after the
    build), `main`'s statically planned intermediates also become a workspace allocated once at
    load (hoist_workspace), and `load` receives the functions the runtime must call once:
    {"transform_params": ..., "workspace": ...} (runtime.TvmGraph does both). Without it (or with
    `workspace` false) `main` keeps its signature, for callers that run it themselves."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from pared.backends.tvm import tuning

    final = cpu.finalize_passes(target)
    assert final[0].info.name == "StaticPlanBlockMemory", final[0].info.name
    if load is not None and workspace:
        final = final[:1] + [hoist_workspace(load)] + final[1:]

    @tvm.transform.module_pass(opt_level=0, name="pared.tvm.finish")
    def _finish(mod, _ctx):
        with target:
            mod = tuning.replay(database)(mod)
            return tvm.transform.Sequential([default_schedule(), prepack_weights(target, load)]
                                            + cpu.dataflow_lower_passes(target) + final)(mod)

    return _finish


#: the function hoist_workspace makes: main's planned intermediates, allocated once
WORKSPACE = "main_workspace"


def _static_shape(expr: Any) -> bool:
    from tvm import relax, tirx

    return isinstance(expr, relax.ShapeExpr) and all(isinstance(v, tirx.IntImm) for v in expr.values)


def hoist_workspace(load: dict | None = None):
    """`main`'s intermediates as a workspace allocated once at load instead of at every call.

    TVM's StaticPlanBlockMemory gives `main` storages of fixed size and views into them at fixed
    offsets (`R.memory.alloc_storage` / `R.memory.alloc_tensor`); the VM executes each of those
    at every call, one `vm.builtin.alloc_tensor` per intermediate (over a thousand per call of
    the VLA's policy graph). Here each static view becomes a trailing parameter of `main`, and
    WORKSPACE (no parameters) allocates the same storages and returns the same views, in order;
    the runtime calls it once and passes its views to every call of `main`, one call at a time
    (the views are reused, so calls must not overlap: runtime.TvmGraph holds a lock).

    Function outputs are never planned into these storages (StaticPlanBlockMemory leaves a
    tensor that reaches the result, through reshapes too, to a per-call allocation), so what a
    call returns is not overwritten by the next. Views of a storage with a symbolic size, or used
    by anything but its views, stay per call. Run after StaticPlanBlockMemory, before
    KillAfterLastUse; `load["workspace"]` is set when the function was made."""
    import tvm
    from tvm import ir, relax

    @tvm.transform.module_pass(opt_level=0, name="pared.tvm.hoist_workspace")
    def _hoist(mod, _ctx):
        names = [gv.name_hint for gv in mod.get_global_vars()]
        if "main" not in names or WORKSPACE in names:
            return mod
        main = mod["main"]
        if not isinstance(main, relax.Function) or not isinstance(main.body, relax.SeqExpr):
            return mod
        storage_op, tensor_op = ir.Op.get("relax.memory.alloc_storage"), ir.Op.get("relax.memory.alloc_tensor")

        def call_of(b, op):
            return isinstance(b, relax.VarBinding) and isinstance(b.value, relax.Call) and b.value.op.same_as(op)

        top = [b for block in main.body.blocks for b in block.bindings]
        storages = {b.var: b for b in top if call_of(b, storage_op) and _static_shape(b.value.args[0])}
        views = [b for b in top if call_of(b, tensor_op) and b.value.args[0] in storages
                 and _const(b.value.args[1]) is not None and _static_shape(b.value.args[2])]
        view_vars = {b.var for b in views}
        # a storage read by anything but a hoisted view (a dynamic view, a nested block) stays per call
        used = set(relax.analysis.free_vars(main.body.body))
        for b in top:
            if b.var not in view_vars and b.var not in storages:
                used.update(relax.analysis.free_vars(b.value))
        views = [b for b in views if b.value.args[0] not in used]
        if not views:
            return mod
        hoisted = {b.value.args[0] for b in views}
        params = [relax.Var(f"workspace{i}", b.var.ty) for i, b in enumerate(views)]
        param_of = {b.var: p for b, p in zip(views, params)}
        blocks = []
        for block in main.body.blocks:
            kept = []
            for b in block.bindings:
                if b.var in hoisted:
                    continue
                kept.append(relax.VarBinding(b.var, param_of[b.var]) if b.var in param_of else b)
            blocks.append(type(block)(kept))
        new_main = relax.Function(list(main.params) + params, relax.SeqExpr(blocks, main.body.body),
                                  main.ret_ty, main.is_pure, main.attrs, main.span)

        bb = relax.BlockBuilder()
        with bb.function(WORKSPACE, [], pure=False):
            made = {v: bb.emit(storages[v].value, name_hint=v.name) for v in storages if v in hoisted}
            out = [bb.emit(relax.Call(tensor_op, [made[b.value.args[0]]] + list(b.value.args[1:]), b.value.attrs,
                                      b.value.ty_args), name_hint=b.var.name) for b in views]
            bb.emit_func_output(relax.Tuple(out))
        out_mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        out_mod[mod.get_global_var("main")] = new_main
        out_mod[WORKSPACE] = bb.get()[WORKSPACE]
        if load is not None:
            load["workspace"] = WORKSPACE
        log.debug("hoist_workspace: %d views of %d storages allocated once at load", len(views), len(hoisted))
        return out_mod

    return _hoist


def _marks_prepack(func: Any) -> bool:
    """Whether a scheduled PrimFunc holds a block marked PREPACK_ANNOTATION under its root."""
    from tvm import s_tir, tirx

    if not isinstance(func, tirx.PrimFunc):
        return False
    sch = s_tir.Schedule(func)
    if not _has_root(sch):
        return False
    return any(PREPACK_ANNOTATION in sch.get(b).annotations for b in sch.get_child_blocks(sch.get_sblock("root")))


#: the function TVM's LiftTransformParams makes of `main`'s weight-only work
TRANSFORM_PARAMS = "main_transform_params"


def prepack_weights(target: Any, load: dict | None = None):
    """Weight repacks run once at load instead of at every call (TVM's cpu_weight_prepack, for
    pared's own schedules): each scheduled function's blocks marked PREPACK_ANNOTATION (the VNNI
    matmul's [N/16, K/4, 16, 4] copy of its weight) become a function of their own
    (SplitLayoutRewritePreproc); then, when `main` marks its trailing parameters as weights
    (`num_input`, weights.lift), LiftTransformParams moves every computation that reads only
    weights into `main_transform_params` (TRANSFORM_PARAMS, `load["transform_params"]` when given),
    which the runtime (runtime.TvmGraph) calls once with the weights and whose outputs `main`
    takes instead. A module without marked blocks (every target without VNNI) is left as it is; a
    repack of a run-time tensor stays in `main`."""
    import tvm
    from tvm import relax, tirx

    @tvm.transform.module_pass(opt_level=0, name="pared.tvm.prepack_weights")
    def _prepack(mod, _ctx):
        if not has_vnni(target):
            return mod
        marked = {gv for gv, f in mod.functions_items() if _marks_prepack(f)}
        if not marked:
            return mod
        # TVM's split visits every PrimFunc and asserts a structure of root blocks that functions
        # it does not split need not have (hand-written converters): give it only the marked ones
        others = {gv: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc) and gv not in marked}
        sub = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv not in others}, attrs=mod.attrs)
        split = relax.transform.SplitLayoutRewritePreproc()(sub)
        for gv, f in others.items():
            split[gv] = f
        main = split["main"]
        if main.attrs is None or "num_input" not in main.attrs:
            return split
        lifted = relax.transform.LiftTransformParams()(split)
        if load is not None and any(gv.name_hint == TRANSFORM_PARAMS for gv in lifted.get_global_vars()):
            load["transform_params"] = TRANSFORM_PARAMS
        return lifted

    return _prepack


def pipeline(target: Any, database: Any = None, fast_math: bool = False):
    """TVM's CPU pipeline (relax/backend/cpu_generic) with tuned schedules replayed from
    `database` and the default schedules run after fusion, before the dataflow is lowered."""
    import tvm

    return tvm.transform.Sequential([fuse(target, fast_math), finish(target, database)], name="pared.tvm.pipeline")

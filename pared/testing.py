"""Shared assertions and tiny seeded models for pared's tests (and users' own)."""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pared.ir.capture import capture
from pared.ir.plan import Call, Plan, Select, StateBuffer, Table
from pared.ir.program import Program
from pared.ir.transform import same_graphs_and_plan


def op_count(program: Program, op: str, graph: str | None = None) -> int:
    """How many call_function nodes run `op`: "aten.mm" counts every overload, "aten.mm.default" one."""
    g = program.graphs[graph] if graph else program.main
    return sum(v for k, v in g.op_counts().items() if k == op or k.startswith(op + "."))


def assert_close_to_eager(reference: Any, got: Any, *, rel_l2: float = 1e-4, what: str = "output") -> None:
    """Every leaf of `got` within `rel_l2` relative L2 of `reference` (tensors or arrays, any nesting)."""
    import torch.utils._pytree as pytree
    ref = [np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
           for x in pytree.tree_leaves(reference)]
    out = [np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
           for x in pytree.tree_leaves(got)]
    assert len(ref) == len(out), f"{what}: {len(out)} leaves, expected {len(ref)}"
    for i, (r, o) in enumerate(zip(ref, out)):
        assert r.shape == o.shape, f"{what}[{i}]: shape {o.shape}, expected {r.shape}"
        denom = np.linalg.norm(r) or 1.0
        err = float(np.linalg.norm(r - o) / denom)
        assert err <= rel_l2, f"{what}[{i}]: relative L2 {err:.3g} > {rel_l2}"


def state_snapshot(model: nn.Module) -> dict:
    """Bit-exact copy of parameters, buffers and train/eval modes, to prove a model was not mutated."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def assert_unchanged(model: nn.Module, snapshot: dict) -> None:
    now = state_snapshot(model)
    assert now["modes"] == snapshot["modes"], "train/eval mode changed"
    assert now["requires_grad"] == snapshot["requires_grad"], "requires_grad changed"
    assert now["tensors"].keys() == snapshot["tensors"].keys(), "parameters or buffers added/removed"
    for k, v in snapshot["tensors"].items():
        assert torch.equal(now["tensors"][k], v), f"{k} changed"


# -- the pass contract (STYLE.md "The pass contract", "Tests") -----------------
#: set to 1 to (re)write golden files; a regenerating run fails so it never passes silently
GOLDEN_ENV = "PARED_REGEN_GOLDEN"
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{4,}")


def _digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (with its dtype and shape): its content, not its identity."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _graph_tensors(gm: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a graph module holds: parameters, buffers and plain tensor attributes
    that get_attr nodes name."""
    out: dict[str, torch.Tensor] = {}
    for k, v in gm.named_parameters(remove_duplicate=False):
        out[k] = v
    for k, v in gm.named_buffers(remove_duplicate=False):
        out[k] = v
    for n in getattr(gm, "graph").nodes:
        if n.op == "get_attr" and str(n.target) not in out:
            obj: Any = gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, torch.Tensor):
                out[str(n.target)] = obj
    return out


def _record_json(rec: Any) -> Any:
    return rec.to_json() if hasattr(rec, "to_json") else repr(rec)


def program_snapshot(program: Program) -> dict:
    """What a pass must leave alone in the Program it is given: per graph the code, names,
    pared's node meta and every tensor's identity (data_ptr) and content (sha256), the
    example inputs; the plan's JSON, the records' JSON and the output structure."""
    graphs = {}
    for name, g in program.graphs.items():
        gm = g.module
        graphs[name] = {
            "code": gm.code,
            "input_names": tuple(g.input_names), "output_names": tuple(g.output_names),
            "dynamic_dims": tuple(g.dynamic_dims),
            "node_meta": {n.name: {k: repr(v) for k, v in sorted(n.meta.items()) if k.startswith("pared.")}
                          for n in gm.graph.nodes},
            "tensors": {k: (v.data_ptr(), _digest(v)) for k, v in sorted(_graph_tensors(gm).items())},
            "example_inputs": tuple((x.data_ptr(), _digest(x)) if isinstance(x, torch.Tensor) else repr(x)
                                    for x in g.example_inputs),
        }
    return {
        "graphs": graphs,
        "plan": json.dumps(program.plan.to_json(), sort_keys=True, default=repr),
        "records": {k: json.dumps(_record_json(r), sort_keys=True, default=repr) for k, r in program.records.items()},
        "record_ids": {k: id(r) for k, r in program.records.items()},
        "output_structure": json.dumps(program.output_structure, sort_keys=True, default=repr),
    }


def assert_program_unchanged(program: Program, snapshot: dict, *, what: str = "the input program") -> None:
    """Fail, naming the first difference (graph, tensor, record...), unless `program` still
    matches `snapshot` (from program_snapshot) exactly."""
    now = program_snapshot(program)
    if now == snapshot:
        return
    if now["graphs"].keys() != snapshot["graphs"].keys():
        raise AssertionError(f"{what}: graphs {sorted(snapshot['graphs'])} became {sorted(now['graphs'])}")
    for name, before in snapshot["graphs"].items():
        after = now["graphs"][name]
        for key in ("code", "input_names", "output_names", "dynamic_dims", "node_meta", "example_inputs"):
            if before[key] != after[key]:
                detail = ""
                if key == "code":
                    detail = "\n" + "\n".join(list(difflib.unified_diff(before[key].splitlines(),
                                                                        after[key].splitlines(), lineterm=""))[:40])
                raise AssertionError(f"{what}: graph '{name}' {key} changed{detail}")
        tb, ta = before["tensors"], after["tensors"]
        if tb.keys() != ta.keys():
            raise AssertionError(f"{what}: graph '{name}' tensors added {sorted(ta.keys() - tb.keys())}, "
                                 f"removed {sorted(tb.keys() - ta.keys())}")
        for k in tb:
            if tb[k][0] != ta[k][0]:
                raise AssertionError(f"{what}: graph '{name}' tensor '{k}' was replaced (data_ptr changed)")
            if tb[k][1] != ta[k][1]:
                raise AssertionError(f"{what}: graph '{name}' tensor '{k}' was edited in place (content changed)")
    for key in ("plan", "output_structure"):
        if now[key] != snapshot[key]:
            raise AssertionError(f"{what}: the {key} changed:\n  before {snapshot[key][:500]}\n  after  {now[key][:500]}")
    if now["records"] != snapshot["records"] or now["record_ids"] != snapshot["record_ids"]:
        changed = sorted(k for k in now["records"].keys() | snapshot["records"].keys()
                         if now["records"].get(k) != snapshot["records"].get(k)
                         or now["record_ids"].get(k) != snapshot["record_ids"].get(k))
        raise AssertionError(f"{what}: records {changed} changed (before: {sorted(snapshot['records'])}, "
                             f"after: {sorted(now['records'])})")
    raise AssertionError(f"{what} changed")     # pragma: no cover - every key is compared above


def run_pass_checked(pass_: Any, program: Program, ctx: Any) -> Any:
    """Run `pass_` on `program` and check what every pass owes its caller: a PassResult
    holding a Program, modified=False only with the same graphs and plan (an analysis adds its
    record), and `program` itself unchanged (program_snapshot before and after). Returns the
    PassResult."""
    from pared.ir.transform import PassResult
    name = getattr(pass_, "name", type(pass_).__name__)
    before = program_snapshot(program)
    res = pass_(program, ctx)
    assert isinstance(res, PassResult), f"pass '{name}' returned {type(res).__name__}, expected PassResult"
    assert isinstance(res.program, Program), \
        f"pass '{name}': PassResult.program is {type(res.program).__name__}, expected Program"
    assert res.modified or same_graphs_and_plan(program, res.program), \
        f"pass '{name}' reported modified=False but returned other graphs or another plan"
    assert_program_unchanged(program, before, what=f"pass '{name}': its input program")
    return res


def check_noop(pass_: Any, program: Program, ctx: Any) -> Any:
    """The pass finds nothing to do on `program`: modified=False and the same Program back."""
    name = getattr(pass_, "name", type(pass_).__name__)
    res = run_pass_checked(pass_, program, ctx)
    assert res.modified is False, f"pass '{name}' with {pass_.options} should be a no-op here, but it " \
                                  f"reported modified=True (stats {dict(res.stats)})"
    assert res.program is program, f"pass '{name}': a no-op must return the very same Program object"
    return res


def check_idempotent(pass_: Any, program: Program, ctx: Any) -> Any:
    """Running the pass again on its own output (`program`) finds nothing more."""
    name = getattr(pass_, "name", type(pass_).__name__)
    res = run_pass_checked(pass_, program, ctx)
    assert res.modified is False and res.program is program, \
        f"pass '{name}' run on its own output changed it again (stats {dict(res.stats)}); " \
        f"a second run must find nothing more"
    return res


def check_bad_options(pass_cls: type, options: dict, match: str, *, program: Program | None = None,
                      ctx: Any = None) -> Exception:
    """`pass_cls(**options)` raises OptionError whose message matches `match` (re.search),
    either when built or, for options checked against a program, when run on `program` with
    `ctx` (a PassContext, or a callable making one: called only if the options build)."""
    from pared.ir.errors import OptionError
    name = getattr(pass_cls, "name", pass_cls.__name__)
    try:
        p = pass_cls(**options)
        if program is None:
            raise AssertionError(f"pass '{name}' accepted options {options!r}; expected OptionError "
                                 f"matching {match!r}")
        p(program, ctx() if callable(ctx) else ctx)
    except OptionError as e:
        assert re.search(match, str(e)), f"pass '{name}' options {options!r}: OptionError {str(e)!r} " \
                                         f"does not match {match!r}"
        return e
    raise AssertionError(f"pass '{name}' ran with options {options!r}; expected OptionError matching {match!r}")


def check_analysis(analysis: Any, program: Program, ctx: Any) -> Any:
    """An analysis is read-only: modified=False, the same graphs and plan back, its input
    unchanged, and one record of its declared type in the returned program's records
    (program-wide) that serializes to JSON and reads back. Returns the record."""
    from pared.ir.records import Record
    name = getattr(analysis, "name", type(analysis).__name__)
    res = run_pass_checked(analysis, program, ctx)
    out = res.program
    assert res.modified is False, f"analysis '{name}' reported modified=True"
    assert same_graphs_and_plan(program, out), \
        f"analysis '{name}' must return its input's graphs and plan"
    rec = out.records.get(type(analysis).record)
    assert isinstance(rec, type(analysis).record), \
        f"analysis '{name}' left {type(rec).__name__} in the program's records, expected {type(analysis).record.__name__}"
    assert dataclasses.is_dataclass(rec) and type(rec).__dataclass_params__.frozen, \
        f"analysis '{name}': {type(rec).__name__} must be a frozen dataclass"
    assert set(out.records) - set(program.records) <= {type(rec).__name__}, \
        f"analysis '{name}' added other records: {sorted(set(out.records) - set(program.records))}"
    back = Record.from_json(json.loads(json.dumps(rec.to_json())))
    assert type(back) is type(rec), f"analysis '{name}': {type(rec).__name__} read back as {type(back).__name__}"
    return rec


def _canonical_json(v: Any, digits: int) -> Any:
    """JSON with floats to `digits` significant digits (calibrated values differ in their last
    bits between machines) and addresses stripped."""
    if isinstance(v, bool) or v is None or isinstance(v, int):
        return v
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    if isinstance(v, str):
        return _ADDRESS.sub("0x?", v)
    if isinstance(v, Mapping):
        return {str(k): _canonical_json(x, digits) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_canonical_json(x, digits) for x in v]
    return _ADDRESS.sub("0x?", repr(v))


def _compact_json(v: Any, indent: str = "") -> str:
    """JSON with sorted keys, one key per line, and lists of scalars on one line (short diffs)."""
    inner = indent + "  "
    if isinstance(v, dict):
        if not v:
            return "{}"
        items = [f"{inner}{json.dumps(k)}: {_compact_json(v[k], inner)}" for k in sorted(v)]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v):
        return "[\n" + ",\n".join(inner + _compact_json(x, inner) for x in v) + "\n" + indent + "]"
    return json.dumps(v)


def canonical_program_text(program: Program, *, digits: int = 4) -> str:
    """A stable text of a Program for golden files: per graph (by name) its inputs, outputs,
    dynamic dims, constants (name, dtype, shape) and code; the plan's JSON with sorted keys;
    each record's JSON; the output structure. Floats keep `digits` significant digits and
    memory addresses are replaced by 0x?, so the text is the same from run to run."""
    lines: list[str] = []
    for name in sorted(program.graphs):
        g = program.graphs[name]
        lines.append(f"== graph {name}")
        lines.append(f"inputs: {', '.join(g.input_names)}")
        lines.append(f"outputs: {', '.join(g.output_names)}")
        if any(g.dynamic_dims):
            lines.append(f"dynamic_dims: {list(map(list, g.dynamic_dims))}")
        lines.append("constants:")
        for k, v in sorted(_graph_tensors(g.module).items()):
            if any(n.op == "get_attr" and str(n.target) == k for n in g.module.graph.nodes):
                lines.append(f"  {k}: {str(v.dtype).replace('torch.', '')}{list(v.shape)}")
        code = "\n".join(s.rstrip() for s in g.module.code.strip("\n").splitlines())
        lines.append(_ADDRESS.sub("0x?", code))
    dump = lambda v: _compact_json(_canonical_json(v, digits))
    lines.append("== plan")
    lines.append(dump(program.plan.to_json()))
    for k in sorted(program.records):
        lines.append(f"== record {k}")
        lines.append(dump(_record_json(program.records[k])))
    lines.append("== output_structure")
    lines.append(dump(program.output_structure))
    return "\n".join(lines) + "\n"


_FLOAT = re.compile(r"(?<![\w.])-?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+)(?![\w.])")


def same_up_to_float_noise(a: str, b: str, rel: float = 1e-5, abs_: float = 1e-7) -> bool:
    """Whether two canonical texts differ only in float literals within `rel` (or `abs_`): a
    calibrated range or scale computed by another CPU's float kernels (MKL, oneDNN) moves by an
    ulp or two; the structure, every integer and every name must still be equal."""
    fa, fb = _FLOAT.findall(a), _FLOAT.findall(b)
    if len(fa) != len(fb) or _FLOAT.sub("#", a) != _FLOAT.sub("#", b):
        return False
    return all(abs(float(x) - float(y)) <= max(abs_, rel * max(abs(float(x)), abs(float(y)))) for x, y in zip(fa, fb))


def assert_golden(text: str, path: str) -> None:
    """`text` equals the golden file at `path` (float literals within float noise: see
    same_up_to_float_noise).

    With PARED_REGEN_GOLDEN=1 the file is (re)written and this fails, saying so: a run that
    regenerates never passes, so a golden cannot be updated by accident. A missing file
    fails with the command that creates it.
    """
    path = os.fspath(path)
    if os.environ.get(GOLDEN_ENV) == "1":
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        raise AssertionError(f"regenerated {path} ({GOLDEN_ENV}=1): review it with `git diff`, then rerun "
                             f"without {GOLDEN_ENV} (a regenerating run never passes)")
    if not os.path.exists(path):
        raise AssertionError(f"golden file {path} is missing: create it with `{GOLDEN_ENV}=1 pytest <this test>`, "
                             f"review it and commit it")
    with open(path, encoding="utf-8") as f:
        want = f.read()
    if text != want and not same_up_to_float_noise(want, text):
        diff = list(difflib.unified_diff(want.splitlines(), text.splitlines(), f"{path} (golden)", "now",
                                         lineterm=""))
        shown = "\n".join(diff[:80]) + (f"\n... ({len(diff) - 80} more diff lines)" if len(diff) > 80 else "")
        raise AssertionError(f"the program differs from the golden {path}; if the change is intended, "
                             f"regenerate with `{GOLDEN_ENV}=1 pytest <this test>` and review the diff\n{shown}")


def check_pass_contract(pass_: Any, program: Program, make_ctx: Callable[[Program], Any], *,
                        noop: "tuple[Any, Program] | None" = None, twice: bool = True,
                        bad_options: "Sequence[tuple[dict, str]]" = (), golden: str | None = None,
                        numerics: "Callable[[Program], tuple[Any, Any]] | None" = None,
                        rel_l2: float = 1e-5) -> Any:
    """Every check of the pass contract in one call, for a pass of one's own.

    Args:
        pass_: the pass, built with the options under test.
        program: its input; must stay unchanged (program_snapshot).
        make_ctx: program -> a fresh PassContext (calibration, analyses it requires).
        noop: (a pass instance, a program) on which the pass must find nothing to do.
        twice: run the pass again on its output with a fresh context: nothing more found.
        bad_options: (options, message regex) pairs that must raise OptionError.
        golden: path of the golden text (canonical_program_text) of the output.
        numerics: output program -> (eager reference, got), compared within `rel_l2`.
    Returns:
        The first run's PassResult.
    """
    res = run_pass_checked(pass_, program, make_ctx(program))
    assert res.modified, f"pass '{pass_.name}' with {pass_.options} found nothing to do on the contract's program"
    if noop is not None:
        check_noop(noop[0], noop[1], make_ctx(noop[1]))
    if twice:
        check_idempotent(pass_, res.program, make_ctx(res.program))
    for opts, msg in bad_options:
        check_bad_options(type(pass_), opts, msg, program=program, ctx=make_ctx(program))
    if golden is not None:
        assert_golden(canonical_program_text(res.program), golden)
    if numerics is not None:
        ref, got = numerics(res.program)
        assert_close_to_eager(ref, got, rel_l2=rel_l2, what=f"pass '{pass_.name}' vs eager")
    return res


def save_program(program: Program, path: str, target: dict) -> str:
    """Lower every graph of `program` for `target` (a target's JSON form) and write
    the artifact atomically at `path`, with the plan and the program's records, as
    `Optimized.save` does but without a fidelity run. Returns the artifact path."""
    from pared.backends.artifact import write_artifact
    from pared.backends.lower import device_targets, lower_program
    from pared.ir.transform import Record

    from pared.ir.isa import host_cpu

    devices = device_targets(program)

    def build(tmp: str) -> dict:
        graphs = lower_program(program, target, tmp, devices=devices)
        return {**({"devices": devices} if devices else {}),
                "graphs": graphs, "plan": program.plan.to_json(), "target": target,
                "build_cpu": host_cpu().to_json(),
                "output_structure": program.output_structure,
                "records": {k: r.to_json() for k, r in program.records.items() if isinstance(r, Record)}}
    return write_artifact(str(path), build)


def run_torch_free(code: str, *, cwd: str | None = None, timeout: int = 300) -> str:
    """Run Python code in a subprocess where `import torch` fails; return stdout.

    Raises:
        AssertionError: with stderr, when the code fails.
    """
    prelude = textwrap.dedent("""
        import sys
        class _NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this process (torch-free check)")
                return None
        sys.meta_path.insert(0, _NoTorch())
    """)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    p = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                       cwd=cwd, timeout=timeout, env=env)
    assert p.returncode == 0, f"torch-free subprocess failed:\n{p.stderr[-3000:]}"
    return p.stdout


#: the CPU features hide_isa hides to show an AVX2-only x86 CPU (an AMD EPYC of the Zen 2 kind)
AVX2_ONLY = ("avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
_HIDE_ISA_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "support",
                             "hide_isa.c")


def hidden_isa_env(hide: "tuple[str, ...] | list[str]" = AVX2_ONLY) -> tuple[dict | None, str]:
    """The environment that runs a child process on this CPU with the features `hide` hidden from
    CPUID (tests/support/hide_isa.c, built here with cc and kept in build/), so ONNX Runtime and
    LLVM pick the kernels a CPU without them runs, at this CPU's speed.

    Returns:
        (env, note): env is None when it cannot work here, and note says why (no x86, no C
        compiler, no CPUID faulting in this kernel or CPU); otherwise note names the features hidden.
    """
    import hashlib
    import platform
    import shutil
    if platform.machine() not in ("x86_64", "AMD64"):
        return None, f"hiding x86 features needs an x86 CPU (this is {platform.machine()})"
    if not os.path.exists(_HIDE_ISA_SRC):
        return None, f"{_HIDE_ISA_SRC} is missing (pared.testing runs from a source checkout)"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None, "no C compiler (cc) to build tests/support/hide_isa.c"
    with open(_HIDE_ISA_SRC, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    out_dir = os.path.join(os.path.dirname(os.path.dirname(_HIDE_ISA_SRC)), "..", "build")
    so = os.path.abspath(os.path.join(out_dir, f"hide_isa-{digest}.so"))
    if not os.path.exists(so):
        os.makedirs(os.path.dirname(so), exist_ok=True)
        tmp = f"{so}.{os.getpid()}.tmp"
        p = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp, _HIDE_ISA_SRC, "-ldl"], capture_output=True,
                           text=True)
        if p.returncode != 0:
            return None, f"building hide_isa.c failed: {p.stderr.strip()[-500:]}"
        os.replace(tmp, so)
    env = dict(os.environ, PARED_HIDE_ISA=",".join(hide), OMP_WAIT_POLICY="PASSIVE")
    env["LD_PRELOAD"] = " ".join([so] + [p for p in os.environ.get("LD_PRELOAD", "").split() if p])
    probe = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('PARED_HIDE_ISA_STATUS'))"],
                           capture_output=True, text=True, env=env)
    if probe.stdout.strip() != "active":
        return None, ("this kernel or CPU has no CPUID faulting (no 'cpuid_fault' in /proc/cpuinfo), which "
                      f"hide_isa.c needs: {probe.stderr.strip()[-300:]}")
    return env, f"CPUID without {', '.join(hide)}"


def run_python(code: str, env: dict | None = None, timeout: int = 600) -> str:
    """Run Python `code` in a subprocess with `env` (e.g. hidden_isa_env's); return stdout.

    Raises:
        AssertionError: with stderr, when the code fails.
    """
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       env=env or dict(os.environ), timeout=timeout)
    assert p.returncode == 0, f"subprocess failed:\n{p.stderr[-3000:]}"
    return p.stdout


class TinyTransformer(nn.Module):
    """A pre-norm transformer encoder (embedding in, pooled and per-token out): the spine's test model."""

    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4, layers: int = 2, seq: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, seq, dim) * 0.02)
        self.blocks = nn.ModuleList([TinyBlock(dim, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, ids: torch.Tensor) -> dict:
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        for b in self.blocks:
            x = b(x)
        x = self.norm(x)
        return {"tokens": x, "logits": self.head(x.mean(dim=1))}


class TinyBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


def tiny_transformer(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(seed)
    m = TinyTransformer().eval()
    return m, (torch.randint(0, 50, (2, 16)),)


class TinyPatchNet(nn.Module):
    """An image in (3 x 32 x 32: 12 KB), 16 patch tokens of width `dim` after a patch embedding
    (2 KB at dim 32), transformer blocks, a pooled head: a model whose activations shrink early,
    so a partition has an interior cut worth taking."""

    def __init__(self, dim: int = 32, layers: int = 2, patch: int = 8):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.blocks = nn.ModuleList([TinyBlock(dim, 4) for _ in range(layers)])
        self.head = nn.Linear(dim, 4)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch(image).flatten(2).transpose(1, 2)
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean(dim=1))


def tiny_patchnet(seed: int = 0, batch: int = 1) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(seed)
    m = TinyPatchNet().eval()
    return m, (torch.randn(batch, 3, 32, 32),)


class TwoBranchNet(nn.Module):
    """x (B, 4096) -> (B, 8): two branches that each shrink x, one of them then heavy, merged at the
    end; the heavy branch comes first in graph order, so no cut in graph order runs both
    reductions on one side and the heavy part on the other (the split a DAG min-cut finds)."""

    def __init__(self):
        super().__init__()
        self.red_a = nn.Linear(4096, 64)
        self.heavy = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                                   nn.Linear(1024, 64))
        self.red_b = nn.Linear(4096, 64)
        self.out = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.heavy(self.red_a(x))
        b = self.red_b(x)
        return self.out(a + b)


def two_branch_net(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(seed)
    return TwoBranchNet().eval(), (torch.randn(1, 4096),)


#: a deployment for partition tests: a slow edge (a tenth of a GFLOP/s) and a fast cloud, both stated
#: as other CPUs (so estimated, never measured here), over a 20 Mbit/s, 1 ms RTT link
SLOW_EDGE_FAST_CLOUD = {"name": "test", "devices": {
    "edge": {"name": "slow", "backend": "onnxruntime", "provider": "CPUExecutionProvider", "peak_flops": 1e8,
             "mem_bandwidth": 1e9, "arch": "aarch64", "isa": []},
    "cloud": {"name": "fast", "backend": "onnxruntime", "provider": "CPUExecutionProvider", "peak_flops": 1e12,
              "mem_bandwidth": 1e11, "arch": "x86_64", "isa": ["avx2"]}},
    "links": [{"between": ["edge", "cloud"], "name": "wifi", "mbit": 20, "rtt_ms": 1}]}


class _TinyEncoder(nn.Module):
    """(obs (B, 6) float, task (B, 2) int64) -> cond (B, dim)."""

    def __init__(self, dim: int):
        super().__init__()
        self.obs = nn.Linear(6, dim)
        self.task = nn.Embedding(4, dim)

    def forward(self, obs: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.obs(obs)) + self.task(task).sum(1)


class TinyTokenHead(nn.Module):
    """head(tokens (B, N) int64, cond (B, dim)) -> logits (B, N, vocab): a causal transformer over
    [cond; embed(tokens[:, :-1])], like the VLA's action-token head."""

    def __init__(self, dim: int = 32, vocab: int = 16, n_tokens: int = 8, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, n_tokens, dim) * 0.3)
        self.blocks = nn.ModuleList([TinyBlock(dim, 4) for _ in range(layers)])
        self.out = nn.Linear(dim, vocab)
        self.register_buffer("causal", torch.full((n_tokens, n_tokens), -1e9).triu(1), persistent=False)

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = torch.cat([cond[:, None], self.embed(tokens[:, :-1])], 1) + self.pos
        for b in self.blocks:
            b_, n, d = x.shape
            q, k, v = b.qkv(b.norm1(x)).reshape(b_, n, 3, b.heads, d // b.heads).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-1, -2) / (d // b.heads) ** 0.5 + self.causal, dim=-1) @ v
            x = x + b.proj(att.transpose(1, 2).reshape(b_, n, d))
            x = x + b.mlp(b.norm2(x))
        return self.out(x)


class TinyDetokenize(nn.Module):
    """tokens (B, N) -> their bins' centres in [-1, 1], (B, N)."""

    def __init__(self, vocab: int = 16):
        super().__init__()
        self.vocab = vocab

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.to(torch.float32) * (2.0 / (self.vocab - 1)) - 1.0


def tiny_decoder(seed: int = 0, batch: int = 1, n_tokens: int = 8, vocab: int = 16) -> tuple[nn.Module, tuple]:
    """A pared Decoder (encoder, causal token head, detokenize) and example inputs (obs, task)."""
    from pared.ir.decode import Decoder
    torch.manual_seed(seed)
    enc, head = _TinyEncoder(32), TinyTokenHead(32, vocab, n_tokens)
    m = Decoder(enc, head, n_tokens, TinyDetokenize(vocab)).eval()
    return m, tiny_decoder_inputs(batch, seed + 1)


def tiny_decoder_inputs(batch: int = 1, seed: int = 1, base: "tuple | None" = None, noise: float = 0.05) -> tuple:
    """Inputs of tiny_decoder: random, or `base` with its observation perturbed by `noise`."""
    g = torch.Generator().manual_seed(seed)
    if base is not None:
        return base[0] + noise * torch.randn(base[0].shape, generator=g), base[1].clone()
    return torch.randn(batch, 6, generator=g), torch.randint(0, 4, (batch, 2), generator=g)


# -- a streamed generator: a one-frame step with a KV cache (ir/stream.py) -----------------------
class TinyFrameStep(nn.Module):
    """step(x (B, T, D), frame_pos (1,), kv_cache, cache_pos, cache_valid) -> (y, new_kv): one
    frame of T tokens through `layers` attention layers of `heads` heads, each attending to its
    own frame and the valid cached slots with an ALiBi bias on the frame distance (slopes 1/2^h);
    positions and validity per slot [C] or per layer, head and slot [L, H, C] (ir/stream.py)."""

    def __init__(self, dim: int = 16, heads: int = 2, layers: int = 2, tokens: int = 4):
        super().__init__()
        self.heads, self.layers, self.tokens, self.head_dim = heads, layers, tokens, dim // heads
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.register_buffer("slopes", torch.tensor([2.0 ** -(h + 1) for h in range(heads)]), persistent=False)
        self.record_mass = False     # eager only: keep each call's attention per cache slot in `last_mass`
        self.last_mass: torch.Tensor | None = None

    def forward(self, x, frame_pos, kv_cache, cache_pos, cache_valid):
        b, t, d = x.shape
        if cache_pos.dim() == 1:
            cache_pos = cache_pos.expand(self.layers, self.heads, -1)
            cache_valid = cache_valid.expand(self.layers, self.heads, -1)
        bias = -self.slopes[None, :, None] * (frame_pos.reshape(1) - cache_pos)
        bias = torch.where(cache_valid, bias, torch.full_like(bias, -1e4))        # [L, H, C]
        new, masses = [], []
        for i in range(self.layers):
            q, k, v = self.qkv[i](x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            kk = torch.cat([kv_cache[i, 0], k], 2)
            vv = torch.cat([kv_cache[i, 1], v], 2)
            mask = torch.cat([bias[i][:, None, :].expand(self.heads, t, -1),
                              torch.zeros(self.heads, t, t, dtype=x.dtype)], 2)[None]
            a = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
            if self.record_mass:       # the probabilities recomputed from q, k and the mask (not a graph's softmax)
                from pared.analysis.attention_entropy import sdpa_probabilities
                masses.append(sdpa_probabilities(q, kk, mask).sum((0, 2))[:, :-t])
            x = x + self.proj[i](a.transpose(1, 2).reshape(b, t, d))
            new.append(torch.stack([k, v]))
        if self.record_mass:
            self.last_mass = torch.stack(masses)                                    # [L, H, C]
        return x, torch.stack(new)


def tiny_streamer(seed: int = 0, batch: int = 2, capacity_frames: int = 3, layout: Any = None
                  ) -> tuple[nn.Module, tuple]:
    """A pared Streamer over TinyFrameStep and example inputs (x, frame_pos, append)."""
    from pared.ir.stream import Streamer
    torch.manual_seed(seed)
    step = TinyFrameStep().eval()
    m = Streamer(step, layers=step.layers, heads=step.heads, head_dim=step.head_dim, tokens_per_frame=step.tokens,
                 capacity_frames=capacity_frames, layout=layout)
    g = torch.Generator().manual_seed(seed + 1)
    return m, (torch.randn(batch, step.tokens, 16, generator=g), torch.tensor([0.0]), torch.tensor([1.0]))


def tiny_stream_calls(frames: int = 12, batch: int = 2, seed: int = 3, reads: int = 1) -> list[tuple]:
    """A stream for tiny_streamer: per frame `reads` calls that only read the cache, then one that
    appends (frame positions 0, 1, ...)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for f in range(frames):
        for r in range(reads + 1):
            out.append((torch.randn(batch, 4, 16, generator=g), torch.tensor([float(f)]),
                        torch.tensor([1.0 if r == reads else 0.0])))
    return out


def pipeline_with_options(pipeline: str, options: dict, dest: str) -> str:
    """The pipeline file `pipeline` with `options` ({pass: {option: value}}) merged into its
    passes' options, written to `dest` with its references made absolute (so it runs from
    anywhere); returns `dest`. For tests that run a shipped pipeline with a cheaper setting."""
    import yaml
    with open(pipeline, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    base = os.path.dirname(pipeline)
    refs = ["model", "example_inputs", "calibration", "holdout"]
    if str(data.get("target", "")).endswith((".yaml", ".yml")):       # a target profile file
        refs.append("target")
    for key in refs:
        if data.get(key) and not os.path.isabs(data[key]):
            data[key] = os.path.normpath(os.path.join(base, data[key]))
    data.pop("export", None)                    # the copy is optimized with --out
    passes = data["passes"]
    names = [p if isinstance(p, str) else next(iter(p)) for p in passes]     # "- name" or "- name: {...}"
    for name, changed in options.items():
        if name not in names:
            raise ValueError(f"{pipeline} has no pass {name!r} (its passes: {names})")
        i = names.index(name)
        had = {} if isinstance(passes[i], str) else (passes[i][name] or {})
        passes[i] = {name: {**had, **changed}}
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(dest, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return dest


def stream_torch_free(artifact: str, calls: Sequence[tuple], work: str, trace: int = 3) -> tuple:
    """Run tiny_stream_calls through `artifact` in a process without torch (run_torch_free):
    (the outputs stacked [calls, ...], the first `trace` cases the plan chose, the state bytes the
    artifact holds after the last call). `work`: a folder for the exchanged arrays."""
    import json

    import numpy as np
    inputs, outputs = os.path.join(work, "calls.npz"), os.path.join(work, "got.npy")
    np.savez(inputs, **{f"{i}_{j}": a.numpy() for i, c in enumerate(calls) for j, a in enumerate(c)})
    out = run_torch_free(f"""
        import json, numpy as np, pared
        ex = pared.load({artifact!r})
        d = np.load({inputs!r})
        outs = [ex(*(d[f"{{i}}_{{j}}"] for j in range({len(calls[0])}))) for i in range({len(calls)})]
        np.save({outputs!r}, np.stack(outs))
        print(json.dumps([ex.trace[:{trace}], ex.state_bytes]))
    """)
    cases, held = json.loads(out.strip().splitlines()[-1])
    return np.load(outputs), cases, held


def eager_stream(step: nn.Module, layout: Any, calls: Sequence[tuple], head_dim: int,
                 reference: Any = None) -> list[torch.Tensor]:
    """The outputs of `step` over a stream of calls (inputs..., frame_pos, append) with the cache
    each head's policy keeps, held as frame lists by pared.ir.kvcache.KVReference (an emulation
    independent of the KVAppend graph; pass `reference` to inspect it afterwards). A layout with
    heavy heads needs a step that records its attention (TinyFrameStep.record_mass)."""
    from pared.ir.kvcache import KVReference
    ref = reference if reference is not None else KVReference(layout)
    scored = ref.layout.scored
    if scored:
        if not hasattr(step, "record_mass"):
            raise ValueError(f"eager_stream: the layout ranks frames by attention, and {type(step).__name__} does "
                             "not record it (TinyFrameStep.record_mass)")
        step.record_mass = True
    outs = []
    try:
        with torch.no_grad():
            for *own, append in calls:
                cache, pos, valid = ref.state(own[0].shape[0], head_dim, own[0].dtype)
                y, new = step(*own, cache, pos, valid)
                outs.append(y)
                if float(append[0]) >= 0.5:
                    ref.append(new, float(own[-1][0]), step.last_mass if scored else None)
    finally:
        if scored:
            step.record_mass = False
    return outs


# -- a sampler captured whole: the tiny action head of a diffusion policy ----------------------
class _TinyActionBlock(nn.Module):
    """adaLN-Zero block with the sub-blocks named as in the VLA's head: h + g1 * attn(...), then
    h + g2 * mlp(...)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.ada = nn.Linear(dim, 6 * dim)
        self.attn = TinyAttention(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b1, a1, g1, b2, a2, g2 = self.ada(c).unsqueeze(1).chunk(6, dim=-1)
        h = h + g1 * self.attn(self.norm1(h) * (1 + a1) + b1)
        return h + g2 * self.mlp(self.norm2(h) * (1 + a2) + b2)


class TinyActionHead(nn.Module):
    """head(x (B, H, A), t (1,), cond (B, dim)) -> eps (B, H, A): a diffusion action head."""

    def __init__(self, dim: int = 32, action_dim: int = 4, horizon: int = 6, layers: int = 3):
        super().__init__()
        self.dim = dim
        self.inp = nn.Linear(action_dim, dim)
        self.pos = nn.Parameter(torch.randn(1, horizon, dim) * 0.1)
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList([_TinyActionBlock(dim) for _ in range(layers)])
        self.out = nn.Linear(dim, action_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-torch.arange(self.dim // 2, dtype=torch.float32) * (4.0 / self.dim))
        a = t.float()[:, None] * freqs[None]
        c = self.t_mlp(torch.cat([a.sin(), a.cos()], dim=-1)) + cond
        h = self.inp(x) + self.pos
        for b in self.blocks:
            h = b(h, c)
        return self.out(h)


class TinyUpdate(nn.Module):
    """x <- x - scale * eps (a sampler step with a per-step coefficient)."""

    def forward(self, x: torch.Tensor, eps: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x - scale * eps


def tiny_denoiser(seed: int = 0, steps: int = 8, batch: int = 1) -> tuple[nn.Module, tuple]:
    """A pared Denoiser (the tiny decoder's encoder, TinyActionHead, TinyUpdate) over `steps` steps,
    and example inputs (obs, task, noise)."""
    from pared.ir.denoise import Denoiser
    torch.manual_seed(seed)
    head = TinyActionHead()
    with torch.no_grad():                       # consecutive steps similar, as in a trained head
        for b in head.blocks:
            b.ada.weight.mul_(0.2)
    schedule = {"t": [float(v) for v in torch.linspace(900, 0, steps)], "scale": [0.1] * steps}
    m = Denoiser(_TinyEncoder(32), head, TinyUpdate(), schedule, head_values=("t",)).eval()
    return m, tiny_denoiser_inputs(batch, seed + 1)


class _CondCopy(nn.Module):
    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return cond.clone()


class TinyActionBins(nn.Module):
    """A sampled action chunk (B, H, A) in about [-1, 1] -> its bins (B, H*A) int64 of `vocab`."""

    def __init__(self, vocab: int = 16):
        super().__init__()
        self.vocab = vocab

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round((x.clamp(-1, 1).flatten(1) + 1) * (0.5 * (self.vocab - 1))).long()


def tiny_draft_sampler(seed: int = 0, steps: int = 6, n_tokens: int = 8, vocab: int = 16) -> tuple:
    """A drafter for tiny_decoder (speculative_decode's `denoiser` drafter): (a pared Denoiser over the
    decoder's cond (B, 32) whose finish bins its (B, n_tokens / 4, 4) sample, its initial sample)."""
    from pared.ir.denoise import Denoiser
    torch.manual_seed(seed)
    head = TinyActionHead(horizon=n_tokens // 4)
    schedule = {"t": [float(v) for v in torch.linspace(900, 0, steps)], "scale": [0.1] * steps}
    m = Denoiser(_CondCopy(), head, TinyUpdate(), schedule, head_values=("t",), finish=TinyActionBins(vocab)).eval()
    return m, torch.randn(1, n_tokens // 4, 4, generator=torch.Generator().manual_seed(seed + 1))


def tiny_denoiser_inputs(batch: int = 1, seed: int = 1) -> tuple:
    g = torch.Generator().manual_seed(seed)
    obs, task = tiny_decoder_inputs(batch, seed)
    return obs, task, torch.randn(batch, 6, 4, generator=g)


def eager_block_cache(model: nn.Module, inputs: tuple, updates: "Mapping[str, Sequence[int]]") -> torch.Tensor:
    """What sub-block caching means, in eager PyTorch: run a pared Denoiser with each named
    sub-module's output, at every step not among its update steps, replaced (by a forward hook)
    with what it computed at its last update step."""
    mods = dict(model.head.named_modules())
    step = {"i": 0}
    kept: dict[str, torch.Tensor] = {}
    hooks = []
    for path, ups in updates.items():
        def hook(mod, args, out, path=path, ups=tuple(ups)):
            if step["i"] in ups:
                kept[path] = out
                return out
            return kept[path]
        hooks.append(mods[path].register_forward_hook(hook))

    def count(mod, args, out):
        step["i"] += 1
    hooks.append(model.head.register_forward_hook(count))
    try:
        with torch.no_grad():
            return model(*inputs)
    finally:
        for h in hooks:
            h.remove()


class _Full(nn.Module):
    """Computes the expensive part and emits it as the feature to cache."""
    def __init__(self):
        super().__init__()
        self.deep = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
        self.shallow = nn.Linear(8, 8)

    def forward(self, x):
        h = self.deep(x)
        return self.shallow(x) + h, h


class _Reuse(nn.Module):
    def __init__(self, full):
        super().__init__()
        self.shallow = full.shallow

    def forward(self, x, h):
        return self.shallow(x) + h


def two_graph_program() -> "tuple[nn.Module, Program]":
    """A two-graph Program whose Table plan caches a feature at step 0 and reuses it
    for two steps (the shape of a cache rewrite). Returns (the full module, program)."""
    torch.manual_seed(0)
    full = _Full().eval()
    x = torch.randn(2, 8)
    pf = capture(full, (x,), name="full")
    pr = capture(_Reuse(full), (x, torch.randn(2, 8)), name="reuse")
    plan = Plan(inputs=("x",), outputs=("y",),
                body=Select(Table(("full", "reuse", "reuse"), default="full"), (
                    ("full", Call("full", ("in:x",), ("y", "state:h"))),
                    ("reuse", Call("reuse", ("in:x", "state:h"), ("y",))))),
                state=(StateBuffer("h"),))
    return full, Program({"full": pf.main, "reuse": pr.main}, plan)


class _TinyBlock(nn.Module):
    """adaLN-style residual block: h + gate * mlp(norm(h) * (1 + scale) + shift)."""
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.ada = nn.Linear(dim, 3 * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(c).unsqueeze(1).chunk(3, dim=-1)
        return h + gate * self.mlp(self.norm(h) * (1 + scale) + shift)


class _TinyDiTBlock(nn.Module):
    """DiT block (adaLN-Zero): h + g1 * attn(norm1(h) * (1 + a1) + b1), then h + g2 * mlp(...).
    `forward(h, c, tome, index)` runs ToMe-SD eagerly (ToMeSDState: tomesd's merge/unmerge)."""
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.ada = nn.Linear(dim, 6 * dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h: torch.Tensor, c: torch.Tensor, tome: "ToMeSDState | None" = None,
                index: int = 0) -> torch.Tensor:
        b1, a1, g1, b2, a2, g2 = self.ada(c).unsqueeze(1).chunk(6, dim=-1)
        (m_a, u_a), (m_m, u_m) = tome.merges(h, index) if tome is not None else ((_same, _same),) * 2
        a = m_a(self.norm1(h) * (1 + a1) + b1)
        b, n, d = a.shape
        q, k, v = self.qkv(a).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
        h = h + u_a(g1 * self.proj(att.transpose(1, 2).reshape(b, n, d)))
        return h + u_m(g2 * self.mlp(m_m(self.norm2(h) * (1 + a2) + b2)))


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


class TinyDiT(nn.Module):
    """A timestep-conditioned stack of residual blocks over tokens: the shape of a
    diffusion transformer, small enough for pass tests. forward(x [B,T,C], t [B]).
    `attention=True`: DiT blocks with self-attention (_TinyDiTBlock), for token merging;
    `forward(..., tome=ToMeSDState(...))` then runs ToMe-SD eagerly."""

    def __init__(self, channels: int = 4, dim: int = 32, layers: int = 6, attention: bool = False, heads: int = 2):
        super().__init__()
        self.dim = dim
        self.embed = nn.Linear(channels, dim)
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList([_TinyDiTBlock(dim, heads) if attention else _TinyBlock(dim)
                                     for _ in range(layers)])
        self.out = nn.Linear(dim, channels)

    def cond(self, t: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-torch.arange(self.dim // 2, dtype=torch.float32) * (4.0 / self.dim))
        a = t.float()[:, None] * freqs[None]
        return self.t_mlp(torch.cat([a.sin(), a.cos()], dim=-1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, *, span: tuple[int, int] | None = None,
                residual: torch.Tensor | None = None, record: dict | None = None,
                tome: "ToMeSDState | None" = None) -> torch.Tensor:
        """`span=(first, last)` with `residual`: replace those blocks by `input + residual`
        (the eager meaning of a cache reuse); `record`: store each span's residual;
        `tome`: ToMe-SD in every block (attention=True)."""
        c = self.cond(t)
        h = self.embed(x)
        i = 0
        while i < len(self.blocks):
            if span is not None and i == span[0] and residual is not None:
                h = h + residual
                i = span[1] + 1
                continue
            h_in = h
            for j in range(i, (span[1] + 1) if span is not None and i == span[0] else i + 1):
                h = self.blocks[j](h, c) if tome is None else self.blocks[j](h, c, tome, j)
            if record is not None and span is not None and i == span[0]:
                record["residual"] = h - h_in
            i = j + 1
        return self.out(h)


def tiny_dit(seed: int = 0, layers: int = 6, batch: int = 2, *, attention: bool = False,
             tokens: int | None = None) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """TinyDiT and (x, t): 8 tokens, or with attention=True 16 (a 4x4 grid) unless `tokens` says."""
    torch.manual_seed(seed)
    m = TinyDiT(layers=layers, attention=attention).eval()
    # train-free, but make consecutive steps similar like a real denoiser's:
    with torch.no_grad():
        for b in m.blocks:
            b.ada.weight.mul_(0.2)
    return m, (torch.randn(batch, tokens or (16 if attention else 8), 4), torch.full((batch,), 900.0))


class _TinyJointBlock(nn.Module):
    """A dual-stream block (Flux's and SD3's layout, tiny): the image and the text tokens
    each have their own adaLN and MLP and attend jointly over both. forward(img, txt, c)
    -> (img, txt)."""
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.ada_img, self.ada_txt = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)
        self.attn = TinyAttention(dim)
        self.mlp_img, self.mlp_txt = (nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                                      for _ in range(2))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        si, ki, gi = self.ada_img(c).unsqueeze(1).chunk(3, dim=-1)
        st, kt, gt = self.ada_txt(c).unsqueeze(1).chunk(3, dim=-1)
        joint = torch.cat([self.norm(txt) * (1 + kt) + st, self.norm(img) * (1 + ki) + si], dim=1)
        a = self.attn(joint)
        n = txt.shape[1]
        txt, img = txt + gt * a[:, :n], img + gi * a[:, n:]
        return img + gi * self.mlp_img(self.norm(img)), txt + gt * self.mlp_txt(self.norm(txt))


class _TinySingleBlock(nn.Module):
    """A single-stream block over the joined tokens, handing the two streams back split
    (Flux's single_transformer_blocks). forward(img, txt, c) -> (img, txt)."""
    def __init__(self, dim: int):
        super().__init__()
        self.inner = _TinyBlock(dim)
        self.attn = TinyAttention(dim)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = txt.shape[1]
        h = torch.cat([txt, img], dim=1)
        h = self.inner(h + 0.5 * self.attn(h), c)
        return h[:, n:], h[:, :n]


class TinyTwoStack(nn.Module):
    """Two block stacks in a row, each block carrying two streams (image and text tokens):
    `dual_blocks` then `single_blocks`, as Flux. forward(x [B,T,C], ctx [B,S,Cc], t [B])
    -> [B,T,C]; the text stream is dropped at the end. Blocks are numbered across both
    stacks (dual first) for `span`."""

    def __init__(self, channels: int = 4, ctx_channels: int = 6, dim: int = 32, dual: int = 3, single: int = 3):
        super().__init__()
        self.dim = dim
        self.embed, self.ctx_embed = nn.Linear(channels, dim), nn.Linear(ctx_channels, dim)
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.dual_blocks = nn.ModuleList([_TinyJointBlock(dim) for _ in range(dual)])
        self.single_blocks = nn.ModuleList([_TinySingleBlock(dim) for _ in range(single)])
        self.out = nn.Linear(dim, channels)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, t: torch.Tensor, *, span: tuple[int, int] | None = None,
                residual: tuple[torch.Tensor, torch.Tensor] | None = None, record: dict | None = None) -> torch.Tensor:
        """`span=(first, last)` with `residual=(image, text)`: replace those blocks by each
        stream's `input + residual` (the eager meaning of a cache reuse of both streams);
        `record`: store the span's residuals as record["residual"]."""
        freqs = torch.exp(-torch.arange(self.dim // 2, dtype=torch.float32) * (4.0 / self.dim))
        a = t.float()[:, None] * freqs[None]
        c = self.t_mlp(torch.cat([a.sin(), a.cos()], dim=-1))
        img, txt = self.embed(x), self.ctx_embed(ctx)
        blocks = list(self.dual_blocks) + list(self.single_blocks)
        i = 0
        while i < len(blocks):
            if span is not None and i == span[0]:
                if residual is not None:
                    img, txt = img + residual[0], txt + residual[1]
                else:
                    i0, t0 = img, txt
                    for j in range(span[0], span[1] + 1):
                        img, txt = blocks[j](img, txt, c)
                    if record is not None:
                        record["residual"] = (img - i0, txt - t0)
                i = span[1] + 1
                continue
            img, txt = blocks[i](img, txt, c)
            i += 1
        return self.out(img)


def tiny_two_stack(seed: int = 0, batch: int = 2, tokens: int = 8, text: int = 3, dual: int = 3, single: int = 3):
    """TinyTwoStack and (x, ctx, t); `text == tokens` makes the two streams the same shape."""
    torch.manual_seed(seed)
    m = TinyTwoStack(dual=dual, single=single).eval()
    with torch.no_grad():   # consecutive steps similar, like a real denoiser's
        for b in m.dual_blocks:
            b.ada_img.weight.mul_(0.2)
            b.ada_txt.weight.mul_(0.2)
        for b in m.single_blocks:
            b.inner.ada.weight.mul_(0.2)
    return m, (torch.randn(batch, tokens, 4), torch.randn(batch, text, 6), torch.full((batch,), 900.0))


class TinyAttention(nn.Module):
    """Single-head self-attention over tokens [B, N, d]."""
    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        w = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        return self.proj(w @ v)


class TinyMoE(nn.Module):
    """Top-k routed experts with stacked weights ([E, d, h], one batched matmul for
    all experts, as in the dit_moe_mnist workload) plus a shared expert."""
    def __init__(self, dim: int, experts: int = 4, hidden: int = 16, top_k: int = 2):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, dim, hidden) * dim ** -0.5)
        self.b1 = nn.Parameter(torch.randn(experts, 1, hidden) * 0.1)
        self.w2 = nn.Parameter(torch.randn(experts, hidden, dim) * hidden ** -0.5)
        self.b2 = nn.Parameter(torch.randn(experts, 1, dim) * 0.1)
        self.shared = nn.Linear(dim, dim)

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, idx = self.router(flat).softmax(-1).topk(self.top_k, dim=-1)
        return gate / gate.sum(-1, keepdim=True), idx

    def experts(self, flat: torch.Tensor) -> torch.Tensor:
        """Every expert's output for every token: [E, T, d]."""
        h = nn.functional.gelu(torch.matmul(flat.unsqueeze(0), self.w1) + self.b1)
        return torch.matmul(h, self.w2) + self.b2

    def combine(self, flat: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        t = flat.shape[0]
        rows = idx * t + torch.arange(t).unsqueeze(-1)
        picked = y.reshape(-1, y.shape[-1]).index_select(0, rows.reshape(-1)).reshape(t, self.top_k, -1)
        return self.weigh(flat, picked, gate)

    def weigh(self, flat: torch.Tensor, picked: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """The routed outputs per (token, choice) [T, k, d] weighed by the gates, plus the shared expert."""
        return (picked * gate.unsqueeze(-1)).sum(1) + self.shared(flat)

    def dispatched(self, flat: torch.Tensor, idx: torch.Tensor, capacities: Sequence[int]) -> torch.Tensor:
        """What moe_dispatch means, written with loops: the (token, choice) pairs in token order
        take a slot of their expert while it has one; a pair past its expert's capacity gives zero.
        Returns picked [T, k, d]."""
        y = self.experts(flat)
        picked = torch.zeros(idx.shape[0], idx.shape[1], y.shape[-1])
        used = [0] * y.shape[0]
        for t in range(idx.shape[0]):
            for j in range(idx.shape[1]):
                e = int(idx[t, j])
                if used[e] < capacities[e]:
                    picked[t, j] = y[e, t]
                    used[e] += 1
        return picked

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        flat = h.reshape(b * n, d)
        gate, idx = self.route(flat)
        return self.combine(flat, self.experts(flat), gate, idx).reshape(b, n, d)


class _TinyMoEBlock(nn.Module):
    def __init__(self, dim: int, experts: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.ada = nn.Linear(dim, 3 * dim)
        self.attn = TinyAttention(dim)
        self.ff = TinyMoE(dim, experts)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(c).unsqueeze(1).chunk(3, dim=-1)
        h = h + gate * self.attn(self.norm(h))
        return h + self.ff(self.norm(h) * (1 + scale) + shift)


class TinyMoEDiT(nn.Module):
    """TinyDiT with attention + mixture-of-experts blocks. forward(x [B,T,C], t [B]).

    The keyword arguments give the eager meaning of expert caching (expert_cache):
    `mode="full"` computes and fills `cache`; `mode="reuse"` reads each block's
    attention output from it and, per batch row, recomputes the `refresh` experts
    whose routed inputs drifted most (written with plain loops, as a reference)."""

    def __init__(self, channels: int = 4, dim: int = 32, layers: int = 3, experts: int = 4):
        super().__init__()
        self.dim = dim
        self.embed = nn.Linear(channels, dim)
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList([_TinyMoEBlock(dim, experts) for _ in range(layers)])
        self.out = nn.Linear(dim, channels)

    cond = TinyDiT.cond

    def forward(self, x: torch.Tensor, t: torch.Tensor, *, mode: str | None = None, cache: dict | None = None,
                refresh: int = 0, capacity: Sequence[Sequence[int]] | None = None,
                routing: str = "current") -> torch.Tensor:
        """`capacity` (per block, per expert): moe_dispatch's slots; `routing="frozen"`: full steps
        cache each token's chosen experts and their outputs, reuse steps weigh those by the step's
        own router probabilities at the cached choices."""
        c = self.cond(t)
        h = self.embed(x)
        b, n, d = h.shape
        for i, blk in enumerate(self.blocks):
            if mode is None and capacity is None:
                h = blk(h, c)
                continue
            if routing == "frozen" or capacity is not None:
                shift, scale, gate = blk.ada(c).unsqueeze(1).chunk(3, dim=-1)
                a = cache[("attn", i)] if mode == "reuse" else blk.attn(blk.norm(h))
                h = h + gate * a
                flat = (blk.norm(h) * (1 + scale) + shift).reshape(b * n, d)
                if mode == "reuse":
                    idx, picked = cache[("idx", i)], cache[("picked", i)]
                    g = blk.ff.router(flat).softmax(-1).gather(-1, idx)
                    g = g / g.sum(-1, keepdim=True)
                else:
                    g, idx = blk.ff.route(flat)
                    picked = (blk.ff.dispatched(flat, idx, capacity[i]) if capacity is not None
                              else blk.ff.experts(flat).reshape(-1, d)[(idx * flat.shape[0]
                                                                        + torch.arange(flat.shape[0])[:, None])])
                    if mode == "full":
                        cache.update({("attn", i): a, ("idx", i): idx, ("picked", i): picked})
                h = h + blk.ff.weigh(flat, picked, g).reshape(b, n, d)
                continue
            shift, scale, gate = blk.ada(c).unsqueeze(1).chunk(3, dim=-1)
            a = blk.attn(blk.norm(h)) if mode != "reuse" else cache[("attn", i)]
            h = h + gate * a
            flat = (blk.norm(h) * (1 + scale) + shift).reshape(b * n, d)
            g, idx = blk.ff.route(flat)
            if mode == "reuse":
                y, prev, drift = cache[("y", i)], cache[("prev", i)], cache[("drift", i)]
                for row in range(b):
                    tok = slice(row * n, (row + 1) * n)
                    change = (flat[tok] - prev[tok]).abs().mean(-1)
                    base = prev[tok].abs().mean(-1)
                    for e in range(y.shape[0]):
                        routed = (idx[tok] == e).any(-1).float()
                        drift[row, e] += (routed * change).sum() / ((routed * base).sum() + 1e-8)
                    for e in drift[row].topk(refresh).indices.tolist() if refresh else []:
                        y[e, tok] = blk.ff.experts(flat[tok])[e]
                        drift[row, e] = 0.0
                cache[("prev", i)] = flat
            else:
                y = blk.ff.experts(flat)
                cache.update({("attn", i): a, ("y", i): y.clone(), ("prev", i): flat,
                              ("drift", i): torch.zeros(b, y.shape[0])})
            h = h + blk.ff.combine(flat, y, g, idx).reshape(b, n, d)
        return self.out(h)


def tiny_moe_dit(seed: int = 0, batch: int = 2, tokens: int = 8) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(seed)
    m = TinyMoEDiT().eval()
    with torch.no_grad():
        for b in m.blocks:
            b.ada.weight.mul_(0.2)
    return m, (torch.randn(batch, tokens, 4), torch.full((batch,), 900.0))


def eager_taylor_loop(m: nn.Module, x0: torch.Tensor, table: Sequence[str], coefs: Sequence[float],
                      span: tuple[int, int] = (1, 4), **kw: Any) -> torch.Tensor:
    """What taylor_cache means on TinyDiT, in eager PyTorch, over tiny_sampler_loop's steps:
    full steps record the span's residual, forecast steps use last + c * (last - previous).
    `kw` goes to every call (tome=ToMeSDState(...): cache + ToMe-SD)."""
    xe, last, prev = x0.clone(), None, None
    with torch.no_grad():
        for i, t in enumerate(torch.linspace(900, 0, len(table))):
            tt = torch.full((x0.shape[0],), float(t))
            if table[i] != "forecast":
                rec: dict = {}
                out = m(xe, tt, span=span, record=rec, **kw)
                prev, last = last, rec["residual"]
            else:
                out = m(xe, tt, span=span, residual=last + coefs[i] * (last - prev), **kw)
            xe = xe - 0.1 * out
    return xe


def with_dead_code(program: Program) -> Program:
    """`program` with two unused nodes (mul, exp of the first input) before its first graph's output."""
    g = program.main
    gm = g.copy_module()
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        a = gm.graph.call_function(torch.ops.aten.mul.Tensor, (x, x))
        gm.graph.call_function(torch.ops.aten.exp.default, (a,))
    gm.recompile()
    return program.with_graph(next(iter(program.graphs)), g.with_module(gm))


class ScaledLinear(nn.Module):
    """y = lin(x * exp(log_scale)) + softplus(bias_raw): two parameter-only subgraphs to fold."""

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.randn(8) * 0.1)
        self.bias_raw = nn.Parameter(torch.randn(8))
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x * torch.exp(self.log_scale)) + nn.functional.softplus(self.bias_raw)


def dequantized_experts(m: nn.Module, plan: Any, block_size: int) -> nn.Module:
    """A copy of TinyMoEDiT `m` with each expert's weights replaced by the reference
    dequantization of its codes at the width an ExpertQuantPlan chose (the eager meaning
    of expert_quant)."""
    import copy
    from pared.passes.quant.expert_quant import dequantize, quantize_expert
    ref = copy.deepcopy(m)
    with torch.no_grad():
        for i, lay in enumerate(plan.layers):
            ff = ref.blocks[i].ff
            assert lay.region == f"blocks.{i}.ff", lay.region
            for e in lay.experts:
                for w in (ff.w1, ff.w2):
                    if e.bits != 32:
                        k, n = w.shape[1:]
                        w[e.index] = dequantize(*quantize_expert(w[e.index], e.bits, block_size), e.bits, k, n)
    return ref


def tiny_sampler_loop(x0: torch.Tensor, steps: int = 10):
    """A calibration loop over `steps` calls: x <- x - 0.1 * model(x, t), t from 900 down.

    Returns loop(fn) -> the final x (fn: the model or a Program on torch tensors)."""
    ts = torch.linspace(900, 0, steps)

    def loop(fn):
        x = x0.clone()
        for t in ts:
            out = fn(x, torch.full((x.shape[0],), float(t)))
            out = out[0] if isinstance(out, (tuple, list)) else out
            x = x - 0.1 * torch.as_tensor(out)
        return x
    return loop


# -- token merging: ToMe's own eager form, the reference token_merge is checked against ---------
def tome_merge(x: torch.Tensor, metric: torch.Tensor, size: "torch.Tensor | None", r: int,
               protect: int = 1) -> "tuple[torch.Tensor, torch.Tensor | None]":
    """ToMe's bipartite soft matching + size-weighted merge ("Token Merging: Your ViT But Faster",
    tome/merge.py: bipartite_soft_matching + merge_wavg), written as ToMe writes it (argsort,
    scatter_reduce), with `protect` leading tokens kept: protect 1 is ToMe's class token, 2 its
    class + distillation tokens. Unmerged tokens keep their order (ToMe sorts them only with a
    class token; without one the order differs by a permutation).

    Args:
        x: [B, N, C] tokens; metric: [B, N, d] (the keys averaged over heads); size: [B, N, 1] or None (ones).
    Returns:
        (merged tokens [B, N - r, C], their sizes [B, N - r, 1]); r is capped at (N - protect) // 2.
    """
    b, n, c = x.shape
    r = min(r, (n - protect) // 2)
    if r <= 0:
        return x, size
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    pa, pb = (protect + 1) // 2, protect // 2
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True)
        a, bb = m[..., ::2, :], m[..., 1::2, :]
        scores = a @ bb.transpose(-1, -2)
        scores[..., :pa, :] = -float("inf")
        scores[..., :, :pb] = -float("inf")
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :].sort(dim=1)[0]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(t: torch.Tensor) -> torch.Tensor:
        src, dst = t[..., ::2, :], t[..., 1::2, :]
        nb, t1, ch = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(nb, t1 - r, ch))
        src = src.gather(dim=-2, index=src_idx.expand(nb, r, ch))
        dst = dst.scatter_reduce(-2, dst_idx.expand(nb, r, ch), src, reduce="sum")
        front = [(unm if i % 2 == 0 else dst)[:, i // 2:i // 2 + 1] for i in range(protect)]
        return torch.cat(front + [unm[:, pa:], dst[:, pb:]], dim=1)
    xm = merge(x * size)
    sm = merge(size)
    return xm / sm, sm


class ToMeState:
    """Per-call state of an eager model patched with ToMe: r per block, the token sizes."""

    def __init__(self, r: "int | Sequence[int]", blocks: int, protect: int = 1, proportional_attention: bool = True):
        self.r = list(r) if not isinstance(r, int) else [r] * blocks
        assert len(self.r) == blocks, f"{len(self.r)} r values for {blocks} blocks"
        self.protect, self.prop = protect, proportional_attention
        self.reset()

    def reset(self) -> None:
        self.size: "torch.Tensor | None" = None
        self.block = 0
        self.tokens: list[tuple[int, int]] = []

    def bias(self) -> "torch.Tensor | None":
        """log(size) per key, [B, 1, 1, N], once tokens have merged (ToMe's proportional attention)."""
        return self.size.log()[:, None, None, :, 0] if self.prop and self.size is not None else None

    def merge(self, x: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
        r = self.r[self.block]
        self.block += 1
        n = x.shape[1]
        x, self.size = tome_merge(x, metric, self.size, r, self.protect)
        self.tokens.append((n, x.shape[1]))
        return x


class _TinyViTBlock(TinyBlock):
    def forward(self, x: torch.Tensor, tome: "ToMeState | None" = None, scores: Any = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
        if scores is not None:
            s = scores(s)
        bias = tome.bias() if tome is not None else None
        a = torch.softmax(s if bias is None else s + bias, dim=-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        if tome is not None:
            x = tome.merge(x, k.mean(1))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A ViT classifier: 2x2 patches of an 8x8 image (16 tokens) and a [CLS] token, pre-norm blocks
    with a fused qkv, the head on [CLS]. `forward(x, tome=ToMeState(...))` runs ToMe's merging eagerly;
    `forward(x, scores={block: fn})` applies fn to that block's scores [B, H, N, N] before the softmax
    (sparse_attention_bias's masks)."""

    def __init__(self, image: int = 8, patch: int = 2, dim: int = 32, heads: int = 4, layers: int = 3,
                 classes: int = 4):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.5)
        self.blocks = nn.ModuleList([_TinyViTBlock(dim, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor, tome: "ToMeState | None" = None, scores: Any = None) -> torch.Tensor:
        if tome is not None:
            tome.reset()
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        for i, blk in enumerate(self.blocks):
            t = blk(t, tome, (scores or {}).get(i))
        return self.head(self.norm(t)[:, 0])


def sparse_attention_bias(heads: int, n: int, local: "Sequence[int]", *, grid: "tuple[int, int] | None" = None,
                          window: "tuple[int, int] | None" = None, tokens: "tuple[int, int] | None" = None,
                          k: "int | None" = None) -> Any:
    """The eager meaning of sparse_attention on one site, as a function of its scores [B, H, n, n]:
    for each local head an additive -inf mask, built here with Python loops over the grid: a grid
    query sees the keys in its own window (row // window rows, col // window cols) and every token
    outside the grid; a token outside the grid sees every key. With k (mode topk): the keys below
    each row's k-th largest score are masked instead."""
    allowed = torch.ones(n, n, dtype=torch.bool)
    if k is None:
        start, end = tokens
        cols = grid[1]

        def cell(i: int) -> tuple[int, int]:
            r, c = divmod(i - start, cols)
            return r // window[0], c // window[1]
        for i in range(start, end):
            for j in range(start, end):
                allowed[i, j] = cell(i) == cell(j)

    def apply(s: torch.Tensor) -> torch.Tensor:
        s = s.clone()
        for h in local:
            if k is None:
                s[:, h] = s[:, h].masked_fill(~allowed, float("-inf"))
            else:
                kth = torch.sort(s[:, h], dim=-1, descending=True).values[..., k - 1:k]
                s[:, h] = s[:, h].masked_fill(s[:, h] < kth, float("-inf"))
        return s
    return apply


def tiny_vit(seed: int = 0, batch: int = 3) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(seed)
    m = TinyViT().eval()
    return m, (torch.randn(batch, 1, 8, 8),)


def tome_vit(model: nn.Module, r: "int | Sequence[int]", protect: int = 1,
             proportional_attention: bool = True) -> nn.Module:
    """A copy of a transformers ViT model (any module holding ViTLayer blocks, e.g.
    examples/vit_mnist's classifier) patched with ToMe the way ToMe patches timm: each block's
    attention returns its keys averaged over heads and adds log(size) to its scores, each block
    merges r tokens after its attention (tome_merge), and the model's forward resets the sizes.
    The copy's `_tome` is the ToMeState (tokens per block after a call)."""
    import copy
    import types
    m = copy.deepcopy(model)
    layers = [mod for mod in m.modules() if type(mod).__name__ == "ViTLayer"]
    state = ToMeState(r, len(layers), protect, proportional_attention)

    def layer_forward(self, hidden_states, *args, **kwargs):
        att = self.attention
        x = hidden_states
        h = self.layernorm_before(x)
        b, n, _ = h.shape
        q, k, v = (p(h).view(b, n, -1, att.head_dim).transpose(1, 2) for p in (att.q_proj, att.k_proj, att.v_proj))
        w = torch.matmul(q, k.transpose(2, 3)) * att.scaling
        bias = state.bias()
        w = torch.softmax(w if bias is None else w + bias, dim=-1)
        o = att.o_proj(torch.matmul(w, v).transpose(1, 2).reshape(b, n, -1))
        x = self.dropout(o) + x
        x = state.merge(x, k.mean(1))
        return self.dropout(self.mlp(self.layernorm_after(x))) + x
    for lay in layers:
        lay.forward = types.MethodType(layer_forward, lay)
    cls = type(m)

    def forward(self, *args, **kwargs):
        state.reset()
        return cls.forward(self, *args, **kwargs)
    m.__class__ = type(f"ToMe{cls.__name__}", (cls,), {"forward": forward})
    m._tome = state
    return m


# -- ToMe-SD: tomesd's own eager form, the reference token_merge's unmerge mode is checked against --
def tomesd_matching(x: torch.Tensor, r: int, grid: "tuple[int, int]", stride: "tuple[int, int]" = (2, 2),
                    seed: "int | None" = None) -> "tuple[Callable, Callable]":
    """tomesd's bipartite_soft_matching_random2d ("Token Merging for Fast Stable Diffusion", Bolya and
    Hoffman, 2023; tomesd/merge.py) as tomesd writes it (argsort, gather, scatter_reduce, scatter_):
    one destination per stride window of the (rows, cols) grid (its top-left token, tomesd's
    use_rand=False, or drawn with `seed` by randint as tomesd draws it), the r sources most similar
    (cosine of x) to their best destination merged into it by mean.
    The sort of the grid is stable (tomesd's argsort is not; it only reorders tokens within a set).

    Returns:
        (merge [B, N, C] -> [B, N - r, C], unmerge [B, N - r, C] -> [B, N, C]).
    """
    bsz, n, _ = x.shape
    h, w = grid
    sy, sx = min(stride[0], h), min(stride[1], w)
    hsy, wsx = h // sy, w // sx
    if seed is None:
        rand_idx = torch.zeros(hsy, wsx, 1, dtype=torch.int64)
    else:
        rand_idx = torch.randint(sy * sx, size=(hsy, wsx, 1), generator=torch.Generator().manual_seed(seed))
    view = torch.zeros(hsy, wsx, sy * sx, dtype=torch.int64)
    view.scatter_(dim=2, index=rand_idx, src=-torch.ones_like(rand_idx))
    view = view.view(hsy, wsx, sy, sx).transpose(1, 2).reshape(hsy * sy, wsx * sx)
    buf = torch.zeros(h, w, dtype=torch.int64)
    buf[:hsy * sy, :wsx * sx] = view
    rand_idx = buf.reshape(1, -1, 1).argsort(dim=1, stable=True)
    num_dst = hsy * wsx
    a_idx, b_idx = rand_idx[:, num_dst:, :], rand_idx[:, :num_dst, :]

    def split(t):
        c = t.shape[-1]
        return t.gather(1, a_idx.expand(bsz, n - num_dst, c)), t.gather(1, b_idx.expand(bsz, num_dst, c))
    with torch.no_grad():
        a, b = split(x / x.norm(dim=-1, keepdim=True))
        r = min(a.shape[1], r)
        node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(t: torch.Tensor) -> torch.Tensor:
        src, dst = split(t)
        nb, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(nb, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(nb, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(nb, r, c), src, reduce="mean")
        return torch.cat([unm, dst], dim=1)

    def unmerge(t: torch.Tensor) -> torch.Tensor:
        unm_len = unm_idx.shape[1]
        unm, dst = t[..., :unm_len, :], t[..., unm_len:, :]
        c = unm.shape[-1]
        src = dst.gather(dim=-2, index=dst_idx.expand(bsz, r, c))
        out = torch.zeros(bsz, n, c, dtype=t.dtype)
        a_all = a_idx.expand(bsz, a_idx.shape[1], 1)
        out.scatter_(dim=-2, index=b_idx.expand(bsz, num_dst, c), src=dst)
        out.scatter_(dim=-2, index=a_all.gather(dim=1, index=unm_idx).expand(bsz, unm_len, c), src=unm)
        out.scatter_(dim=-2, index=a_all.gather(dim=1, index=src_idx).expand(bsz, r, c), src=src)
        return out
    return merge, unmerge


class ToMeSDState:
    """ToMe-SD in an eager model: per block, r and the branches merged; each block asks
    `merges(x, index)` for ((merge, unmerge) of its attention, (merge, unmerge) of its MLP),
    computed once from its input x as tomesd's compute_merge does."""

    def __init__(self, r: "int | Sequence[int]", blocks: int, grid: "tuple[int, int]",
                 stride: "tuple[int, int]" = (2, 2), seed: "int | None" = None,
                 branches: "Sequence[str]" = ("attn",)):
        self.r = list(r) if not isinstance(r, int) else [r] * blocks
        assert len(self.r) == blocks, f"{len(self.r)} r values for {blocks} blocks"
        self.grid, self.stride, self.seed, self.branches = tuple(grid), tuple(stride), seed, tuple(branches)

    def merges(self, x: torch.Tensor, index: int) -> tuple:
        if self.r[index] <= 0:
            return (_same, _same), (_same, _same)
        mu = tomesd_matching(x, self.r[index], self.grid, self.stride, self.seed)
        return tuple(mu if b in self.branches else (_same, _same) for b in ("attn", "mlp"))


def tomesd_dit(model: nn.Module, r: "int | Sequence[int]", grid: "tuple[int, int] | None" = None,
               stride: "tuple[int, int]" = (2, 2), seed: "int | None" = None,
               branches: "Sequence[str]" = ("attn",)) -> nn.Module:
    """A copy of a diffusers DiT (any module holding adaLN-Zero BasicTransformerBlocks without cross
    attention, e.g. examples/dit_mnist's EpsModel) patched with ToMe-SD the way tomesd patches
    diffusers (tomesd/patch.py, make_diffusers_tome_block): each block computes the matching from its
    input, merges the normalized, modulated tokens before attn1 (and ff), and unmerges the gated output
    before the residual add. `grid` defaults to the square of the token count."""
    import copy
    import types
    m = copy.deepcopy(model)
    blocks = [mod for mod in m.modules() if type(mod).__name__ == "BasicTransformerBlock"]
    state: "list[ToMeSDState]" = []

    def block_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                      encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None, class_labels=None,
                      added_cond_kwargs=None):
        assert self.norm_type == "ada_norm_zero" and self.attn2 is None, "tomesd_dit: adaLN-Zero blocks only"
        if not state:
            n = hidden_states.shape[1]
            side = int(round(n ** 0.5))
            state.append(ToMeSDState(r, len(blocks), grid or (side, side), stride, seed, branches))
        (m_a, u_a), (m_m, u_m) = state[0].merges(hidden_states, self._tome_index)
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(
            hidden_states, timestep, class_labels, hidden_dtype=hidden_states.dtype)
        attn_output = gate_msa.unsqueeze(1) * self.attn1(m_a(norm_hidden_states), attention_mask=attention_mask)
        hidden_states = u_a(attn_output) + hidden_states
        norm_hidden_states = self.norm3(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        ff_output = gate_mlp.unsqueeze(1) * self.ff(m_m(norm_hidden_states))
        return u_m(ff_output) + hidden_states
    for i, blk in enumerate(blocks):
        blk._tome_index = i
        blk.forward = types.MethodType(block_forward, blk)
    return m


# -- token pruning: a tiny VLA-shaped model and the eager reference of token_prune ---------------
class _TinyVLABlock(TinyBlock):
    def forward(self, x: torch.Tensor, bias: "torch.Tensor | None" = None) -> "tuple[torch.Tensor, torch.Tensor]":  # type: ignore[override]
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
        p = torch.softmax(s + bias if bias is not None else s, dim=-1)
        x = x + self.proj((p @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x)), p


class TinyVLA(nn.Module):
    """A VLA-shaped backbone: [text (4 ids, 0 = padding) | 16 visual tokens (2x2 patches of an 8x8
    image) | state | readout] with the padded text keys masked by an additive bias, pre-norm
    blocks with explicit softmax attention, the head on the readout token (x[:, -1]), as
    examples/vla_metaworld's backbone. `forward(..., prune=PruneTokensRef(...))` drops tokens
    eagerly after one block (and gathers the mask); `skip` names blocks replaced by the identity.
    `vision_layers`: blocks over the 16 patch tokens before they join the sequence (a ViT)."""

    def __init__(self, vocab: int = 10, text: int = 4, dim: int = 32, heads: int = 4, layers: int = 4,
                 vision_layers: int = 0):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.patch = nn.Conv2d(1, dim, 2, stride=2)
        self.state = nn.Linear(3, dim)
        self.readout = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, text + 16 + 2, dim) * 0.5)
        self.blocks = nn.ModuleList([_TinyVLABlock(dim, heads) for _ in range(layers)])
        self.vision = nn.ModuleList([_TinyVLABlock(dim, heads) for _ in range(vision_layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, image: torch.Tensor, ids: torch.Tensor, state: torch.Tensor,
                prune: "Callable | None" = None, skip: "Sequence[int]" = ()) -> torch.Tensor:
        b = image.shape[0]
        vis = self.patch(image).flatten(2).transpose(1, 2)
        for blk in self.vision:
            vis, _ = blk(vis)
        x = torch.cat([self.embed(ids), vis, self.state(state)[:, None], self.readout.expand(b, -1, -1)], dim=1)
        x = x + self.pos
        pad = (ids == 0).to(x.dtype) * -1e9
        bias = torch.cat([pad, torch.zeros(b, x.shape[1] - ids.shape[1])], dim=1)[:, None, None, :]
        for i, blk in enumerate(self.blocks):
            if i in skip:
                continue
            x, p = blk(x, bias)
            if prune is not None and i == prune.after:
                x, idx = prune(x, p)
                bias = bias.gather(-1, idx[:, None, None, :])
        return self.head(self.norm(x[:, -1]))


def tiny_vla(seed: int = 0, batch: int = 3, vision_layers: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(seed)
    m = TinyVLA(vision_layers=vision_layers).eval()
    return m, tiny_vla_inputs(batch, seed + 1)


def tiny_vla_inputs(batch: int = 3, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """An image, text ids whose rows are padded differently (0 = padding), a state."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 10, (batch, 4), generator=g)
    for i in range(batch):
        ids[i, 4 - (i % 3):] = 0
    return torch.rand(batch, 1, 8, 8, generator=g), ids, torch.randn(batch, 3, generator=g)


@dataclasses.dataclass
class PruneTokensRef:
    """token_prune's meaning in eager PyTorch (argsort and Python loops, not the graph's form):
    after block `after`, keep `keep` of the candidates [start, end) by `score` (see
    passes/sparsity/token_prune.py), `by_diversity` of them picked greedily for diversity."""
    after: int
    start: int
    end: int
    keep: int
    score: str = "relevance"
    queries: "tuple | None" = None
    by_diversity: int = 0
    temperature: "float | None" = None      # Token Transforming (mode transform)

    def __call__(self, x: torch.Tensor, p: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
        b, n0, c = x.shape
        pm = p.reshape(b, -1, n0, n0).mean(1)
        if self.score == "received":
            s = pm.mean(1)[:, self.start:self.end]
        else:
            rows = self.queries if self.queries is not None else [(0, self.start), (self.end, n0)]
            s = sum(pm[:, a:e].sum(1) for a, e in rows if a < e)[:, self.start:self.end]
        n = self.end - self.start
        index = []
        for i in range(b):
            kept = torch.argsort(s[i], descending=True, stable=True)[:self.keep - self.by_diversity].tolist()
            f = torch.nn.functional.normalize(x[i, self.start:self.end], dim=-1)
            sim = f @ f.T
            for _ in range(self.by_diversity):
                rest = [j for j in range(n) if j not in kept]
                kept.append(min(rest, key=lambda j: float(sim[j, kept].max())))
            index.append(list(range(self.start)) + [self.start + j for j in sorted(kept)] + list(range(self.end, n0)))
        idx = torch.tensor(index)
        out = x.gather(1, idx[..., None].expand(b, idx.shape[1], c))
        if self.temperature is not None:            # each dropped token's share of every kept one
            out = out.clone()
            for i in range(b):
                kept = [j - self.start for j in index[i][self.start:self.start + self.keep]]
                f = torch.nn.functional.normalize(x[i, self.start:self.end], dim=-1)
                acc = {k: (x[i, self.start + k].clone(), 1.0) for k in kept}
                for j in range(n):
                    if j in kept:
                        continue
                    w = torch.softmax(torch.stack([f[j] @ f[k] for k in kept]) / self.temperature, 0)
                    for k, wk in zip(kept, w):
                        v, tot = acc[k]
                        acc[k] = (v + wk * x[i, self.start + j], tot + float(wk))
                for p, k in enumerate(kept):
                    out[i, self.start + p] = acc[k][0] / acc[k][1]
        return out, idx


class ReuseTokensRef:
    """token_reuse's meaning (VLA-Cache) in eager PyTorch on TinyVLA, with Python loops and
    argsort rather than the graph's form: one request, call by call (see
    passes/sparsity/token_reuse.py). The first call, or one where fewer than the smallest level's
    tokens are static and not relevant, computes every token; otherwise block l recomputes the
    prefix, the visual tokens by priority (the `relevant` most relevant at the previous call,
    then the most changed patches) but the k_l = round(k * alphas[l]) last of them, and the
    suffix; its keys / values are the previous call's with the recomputed rows written in. The
    model's vision blocks (TinyVLA(vision_layers=...)) reuse as its first block does.
    `levels` / `chosen` record what each call did ("cold", "full" or the level k)."""

    def __init__(self, model: nn.Module, *, tokens: "tuple[int, int]" = (4, 20), patch: int = 2,
                 threshold: float = 0.996, center: float = 0.5, relevant: int = 4,
                 levels: "Sequence[int]" = (4, 8), alphas: "Sequence[float]" = (1.0, 1.0, 1.0, 1.0),
                 queries: "tuple[int, int] | None" = None, relevance_blocks: "int | None" = None):
        self.m, self.tokens, self.patch, self.threshold, self.center = model, tokens, patch, threshold, center
        self.relevance_blocks = relevance_blocks
        self.relevant, self.levels, self.alphas = relevant, tuple(levels), tuple(alphas)
        self.queries = queries or (0, tokens[0])
        self.reset()

    def reset(self) -> None:
        self.kv: "list | None" = None
        self.patches = self.relevance = None
        self.chosen: list = []

    def _block(self, blk: nn.Module, h: torch.Tensor, r: torch.Tensor, at: int, bias: "torch.Tensor | None",
               level: "int | None") -> tuple:
        """One block on the rows `r` (token positions [B, R]), keys / values of the others from
        the previous call's (state entry `at`): (h, keys, values, probabilities)."""
        b, _, d = h.shape
        hd = d // blk.heads
        q, k, v = blk.qkv(blk.norm1(h)).reshape(b, -1, 3, blk.heads, hd).permute(2, 0, 3, 1, 4)
        if level is None:
            kf, vf = k, v
        else:
            kf, vf = self.kv[at][0].clone(), self.kv[at][1].clone()
            for i in range(b):
                kf[i][:, r[i]] = k[i]
                vf[i][:, r[i]] = v[i]
        s = q @ kf.transpose(-1, -2) / hd ** 0.5
        p = torch.softmax(s + bias if bias is not None else s, dim=-1)
        h = h + blk.proj((p @ vf).transpose(1, 2).reshape(b, -1, d))
        return h + blk.mlp(blk.norm2(h)), kf, vf, p

    def _patches(self, image: torch.Tensor) -> torch.Tensor:
        b, c, h, w = image.shape
        p = self.patch
        out = torch.stack([image[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(b, -1)
                           for i in range(h // p) for j in range(w // p)], dim=1)
        return out - self.center

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, ids: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        m, (start, end) = self.m, self.tokens
        b = image.shape[0]
        vis = m.patch(image).flatten(2).transpose(1, 2)
        x = torch.cat([m.embed(ids), vis, m.state(state)[:, None], m.readout.expand(b, -1, -1)], dim=1) + m.pos
        n0, d = x.shape[1], x.shape[2]
        bias = torch.cat([(ids == 0).to(x.dtype) * -1e9, torch.zeros(b, n0 - ids.shape[1])], dim=1)[:, None, None, :]
        cur = self._patches(image)
        n = end - start
        level = None
        if self.kv is not None:
            cos = torch.nn.functional.cosine_similarity(cur, self.patches, dim=-1, eps=1e-12)
            sim = torch.where((cur == self.patches).all(-1), torch.ones_like(cos), cos)
            rel = torch.zeros(b, n)
            for i in range(b):
                for j in torch.argsort(self.relevance[i], descending=True)[:self.relevant].tolist():
                    rel[i, j] = 1.0
            free = int((((sim >= self.threshold).float()) * (1 - rel)).sum(-1).min())
            fit = [k for k in self.levels if k <= free]
            level = fit[-1] if fit else None
        self.chosen.append("cold" if self.kv is None else "full" if level is None else level)
        if level is None:
            rows = [torch.arange(n0).expand(b, n0)] * len(m.blocks)
        else:
            rows = []
            for a in self.alphas:
                keep = n - round(level * a)
                per = []
                for i in range(b):
                    prio = 4.0 * rel[i] + (1.0 - sim[i])
                    order = torch.argsort(prio, descending=True, stable=True)[:keep] + start
                    per.append(torch.cat([torch.arange(start), order, torch.arange(end, n0)]))
                rows.append(torch.stack(per))
        kv, probs = [], []
        if len(m.vision):                          # the patch tokens before they join the sequence
            vis0 = m.patch(image).flatten(2).transpose(1, 2)
            vrows = rows[0][:, start:start + (rows[0].shape[1] - start - (n0 - end))] - start
            hv = vis0.gather(1, vrows[..., None].expand(-1, -1, d))
            for blk in m.vision:
                hv, kf, vf, _ = self._block(blk, hv, vrows, len(kv), None, level)
                kv.append((kf, vf))
            vis = torch.zeros_like(vis0).scatter(1, vrows[..., None].expand(-1, -1, d), hv)
            x = torch.cat([m.embed(ids), vis, m.state(state)[:, None], m.readout.expand(b, -1, -1)], dim=1) + m.pos
        h = x.gather(1, rows[0][..., None].expand(-1, -1, d))
        for li, blk in enumerate(m.blocks):
            r = rows[li]
            if r.shape[1] < h.shape[1]:               # rows dropped at this block: keep the first ones and the suffix
                keep_idx = torch.cat([torch.arange(r.shape[1] - (n0 - end)),
                                      torch.arange(h.shape[1] - (n0 - end), h.shape[1])])
                h = h[:, keep_idx]
            h, kf, vf, p = self._block(blk, h, r, len(kv), bias, level)
            kv.append((kf, vf))
            probs.append(p)
        self.kv, self.patches = kv, cur
        q0, q1 = self.queries
        probs = probs[-(self.relevance_blocks or len(probs)):]
        self.relevance = sum(p[:, :, q0:q1, start:end].sum(2).mean(1) for p in probs) / len(probs)
        return m.head(m.norm(h[:, -1]))


# -- the report in a browser -------------------------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"
#: Chromium on a machine with no network: no background connections, no sandbox as root
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync")


def browser_missing(chromium: str = CHROMIUM) -> list[str]:
    """What rendering a page in a headless browser lacks here (empty: nothing): Debian's chromium
    and the Python package playwright, which drives it (its own browser download cannot reach its
    host from these machines)."""
    missing = []
    if not os.path.exists(chromium):
        missing.append(f"{chromium} (Debian package 'chromium': apt-get install chromium)")
    import importlib.util
    if importlib.util.find_spec("playwright") is None:
        missing.append("the Python package 'playwright' (pip install -e '.[dev]')")
    return missing


def browse_page(page_file: str, screenshot: str, *, chromium: str = CHROMIUM, width: int = 1280) -> dict:
    """Open a local HTML file in headless chromium, measure every `figure.plot`'s SVG and take a
    full-page screenshot.

    Returns:
        {"errors": console errors and page exceptions, "fetched": URLs requested other than the
        file itself and data: URLs, "plots": per figure {id, w, h, marks (drawn SVG elements),
        shown}, "screenshot": the PNG's path}
    Raises:
        RuntimeError: the browser or playwright is missing (see browser_missing).
    """
    missing = browser_missing(chromium)
    if missing:
        raise RuntimeError("rendering a page needs " + " and ".join(missing))
    from playwright.sync_api import sync_playwright
    errors: list[str] = []
    fetched: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: None if r.url.startswith(("file:", "data:")) else fetched.append(r.url))
            page.goto("file://" + os.path.abspath(page_file), wait_until="load")
            plots = page.evaluate("""() => [...document.querySelectorAll('figure.plot')].map(f => {
                const s = f.querySelector('svg'); if (!s) return {id: f.id, w: 0, h: 0, marks: 0, shown: false};
                const r = s.getBoundingClientRect();
                return {id: f.id, w: r.width, h: r.height, marks: s.querySelectorAll('path, image, use, rect').length,
                        shown: getComputedStyle(s).display !== 'none' && getComputedStyle(s).visibility !== 'hidden'};
            })""")
            page.screenshot(path=screenshot, full_page=True)
        finally:
            browser.close()
    return {"errors": errors, "fetched": fetched, "plots": plots, "screenshot": screenshot}


def plots_declared(page: str) -> int:
    """The plots a `pared report` page says its sections hold (their data-plots)."""
    return sum(int(n) for n in re.findall(r'<section id="[\w-]+" data-plots="(\d+)">', page))


def assert_page_rendered(seen: dict, expected_plots: int) -> None:
    """What browse_page saw is a page loaded without errors or fetches, every one of the
    `expected_plots` drawn (a visible SVG of some size with marks in it), and a screenshot
    with something on it."""
    assert seen["errors"] == [], f"the page logged errors: {seen['errors']}"
    assert seen["fetched"] == [], f"the page fetched {seen['fetched']}"
    assert len(seen["plots"]) == expected_plots >= 1, (len(seen["plots"]), expected_plots)
    for p in seen["plots"]:
        assert p["shown"] and p["w"] > 100 and p["h"] > 50 and p["marks"] >= 5, f"plot not drawn: {p}"
    from PIL import Image
    with Image.open(seen["screenshot"]) as im:
        assert im.size[1] > 900, im.size
        # something was drawn: many distinct colours, not a blank page
        colours = im.convert("RGB").resize((320, im.size[1] // 4)).getcolors(1 << 20) or []
        assert len(colours) > 50, f"the screenshot has {len(colours)} colours: blank?"


# -- an aarch64 Python under qemu-user ------------------------------------------------------------------
#: where tests/support/aarch64_env.sh (`make cross`) prepares it
AARCH64_ENV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "aarch64")


def aarch64_missing(env_dir: str = AARCH64_ENV) -> list[str]:
    """What running Python for aarch64 under qemu-user lacks here (empty: nothing)."""
    import shutil
    missing = []
    if not shutil.which("qemu-aarch64"):
        missing.append("qemu-aarch64 (Debian package 'qemu-user')")
    if not shutil.which("aarch64-linux-gnu-gcc"):
        missing.append("the cross linker aarch64-linux-gnu-gcc (Debian package 'gcc-aarch64-linux-gnu')")
    if not os.path.exists(os.path.join(env_dir, ".ready")):
        missing.append(f"an aarch64 Python with numpy and TVM in {env_dir} (as root: make cross, which runs "
                       "tests/support/aarch64_env.sh)")
    return missing


def run_aarch64_python(code: str, *, env_dir: str = AARCH64_ENV, timeout: int = 600) -> str:
    """Run Python `code` in Debian's arm64 python3.11 under qemu-aarch64 (user emulation), with the
    aarch64 wheels of `env_dir` and this checkout's pared importable; return stdout.

    Raises:
        RuntimeError: something it needs is missing (aarch64_missing).
        AssertionError: the code failed (with its stderr).
    """
    missing = aarch64_missing(env_dir)
    if missing:
        raise RuntimeError("running aarch64 Python needs " + " and ".join(missing))
    import shutil
    root = os.path.join(env_dir, "root")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": os.pathsep.join([os.path.join(env_dir, "site"), repo]), "PYTHONDONTWRITEBYTECODE": "1"}
    p = subprocess.run([shutil.which("qemu-aarch64"), "-L", root, os.path.join(root, "usr", "bin", "python3.11"),
                        "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, f"aarch64 Python under qemu failed:\n{p.stderr[-3000:]}"
    return p.stdout


def skip_or_fail_if_missing(missing: "list[str]", what: str, require_env: str) -> None:
    """In a test: skip naming what is missing (`missing`, e.g. browser_missing()), or fail instead
    where `require_env` is "1" (the Makefile sets it where it prepared the tool, so a gap there is
    a failure, not a silent skip)."""
    if not missing:
        return
    import pytest
    msg = f"{what} needs " + " and ".join(missing)
    if os.environ.get(require_env) == "1":
        pytest.fail(msg)
    pytest.skip(msg)

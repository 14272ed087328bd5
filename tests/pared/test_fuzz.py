"""Property-based fuzzing (Hypothesis, fixed seed, bounded examples) of what users and files feed pared:
pipeline files, every registered pass's options, artifact manifests, and the Executor's inputs.

Each property is "a clear pared error, never another exception": a one-line PipelineError naming
file:line (and the pass and option) for a malformed pipeline file, an OptionError naming the pass and
the option, an ArtifactError for a malformed or escaping manifest (nothing read outside the
artifact), a TypeError/ValueError naming the input for wrong inputs. Every example is drawn from
`derandomize=True`, so a run tries the same cases each time; the counts are MAX_EXAMPLES below.
"""
import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
import typing

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pared.backends import artifact as artifact_mod
from pared.backends.executor import Executor
from pared.ir.errors import ArtifactError, OptionError, PipelineError
from pared.pipeline import TOP_LEVEL, load_pipeline
from pared.registry import REGISTRY

MAX_EXAMPLES = {"pipeline": 600, "syntax": 300, "options": 1000, "manifest": 400, "executor_manifest": 200,
                "inputs": 200}     # inputs: per backend (ORT static, ORT dynamic batch, TVM)
FUZZ = dict(derandomize=True, deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# -- values -------------------------------------------------------------------------------------------
_text = st.text(st.characters(blacklist_categories=("Cs",), max_codepoint=0x2FF), max_size=8)
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(), _text,
                     st.sampled_from([0, -1, 1, 2 ** 63, float("nan"), float("inf"), -0.0, "", "cpu", "1"]))
NASTY = st.recursive(_scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                   st.dictionaries(_text, c, max_size=3)), max_leaves=6)
PASS_NAMES = sorted(REGISTRY)


def _fields(name):
    opts = REGISTRY[name].Options
    return [f.name for f in dataclasses.fields(opts)], typing.get_type_hints(opts)


def _one_line_flow(value) -> str:
    """YAML flow text on one line (strings as JSON: double-quoted with escapes, which YAML reads alike)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_one_line_flow(k)}: {_one_line_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_one_line_flow(v) for v in value) + "]"
    text = yaml.safe_dump(value).strip()
    if text.endswith("..."):
        text = text[:-3].strip()
    assert "\n" not in text
    return text


def _names_option(msg: str, key) -> bool:
    return repr(key) in msg or f"'{key}'" in msg or f"'{key}[" in msg


def _base_error(name):
    """The error a pass raises with no options at all (one whose options have a required choice,
    as token_merge's r or ratio), or None."""
    try:
        REGISTRY[name]({})
    except OptionError as e:
        return str(e)
    return None


def _workdir():
    return tempfile.mkdtemp(prefix="pared-fuzz-")


# -- pipeline files ------------------------------------------------------------------------------------
GOOD_TOP = [("version", 1), ("target", "cpu")]
GOOD_PASSES = [("constant_folding", {"max_bytes": 1000}), ("dead_code_elimination", None)]


@st.composite
def pipeline_case(draw):
    """A pipeline file with one defect; returns (top, passes, defect, where) where `where` indexes what to blame."""
    top = list(GOOD_TOP)
    passes = list(GOOD_PASSES)
    kind = draw(st.sampled_from(["unknown_pass", "option", "options_type", "top_value", "top_key", "entry",
                                 "version", "fidelity"]))
    if kind == "unknown_pass":
        name = draw(st.one_of(_text, st.sampled_from([p + "x" for p in PASS_NAMES] + ["constant-folding", "CSE"]))
                    .filter(lambda n: n not in REGISTRY))
        i = draw(st.integers(0, len(passes)))
        passes.insert(i, (name, None))
        return top, passes, kind, (name, i)
    if kind in ("option", "options_type"):
        name = draw(st.sampled_from(PASS_NAMES))
        fields, _ = _fields(name)
        if kind == "option":
            key = draw(st.sampled_from(fields)) if fields and draw(st.booleans()) else draw(_text)
            opts = {key: draw(NASTY)}
        else:
            key, opts = None, draw(st.one_of(_scalars.filter(lambda v: v is not None), st.lists(_scalars, max_size=2)))
        i = draw(st.integers(0, len(passes)))
        passes.insert(i, (name, opts))
        block = kind == "option" and draw(st.booleans())    # options one per line, under the name
        return top, passes, kind, (name, key, i, block)
    if kind == "top_value":
        key = draw(st.sampled_from([k for k in TOP_LEVEL if k != "version"]))
        top.append((key, draw(NASTY)))
        if key == "passes":
            passes = None
        return top, passes, kind, key
    if kind == "top_key":
        key = draw(_text.filter(lambda k: k not in TOP_LEVEL))
        top.insert(draw(st.integers(0, len(top))), (key, draw(_scalars)))
        return top, passes, kind, key
    if kind == "entry":
        entry = draw(st.one_of(st.lists(_scalars, max_size=2), st.integers(), st.floats(),
                               st.dictionaries(_text, _scalars, min_size=2, max_size=3),
                               st.builds(lambda k, v: {k: v}, st.sampled_from(PASS_NAMES),
                                         _scalars.filter(lambda v: v is not None))))
        i = draw(st.integers(0, len(passes)))
        passes.insert(i, ("__raw__", entry))
        return top, passes, kind, (None, i)
    if kind == "fidelity":
        keys = st.sampled_from(["cosine", "rel_l2", "max_abs", "min_cosine", "max_rel_l2", "psnr_db"])
        top.append(("fidelity", draw(st.dictionaries(st.one_of(keys, _text), NASTY, min_size=1, max_size=3))))
        return top, passes, kind, "fidelity"
    top[0] = ("version", draw(NASTY.filter(lambda v: not (type(v) is int and v == 1))))
    return top, passes, kind, "version"


def _render(top, passes, block=None):
    lines, at = [], {}
    for k, v in top:
        at[k] = len(lines) + 1
        lines.append(f"{_one_line_flow(k)}: {_one_line_flow(v)}")
    entry_lines = []
    if passes is not None:
        at["passes"] = len(lines) + 1
        lines.append("passes:")
        for name, opts in passes:
            entry_lines.append(len(lines) + 1)
            if name == "__raw__":
                lines.append(f"  - {_one_line_flow(opts)}")
            elif opts is None:
                lines.append(f"  - {_one_line_flow(name)}")
            elif len(entry_lines) - 1 == block:
                lines.append(f"  - {_one_line_flow(name)}:")
                for k, v in opts.items():
                    lines.append(f"      {_one_line_flow(k)}: {_one_line_flow(v)}")
            else:
                lines.append(f"  - {_one_line_flow(name)}: {_one_line_flow(opts)}")
    return "\n".join(lines) + "\n", at, entry_lines


def _load_error(text: "str | bytes"):
    d = _workdir()
    try:
        path = os.path.join(d, "p.yaml")
        with open(path, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
        try:
            spec = load_pipeline(path)
        except PipelineError as e:
            msg = str(e)
            assert "\n" not in msg, f"multi-line message: {msg!r}"
            assert msg.startswith(path), msg
            return path, msg, None
        # any other exception type propagates and fails the property
        return path, None, spec
    finally:
        shutil.rmtree(d, ignore_errors=True)


@settings(max_examples=MAX_EXAMPLES["pipeline"], **FUZZ)
@given(pipeline_case())
@example((GOOD_TOP + [("fidelity", {"cosine": float("nan")})], GOOD_PASSES, "fidelity", "fidelity"))
@example((GOOD_TOP, GOOD_PASSES[:1] + [("__raw__", {"constant_folding": {"max_bytes": float("nan")}})], "entry",
          (None, 1)))
def test_malformed_pipeline_files_are_one_line_errors(case):
    top, passes, kind, what = case
    block = what[2] if kind == "option" and what[3] else None
    text, at, entries = _render(top, passes, block)
    path, msg, spec = _load_error(text)
    if kind in ("unknown_pass", "entry"):
        assert msg is not None, f"accepted:\n{text}"
        i = what[1]
        assert msg.startswith(f"{path}:{entries[i]}: "), (msg, text)
        if kind == "unknown_pass":
            assert "unknown pass" in msg or "pass name" in msg or "a name or" in msg, msg
    elif kind in ("option", "options_type"):
        name, key, i, block = what
        if msg is None:
            return
        names = f"option {key!r}" in msg or f"option '{key}[" in msg
        line = entries[i] + 1 if block and names else entries[i]
        assert msg.startswith(f"{path}:{line}: "), (msg, text)
        assert f"pass '{name}'" in msg, msg
        if key is not None and msg[msg.index(": ", len(path)) + 2:] != _base_error(name):
            assert _names_option(msg, key), msg
    elif kind in ("top_value", "top_key", "version", "fidelity"):
        if msg is None:
            assert kind in ("top_value", "fidelity"), text
            bounds = spec.fidelity or {}
            assert not any(isinstance(v, float) and math.isnan(v) for v in bounds.values()), bounds
            return
        assert msg.startswith(f"{path}:{at[what]}: "), (msg, text)


@st.composite
def broken_yaml(draw):
    text, _, _ = _render(GOOD_TOP + [("fidelity", {"min_cosine": 0.99})], GOOD_PASSES)
    how = draw(st.sampled_from(["insert", "truncate", "replace", "bytes", "top_type"]))
    if how == "top_type":
        return _one_line_flow(draw(NASTY.filter(lambda v: not isinstance(v, dict)))) + "\n"
    if how == "bytes":
        pos = draw(st.integers(0, len(text)))
        junk = draw(st.sampled_from([b"\xff\xfe", b"\x00", b"\xc3", b"\x1b[31m", b"\xef\xbb\xbf"]))
        return text.encode()[:pos] + junk + text.encode()[pos:]
    pos = draw(st.integers(0, len(text) - 1))
    if how == "truncate":
        return text[:pos]
    piece = draw(st.one_of(st.sampled_from(list("[]{}:,&*!|>'\"%@\t-?#`") + ["\n  ", "&a", "*a", "!!python/object "
                                                                               "", "<<: ", "!!set "]),
                           st.text(max_size=3)))
    return text[:pos] + piece + text[pos + (how == "replace"):]


@settings(max_examples=MAX_EXAMPLES["syntax"], **FUZZ)
@given(broken_yaml())
def test_bad_yaml_syntax_names_the_line(text):
    path, msg, _ = _load_error(text)
    if msg is not None and "not valid YAML" in msg:
        n = (text.count(b"\n") if isinstance(text, bytes) else text.count("\n")) + 1
        line = msg[len(path) + 1:].split(":", 1)[0]
        assert line.isdigit() and 1 <= int(line) <= n, msg


# -- every pass's options -------------------------------------------------------------------------------
@settings(max_examples=MAX_EXAMPLES["options"], **FUZZ)
@given(st.sampled_from(PASS_NAMES), st.data())
def test_every_pass_option_error_names_pass_and_option(name, data):
    cls = REGISTRY[name]
    fields, hints = _fields(name)
    key = data.draw(st.sampled_from(fields)) if fields and data.draw(st.booleans()) else data.draw(_text)
    value = data.draw(NASTY)
    try:
        p = cls({key: value})
    except OptionError as e:
        msg = str(e)
        assert "\n" not in msg, msg
        assert f"pass '{name}'" in msg, msg
        assert _names_option(msg, key) or msg == _base_error(name), msg
        return
    # accepted: then it was a known option, and a float option never silently takes NaN
    assert key in fields
    got = getattr(p.options, key)
    assert not (isinstance(got, float) and math.isnan(got)), f"{name}.{key} accepted NaN"


# -- manifests -----------------------------------------------------------------------------------------
def _synthetic(tmp):
    with open(os.path.join(tmp, "main.bin"), "wb") as f:
        f.write(b"\x00\x01model-bytes" * 10)
    with open(os.path.join(tmp, "w.bin"), "wb") as f:
        f.write(b"weights" * 10)
    return {"graphs": {"main": {"backend": "onnxruntime", "file": "main.bin", "files": ["main.bin", "w.bin"],
                                "inputs": [{"name": "x", "dtype": "float32", "shape": [2, 8]}],
                                "outputs": [{"name": "y"}]}},
            "plan": {"version": 2}, "target": {"name": "cpu"}}


@pytest.fixture(scope="module")
def synthetic_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-manifest")
    art = artifact_mod.write_artifact(str(root / "art"), _synthetic)
    # a file outside the artifact that a traversal name could reach, with a matching sum in the manifest
    with open(root / "outside.bin", "wb") as f:
        f.write(b"secret")
    return art


TRAVERSAL = st.sampled_from(["../outside.bin", "/etc/passwd", "../../outside.bin", "a/../../outside.bin",
                             "./main.bin", "..", ".", "", "main.bin/", "//main.bin", "..\\outside.bin",
                             "a//b", "main.bin\x00", os.path.join(tempfile.gettempdir(), "x"), "manifest.json",
                             "signature.json"])


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@st.composite
def manifest_mutation(draw, manifest: dict):
    m = json.loads(json.dumps(manifest))
    kind = draw(st.sampled_from(["truncate", "reorder", "oversize", "retype", "delete", "traversal"]))
    data = json.dumps(m, indent=1).encode()
    if kind == "truncate":
        return kind, data[:draw(st.integers(0, len(data) - 1))]
    if kind == "oversize":
        return kind, data + b" " * (artifact_mod.MAX_MANIFEST_BYTES + 1 - len(data))
    if kind == "reorder":
        rnd = random.Random(draw(st.integers(0, 2 ** 16)))

        def shuffle(o):
            if isinstance(o, dict):
                items = list(o.items())
                rnd.shuffle(items)
                return {k: shuffle(v) for k, v in items}
            return [shuffle(v) for v in o] if isinstance(o, list) else o
        return kind, json.dumps(shuffle(m)).encode()
    paths = [p for p in _paths(m) if p]
    if kind in ("retype", "delete"):
        p = draw(st.sampled_from(paths))
        parent = m
        for k in p[:-1]:
            parent = parent[k]
        if kind == "delete":
            del parent[p[-1]]
        else:
            parent[p[-1]] = draw(NASTY)
        return kind, json.dumps(m).encode()
    bad = draw(TRAVERSAL)
    where = draw(st.sampled_from(["files", "file", "files_list", "weights_file"]))
    outside_sum = {"sha256": artifact_mod.sha256(__file__), "bytes": os.path.getsize(__file__)}
    g = m["graphs"]["main"]
    if where == "files":
        m["files"][bad] = dict(outside_sum)
    elif where == "file":
        m["files"][bad] = dict(outside_sum)
        g["file"] = bad
    elif where == "files_list":
        g["files"].append(bad)
    else:
        g["weights_file"] = bad
    return kind, json.dumps(m).encode()


class _ReadSpy:
    def __init__(self, root):
        self.root, self.outside = os.path.realpath(root), []
        self._sha = artifact_mod.sha256

    def __call__(self, path):
        real = os.path.realpath(path)
        if os.path.commonpath([self.root, real]) != self.root:
            self.outside.append(path)
        return self._sha(path)


def _try_manifest(monkeypatch, art, data, load):
    d = _workdir()
    try:
        dst = os.path.join(d, "art")
        shutil.copytree(art, dst)
        with open(os.path.join(dst, artifact_mod.MANIFEST), "wb") as f:
            f.write(data)
        spy = _ReadSpy(dst)
        monkeypatch.setattr(artifact_mod, "sha256", spy)
        try:
            load(dst)
            err = None
        except ArtifactError as e:
            err = str(e)
            assert "\n" not in err, err
        assert spy.outside == [], f"read outside the artifact: {spy.outside}"
        return err
    finally:
        monkeypatch.setattr(artifact_mod, "sha256", spy._sha)
        shutil.rmtree(d, ignore_errors=True)


@settings(max_examples=MAX_EXAMPLES["manifest"], **FUZZ)
@given(st.data())
def test_manifest_loader_refuses_malformed_manifests(synthetic_artifact, monkeypatch, data):
    monkeypatch.setattr(artifact_mod, "MAX_MANIFEST_BYTES", 1 << 14)
    manifest = json.load(open(os.path.join(synthetic_artifact, artifact_mod.MANIFEST)))
    kind, raw = data.draw(manifest_mutation(manifest))
    err = _try_manifest(monkeypatch, synthetic_artifact, raw, artifact_mod.read_manifest)
    if kind == "reorder":
        assert err is None, err
    elif kind in ("truncate", "oversize", "traversal"):
        assert err is not None, (kind, raw[:200])


# -- the Executor: manifests that reach the runtimes, and inputs --------------------------------------------
def _linear_artifact(root, target="cpu", dynamic=False):
    import torch
    from torch import nn

    from pared.ir.capture import capture
    from pared.targets import get_target
    from pared.testing import save_program
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 4), nn.ReLU()).eval()
    shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic else None
    return save_program(capture(m, (torch.randn(2, 8),), dynamic_shapes=shapes), str(root / "art"),
                        get_target(target).to_json())


@pytest.fixture(scope="module")
def ort_artifact(tmp_path_factory):
    return _linear_artifact(tmp_path_factory.mktemp("fuzz-ort"))


@pytest.fixture(scope="module", params=["onnxruntime", "onnxruntime-dynamic-batch", "tvm"])
def executor(request, tmp_path_factory):
    import warnings

    from pared.backends.signing import UnsignedCodeWarning
    root = tmp_path_factory.mktemp("fuzz-inputs")
    art = _linear_artifact(root, "tvm-cpu" if request.param == "tvm" else "cpu", dynamic="dynamic" in request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsignedCodeWarning)
        return Executor(art)


@settings(max_examples=MAX_EXAMPLES["executor_manifest"], **FUZZ)
@given(st.data())
def test_executor_refuses_malformed_manifests(ort_artifact, monkeypatch, data):
    monkeypatch.setattr(artifact_mod, "MAX_MANIFEST_BYTES", 1 << 16)
    manifest = json.load(open(os.path.join(ort_artifact, artifact_mod.MANIFEST)))
    kind, raw = data.draw(manifest_mutation(manifest))
    err = _try_manifest(monkeypatch, ort_artifact, raw, Executor)
    if kind == "reorder":
        assert err is None, err
    elif kind in ("truncate", "oversize", "traversal"):
        assert err is not None, (kind, raw[:200])


DTYPES = ["float32", "float64", "float16", "int64", "int32", "int8", "uint8", "bool", "complex64", ">f4", "<U3",
          "object"]


@st.composite
def bad_inputs(draw):
    n = draw(st.sampled_from([1, 1, 1, 0, 2, 3]))
    out = []
    for _ in range(n):
        kind = draw(st.sampled_from(["array", "array", "array", "python"]))
        if kind == "python":
            out.append(draw(st.one_of(st.none(), _text, st.floats(), st.just([[1.0, 2.0], [3.0]]),
                                      st.lists(st.floats(width=32), max_size=8))))
            continue
        dtype = draw(st.sampled_from(DTYPES + ["float32"] * 4))
        shape = draw(st.one_of(st.just((2, 8)), st.tuples(st.integers(0, 5), st.just(8)),
                               st.lists(st.integers(0, 9), max_size=4).map(tuple)))
        rnd = np.random.default_rng(draw(st.integers(0, 1000)))
        a = rnd.standard_normal(shape).astype(np.float32)
        if a.size and draw(st.booleans()):
            a.flat[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        if dtype == "object":
            a = a.astype(object)
        elif dtype == "<U3":
            a = a.astype(str).astype("<U3")
        else:
            with np.errstate(invalid="ignore", over="ignore"):
                a = a.astype(dtype)
        if draw(st.booleans()) and a.ndim >= 2:
            a = a.T   # non-contiguous
        out.append(a)
    return out


@settings(max_examples=MAX_EXAMPLES["inputs"], **FUZZ)
@given(bad_inputs(), st.booleans())
def test_executor_inputs_clear_errors(executor, arrays, named):
    """Wrong count, dtype or shape: TypeError/ValueError naming the input. NaN/Inf in a valid input:
    passed through (documented in the Executor), the output has the model's shape."""
    ex = executor
    ex.reset()
    name = ex.inputs[0]["name"]
    try:
        out = ex(**{name: arrays[0]}) if named and len(arrays) == 1 else ex(*arrays)
    except (TypeError, ValueError) as e:
        msg = str(e)
        assert "\n" not in msg and "input" in msg, msg
        return
    dynamic = isinstance(ex.inputs[0]["shape"][0], str)
    a = arrays[0]
    assert len(arrays) == 1 and a.dtype == np.float32 and a.shape[1:] == (8,) and (dynamic or a.shape == (2, 8))
    assert out.shape == (a.shape[0], 4)
    if np.isfinite(a).all():
        assert np.isfinite(out).all()
    elif np.isnan(a).any(axis=1).all():
        assert np.isnan(out).any() or (out == 0).any()   # NaN propagates (ReLU may also map it to 0)

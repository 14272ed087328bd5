"""Pipeline files and pass lists.

A pipeline file (YAML, ``version: 1``)::

    version: 1
    target: cpu                      # a named target or a device profile .yaml
    model: model.py:build_model      # CLI only: factories, relative to this file
    example_inputs: model.py:example_inputs
    calibration: model.py:calibration
    holdout: model.py:holdout        # inputs fidelity is judged on (else calibration, in-sample)
    export: artifacts/model          # CLI only: output directory
    fidelity: {min_cosine: 0.999}
    backend: {tune: false}           # options for the backend's lowering
    search: {executor: ray, address: auto, width: 4}   # how searches run their trials (optional)
    passes:
      - constant_folding: {max_bytes: 1000000}
      - dead_code_elimination

The same pass list can be given in Python: ``["constant_folding",
{"dead_code_elimination": {}}, ("constant_folding", {...}), PassInstance]``.

Every error names where it is (``file:line`` or ``passes[i]``), the pass, the
option, what was expected, and the closest known name for a typo. Torch-free
at import (passes are imported only when a pipeline is built).
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from pared.ir.errors import OptionError, ParedError, PipelineError, TargetError

VERSION = 1
TOP_LEVEL = ("version", "target", "model", "example_inputs", "calibration", "holdout", "export", "fidelity",
             "backend", "search", "passes")


@dataclass(frozen=True)
class PassSpec:
    """One pipeline entry: the pass name, its options, and where it was written."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    where: str = ""
    option_where: Mapping[Any, str] = field(default_factory=dict)   # option -> "file:line" when on its own line


@dataclass(frozen=True)
class PipelineSpec:
    """A parsed pipeline file. Paths in `model`/`example_inputs`/`calibration`/
    `holdout` and `export` are relative to `base_dir` (the file's folder)."""

    passes: tuple[PassSpec, ...] = ()
    target: str | None = None
    model: str | None = None
    example_inputs: str | None = None
    calibration: str | None = None
    holdout: str | None = None
    export: str | None = None
    fidelity: Mapping[str, float] | None = None
    backend: Mapping[str, Any] = field(default_factory=dict)
    path: str | None = None
    search: Mapping[str, Any] | None = None    # how searches run their trials (analysis.search.parse_search)

    @property
    def base_dir(self) -> str:
        return os.path.dirname(os.path.abspath(self.path)) if self.path else os.getcwd()


# -- YAML with line numbers ---------------------------------------------------
class _LineDict(dict):
    lines: dict


class _LineList(list):
    lines: list


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node):
        d = _LineDict()
        d.lines = {}
        loader.flatten_mapping(node)
        for knode, vnode in node.value:
            key = loader.construct_object(knode, deep=True)
            try:
                hash(key)
            except TypeError:
                raise _At(knode.start_mark.line + 1, "a mapping key must be a plain value") from None
            if key in d:
                raise _At(knode.start_mark.line + 1, f"duplicate key '{key}'")
            d[key] = loader.construct_object(vnode, deep=True)
            d.lines[key] = knode.start_mark.line + 1
        d.lines[None] = node.start_mark.line + 1
        return d

    def sequence(loader, node):
        items = _LineList(loader.construct_object(v, deep=True) for v in node.value)
        items.lines = [v.start_mark.line + 1 for v in node.value]
        return items

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, sequence)
    return Loader


class _At(Exception):
    def __init__(self, line: int, msg: str):
        super().__init__(msg)
        self.line, self.msg = line, msg


def _line(obj: Any, key: Any = None, default: int | None = None) -> int | None:
    lines = getattr(obj, "lines", None)
    if isinstance(lines, dict):
        return lines.get(key, lines.get(None, default))
    if isinstance(lines, list) and isinstance(key, int) and key < len(lines):
        return lines[key]
    return default


def _suggest(word: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(known), n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; expected one of: {', '.join(known)}"


# -- loading ------------------------------------------------------------------
def load_pipeline(path: "str | os.PathLike") -> PipelineSpec:
    """Read and check a pipeline file.

    Checks the version, the top-level keys, the target, every pass name and
    every pass option (against the pass's Options dataclass).

    Raises:
        PipelineError: "FILE:LINE: ..." naming the pass, the option, what was
            expected and the closest known name.
    """
    import yaml
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PipelineError(f"pipeline file {path} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise PipelineError(f"{path}:{line}: not UTF-8 text (byte "
                            f"0x{raw[e.start]:02x}); save the file as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_yaml_loader())
    except _At as e:
        raise PipelineError(f"{path}:{e.line}: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f"{path}:{mark.line + 1}"
        elif isinstance(getattr(e, "position", None), int):     # yaml.reader.ReaderError: a character
            where = f"{path}:{text[:e.position].count(chr(10)) + 1}"
        else:
            where = path
        problem = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e).splitlines()[0]
        raise PipelineError(f"{where}: not valid YAML: {problem}") from None
    except RecursionError:
        raise PipelineError(f"{path}: not valid YAML: nested too deeply") from None
    return parse_pipeline(data, source=path)


def parse_pipeline(data: Any, *, source: str = "<pipeline>") -> PipelineSpec:
    """Check a pipeline given as already-loaded data (a mapping).

    `source` names it in errors; when it is a file path, relative target
    profiles resolve against the file's folder.
    """
    def err(msg: str, key: Any = None, obj: Any = None) -> PipelineError:
        line = _line(data if obj is None else obj, key)
        return PipelineError(f"{source}:{line}: {msg}" if line else f"{source}: {msg}")

    if data is None:
        raise PipelineError(f"{source}: the pipeline is empty; expected 'version: 1' and 'passes:'")
    if not isinstance(data, Mapping):
        raise PipelineError(f"{source}: expected a mapping with 'version' and 'passes', got {type(data).__name__}")
    for key in data:
        if key not in TOP_LEVEL:
            raise err(f"unknown key {key!r}{_suggest(str(key), TOP_LEVEL)}", key)
    if "version" not in data:
        raise PipelineError(f"{source}: missing 'version: {VERSION}'")
    if type(data["version"]) is not int or data["version"] != VERSION:
        raise err(f"pipeline version {data['version']!r} is not supported; this pared reads version {VERSION}",
                  "version")
    base = os.path.dirname(os.path.abspath(source)) if os.path.exists(source) else os.getcwd()

    strings = {}
    for key in ("target", "model", "example_inputs", "calibration", "holdout", "export"):
        v = data.get(key)
        if v is not None and not isinstance(v, str):
            raise err(f"'{key}' expects a string, got {type(v).__name__} {v!r}", key)
        strings[key] = v
    for key in ("model", "example_inputs", "calibration", "holdout"):
        v = strings[key]
        if v is not None and (":" not in v or not v.rsplit(":", 1)[0].endswith(".py")):
            raise err(f"'{key}' expects 'path/to/file.py:function', got {v!r}", key)
    target = strings["target"]
    if target is not None:
        from pared.targets import get_target
        if target.endswith((".yaml", ".yml")) and not os.path.isabs(target):
            target = os.path.join(base, target)
        try:
            get_target(target)
        except TargetError as e:
            raise err(str(e), "target") from None
    export = strings["export"]
    if export is not None and not os.path.isabs(export):
        export = os.path.join(base, export)

    fidelity = data.get("fidelity")
    if fidelity is not None:
        if not isinstance(fidelity, Mapping):
            raise err(f"'fidelity' expects a mapping of bounds, got {type(fidelity).__name__}", "fidelity")
        from pared.fidelity import Fidelity
        try:
            Fidelity.of(fidelity)
        except (ValueError, TypeError) as e:
            bad = next((k for k in fidelity if k not in ("min_cosine", "max_rel_l2", "max_abs")), None)
            raise err(f"fidelity: {e}", bad, fidelity) from None
        for k, v in fidelity.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise err(f"fidelity: bound '{k}' expects a number, got {type(v).__name__} {v!r}", k, fidelity)
        fidelity = dict(fidelity)
    backend = data.get("backend")
    backend = {} if backend is None else backend
    if not isinstance(backend, Mapping):
        raise err(f"'backend' expects a mapping of lowering options, got {type(backend).__name__}", "backend")

    search = data.get("search")
    if search is not None:
        from pared.analysis.search import parse_search
        if not isinstance(search, (Mapping, str)):
            raise err(f"'search' expects a mapping like {{executor: ray, address: auto, width: 4}}, got "
                      f"{type(search).__name__} {search!r}", "search")
        try:
            search = parse_search(search)
        except OptionError as e:
            bad = next((k for k in search if f"option '{k}'" in str(e)), None) if isinstance(search, Mapping) else None
            raise err(str(e), "search") if bad is None else err(str(e), bad, search) from None

    raw = data.get("passes")
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise err(f"'passes' expects a list of '- name: {{options}}' entries, got {type(raw).__name__}", "passes")
    specs = []
    base = os.path.dirname(os.path.abspath(source)) if os.path.exists(source) else None
    for i, item in enumerate(raw):
        line = _line(raw, i)
        where = f"{source}:{line}" if line else f"{source}: passes[{i}]"
        spec = _entry(item, where)
        _check(spec, base)
        specs.append(spec)
    return PipelineSpec(passes=tuple(specs), target=target, model=strings["model"],
                        example_inputs=strings["example_inputs"], calibration=strings["calibration"],
                        holdout=strings["holdout"],
                        export=export, fidelity=fidelity, backend=dict(backend),
                        path=source if os.path.exists(source) else None, search=search)


def _entry(item: Any, where: str) -> PassSpec:
    """One list entry as a PassSpec: "name", {"name": {opts}}, or (name, opts)."""
    if isinstance(item, str):
        return PassSpec(item, {}, where)
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        name, opts = item
    elif isinstance(item, Mapping) and len(item) == 1:
        (name, opts), = item.items()
    elif isinstance(item, Mapping):
        raise PipelineError(f"{where}: a pass entry is one 'name: {{options}}' pair, got keys "
                            f"{', '.join(map(repr, item))} (is the options mapping indented under the name?)")
    else:
        raise PipelineError(f"{where}: a pass entry is a name or 'name: {{options}}', got {type(item).__name__}")
    if not isinstance(name, str):
        raise PipelineError(f"{where}: a pass name must be a string, got {name!r}")
    if opts is None:
        opts = {}
    if not isinstance(opts, Mapping):
        raise PipelineError(f"{where}: pass {name!r}: options must be a mapping, got {type(opts).__name__} {opts!r}")
    option_where = {}
    if isinstance(getattr(opts, "lines", None), dict) and ":" in where:
        file = where.rsplit(":", 1)[0]
        option_where = {k: f"{file}:{line}" for k, line in opts.lines.items() if k is not None}
    return PassSpec(name, dict(opts), where, option_where)


def _check(spec: PassSpec, base_dir: str | None = None) -> Any:
    """Instantiate the pass from its spec; errors become PipelineError at spec.where. Options the
    pass names in `path_options` (files it reads), given as relative paths, are taken relative to
    `base_dir` (the pipeline file's folder); those in `ref_options` (`file.py:function`) become
    the function."""
    from pared.registry import get_pass
    try:
        cls = get_pass(spec.name)
        options = dict(spec.options)
        if base_dir is not None:
            for k in getattr(cls, "path_options", ()):
                v = options.get(k)
                if isinstance(v, str) and v and not os.path.isabs(v):
                    options[k] = os.path.join(base_dir, v)
        for k in getattr(cls, "ref_options", ()):
            v = options.get(k)
            if isinstance(v, str):
                try:
                    options[k] = resolve_ref(v, base_dir)
                except PipelineError as e:
                    raise OptionError(f"pass '{spec.name}': option {k!r}: {e}") from None
        return cls(options)
    except OptionError as e:
        msg = str(e)
        # the line of the option the error names (options written one per line), else the pass's
        where = next((w for k, w in spec.option_where.items()
                      if f"option {k!r}" in msg or f"option '{k}[" in msg), spec.where)
        raise PipelineError(f"{where}: {msg}") from None


def build_passes(spec: "PipelineSpec | Sequence[Any] | str | os.PathLike | None") -> list:
    """Fresh pass instances for a pipeline file, a PipelineSpec or a Python list.

    Raises:
        PipelineError: naming the entry (``passes[i]`` or ``file:line``).
    """
    from pared.ir.transform import Pass
    if spec is None:
        return []
    if isinstance(spec, (str, os.PathLike)):
        spec = load_pipeline(spec)
    if isinstance(spec, PipelineSpec):
        return [_check(p, spec.base_dir if spec.path else None) for p in spec.passes]
    if isinstance(spec, (Mapping, bytes)) or not isinstance(spec, Sequence):
        raise PipelineError(f"a pipeline is a YAML path or a list of passes, got {type(spec).__name__}")
    out = []
    for i, item in enumerate(spec):
        if isinstance(item, Pass):
            out.append(item)
        elif isinstance(item, PassSpec):
            out.append(_check(item))
        else:
            out.append(_check(_entry(item, f"passes[{i}]")))
    return out


# -- factory references -------------------------------------------------------
def resolve_ref(ref: str, base_dir: str | None = None) -> Callable[..., Any]:
    """The function named by ``path/to/file.py:function`` (path relative to base_dir).

    The file's folder is on sys.path while it is imported, so it may import
    its neighbours.

    Raises:
        PipelineError: the file or the function does not exist, or importing fails.
    """
    if not isinstance(ref, str) or ":" not in ref:
        raise PipelineError(f"expected 'path/to/file.py:function', got {ref!r}")
    file, func = ref.rsplit(":", 1)
    path = file if os.path.isabs(file) else os.path.join(base_dir or os.getcwd(), file)
    path = os.path.normpath(path)
    if not os.path.isfile(path):
        raise PipelineError(f"{ref}: file {path} does not exist")
    mod_name = "pared_user_" + "".join(c if c.isalnum() else "_" for c in os.path.splitext(path)[0])[-80:]
    module = sys.modules.get(mod_name)
    if module is None or getattr(module, "__file__", None) != path:
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        folder = os.path.dirname(path)
        sys.path.insert(0, folder)
        try:
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
        except ParedError:
            sys.modules.pop(mod_name, None)
            raise
        except Exception as e:
            sys.modules.pop(mod_name, None)
            raise PipelineError(f"{ref}: importing {path} failed: {type(e).__name__}: {e}") from e
        finally:
            try:
                sys.path.remove(folder)
            except ValueError:
                pass
    fn = getattr(module, func, None)
    if not callable(fn):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise PipelineError(f"{ref}: {path} has no function '{func}'{_suggest(func, names)}")
    return fn

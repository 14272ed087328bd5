"""Records and the store a Program keeps them in. Torch-free (the Executor reads them).

A record is what an analysis measured (`...Profile`) or a pass decided
(`...Plan`, `...Decisions`): a frozen dataclass deriving from `Record`, of
JSON-friendly fields (str, int, float, bool, None, tuples, mappings and nested
dataclasses). Every subclass registers itself under its class name when its
module is imported, so `Record.from_json(d)` finds the class by the `"type"`
that `to_json()` writes and rebuilds the record field by field from the
dataclass's type hints (JSON lists become tuples again, nested dicts the nested
dataclasses, mapping keys their hinted int, float or str; a field hinted Mapping
comes back read-only, a MappingProxyType, equal to the dict it was). A float is
exact through JSON; NaN comes back as NaN, so a record holding one is not == to
its copy (NaN != NaN), only field for field the same.

`RecordStore` is the Program's one store of records, keyed by (record type
name, graph): graph None for a program-wide record (the plan a program pass
made), a graph name for one about a single graph. As a Mapping its keys are
strings, so code that predates the graph key keeps working and the manifest
stays a JSON object:

    "QuantPlan"          (QuantPlan, None)     program-wide
    "CostProfile@main"   (CostProfile, main)   about graph main

`store["QuantPlan"]`, `"QuantPlan" in store`, `store.get("QuantPlan")`,
`{**store, "QuantPlan": plan}` and `store.items()` read and write program-wide
records by type name as they did when `Program.records` was a dict;
`store.get("CostProfile", graph="main")`, `store.of(CostProfile, "main")`,
`store[("CostProfile", "main")]` and `store.entries()` use the pair. A plain
mapping with string (or pair) keys converts back losslessly (`RecordStore(d)`).
"""
from __future__ import annotations

import dataclasses
import math
import difflib
import types
import typing
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator

from .errors import RecordError

#: separates a record's type name from its graph in a store's string keys
GRAPH_SEP = "@"


# -- records -----------------------------------------------------------------
class Record:
    """Base of analysis results (`...Profile`) and decisions (`...Plan`, `...Decisions`).

    Subclasses are frozen dataclasses of JSON-friendly fields (str, int, float,
    bool, None, tuples, mappings and nested dataclasses); they register under their
    class name when defined, which is how `from_json` finds them. numpy scalars and
    tensors do not belong in a record (they do not come back from JSON as themselves).
    """

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        _TYPES.setdefault(cls.__name__, {})[(cls.__module__, cls.__qualname__)] = cls

    def to_json(self) -> dict:
        """The record as JSON: {"type": class name, field: value, ...}; tuples become lists,
        mapping keys strings, nested dataclasses objects (without a "type")."""
        def conv(v: Any) -> Any:
            if dataclasses.is_dataclass(v) and not isinstance(v, type):
                return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, (tuple, list)):
                return [conv(x) for x in v]
            if isinstance(v, Mapping):
                return {str(k): conv(x) for k, x in v.items()}
            if isinstance(v, float) and not math.isfinite(v):
                return _NONFINITE_OUT[str(v)]   # strict JSON has no NaN / Infinity
            return v
        return {"type": type(self).__name__, **conv(self)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Record":
        """Rebuild the record `to_json()` wrote. On a subclass, the record must be of that class
        (or one derived from it).

        Raises:
            RecordError: `d` is not an object with a "type"; no imported module defines a Record
                of that type (naming the known ones), or several do; a field is unknown, missing,
                or of another type than its hint (naming the record type and the field); the
                class is not a dataclass.
        """
        if not isinstance(d, Mapping):
            raise RecordError(f"a record's JSON must be an object with a \"type\", got {type(d).__name__} "
                              f"{_short(d)}")
        name = d.get("type")
        if not isinstance(name, str):
            raise RecordError(f"a record's JSON needs a \"type\" naming its Record class, got {_short(name)} "
                              f"in {_short(d)}")
        rec_cls = record_type(name)
        if not issubclass(rec_cls, cls):
            raise RecordError(f"{cls.__name__}.from_json: the JSON is a {name}, which is not a {cls.__name__}")
        return _decode_dataclass(rec_cls, {k: v for k, v in d.items() if k != "type"}, name)


#: type name -> {(module, qualname): class}: several classes may share a name (tests define their own)
_TYPES: dict[str, dict[tuple[str, str], type]] = {}


def record_type(name: str) -> type[Record]:
    """The Record class named `name` among the modules imported so far (pared's own register
    when pared.registry, or the module defining them, is imported).

    Raises:
        RecordError: no such class (naming the known ones and the closest), or several.
    """
    found = _TYPES.get(name)
    if not found:
        known = sorted(_TYPES)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RecordError(f"unknown record type {name!r}{hint} (known: {', '.join(known) or 'none'}); a Record "
                          f"class registers when its module is imported (pared.registry imports pared's own)")
    if len(found) > 1:
        raise RecordError(f"record type {name!r} is ambiguous: {len(found)} imported Record classes have that name "
                          f"({', '.join(sorted(f'{m}.{q}' for m, q in found))})")
    return next(iter(found.values()))


def record_types() -> dict[str, type[Record]]:
    """Every Record class imported so far, by name (an ambiguous name maps to its first class)."""
    return {name: next(iter(classes.values())) for name, classes in sorted(_TYPES.items()) if classes}


def _short(v: Any, n: int = 80) -> str:
    s = repr(v)
    return s if len(s) <= n else s[:n - 3] + "..."


#: a float field's non-finite values as to_json writes them (strings: strict JSON has no NaN), and back
_NONFINITE_OUT = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_NONFINITE_IN = {v: float(k) for k, v in _NONFINITE_OUT.items()}


def _json_kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, (list, tuple)):
        return "a list"
    if isinstance(v, Mapping):
        return "an object"
    return type(v).__name__


def _hint_name(hint: Any) -> str:
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type, where: str) -> dict[str, Any]:
    if cls not in _HINTS:
        try:
            _HINTS[cls] = typing.get_type_hints(cls)
        except Exception as e:   # an annotation naming something its module does not define at top level
            raise RecordError(f"{where}: the field types of {cls.__module__}.{cls.__qualname__} do not resolve "
                              f"({type(e).__name__}: {e}); define the classes they name at module level") from None
    return _HINTS[cls]


def _decode_dataclass(cls: type, d: Mapping[str, Any], where: str) -> Any:
    """`cls(**fields)` from the object `d`, each field decoded by its hint."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise RecordError(f"{where}: {cls.__qualname__} is not a dataclass, so it cannot be rebuilt from JSON")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in d if k not in fields]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(fields), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RecordError(f"{where}: unknown field {unknown[0]!r} for {cls.__qualname__}{hint} "
                          f"(its fields: {', '.join(fields)})")
    hints = _hints(cls, where)
    kwargs = {}
    for name, f in fields.items():
        if not f.init:      # computed in __post_init__
            continue
        if name not in d:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(f"{where}: missing field {name!r} of {cls.__qualname__}")
            continue
        kwargs[name] = _decode(d[name], hints.get(name, Any), f"{where}.{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise RecordError(f"{where}: {cls.__qualname__} refused the fields read back ({type(e).__name__}: {e})") \
            from None


_UNION_TYPES = (typing.Union, types.UnionType)


def _decode(value: Any, hint: Any, where: str) -> Any:
    """`value` (as json.loads gives it) as the type `hint` names."""
    if hint is Any or hint is object or isinstance(hint, (typing.TypeVar, typing.ForwardRef, str)):
        return plain(value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in _UNION_TYPES:
        if value is None and type(None) in args:
            return None
        failures = []
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _decode(value, arm, where)
            except RecordError as e:
                failures.append(str(e))
        if len(failures) == 1:      # X | None: X's message (deeper inside X, the precise place)
            msg = failures[0]
            if type(None) in args:
                msg = msg.replace(f"{where}: expected ", f"{where}: expected null or ", 1)
            raise RecordError(msg)
        raise RecordError(f"{where}: expected {_hint_name(hint)}, got {_json_kind(value)} {_short(value)}")
    if hint is type(None) or hint is None:
        if value is None:
            return None
    elif origin is typing.Literal:
        if value in args:
            return value
        raise RecordError(f"{where}: expected one of {list(args)}, got {_short(value)}")
    elif origin is tuple or hint is tuple:
        if isinstance(value, (list, tuple)):
            if not args:
                return tuple(plain(v) for v in value)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_decode(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
            if args == ((),):
                args = ()
            if len(value) != len(args):
                raise RecordError(f"{where}: expected {_hint_name(hint)} ({len(args)} items), got "
                                  f"{len(value)} items {_short(value)}")
            return tuple(_decode(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif origin is list or hint is list:
        if isinstance(value, (list, tuple)):
            inner = args[0] if args else Any
            return [_decode(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin in (dict, Mapping) or hint in (dict, Mapping, typing.Mapping):
        if isinstance(value, Mapping):
            kh, vh = args if len(args) == 2 else (Any, Any)
            out = {_decode_key(k, kh, where): _decode(v, vh, f"{where}[{k!r}]") for k, v in value.items()}
            return out if (origin is dict or hint is dict) else MappingProxyType(out)
    elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, Mapping):
            if (issubclass(hint, Record) and "type" in value
                    and "type" not in {f.name for f in dataclasses.fields(hint)}):
                # a nested record with its own "type" (to_json writes none; hand-written JSON may)
                try:
                    rec = Record.from_json(value)
                except RecordError as e:
                    raise RecordError(f"{where}: {e}") from None
                if not isinstance(rec, hint):
                    raise RecordError(f"{where}: expected a {hint.__qualname__}, got a {type(rec).__name__}")
                return rec
            return _decode_dataclass(hint, value, where)
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if value in _NONFINITE_IN:
            return _NONFINITE_IN[value]
    elif hint is str:
        if isinstance(value, str):
            return value
    elif isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise RecordError(f"{where}: a {hint.__qualname__} does not come back from JSON ({_json_kind(value)} "
                          f"{_short(value)}); records hold JSON-friendly fields")
    else:
        return plain(value)
    raise RecordError(f"{where}: expected {_hint_name(hint)}, got {_json_kind(value)} {_short(value)}")


def _decode_key(key: str, hint: Any, where: str) -> Any:
    """A mapping key as its hint (to_json wrote str(key))."""
    if hint is int:
        try:
            return int(key)
        except ValueError:
            pass
    elif hint is float:
        try:
            return float(key)
        except ValueError:
            pass
    elif hint is str or hint is Any:
        return key
    raise RecordError(f"{where}: mapping key {key!r} does not read back as {_hint_name(hint)} "
                      f"(records' mappings are keyed by str, int or float)")


def plain(value: Any) -> Any:
    """A JSON value as a record holds it (a field hinted Any, or a dict field): lists as tuples
    (records hold no lists), objects as dicts. A record built from such values equals itself
    after a JSON round trip."""
    if isinstance(value, (list, tuple)):
        return tuple(plain(v) for v in value)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


# -- the store ---------------------------------------------------------------
Key = tuple[str, "str | None"]


def record_key(kind: "str | type", graph: str | None = None) -> str:
    """The store's string key of a record type (a Record class or its name) about `graph`
    (None: the whole program): "QuantPlan", "CostProfile@main"."""
    name, graph = _pair(kind, graph)
    return name if graph is None else f"{name}{GRAPH_SEP}{graph}"


def _pair(kind: Any, graph: Any = None) -> Key:
    """(type name, graph) from a type name, a Record class, a string key or a pair."""
    if isinstance(kind, tuple):
        if len(kind) != 2 or graph is not None:
            raise RecordError(f"a record key is a (record type, graph) pair, got {_short(kind)}")
        kind, graph = kind
    if isinstance(kind, type):
        kind = kind.__name__
    if not isinstance(kind, str) or not kind:
        raise RecordError(f"a record key names a record type (str or Record class), got {_short(kind)}")
    if GRAPH_SEP in kind:
        if graph is not None:
            raise RecordError(f"record key {kind!r} already names a graph; give graph= or the {GRAPH_SEP!r} form")
        kind, graph = kind.split(GRAPH_SEP, 1)
    if graph is not None and (not isinstance(graph, str) or not graph or GRAPH_SEP in graph):
        raise RecordError(f"record key {kind!r}: graph must be a non-empty name without {GRAPH_SEP!r}, "
                          f"got {_short(graph)}")
    return kind, graph


def _value_type(v: Any) -> str | None:
    if isinstance(v, Record):
        return type(v).__name__
    if isinstance(v, Mapping) and isinstance(v.get("type"), str):
        return v["type"]
    return None


class RecordStore(Mapping):
    """The Program's records, keyed by (record type name, graph); graph None: program-wide.
    Immutable: `with_record` returns a new store. See the module docstring for the keys.

    Args:
        records: a mapping of keys ("QuantPlan", "CostProfile@main", a (type, graph) pair, or a
            Record class) to records, or an iterable of (key, record) pairs. A Record is kept
            under its own type's name; other values (a record's JSON dict where its class is not
            importable, anything a test stores) are kept as given.

    Raises:
        RecordError: a malformed key, or a Record under another type's name.
    """

    def __init__(self, records: "Mapping[Any, Any] | Iterable[tuple[Any, Any]] | None" = None):
        if isinstance(records, RecordStore):
            self._entries = records._entries
            return
        items = records.items() if isinstance(records, Mapping) else (records or ())
        entries: dict[Key, Any] = {}
        for key, value in items:
            pair = _pair(key)
            kind = _value_type(value)
            if kind is not None and kind != pair[0]:
                raise RecordError(f"record key {record_key(*pair)!r} holds a {kind}; store a record under its "
                                  f"own type's name ({record_key(kind, pair[1])!r})")
            entries[pair] = value
        self._entries: dict[Key, Any] = entries     # never changed after __init__

    # -- the Mapping protocol: string keys ---------------------------------
    def __getitem__(self, key: Any) -> Any:
        pair = _pair(key)
        try:
            return self._entries[pair]
        except KeyError:
            raise KeyError(self._missing(pair)) from None

    def __contains__(self, key: object) -> bool:
        try:
            return _pair(key) in self._entries
        except RecordError:
            return False

    def __iter__(self) -> Iterator[str]:
        return (record_key(*pair) for pair in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"RecordStore({{{', '.join(f'{k!r}: {type(v).__name__}' for k, v in self.items())}}})"

    # -- by (type, graph) ----------------------------------------------------
    def get(self, key: Any, default: Any = None, *, graph: str | None = None) -> Any:
        """The record of type `key` (a name or Record class) about `graph` (None: program-wide),
        or `default`."""
        try:
            pair = _pair(key, graph)
        except RecordError:
            return default
        return self._entries.get(pair, default)

    def of(self, kind: "str | type", graph: str | None = None) -> Any:
        """The record of type `kind` (a Record class or its name) about `graph` (None: program-wide).

        Raises:
            KeyError: none, naming the records the store holds.
            RecordError: given a class, the record found is not an instance of it.
        """
        pair = _pair(kind, graph)
        if pair not in self._entries:
            raise KeyError(self._missing(pair))
        rec = self._entries[pair]
        if isinstance(kind, type) and not isinstance(rec, kind):
            raise RecordError(f"record {record_key(*pair)!r} is a {type(rec).__name__}, not a {kind.__qualname__} "
                              f"(a record whose class was not importable when it was loaded stays its JSON)")
        return rec

    def entries(self) -> Iterator[tuple[Key, Any]]:
        """((type name, graph), record) for every record, graph None for program-wide ones."""
        return iter(self._entries.items())

    def with_record(self, record: Record, graph: str | None = None) -> "RecordStore":
        """A new store with `record` under (its type, `graph`), replacing any there."""
        if not isinstance(record, Record):
            raise RecordError(f"with_record takes a Record, got {type(record).__name__}")
        out = RecordStore.__new__(RecordStore)
        out._entries = {**self._entries, _pair(type(record), graph): record}
        return out

    def without(self, drop: "Callable[[Key, Any], bool]") -> "RecordStore":
        """A new store without the entries for which `drop((type name, graph), record)` is true
        (itself when none is dropped)."""
        kept = {pair: rec for pair, rec in self._entries.items() if not drop(pair, rec)}
        if len(kept) == len(self._entries):
            return self
        out = RecordStore.__new__(RecordStore)
        out._entries = kept
        return out

    # -- JSON ------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The manifest's "records": string key -> the record's JSON (a value that is not a Record
        as given)."""
        return {k: (v.to_json() if isinstance(v, Record) else v) for k, v in self.items()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], *, strict: bool = True) -> "RecordStore":
        """A store from `to_json()`'s object: each {"type": ...} value rebuilt by Record.from_json.

        Args:
            strict: False keeps the JSON dict of a record whose type no imported module defines
                (a torch-free process, a record of a pass not imported here) instead of raising.
        Raises:
            RecordError: not an object; a malformed key; a key naming another type than its record;
                a record that does not rebuild (see Record.from_json; with strict, also an unknown
                type). The message names the key.
        """
        if not isinstance(d, Mapping):
            raise RecordError(f"records must be an object of key -> record, got {_json_kind(d)} {_short(d)}")
        items = []
        for key, value in d.items():
            if isinstance(value, Mapping) and isinstance(value.get("type"), str):
                if not strict and not _TYPES.get(value["type"]):
                    items.append((key, value))
                    continue
                try:
                    value = Record.from_json(value)
                except RecordError as e:
                    raise RecordError(f"record {key!r}: {e}") from None
            items.append((key, value))
        return cls(items)

    def _missing(self, pair: Key) -> str:
        have = ", ".join(repr(k) for k in self) or "none"
        return f"no record {record_key(*pair)!r} in the store (it holds: {have})"


def as_store(records: "Mapping[Any, Any] | None") -> RecordStore:
    """`records` as a RecordStore (itself when it is one)."""
    return records if isinstance(records, RecordStore) else RecordStore(records)

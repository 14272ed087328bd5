"""The artifact directory: manifest.json + model files + sha256 of each. Torch-free.

Written atomically: files go to a temporary sibling directory that is renamed
into place only when complete, so a crash mid-export leaves no half artifact.
`read_manifest` refuses a missing, tampered, truncated or newer-schema
artifact, and file names outside the artifact; given trusted keys it checks the
Ed25519 signature over the manifest's bytes first (backends.signing). No pickle anywhere: the manifest is JSON, weights live inside the
model files. `read_records` gives the manifest's records back as a RecordStore.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import pkgutil
import shutil
import tempfile
import threading
import uuid
import weakref
from typing import Any, Callable, Iterable, Mapping

from pared.backends.signing import SIGNATURE, load_private_key, verify_manifest_bytes, write_signature
from pared.ir.errors import ArtifactError, RecordError
from pared.ir.records import RecordStore, record_types

log = logging.getLogger("pared.backends")

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
FORMAT = "pared-artifact"
RESERVED = (MANIFEST, SIGNATURE)     # never listed in the manifest's sums: one is the manifest, one signs it
MAX_MANIFEST_BYTES = 64 << 20        # far above any manifest pared writes; refused before parsing


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_artifact(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def write_artifact(dest: str, build: Callable[[str], dict], *, sign_key: "str | None" = None) -> str:
    """Build an artifact in a temporary directory and move it to `dest`.

    Args:
        dest: the artifact directory. An existing pared artifact there is
            replaced; any other non-empty directory is refused.
        build: ``build(tmpdir) -> manifest`` writes the model files into tmpdir
            and returns the manifest (without checksums).
        sign_key: an Ed25519 private key file (`pared keygen`): the artifact is
            signed (signature.json) before it is moved into place.
    Returns:
        The absolute path of the artifact.
    Raises:
        ArtifactError: dest is a non-empty directory that is not an artifact, or
            build wrote a file named manifest.json or signature.json.
        SigningKeyError: sign_key cannot be read or is not an Ed25519 private key.
    """
    dest = os.path.abspath(dest)
    if os.path.exists(dest) and not (os.path.isdir(dest) and (not os.listdir(dest) or _is_artifact(dest))):
        raise ArtifactError(f"{dest} exists and is not a pared artifact; refusing to overwrite it "
                            "(choose another directory)")
    private = load_private_key(sign_key) if sign_key is not None else None
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.tmp-", dir=parent)
    try:
        manifest = build(tmp)
        files = {}
        for root, _, names in os.walk(tmp):
            for n in sorted(names):
                full = os.path.join(root, n)
                rel = os.path.relpath(full, tmp).replace(os.sep, "/")
                if rel in RESERVED:
                    raise ArtifactError(f"{dest}: the lowering wrote {rel}, a name the artifact reserves")
                files[rel] = {"sha256": sha256(full), "bytes": os.path.getsize(full)}
        manifest = dict(manifest, format=FORMAT, schema_version=SCHEMA_VERSION, files=files)
        data = json.dumps(manifest, indent=1, sort_keys=False).encode()
        with open(os.path.join(tmp, MANIFEST), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if private is not None:
            write_signature(tmp, data, private)
        old = None
        if os.path.exists(dest):
            old = os.path.join(parent, f".{os.path.basename(dest)}.old-{uuid.uuid4().hex[:8]}")
            os.rename(dest, old)
        os.rename(tmp, dest)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def sign_artifact(path: str, key: str) -> str:
    """Sign an artifact with an Ed25519 private key file: writes `path`/signature.json atomically.

    The artifact is checked first (manifest, every file's sum), so a signature never
    vouches for a damaged or tampered artifact; the bytes checked are the bytes signed.

    Returns:
        The signature file's path.
    Raises:
        ArtifactError: see read_manifest.
        SigningKeyError: the key cannot be read or is not an Ed25519 private key.
    """
    private = load_private_key(key)
    data = _manifest_bytes(path)
    _check(path, data, verify=True, strict=True)
    return write_signature(path, data, private)


def _manifest_bytes(path: str) -> bytes:
    if not os.path.isdir(path):
        raise ArtifactError(f"{path}: not an artifact directory")
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise ArtifactError(f"{path}: no {MANIFEST}; not a pared artifact (or an export was interrupted)")
    with open(mpath, "rb") as f:
        data = f.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{mpath}: larger than {MAX_MANIFEST_BYTES} bytes; not a manifest pared wrote")
    return data


def read_manifest(path: str, *, verify: bool = True, trusted_keys: "Iterable[Any] | None" = None) -> dict:
    """Read and validate an artifact's manifest.

    Args:
        path: the artifact directory.
        verify: check every listed file's size and sha256.
        trusted_keys: Ed25519 public keys (paths, PEM or raw bytes; see
            backends.signing.load_public_key). When given, the signature over the
            manifest's bytes is checked first, then every file's sum (verify is
            implied), and a file the manifest does not list is refused.
    Raises:
        ArtifactError: not a directory, no manifest, malformed JSON or fields, unknown
            format, newer schema, a file name outside the artifact, a listed file
            missing, or a checksum or size mismatch (tampered or truncated); with
            trusted_keys also unsigned, signed by another key, or a changed manifest.
    """
    data = _manifest_bytes(path)
    if trusted_keys is not None:
        verify_manifest_bytes(path, data, trusted_keys)
    return _check(path, data, verify=verify or trusted_keys is not None, strict=trusted_keys is not None)


def _check(path: str, data: bytes, *, verify: bool, strict: bool) -> dict:
    mpath = os.path.join(path, MANIFEST)
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ArtifactError(f"{mpath}: manifest is not valid JSON ({str(e)[:120]}); the artifact is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise ArtifactError(f"{mpath}: not a pared manifest (format {_short(got)})")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(f"{mpath}: schema_version missing or not an integer")
    if version > SCHEMA_VERSION:
        raise ArtifactError(f"{path}: artifact schema {version} is newer than this pared reads ({SCHEMA_VERSION}); "
                            "upgrade pared")
    if version < 1:
        raise ArtifactError(f"{path}: unknown artifact schema {version}")
    _check_fields(path, mpath, manifest)
    if verify:
        root = os.path.realpath(path)
        for rel, info in manifest["files"].items():
            full = os.path.join(path, rel)
            real = os.path.realpath(full)
            if os.path.commonpath([root, real]) != root:
                raise ArtifactError(f"{path}: {rel} resolves outside the artifact (a symbolic link?); refusing it")
            if not os.path.isfile(full):
                raise ArtifactError(f"{path}: {rel} is missing")
            size = os.path.getsize(full)
            if size != info["bytes"]:
                raise ArtifactError(f"{path}: {rel} is {size} bytes, the manifest says {info['bytes']} "
                                    "(truncated or replaced); re-export the artifact")
            if sha256(full) != info["sha256"]:
                raise ArtifactError(f"{path}: {rel} does not match its sha256 in the manifest (tampered or "
                                    "corrupted); re-export the artifact")
    if strict:
        extra = []
        for root_, _, names in os.walk(path):
            for n in names:
                rel = os.path.relpath(os.path.join(root_, n), path).replace(os.sep, "/")
                if rel not in manifest["files"] and rel not in RESERVED:
                    extra.append(rel)
        if extra:
            raise ArtifactError(f"{path}: holds file(s) the signed manifest does not list: "
                                f"{', '.join(sorted(extra)[:5])}; refusing it")
    return manifest


def _short(v: Any, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def _check_name(path: str, rel: Any, what: str) -> None:
    """A file name the manifest gives: relative, inside the artifact, '/'-separated."""
    if not isinstance(rel, str) or not rel:
        raise ArtifactError(f"{path}: {what} names a file by {_short(rel)}, expected a relative path string")
    parts = rel.split("/")
    if (rel.startswith("/") or os.path.isabs(rel) or "\\" in rel or "\0" in rel
            or any(p in ("", ".", "..") for p in parts)):
        raise ArtifactError(f"{path}: manifest names a file outside the artifact: {_short(rel)}")


def _check_fields(path: str, mpath: str, manifest: dict) -> None:
    """The fields the loader reads have the types it reads them as (nothing is opened here)."""
    for key in ("graphs", "plan", "target", "files"):
        if key not in manifest:
            raise ArtifactError(f"{mpath}: manifest lacks '{key}'")
        if not isinstance(manifest[key], dict):
            raise ArtifactError(f"{mpath}: '{key}' must be an object, got {type(manifest[key]).__name__}")
    files = manifest["files"]
    for rel, info in files.items():
        _check_name(path, rel, "the manifest's file list")
        if rel in RESERVED:
            raise ArtifactError(f"{path}: the manifest lists {rel}, which it cannot cover; the artifact is damaged")
        if (not isinstance(info, dict) or not isinstance(info.get("sha256"), str)
                or not isinstance(info.get("bytes"), int) or isinstance(info.get("bytes"), bool)):
            raise ArtifactError(f"{mpath}: files['{rel}'] must be {{\"sha256\": str, \"bytes\": int}}, "
                                f"got {_short(info)}")
    for g, entry in manifest["graphs"].items():
        if not isinstance(entry, dict):
            raise ArtifactError(f"{mpath}: graph '{g}' must be an object, got {type(entry).__name__}")
        if not isinstance(entry.get("backend"), str):
            raise ArtifactError(f"{mpath}: graph '{g}' has no backend name (got {_short(entry.get('backend'))})")
        if "file" not in entry:
            raise ArtifactError(f"{mpath}: graph '{g}' names no file")
        names = [entry["file"]]
        if "files" in entry:
            if not isinstance(entry["files"], list):
                raise ArtifactError(f"{mpath}: graph '{g}' 'files' must be a list, got {_short(entry['files'])}")
            names += entry["files"]
        if "weights_file" in entry:
            names.append(entry["weights_file"])
        for rel in names:
            _check_name(path, rel, f"graph '{g}'")
            if rel not in files:
                raise ArtifactError(f"{path}: graph '{g}' file {rel} is not covered by a checksum")
        for key in ("inputs", "outputs"):
            specs = entry.get(key)
            if not isinstance(specs, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str)
                                                       for s in specs):
                raise ArtifactError(f"{mpath}: graph '{g}' '{key}' must be a list of {{\"name\": ...}} objects, "
                                    f"got {_short(specs)}")


class SharedFile:
    """Base of a process-level store of what one artifact file holds (the weights graph
    variants share): every graph that reads the file gets the same store while any holds
    it (held weakly: when the last goes, so does the memory). A store is keyed by the file's
    identity (real path, size, mtime, inode) and the extra arguments it is opened with.
    Subclasses take (path, *args) in their constructor. Torch-free."""

    _lock = threading.Lock()
    _open: "weakref.WeakValueDictionary[tuple, SharedFile]"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._open = weakref.WeakValueDictionary()

    @classmethod
    def open(cls, path: str, *args, missing: str):
        """The store of `path` (made on first use).

        Raises:
            ArtifactError: `missing`, when the file is not there.
        """
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ArtifactError(missing) from None
        ident = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino, *map(str, args))
        with cls._lock:
            store = cls._open.get(ident)
            if store is None:
                store = cls(path, *args)
                cls._open[ident] = store
            return store


# -- records -------------------------------------------------------------------
#: the packages whose modules define pared's Record classes (they import torch)
RECORD_PACKAGES = ("pared.analysis", "pared.passes")
_imported_records: list[bool] = []      # once per process: whether every module imported


def import_record_classes() -> bool:
    """Import every module of pared's analyses and passes, so that each Record class pared
    defines is registered (Record.from_json finds classes by name among those imported).
    Those modules need torch: where a module cannot be imported (no torch here) its records
    stay unregistered. Runs once per process; returns whether every module imported."""
    if not _imported_records:
        ok = True
        for pkg_name in RECORD_PACKAGES:
            try:
                pkg = importlib.import_module(pkg_name)
            except ImportError as e:
                log.debug("record classes: %s not importable here (%s)", pkg_name, e)
                ok = False
                continue
            for mod in pkgutil.walk_packages(pkg.__path__, prefix=pkg_name + ".", onerror=lambda name: None):
                try:
                    importlib.import_module(mod.name)
                except ImportError as e:
                    log.debug("record classes: %s not importable here (%s)", mod.name, e)
                    ok = False
        _imported_records.append(ok)
    return _imported_records[0]


def read_records(path: str, manifest: Mapping[str, Any]) -> RecordStore:
    """The manifest's records as a RecordStore keyed as Program.records was ("QuantPlan",
    "CostProfile@main"). A record whose class is importable here comes back as that Record
    (Record.from_json; pared's own classes are imported on demand, see import_record_classes);
    otherwise (no torch in this process, a record of a pass not installed here) it stays the
    JSON object the manifest holds.

    Raises:
        ArtifactError: "records" is not an object, or a record of a known type does not rebuild
            (a field unknown, missing or of another type: an artifact of another pared version);
            the message names the record and the field.
    """
    raw = manifest.get("records", {})
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: the manifest's 'records' must be an object, got {type(raw).__name__}")
    known = record_types()
    if any(isinstance(v, dict) and isinstance(v.get("type"), str) and v["type"] not in known for v in raw.values()):
        import_record_classes()
    try:
        return RecordStore.from_json(raw, strict=False)
    except RecordError as e:
        raise ArtifactError(f"{path}: the manifest's {e}; its JSON is in the manifest's 'records'") from None

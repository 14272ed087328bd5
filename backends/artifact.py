"""The artifact directory: manifest.json + model files + sha256 of each. Torch-free.

Written atomically: files go to a temporary sibling directory that is renamed
into place only when complete, so a crash mid-export leaves no half artifact.
`read_manifest` refuses a missing, tampered, truncated or newer-schema
artifact. No pickle anywhere: the manifest is JSON, weights live inside the
model files.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from typing import Callable

from pared.ir.errors import ArtifactError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
FORMAT = "pared-artifact"


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_artifact(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def write_artifact(dest: str, build: Callable[[str], dict]) -> str:
    """Build an artifact in a temporary directory and move it to `dest`.

    Args:
        dest: the artifact directory. An existing pared artifact there is
            replaced; any other non-empty directory is refused.
        build: ``build(tmpdir) -> manifest`` writes the model files into tmpdir
            and returns the manifest (without checksums).
    Returns:
        The absolute path of the artifact.
    Raises:
        ArtifactError: dest is a non-empty directory that is not an artifact.
    """
    dest = os.path.abspath(dest)
    if os.path.exists(dest) and not (os.path.isdir(dest) and (not os.listdir(dest) or _is_artifact(dest))):
        raise ArtifactError(f"{dest} exists and is not a pared artifact; refusing to overwrite it "
                            "(choose another directory)")
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
                files[rel] = {"sha256": sha256(full), "bytes": os.path.getsize(full)}
        manifest = dict(manifest, format=FORMAT, schema_version=SCHEMA_VERSION, files=files)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
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


def read_manifest(path: str, *, verify: bool = True) -> dict:
    """Read and validate an artifact's manifest.

    Raises:
        ArtifactError: not a directory, no manifest, malformed JSON, unknown
            format, newer schema, a listed file missing, or a checksum or size
            mismatch (tampered or truncated).
    """
    if not os.path.isdir(path):
        raise ArtifactError(f"{path}: not an artifact directory")
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise ArtifactError(f"{path}: no {MANIFEST}; not a pared artifact (or an export was interrupted)")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath}: manifest is not valid JSON ({e}); the artifact is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: not a pared manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise ArtifactError(f"{mpath}: schema_version missing or not an integer")
    if version > SCHEMA_VERSION:
        raise ArtifactError(f"{path}: artifact schema {version} is newer than this pared reads ({SCHEMA_VERSION}); "
                            "upgrade pared")
    if version < 1:
        raise ArtifactError(f"{path}: unknown artifact schema {version}")
    for key in ("graphs", "plan", "target", "files"):
        if key not in manifest:
            raise ArtifactError(f"{mpath}: manifest lacks '{key}'")
    if verify:
        for rel, info in manifest["files"].items():
            full = os.path.join(path, rel)
            if os.path.isabs(rel) or ".." in rel.split("/"):
                raise ArtifactError(f"{path}: manifest names a file outside the artifact: {rel}")
            if not os.path.isfile(full):
                raise ArtifactError(f"{path}: {rel} is missing")
            size = os.path.getsize(full)
            if size != info.get("bytes"):
                raise ArtifactError(f"{path}: {rel} is {size} bytes, the manifest says {info.get('bytes')} "
                                    "(truncated or replaced); re-export the artifact")
            if sha256(full) != info.get("sha256"):
                raise ArtifactError(f"{path}: {rel} does not match its sha256 in the manifest (tampered or "
                                    "corrupted); re-export the artifact")
        for g, entry in manifest["graphs"].items():
            for rel in entry.get("files", [entry.get("file")]):
                if rel not in manifest["files"]:
                    raise ArtifactError(f"{path}: graph '{g}' file {rel} is not covered by a checksum")
    return manifest

"""Ed25519 keys and detached artifact signatures. Torch-free.

    pared keygen --out me.key            # me.key (private, PEM, mode 0600) + me.key.pub (public, PEM)
    pared sign artifact/ --key me.key    # artifact/signature.json
    pared.load("artifact/", trusted_keys=["me.key.pub"])

The signature covers the exact bytes of ``manifest.json``; the manifest holds the
sha256 and size of every other file, so one signature covers the artifact. The
signature file holds the signer's public-key fingerprint and the signature, never
a key, and is not listed in the manifest (it signs the manifest). Verification
(backends.artifact.read_manifest) checks the signature over the manifest bytes it
then parses, before any sum is checked or any model file opened.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from typing import Any, Iterable

from pared.ir.errors import ArtifactError, ParedError

SIGNATURE = "signature.json"
SIGNATURE_FORMAT = "pared-signature"
ALGORITHM = "ed25519"
MAX_SIGNATURE_BYTES = 1 << 16


class UnsignedCodeWarning(RuntimeWarning):
    """An artifact's TVM shared libraries are loaded (executed) without a verified signature."""


class SigningKeyError(ParedError):
    """A key file is missing, malformed or of the wrong kind."""


def atomic_write(path: str, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` atomically (a temporary file in its folder, fsynced, renamed over it) with `mode`."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=folder)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def generate_key(out: str, *, overwrite: bool = False) -> tuple[str, str]:
    """Write a new Ed25519 private key to `out` (PEM, PKCS#8, mode 0600) and its public key to `out`.pub (PEM).

    Returns:
        (private key path, public key path).
    Raises:
        SigningKeyError: `out` or `out`.pub exists and `overwrite` is false.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pub = out + ".pub"
    for p in (out, pub):
        if os.path.exists(p) and not overwrite:
            raise SigningKeyError(f"{p} exists; refusing to overwrite a key (choose another --out)")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write(out, private, 0o600)
    atomic_write(pub, public, 0o644)
    return out, pub


def load_private_key(path: str):
    """The Ed25519 private key in PEM file `path`.

    Raises:
        SigningKeyError: missing, unreadable, not PEM, encrypted, or not Ed25519.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SIGNATURE_BYTES)
    except OSError as e:
        raise SigningKeyError(f"signing key {path}: {e.strerror or e}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        hint = " (that is a public key; sign with the private key)" if b"PUBLIC KEY" in data else ""
        raise SigningKeyError(f"signing key {path}: not an unencrypted PEM private key{hint} ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"signing key {path}: a {type(key).__name__}, pared signs with Ed25519 keys "
                        "(make one with `pared keygen`)")
    return key


def load_public_key(key: Any):
    """An Ed25519 public key from a path, PEM bytes, 32 raw bytes, an OpenSSH line, or a key object.

    Raises:
        SigningKeyError: unreadable, malformed, a private key, or not Ed25519.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if isinstance(key, Ed25519PublicKey):
        return key
    where = "trusted key"
    if isinstance(key, (str, os.PathLike)):
        where = f"trusted key {os.fspath(key)}"
        try:
            with open(key, "rb") as f:
                data = f.read(MAX_SIGNATURE_BYTES)
        except OSError as e:
            raise SigningKeyError(f"{where}: {e.strerror or e}") from None
    elif isinstance(key, (bytes, bytearray, memoryview)):
        data = bytes(key)
    else:
        raise SigningKeyError(f"a trusted key is a path, bytes or an Ed25519PublicKey, got {type(key).__name__}")
    if b"PRIVATE KEY" in data:
        raise SigningKeyError(f"{where} is a private key; trust its public half (the .pub file `pared keygen` wrote)")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            pub = serialization.load_pem_public_key(data)
        elif data.startswith(b"ssh-"):
            pub = serialization.load_ssh_public_key(data.strip())
        elif len(data) == 32:
            pub = Ed25519PublicKey.from_public_bytes(data)
        else:
            raise ValueError("expected PEM, an OpenSSH line or 32 raw bytes")
    except (ValueError, TypeError) as e:
        raise SigningKeyError(f"{where}: not an Ed25519 public key ({e})") from None
    if not isinstance(pub, Ed25519PublicKey):
        raise SigningKeyError(f"{where}: a {type(pub).__name__}, pared verifies Ed25519 signatures")
    return pub


def fingerprint(public_key: Any) -> str:
    """``sha256:<hex>`` of the key's 32 raw bytes."""
    from cryptography.hazmat.primitives import serialization
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def signature_document(manifest_bytes: bytes, private_key: Any) -> bytes:
    """The signature file's bytes for these manifest bytes."""
    doc = {"format": SIGNATURE_FORMAT, "version": 1, "algorithm": ALGORITHM,
           "key": fingerprint(private_key.public_key()),
           "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
           "signature": base64.b64encode(private_key.sign(manifest_bytes)).decode("ascii")}
    return (json.dumps(doc, indent=1) + "\n").encode()


def write_signature(artifact: str, manifest_bytes: bytes, private_key: Any) -> str:
    """Write `artifact`/signature.json atomically; returns its path."""
    path = os.path.join(artifact, SIGNATURE)
    atomic_write(path, signature_document(manifest_bytes, private_key))
    return path


def verify_manifest_bytes(artifact: str, manifest_bytes: bytes, trusted_keys: Iterable[Any]) -> str:
    """Check `artifact`'s signature over `manifest_bytes` against `trusted_keys`.

    Returns:
        The fingerprint of the key that signed it.
    Raises:
        ArtifactError: no trusted keys, unsigned, malformed signature file, signed by
            a key not trusted, or a signature that does not match the manifest.
        SigningKeyError: a trusted key cannot be read.
    """
    from cryptography.exceptions import InvalidSignature

    keys = {}
    for k in trusted_keys:
        pub = load_public_key(k)
        keys[fingerprint(pub)] = pub
    if not keys:
        raise ArtifactError(f"{artifact}: trusted_keys is empty, so no signature can be trusted; pass the public "
                            "key(s) whose signatures you accept, or trusted_keys=None to load without verifying")
    spath = os.path.join(artifact, SIGNATURE)
    if not os.path.isfile(spath) or os.path.islink(spath):
        raise ArtifactError(f"{artifact}: not signed (no {SIGNATURE}), and trusted keys were required; "
                            "sign it with `pared sign ARTIFACT --key KEY`")
    try:
        with open(spath, "rb") as f:
            raw = f.read(MAX_SIGNATURE_BYTES + 1)
        if len(raw) > MAX_SIGNATURE_BYTES:
            raise ValueError("too large")
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != SIGNATURE_FORMAT:
            raise ValueError(f"format is not {SIGNATURE_FORMAT!r}")
        if doc.get("algorithm") != ALGORITHM:
            raise ValueError(f"algorithm {doc.get('algorithm')!r} is not {ALGORITHM!r}")
        signer, sig = doc.get("key"), doc.get("signature")
        if not isinstance(signer, str) or not isinstance(sig, str):
            raise ValueError("'key' and 'signature' must be strings")
        sig = base64.b64decode(sig, validate=True)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{artifact}: {SIGNATURE} is malformed ({e}); re-sign the artifact") from None
    if signer not in keys:
        raise ArtifactError(f"{artifact}: signed by key {signer[:23]}..., which is not among the trusted keys "
                            f"({', '.join(f[:23] + '...' for f in keys)}); refusing to load it")
    try:
        keys[signer].verify(sig, manifest_bytes)
    except InvalidSignature:
        raise ArtifactError(f"{artifact}: the signature does not match manifest.json (the manifest was changed "
                            "after signing, or the signature is forged); refusing to load it") from None
    return signer

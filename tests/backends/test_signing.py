"""Signed artifacts: keygen -> sign -> load(trusted_keys=...), and every refusal before anything is loaded."""
import json
import os
import shutil
import stat
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import pared
from pared import cli
from pared.backends import executor as executor_mod
from pared.backends.artifact import MANIFEST, read_manifest, sha256, sign_artifact
from pared.backends.onnxruntime import runtime as ort_runtime
from pared.backends.signing import SIGNATURE, SigningKeyError, UnsignedCodeWarning, generate_key, load_public_key
from pared.ir.capture import capture
from pared.ir.errors import ArtifactError
from pared.targets import get_target
from pared.testing import save_program


def _linear(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(8, 4), nn.ReLU()).eval()
    return m, (torch.randn(2, 8),)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An ONNX Runtime artifact (never modified: tests copy it) and two key pairs."""
    root = tmp_path_factory.mktemp("signing")
    m, inputs = _linear()
    art = save_program(capture(m, inputs), str(root / "art"), get_target("cpu").to_json())
    mine, other = str(root / "me.key"), str(root / "other.key")
    generate_key(mine)
    generate_key(other)
    return {"art": art, "key": mine, "pub": mine + ".pub", "other": other, "other_pub": other + ".pub",
            "x": inputs[0].numpy(), "y": m(inputs[0]).detach().numpy()}


def _copy(built, tmp_path, sign_with=None):
    dst = str(tmp_path / "copy")
    shutil.copytree(built["art"], dst)
    if sign_with:
        sign_artifact(dst, sign_with)
    return dst


@pytest.fixture
def no_runtime(monkeypatch):
    """Loading must be refused before a runtime touches a model file: fail if one is constructed."""
    def boom(*a, **k):
        raise AssertionError("a graph runtime was constructed before the artifact was refused")
    monkeypatch.setattr(ort_runtime, "OrtGraph", boom)
    monkeypatch.setattr(ort_runtime, "make_session", boom)
    import pared.backends.tvm.runtime as tvm_runtime
    monkeypatch.setattr(tvm_runtime, "TvmGraph", boom)


def test_keygen_writes_private_0600_and_public(built):
    mode = stat.S_IMODE(os.stat(built["key"]).st_mode)
    assert mode == 0o600
    assert open(built["key"], "rb").read().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert open(built["pub"], "rb").read().startswith(b"-----BEGIN PUBLIC KEY-----")
    with pytest.raises(SigningKeyError, match="exists; refusing to overwrite"):
        generate_key(built["key"])


def test_signed_artifact_loads_with_its_key(built, tmp_path):
    art = _copy(built, tmp_path, sign_with=built["key"])
    sig = json.load(open(os.path.join(art, SIGNATURE)))
    assert sig["algorithm"] == "ed25519" and sig["key"].startswith("sha256:")
    # the signature file is not in the manifest's sums, holds no key, and read_manifest tolerates it
    assert SIGNATURE not in read_manifest(art)["files"]
    assert "PRIVATE" not in open(os.path.join(art, SIGNATURE)).read()
    for trusted in ([built["pub"]], [built["other_pub"], built["pub"]], [open(built["pub"], "rb").read()],
                    [load_public_key(built["pub"])]):
        run = pared.load(art, trusted_keys=trusted)
        np.testing.assert_allclose(run(built["x"]), built["y"], rtol=1e-5, atol=1e-6)


def test_save_signs(built, tmp_path):
    m, inputs = _linear()
    opt = pared.optimize(m, inputs, target="cpu", bench_repeats=0)
    art = opt.save(str(tmp_path / "a"), sign_key=built["key"])
    pared.load(art, trusted_keys=[built["pub"]])
    with pytest.raises(ArtifactError, match="not among the trusted keys"):
        pared.load(art, trusted_keys=[built["other_pub"]])


def test_unsigned_is_refused(built, tmp_path, no_runtime):
    art = _copy(built, tmp_path)
    with pytest.raises(ArtifactError, match=r"not signed \(no signature.json\).*pared sign"):
        pared.load(art, trusted_keys=[built["pub"]])


def test_other_key_is_refused(built, tmp_path, no_runtime):
    art = _copy(built, tmp_path, sign_with=built["other"])
    with pytest.raises(ArtifactError, match="signed by key sha256:.*not among the trusted keys"):
        pared.load(art, trusted_keys=[built["pub"]])


def test_forged_fingerprint_is_refused(built, tmp_path, no_runtime):
    """Signed by another key but claiming the trusted key's fingerprint: the signature fails."""
    art = _copy(built, tmp_path, sign_with=built["other"])
    mine = _copy(built, tmp_path / "mine", sign_with=built["key"])
    sig = json.load(open(os.path.join(art, SIGNATURE)))
    sig["key"] = json.load(open(os.path.join(mine, SIGNATURE)))["key"]
    json.dump(sig, open(os.path.join(art, SIGNATURE), "w"))
    with pytest.raises(ArtifactError, match="signature does not match manifest.json"):
        pared.load(art, trusted_keys=[built["pub"]])


def test_tampered_file_with_recomputed_sum_is_refused(built, tmp_path, no_runtime):
    art = _copy(built, tmp_path, sign_with=built["key"])
    manifest = json.load(open(os.path.join(art, MANIFEST)))
    rel = manifest["graphs"]["main"]["file"]
    full = os.path.join(art, rel)
    data = bytearray(open(full, "rb").read())
    data[-1] ^= 0x01
    open(full, "wb").write(bytes(data))
    manifest["files"][rel] = {"sha256": sha256(full), "bytes": len(data)}
    json.dump(manifest, open(os.path.join(art, MANIFEST), "w"), indent=1)
    read_manifest(art)  # the sums alone are consistent again: only the signature catches it
    with pytest.raises(ArtifactError, match="signature does not match manifest.json"):
        pared.load(art, trusted_keys=[built["pub"]])


def test_tampered_manifest_is_refused(built, tmp_path, no_runtime):
    art = _copy(built, tmp_path, sign_with=built["key"])
    p = os.path.join(art, MANIFEST)
    open(p, "ab").write(b" ")   # one byte of whitespace: same JSON, different bytes
    with pytest.raises(ArtifactError, match="signature does not match manifest.json"):
        pared.load(art, trusted_keys=[built["pub"]])


def test_tampered_file_without_resum_is_refused(built, tmp_path, no_runtime):
    art = _copy(built, tmp_path, sign_with=built["key"])
    rel = json.load(open(os.path.join(art, MANIFEST)))["graphs"]["main"]["file"]
    open(os.path.join(art, rel), "ab").write(b"\0")
    with pytest.raises(ArtifactError, match="truncated or replaced"):
        pared.load(art, trusted_keys=[built["pub"]])


def test_extra_file_is_refused_when_keys_are_required(built, tmp_path, no_runtime):
    art = _copy(built, tmp_path, sign_with=built["key"])
    open(os.path.join(art, "evil.so"), "wb").write(b"\x7fELF")
    with pytest.raises(ArtifactError, match="does not list: evil.so"):
        pared.load(art, trusted_keys=[built["pub"]])


def test_bad_signature_file_and_keys(built, tmp_path, no_runtime):
    art = _copy(built, tmp_path, sign_with=built["key"])
    with pytest.raises(ArtifactError, match="trusted_keys is empty"):
        pared.load(art, trusted_keys=[])
    with pytest.raises(SigningKeyError, match="is a private key"):
        pared.load(art, trusted_keys=[built["key"]])
    with pytest.raises(SigningKeyError, match="No such file"):
        pared.load(art, trusted_keys=[str(tmp_path / "nope.pub")])
    open(os.path.join(art, SIGNATURE), "w").write("{not json")
    with pytest.raises(ArtifactError, match="signature.json is malformed"):
        pared.load(art, trusted_keys=[built["pub"]])


def test_signing_refuses_a_damaged_artifact_and_a_public_key(built, tmp_path):
    art = _copy(built, tmp_path)
    with pytest.raises(SigningKeyError, match="that is a public key"):
        sign_artifact(art, built["pub"])
    rel = json.load(open(os.path.join(art, MANIFEST)))["graphs"]["main"]["file"]
    open(os.path.join(art, rel), "ab").write(b"\0")
    with pytest.raises(ArtifactError, match="truncated or replaced"):
        sign_artifact(art, built["key"])
    assert not os.path.exists(os.path.join(art, SIGNATURE))


def test_ort_artifact_does_not_warn(built, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsignedCodeWarning)
        pared.load(built["art"])


@pytest.mark.slow
def test_tvm_unsigned_warns_and_signed_loads(built, tmp_path):
    m, inputs = _linear()
    art = save_program(capture(m, inputs), str(tmp_path / "tvm"), get_target("tvm-cpu").to_json())
    with pytest.warns(UnsignedCodeWarning, match=r"executes code from the artifact \(TVM shared libraries "
                                                 r"main.so\) and it is not signed"):
        pared.load(art)
    assert issubclass(UnsignedCodeWarning, RuntimeWarning)
    sign_artifact(art, built["key"])
    with pytest.warns(UnsignedCodeWarning, match="signature was not checked"):
        pared.load(art)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsignedCodeWarning)
        run = pared.load(art, trusted_keys=[built["pub"]])
    np.testing.assert_allclose(run(built["x"]), built["y"], rtol=1e-5, atol=1e-6)
    # a swapped library with its sum recomputed: refused before TVM dlopens it
    manifest = json.load(open(os.path.join(art, MANIFEST)))
    lib = os.path.join(art, "main.so")
    open(lib, "ab").write(b"\0")
    manifest["files"]["main.so"] = {"sha256": sha256(lib), "bytes": os.path.getsize(lib)}
    json.dump(manifest, open(os.path.join(art, MANIFEST), "w"), indent=1)
    import pared.backends.tvm.runtime as tvm_runtime
    loaded = []
    orig = tvm_runtime.TvmGraph

    class Spy(orig):
        def __init__(self, *a, **k):
            loaded.append(a)
            super().__init__(*a, **k)
    tvm_runtime.TvmGraph = Spy
    try:
        with pytest.raises(ArtifactError, match="signature does not match"):
            pared.load(art, trusted_keys=[built["pub"]])
    finally:
        tvm_runtime.TvmGraph = orig
    assert loaded == []


def test_cli_keygen_sign_run(built, tmp_path, capsys):
    key = str(tmp_path / "k")
    assert cli.main(["keygen", "--out", key]) == cli.EXIT_OK
    assert "fingerprint sha256:" in capsys.readouterr().out
    assert cli.main(["keygen", "--out", key]) == cli.EXIT_ERROR
    assert "refusing to overwrite" in capsys.readouterr().err
    art = _copy(built, tmp_path)
    np.savez(str(tmp_path / "in.npz"), built["x"])
    assert cli.main(["run", art, "--inputs", str(tmp_path / "in.npz"), "--trusted-key", key + ".pub"]) == cli.EXIT_ERROR
    assert "not signed" in capsys.readouterr().err
    assert cli.main(["sign", art, "--key", key]) == cli.EXIT_OK
    assert "signature.json" in capsys.readouterr().out
    assert cli.main(["run", art, "--inputs", str(tmp_path / "in.npz"), "--trusted-key", key + ".pub"]) == cli.EXIT_OK
    assert cli.main(["run", art, "--inputs", str(tmp_path / "in.npz"),
                     "--trusted-key", built["pub"]]) == cli.EXIT_ERROR
    assert "not among the trusted keys" in capsys.readouterr().err
    assert cli.main(["sign", art, "--key", str(tmp_path / "missing.key")]) == cli.EXIT_ERROR
    assert "signing key" in capsys.readouterr().err
    assert cli.main(["sign", art]) == cli.EXIT_USAGE


def test_executor_module_takes_trusted_keys(built, tmp_path, no_runtime):
    art = _copy(built, tmp_path)
    with pytest.raises(ArtifactError, match="not signed"):
        executor_mod.Executor(art, trusted_keys=[built["pub"]])

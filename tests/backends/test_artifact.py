import json
import os

import pytest

from pared.backends.artifact import MANIFEST, SCHEMA_VERSION, read_manifest, write_artifact
from pared.ir.errors import ArtifactError


def _build(tmp):
    with open(os.path.join(tmp, "main.bin"), "wb") as f:
        f.write(b"\x00\x01model-bytes" * 100)
    return {"graphs": {"main": {"backend": "onnxruntime", "file": "main.bin", "files": ["main.bin"],
                                "inputs": [], "outputs": []}},
            "plan": {}, "target": {"name": "cpu"}}


@pytest.fixture
def artifact(tmp_path):
    return write_artifact(str(tmp_path / "art"), _build)


def test_roundtrip_has_checksums(artifact):
    m = read_manifest(artifact)
    assert m["schema_version"] == SCHEMA_VERSION and m["format"] == "pared-artifact"
    assert set(m["files"]) == {"main.bin"} and len(m["files"]["main.bin"]["sha256"]) == 64


def test_one_changed_byte_is_refused(artifact):
    p = os.path.join(artifact, "main.bin")
    data = bytearray(open(p, "rb").read())
    data[100] ^= 0x01
    open(p, "wb").write(bytes(data))
    with pytest.raises(ArtifactError, match="main.bin does not match its sha256"):
        read_manifest(artifact)


def test_truncated_file_is_refused(artifact):
    p = os.path.join(artifact, "main.bin")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated"):
        read_manifest(artifact)


def test_missing_file_and_manifest(artifact):
    os.remove(os.path.join(artifact, "main.bin"))
    with pytest.raises(ArtifactError, match="main.bin is missing"):
        read_manifest(artifact)
    os.remove(os.path.join(artifact, MANIFEST))
    with pytest.raises(ArtifactError, match="no manifest.json"):
        read_manifest(artifact)


def test_newer_schema_is_refused(artifact):
    p = os.path.join(artifact, MANIFEST)
    m = json.load(open(p))
    m["schema_version"] = SCHEMA_VERSION + 1
    json.dump(m, open(p, "w"))
    with pytest.raises(ArtifactError, match="newer than this pared reads"):
        read_manifest(artifact)


def test_truncated_manifest_is_refused(artifact):
    p = os.path.join(artifact, MANIFEST)
    text = open(p).read()
    open(p, "w").write(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(artifact)


def test_crash_mid_export_leaves_nothing(tmp_path):
    def boom(tmp):
        _build(tmp)
        raise RuntimeError("crash")
    with pytest.raises(RuntimeError):
        write_artifact(str(tmp_path / "art"), boom)
    assert os.listdir(tmp_path) == []


def test_crash_keeps_previous_artifact(artifact, tmp_path):
    def boom(tmp):
        raise RuntimeError("crash")
    with pytest.raises(RuntimeError):
        write_artifact(artifact, boom)
    read_manifest(artifact)  # still whole


def test_refuses_to_overwrite_foreign_directory(tmp_path):
    d = tmp_path / "home"
    d.mkdir()
    (d / "thesis.tex").write_text("precious")
    with pytest.raises(ArtifactError, match="not a pared artifact; refusing"):
        write_artifact(str(d), _build)
    assert (d / "thesis.tex").read_text() == "precious"


def test_manifest_cannot_point_outside(artifact):
    p = os.path.join(artifact, MANIFEST)
    m = json.load(open(p))
    m["files"]["../evil"] = {"sha256": "0", "bytes": 0}
    json.dump(m, open(p, "w"))
    with pytest.raises(ArtifactError, match="outside the artifact|missing"):
        read_manifest(artifact)

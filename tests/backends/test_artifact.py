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


def _rewrite(artifact, edit):
    p = os.path.join(artifact, MANIFEST)
    m = json.load(open(p))
    edit(m)
    json.dump(m, open(p, "w"))


@pytest.mark.parametrize("field, name", [("file", "/etc/passwd"), ("file", "../outside.bin"),
                                         ("weights_file", "../outside.bin"), ("files", "a/../../outside.bin")])
def test_graph_file_names_outside_the_artifact_are_refused(artifact, field, name):
    """A graph's 'file' was unchecked when it also listed 'files', and 'weights_file' always was:
    the TVM runtime would have loaded a library from anywhere."""
    def edit(m):
        g = m["graphs"]["main"]
        if field == "files":
            g["files"].append(name)
        else:
            g[field] = name
    _rewrite(artifact, edit)
    with pytest.raises(ArtifactError, match="outside the artifact"):
        read_manifest(artifact)


def test_symlink_leading_out_is_refused(artifact, tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(open(os.path.join(artifact, "main.bin"), "rb").read())
    os.remove(os.path.join(artifact, "main.bin"))
    os.symlink(outside, os.path.join(artifact, "main.bin"))
    with pytest.raises(ArtifactError, match="resolves outside the artifact"):
        read_manifest(artifact)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.__setitem__("files", ["main.bin"]), "'files' must be an object"),
    (lambda m: m["files"].__setitem__("main.bin", "abc"), r"files\['main.bin'\] must be"),
    (lambda m: m["graphs"].__setitem__("main", []), "graph 'main' must be an object"),
    (lambda m: m["graphs"]["main"].__setitem__("inputs", None), "'inputs' must be a list"),
    (lambda m: m.__setitem__("schema_version", True), "schema_version missing or not an integer"),
    (lambda m: m["files"].__setitem__("signature.json", {"sha256": "0", "bytes": 1}), "cannot cover"),
])
def test_wrong_typed_fields_are_refused(artifact, edit, match):
    _rewrite(artifact, edit)
    with pytest.raises(ArtifactError, match=match):
        read_manifest(artifact)


def test_oversized_manifest_is_refused(artifact, monkeypatch):
    from pared.backends import artifact as artifact_mod
    monkeypatch.setattr(artifact_mod, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(ArtifactError, match="larger than 100 bytes"):
        read_manifest(artifact)

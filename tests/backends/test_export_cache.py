"""The export cache (PARED_EXPORT_CACHE): a hit gives the file a fresh export writes, the key
moves with everything the export depends on, a failed export stores nothing, and with the
variable unset nothing is read or written."""
import os
import subprocess
import sys

import pytest
import torch

from pared.backends.executor import Executor
from pared.backends.onnxruntime import export_cache, lower
from pared.ir.capture import capture
from pared.ir.errors import BackendError
from pared.targets import get_target
from pared.testing import assert_close_to_eager, save_program, tiny_transformer

CPU = get_target("cpu").to_json()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv(export_cache.ENV, str(d))
    return d


def _entries(d):
    return sorted(e for sub in d.iterdir() if sub.is_dir() for e in os.listdir(sub)) if d.exists() else []


def test_a_hit_writes_the_file_a_fresh_export_writes_and_skips_the_exporter(tmp_path, cache, monkeypatch):
    m, inputs = tiny_transformer()
    g = capture(m, inputs).main
    fresh = str(tmp_path / "fresh.onnx")
    assert lower.export_onnx(g, fresh) is not None           # a miss exports (and returns its program)
    assert len(_entries(cache)) == 1

    def no_export(*a, **k):
        raise AssertionError("the exporter ran on a cache hit")
    monkeypatch.setattr(torch.onnx, "export", no_export)
    hit = str(tmp_path / "hit.onnx")
    assert lower.export_onnx(g, hit) is None
    assert open(hit, "rb").read() == open(fresh, "rb").read()
    # and a whole lowering from the cache is checked and runs like eager
    ex = Executor(save_program(capture(m, inputs), tmp_path / "art", CPU))
    ids = torch.randint(0, 50, (2, 16))
    assert_close_to_eager(m(ids), ex(ids.numpy()), rel_l2=1e-5)
    assert ex.manifest["graphs"]["main"]["check"]["rel_l2"] <= 1e-4
    assert not [f for f in os.listdir(cache / _entries(cache)[0][:2]) if f.startswith(".")]   # no temp folders left
    # the lookups are counted: the first export missed, the two after it hit
    assert export_cache.counts() == {"hit": 2, "miss": 1}
    out = subprocess.run([sys.executable, "-m", "pared.backends.onnxruntime.export_cache", str(cache)],
                         capture_output=True, text=True, check=True).stdout
    assert "2 hits, 1 misses (67% of 3 lookups)" in out


def test_the_key_moves_with_weights_inputs_optimizer_and_translations():
    m, inputs = tiny_transformer()
    g = capture(m, inputs).main
    key = lambda graph, **kw: export_cache.export_key(graph, optimize=kw.get("optimize", True),
                                                     translations=kw.get("translations", lower.custom_translations()))
    base = key(g)
    assert key(capture(m, inputs).main) == base                  # the same model captured again: the same key
    assert key(g, optimize=False) != base
    assert key(g, translations={**lower.custom_translations(), torch.ops.aten.add.Tensor: lambda a, b: a}) != base

    m2, _ = tiny_transformer()
    m2.load_state_dict(m.state_dict())
    with torch.no_grad():
        next(iter(m2.parameters())).view(-1)[0] += 1e-3          # one weight element
    assert key(capture(m2, inputs).main) != base
    (ids,) = inputs
    assert key(capture(m, (ids[:1],)).main) != base              # another example shape
    other = ids.clone()
    other[0, 0] = (other[0, 0] + 1) % 50
    assert key(g.with_module(g.module, example_inputs=(other,))) != base   # other example values


def test_a_failed_export_stores_nothing(tmp_path, cache, monkeypatch):
    m, inputs = tiny_transformer()
    g = capture(m, inputs).main

    def broken(*a, **k):
        raise RuntimeError("exporter broke")
    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match="exporter broke"):
        lower.export_onnx(g, str(tmp_path / "x.onnx"))
    assert _entries(cache) == []
    with pytest.raises(BackendError, match="main"):               # lower_graph names the graph
        lower.lower_graph(g, "main", CPU, str(tmp_path))
    assert _entries(cache) == []


def test_unset_means_off(tmp_path, monkeypatch):
    monkeypatch.delenv(export_cache.ENV, raising=False)
    assert export_cache.cache_dir() is None
    m, inputs = tiny_transformer()
    g = capture(m, inputs).main
    assert lower.export_onnx(g, str(tmp_path / "x.onnx")) is not None
    assert not export_cache.fetch("0" * 64, str(tmp_path / "y.onnx"))
    assert sorted(os.listdir(tmp_path)) == ["x.onnx"]


def test_a_second_store_of_a_key_keeps_the_first(tmp_path, cache):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    a.write_bytes(b"first")
    b.write_bytes(b"second")
    export_cache.store("ab" * 32, str(a))
    export_cache.store("ab" * 32, str(b))
    out = tmp_path / "out.onnx"
    assert export_cache.fetch("ab" * 32, str(out)) and out.read_bytes() == b"first"
    assert os.listdir(cache / "ab") == ["ab" * 32]

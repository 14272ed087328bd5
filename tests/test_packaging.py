"""Every folder with an __init__.py is a package in pyproject.toml, under the pared namespace."""
import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_package_folder_is_listed():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        cfg = tomllib.load(f)["tool"]["setuptools"]
    listed = set(cfg["packages"])
    mapping = cfg["package-dir"]
    reverse = {v: k for k, v in mapping.items()}
    found = set()
    for top in sorted(set(mapping.values())):
        for root, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if "__init__.py" in files:
                rel = os.path.relpath(root, ROOT).split(os.sep)
                found.add(".".join([reverse[rel[0]].split(".")[-1] if rel[0] != "pared" else "pared", *rel[1:]])
                          if rel[0] == "pared" else ".".join([reverse[rel[0]], *rel[1:]]))
    missing = found - listed
    assert not missing, f"packages missing from pyproject.toml: {sorted(missing)}"
    assert not (listed - found), f"listed packages without __init__.py: {sorted(listed - found)}"


def test_no_bare_top_level_imports():
    import importlib.util
    for bare in ("ir", "passes", "analysis", "backends"):
        spec = importlib.util.find_spec(bare)
        assert spec is None or ROOT not in (spec.origin or ""), f"'{bare}' is importable as a bare module"


def test_namespace_maps_to_folders():
    import pared.ir.program
    import pared.passes.generic
    # imported through the editable mapping (ir/) or, from the root, through the pared/ir link to it
    assert os.path.realpath(os.path.dirname(pared.ir.program.__file__)) == os.path.join(ROOT, "ir")
    assert os.path.realpath(os.path.dirname(pared.passes.generic.__file__)) == os.path.join(ROOT, "passes", "generic")


def test_pared_links_each_mapped_folder_where_it_imports():
    """pared/ir -> ../ir and so on, for every package-dir mapping: tools that find modules by
    walking pared/ (import-linter) see the sources laid out as they import."""
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        mapping = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    for name, folder in mapping.items():
        if name == "pared":
            continue
        link = os.path.join(ROOT, *name.split("."))
        assert os.path.islink(link) and os.readlink(link) == os.path.join("..", folder), name


def test_the_tests_listed_as_slow_start_first_slowest_first(tmp_path, monkeypatch):
    """tests/conftest.py orders a run by tests/durations.json: listed tests first, slowest first,
    the others after them in their collected order; without the file the order is left alone."""
    import importlib.util
    import json
    import types
    spec = importlib.util.spec_from_file_location("pared_tests_conftest", os.path.join(os.path.dirname(__file__),
                                                                                        "conftest.py"))
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    path = tmp_path / "durations.json"
    path.write_text(json.dumps({"t::slow": 400.0, "t::mid": 90.5}))
    monkeypatch.setattr(conftest, "DURATIONS", str(path))
    items = [types.SimpleNamespace(nodeid=n) for n in ("t::a", "t::mid", "t::b", "t::slow", "t::c")]
    conftest.pytest_collection_modifyitems(None, items)
    assert [i.nodeid for i in items] == ["t::slow", "t::mid", "t::a", "t::b", "t::c"]
    monkeypatch.setattr(conftest, "DURATIONS", str(tmp_path / "missing.json"))
    items = [types.SimpleNamespace(nodeid=n) for n in ("t::c", "t::slow")]
    conftest.pytest_collection_modifyitems(None, items)
    assert [i.nodeid for i in items] == ["t::c", "t::slow"]


def test_the_cpu_log_records_wall_and_cpu_time_per_test(tmp_path, monkeypatch):
    """With PARED_TEST_CPU_LOG set, tests/conftest.py appends a line per test (its wall and CPU
    time) and tests/support/cpu_report.py sums them: a test that sleeps shows as idle."""
    import importlib.util
    import json
    import time
    import types
    here = os.path.dirname(__file__)
    spec = importlib.util.spec_from_file_location("pared_tests_conftest", os.path.join(here, "conftest.py"))
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    log = tmp_path / "cpu.jsonl"
    monkeypatch.setenv(conftest.CPU_LOG, str(log))
    for name, work in (("t::sleeps", lambda: time.sleep(0.3)), ("t::spins", lambda: sum(range(3_000_000)))):
        gen = conftest.pytest_runtest_protocol(types.SimpleNamespace(nodeid=name), None)
        next(gen)
        work()
        assert next(gen, "done") == "done"
    rows = {r["test"]: r for r in map(json.loads, log.read_text().splitlines())}
    # CPU time, unlike wall time, does not grow when the test shares its core (xdist's other worker)
    assert rows["t::sleeps"]["wall_s"] >= 0.3 and rows["t::sleeps"]["cpu_s"] < 0.15
    assert rows["t::spins"]["cpu_s"] >= 0.03 and rows["t::spins"]["cpu_s"] > rows["t::sleeps"]["cpu_s"]
    spec = importlib.util.spec_from_file_location("cpu_report", os.path.join(here, "support", "cpu_report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    text = report.summary(str(log), top=1)
    assert text.startswith("2 tests") and "t::sleeps" in text and "t::spins" not in text.split("top 1:")[1]

"""Imports flow one way (ir <- analysis <- passes <- backends <- pared <- workloads),
checked by the import-linter contract in pyproject.toml, and the check can fail.

import-linter finds a package's modules by walking its folder; pared's subpackages
live in folders mapped by `package-dir` (pared.ir is ir/), which it reaches through
the links pared/ir -> ../ir etc. Plain `lint-imports` at the root is checked here as a
developer runs it; the tests that edit sources (to show the check can fail) run on a
copy laid out as the sources import, with the same pyproject.toml.
"""
import os
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: `lint-imports`, run by this interpreter (the venv's, where import-linter is a dev dependency)
LINT_IMPORTS = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]


def _mirror(dest: str, leave_out: tuple[str, ...] = ()) -> str:
    """Copy pyproject.toml and every mapped package folder's .py files into `dest`, laid
    out by import name (pared.ir -> dest/pared/ir), but the packages in `leave_out`. Returns dest."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        mapping = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    mapping = {k: v for k, v in mapping.items() if k not in leave_out}
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), dest)
    # the root package first: its folder would otherwise be copied over the mapped subpackages
    for name, folder in sorted(mapping.items(), key=lambda kv: kv[0].count(".")):
        shutil.copytree(os.path.join(ROOT, folder), os.path.join(dest, *name.split(".")), dirs_exist_ok=True,
                        ignore=lambda d, names: [n for n in names if n == "__pycache__" or
                                                 (os.path.isfile(os.path.join(d, n)) and not n.endswith(".py"))])
    return dest


def _lint(tree: str) -> subprocess.CompletedProcess:
    """Run the contracts of `tree`/pyproject.toml on the package copied into `tree`."""
    try:
        import importlinter  # noqa: F401
    except ImportError:
        pytest.fail("import-linter is not installed: install the dev dependencies (make install)")
    env = dict(os.environ, PYTHONPATH=tree)
    return subprocess.run([*LINT_IMPORTS, "--no-cache"],   # reads tree/pyproject.toml (the cwd)
                          cwd=tree, env=env, capture_output=True, text=True, timeout=300)


def test_plain_lint_imports_at_the_root_keeps_the_contract():
    try:
        import importlinter  # noqa: F401
    except ImportError:
        pytest.fail("import-linter is not installed: install the dev dependencies (make install)")
    res = subprocess.run([*LINT_IMPORTS, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "1 kept, 0 broken" in res.stdout, f"{res.stdout}\n{res.stderr}"


def test_the_layers_contract_holds(tmp_path):
    res = _lint(_mirror(str(tmp_path)))
    assert res.returncode == 0, f"import-linter found imports against the layers:\n{res.stdout}\n{res.stderr}"
    assert "1 kept, 0 broken" in res.stdout, res.stdout


def test_the_contract_holds_on_the_library_alone(tmp_path):
    """A checkout of the library's folders only (no workloads/) keeps the contract: the
    workloads layer is optional, and nothing below it imports it."""
    res = _lint(_mirror(str(tmp_path), leave_out=("pared.workloads",)))
    assert res.returncode == 0 and "1 kept, 0 broken" in res.stdout, f"{res.stdout}\n{res.stderr}"


@pytest.mark.parametrize("where, line, names", [
    # an upward import hidden inside a function is found too
    ("ir/regions.py", "\n\ndef _upward():\n    from pared.passes.quant import quantize_linears\n",
     "pared.ir.regions -> pared.passes.quant.quantize_linears"),
    ("analysis/redundancy.py", "\nimport pared.backends.lower\n", "pared.analysis.redundancy -> pared.backends.lower"),
    ("backends/lower.py", "\nfrom pared.workloads import get_workload\n", "pared.backends.lower -> pared.workloads"),
])
def test_an_upward_import_breaks_the_contract(tmp_path, where, line, names):
    tree = _mirror(str(tmp_path))
    path = os.path.join(tree, "pared", where)
    with open(path, "a") as f:
        f.write(line)
    res = _lint(tree)
    assert res.returncode != 0 and "0 kept, 1 broken" in res.stdout, res.stdout
    assert names in res.stdout, res.stdout


def test_a_front_door_module_outside_every_layer_breaks_the_contract(tmp_path):
    """The contract is exhaustive: a new module in pared/ must be placed in a layer."""
    tree = _mirror(str(tmp_path))
    with open(os.path.join(tree, "pared", "newcomer.py"), "w") as f:
        f.write('"""A module no layer names."""\n')
    res = _lint(tree)
    assert res.returncode != 0 and "pared.newcomer" in res.stdout, res.stdout

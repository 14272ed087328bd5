"""The `pared` command: optimize, inspect, run, bench; one-line errors and exit codes."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pared.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, main

MODELS_PY = textwrap.dedent("""
    import torch
    from pared.testing import tiny_transformer

    def build_model():
        return tiny_transformer()[0]

    def example_inputs():
        return tiny_transformer()[1]

    def calibration():
        torch.manual_seed(1)
        return [(torch.randint(0, 50, (2, 16)),)]

    def holdout():
        torch.manual_seed(2)
        return [(torch.randint(0, 50, (2, 16)),) for _ in range(2)]

    def model_and_inputs():
        return tiny_transformer()

    def two_stack():
        from pared.testing import tiny_two_stack
        return tiny_two_stack()

    class Branchy(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    def branchy():
        return Branchy(), (torch.randn(3),)
""")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "models.py").write_text(MODELS_PY)
    (d / "p.yaml").write_text(textwrap.dedent("""\
        version: 1
        target: cpu
        model: models.py:build_model
        example_inputs: models.py:example_inputs
        calibration: models.py:calibration
        export: out/art
        passes:
          - constant_folding: {max_bytes: 1000000}
          - dead_code_elimination
    """))
    return d


@pytest.fixture(scope="module")
def artifact(workdir):
    assert main(["optimize", str(workdir / "p.yaml"), "--repeats", "2", "-q"]) == EXIT_OK
    return str(workdir / "out" / "art")


def test_optimize_writes_artifact(artifact, capsys):
    assert os.path.isfile(os.path.join(artifact, "manifest.json"))
    man = json.load(open(os.path.join(artifact, "manifest.json")))
    assert [p["name"] for p in man["report"]["passes"]] == ["constant_folding", "dead_code_elimination"]
    assert man["report"]["fidelity"]["checked_inputs"] == 2


def test_optimize_judges_the_holdout_named_in_the_file(artifact, workdir):
    man = json.load(open(os.path.join(artifact, "manifest.json")))
    assert man["report"]["fidelity"]["judged_on"] == "example + calibration (in-sample)"
    held = workdir / "held.yaml"
    held.write_text((workdir / "p.yaml").read_text().replace("export:", "holdout: models.py:holdout\nexport:"))
    out = str(workdir / "held_art")
    assert main(["optimize", str(held), "--out", out, "--repeats", "0", "-q"]) == EXIT_OK
    f = json.load(open(os.path.join(out, "manifest.json")))["report"]["fidelity"]
    assert f["judged_on"] == "example + holdout" and f["in_sample"] is False and f["checked_inputs"] == 3


def test_optimize_bad_option_is_one_line(workdir, capsys):
    bad = workdir / "bad.yaml"
    bad.write_text((workdir / "p.yaml").read_text().replace("max_bytes", "max_bites"))
    assert main(["optimize", str(bad), "--out", str(workdir / "x")]) == EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert "bad.yaml:8" in err and "constant_folding" in err and "max_bites" in err and "max_bytes" in err
    assert "Traceback" not in err
    assert not os.path.exists(workdir / "x")


def test_inspect_shows_regions(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    assert main(["inspect", "models.py:model_and_inputs", "-q"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "blocks.0" in out and "blocks.0.qkv" in out and "parameters" in out and "GFLOPs" in out
    assert "addmm" in out


def test_inspect_lists_the_block_stacks_in_order(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    assert main(["inspect", "models.py:two_stack", "-q"]) == EXIT_OK
    out = capsys.readouterr().out
    dual, single = out.index("dual_blocks.*  3 × _TinyJointBlock, 2 output(s) each  (the default)"), \
        out.index("single_blocks.*  3 × _TinySingleBlock, 2 output(s) each")
    assert "block stacks, in the order they run" in out and dual < single


def test_inspect_untraceable_model(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    assert main(["inspect", "models.py:branchy", "-q"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "cannot capture Branchy" in err and "models.py" in err and "if x.sum() > 0" in err


def test_run_and_bench(artifact, workdir, capsys):
    ids = np.random.default_rng(0).integers(0, 50, (2, 16))
    np.savez(workdir / "in.npz", ids=ids)
    assert main(["run", artifact, "--inputs", str(workdir / "in.npz"), "--out", str(workdir / "o.npz")]) == EXIT_OK
    out = np.load(workdir / "o.npz")
    assert set(out.files) == {"tokens", "logits"}           # the model's output names
    import torch
    from pared.testing import assert_close_to_eager, tiny_transformer
    with torch.no_grad():
        ref = tiny_transformer()[0](torch.from_numpy(ids))
    assert_close_to_eager(ref, {k: out[k] for k in ("tokens", "logits")}, rel_l2=1e-4)
    capsys.readouterr()
    assert main(["bench", artifact, "--repeats", "3", "--warmup", "1", "--json"]) == EXIT_OK
    res = json.loads(capsys.readouterr().out)
    assert res["median_ms"] > 0 and res["repeats"] == 3 and "kernels" not in res
    # --profile: the same run kernel by kernel (ORT's profiler), one node = one kernel call per run
    assert main(["bench", artifact, "--repeats", "2", "--warmup", "1", "--profile", "2", "--json"]) == EXIT_OK
    prof = json.loads(capsys.readouterr().out)["kernels"]
    assert prof["categories"]["matmul"] > 0 and {t["calls"] for t in prof["top"]} == {1.0}
    assert main(["bench", artifact, "--repeats", "2", "--warmup", "1", "--profile", "1"]) == EXIT_OK
    printed = " ".join(capsys.readouterr().out.split())
    assert "kernels of the artifact:" in printed and "ms unprofiled" in printed


def test_run_wrong_inputs(artifact, workdir, capsys):
    np.savez(workdir / "wrong.npz", foo=np.zeros(3))
    assert main(["run", artifact, "--inputs", str(workdir / "wrong.npz")]) == EXIT_ERROR
    assert "needs arrays named ['ids']" in capsys.readouterr().err


def test_tampered_artifact_refused(artifact, workdir, capsys, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    onnx_file = copy / "main.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    assert main(["bench", str(copy)]) == EXIT_ERROR
    assert "does not match its sha256" in capsys.readouterr().err


def test_usage_error():
    assert main(["frobnicate"]) == EXIT_USAGE


def test_console_script_entry_point():
    exe = os.path.join(os.path.dirname(sys.executable), "pared")
    p = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "optimize" in p.stdout


def test_bench_placement_redraws_and_summarizes_a_results_file(tmp_path, capsys):
    """`pared bench --placement plot` reads the placement results (here the committed ones), draws
    the latency-vs-bandwidth plot beside the results folder and prints the headline figures."""
    import shutil
    src = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results", "placement.json")
    (tmp_path / "results").mkdir()
    dst = tmp_path / "results" / "placement.json"
    shutil.copy(src, dst)
    assert main(["bench", "--placement", "plot", "--json", str(dst)]) == EXIT_OK
    out = capsys.readouterr().out
    with open(src) as f:
        committed = json.load(f)
    first = committed["vla"]["sweep"][0]
    assert f"{first['mbit']:g} Mbit/s: {first['chosen']} ({first['chosen_cut']})" in out
    assert (tmp_path / "placement.png").stat().st_size > 10_000
    assert json.loads(dst.read_text()) == committed          # plot redoes nothing


def test_bench_placement_usage_errors(capsys):
    assert main(["bench", "--placement", "sweep", "--workload", "minilm"]) == EXIT_USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert "--workload must be one of ['dit_mnist', 'vla_metaworld'], got 'minilm'" in err
    assert main(["bench", "some/artifact", "--placement", "plot"]) == EXIT_USAGE
    assert main(["bench", "--placement", "plot", "--profile", "2"]) == EXIT_USAGE
    assert "--profile profiles an ARTIFACT" in " ".join(capsys.readouterr().err.split())

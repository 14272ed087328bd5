"""Pipeline files and pass lists: parsing, and one clear error per kind of mistake."""
import glob
import os
import textwrap

import pytest

from pared.ir.errors import PipelineError
from pared.passes.generic.constant_folding import FoldConstants
from pared.passes.generic.dead_code_elimination import EliminateDeadCode
from pared.pipeline import PassSpec, build_passes, load_pipeline, parse_pipeline, resolve_ref
from pared.workloads import EXAMPLES as EXAMPLES_DIR

GOOD = """\
version: 1
target: cpu
model: models.py:build
example_inputs: models.py:inputs
export: out/art
fidelity: {min_cosine: 0.99}
backend: {}
passes:
  - constant_folding: {max_bytes: 1000}
  - dead_code_elimination
"""


def _write(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def _error(tmp_path, text) -> str:
    with pytest.raises(PipelineError) as e:
        load_pipeline(_write(tmp_path, text))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_good_file(tmp_path):
    spec = load_pipeline(_write(tmp_path, GOOD))
    assert spec.target == "cpu" and spec.model == "models.py:build" and spec.fidelity == {"min_cosine": 0.99}
    assert spec.export == str(tmp_path / "out" / "art")  # relative to the file
    assert [(p.name, dict(p.options)) for p in spec.passes] == [("constant_folding", {"max_bytes": 1000}),
                                                                ("dead_code_elimination", {})]
    assert spec.passes[0].where.endswith("p.yaml:9")
    passes = build_passes(spec)
    assert isinstance(passes[0], FoldConstants) and passes[0].options.max_bytes == 1000
    assert isinstance(passes[1], EliminateDeadCode)
    assert build_passes(spec)[0] is not passes[0]  # fresh instances each time


def test_unknown_option_names_line_pass_and_suggestion(tmp_path):
    msg = _error(tmp_path, GOOD.replace("max_bytes", "max_bites"))
    assert msg.startswith(str(tmp_path / "p.yaml") + ":9: ")
    assert "pass 'constant_folding'" in msg and "'max_bites'" in msg and "did you mean 'max_bytes'" in msg


def test_wrong_option_type(tmp_path):
    msg = _error(tmp_path, GOOD.replace("1000", "lots"))
    assert ":9: " in msg and "option 'max_bytes' expects int, got str 'lots'" in msg


def test_out_of_range_value(tmp_path):
    msg = _error(tmp_path, GOOD.replace("1000", "-5"))
    assert ":9: " in msg and "option 'max_bytes' must be in [0, inf], got -5" in msg


def test_unknown_pass(tmp_path):
    msg = _error(tmp_path, GOOD.replace("- dead_code_elimination", "- dead_code_elimnation"))
    assert ":10: " in msg and "unknown pass 'dead_code_elimnation'" in msg and "'dead_code_elimination'" in msg


def test_malformed_yaml_names_line(tmp_path):
    msg = _error(tmp_path, GOOD.replace("  - dead_code_elimination", "  - dead_code_elimination: {x: [1, 2"))
    assert "p.yaml:" in msg and "not valid YAML" in msg


def test_unknown_top_level_key(tmp_path):
    msg = _error(tmp_path, GOOD.replace("passes:", "pases:"))
    assert ":8: unknown key 'pases'; did you mean 'passes'?" in msg


def test_version(tmp_path):
    assert "version 2 is not supported" in _error(tmp_path, GOOD.replace("version: 1", "version: 2"))
    assert "missing 'version: 1'" in _error(tmp_path, GOOD.replace("version: 1\n", ""))


def test_unknown_target(tmp_path):
    msg = _error(tmp_path, GOOD.replace("target: cpu", "target: tvm-cpux"))
    assert ":2: unknown target 'tvm-cpux'" in msg and "did you mean 'tvm-cpu'" in msg


def test_target_profile_relative_to_file(tmp_path):
    (tmp_path / "dev.yaml").write_text("name: mydev\nbackend: tvm\ntvm_target: {kind: llvm}\n")
    spec = load_pipeline(_write(tmp_path, GOOD.replace("target: cpu", "target: dev.yaml")))
    assert spec.target == str(tmp_path / "dev.yaml")


def test_bad_fidelity_and_entries(tmp_path):
    assert "unknown fidelity bound 'min_cosin'" in _error(tmp_path, GOOD.replace("min_cosine", "min_cosin"))
    assert "a pass entry is one 'name: {options}' pair" in _error(
        tmp_path, GOOD.replace("  - dead_code_elimination", "  - dead_code_elimination:\n    max_bytes: 3"))
    assert "duplicate key 'target'" in _error(tmp_path, GOOD.replace("target: cpu", "target: cpu\ntarget: cpu"))
    assert "'model' expects 'path/to/file.py:function'" in _error(tmp_path, GOOD.replace("models.py:build", "x"))
    assert "pipeline is empty" in _error(tmp_path, "# nothing\n")


def test_holdout_key(tmp_path):
    spec = load_pipeline(_write(tmp_path, GOOD.replace("export:", "holdout: models.py:heldout\nexport:")))
    assert spec.holdout == "models.py:heldout" and load_pipeline(_write(tmp_path, GOOD)).holdout is None
    assert "'holdout' expects 'path/to/file.py:function'" in _error(
        tmp_path, GOOD.replace("export:", "holdout: heldout\nexport:"))


def test_missing_file():
    with pytest.raises(PipelineError, match="does not exist"):
        load_pipeline("/no/such/pipeline.yaml")


def test_python_list_forms():
    passes = build_passes(["dead_code_elimination", {"constant_folding": {"max_bytes": 5}},
                           ("constant_folding", {}), EliminateDeadCode(), PassSpec("constant_folding", {})])
    assert [p.name for p in passes] == ["dead_code_elimination", "constant_folding", "constant_folding",
                                        "dead_code_elimination", "constant_folding"]
    assert passes[1].options.max_bytes == 5
    with pytest.raises(PipelineError, match=r"^passes\[1\]: pass 'constant_folding': unknown option 'max'"):
        build_passes(["dead_code_elimination", {"constant_folding": {"max": 5}}])
    with pytest.raises(PipelineError, match=r"passes\[0\]: a pass entry is a name"):
        build_passes([3])
    with pytest.raises(PipelineError, match="a pipeline is a YAML path or a list"):
        build_passes({"constant_folding": {}})


def test_parse_mapping_directly():
    spec = parse_pipeline({"version": 1, "passes": ["constant_folding"]}, source="<inline>")
    assert spec.passes[0].where == "<inline>: passes[0]" and spec.path is None
    with pytest.raises(PipelineError, match=r"^<inline>: unknown key"):
        parse_pipeline({"version": 1, "pass": []}, source="<inline>")


def test_resolve_ref(tmp_path):
    (tmp_path / "helper.py").write_text("VALUE = 41\n")
    (tmp_path / "models.py").write_text("import helper\n\ndef build():\n    return helper.VALUE + 1\n")
    assert resolve_ref("models.py:build", str(tmp_path))() == 42
    with pytest.raises(PipelineError, match="has no function 'buld'; did you mean 'build'"):
        resolve_ref("models.py:buld", str(tmp_path))
    with pytest.raises(PipelineError, match="does not exist"):
        resolve_ref("nope.py:build", str(tmp_path))
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(PipelineError, match="importing .*broken.py failed: RuntimeError: boom"):
        resolve_ref("broken.py:build", str(tmp_path))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "examples",
                                                               "pipelines", "*.yaml"))))
def test_every_shipped_pipeline_file_parses(path):
    spec = load_pipeline(path)
    passes = build_passes(spec)
    assert spec.model and spec.example_inputs and passes


def test_pipeline_with_options_changes_one_pass_and_runs_from_anywhere(tmp_path):
    """pared.testing.pipeline_with_options: the named passes' options merged (a bare name too),
    the references absolute, the copy a valid pipeline; an unknown pass is refused."""
    from pared.testing import pipeline_with_options
    pipelines = os.path.join(EXAMPLES_DIR, "pipelines")
    out = pipeline_with_options(os.path.join(pipelines, "vla_composed.yaml"), {"token_reuse": {"levels": [32]}},
                                str(tmp_path / "a" / "vla.yaml"))
    spec = load_pipeline(out)
    opts = {p.name: dict(p.options) for p in spec.passes}
    assert opts["token_reuse"]["levels"] == [32] and opts["token_reuse"]["patch"] == 8       # merged, not replaced
    assert opts["action_cache"] == {"schedule": "bac", "updates": 4}                         # the others as they were
    assert spec.model == os.path.join(EXAMPLES_DIR, "vla_metaworld", "decoder.py") + ":build_denoiser_64"
    out = pipeline_with_options(os.path.join(pipelines, "video_ar.yaml"),
                                {"softmax_guard_elimination": {}, "kv_drop": {"share": 0.25}}, str(tmp_path / "v.yaml"))
    spec = load_pipeline(out)
    assert [p.name for p in spec.passes][0] == "softmax_guard_elimination"
    assert {p.name: dict(p.options) for p in spec.passes}["kv_drop"] == {"share": 0.25}
    with pytest.raises(ValueError, match="has no pass 'kv_policy'"):
        pipeline_with_options(os.path.join(pipelines, "vla_composed.yaml"), {"kv_policy": {}}, str(tmp_path / "x.yaml"))

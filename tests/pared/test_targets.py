import pytest

from pared.ir.errors import TargetError
from pared.targets import Target, get_target


def test_named_targets():
    assert get_target("cpu").backend == "onnxruntime" and get_target("cpu").provider == "CPUExecutionProvider"
    assert get_target("tvm-cpu").tvm_target == {"kind": "llvm"}
    a64 = get_target("tvm-aarch64")
    assert a64.is_cross and a64.tvm_target["mtriple"] == "aarch64-linux-gnu"
    assert get_target("cuda").provider == "CUDAExecutionProvider"
    assert Target.from_json(get_target("cpu").to_json()) == get_target("cpu")


def test_ort_disabled_optimizers():
    assert get_target("cpu").ort_disabled_optimizers == ("SkipLayerNormFusion",)
    assert get_target("cuda").ort_disabled_optimizers == ()
    t = Target.from_json({"name": "x", "backend": "onnxruntime", "provider": "CPUExecutionProvider",
                          "ort_disabled_optimizers": ["GeluFusion"]})
    assert t.ort_disabled_optimizers == ("GeluFusion",) and t.to_json()["ort_disabled_optimizers"] == ["GeluFusion"]
    assert Target.from_json(t.to_json()) == t
    for bad in ("SkipLayerNormFusion", [""], [3]):
        with pytest.raises(TargetError, match="ort_disabled_optimizers must be a list of ONNX Runtime optimizer"):
            Target("x", "onnxruntime", provider="CPUExecutionProvider", ort_disabled_optimizers=bad)


def test_unknown_target_lists_known_ones():
    with pytest.raises(TargetError, match="unknown target 'tvm_cpu'; did you mean 'tvm-cpu'.*known targets: cpu, tvm-cpu"):
        get_target("tvm_cpu")


def test_device_profile(tmp_path):
    p = tmp_path / "orin.yaml"
    p.write_text("name: orin\nbackend: tvm\ntvm_target: {kind: llvm, mtriple: aarch64-linux-gnu, mcpu: cortex-a78}\n"
                 "precisions: [fp32, int8]\npeak_flops: 2.0e+11\nmem_bandwidth: 1.0e+11\nthreads: 8\n")
    t = get_target(str(p))
    assert t.name == "orin" and t.threads == 8 and t.precisions == ("fp32", "int8") and t.is_cross


@pytest.mark.parametrize("text,msg", [
    ("name: x\nbackend: tvm\n", "needs 'tvm_target'"),
    ("name: x\nbackend: onnx\nprovider: CPUExecutionProvider\n", "backend must be one of"),
    ("name: x\nbackend: onnxruntime\nprovidr: CPUExecutionProvider\n", "unknown field 'providr'; did you mean 'provider'"),
    ("name: x\nbackend: tvm\ntvm_target: llvm -mcpu=skylake\n", "dict form|mapping"),
    ("- a\n- b\n", "expected a mapping"),
    ("name: [x\n", "not valid YAML"),
])
def test_bad_profiles(tmp_path, text, msg):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(TargetError, match=msg):
        get_target(str(p))


def test_missing_profile():
    with pytest.raises(TargetError, match="does not exist"):
        get_target("/nonexistent/device.yaml")


def test_openvino_target_lowers_here_and_names_its_package(tmp_path):
    """openvino-cpu lowers on any machine (the export check runs on ORT's CPU
    provider); running it needs onnxruntime-openvino, and a machine without it
    is told so."""
    import numpy as np
    import onnxruntime
    import torch
    import pared
    from pared.ir.errors import ArtifactError
    from pared.testing import tiny_transformer
    m, inputs = tiny_transformer()
    assert get_target("openvino-cpu").provider == "OpenVINOExecutionProvider"
    path = pared.optimize(m, inputs, target="openvino-cpu", bench_repeats=0).save(str(tmp_path / "ov"))
    if "OpenVINOExecutionProvider" in onnxruntime.get_available_providers():
        with torch.no_grad():
            want = m(*inputs)["logits"].numpy()
        got = pared.load(path)(*[i.numpy() for i in inputs])["logits"]
        np.testing.assert_allclose(got, want, atol=1e-4)
    else:
        with pytest.raises(ArtifactError, match="needs OpenVINOExecutionProvider.*onnxruntime-openvino"):
            pared.load(path)

"""Cross targets for real: a `tvm-aarch64` artifact, linked by Debian's aarch64-linux-gnu-gcc, run
by pared's own (torch-free) Executor in an aarch64 Python under qemu-aarch64 user emulation: it
computes what eager PyTorch does on this host. Correctness, not speed (emulation is ~10-50x slower).
`make test-heavy` runs it; `make test` and `make test-heavy` prepare the emulation where they run as
root (`make cross`); elsewhere this skips,
saying what is missing."""
import json
import os

import numpy as np
import pytest
import torch

import pared
from pared.testing import aarch64_missing, run_aarch64_python, skip_or_fail_if_missing, tiny_transformer


@pytest.mark.heavy
def test_cross_built_artifact_runs_under_qemu_aarch64_as_eager_computes(tmp_path):
    skip_or_fail_if_missing(aarch64_missing(), "running a tvm-aarch64 artifact", "PARED_REQUIRE_AARCH64")
    m, (x,) = tiny_transformer()
    opt = pared.optimize(m, (x,), target="tvm-aarch64", bench_repeats=0)
    art = opt.save(str(tmp_path / "a64"))
    with open(os.path.join(art, "manifest.json")) as f:
        entry = json.load(f)["graphs"]["main"]
    assert entry["linked"] is True and entry["file"] == "main.so"
    assert entry["check"]["elf_objects"] and entry["check"]["triple"].startswith("aarch64")
    torch.manual_seed(7)
    inputs = [x] + [torch.randint(0, 50, tuple(x.shape)) for _ in range(2)]
    np.save(tmp_path / "in.npy", np.stack([i.numpy() for i in inputs]))
    out = run_aarch64_python(f"""
        import platform, warnings
        import numpy as np
        import pared
        assert platform.machine() == "aarch64", platform.machine()
        warnings.simplefilter("ignore")
        ex = pared.load({art!r})
        xs = np.load({str(tmp_path / "in.npy")!r})
        outs = [ex(x) for x in xs]
        outs = [o["logits"] if isinstance(o, dict) else o for o in outs]
        np.save({str(tmp_path / "out.npy")!r}, np.stack(outs))
        print("ran on", platform.machine())
    """)
    assert "ran on aarch64" in out
    got = np.load(tmp_path / "out.npy")
    for i, x_i in enumerate(inputs):
        with torch.no_grad():
            want = m(x_i)
        want = (want["logits"] if isinstance(want, dict) else want).numpy()
        assert np.linalg.norm(got[i] - want) / np.linalg.norm(want) < 1e-4

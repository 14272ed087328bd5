"""`make demo`: optimize all-MiniLM-L6-v2 (real weights) for ONNX Runtime, save the
artifact, load it in a torch-free process, and print fidelity and speed.

Fidelity: cosine of each sentence embedding vs. eager fp32 PyTorch, and whether
the nearest neighbour of every held-out sentence is the same. Speed: eager
PyTorch vs. the artifact, measured alternately in one process (median).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "minilm"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pared  # noqa: E402
from model import HELD_OUT, SENTENCES, build_model, tokenize  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

TORCH_FREE = r"""
import sys, json, numpy as np
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch blocked")
sys.meta_path.insert(0, _NoTorch())
import pared
ex = pared.load(sys.argv[1])
data = np.load(sys.argv[2])
emb = ex(data["ids"], attention_mask=data["mask"])
np.save(sys.argv[3], emb)
print(json.dumps({"torch_imported": "torch" in sys.modules}))
"""


def main() -> None:
    console = Console()
    torch.manual_seed(0)
    model = build_model()
    ids, mask = tokenize(SENTENCES)
    with console.status("optimizing all-MiniLM-L6-v2 for target 'cpu'") as status:
        opt = pared.optimize(model, (ids,), kwargs={"attention_mask": mask},
                             pipeline=os.path.join(HERE, "pipelines", "minilm.yaml"),
                             calibration=[tokenize(HELD_OUT)], bench_repeats=20,
                             progress=lambda m: status.update(m))
    out_dir = os.path.join(HERE, "..", "artifacts", "minilm")
    path = opt.save(out_dir)

    # held-out sentences through the artifact, in a process where torch cannot be imported
    hid, hmask = tokenize(HELD_OUT)
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(os.path.join(tmp, "in.npz"), ids=hid.numpy(), mask=hmask.numpy())
        res = subprocess.run([sys.executable, "-c", TORCH_FREE, path, os.path.join(tmp, "in.npz"),
                              os.path.join(tmp, "emb.npy")], capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"torch-free run failed:\n{res.stderr}")
        info = json.loads(res.stdout.strip().splitlines()[-1])
        got = np.load(os.path.join(tmp, "emb.npy"))
    with torch.no_grad():
        ref = model(hid, hmask).numpy()
        ref_corpus = model(ids, mask).numpy()
    cos = np.sum(ref * got, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    nn_ref = np.argmax(ref @ ref_corpus.T, axis=1)
    nn_got = np.argmax(got @ ref_corpus.T, axis=1)

    s = opt.report["speed"]
    f = opt.report["fidelity"]
    t = Table(title="pared demo: all-MiniLM-L6-v2 (real weights) -> ONNX Runtime, CPU", show_header=False)
    t.add_row("artifact", os.path.relpath(path))
    t.add_row("passes", ", ".join(p["name"] for p in opt.report["passes"]))
    t.add_row("check at optimize time", f"cosine min {f['cosine_min']:.6f}, rel L2 max {f['rel_l2_max']:.2e} "
                                        f"({f['checked_inputs']} input sets)")
    t.add_row("held-out, torch-free process", f"embedding cosine min {cos.min():.6f} mean {cos.mean():.6f}; "
                                              f"nearest neighbour agrees {int((nn_ref == nn_got).sum())}/{len(cos)}; "
                                              f"torch imported: {info['torch_imported']}")
    t.add_row("speed (batch 8, seq 32)", f"eager PyTorch {s['eager_ms']:.2f} ms, artifact {s['artifact_ms']:.2f} ms "
                                         f"-> {s['speedup_vs_eager']:.2f}x (median of {s['repeats']}, alternating)")
    console.print(t)


if __name__ == "__main__":
    main()

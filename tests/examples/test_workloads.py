"""Every shipped checkpoint loads and reaches its quality figure on a subset, so a
broken checkpoint cannot land; the data split and the workload registry."""
import os

import numpy as np
import pytest

from pared.workloads.data import mnist
from pared.ir.errors import OptionError
from pared.workloads import EXAMPLES, DiTWorkload, example_module, get_workload, psnr_db, torch_callable


def test_mnist_split_is_deterministic_and_balanced():
    xtr, ytr = mnist("train", 16)
    xte, yte = mnist("test", 28)
    assert xtr.shape == (4500, 1, 16, 16) and xte.shape == (500, 1, 28, 28)
    assert xtr.dtype == np.float32 and 0 <= xtr.min() and xtr.max() <= 1
    assert np.bincount(yte).tolist() == [50] * 10 and np.bincount(ytr).tolist() == [450] * 10
    again, _ = mnist("train", 16)
    np.testing.assert_array_equal(xtr, again)
    # area resize keeps the mean intensity of each digit
    full, _ = mnist("train", 28)
    np.testing.assert_allclose(xtr.mean(axis=(1, 2, 3)), full.mean(axis=(1, 2, 3)), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="split"):
        mnist("val")


def test_judge_checkpoint_scores_held_out_digits():
    judge = example_module("judge")
    x, y = mnist("test", 16)
    s = judge.score(x, y)
    assert s["n"] == 500 and s["accuracy"] >= 0.97
    # it tells a wrong label apart
    assert judge.score(x, (y + 1) % 10)["accuracy"] < 0.05
    with pytest.raises(ValueError, match="16, 16"):
        judge.score(np.zeros((2, 1, 28, 28), np.float32), [0, 1])


def test_vit_checkpoint_accuracy():
    wl = get_workload("vit_mnist")
    logits = wl.run(torch_callable(wl.build()))
    assert logits.shape == (500, 10)
    accuracy = float(np.mean(np.argmax(logits, -1) == wl.y))
    assert accuracy >= 0.97
    # fidelity against a candidate whose first 50 rows predict another class (argmin, not argmax)
    other = logits.copy()
    other[:50] = -other[:50]
    f = wl.fidelity(logits, other)
    assert f["top1_agreement"] == 0.9 and f["accuracy_reference"] == accuracy
    assert f["accuracy"] == float(np.mean(np.argmax(other, -1) == wl.y)) < accuracy


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dit_mnist", "dit_moe_mnist"])
def test_dit_checkpoints_draw_the_requested_digits(name):
    # 20 samples (two per class) at DDIM-25: the full 200 x DDIM-50 figure is in the closing
    # note and the bench JSON; this catches a broken or untrained checkpoint.
    wl = DiTWorkload(name, batch=10, samples=20, steps=25, cfg_scale=1.5)
    imgs = wl.run(torch_callable(wl.build()))
    assert imgs.shape == (20, 1, 16, 16)
    accuracy = wl.judge(imgs)["accuracy"]
    assert accuracy >= 0.8
    # fidelity against the same samples shifted by one: each image is judged against its
    # neighbour's label, and the PSNR is that of the two pixel sets
    shifted = np.roll(imgs, 1, axis=0)
    f = wl.fidelity(imgs, shifted)
    assert f["judge_acc_reference"] == accuracy
    # an image the judge reads as its own class is not read as its neighbour's: the two add to <= 1
    assert f["judge_acc_optimized"] <= 1 - accuracy + 1e-9
    assert f["psnr_db"] == pytest.approx(psnr_db(wl.to_pixels(imgs), wl.to_pixels(shifted))) and f["psnr_db"] < 30


@pytest.mark.slow
def test_minilm_embeddings_rank_paraphrases_first():
    wl = get_workload("minilm", sentences=64)
    emb = wl.run(torch_callable(wl.build()))
    assert emb.shape == (64, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    s = emb @ emb.T
    # corpus lines 0 and 1 are both about eating a meal; 0 and 26 (the dog and the ball) are not
    assert s[0, 1] > s[0, 26] + 0.2
    f = wl.fidelity(emb, emb + 1e-3 * np.random.default_rng(0).standard_normal(emb.shape).astype(np.float32))
    assert f["cosine_min"] > 0.99 and f["rank_agreement"] >= 0.9


def test_corpus_is_large_and_unique():
    with open(os.path.join(EXAMPLES, "minilm", "corpus.txt"), encoding="utf-8") as f:
        lines = [s.strip() for s in f if s.strip()]
    assert len(lines) >= 200 and len(set(lines)) == len(lines)


def test_registry_errors_and_psnr():
    with pytest.raises(OptionError, match="did you mean 'dit_mnist'"):
        get_workload("dit_mnst")
    with pytest.raises(ValueError, match="multiple of batch"):
        get_workload("dit_mnist", samples=15, batch=10)
    a = np.zeros((2, 2))
    assert psnr_db(a, a) == 200.0
    assert psnr_db(a, a + 0.1) == pytest.approx(20.0)

"""workloads/training.py: what the example training scripts share."""
import json

import torch

from pared.workloads.training import Progress, atomic_save, ema_update, load_init, start, write_train_log


def test_a_checkpoint_round_trips_with_its_metadata_and_continues_training(tmp_path):
    model = torch.nn.Linear(4, 3)
    path = str(tmp_path / "w.safetensors")
    atomic_save(model.state_dict(), path, {"step": 7, "loss": 0.5})
    assert not (tmp_path / "w.safetensors.tmp").exists()
    other = torch.nn.Linear(4, 3)
    assert load_init(other, path) == {"step": "7", "loss": "0.5"}
    assert torch.equal(other.weight, model.weight) and torch.equal(other.bias, model.bias)
    assert load_init(other, None) is None


def test_the_log_of_a_continued_run_keeps_the_runs_before_it(tmp_path):
    log = str(tmp_path / "train_log.json")
    write_train_log(log, {"step": 10}, [{"step": 10, "loss": 1.0}], continued=False)
    write_train_log(log, {"step": 5}, [{"step": 5, "loss": 0.5}], continued=True)
    write_train_log(log, {"step": 3}, [], continued=True)
    d = json.load(open(log))
    assert d["meta"] == {"step": 3}
    assert [seg["meta"]["step"] for seg in d["earlier_segments"]] == [10, 5]
    write_train_log(log, {"step": 1}, [], continued=False)            # a fresh run starts a new chain
    assert json.load(open(log))["earlier_segments"] == []


def test_ema_warms_up_then_follows_the_decay_and_copies_integer_buffers():
    model = torch.nn.BatchNorm1d(2)
    ema, opt, n = start(model, 1e-3)
    assert n == 4 and model.training and opt.param_groups[0]["weight_decay"] == 0.0
    with torch.no_grad():
        model.weight.fill_(2.0)
    model.num_batches_tracked.fill_(5)
    before = ema["weight"].clone()
    ema_update(ema, model, step=0, decay=0.999)                       # d = min(0.999, 1 / 10)
    assert torch.allclose(ema["weight"], 0.1 * before + 0.9 * 2.0)
    assert int(ema["num_batches_tracked"]) == 5
    w = ema["weight"].clone()
    ema_update(ema, model, step=10_000, decay=0.5)                     # the decay caps the warm-up
    assert torch.allclose(ema["weight"], 0.5 * w + 0.5 * 2.0)


def test_progress_logs_every_n_steps_with_a_running_average(tmp_path, capsys):
    p = Progress(str(tmp_path / "w.safetensors"), every=2, smoothing=0.5, save_every_min=1e9)
    for step, loss in ((1, 4.0), (2, 2.0), (3, 2.0), (4, 0.0)):
        p.after(step, loss, 60.0 * step, {})
    assert [e["step"] for e in p.log] == [1, 2, 4]
    assert p.log[0]["loss"] == 4.0 and p.log[1]["loss"] == 3.0 and p.loss == 1.25
    assert "step      4" in capsys.readouterr().out

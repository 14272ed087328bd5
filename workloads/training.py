"""What the example training scripts share: checkpoints written atomically as
safetensors (no pickle) and a training log that keeps the chain of runs a
checkpoint was continued from."""
from __future__ import annotations

import json
import os
from typing import Any


def atomic_save(state: dict, path: str, meta: dict) -> None:
    """Write the tensors of `state` to `path` as safetensors, `meta` (stringified) as its
    metadata, through a temporary file and a rename."""
    from safetensors.torch import save_file
    tmp = path + ".tmp"
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, tmp,
              metadata={k: str(v) for k, v in meta.items()})
    os.replace(tmp, path)


def read_meta(path: str) -> dict:
    """The metadata of the safetensors file at `path` (what atomic_save wrote: the training run)."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return dict(f.metadata() or {})


def load_init(model, path: str | None) -> dict | None:
    """Load the weights at `path` (safetensors) into `model` to continue training from them;
    their metadata (the run that wrote them), or None without a path."""
    if not path:
        return None
    from safetensors.torch import load_file
    model.load_state_dict(load_file(path))
    return read_meta(path)


def start(model, lr: float):
    """Train mode, the EMA copy of the weights, AdamW at `lr` (no weight decay), the parameter count."""
    import torch
    model.train()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    return ema, opt, sum(p.numel() for p in model.parameters())


def write_train_log(log_path: str, meta: dict, log: list, continued: bool) -> None:
    """Write `{meta, log, earlier_segments}` to `log_path`; when this run `continued` an earlier
    one, the log already there becomes the last of its earlier segments."""
    earlier: list[Any] = []
    if continued and os.path.exists(log_path):
        with open(log_path) as f:
            old = json.load(f)
        earlier = old.get("earlier_segments", []) + [{"meta": old.get("meta"), "log": old.get("log")}]
    tmp = log_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "log": log, "earlier_segments": earlier}, f, indent=1)
    os.replace(tmp, log_path)


def optimizer_step(opt, model, loss) -> None:
    """One update: backward, gradient norm clipped to 1, step."""
    import torch
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def ema_update(ema: dict, model, step: int, decay: float) -> None:
    """Move the EMA weights `ema` towards the model's, with the decay warmed up over the first
    steps (min(decay, (1 + step) / (10 + step))); non-float buffers are copied."""
    import torch
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                ema[k].copy_(v)


class Progress:
    """The running loss (an exponential average with weight `smoothing` on each new value), a log
    entry and a printed line every `every` steps (and after the first), and the EMA weights saved
    to `out_path` every `save_every_min` minutes (with `meta` in their metadata: what loading
    them needs, such as an architecture option)."""

    def __init__(self, out_path: str, every: int, smoothing: float, save_every_min: float,
                 meta: dict | None = None):
        import time
        self.out_path, self.every, self.smoothing, self.save_every_min = out_path, every, smoothing, save_every_min
        self.meta = dict(meta or {})
        self.loss: float | None = None
        self.log: list[dict] = []
        self.last_save = time.time()

    def after(self, step: int, loss: float, elapsed: float, ema: dict) -> None:
        """Account for finished step `step` (1-based) with loss `loss`, `elapsed` seconds in."""
        import time
        self.loss = loss if self.loss is None else (1 - self.smoothing) * self.loss + self.smoothing * loss
        if step % self.every == 0 or step == 1:
            self.log.append({"step": step, "minutes": round(elapsed / 60, 2), "loss": round(self.loss, 5)})
            print(f"step {step:6d}  {elapsed / 60:6.1f} min  loss {self.loss:.4f}", flush=True)
        if time.time() - self.last_save > self.save_every_min * 60:
            atomic_save(ema, self.out_path, {**self.meta, "step": step, "minutes": round(elapsed / 60, 1)})
            self.last_save = time.time()

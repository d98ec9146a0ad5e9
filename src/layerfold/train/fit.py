"""A small, general training loop: AdamW, warmup + cosine schedule, clipping, best-state keeping.

The loop knows nothing about what is trained: the caller gives the parameters, a function
that returns the loss of one batch, a function that returns the validation loss, and the
batches. It logs one JSON object per line (steps and evaluations) so a run can be read back.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn


@dataclass
class TrainConfig:
    """Optimiser and schedule. Defaults are LLM-Streamline's official ones."""

    lr: float = 2e-4
    min_lr: float = 5e-5  # the cosine schedule ends here
    weight_decay: float = 1e-3
    warmup: float = 0.03  # fraction of the steps spent warming up linearly from 0
    grad_clip: float = 5.0
    eval_every: int = 0  # steps between validations; 0: about ten per run
    log_every: int = 10


@dataclass
class FitResult:
    steps: int
    best_val: float
    best_step: int
    first_val: float
    seconds: float
    history: list[dict] = field(default_factory=list)


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step``: linear warmup, then cosine down to ``min_lr``."""
    warm = max(1, round(cfg.warmup * total)) if cfg.warmup > 0 else 0
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def fit(
    module: nn.Module,
    train_loss: Callable[[object], torch.Tensor],
    val_loss: Callable[[], float],
    batches: Iterable,
    total_steps: int,
    cfg: TrainConfig,
    *,
    log_path: Path | None = None,
    progress: bool = True,
    desc: str = "training",
    best_state_dir: Path | None = None,
) -> FitResult:
    """Train the parameters of ``module`` that require grad; restore the best validation state.

    ``batches`` yields ``total_steps`` batches; ``train_loss(batch)`` returns a scalar loss.
    The best state is kept in memory, or on disk in ``best_state_dir`` (a layer of a big
    model is as large as its optimiser's moments: no need to hold one more copy).
    """
    from tqdm.auto import tqdm

    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]  # norms and biases are not decayed
    # foreach=False: the multi-tensor update allocates temporaries as large as the parameters,
    # which for one big layer of a streamed model is a peak worth avoiding (speed is the same)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, foreach=False,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, cfg))
    eval_every = cfg.eval_every or max(1, total_steps // 10)
    log = open(log_path, "a", encoding="utf-8") if log_path else None

    def record(entry: dict) -> None:
        history.append(entry)
        if log:
            log.write(json.dumps(entry) + "\n")
            log.flush()

    history: list[dict] = []
    t0 = time.perf_counter()
    if log:
        record({"event": "config", **asdict(cfg), "total_steps": total_steps,
                "trainable_parameters": sum(p.numel() for p in params)})
    was_training = module.training
    module.eval()
    first_val = best_val = val_loss()
    best = _BestState(module, best_state_dir)
    best_step = 0
    record({"event": "val", "step": 0, "val_loss": first_val, "seconds": 0.0})
    module.train()
    bar = tqdm(total=total_steps, desc=desc, unit="step", disable=not progress)
    step = 0
    try:
        for batch in batches:
            if step >= total_steps:
                break
            loss = train_loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)  # no gradients held through validation and saving the best state
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4g}", best_val=f"{best_val:.4g}")
            if step % cfg.log_every == 0 or step == total_steps:
                record({"event": "step", "step": step, "loss": loss.item(), "grad_norm": float(grad_norm),
                        "lr": sched.get_last_lr()[0], "seconds": time.perf_counter() - t0})
            if step % eval_every == 0 or step == total_steps:
                module.eval()
                v = val_loss()
                module.train()
                if v < best_val:
                    best_val, best_step = v, step
                    best.keep()
                record({"event": "val", "step": step, "val_loss": v, "best_val": best_val,
                        "seconds": time.perf_counter() - t0})
    finally:
        bar.close()
        opt.state.clear()  # the moments go before the best state comes back: one layer's peak less
        for p in params:
            p.grad = None
        best.restore()
        module.train(was_training)
        seconds = time.perf_counter() - t0
        if log:
            record({"event": "done", "steps": step, "best_step": best_step, "best_val": best_val,
                    "first_val": first_val, "seconds": seconds})
            log.close()
    return FitResult(step, best_val, best_step, first_val, seconds, history)


class _BestState:
    """A copy of ``module``'s weights, in memory or in a file (``torch.save``, read back memory-mapped)."""

    def __init__(self, module, folder: Path | None):
        self.module = module
        self.path = Path(folder) / "best_state.pt" if folder is not None else None
        self.state = None
        self.keep()

    def keep(self) -> None:
        if self.path is None:
            self.state = copy.deepcopy(self.module.state_dict())
            return
        # torch.save writes tensor by tensor (safetensors' save_file first builds the whole file
        # in memory: one more copy of the layer at the peak of training)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)

    def restore(self) -> None:
        if self.path is None:
            self.module.load_state_dict(self.state)
            return
        # memory-mapped: the values are copied into the module's tensors straight from the file
        self.module.load_state_dict(torch.load(self.path, mmap=True, weights_only=True))
        self.path.unlink(missing_ok=True)

"""The one training loop of layerfold: healing, FoldGPT's cure, LLM-Streamline's LM variant.

``train(student, data, config, losses, teacher=..., trainable=...)`` runs AdamW with a
warmup + cosine schedule over fixed-length token rows, with gradient accumulation, optional
bf16 autocast, gradient clipping, progress (loss, tokens/s, ETA), a JSON-lines log, and
checkpoints that make ``resume=True`` continue a killed run to exactly the result of an
uninterrupted one.

Why resuming is exact: the batch of micro-step ``m`` is a pure function of ``m`` and the
seed (rows are read in a seeded permutation per pass over the data), checkpoints are taken
only at optimizer-step boundaries, and a checkpoint holds everything else that changes: the
trainable tensors, the optimizer and scheduler state, the RNG state and the history.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import LayerfoldError
from ..models.loading import input_device
from .capture import layer_outputs, model_layers
from .losses import Loss, LossInputs
from .teacher import OnTheFlyTeacher, TeacherCache

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainConfig:
    """How to train. Every field that changes the result is part of the resume fingerprint."""

    steps: int = 100  # optimizer steps (see ``steps_for_tokens``)
    batch_size: int = 8  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"  # "fp32", or "bf16" autocast (trainable weights stay in their dtype)
    seed: int = 0
    # bookkeeping (not part of the fingerprint)
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: none
    resume: bool = False
    log_file: str | None = None
    eval_every: int = 0  # optimizer steps between calls of ``eval_fn``; 0: only at the end
    progress: bool = True
    desc: str = "training"

    _BOOKKEEPING = ("checkpoint_dir", "checkpoint_every", "resume", "log_file", "eval_every", "progress", "desc")

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise LayerfoldError(f"training {name.replace('_', ' ')} must be at least 1 (got {getattr(self, name)})")
        if not self.lr > 0:
            raise LayerfoldError(f"learning rate must be positive (got {self.lr})")
        if self.precision not in ("fp32", "bf16"):
            raise LayerfoldError(f"precision must be fp32 or bf16 (got {self.precision!r})")
        if self.resume and not self.checkpoint_dir:
            raise LayerfoldError("resuming needs a checkpoint folder")

    def tokens_per_step(self, seq_len: int) -> int:
        return self.batch_size * self.grad_accum * seq_len

    def result_fields(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self._BOOKKEEPING}


def steps_for_tokens(tokens: int, batch_size: int, grad_accum: int, seq_len: int) -> int:
    """Optimizer steps that consume at least ``tokens`` tokens."""
    return max(1, math.ceil(tokens / (batch_size * grad_accum * seq_len)))


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float  # wall time of this process's share (a resumed run counts only its part)
    loss: float  # total loss of the last step
    history: list[dict] = field(default_factory=list)  # one record per optimizer step (+ evals)
    resumed_from: int | None = None  # the step a resumed run started at
    trainable_parameters: int = 0


Trainable = Callable[[str, nn.Parameter], bool] | Iterable[str] | None


def select_trainable(model: nn.Module, trainable: Trainable) -> list[tuple[str, nn.Parameter]]:
    """Set ``requires_grad`` by ``trainable`` (a predicate on (name, parameter), a collection of
    names, or None to keep the model's own flags); return the trainable (name, parameter) pairs."""
    named = list(model.named_parameters())
    if trainable is not None:
        if callable(trainable):
            pick = {n for n, p in named if trainable(n, p)}
        else:
            pick = set(trainable)
            unknown = pick - {n for n, _ in named}
            if unknown:
                raise LayerfoldError(f"no such parameters: {', '.join(sorted(unknown)[:5])}")
        for n, p in named:
            p.requires_grad_(n in pick)
    chosen = [(n, p) for n, p in named if p.requires_grad]
    if not chosen:
        raise LayerfoldError("nothing to train: no parameter is trainable")
    offloaded = [n for n, p in chosen if p.device.type == "meta"]
    if offloaded:
        # accelerate reloads offloaded weights from their store on every call: updates would be lost
        raise LayerfoldError(
            f"cannot train offloaded weights ({offloaded[0]}{' and others' if len(offloaded) > 1 else ''}); "
            "train LoRA adapters instead (--heal-train lora) or give the device map more memory (--device-memory)")
    return chosen


class _Rows:
    """Rows of micro-batch ``m``: a stream of seeded permutations of the data, one per pass."""

    def __init__(self, n_rows: int, batch_size: int, seed: int):
        self.n, self.b, self.seed = n_rows, batch_size, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def __call__(self, m: int) -> list[int]:
        return [self._perm(p // self.n)[p % self.n] for p in range(m * self.b, (m + 1) * self.b)]


def _schedule(config: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        span = max(1, config.steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _fingerprint(config, data, losses, names, teacher) -> str:
    blob = json.dumps(
        [config.result_fields(), list(data.shape), hashlib.sha256(data.cpu().numpy().tobytes()).hexdigest(),
         [l.describe() for l in losses], names, teacher is not None],
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train(
    student: nn.Module,
    data: torch.Tensor,
    config: TrainConfig,
    losses: list[Loss],
    *,
    teacher: nn.Module | OnTheFlyTeacher | TeacherCache | None = None,
    trainable: Trainable = None,
    arch=None,
    eval_fn: Callable[[nn.Module], dict] | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Train ``student`` on the token rows ``data`` [N, T] to minimise sum(weight * loss).

    ``teacher`` is a model (run on the fly), an :class:`OnTheFlyTeacher`, a
    :class:`TeacherCache` built on the same ``data``, or None. ``trainable`` picks the
    parameters (see :func:`select_trainable`). ``eval_fn(model) -> dict`` is called every
    ``config.eval_every`` steps and at the end (in eval mode, without gradients); its
    numbers join the history. ``on_step(step, record)`` runs after each optimizer step.
    """
    config.validate()
    if not losses:
        raise LayerfoldError("no loss to train on")
    if data.dim() != 2 or data.shape[0] < 1 or data.shape[1] < 2:
        raise LayerfoldError(f"training data must be [rows, seq_len >= 2] token ids (got {tuple(data.shape)})")
    if isinstance(teacher, nn.Module):
        teacher = OnTheFlyTeacher(teacher, arch)
    if teacher is None and any(l.needs_teacher_logits or l.teacher_layers(1) for l in losses):
        raise LayerfoldError(f"losses {[l.name for l in losses]} need a teacher")
    if isinstance(teacher, TeacherCache) and teacher.meta["rows"] != data.shape[0]:
        raise LayerfoldError("the teacher cache was built on different data")

    layers = model_layers(student, arch)
    n_layers = len(layers)
    student_layers = set().union(*(l.student_layers(n_layers) for l in losses))
    teacher_layers = set().union(*(l.teacher_layers(teacher.num_layers) for l in losses)) if teacher else set()
    need_logits = any(l.needs_teacher_logits for l in losses)
    temperature = next((getattr(l, "temperature") for l in losses if hasattr(l, "temperature")), 1.0)

    params = select_trainable(student, trainable)
    names = [n for n, _ in params]
    device = input_device(student)  # where the ids go; a device map moves them on from there
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    fingerprint = _fingerprint(config, data, losses, names, teacher)
    rows_of = _Rows(data.shape[0], config.batch_size, config.seed)
    seq_len = data.shape[1]

    torch.manual_seed(config.seed)
    start, history, resumed_from = 0, [], None
    ckpt_path = Path(config.checkpoint_dir) / CHECKPOINT_NAME if config.checkpoint_dir else None
    if config.resume and ckpt_path is not None and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        if state["fingerprint"] != fingerprint:
            raise LayerfoldError(
                f"{ckpt_path}: the checkpoint belongs to a different run (other settings, data or model); "
                "start without resuming or use another checkpoint folder"
            )
        with torch.no_grad():
            by_name = dict(params)
            for n, t in state["trainable"].items():
                by_name[n].copy_(t)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start = resumed_from = state["step"]
        history = json.loads(state["history"])
    if config.log_file:
        # the log always equals the history: a resumed run rewrites what the killed one logged
        _write_log(Path(config.log_file), history)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    student.train()
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=start, desc=config.desc, unit="step", disable=not config.progress)
    t0 = time.perf_counter()
    tokens_done_here = 0
    record: dict = history[-1] if history else {}
    try:
        for step in range(start, config.steps):
            t_step = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            terms: dict[str, float] = {l.name: 0.0 for l in losses}
            total_value = 0.0
            for a in range(config.grad_accum):
                rows = rows_of(step * config.grad_accum + a)
                ids = data[rows].to(device)
                with autocast:
                    t_out = teacher.outputs(ids, rows, teacher_layers, need_logits, temperature) if teacher else None
                    with layer_outputs(layers, student_layers) as hidden:
                        logits = student(input_ids=ids).logits
                x = LossInputs(input_ids=ids, logits=logits, hidden=hidden, num_layers=n_layers, teacher=t_out)
                total = None
                for loss in losses:
                    value = loss(x)
                    terms[loss.name] += value.item() / config.grad_accum
                    total = loss.weight * value if total is None else total + loss.weight * value
                if not torch.isfinite(total):
                    raise LayerfoldError(f"training diverged at step {step} (loss {total.item()}); lower the learning rate")
                (total / config.grad_accum).backward()
                total_value += total.item() / config.grad_accum
                del x, logits, hidden, t_out, total
            grad_norm = None
            if config.max_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in params], config.max_grad_norm))
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()

            tokens_done_here += config.tokens_per_step(seq_len)
            elapsed = time.perf_counter() - t0
            record = {
                "step": step + 1,
                "tokens": (step + 1) * config.tokens_per_step(seq_len),
                "loss": total_value,
                **{f"loss_{k}": v for k, v in terms.items()},
                "lr": lr,
                "grad_norm": grad_norm,
                "step_seconds": time.perf_counter() - t_step,
                "tokens_per_second": tokens_done_here / elapsed if elapsed > 0 else None,
            }
            last = step + 1 == config.steps
            if eval_fn is not None and (last or (config.eval_every and (step + 1) % config.eval_every == 0)):
                record["eval"] = _evaluate(student, eval_fn)
            history.append(record)
            if config.log_file:
                _append_log(Path(config.log_file), record)
            bar.set_postfix(loss=f"{total_value:.4f}", tok_s=f"{record['tokens_per_second']:.0f}")
            bar.update(1)
            if ckpt_path is not None and config.checkpoint_every and ((step + 1) % config.checkpoint_every == 0 or last):
                _save_checkpoint(ckpt_path, step + 1, params, optimizer, scheduler, history, fingerprint)
            if on_step is not None:
                on_step(step + 1, record)
    finally:
        bar.close()
        student.eval()
        for _, p in params:
            p.grad = None

    return TrainResult(
        steps=config.steps,
        tokens=config.steps * config.tokens_per_step(seq_len),
        seconds=time.perf_counter() - t0,
        loss=record.get("loss", float("nan")),
        history=history,
        resumed_from=resumed_from,
        trainable_parameters=sum(p.numel() for _, p in params),
    )


def _evaluate(model: nn.Module, eval_fn) -> dict:
    # an evaluation must not change the training's random stream, or resuming would differ
    rng = torch.get_rng_state()
    model.eval()
    try:
        with torch.no_grad():
            return eval_fn(model)
    finally:
        model.train()
        torch.set_rng_state(rng)


def _save_checkpoint(path: Path, step, params, optimizer, scheduler, history, fingerprint) -> None:
    state = {
        "step": step,
        "fingerprint": fingerprint,
        "trainable": {n: p.detach().clone() for n, p in params},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "history": json.dumps(history),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill during saving leaves the previous checkpoint intact


def _write_log(path: Path, history: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history), encoding="utf-8")
    os.replace(tmp, path)


def _append_log(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")

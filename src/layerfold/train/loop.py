"""The one training loop of layerfold: healing, FoldGPT's cure, LLM-Streamline's replacement.

``fit(model, objective, config, rows=...)`` minimises ``objective(rows)`` over the trainable
parameters of ``model`` with AdamW and transformers' warmup + cosine schedule, gradient
accumulation, optional bf16 autocast, gradient clipping, progress (loss, tokens/s, ETA), a
JSON-lines log, optional validation with best-state keeping, and checkpoints that make
``resume=True`` continue a killed run to exactly the result of an uninterrupted one.

What is trained on is the objective's business: :class:`Distillation` runs a whole model on
token rows and sums :mod:`~layerfold.train.losses` (next-token loss, KL to a teacher, hidden
MSE); LLM-Streamline's pair regression (``methods.streamline.PairRegression``) runs one layer
on cached (input, output) pairs. ``train(student, data, config, losses, teacher=...)`` is the
shorthand for the first.

Why resuming is exact: the rows of micro-step ``m`` are a pure function of ``m`` and the
seed (rows are read in a seeded permutation per pass over the data), checkpoints are taken
only at optimizer-step boundaries, and a checkpoint holds everything else that changes: the
trainable tensors, the optimizer and scheduler state, the RNG state, the history and the best
validation state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import LayerfoldError, RuntimeFailure
from ..models.loading import input_device
from ..models.saving import _pid_alive
from ..models.surgery import count_parameters
from .allocator import return_freed_memory, trim
from .capture import layer_outputs, model_layers
from .head import OutputHead, run_for_hidden
from .losses import Loss, LossInputs, logit_terms
from .parallel import Processes, processes
from . import sharding
from .teacher import OnTheFlyTeacher, TeacherCache

CHECKPOINT_NAME = "checkpoint.pt"
BEST_STATE_NAME = "best_state.pt"


@dataclass
class TrainConfig:
    """How to train. Every field that changes the result is part of the resume fingerprint."""

    steps: int = 100  # optimizer steps (see ``steps_for_tokens``)
    batch_size: int = 8  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    weight_decay: float = 0.0  # AdamW's, on matrices only (norms and biases are not decayed)
    warmup_steps: int = 0  # linear warmup: step s of it runs at lr * (s + 1) / warmup_steps
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"  # "fp32", or "bf16" autocast (trainable weights stay in their dtype)
    seed: int = 0
    eval_every: int = 0  # steps between validations and ``eval_fn`` calls; 0: only at the end
    # bookkeeping (not part of the fingerprint)
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: none
    resume: bool = False
    log_file: str | None = None
    progress: bool = True
    desc: str = "training"

    _BOOKKEEPING = ("checkpoint_dir", "checkpoint_every", "resume", "log_file", "eval_every", "progress", "desc")

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise LayerfoldError(f"training {name.replace('_', ' ')} must be at least 1 (got {getattr(self, name)})")
        if not self.lr > 0:
            raise LayerfoldError(f"learning rate must be positive (got {self.lr})")
        if not 0 <= self.min_lr_ratio <= 1:
            raise LayerfoldError(f"the final learning rate must be between 0 and the peak (ratio {self.min_lr_ratio})")
        if self.warmup_steps < 0:
            raise LayerfoldError(f"warmup steps must not be negative (got {self.warmup_steps})")
        if self.precision not in ("fp32", "bf16"):
            raise LayerfoldError(f"precision must be fp32 or bf16 (got {self.precision!r})")
        if self.resume and not self.checkpoint_dir:
            raise LayerfoldError("resuming needs a checkpoint folder")

    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def tokens_per_step(self, seq_len: int) -> int:
        return self.rows_per_step() * seq_len

    def result_fields(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self._BOOKKEEPING}


@dataclass
class Checkpoints:
    """Where a training stage writes its checkpoints (``--checkpoint-dir``) and whether it resumes."""

    folder: str | None = None
    every: int = 0
    resume: bool = False

    def settings(self) -> dict:
        return {"checkpoint_dir": self.folder, "checkpoint_every": self.every if self.folder else 0,
                "resume": self.resume}


def steps_for_tokens(tokens: int, batch_size: int, grad_accum: int, seq_len: int) -> int:
    """Optimizer steps that consume at least ``tokens`` tokens."""
    return max(1, -(-tokens // (batch_size * grad_accum * seq_len)))


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float  # wall time of this process's share (a resumed run counts only its part)
    loss: float  # total loss of the last step
    history: list[dict] = field(default_factory=list)  # one record per optimizer step (+ validations)
    resumed_from: int | None = None  # the step a resumed run started at
    trainable_parameters: int = 0
    # with validation: the loss before training, the best one and its step (whose state was kept)
    first_val: float | None = None
    best_val: float | None = None
    best_step: int | None = None


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


# -- what is trained on -------------------------------------------------------------------


class Objective:
    """The loss of a batch: ``objective(rows, autocast) -> (total, {term name: value})``.

    ``rows`` index the training rows; ``autocast`` is the precision context the forward
    passes run in. ``tokens_per_row`` counts tokens for the log; ``describe()`` identifies
    the objective (its data included) in the resume fingerprint.
    """

    tokens_per_row: int = 1

    def __call__(self, rows: list[int], autocast) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": type(self).__name__}


def data_digest(data: torch.Tensor) -> str:
    return hashlib.sha256(data.detach().cpu().numpy().tobytes()).hexdigest()


class Distillation(Objective):
    """A whole model on token rows ``data`` [N, T]: sum(weight * loss) over ``losses``, with
    the teacher's outputs (a model run on the fly, an :class:`OnTheFlyTeacher`, or a
    :class:`TeacherCache` built on the same rows) where a loss asks for them."""

    def __init__(self, student: nn.Module, data: torch.Tensor, losses: Sequence[Loss], *,
                 teacher: nn.Module | OnTheFlyTeacher | TeacherCache | None = None, arch=None,
                 logit_chunk: int = 0):
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
        self.student, self.data, self.losses, self.teacher = student, data, list(losses), teacher
        self.layers = model_layers(student, arch)
        self.num_layers = len(self.layers)
        self.student_layers = set().union(*(l.student_layers(self.num_layers) for l in self.losses))
        self.teacher_layers = (set().union(*(l.teacher_layers(teacher.num_layers) for l in self.losses))
                               if teacher else set())
        self.need_logits = any(l.needs_teacher_logits for l in self.losses)
        # logit_chunk >= 0: the logit losses run chunk by chunk of positions through the output
        # head (0: chunks of about head.AUTO_CHUNK_BYTES of logits); < 0: the batch's full logits
        self.logit_chunk = logit_chunk
        self.head = OutputHead(student, arch) if logit_chunk >= 0 else None
        self.temperature = next((l.temperature for l in self.losses if hasattr(l, "temperature")), 1.0)
        self.device = input_device(student)  # where the ids go; a device map moves them on from there
        self.tokens_per_row = data.shape[1]
        self.rows = data.shape[0]

    def __call__(self, rows, autocast):
        ids = self.data[rows].to(self.device)
        lean = self.head is not None
        with autocast:
            t_out = (self.teacher.outputs(ids, rows, self.teacher_layers, self.need_logits, self.temperature,
                                          **({"chunked": True} if lean and isinstance(self.teacher, OnTheFlyTeacher) else {}))
                     if self.teacher else None)
            with layer_outputs(self.layers, self.student_layers) as hidden:
                if lean:
                    x = LossInputs(input_ids=ids, logits=None, hidden=hidden, num_layers=self.num_layers, teacher=t_out,
                                   final_hidden=run_for_hidden(self.student, self.head, ids), head=self.head,
                                   chunk=self.logit_chunk)
                else:
                    x = LossInputs(input_ids=ids, hidden=hidden, num_layers=self.num_layers, teacher=t_out,
                                   logits=self.student(input_ids=ids).logits)
            # under autocast, as the model's own head would run: the chunks' recomputation in
            # backward restores the same autocast state
            terms = logit_terms(x, self.losses)
        terms.update({loss.name: loss(x) for loss in self.losses if not loss.needs_logits})
        total = sum(loss.weight * terms[loss.name] for loss in self.losses)
        return total, terms

    def describe(self) -> dict:
        return {"kind": "distillation", "data": [list(self.data.shape), data_digest(self.data)],
                "losses": [l.describe() for l in self.losses], "teacher": self.teacher is not None}


def mean_loss(objective: Objective, rows: Sequence[int], batch_size: int) -> Callable[[], float]:
    """A validation: the objective's mean total loss over ``rows`` (weighted by batch size)."""
    rows = list(rows)

    def validate() -> float:
        total = 0.0
        for i in range(0, len(rows), batch_size):
            batch = rows[i : i + batch_size]
            value, _ = objective(batch, contextlib.nullcontext())
            total += value.item() * len(batch)
        return total / len(rows)

    return validate


# -- the schedule ------------------------------------------------------------------------


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then a cosine down to ``lr * min_lr_ratio`` at the last step: transformers'
    curve, except that its warmup starts at 0 (a step spent at lr 0): here warmup step s runs
    at (s + 1) / warmup_steps, so the last warmup step reaches the peak."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    warm = config.warmup_steps
    curve = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, warm, config.steps, min_lr_rate=config.min_lr_ratio).lr_lambdas[0]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: curve(s + 1) if s < warm else curve(s))


def lr_factor(step: int, total: int, config: TrainConfig) -> float:
    """The multiple of ``config.lr`` that optimizer step ``step`` of a ``total``-step run uses."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.lr)
    return _scheduler(probe, replace(config, steps=total)).lr_lambdas[0](step)


# -- the loop ----------------------------------------------------------------------------


class _Rows:
    """Rows of micro-batch ``m``: a stream of seeded permutations of ``rows``, one per pass."""

    def __init__(self, rows: Sequence[int], batch_size: int, seed: int):
        self.rows, self.b, self.seed = list(rows), batch_size, seed
        self.n = len(self.rows)
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def __call__(self, m: int) -> list[int]:
        return [self.rows[self._perm(p // self.n)[p % self.n]] for p in range(m * self.b, (m + 1) * self.b)]


def load_checkpoint(path: Path, **kwargs) -> dict:
    """A checkpoint this project wrote: tensors, numbers and strings only. ``weights_only=True``
    refuses anything else (a pickle that would run code on loading) with an error, never runs it."""
    import pickle

    try:
        return torch.load(path, weights_only=True, **kwargs)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise LayerfoldError(f"{path}: refused: not a checkpoint layerfold wrote ({first}); delete it or "
                             "choose another --checkpoint-dir") from None


def save_checkpoint(state: dict, path: Path) -> None:
    """``torch.save`` to a temporary name, then renamed over ``path``: a kill while saving leaves
    the previous checkpoint intact (and a temporary file that the next save sweeps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(path.name + ".tmp-*"):  # left by a killed run
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            stale.unlink(missing_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _BestState:
    """The trainable tensors at the best validation so far, in memory or in a file
    (``torch.save`` writes tensor by tensor; read back memory-mapped)."""

    def __init__(self, params: list[tuple[str, nn.Parameter]], folder: Path | None):
        self.params = params
        self.path = Path(folder) / BEST_STATE_NAME if folder is not None else None
        self.state: dict[str, torch.Tensor] | None = None

    def keep(self, tensors: dict[str, torch.Tensor] | None = None) -> None:
        tensors = tensors if tensors is not None else {n: p.detach() for n, p in self.params}
        if self.path is None:
            self.state = {n: t.detach().clone() for n, t in tensors.items()}
            return
        # torch.save writes tensor by tensor (safetensors' save_file first builds the whole file
        # in memory: one more copy of the layer at the peak of training)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({n: t.detach().cpu() for n, t in tensors.items()}, tmp)
        tmp.replace(self.path)

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.path is None:
            return self.state
        return load_checkpoint(self.path, mmap=True)

    @torch.no_grad()
    def restore(self) -> None:
        state = self.tensors()
        for n, p in self.params:
            p.copy_(state[n])
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _fingerprint(config: TrainConfig, objective, rows: list[int], names: list[str], validated: bool,
                 model: str = "", processes: int = 1) -> str:
    parts = [config.result_fields(), objective.describe() if hasattr(objective, "describe") else None,
             hashlib.sha256(json.dumps(rows).encode()).hexdigest(), names, validated, model]
    if processes > 1:  # the global batch differs (one-process fingerprints stay as they were)
        parts.append({"processes": processes})
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@torch.no_grad()
def model_digest(model: nn.Module, values: int = 256) -> str:
    """What identifies the model a training starts from, cheaply: every parameter's and buffer's
    name, shape and dtype, and its first ``values`` numbers (weights not in memory: name and
    shape only). A checkpoint of another model of the same shape is then refused on resuming."""
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.device.type != "meta" and t.numel():
            h.update(t.detach().reshape(-1)[:values].cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


def _optimizer(params: list[tuple[str, nn.Parameter]], config: TrainConfig) -> torch.optim.AdamW:
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    # foreach=False: the multi-tensor update allocates temporaries as large as the parameters,
    # which for one big layer of a streamed model is a peak worth avoiding (speed is the same)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=tuple(config.betas), foreach=False,
    )


class _History:
    """The run's records (steps and validations), its log file, and the best validation so far."""

    def __init__(self, config: TrainConfig, header: dict | None, best: _BestState | None, writes: bool = True):
        self.records: list[dict] = []
        self.log = Path(config.log_file) if config.log_file and writes else None  # the main process writes it
        self.header, self.best = header, best
        self.first_val = self.best_val = self.best_step = None
        self.t0 = time.perf_counter()

    def open(self) -> None:
        if self.log is not None:
            # the log always equals the history: a resumed run rewrites what the killed one logged
            head = [{"event": "config", **self.header}] if self.header is not None else []
            _write_log(self.log, head + self.records)

    def add(self, record: dict) -> None:
        self.records.append(record)
        if self.log is not None:
            _append_log(self.log, record)

    def validate(self, step: int, model: nn.Module, validate: Callable[[], float]) -> None:
        value = _quietly(model, validate)
        value, extra = value if isinstance(value, tuple) else (value, {})
        if self.first_val is None or value < self.best_val:
            if self.first_val is None:
                self.first_val = value
            self.best_val, self.best_step = value, step
            self.best.keep()
        self.add({"event": "val", "step": step, "val_loss": value, **extra, "best_val": self.best_val,
                  "seconds": time.perf_counter() - self.t0})

    def last_step(self) -> dict:
        return next((r for r in reversed(self.records) if r.get("event", "step") == "step"), {})

    def close(self, steps: int, seconds: float) -> None:
        if self.log is not None and self.header is not None:
            _append_log(self.log, {"event": "done", "steps": steps, "best_step": self.best_step,
                                   "best_val": self.best_val, "first_val": self.first_val, "seconds": seconds})


class Diverged(RuntimeFailure):
    """The loss (or the gradient) stopped being a finite number."""

    def __init__(self, step: int, what: str, advice: str = ""):
        super().__init__(f"training diverged at step {step} ({what})" + (f"; {advice}" if advice else ""))
        self.step, self.what = step, what


class _Checkpoints:
    """Checkpoints at optimizer-step boundaries, and resuming from the last one."""

    def __init__(self, config: TrainConfig, fingerprint: str, writes: bool = True):
        self.config, self.fingerprint, self.writes = config, fingerprint, writes  # writes: the main process
        self.path = Path(config.checkpoint_dir) / CHECKPOINT_NAME if config.checkpoint_dir else None
        self.last_step = 0  # the step of the last checkpoint written or resumed from

    def diverged(self, e: Diverged) -> Diverged:
        """``e`` with what the user can do: the last good checkpoint is kept untouched."""
        if self.path is not None and self.last_step:
            where = (f"stopped; the last good checkpoint (step {self.last_step}) is kept in {self.path.parent}: "
                     "lower the learning rate and rerun with --resume")
        else:
            where = "stopped; no checkpoint was written (--checkpoint-dir keeps one): lower the learning rate"
        return Diverged(e.step, e.what, where)

    def restore(self, model, params, optimizer, scheduler, history: _History) -> int:
        """The step to start at: 0, or where the last checkpoint of this very run left off."""
        if not (self.config.resume and self.path is not None and self.path.is_file()):
            return 0
        state = load_checkpoint(self.path, map_location=input_device(model))
        if state["fingerprint"] != self.fingerprint:
            raise LayerfoldError(
                f"{self.path}: the checkpoint belongs to a different run (other settings, data or model); "
                "start without resuming or use another checkpoint folder"
            )
        if any(sharding.is_sharded(p) for _, p in params):  # FSDP: this process's shards of the whole tensors
            sharding.load_sharded(optimizer, params, state["trainable"], state["optimizer"])
        else:
            with torch.no_grad():
                by_name = dict(params)
                for n, t in state["trainable"].items():
                    by_name[n].copy_(t)
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        history.records = json.loads(state["history"])
        self.last_step = state["step"]
        if history.best is not None:
            history.first_val, history.best_val, history.best_step = state["validation"]
            history.best.keep(state["best"])
        return state["step"]

    def save(self, step: int, params, optimizer, scheduler, history: _History) -> None:
        every, last = self.config.checkpoint_every, step == self.config.steps
        if self.path is None or not every or not (step % every == 0 or last):
            return
        sharded = any(sharding.is_sharded(p) for _, p in params)
        if sharded:  # FSDP: every process takes part in gathering the whole tensors, the main one writes them
            trainable = {n: sharding.full_tensor(p.detach()) for n, p in params}
            optimizer_state = sharding.full_optimizer_state(optimizer)
        if not self.writes:  # the weights are the same in every process: the main one writes them
            self.last_step = step
            return
        state = {
            "step": step,
            "fingerprint": self.fingerprint,
            "trainable": trainable if sharded else {n: p.detach().clone() for n, p in params},
            "optimizer": optimizer_state if sharded else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "history": json.dumps(history.records),
        }
        if history.best is not None:
            state["validation"] = [history.first_val, history.best_val, history.best_step]
            state["best"] = {n: t.detach().clone() for n, t in history.best.tensors().items()}
        save_checkpoint(state, self.path)
        self.last_step = step


def _step(objective, rows: Callable[[int], list[int]], step: int, config: TrainConfig, params, optimizer,
          scheduler, autocast, procs: Processes | None = None) -> dict:
    """One optimizer step over ``config.grad_accum`` micro-batches; its loss terms, lr and gradient norm.
    With several processes (``procs``) each computes its rows' gradients, averaged over them before clipping."""
    optimizer.zero_grad(set_to_none=True)
    terms: dict[str, float] = {}
    total_value = 0.0
    for a in range(config.grad_accum):
        total, parts = _call(objective, rows(step * config.grad_accum + a), autocast)
        if not torch.isfinite(total):
            raise Diverged(step + 1, f"loss {total.item()}")
        (total / config.grad_accum).backward()
        total_value += total.item() / config.grad_accum
        for name, value in parts.items():
            terms[name] = terms.get(name, 0.0) + value.item() / config.grad_accum
        del total, parts
        trim()  # the micro-batch's freed activations leave memory (train.allocator)
    if procs is not None and procs.parallel:
        # FSDP has averaged the sharded layers' gradients already (in their backward)
        procs.average([p.grad for _, p in params if p.grad is not None and not sharding.is_sharded(p.grad)])
        names = sorted(terms)
        total_value, *values = procs.mean([total_value, *(terms[k] for k in names)])
        terms = dict(zip(names, values))
    grad_norm = None
    if config.max_grad_norm:
        if any(sharding.is_sharded(p) for _, p in params):
            grad_norm = sharding.grad_norm_and_clip([p for _, p in params], config.max_grad_norm)
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in params], config.max_grad_norm))
        if not math.isfinite(grad_norm):  # the step would write NaN into the weights
            raise Diverged(step + 1, f"gradient norm {grad_norm}")
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # no gradients held through validation and checkpoints
    trim()
    scheduler.step()
    return {"event": "step", "step": step + 1, "loss": total_value, **{f"loss_{k}": v for k, v in terms.items()},
            "lr": lr, "grad_norm": grad_norm}


def fit(
    model: nn.Module,
    objective: Objective | Callable,
    config: TrainConfig,
    *,
    rows: int | Sequence[int],
    trainable: Trainable = None,
    validate: Callable[[], float] | None = None,
    best_state_dir: Path | None = None,
    eval_fn: Callable[[nn.Module], dict] | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    log_header: dict | None = None,
    layers: Sequence[nn.Module] = (),
) -> TrainResult:
    """Train the parameters of ``model`` chosen by ``trainable`` (see :func:`select_trainable`)
    to minimise ``objective`` over ``rows`` (a count, or the row indices to train on).

    ``validate() -> float`` (lower is better) runs before training, every ``config.eval_every``
    steps and at the end, in eval mode without gradients; the state of the best validation is
    kept (in memory, or in ``best_state_dir``) and restored at the end. ``eval_fn(model) ->
    dict`` runs on the same steps and its numbers join the step's record. ``on_step(step,
    record)`` runs after each optimizer step. With ``log_header`` the log starts with it (a
    ``config`` record) and ends with a ``done`` record. ``layers``: the model's decoder layers,
    sharded over the processes for the training under FSDP (:mod:`.sharding`), whole again after.
    """
    from tqdm.auto import tqdm

    config.validate()
    return_freed_memory()  # freed activations go back to the system, not into the heap (train.allocator)
    train_rows = list(range(rows)) if isinstance(rows, int) else list(rows)
    if not train_rows:
        raise LayerfoldError("no training rows")
    params = select_trainable(model, trainable)
    procs = processes()
    digest = model_digest(model) if config.checkpoint_dir else ""  # of the whole weights, before sharding
    sharded = sharding.shard(layers, procs.reshard_after_forward, model) if procs.sharded and layers else None
    if sharded is not None:  # the same names, now DTensors
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = _optimizer(params, config)
    scheduler = _scheduler(optimizer, config)
    history = _History(config, log_header, _BestState(params, best_state_dir) if validate is not None else None,
                       writes=procs.main)
    fingerprint = (_fingerprint(config, objective, train_rows, [n for n, _ in params], validate is not None,
                                digest, procs.count) if config.checkpoint_dir else "")
    checkpoints = _Checkpoints(config, fingerprint, writes=procs.main)
    torch.manual_seed(config.seed)
    start = resumed = checkpoints.restore(model, params, optimizer, scheduler, history)
    history.open()
    if validate is not None and history.first_val is None:
        history.validate(0, model, validate)
    # several processes: the global micro-batch is what one process with batch_size x processes
    # rows would read; each process trains on its part (see train.parallel)
    global_rows = _Rows(train_rows, config.batch_size * procs.count, config.seed)
    rows_of = (lambda m: procs.share(global_rows(m))) if procs.parallel else global_rows
    tokens_per_step = config.rows_per_step() * procs.count * getattr(objective, "tokens_per_row", 1)
    autocast = torch.autocast(input_device(model).type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    model.train()
    bar = tqdm(total=config.steps, initial=start, desc=config.desc, unit="step",
               disable=not config.progress or not procs.main)
    t0 = time.perf_counter()
    try:
        for step in range(start, config.steps):
            t_step, cpu_step = time.perf_counter(), time.process_time()
            try:
                record = _step(objective, rows_of, step, config, params, optimizer, scheduler, autocast, procs)
            except Diverged as e:
                raise checkpoints.diverged(e) from None
            elapsed = time.perf_counter() - t0
            # cpu_seconds: this process's CPU time (all its threads) for the step; on shared cores it
            # measures the work where wall time measures the load too
            record.update(tokens=(step + 1) * tokens_per_step, step_seconds=time.perf_counter() - t_step,
                          cpu_seconds=time.process_time() - cpu_step,
                          tokens_per_second=(step + 1 - start) * tokens_per_step / elapsed if elapsed > 0 else None)
            due = step + 1 == config.steps or (config.eval_every and (step + 1) % config.eval_every == 0)
            if eval_fn is not None and due:
                record["eval"] = _quietly(model, lambda: eval_fn(model))
            history.add(record)
            if validate is not None and due:
                history.validate(step + 1, model, validate)
            bar.set_postfix(loss=f"{record['loss']:.4g}", tok_s=f"{record['tokens_per_second']:.0f}")
            bar.update(1)
            checkpoints.save(step + 1, params, optimizer, scheduler, history)
            if on_step is not None:
                on_step(step + 1, record)
    finally:
        bar.close()
        optimizer.state.clear()  # the moments go before the best state comes back: one layer's peak less
        for _, p in params:
            p.grad = None
        if history.best_val is not None:
            history.best.restore()
        model.eval()
    if sharded is not None:  # whole again (a collective: not after a failure, when the others may be gone)
        sharding.unshard(sharded, keep=procs.main)
    seconds = time.perf_counter() - t0
    history.close(config.steps, seconds)
    return TrainResult(
        steps=config.steps, tokens=config.steps * tokens_per_step, seconds=seconds,
        loss=history.last_step().get("loss", float("nan")), history=history.records,
        resumed_from=resumed or None, trainable_parameters=count_parameters(p for _, p in params),
        first_val=history.first_val, best_val=history.best_val, best_step=history.best_step,
    )


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
    logit_chunk: int = 0,
) -> TrainResult:
    """Train ``student`` on the token rows ``data`` [N, T] to minimise sum(weight * loss):
    :func:`fit` with a :class:`Distillation` objective (``logit_chunk``: see there)."""
    config.validate()
    objective = Distillation(student, data, losses, teacher=teacher, arch=arch, logit_chunk=logit_chunk)
    return fit(student, objective, config, rows=objective.rows, trainable=trainable, eval_fn=eval_fn,
               on_step=on_step, layers=objective.layers)


def _call(objective, rows: list[int], autocast) -> tuple[torch.Tensor, dict]:
    out = objective(rows, autocast)
    return out if isinstance(out, tuple) else (out, {})


def _quietly(model: nn.Module, fn):
    """``fn()`` in eval mode without gradients; it must not change the training's random
    stream, or resuming would differ."""
    rng = torch.get_rng_state()
    model.eval()
    try:
        with torch.no_grad():
            return fn()
    finally:
        model.train()
        torch.set_rng_state(rng)


def _write_log(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def _append_log(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")

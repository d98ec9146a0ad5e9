"""Learnable layer gates (FoldGPT, arXiv 2407.00928; METHODS.md section 3.1).

Every decoder layer l gets one gate z_l that multiplies the outputs of its residual branches
(the modules the architecture table lists as ``residual_branches``: the attention and MLP
outputs, or the post-norms that wrap them). z_l = 1 leaves the layer as it is; z_l = 0 turns
it into the identity, exactly what removing it does. Every weight is frozen; only the gates
train, all together, on the KL of the *gated* model to the original:

    loss = mean KL(original || model with gates z) + (the gate type's size constraint)

Because the model sees several layers switched off at once, a layer's gate measures what it
costs to lose it *given the others that are lost*: the coupling between layers that
one-at-a-time scores such as Block Influence miss. Three gate types:

``hard-concrete`` (default; Louizos et al. 2018, as Sheared LLaMA prunes layers)
    z_l = min(1, max(0, sigmoid((log u - log(1-u) + log a_l) / beta) * (1.1 + 0.1) - 0.1)),
    u ~ U(0, 1), beta = 2/3: a sample that is exactly 0 or exactly 1 most of the time. The
    expected number of layers kept, s = sum_l P(z_l > 0), is held to a target t by Lagrange
    multipliers as in Sheared LLaMA, l1 (s - t) + l2 (s - t)^2 (s and t in layers), the
    multipliers trained by plain gradient *ascent* (l1 grows while too many layers are kept and
    falls when too few are). By default log a starts from Block Influence's ranking (evenly
    spread by rank, shifted so that s = t from the first step): the one-pass score is the prior
    and the masked model's KL moves it. Started instead from one value for every layer, t goes
    from L to the layers kept over the first ``ramp`` of training. The expected-size
    constraint alone does not make the gates decide (benchmarks/foldgpt.md: after 40 steps 16
    of 30 deterministic gates were between 0.03 and 0.93, because sum P(z > 0) = t is met as
    well by many half-open gates as by t open ones): from ``polarise`` of the steps on, a third
    multiplier mu, also by plain ascent, prices the expected number of gates whose sample
    differs from the top-k mask (``disagreement``), so each gate is pushed out to the side of
    the boundary the KL has put it on, until the deterministic gates are 0 or 1 and agree with
    the final top-k, which keeps exactly the target count.
``topk`` (straight-through)
    the forward pass uses the hard mask of the k highest logits (with a little annealed
    Gumbel noise, so that layers near the boundary get tried); the backward pass uses a soft
    gate of constant sum k * softmax(logits), so a layer's logit rises when switching it on
    helps more than the average layer's would, whatever the loss's overall scale. The number
    of layers switched off ramps in like the hard-concrete target.
``soft`` (the first implementation, kept for comparison)
    z_l = sigmoid(a_l) with a budget penalty on sum z and a g(1-g) polarising term. It does
    not polarise on real models (benchmarks/foldgpt.md): a uniform shrink of every gate meets
    the budget cheaply in a pre-norm model.

``gate_ranking`` trains the gates, picks the layers to remove and, given held-out rows,
checks the choice against Block Influence's for the same number of layers (calibration KL
on those rows): a ranking worth training must not lose to the one-pass score.
Gates are attached with forward hooks: nothing here depends on the architecture.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import LayerfoldError
from ..eval.heldout import compare_to_reference, kl_terms, reference_log_probs
from ..models.architectures import Architecture, get_path
from ..models.surgery import decoder_layers

GATE_TYPES = ("hard-concrete", "topk", "soft")
WARM_STARTS = ("none", "block-influence")
SWAP_ORDERS = ("gates", "block-influence")
STRETCH = (-0.1, 1.1)  # hard-concrete: the sigmoid is stretched to this interval, then clipped to [0, 1]
BETA = 2.0 / 3.0  # hard-concrete temperature
LOG_ALPHA_RANGE = (-10.0, 10.0)  # wide enough that P(z > 0) reaches ~0 and ~1: the target is reachable
EPS = 1e-6

log = logging.getLogger(__name__)


@dataclass
class GateOptions:
    """How the gates are trained (the paper publishes no values; these are our defaults,
    measured in benchmarks/gates.md)."""

    gate_type: str = field(default="hard-concrete", metadata={
        "help": "hard-concrete (stochastic 0/1 gates, expected size held by Lagrange multipliers), "
                "topk (straight-through top-k mask) or soft (sigmoid gates with a penalty; for comparison)",
        "choices": GATE_TYPES})
    steps: int = field(default=100, metadata={"help": "optimiser steps per round of gate training"})
    lr: float = field(default=0.25, metadata={"help": "Adam learning rate of the gate logits"})
    batch_size: int = field(default=2, metadata={"help": "calibration sequences per gate step"})
    ramp: float = field(default=0.5, metadata={
        "help": "fraction of the steps over which the size constraint comes in (hard-concrete: the "
                "target size, topk: the layers switched off, soft: the polarising weight)"})
    init: float = field(default=3.0, metadata={
        "help": "initial gate logit of hard-concrete (log a) and soft gates: every layer starts on; "
                "with --gate-warm-start, the spread of hard-concrete's log a around the offset that "
                "meets the target; topk logits start at 0"})
    warm_start: str = field(default="block-influence", metadata={
        "help": "hard-concrete (other types ignore it): start log a from a one-pass ranking (block-influence: layers ranked by "
                "Block Influence, log a spread by +-init and shifted so the expected size is already the "
                "target) instead of the same value for every layer; the gates then move it by the KL of "
                "the masked model", "choices": WARM_STARTS})
    polarise: float = field(default=0.4, metadata={
        "help": "hard-concrete: from this fraction of the steps on, a third multiplier (plain gradient "
                "ascent at --gate-lambda-lr) prices the expected number of gates whose sample differs "
                "from the top-k mask, until every gate is 0 or 1; 1 turns it off"})
    lambda_lr: float = field(default=0.05, metadata={
        "help": "hard-concrete: learning rate of the Lagrange multipliers, plain gradient ascent on "
                "l1 (E[size]-t) + l2 (E[size]-t)^2 with the size in layers"})
    noise: float = field(default=0.5, metadata={
        "help": "topk: scale of the Gumbel noise on the logits in the forward pass, annealed to 0"})
    budget_weight: float = field(default=5.0, metadata={
        "help": "soft: weight of the term pulling sum(gates) toward the number of layers kept"})
    polar_weight: float = field(default=1.0, metadata={
        "help": "soft: weight of the term pushing each gate to 0 or 1"})
    rounds: int = field(default=1, metadata={
        "help": "remove the layers in this many rounds, retraining the gates in between"})
    swap_rounds: int = field(default=2, metadata={
        "help": "after the top-k, at most this many rounds of swap refinement: each round scores, by the "
                "calibration KL of the masked model to the original (the gates' own rows, never the held-out "
                "ones), every swap of one of the --gate-swap-window removed layers nearest the boundary with "
                "one of the --gate-swap-window kept layers nearest it (--gate-swap-order; and, in the first "
                "round, the warm start's own choice), and takes the best that lowers the KL; stops when none "
                "does; 0 turns it off"})
    swap_window: int = field(default=4, metadata={
        "help": "the swap refinement tries every swap of one of this many removed layers nearest the boundary "
                "with one of this many kept layers nearest it (window x window candidates a round)"})
    swap_order: str = field(default="gates", metadata={
        "help": "what 'nearest the boundary' means for the swap window: gates (the trained log a: once the "
                "gates are 0/1 the kept layers' log a no longer rank them) or block-influence (one pass: the "
                "kept layers of lowest Block Influence, the removed ones of highest)", "choices": SWAP_ORDERS})
    swap_rows: int = field(default=8, metadata={
        "help": "the swap refinement scores each candidate on the first this many of the gates' calibration "
                "rows (their cached teacher log-probabilities, and the layer states before the first layer a "
                "swap changes, are reused): 8 of the default 32 rows make it about 4x cheaper"})
    seed: int = field(default=0, metadata={"help": "seed of the row order and the gates' noise"})

    def validate(self) -> None:
        if self.gate_type not in GATE_TYPES:
            raise LayerfoldError(f"--gate-type must be one of {', '.join(GATE_TYPES)} (got {self.gate_type!r})")
        if self.steps < 1:
            raise LayerfoldError(f"--gate-steps must be at least 1 (got {self.steps})")
        if self.rounds < 1:
            raise LayerfoldError(f"--gate-rounds must be at least 1 (got {self.rounds})")
        if self.lr <= 0 or self.lambda_lr < 0 or self.budget_weight < 0 or self.polar_weight < 0 or self.noise < 0:
            raise LayerfoldError("gate learning rate must be positive and loss weights and noise non-negative")
        if self.swap_rounds < 0:
            raise LayerfoldError(f"--gate-swap-rounds must be 0 (off) or more (got {self.swap_rounds})")
        if self.swap_rows < 1:
            raise LayerfoldError(f"--gate-swap-rows must be at least 1 (got {self.swap_rows})")
        if self.swap_window < 1:
            raise LayerfoldError(f"--gate-swap-window must be at least 1 (got {self.swap_window})")
        if self.swap_order not in SWAP_ORDERS:
            raise LayerfoldError(f"--gate-swap-order must be one of {', '.join(SWAP_ORDERS)} (got {self.swap_order!r})")
        if self.batch_size < 1:
            raise LayerfoldError(f"gate batch size must be at least 1 (got {self.batch_size})")
        if self.warm_start not in WARM_STARTS:
            raise LayerfoldError(f"--gate-warm-start must be one of {', '.join(WARM_STARTS)} (got {self.warm_start!r})")
        if not 0 <= self.polarise <= 1:
            raise LayerfoldError(f"--gate-polarise is a fraction of the steps, 0 to 1 (got {self.polarise})")
        if not 0 <= self.ramp <= 1:
            raise LayerfoldError(f"the gate ramp is a fraction of the steps, 0 to 1 (got {self.ramp})")


# --- attaching gates to a model -------------------------------------------------------------


class GateValues:
    """The multiplier of each layer's residual branches in the next forward pass."""

    def __init__(self, num_layers: int):
        self.z = torch.ones(num_layers)


@contextmanager
def gated(model: nn.Module, arch: Architecture, values: GateValues):
    """Within the block, every residual branch of layer l is multiplied by ``values.z[l]``."""
    layers = decoder_layers(model, arch)
    if len(layers) != values.z.numel():
        raise LayerfoldError(f"{values.z.numel()} gates for a model with {len(layers)} layers")
    handles = []

    def hook(l: int):
        def scale(module, args, output):
            g = values.z[l]
            if isinstance(output, tuple):  # attention returns (output, weights, ...)
                return (output[0] * g.to(output[0].device, output[0].dtype),) + tuple(output[1:])
            return output * g.to(output.device, output.dtype)

        return scale

    try:
        for l, layer in enumerate(layers):
            for name in arch.residual_branches:
                try:
                    branch = get_path(layer, name)
                except AttributeError:
                    raise LayerfoldError(f"layer {l} has no residual branch {name!r} (architecture table "
                                         f"entry {arch.model_type!r})") from None
                handles.append(branch.register_forward_hook(hook(l)))
        yield values
    finally:
        for h in handles:
            h.remove()


def switched_off(num_layers: int, removed: Sequence[int]) -> GateValues:
    """Gates of exactly 1, and exactly 0 for ``removed``: the same outputs as removing them
    (x + 0 * branch(x) == x), without copying the model."""
    values = GateValues(num_layers)
    values.z[list(removed)] = 0.0
    return values


# --- the three gate types -------------------------------------------------------------------


def keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """Hard-concrete's P(z > 0) = sigmoid(log a - beta log(-lo / hi)): a layer's expected share
    of the size."""
    lo, hi = STRETCH
    return torch.sigmoid(log_alpha - BETA * math.log(-lo / hi))


def on_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """Hard-concrete's P(z = 1) = sigmoid(log a - beta log((1 - lo) / (hi - 1)))."""
    lo, hi = STRETCH
    return torch.sigmoid(log_alpha - BETA * math.log((1 - lo) / (hi - 1)))


def disagreement(log_alpha: torch.Tensor, keep: int) -> torch.Tensor:
    """The expected number of gates whose sample differs from the deterministic top-k mask:
    for each of the ``keep`` highest log a, P(z < 1); for every other layer, P(z > 0). It is 0
    exactly when every gate is decided (sampled 0 or 1 as the top-k says), and its gradient
    pushes each log a away from the boundary on its own side, so it cannot overshoot."""
    top = torch.zeros_like(log_alpha, dtype=torch.bool)
    top[_top(log_alpha.detach(), keep)] = True
    return torch.where(top, 1 - on_probability(log_alpha), keep_probability(log_alpha)).sum()


def warm_log_alpha(prior: Sequence[float], keep: int, spread: float) -> torch.Tensor:
    """log a from a ranking (higher = keep): evenly spaced by rank over [c - spread, c + spread],
    c found by bisection so that the expected number of layers kept is exactly ``keep``.
    Ranks, not the scores themselves, so that the start does not depend on the score's scale."""
    n = len(prior)
    order = sorted(range(n), key=lambda l: (prior[l], l))  # lowest first; ties as lowest_gated
    base = torch.empty(n)
    for rank, l in enumerate(order):
        base[l] = spread * (2 * rank / max(1, n - 1) - 1)
    lo, hi = LOG_ALPHA_RANGE[0] - spread, LOG_ALPHA_RANGE[1] + spread
    for _ in range(60):
        mid = (lo + hi) / 2
        if keep_probability(base + mid).sum() > keep:
            hi = mid
        else:
            lo = mid
    return (base + (lo + hi) / 2).clamp(*LOG_ALPHA_RANGE)


def _ramp(step: int, steps: int, ramp: float) -> float:
    """0 -> 1 over the first ``ramp`` of the steps (1 from the start when ramp is 0)."""
    return min(1.0, (step + 1) / max(1.0, ramp * steps))


class HardConcreteGates(nn.Module):
    """Hard-concrete gates with an expected-size constraint under Lagrange multipliers.

    The Lagrangian of Sheared LLaMA: loss = KL + l1 (s - t) + l2 (s - t)^2 with s the expected
    number of layers kept and t the target, both in layers. The gates minimise it; the
    multipliers maximise it by plain gradient ascent (l1 += lr (s - t), l2 += lr (s - t)^2),
    so l1 grows for as long as the gates keep too many layers and falls once they keep too
    few, and l2 adds a pull toward t from either side that grows with every violation.
    (Adam's ascent, the first version, moved the multipliers by a fixed ~lr a step whatever
    the violation: 100 steps were too few for them to matter on the real model.) From
    ``opts.polarise`` of the steps on, + mu * disagreement, mu += lr * disagreement.
    """

    def __init__(self, num_layers: int, keep: int, opts: GateOptions, prior: Sequence[float] | None = None):
        super().__init__()
        self.n, self.keep, self.opts = num_layers, keep, opts
        start = torch.full((num_layers,), float(opts.init)) if prior is None else warm_log_alpha(prior, keep, opts.init)
        self.warm = prior is not None
        self.log_alpha = nn.Parameter(start)
        self.lambdas = nn.Parameter(torch.zeros(3))  # lambda1, lambda2, mu (the price of undecided gates)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        opts = [torch.optim.Adam([self.log_alpha], lr=self.opts.lr)]
        if self.opts.lambda_lr > 0:
            opts.append(torch.optim.SGD([self.lambdas], lr=self.opts.lambda_lr, maximize=True))
        return opts

    def sample(self, step: int, gen: torch.Generator) -> torch.Tensor:
        u = torch.rand(self.n, generator=gen).clamp(EPS, 1 - EPS).to(self.log_alpha.device)
        s = torch.sigmoid((u.log() - (1 - u).log() + self.log_alpha) / BETA)
        lo, hi = STRETCH
        return (s * (hi - lo) + lo).clamp(0.0, 1.0)

    def keep_probability(self) -> torch.Tensor:
        return keep_probability(self.log_alpha)

    def target(self, step: int) -> float:
        if self.warm:  # the warm start meets the target already: nothing to ramp
            return float(self.keep)
        return self.n - (self.n - self.keep) * _ramp(step, self.opts.steps, self.opts.ramp)

    def penalty(self, step: int) -> tuple[torch.Tensor, dict]:
        expected = self.keep_probability().sum()
        t = self.target(step)
        gap = expected - t
        l1, l2, mu = self.lambdas[0], self.lambdas[1], self.lambdas[2]
        off = disagreement(self.log_alpha, self.keep)
        polarising = float(step >= self.opts.polarise * self.opts.steps and self.opts.polarise < 1)
        return l1 * gap + l2 * gap * gap + polarising * mu * off, {
            "expected_kept": expected.item(), "target": t, "lambda1": l1.item(), "lambda2": l2.item(),
            "mu": mu.item(), "disagreement": off.item()}

    @torch.no_grad()
    def after_step(self) -> None:
        self.log_alpha.clamp_(*LOG_ALPHA_RANGE)

    @torch.no_grad()
    def values(self) -> torch.Tensor:
        """The deterministic gate of Louizos et al.: clip(sigmoid(log a) * 1.2 - 0.1, 0, 1)."""
        lo, hi = STRETCH
        return (torch.sigmoid(self.log_alpha) * (hi - lo) + lo).clamp(0.0, 1.0)

    @torch.no_grad()
    def scores(self) -> torch.Tensor:
        return self.log_alpha.detach().clone()


class TopKGates(nn.Module):
    """Straight-through top-k: the forward mask is hard, the backward gate k * softmax(logits)."""

    def __init__(self, num_layers: int, keep: int, opts: GateOptions):
        super().__init__()
        self.n, self.keep, self.opts = num_layers, keep, opts
        self.logits = nn.Parameter(torch.zeros(num_layers))

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam([self.logits], lr=self.opts.lr)]

    def off_now(self, step: int) -> int:
        return round((self.n - self.keep) * _ramp(step, self.opts.steps, self.opts.ramp))

    def sample(self, step: int, gen: torch.Generator) -> torch.Tensor:
        k = self.n - self.off_now(step)
        scale = self.opts.noise * (1 - step / max(1, self.opts.steps - 1)) if self.opts.steps > 1 else 0.0
        u = torch.rand(self.n, generator=gen).clamp(EPS, 1 - EPS).to(self.logits.device)
        noisy = self.logits.detach() - scale * (-u.log()).log()  # + scale * Gumbel(0, 1)
        hard = torch.zeros(self.n, device=self.logits.device)
        hard[_top(noisy, k)] = 1.0
        soft = self.keep * torch.softmax(self.logits, dim=0)
        return hard + soft - soft.detach()

    def penalty(self, step: int) -> tuple[torch.Tensor, dict]:
        return self.logits.new_zeros(()), {"switched_off": self.off_now(step)}

    def after_step(self) -> None:
        pass

    @torch.no_grad()
    def values(self) -> torch.Tensor:
        """The soft gate sigmoid(logit - threshold), threshold midway between the k-th and the
        (k+1)-th logit: above 0.5 exactly for the layers the final mask keeps."""
        order = torch.sort(self.logits.detach(), descending=True).values
        mid = (order[self.keep - 1] + order[self.keep]) / 2 if self.keep < self.n else order[-1] - 1
        return torch.sigmoid(self.logits.detach() - mid)

    @torch.no_grad()
    def scores(self) -> torch.Tensor:
        return self.logits.detach().clone()


class SoftGates(nn.Module):
    """Sigmoid gates, a budget penalty on their sum and a polarising term (for comparison)."""

    def __init__(self, num_layers: int, keep: int, opts: GateOptions):
        super().__init__()
        self.n, self.keep, self.opts = num_layers, keep, opts
        self.logits = nn.Parameter(torch.full((num_layers,), float(opts.init)))

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam([self.logits], lr=self.opts.lr)]

    def sample(self, step: int, gen: torch.Generator) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def penalty(self, step: int) -> tuple[torch.Tensor, dict]:
        g = torch.sigmoid(self.logits)
        budget = ((g.sum() - self.keep) / self.n) ** 2
        polar = (g * (1 - g)).mean()
        ramp = _ramp(step, self.opts.steps, self.opts.ramp)
        loss = self.opts.budget_weight * budget + self.opts.polar_weight * ramp * polar
        return loss, {"budget": budget.item(), "polar": polar.item(), "sum_g": g.sum().item()}

    def after_step(self) -> None:
        pass

    @torch.no_grad()
    def values(self) -> torch.Tensor:
        return torch.sigmoid(self.logits.detach())

    @torch.no_grad()
    def scores(self) -> torch.Tensor:
        return self.logits.detach().clone()


GATES = {"hard-concrete": HardConcreteGates, "topk": TopKGates, "soft": SoftGates}


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, the complement of ``lowest_gated`` (same tie rule)."""
    low = set(lowest_gated(scores.tolist(), scores.numel() - k))
    return [l for l in range(scores.numel()) if l not in low]


# --- training -------------------------------------------------------------------------------


@contextmanager
def _frozen(model: nn.Module):
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _gate_step(step: int, *, model, gates, optimizers, values, input_ids, teacher, gen, batch_size, device) -> dict:
    """One step: a batch of rows, a gate sample, the KL to the original plus the penalty."""
    rows = torch.randperm(input_ids.shape[0], generator=gen)[:batch_size]
    values.z = gates.sample(step, gen)
    logits = model(input_ids=input_ids[rows].to(device), use_cache=False).logits
    kl = kl_terms(logits, teacher[rows].to(logits.device)).mean()
    penalty, info = gates.penalty(step)
    loss = kl + penalty.to(kl.device)
    for o in optimizers:
        o.zero_grad(set_to_none=True)
    loss.backward()
    for o in optimizers:
        o.step()
    gates.after_step()
    return {"step": step + 1, "loss": loss.item(), "kl": kl.item(), **info,
            "off": int((values.z.detach() == 0).sum()),
            "gates": [round(v, 5) for v in gates.values().tolist()]}


class _GateCheckpoint:
    """Gate training's checkpoint (``NAME.pt``): every ``checkpoints.every`` steps and at the end."""

    def __init__(self, checkpoints, name: str, identity: list):
        import hashlib
        import json
        from pathlib import Path

        from ..train.loop import data_digest

        self.every = checkpoints.every if checkpoints is not None and checkpoints.folder else 0
        self.resume = bool(checkpoints is not None and checkpoints.resume)
        self.path = Path(checkpoints.folder) / f"{name}.pt" if self.every else None
        blob = json.dumps([data_digest(x) if isinstance(x, torch.Tensor) else x for x in identity],
                          sort_keys=True, default=str)
        self.fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:16]

    def restore(self, gates: nn.Module, optimizers, gen: torch.Generator, log: list) -> int:
        import json

        from ..train.loop import load_checkpoint

        if not (self.resume and self.path is not None and self.path.is_file()):
            return 0
        state = load_checkpoint(self.path)
        if state["fingerprint"] != self.fingerprint:
            raise LayerfoldError(f"{self.path}: the checkpoint belongs to a different run (other settings, data or "
                                 "model); start without resuming or use another checkpoint folder")
        gates.load_state_dict(state["gates"])
        for o, o_state in zip(optimizers, state["optimizers"]):
            o.load_state_dict(o_state)
        gen.set_state(state["generator"])
        log[:] = json.loads(state["log"])
        return state["step"]

    def save(self, step: int, steps: int, gates: nn.Module, optimizers, gen: torch.Generator, log: list) -> None:
        import json

        from ..train.loop import save_checkpoint

        if self.path is None or not (step % self.every == 0 or step == steps):
            return
        save_checkpoint({"step": step, "fingerprint": self.fingerprint, "gates": gates.state_dict(),
                         "optimizers": [o.state_dict() for o in optimizers], "generator": gen.get_state(),
                         "log": json.dumps(log)}, self.path)


@dataclass
class TrainedGates:
    """One round's outcome: final gates (0/1 for hard types), ranking scores, the log."""

    gates: list[float]
    scores: list[float]
    removed: list[int]  # local indices of the lowest-scored layers
    log: list[dict]


def train_gates(
    model: nn.Module,
    arch: Architecture,
    input_ids: torch.Tensor,
    keep: int,
    opts: GateOptions | None = None,
    *,
    teacher: torch.Tensor | None = None,
    prior: Sequence[float] | None = None,
    progress: bool = True,
    desc: str = "training layer gates",
    checkpoints=None,
    name: str = "gates",
) -> TrainedGates:
    """Train one gate per layer of ``model`` (weights frozen) toward keeping ``keep`` layers.

    ``teacher``: the original's log-probabilities on ``input_ids`` (``reference_log_probs``).
    ``prior``: one score per layer (higher = keep) that hard-concrete's log a starts from
    (``warm_log_alpha``); None starts every layer at ``opts.init``. ``checkpoints``
    (``train.loop.Checkpoints``): the gates, their optimizers and the noise generator are saved
    as ``NAME.pt`` in its folder, and a resumed run continues from there to the same gates.
    """
    from tqdm.auto import tqdm

    from ..models.loading import input_device

    opts = opts or GateOptions()
    opts.validate()
    n = len(decoder_layers(model, arch))
    if not 0 < keep <= n:
        raise LayerfoldError(f"cannot keep {keep} of {n} layers")
    device = input_device(model)
    if teacher is None:
        teacher = reference_log_probs(model, input_ids, opts.batch_size)
    if prior is not None and opts.gate_type != "hard-concrete":
        raise LayerfoldError("only hard-concrete gates start from a prior ranking")
    if prior is not None and len(prior) != n:
        raise LayerfoldError(f"a prior of {len(prior)} scores for a model with {n} layers")
    gates = (HardConcreteGates(n, keep, opts, prior) if prior is not None else GATES[opts.gate_type](n, keep, opts)).to(device)
    optimizers = gates.optimizers()
    gen = torch.Generator().manual_seed(opts.seed)
    values = GateValues(n)
    log: list[dict] = []
    saved = _GateCheckpoint(checkpoints, name, [asdict(opts), n, keep, prior, input_ids, teacher])
    start = saved.restore(gates, optimizers, gen, log)
    was_training = model.training
    model.eval()  # no dropout: the gates should see the model as it will be used
    bar = tqdm(range(start, opts.steps), desc=desc, unit="step", disable=not progress, initial=start,
               total=opts.steps)
    try:
        with _frozen(model), gated(model, arch, values):
            for step in bar:
                entry = _gate_step(step, model=model, gates=gates, optimizers=optimizers, values=values,
                                   input_ids=input_ids, teacher=teacher, gen=gen, batch_size=opts.batch_size,
                                   device=device)
                log.append(entry)
                bar.set_postfix(kl=f"{entry['kl']:.3f}", off=entry["off"])
                saved.save(step + 1, opts.steps, gates, optimizers, gen, log)
    finally:
        bar.close()
        model.train(was_training)
        values.z = torch.ones(n)
    scores = gates.scores().cpu()
    kept = set(_top(scores, keep))
    removed = [l for l in range(n) if l not in kept]
    if opts.gate_type == "soft":
        final = gates.values().cpu().tolist()
    else:  # the deterministic top-k: exactly ``keep`` layers stay
        final = [1.0 if l in kept else 0.0 for l in range(n)]
    return TrainedGates(final, scores.tolist(), removed, log)


def lowest_gated(gates: Sequence[float], n_remove: int) -> list[int]:
    """Indices of the ``n_remove`` lowest gates (ties broken toward later layers staying)."""
    order = sorted(range(len(gates)), key=lambda l: (gates[l], l))
    return sorted(order[:n_remove])


# --- the ranking, and its check against Block Influence --------------------------------------


@dataclass
class GateResult:
    """Final gate values per original layer (0/1 for hard-concrete and topk; NaN for layers
    removed in an earlier round), the ranking scores behind them, and the check."""

    gates: list[float]
    removed: list[int]  # original indices, in the order they were removed
    rounds: list[dict] = field(default_factory=list)  # per round: layers, gates, loss curve
    options: dict = field(default_factory=dict)
    scores: list[float] = field(default_factory=list)  # higher = keep (log a, or logits)
    check: dict | None = None  # held-out calibration KL of this choice and of Block Influence's
    swaps: dict | None = None  # the swap refinement (``swap_refine``): KL before/after, accepted swaps

    def importance(self) -> list[float]:
        """One number per original layer, higher = more important (for choosing which member
        of a shared group gives its weights): the scores where there are, else the gates."""
        return self.scores if self.scores else self.gates

    def to_dict(self) -> dict:
        clean = lambda xs: [None if isinstance(x, float) and math.isnan(x) else x for x in xs]  # noqa: E731
        return {
            "gates": clean(self.gates),
            "removed": self.removed,
            "scores": clean(self.scores),
            "check": self.check,
            "swaps": self.swaps,
            "rounds": self.rounds,
            "options": self.options,
        }


def gate_ranking(
    model: nn.Module,
    arch: Architecture,
    input_ids: torch.Tensor,
    n_remove: int,
    opts: GateOptions | None = None,
    *,
    heldout: torch.Tensor | None = None,
    block_influence_removed: Sequence[int] | None = None,
    progress: bool = True,
    checkpoints=None,
) -> GateResult:
    """Train gates toward removing ``n_remove`` layers, in ``opts.rounds`` rounds.

    Each round trains gates on the layers still present (with the original, full model as the
    teacher throughout), then removes its share of the lowest-ranked layers from a working
    copy. The input model is not modified. Layers removed in an earlier round keep the gate
    and score they had then.

    ``heldout``: rows the gates never saw; the choice is then compared with Block Influence's
    (``block_influence_removed``, or computed here on ``input_ids``) by ``check_choice``.
    ``checkpoints``: each round's training checkpoints and resumes (see :func:`train_gates`).
    """
    import copy

    from ..models.surgery import remove_layers

    opts = opts or GateOptions()
    opts.validate()
    n = len(decoder_layers(model, arch))
    if not 0 < n_remove < n:
        raise LayerfoldError(f"cannot remove {n_remove} of {n} layers (choose 1 to {n - 1})")
    rounds = min(opts.rounds, n_remove)
    teacher = reference_log_probs(model, input_ids, opts.batch_size)
    prior = bi = None
    if opts.warm_start == "block-influence" and opts.gate_type == "hard-concrete":  # one pass; the same scores give the check its BI choice
        bi = block_influence_scores(model, arch, input_ids, progress=progress)
        prior = bi
        if block_influence_removed is None:
            block_influence_removed = lowest_gated(bi, n_remove)
    work = model if rounds == 1 else copy.deepcopy(model)
    alive = list(range(n))  # original index of each layer of ``work``
    final = [math.nan] * n
    scores = [math.nan] * n
    removed: list[int] = []
    log_rounds = []
    for r in range(rounds):
        share = n_remove * (r + 1) // rounds - n_remove * r // rounds
        keep_now = len(alive) - share
        desc = "training layer gates" + (f" (round {r + 1}/{rounds})" if rounds > 1 else "")
        # the constraint aims at this round's size; the soft budget always at the final size
        keep = n - n_remove if opts.gate_type == "soft" else keep_now
        prior_now = None if prior is None else [prior[l] for l in alive]
        t = train_gates(work, arch, input_ids, keep, opts, teacher=teacher, prior=prior_now, progress=progress,
                        desc=desc, checkpoints=checkpoints, name=f"gates-round{r + 1}")
        drop_local = lowest_gated(t.scores, share)
        for i, l in enumerate(alive):
            final[l], scores[l] = t.gates[i], t.scores[i]
        drop = [alive[i] for i in drop_local]
        removed += drop
        log_rounds.append({"layers": list(alive), "gates": t.gates, "scores": t.scores, "removed": drop,
                           "log": t.log})
        if r < rounds - 1:
            remove_layers(work, arch, drop_local)
            alive = [l for i, l in enumerate(alive) if i not in set(drop_local)]
    result = GateResult(final, removed, log_rounds, asdict(opts), scores)
    if opts.swap_rounds > 0:
        warm = lowest_gated(prior, n_remove) if prior is not None else None
        order = scores
        if opts.swap_order == "block-influence":  # the warm start's pass when there was one, else one pass now
            order = bi if bi is not None else block_influence_scores(model, arch, input_ids, progress=progress)
        result.swaps = swap_refine(model, arch, input_ids, teacher, removed, order, opts.swap_rounds,
                                   warm=warm, window=opts.swap_window, rows=opts.swap_rows,
                                   batch_size=opts.batch_size, progress=progress)
        result.swaps["order"] = opts.swap_order
        if result.swaps["removed"] != sorted(removed):
            result.removed = removed = result.swaps["removed"]
            result.gates = [0.0 if l in set(removed) else (1.0 if opts.gate_type != "soft" else g)
                            for l, g in enumerate(final)]
    if heldout is not None:
        if block_influence_removed is None:
            block_influence_removed = block_influence_choice(model, arch, input_ids, n_remove, progress=progress)
        result.check = check_choice(model, arch, heldout, {"gates": sorted(removed),
                                                            "block_influence": sorted(block_influence_removed)})
    return result


@torch.no_grad()
def masked_kl(model, arch, input_ids: torch.Tensor, teacher: torch.Tensor, removed: Sequence[int],
              batch_size: int = 2) -> float:
    """Mean per-token KL(original || model with ``removed`` switched off) on ``input_ids``
    (``teacher``: the original's log-probabilities there), in batches, without gradients."""
    from ..models.loading import input_device

    n = len(decoder_layers(model, arch))
    device = input_device(model)
    total, count = 0.0, 0
    with gated(model, arch, switched_off(n, removed)):
        for i in range(0, input_ids.shape[0], batch_size):
            logits = model(input_ids=input_ids[i:i + batch_size].to(device), use_cache=False).logits
            terms = kl_terms(logits, teacher[i:i + batch_size].to(logits.device))
            total += terms.double().sum().item()
            count += terms.numel()
    return total / count


class _SwapScorer:
    """Calibration KL of removal sets on fixed rows, run layer by layer (``LayerStack``).

    ``start(removed)`` runs the current set once and keeps, per batch, the state entering each
    kept layer; a candidate one swap away is identical to it below the first layer whose
    membership differs, so ``kl(candidate)`` starts from the state kept there and runs only the
    layers from that point on (on average about half the model near its middle)."""

    def __init__(self, model, arch, input_ids: torch.Tensor, teacher: torch.Tensor, batch_size: int):
        from ..methods.search import LayerStack

        self.stack = LayerStack(model, arch, input_ids, batch_size=batch_size)
        self.n = len(self.stack.layers)
        self.reference = [teacher[i:i + batch_size] for i in range(0, input_ids.shape[0], batch_size)]
        self.tokens = input_ids.numel()
        self.kept: list[int] = []
        self.states: list[list[torch.Tensor]] = []

    def _kl(self, h: torch.Tensor, b: int) -> float:
        return self.stack.loss(h, b, "kl", self.reference)

    def start(self, removed: Sequence[int]) -> float:
        gone = set(removed)
        self.kept = [l for l in range(self.n) if l not in gone]
        self.states, total = [], 0.0
        for b in range(len(self.stack.rows)):
            rec: list = []
            out = self.stack.run(self.kept, b, record=rec)
            self.states.append(rec + [out])
            total += self._kl(out, b)
        return total / self.tokens

    def kl(self, removed: Sequence[int]) -> float:
        gone = set(removed)
        kept = [l for l in range(self.n) if l not in gone]
        changed = set(kept) ^ set(self.kept)
        first = min(changed) if changed else self.n
        p = sum(1 for l in self.kept if l < first)  # the same count in ``kept``: below ``first`` they agree
        total = 0.0
        for b in range(len(self.stack.rows)):
            h = self.stack.run(kept, b, h=self.states[b][p], start=p)
            total += self._kl(h, b)
        return total / self.tokens


@torch.no_grad()
def swap_refine(model, arch, input_ids: torch.Tensor, teacher: torch.Tensor, removed: Sequence[int],
                scores: Sequence[float], rounds: int, *, warm: Sequence[int] | None = None,
                window: int = 4, rows: int = 8, batch_size: int = 2, progress: bool = True,
                memo: dict | None = None) -> dict:
    """Greedy swap search near the gates' boundary, scored by calibration KL on the first
    ``rows`` of the gates' own rows (``teacher``: the original's log-probabilities there, already
    computed for the gates). With one gate sample and a few rows a step, independent gates
    cannot see a saving that only appears when two layers are off together; trying the removal
    sets one swap away (the ``window`` removed layers of highest score against the ``window``
    kept layers of lowest score) catches it. Each round takes the candidate of lowest KL if it
    is lower than the current one (in the first round the warm start's own choice ``warm`` is a
    candidate too), and stops when none is. ``scores`` orders the window (low = removable:
    the gates' log a, or Block Influence). ``memo`` (removal set -> KL on these rows) lets
    calls on the same rows share candidates; a set seen before is not run again. Returns the
    record kept in the scores JSON."""
    from tqdm.auto import tqdm

    model_was_training = model.training
    model.eval()
    n = len(scores)
    ids, ref = input_ids[:rows], teacher[:rows]
    scorer = _SwapScorer(model, arch, ids, ref, batch_size)
    memo = {} if memo is None else memo
    current = sorted(removed)
    kl = first = scorer.start(current)
    memo[tuple(current)] = kl
    accepted, tried = [], []
    try:
        for r in range(rounds):
            gone = set(current)
            out = sorted(current, key=lambda l: (-scores[l], l))[:window]  # removed, nearest the boundary
            back = sorted((l for l in range(n) if l not in gone), key=lambda l: (scores[l], l))[:window]
            candidates = [(f"swap {o} for {b}", sorted((gone - {o}) | {b})) for o in out for b in back]
            if r == 0 and warm is not None and sorted(warm) != current:
                candidates.append(("warm start's choice", sorted(warm)))
            best = None
            bar = tqdm(candidates, desc=f"gate swap round {r + 1}/{rounds}", unit="candidate", disable=not progress)
            for label, cand in bar:
                key = tuple(cand)
                c = memo[key] if key in memo else scorer.kl(cand)
                memo[key] = c
                tried.append({"round": r + 1, "move": label, "removed": cand, "kl": c})
                if c < kl and (best is None or c < best[0]):
                    best = (c, label, cand)
                bar.set_postfix(kl=f"{kl:.4f}", best=f"{best[0]:.4f}" if best else "-")
            bar.close()
            if best is None:
                log.info("gate swap round %d: no swap lowers the calibration KL %.4f; stop", r + 1, kl)
                break
            entry = {"round": r + 1, "move": best[1], "removed": best[2], "kl_before": kl, "kl_after": best[0]}
            log.info("gate swap round %d: %s: calibration KL %.4f -> %.4f, removed %s", r + 1, best[1], kl,
                     best[0], best[2])
            accepted.append(entry)
            kl, current = best[0], best[2]
            if r + 1 < rounds:
                scorer.start(current)
    finally:
        model.train(model_was_training)
    return {"rounds": rounds, "window": window, "rows": int(ids.shape[0]), "tokens": int(ids.numel()),
            "kl_before": first, "kl_after": kl, "removed": current, "accepted": accepted, "tried": tried}


def block_influence_scores(model, arch, input_ids: torch.Tensor, *, progress: bool = True) -> list[float]:
    """ShortGPT's Block Influence of every layer on ``input_ids`` (low = removable)."""
    from . import measure_similarity

    return measure_similarity(model, arch, input_ids, progress=progress).block_influence


def block_influence_choice(model, arch, input_ids: torch.Tensor, n_remove: int, *, progress: bool = True) -> list[int]:
    """ShortGPT's choice: the ``n_remove`` layers of lowest Block Influence on ``input_ids``."""
    from ..methods.pruning import block_influence
    from . import measure_similarity

    return block_influence(measure_similarity(model, arch, input_ids, progress=progress), n_remove)


@torch.no_grad()
def check_choice(model, arch, heldout: torch.Tensor, choices: dict[str, Sequence[int]],
                 reference: torch.Tensor | None = None) -> dict:
    """For each named choice of layers to remove: KL to the original, top-1 agreement and
    perplexity on ``heldout`` with those layers switched off (which equals removing them)."""
    n = len(decoder_layers(model, arch))
    if reference is None:
        reference = reference_log_probs(model, heldout)
    out = {}
    for name, removed in choices.items():
        with gated(model, arch, switched_off(n, removed)):
            fit = compare_to_reference(model, heldout, reference)
        out[name] = {"removed": sorted(removed), "kl": fit.kl, "top1": fit.top1, "ppl": fit.ppl}
    out["reference_ppl"] = fit.reference_ppl
    out["rows"], out["tokens"] = fit.rows, fit.tokens
    return out


def describe_check(check: dict | None) -> str:
    """One line: the gates' choice against Block Influence's, by held-out calibration KL."""
    if not check:
        return ""
    g, b = check["gates"], check["block_influence"]
    verdict = "gates better" if g["kl"] < b["kl"] else ("the same" if g["kl"] == b["kl"] else "Block Influence better")
    return (f"held-out KL to the original ({check['rows']} rows): gates' choice {g['kl']:.4f} "
            f"(ppl {g['ppl']:.1f}, layers {g['removed']}), Block Influence's {b['kl']:.4f} "
            f"(ppl {b['ppl']:.1f}, layers {b['removed']}): {verdict}")

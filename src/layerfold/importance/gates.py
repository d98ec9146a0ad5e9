"""Learnable layer gates (FoldGPT, arXiv 2407.00928; METHODS.md section 3.1).

Every decoder layer gets one scalar gate g_l = sigmoid(a_l) that scales the outputs of its
residual branches (the modules the architecture table lists as ``residual_branches``: the
attention and MLP outputs, or the post-norms that wrap them). A gate of 1 leaves the layer as
it is; a gate of 0 turns it into the identity, which is exactly what removing it does. All
model weights are frozen and only the gates are trained, jointly, on calibration text:

    loss = KL(teacher || gated model)                         keep the model's behaviour
         + budget_weight * ((sum_l g_l - keep) / L)^2          keep only ``keep`` layers' worth
         + polar_weight(t) * mean_l g_l (1 - g_l)              push each gate to 0 or 1

The teacher is the ungated model; its log-probabilities are computed once and cached. The
budget term pushes all gates down together; the KL term resists most where a layer matters
*given the others*, so the ranking reflects how layers compensate for each other (the
coupling that one-at-a-time scores such as Block Influence miss). The polarising weight is
ramped up over training, so gates first find their order and are then decided. Gates are
attached with forward hooks: nothing in the method depends on the architecture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LayerfoldError
from ..models.architectures import Architecture, get_path
from ..models.surgery import decoder_layers


@dataclass
class GateOptions:
    """How the gates are trained (the paper publishes no values; these are our defaults)."""

    steps: int = 120  # optimiser steps per round
    lr: float = 0.05  # Adam on the gate logits a_l
    init: float = 3.0  # initial logit: sigmoid(3) = 0.95, every layer starts nearly on
    budget_weight: float = 5.0
    polar_weight: float = 1.0  # reached at the end of the ramp
    polar_ramp: float = 0.5  # fraction of steps over which the polarising weight ramps from 0
    batch_size: int = 4
    rounds: int = 1  # remove in this many rounds, retraining the gates in between
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 1:
            raise LayerfoldError(f"--gate-steps must be at least 1 (got {self.steps})")
        if self.rounds < 1:
            raise LayerfoldError(f"--gate-rounds must be at least 1 (got {self.rounds})")
        if self.lr <= 0 or self.budget_weight < 0 or self.polar_weight < 0:
            raise LayerfoldError("gate learning rate must be positive and loss weights non-negative")
        if self.batch_size < 1:
            raise LayerfoldError(f"gate batch size must be at least 1 (got {self.batch_size})")


class LayerGates(nn.Module):
    """One gate logit per decoder layer; ``attach`` hooks them onto a model's residual branches."""

    def __init__(self, num_layers: int, init: float = 3.0):
        super().__init__()
        self.logits = nn.Parameter(torch.full((num_layers,), float(init)))

    def values(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    @contextmanager
    def attached(self, model: nn.Module, arch: Architecture):
        """Within the block, every residual branch of layer l is multiplied by g_l."""
        layers = decoder_layers(model, arch)
        if len(layers) != self.logits.numel():
            raise LayerfoldError(f"{self.logits.numel()} gates for a model with {len(layers)} layers")
        handles = []
        try:
            for l, layer in enumerate(layers):
                for name in arch.residual_branches:
                    try:
                        branch = get_path(layer, name)
                    except AttributeError:
                        raise LayerfoldError(
                            f"layer {l} has no residual branch {name!r} (architecture table entry "
                            f"{arch.model_type!r})"
                        ) from None
                    handles.append(branch.register_forward_hook(self._hook(l)))
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, l: int):
        def scale(module, args, output):
            g = torch.sigmoid(self.logits[l])
            if isinstance(output, tuple):  # attention returns (output, weights, ...)
                return (output[0] * g.to(output[0].dtype),) + tuple(output[1:])
            return output * g.to(output.dtype)

        return scale


@dataclass
class GateResult:
    """Final gate values per original layer (NaN for layers removed in an earlier round)."""

    gates: list[float]
    removed: list[int]  # original indices, in the order they were removed
    rounds: list[dict] = field(default_factory=list)  # per round: layers, gates, loss curve
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "gates": [None if math.isnan(g) else g for g in self.gates],
            "removed": self.removed,
            "rounds": self.rounds,
            "options": self.options,
        }


@torch.no_grad()
def teacher_log_probs(model: nn.Module, input_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The ungated model's next-token log-probabilities, once, stored in float16 on the CPU."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, input_ids.shape[0], batch_size):
        logits = model(input_ids=input_ids[i : i + batch_size].to(device), use_cache=False).logits
        out.append(F.log_softmax(logits.float(), dim=-1).to(torch.float16).cpu())
    return torch.cat(out)


def kl_to_teacher(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), from logits and cached teacher log-probs."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = teacher_logp.float()
    return (t.exp() * (t - s)).sum(-1).mean()


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


def train_gates(
    model: nn.Module,
    arch: Architecture,
    input_ids: torch.Tensor,
    keep: int,
    opts: GateOptions | None = None,
    *,
    teacher: torch.Tensor | None = None,
    progress: bool = True,
    desc: str = "training layer gates",
) -> tuple[list[float], list[dict]]:
    """Train one gate per layer of ``model`` (weights frozen) toward keeping ``keep`` layers.

    Returns the final gate values and the loss log (one entry per step).
    """
    from tqdm.auto import tqdm

    opts = opts or GateOptions()
    opts.validate()
    n = len(decoder_layers(model, arch))
    if not 0 < keep <= n:
        raise LayerfoldError(f"cannot keep {keep} of {n} layers")
    device = next(model.parameters()).device
    if teacher is None:
        teacher = teacher_log_probs(model, input_ids, opts.batch_size)
    gates = LayerGates(n, opts.init).to(device)
    optim = torch.optim.Adam(gates.parameters(), lr=opts.lr)
    gen = torch.Generator().manual_seed(opts.seed)
    log: list[dict] = []
    was_training = model.training
    model.eval()  # no dropout: the gates should see the model as it will be used
    bar = tqdm(range(opts.steps), desc=desc, unit="step", disable=not progress)
    try:
        with _frozen(model), gates.attached(model, arch):
            for step in bar:
                rows = torch.randperm(input_ids.shape[0], generator=gen)[: opts.batch_size]
                logits = model(input_ids=input_ids[rows].to(device), use_cache=False).logits
                kl = kl_to_teacher(logits, teacher[rows].to(device))
                g = gates.values()
                budget = ((g.sum() - keep) / n) ** 2
                ramp = min(1.0, (step + 1) / max(1.0, opts.polar_ramp * opts.steps))
                polar = (g * (1 - g)).mean()
                loss = kl + opts.budget_weight * budget + opts.polar_weight * ramp * polar
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                entry = {"step": step + 1, "loss": loss.item(), "kl": kl.item(),
                         "budget": budget.item(), "polar": polar.item(), "sum_g": g.sum().item()}
                log.append(entry)
                bar.set_postfix(kl=f"{entry['kl']:.3f}", sum_g=f"{entry['sum_g']:.1f}")
    finally:
        bar.close()
        model.train(was_training)
    return gates.values().detach().cpu().tolist(), log


def lowest_gated(gates: Sequence[float], n_remove: int) -> list[int]:
    """Indices of the ``n_remove`` lowest gates (ties broken toward later layers staying)."""
    order = sorted(range(len(gates)), key=lambda l: (gates[l], l))
    return sorted(order[:n_remove])


def gate_ranking(
    model: nn.Module,
    arch: Architecture,
    input_ids: torch.Tensor,
    n_remove: int,
    opts: GateOptions | None = None,
    *,
    progress: bool = True,
) -> GateResult:
    """Train gates toward removing ``n_remove`` layers, in ``opts.rounds`` rounds.

    Each round trains gates on the layers still present (with the original, full model as the
    teacher throughout), then removes its share of the lowest-gated layers from a working copy.
    The input model is not modified. Final gates are those of the last round; layers removed
    earlier keep the gate value they had when they were removed.
    """
    import copy

    from ..models.surgery import remove_layers

    opts = opts or GateOptions()
    opts.validate()
    n = len(decoder_layers(model, arch))
    if not 0 < n_remove < n:
        raise LayerfoldError(f"cannot remove {n_remove} of {n} layers (choose 1 to {n - 1})")
    rounds = min(opts.rounds, n_remove)
    teacher = teacher_log_probs(model, input_ids, opts.batch_size)
    work = model if rounds == 1 else copy.deepcopy(model)
    alive = list(range(n))  # original index of each layer of ``work``
    final = [math.nan] * n
    removed: list[int] = []
    log_rounds = []
    for r in range(rounds):
        share = n_remove * (r + 1) // rounds - n_remove * r // rounds
        target_keep = n - n_remove  # the budget always aims at the final size
        desc = "training layer gates" + (f" (round {r + 1}/{rounds})" if rounds > 1 else "")
        values, log = train_gates(work, arch, input_ids, target_keep, opts, teacher=teacher,
                                  progress=progress, desc=desc)
        drop_local = lowest_gated(values, share)
        for i, l in enumerate(alive):
            final[l] = values[i]
        drop = [alive[i] for i in drop_local]
        removed += drop
        log_rounds.append({"layers": list(alive), "gates": values, "removed": drop, "log": log})
        if r < rounds - 1:
            remove_layers(work, arch, drop_local)
            alive = [l for i, l in enumerate(alive) if i not in set(drop_local)]
    return GateResult(final, removed, log_rounds, asdict(opts))

"""LoRA adapters that respect shared weights (FoldGPT's cure; healing a shared model).

PEFT gives every linear *module* its own adapter. In a model whose layers share weights
(``nn.shared``) that is wrong twice: each member of a group learns its own correction of the
one shared matrix, and merging adds every member's correction into that same tensor, so each
member ends up with the sum of all of them. Here an adapter belongs to a *weight tensor*: the
members of a shared group use one adapter (A, B), its gradient is the sum over the members
(as the shared weight's own gradient would be), and merging adds ``scale * B A`` to the shared
tensor once. The result is the same shared model, one matrix per group, with the update in it.

    wrapped = add_lora(model, arch, rank=16, alpha=32, seed=0)   # adapters on decoder linears
    ... train the adapters ...
    merge_lora(model)                                            # once per tensor; plain nn.Linear again

A (rank x in) starts Kaiming-uniform, B (out x rank) at zero, as in PEFT, drawn in module
order from one seeded CPU generator.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import LayerfoldError
from ..models.architectures import Architecture
from ..models.surgery import decoder_layers


class LowRankAdapter(nn.Module):
    """The trainable pair of one weight tensor: its update is ``scale * b @ a``."""

    def __init__(self, weight: torch.Tensor, rank: int, scale: float, generator: torch.Generator):
        super().__init__()
        out_features, in_features = weight.shape
        start = torch.empty(rank, in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(start, a=math.sqrt(5), generator=generator)
        self.a = nn.Parameter(start.to(weight.device, weight.dtype))
        self.b = nn.Parameter(torch.zeros(out_features, rank, dtype=weight.dtype, device=weight.device))
        self.scale = scale

    def delta(self) -> torch.Tensor:
        return self.scale * (self.b @ self.a)


class LoRALinear(nn.Module):
    """A linear layer (``base``, untouched) plus an adapter that may be shared with other layers."""

    def __init__(self, base: nn.Linear, adapter: LowRankAdapter):
        super().__init__()
        self.base = base
        self.lora = adapter

    @property
    def weight(self) -> torch.Tensor:  # what code reading ``module.weight`` expects (shape, dtype)
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = nn.functional.linear(nn.functional.linear(x, self.lora.a), self.lora.b)
        return self.base(x) + self.lora.scale * low


def _wanted(name: str, modules: str) -> bool:
    if modules == "all-linear":
        return True
    return name.rpartition(".")[2] in {m.strip() for m in modules.split(",") if m.strip()}


def add_lora(model: nn.Module, arch: Architecture, rank: int, alpha: float, *, modules: str = "all-linear",
             seed: int = 0) -> list[nn.Parameter]:
    """Wrap the linear layers of every decoder layer (``modules``: all-linear or names like
    q_proj,v_proj) in :class:`LoRALinear`, one adapter per distinct weight tensor; freeze
    those weights. Returns the adapted weight tensors (frozen, each once)."""
    if rank < 1:
        raise LayerfoldError(f"the LoRA rank must be at least 1 (got {rank})")
    g = torch.Generator().manual_seed(seed)
    adapters: dict[int, LowRankAdapter] = {}
    weights: list[nn.Parameter] = []
    for layer in decoder_layers(model, arch):
        targets = [(name, mod) for name, mod in layer.named_modules()
                   if isinstance(mod, nn.Linear) and name and _wanted(name, modules)
                   and not isinstance(mod, LoRALinear)]
        for name, mod in targets:
            key = id(mod.weight)
            if key not in adapters:
                adapters[key] = LowRankAdapter(mod.weight, rank, alpha / rank, g)
                weights.append(mod.weight)
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, child, LoRALinear(mod, adapters[key]))
    if not adapters:
        raise LayerfoldError(f"no linear layers named {modules} in the decoder layers; cannot add LoRA")
    for w in weights:
        w.requires_grad_(False)
    return weights


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Add each adapter's update to its weight tensor once and put the plain linear layers
    back; returns the number of tensors updated."""
    merged: set[int] = set()
    wrappers = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, LoRALinear)]
    for name, mod in wrappers:
        if id(mod.lora) not in merged:
            w = mod.base.weight
            w.add_(mod.lora.delta().to(w.dtype))
            merged.add(id(mod.lora))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, mod.base)
    return len(merged)


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())

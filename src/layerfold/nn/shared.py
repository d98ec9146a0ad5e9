"""Group parameter sharing (FoldGPT, METHODS.md section 3.2): the transform.

Adjacent decoder layers form groups; within a group every ``nn.Linear`` weight (the attention
and MLP projections: all the large matrices) is one ``nn.Parameter`` object used by every
member. Norms, biases and anything else stay per layer. Sharing divides the stored
parameters of a group by its size; compute per token does not change.

Optionally (``delta_rank`` r > 0) every member keeps some freedom: its linear layers become
``LowRankDeltaLinear``, the shared weight plus a rank-r delta B A of its own, initialised from
the truncated SVD of the member's difference to the shared weight, so the member starts as
the best rank-r correction toward its original weight (Relaxed Recursive Transformers, arXiv
2410.20672; FlexiGPT, arXiv 2501.14713). The deltas are ordinary parameters: stored
parameters count them, and a shared folder stores them beside the shared tensors
(``delta_ranks`` names them for the config, ``attach_deltas`` rebuilds the modules on load,
``fold_deltas`` writes W + B A out as a plain weight when unfolding).

How a shared model is stored and loaded (each shared tensor once, a sharing map in
``config.json``) is ``layerfold.export.shared``; materialising the shared tensors again is
``layerfold.export.unfold``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import LayerfoldError
from ..models.architectures import Architecture
from ..models.surgery import decoder_layers

SHARE_INITS = ("important", "mean")


# -- groups ------------------------------------------------------------------------------


def adjacent_groups(num_layers: int, size: int) -> list[list[int]]:
    """Consecutive groups of ``size`` layers; the last group takes what is left."""
    if size < 1:
        raise LayerfoldError(f"--group-size must be at least 1 (got {size})")
    return [list(range(s, min(s + size, num_layers))) for s in range(0, num_layers, size)]


def parse_groups(text: str, num_layers: int) -> list[list[int]]:
    """``"0-1,2-3,4"`` -> [[0, 1], [2, 3], [4]]; layers not named stay alone.

    Indices count the layers of the model being shared (after any removal). Groups must be
    ranges of adjacent layers and must not overlap.
    """
    groups: list[list[int]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise LayerfoldError(f"--groups: cannot read {part!r}; write ranges like 0-1,2-3")
        a, b = int(m[1]), int(m[2] or m[1])
        if b < a or b >= num_layers:
            raise LayerfoldError(f"--groups: {part!r} is not a range inside layers 0..{num_layers - 1}")
        groups.append(list(range(a, b + 1)))
    seen = [l for g in groups for l in g]
    if len(seen) != len(set(seen)):
        raise LayerfoldError(f"--groups: {text!r} names a layer twice")
    rest = [[l] for l in range(num_layers) if l not in set(seen)]
    return sorted(groups + rest)


# -- sharing -----------------------------------------------------------------------------


def _linear_weights(layer: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Every nn.Linear weight of a layer: relative name -> (owning module, attribute)."""
    return {
        f"{name}.weight" if name else "weight": (mod, "weight")
        for name, mod in layer.named_modules()
        if isinstance(mod, nn.Linear)
    }


@torch.no_grad()
def share_groups(
    model: nn.Module,
    arch: Architecture,
    groups: Sequence[Sequence[int]],
    *,
    init: str = "important",
    importance: Sequence[float] | None = None,
    delta_rank: int = 0,
) -> dict[str, str]:
    """Make the layers of each group use one Parameter per linear weight.

    ``init``: ``important`` copies the weights of the member with the highest ``importance``
    (e.g. its FoldGPT gate; without scores, the first member), ``mean`` averages the members.
    The shared Parameter lives in the group's first layer. ``delta_rank`` > 0 gives every
    member of a group its own rank-``delta_rank`` delta (see the module docstring). Returns the
    map of parameter names: each non-first member's name -> the first member's (names
    relative to the model).
    """
    if delta_rank < 0:
        raise LayerfoldError(f"the delta rank must be 0 or more (got {delta_rank})")
    if init not in SHARE_INITS:
        raise LayerfoldError(f"--share-init must be one of {', '.join(SHARE_INITS)} (got {init!r})")
    layers = decoder_layers(model, arch)
    n = len(layers)
    flat = [l for g in groups for l in g]
    if sorted(flat) != sorted(set(flat)) or any(not 0 <= l < n for l in flat):
        raise LayerfoldError(f"invalid groups {list(map(list, groups))} for {n} layers")
    if importance is not None and len(importance) != n:
        raise LayerfoldError(f"{len(importance)} importance scores for {n} layers")
    tied: dict[str, str] = {}
    for group in groups:
        group = sorted(group)
        if len(group) < 2:
            continue
        if any(group[i + 1] != group[i] + 1 for i in range(len(group) - 1)):
            raise LayerfoldError(f"group {group} is not a run of adjacent layers")
        owner = group[0]
        members = {l: _linear_weights(layers[l]) for l in group}
        names = list(members[owner])
        if any(list(members[l]) != names for l in group):
            raise LayerfoldError(f"layers {group} do not have the same linear layers; cannot share them")
        best = max(group, key=lambda l: importance[l]) if importance is not None else owner
        for rel in names:
            params = [getattr(*members[l][rel]) for l in group]
            if any(p.shape != params[0].shape for p in params):
                raise LayerfoldError(f"{rel} differs in shape across layers {group}; cannot share it")
            if init == "mean":
                value = torch.stack([p.float() for p in params]).mean(0)
            else:
                value = getattr(*members[best][rel])
            shared = nn.Parameter(value.to(params[0].dtype).clone(), requires_grad=params[0].requires_grad)
            originals = [p.detach().clone() for p in params] if delta_rank else []
            for i, l in enumerate(group):
                mod, attr = members[l][rel]
                setattr(mod, attr, shared)
                if l != owner:
                    tied[f"{arch.layers}.{l}.{rel}"] = f"{arch.layers}.{owner}.{rel}"
                if delta_rank:
                    module_name = rel.rpartition(".")[0]
                    parent_name, _, child = module_name.rpartition(".")
                    parent = layers[l].get_submodule(parent_name) if parent_name else layers[l]
                    setattr(parent, child, LowRankDeltaLinear(mod, originals[i], delta_rank))
    return tied


class LowRankDeltaLinear(nn.Linear):
    """A linear layer of a shared group: the group's weight W (the same Parameter in every
    member) plus this member's own rank-r delta, W_eff = W + B A.

    Built from the member's linear layer after sharing and its original weight W_0: B A is
    the truncated SVD of W_0 - W (B = U_r S_r, A = V_r^T), the closest rank-r matrix to the
    difference. Where the difference is 0 (the member that gave its weights) B starts at 0
    and A at orthonormal rows, like a LoRA adapter, so the delta can still train.
    """

    def __init__(self, base: nn.Linear, original: torch.Tensor | None, rank: int):
        nn.Module.__init__(self)  # not nn.Linear's: the weight is the shared one, not a new one
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        w = base.weight
        dtype, grad = w.dtype, w.requires_grad
        if original is None:  # to be filled with stored values (a saved folder's deltas)
            r = min(rank, w.shape[0], w.shape[1])
            self.delta_b = nn.Parameter(torch.zeros(w.shape[0], r, dtype=dtype, device=w.device), requires_grad=grad)
            self.delta_a = nn.Parameter(torch.zeros(r, w.shape[1], dtype=dtype, device=w.device), requires_grad=grad)
            return
        diff = original.float() - w.detach().float()
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        r = min(rank, s.numel())
        self.delta_b = nn.Parameter((u[:, :r] * s[:r]).to(dtype), requires_grad=grad)  # [out, r]
        self.delta_a = nn.Parameter(vh[:r].contiguous().to(dtype), requires_grad=grad)  # [r, in]

    def effective_weight(self) -> torch.Tensor:
        return self.weight + self.delta_b @ self.delta_a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias) + nn.functional.linear(
            nn.functional.linear(x, self.delta_a), self.delta_b)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, delta_rank={self.delta_a.shape[0]}"


def delta_ranks(model: nn.Module) -> dict[str, int]:
    """The modules with per-layer deltas: module name -> rank (what a shared folder's config records)."""
    return {name: m.delta_a.shape[0] for name, m in model.named_modules() if isinstance(m, LowRankDeltaLinear)}


def attach_deltas(model: nn.Module, ranks: dict[str, int]) -> None:
    """Turn each named linear layer into a :class:`LowRankDeltaLinear` with zero deltas of its
    rank, ready to receive stored values."""
    for name, rank in ranks.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise LayerfoldError(f"stored deltas for {name}, which this model does not have") from None
        if not isinstance(mod, nn.Linear):
            raise LayerfoldError(f"stored deltas for {name}, which is not a linear layer")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, LowRankDeltaLinear(mod, None, rank))


@torch.no_grad()
def fold_deltas(model: nn.Module) -> int:
    """Replace every :class:`LowRankDeltaLinear` by a plain linear layer whose own weight is
    W + B A (the shared weight is no longer shared there); returns how many."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, LowRankDeltaLinear)]
    for name, m in found:
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight = nn.Parameter(m.effective_weight().detach().clone(), requires_grad=m.weight.requires_grad)
        if m.bias is not None:
            plain.bias = m.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    return len(found)


def shared_parameter_map(model: nn.Module, exclude: Sequence[str] = ()) -> dict[str, str]:
    """Names that point at an earlier name's Parameter: later name -> first name.

    ``exclude`` lists target names transformers already ties by itself (lm_head).
    """
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            if name not in exclude:
                out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def tie_parameters(model: nn.Module, mapping: dict[str, str]) -> None:
    """Point every target parameter name at its source's Parameter object."""
    for target, source in mapping.items():
        try:
            src = model.get_parameter(source)
            parent_name, _, attr = target.rpartition(".")
            parent = model.get_submodule(parent_name)
            old = getattr(parent, attr)
        except AttributeError:
            raise LayerfoldError(f"shared weight {target} -> {source} does not fit this model") from None
        if old.shape != src.shape:
            raise LayerfoldError(f"shared weight {target} has shape {tuple(old.shape)}, source {tuple(src.shape)}")
        setattr(parent, attr, src)


@torch.no_grad()
def unshare(model: nn.Module, mapping: dict[str, str]) -> None:
    """Give every target its own copy of the shared tensor (a standard, unshared model)."""
    for target in mapping:
        parent_name, _, attr = target.rpartition(".")
        parent = model.get_submodule(parent_name)
        p = getattr(parent, attr)
        setattr(parent, attr, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))


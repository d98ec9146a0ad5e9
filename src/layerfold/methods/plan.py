"""What a compression will do, decided before any weight changes.

A :class:`Plan` names the layers that go, what stands in for them, which kept layers share
weights, and the exact parameter and byte counts before and after. It is computed from the
scores and the model's shapes only (a lazily loaded model, or a skeleton built from its
config on the meta device), so ``compress --dry-run`` can print it without reading the
decoder layers, and ``--scores analyze.json`` without reading any weight at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..models.architectures import Architecture
from ..models.layer_map import LayerMap
from ..models.surgery import count_parameters, decoder_layers


def layer_parameters(model: nn.Module, arch: Architecture) -> list[int]:
    """Parameters of each decoder layer, from the shapes (weights may be on the meta device)."""
    return [count_parameters(layer) for layer in decoder_layers(model, arch)]


def shared_parameters(model: nn.Module, arch: Architecture, groups: list[list[int]]) -> int:
    """Parameters that sharing saves: every linear weight is stored once per group, not once per member."""
    layers = decoder_layers(model, arch)
    saved = 0
    for group in groups:
        for member in group[1:]:
            saved += sum(m.weight.numel() for m in layers[member].modules() if isinstance(m, nn.Linear))
    return saved


def delta_parameters(model: nn.Module, arch: Architecture, groups: list[list[int]], rank: int) -> int:
    """Parameters per-layer rank-``rank`` deltas add: every member of a group, every linear
    weight, rank x (in + out) (the rank capped by the matrix's smaller side)."""
    if rank <= 0:
        return 0
    layers = decoder_layers(model, arch)
    return sum(min(rank, *m.weight.shape) * sum(m.weight.shape)
               for group in groups for member in group
               for m in layers[member].modules() if isinstance(m, nn.Linear))


def bytes_per_parameter(model: nn.Module) -> int:
    return next(model.parameters()).element_size()


@dataclass
class Plan:
    """Everything a compression will do, with exact counts (see the module docstring)."""

    method: str
    selection: str
    repair: str
    selected: list[int]  # original layers the selection chose (a replaced block included)
    layer_map: LayerMap  # what will remain: new layer -> original layer
    params_before: int
    params_after: int  # stored parameters, shared tensors once
    bytes_per_parameter: int
    replacements: list[dict] = field(default_factory=list)  # {"new", "block": [first, last], "kind", "parameters"}
    groups: list[list[int]] = field(default_factory=list)  # new layers that share their linear weights
    stages: list[str] = field(default_factory=list)  # what will run, in order
    details: dict = field(default_factory=dict)  # the selection's evidence (block cosine, gates, ...)

    @property
    def removed(self) -> list[int]:
        """Original layers that are gone as themselves (a replaced block's layers included)."""
        return self.layer_map.removed

    @property
    def layers_before(self) -> int:
        return self.layer_map.layers_before

    @property
    def layers_after(self) -> int:
        return len(self.layer_map)

    def to_dict(self) -> dict:
        return {
            "method": self.method, "selection": self.selection, "repair": self.repair, "selected": self.selected,
            "removed": self.removed, "layer_map": self.layer_map.to_list(), "layers_before": self.layers_before,
            "layers_after": self.layers_after, "replacements": self.replacements,
            "groups": [g for g in self.groups if len(g) > 1], "params_before": self.params_before,
            "params_after": self.params_after, "bytes_before": self.params_before * self.bytes_per_parameter,
            "bytes_after": self.params_after * self.bytes_per_parameter, "stages": self.stages,
            "details": self.details,
        }

    def describe(self) -> str:
        """The plan as ``compress --dry-run`` prints it."""
        mib = 2**20
        pct = 100 * (1 - self.params_after / self.params_before) if self.params_before else 0.0
        lines = [
            f"method       {self.method} (selection {self.selection}, repair {self.repair})",
            f"layers       {self.layers_before} -> {self.layers_after} "
            f"(removed {', '.join(map(str, self.removed)) or 'none'})",
            f"layer map    new<-old: {self.layer_map.describe()}",
        ]
        for r in self.replacements:
            lines.append(f"replaces     new layer {r['new']} <- layers {r['block'][0]}..{r['block'][1]}: "
                         f"{r['kind']} ({r['parameters']:,} parameters)")
        shared = [g for g in self.groups if len(g) > 1]
        if shared:
            lines.append("shared       new layers " + " ".join(f"{g[0]}-{g[-1]}" for g in shared)
                         + " share their linear weights")
        lines += [
            f"parameters   {self.params_before:,} -> {self.params_after:,} ({pct:.1f}% fewer)",
            f"bytes        {self.params_before * self.bytes_per_parameter / mib:.1f} MiB -> "
            f"{self.params_after * self.bytes_per_parameter / mib:.1f} MiB "
            f"({self.bytes_per_parameter} bytes per parameter)",
            f"stages       {', '.join(self.stages)}",
        ]
        return "\n".join(lines)

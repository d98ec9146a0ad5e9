"""Layer surgery that keeps a Hugging Face model consistent.

After any change to the layer list, the config's layer count, per-layer config lists,
layer-index thresholds and every module's own layer index (which the KV cache is keyed by)
are rewritten, so the edited model behaves exactly like one built from scratch with the
smaller config and the same weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..errors import LayerfoldError
from .architectures import Architecture, get_path


def decoder_layers(model: nn.Module, arch: Architecture) -> nn.ModuleList:
    return get_path(model, arch.layers)


def _set_layers(model: nn.Module, arch: Architecture, layers: Sequence[nn.Module]) -> None:
    parent_path, _, name = arch.layers.rpartition(".")
    parent = get_path(model, parent_path) if parent_path else model
    setattr(parent, name, nn.ModuleList(layers))


def keep_layers(model: nn.Module, arch: Architecture, keep: Sequence[int]) -> list[int]:
    """Keep only the layers at indices ``keep`` (in that order); returns ``keep``.

    ``keep`` indexes the current layer list. Config fields are rewritten to match.
    """
    layers = decoder_layers(model, arch)
    n = len(layers)
    keep = list(keep)
    if not keep:
        raise LayerfoldError("cannot remove every layer of the model")
    if any(not 0 <= i < n for i in keep) or len(set(keep)) != len(keep):
        raise LayerfoldError(f"invalid layer indices {keep} for a model with {n} layers")
    _set_layers(model, arch, [layers[i] for i in keep])
    _rewrite_config(model.config, arch, keep, n)
    renumber_layers(model, arch)
    return keep


def remove_layers(model: nn.Module, arch: Architecture, remove: Sequence[int]) -> list[int]:
    """Remove the layers at indices ``remove``; returns the kept old indices."""
    n = len(decoder_layers(model, arch))
    bad = [i for i in remove if not 0 <= i < n]
    if bad:
        raise LayerfoldError(f"layer indices {bad} out of range for a model with {n} layers")
    drop = set(remove)
    return keep_layers(model, arch, [i for i in range(n) if i not in drop])


def replace_block(
    model: nn.Module, arch: Architecture, start: int, length: int, replacement: nn.Module
) -> list[int | None]:
    """Replace layers ``start .. start+length-1`` with one module.

    Returns the layer map: for each new layer, the old index it came from (None for the
    replacement). The replacement takes over the config entries (layer type etc.) of the
    block's first layer.
    """
    layers = decoder_layers(model, arch)
    n = len(layers)
    if length < 1 or start < 0 or start + length > n:
        raise LayerfoldError(f"block {start}..{start + length - 1} is outside the model's {n} layers")
    new_layers = list(layers[:start]) + [replacement] + list(layers[start + length :])
    source = list(range(start)) + [start] + list(range(start + length, n))
    _set_layers(model, arch, new_layers)
    _rewrite_config(model.config, arch, source, n)
    renumber_layers(model, arch)
    return list(range(start)) + [None] + list(range(start + length, n))


def renumber_layers(model: nn.Module, arch: Architecture) -> None:
    """Set every module's own layer index to its position (the KV cache is keyed by it)."""
    for new_idx, layer in enumerate(decoder_layers(model, arch)):
        for module in layer.modules():
            for attr in arch.index_attributes:
                if hasattr(module, attr) and isinstance(getattr(module, attr), int):
                    setattr(module, attr, new_idx)


def _rewrite_config(config, arch: Architecture, source: Sequence[int], old_count: int) -> None:
    """Make the config describe layers taken from old indices ``source``."""
    setattr(config, arch.num_layers_key, len(source))
    for key in arch.per_layer_lists:
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == old_count:
            setattr(config, key, [values[i] for i in source])
    for key in arch.layer_thresholds:
        threshold = getattr(config, key, None)
        if isinstance(threshold, int):
            setattr(config, key, sum(1 for i in source if i < threshold))


def count_parameters(model: nn.Module | Iterable[torch.Tensor]) -> int:
    """Distinct parameters of a module (or of some tensors): tied or shared tensors count once.

    The one parameter count of layerfold: reports, plans, replacements and training all use it.
    Tensors on the meta device (layers a streamed model has not read) count by their shape.
    """
    tensors = model.parameters() if isinstance(model, nn.Module) else model
    seen: set[int] = set()
    total = 0
    for p in tensors:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def decoder_parameters(model: nn.Module, arch: Architecture) -> list[int]:
    """Parameter count of each decoder layer."""
    return [count_parameters(layer) for layer in decoder_layers(model, arch)]


@torch.no_grad()
def copy_model(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)

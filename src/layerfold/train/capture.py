"""Capture the raw outputs of chosen decoder layers with forward hooks."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..models.architectures import Architecture, architecture_for
from ..models.surgery import decoder_layers


def unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_layers(model: nn.Module, arch: Architecture | None = None) -> nn.ModuleList:
    base = unwrap(model)
    return decoder_layers(base, arch or architecture_for(base.config))


@contextmanager
def layer_outputs(
    layers: nn.ModuleList, indices: Iterable[int], *, detach: bool = False
) -> Iterator[dict[int, torch.Tensor]]:
    """Yield a dict that fills with ``{layer index: output hidden state}`` during a forward."""
    store: dict[int, torch.Tensor] = {}
    handles = []
    for i in sorted(set(indices)):

        def hook(module, args, out, i=i):
            h = out[0] if isinstance(out, (tuple, list)) else out
            store[i] = h.detach() if detach else h

        handles.append(layers[i].register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()

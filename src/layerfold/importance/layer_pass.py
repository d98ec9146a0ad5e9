"""The calibration pass: run a model one decoder layer at a time.

The activations leaving layer ``l`` are the input of layer ``l+1``. Instead of one opaque
``model(...)`` call, the pass first records what the model's own forward hands each layer
(attention masks, rotary embeddings, per-layer-type variants) by running it with every layer
swapped for a recorder that returns its input untouched, which costs only the embeddings.
It then calls the layers itself, in layer-major order over a chunk of batches, so observers
can see every layer's input and output, and a later streaming mode can load one layer's
weights at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import LayerfoldError
from ..models.architectures import Architecture, get_path
from ..models.lazy import layer_weights
from ..models.surgery import decoder_layers
from ..schema import format_size, parse_size

DEFAULT_ACTIVATION_BYTES = 2 * 2**30


@dataclass
class LayerPassOptions:
    """How the layer-by-layer calibration pass runs (importance scores, training pairs)."""

    batch_size: int = field(default=8, metadata={"help": "sequences per forward pass", "flag": "--batch-size"})
    max_memory: int = field(default=DEFAULT_ACTIVATION_BYTES, metadata={
        "help": "memory for the calibration pass's activations (e.g. 512MiB, 8GB): batches that fit go through "
                "each layer together, so each layer's weights are read once per such chunk",
        "flag": "--max-memory", "parse": parse_size, "show": format_size,
        "allowed": "a memory size like 512MiB or 2GB"})

    def validate(self) -> None:
        if self.batch_size < 1:
            raise LayerfoldError(f"--batch-size must be at least 1 (got {self.batch_size})")


class _Recorder(nn.Module):
    """Stands in for a decoder layer: remembers its call and passes the hidden state on."""

    def __init__(self, layer: nn.Module, store: list):
        super().__init__()
        self.layer = layer  # kept so attribute lookups (e.g. attention_type) still work
        self.store = store

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)

    def forward(self, hidden_states, *args, **kwargs):
        self.store.append((hidden_states, args, kwargs))
        return hidden_states


@dataclass
class LayerInputs:
    """What the model's forward passes to each layer for one batch."""

    hidden: torch.Tensor  # input of layer 0 (the scaled embeddings)
    calls: list[tuple[tuple, dict]]  # per layer: positional and keyword arguments besides hidden


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, arch: Architecture, input_ids: torch.Tensor) -> LayerInputs:
    """Run the base model with recorders in place of layers; return layer 0's input and all kwargs."""
    store = _record(model, arch, input_ids=input_ids)
    hidden = store[0][0]
    calls = [(args, kwargs) for _, args, kwargs in store]
    return LayerInputs(hidden=hidden, calls=calls)


@torch.no_grad()
def layer_arguments(model: nn.Module, arch: Architecture, shape: tuple[int, int], device: torch.device,
                    dtype: torch.dtype) -> list[tuple[tuple, dict]]:
    """Per layer, the arguments besides the hidden states that the model passes for a batch of
    full rows of this shape: the causal mask, rotary cos/sin and positions. They depend on the
    shape only, not on the tokens, so zeros stand in for the embeddings (which may be on disk)."""
    embeds = torch.zeros(*shape, model.config.hidden_size, dtype=dtype, device=device)
    return [(args, kwargs) for _, args, kwargs in _record(model, arch, inputs_embeds=embeds)]


def _record(model: nn.Module, arch: Architecture, **inputs) -> list:
    layers = decoder_layers(model, arch)
    store: list = []
    originals = list(layers)
    for i in range(len(layers)):
        layers[i] = _Recorder(originals[i], store)
    try:
        base = get_path(model, arch.base_model)
        base(**inputs, use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return store


def run_layer(layer: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


# An observer sees (layer index, batch index in chunk, layer input, layer output).
Observer = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def batches(input_ids: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, input_ids.shape[0], batch_size):
        yield input_ids[i : i + batch_size]


@torch.no_grad()
def layer_pass(
    model: nn.Module,
    arch: Architecture,
    input_ids: torch.Tensor,
    *,
    batch_size: int = 8,
    chunk_batches: int = 1,
    on_chunk_start: Callable[[int], None] | None = None,
    observe: Observer | None = None,
    on_chunk_end: Callable[[], None] | None = None,
    progress: bool = True,
    desc: str = "calibration pass",
    stop_at: int | None = None,
) -> None:
    """Push ``input_ids`` through the decoder layer by layer, calling ``observe`` at each layer.

    Work proceeds in chunks of ``chunk_batches`` batches: within a chunk, layer ``l`` runs on
    every batch before layer ``l+1`` starts (layer-major order). ``stop_at`` runs only layers
    ``0 .. stop_at-1`` (for observers that need nothing beyond them).
    """
    from tqdm.auto import tqdm

    layers = list(decoder_layers(model, arch))[:stop_at]
    weights = layer_weights(model, arch)  # lazy models read one layer's weights at a time
    device = next(model.parameters()).device
    all_batches = list(batches(input_ids, batch_size))
    chunks = [all_batches[i : i + chunk_batches] for i in range(0, len(all_batches), chunk_batches)]
    bar = tqdm(total=len(all_batches) * len(layers), desc=desc, unit="layer", disable=not progress)
    try:
        for chunk in chunks:
            inputs = [capture_layer_inputs(model, arch, b.to(device)) for b in chunk]
            states = [x.hidden for x in inputs]
            if on_chunk_start:
                on_chunk_start(len(chunk))
            for l in range(len(layers)):
                layer = weights.acquire(l)
                for b, x in enumerate(inputs):
                    out = run_layer(layer, states[b], x.calls[l])
                    if not torch.isfinite(out).all():
                        raise LayerfoldError(f"decoder layer {l} gives NaN or infinite outputs: the model's weights "
                                             "are broken (check the file, or load it in a wider --dtype)")
                    if observe:
                        observe(l, b, states[b], out)
                    states[b] = out
                    bar.update(1)
                weights.release(l)
            if on_chunk_end:
                on_chunk_end()
    finally:
        bar.close()


@torch.no_grad()
def final_hidden_states(model: nn.Module, arch: Architecture, input_ids: torch.Tensor) -> torch.Tensor:
    """Raw output of the last layer (before the final norm), computed through the layer loop."""
    x = capture_layer_inputs(model, arch, input_ids)
    h = x.hidden
    weights = layer_weights(model, arch)
    for l, call in enumerate(x.calls):
        h = run_layer(weights.acquire(l), h, call)
        weights.release(l)
    return h


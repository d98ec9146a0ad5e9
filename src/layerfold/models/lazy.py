"""Layer-streamed models: decoder layers stay on the meta device until they are used.

A model loaded lazily holds its embeddings, final norm and head in memory, and for each
decoder layer only a skeleton; ``LayerWeights.acquire(l)`` reads layer ``l``'s tensors from
the safetensors files (memory-mapped) and ``release(l)`` drops them again. The calibration
pass asks for layers through the same two calls whether a model is lazy or fully in memory,
so big and small models share one code path.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import LayerfoldError
from .architectures import Architecture
from .surgery import decoder_layers

ORIGIN_ATTR = "_layerfold_origin"  # a lazy layer remembers the checkpoint index it reads from


class SafetensorsFolder:
    """Tensor name -> file, for a folder of (possibly sharded) safetensors."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            self.files = json.loads(index.read_text())["weight_map"]
        else:
            single = self.folder / "model.safetensors"
            if not single.exists():
                raise LayerfoldError(f"{folder}: no safetensors weights (pickle files are never loaded)")
            from safetensors import safe_open

            with safe_open(single, framework="pt") as f:
                self.files = {name: "model.safetensors" for name in f.keys()}

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.files if n.startswith(prefix)]

    def load(self, names: list[str], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for file, group in by_file.items():
            with safe_open(self.folder / file, framework="pt", device="cpu") as f:
                for n in group:
                    t = f.get_tensor(n)
                    out[n] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        return out


class LayerWeights:
    """Hands out decoder layers with their weights present; the same calls for every model."""

    def __init__(self, model: nn.Module, arch: Architecture, source: SafetensorsFolder | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | None = None,
                 deferred: list[str] | None = None):
        self.model, self.arch, self.source = model, arch, source
        self.dtype, self.device = dtype, device
        self.deferred = list(deferred or [])  # tensors outside the layers left on disk (an untied head, ...)

    def load_deferred(self) -> None:
        """Read the tensors outside the layers left on disk (an untied output head, parked embeddings)."""
        if self.source is None or not self.deferred:
            return
        state = self.source.load(self.deferred, self.dtype, self.device)
        self.model.load_state_dict(state, strict=False, assign=True)
        self.deferred = []

    def park_input_embeddings(self) -> bool:
        """Send the input embeddings back to disk once no pass needs them any more (before a
        replacement trains on cached pairs): on a big vocabulary they are the largest tensor
        outside the layers. They come back like the deferred head, for generation or saving.
        Tied embeddings stay (the head is the same tensor). Returns whether they were parked."""
        emb = self.model.get_input_embeddings()
        head = self.model.get_output_embeddings()
        if self.source is None or emb is None or emb.weight.device.type == "meta":
            return False
        if head is not None and head.weight is emb.weight:
            return False
        names = [n for n, q in self.model.named_parameters() if q is emb.weight]
        if not names or any(n not in self.source.files for n in names):
            return False
        emb.weight = nn.Parameter(emb.weight.to("meta"), requires_grad=emb.weight.requires_grad)
        self.deferred.extend(names)
        return_freed_memory()
        return True

    @property
    def lazy(self) -> bool:
        return self.source is not None

    def acquire(self, index: int) -> nn.Module:
        layer = decoder_layers(self.model, self.arch)[index]
        origin = getattr(layer, ORIGIN_ATTR, None)
        if self.source is None or origin is None or not _on_meta(layer):
            return layer
        prefix = f"{self.arch.layers}.{origin}."
        tensors = self.source.load(self.source.names(prefix), self.dtype, self.device)
        state = {n[len(prefix):]: t for n, t in tensors.items()}
        layer.load_state_dict(state, strict=True, assign=True)
        return layer

    def keep(self, index: int) -> None:
        """Keep layer ``index`` in memory from now on (after ``acquire``): its weights were
        changed in place, so the checkpoint no longer holds them; saving writes these."""
        layer = decoder_layers(self.model, self.arch)[index]
        if hasattr(layer, ORIGIN_ATTR):
            delattr(layer, ORIGIN_ATTR)

    def release(self, index: int) -> None:
        layer = decoder_layers(self.model, self.arch)[index]
        if self.source is not None and getattr(layer, ORIGIN_ATTR, None) is not None:
            for module in layer.modules():
                for name, p in list(module.named_parameters(recurse=False)):
                    setattr(module, name, nn.Parameter(p.to("meta"), requires_grad=p.requires_grad))
            return_freed_memory()


def return_freed_memory() -> None:
    """Give memory freed by Python back to the operating system (glibc keeps freed blocks of
    up to 32 MB in its heap, so a layer-by-layer pass would otherwise grow by about a layer's
    worth of fragments per layer); a no-op where the C library has no ``malloc_trim``."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def layer_weights(model: nn.Module, arch: Architecture) -> LayerWeights:
    """The model's layer source: lazy if it was loaded lazily, else the layers in memory."""
    return getattr(model, "_layerfold_weights", None) or LayerWeights(model, arch)


def _on_meta(module: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in module.parameters())


def load_lazy(folder: Path, config, arch: Architecture, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A causal LM whose non-layer weights are loaded and whose layers stay on meta."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    source = SafetensorsFolder(folder)
    with init_empty_weights():  # parameters on meta; buffers (rotary tables) computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers_prefix = arch.layers + "."
    outside = [n for n in source.names() if not n.startswith(layers_prefix)]
    # an untied output head is as large as the embeddings and the layer pass never uses it
    # (no logits): it stays on disk until something generates text or the model is saved
    head = model.get_output_embeddings()
    tied = getattr(config, "tie_word_embeddings", False)
    head_names = set() if head is None or tied else {
        n for n, p in model.named_parameters() if any(p is q for q in head.parameters())}
    deferred = [n for n in outside if n in head_names]
    state = source.load([n for n in outside if n not in head_names], dtype, device)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise LayerfoldError(f"{folder}: unexpected tensors {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out_emb is not None and out_emb.weight.device.type == "meta":
            out_emb.weight = in_emb.weight
    still_meta = [n for n, p in model.named_parameters()
                  if p.device.type == "meta" and not n.startswith(layers_prefix) and n not in head_names]
    if still_meta:
        raise LayerfoldError(f"{folder}: weights missing from the checkpoint: {', '.join(still_meta[:3])}")
    for name, buf in model.named_buffers():
        if buf.device != device and not name.startswith(layers_prefix):
            _set_buffer(model, name, buf.to(device))
    for i, layer in enumerate(decoder_layers(model, arch)):
        setattr(layer, ORIGIN_ATTR, i)
    model._layerfold_weights = LayerWeights(model, arch, source, dtype, device, deferred)
    model.eval()
    return model


def materialize(model: nn.Module, arch: Architecture) -> nn.Module:
    """Load every layer: turns a lazy model into an ordinary one (for training or evaluation)."""
    weights = layer_weights(model, arch)
    weights.load_deferred()
    for i in range(len(decoder_layers(model, arch))):
        weights.acquire(i)
    if weights.lazy:
        model._layerfold_weights = None
    return model


@contextmanager
def fully_loaded(model: nn.Module, arch: Architecture):
    """All layers in memory for the duration (e.g. to sample text), then back on disk."""
    weights = layer_weights(model, arch)
    weights.load_deferred()
    n = len(decoder_layers(model, arch))
    for i in range(n):
        weights.acquire(i)
    try:
        yield model
    finally:
        for i in range(n):
            weights.release(i)


def _set_buffer(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_path, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    persistent = attr not in getattr(owner, "_non_persistent_buffers_set", set())
    owner.register_buffer(attr, value, persistent=persistent)

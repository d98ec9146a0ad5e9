"""LLM-Streamline's lightweight replacements for a pruned block of layers.

Every replacement is called like a decoder layer (hidden states plus the layer's keyword
arguments) and returns the new hidden states, so it drops into the layer list as is.

- ``layer``: a copy of the block's first decoder layer, trained (the official default).
- ``swiglu``: the same decoder layer with its attention silenced (attention output
  projection set to zero and frozen), so it computes exactly ``h + MLP(norm(h))``: a SwiGLU
  (gated) FFN with the block's own norm. This is the most portable FFN-only form: stock
  transformers, vLLM and llama.cpp load it as an ordinary layer. Its cost against a true
  FFN-only layer is the unused attention (q/k/v projections, attention scores, o_proj) and
  its stored zeros: for SmolLM2-135M about 0.9 M parameters, a quarter of the layer.
- ``ffn``: a plain two-matrix FFN, ``h + W2 act(W1 norm(h))``, of any width and activation.
  A gated MLP cannot express it exactly, so its saved form needs the small model file
  written beside the weights (``trust_remote_code``); see ``streamline_modeling``.
- ``none``: the block's first layer, untrained (prune only, same size as ``layer``).

Which submodule is the attention output projection is architecture knowledge and comes from
the architecture table.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LayerfoldError
from ..models.architectures import Architecture, get_path
from ..models.lazy import ORIGIN_ATTR

REPLACEMENTS = ("layer", "ffn", "swiglu", "none")
DEFAULT_REPLACEMENT = "layer"
ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU, "silu": nn.SiLU}


@dataclass
class ReplacementSpec:
    kind: str = DEFAULT_REPLACEMENT
    ffn_width: int | None = None  # ``ffn`` only; None: the model's intermediate size
    ffn_activation: str = "gelu"  # ``ffn`` only

    def validate(self) -> None:
        if self.kind not in REPLACEMENTS:
            raise LayerfoldError(f"unknown replacement {self.kind!r}; choose from {', '.join(REPLACEMENTS)}")
        if self.ffn_activation not in ACTIVATIONS:
            raise LayerfoldError(
                f"unknown FFN activation {self.ffn_activation!r}; choose from {', '.join(ACTIVATIONS)}"
            )
        if self.ffn_width is not None and self.ffn_width < 1:
            raise LayerfoldError(f"--ffn-width must be at least 1 (got {self.ffn_width})")

    @property
    def trainable(self) -> bool:
        return self.kind != "none"


class FFNReplacement(nn.Module):
    """``h + W2 act(W1 RMSNorm(h))``; starts as the identity (W2 = 0), i.e. as the pruned block."""

    def __init__(self, hidden: int, width: int, activation: str = "gelu", eps: float = 1e-6,
                 attention_type: str | None = None):
        super().__init__()
        self.norm = nn.RMSNorm(hidden, eps=eps)
        self.up = nn.Linear(hidden, width, bias=True)
        self.act = ACTIVATIONS[activation]()
        self.down = nn.Linear(width, hidden, bias=True)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        self.activation = activation
        if attention_type is not None:  # the model's mask mapping asks each layer for its type
            self.attention_type = attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states + self.down(self.act(self.up(self.norm(hidden_states))))


def silence_attention(layer: nn.Module, arch: Architecture) -> None:
    """Make a decoder layer's attention branch output exactly zero, and keep it so (frozen)."""
    for path in arch.attention_outputs:
        proj = get_path(layer, path)
        with torch.no_grad():
            proj.weight.zero_()
            if getattr(proj, "bias", None) is not None:
                proj.bias.zero_()
    for p in get_path(layer, arch.attention).parameters():
        p.requires_grad_(False)


def build_replacement(block_first: nn.Module, config, arch: Architecture, spec: ReplacementSpec) -> nn.Module:
    """The untrained replacement for a block whose first layer is ``block_first``."""
    spec.validate()
    if spec.kind == "ffn":
        width = spec.ffn_width or config.intermediate_size
        ref = next(block_first.parameters())
        ffn = FFNReplacement(config.hidden_size, width, spec.ffn_activation, eps=getattr(config, "rms_norm_eps", 1e-6),
                             attention_type=getattr(block_first, "attention_type", None))
        return ffn.to(device=ref.device, dtype=ref.dtype)
    layer = copy.deepcopy(block_first)
    # the copy gets its own weights: it must never be re-read from the input checkpoint
    layer.__dict__.pop(ORIGIN_ATTR, None)
    for p in layer.parameters():
        p.requires_grad_(spec.trainable)
    if spec.kind == "swiglu":
        silence_attention(layer, arch)
    return layer


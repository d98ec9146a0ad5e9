"""How a model holding replacements is written so that other tools load it.

Decoder-layer replacements (``layer``, ``swiglu``, ``none``) are ordinary layers of the
model's own class: nothing extra is needed, and stock transformers, vLLM and llama.cpp load
the folder. A plain FFN (``ffn``) has no exact place in a stock layer (a gated MLP cannot
express ``W2 act(W1 x)``), so such a folder gets a short model file and a config whose
``model_type`` is its own: ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``
loads it, and stock code without that flag refuses it with an error instead of loading it with
a silently re-initialised layer. For the most portable FFN-only form, use ``swiglu``.
"""

from __future__ import annotations

import json

from torch import nn

from ..models.architectures import Architecture
from ..models.surgery import decoder_layers
from .replacements import FFNReplacement

MODULE_NAME = "layerfold_streamline"

_TEMPLATE = '''"""Written by layerfold: {base_class} with plain-FFN replacements at some decoder layers
(LLM-Streamline). Load with AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)."""

import torch
from torch import nn
from transformers import {config_class}, {base_class}

ACTIVATIONS = {{"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU, "silu": nn.SiLU}}


class LayerfoldStreamlineConfig({config_class}):
    model_type = "{model_type}"


class FFNReplacement(nn.Module):
    """h + W2 act(W1 RMSNorm(h)), called like a decoder layer."""

    def __init__(self, hidden, width, activation, eps):
        super().__init__()
        self.norm = nn.RMSNorm(hidden, eps=eps)
        self.up = nn.Linear(hidden, width, bias=True)
        self.act = ACTIVATIONS[activation]()
        self.down = nn.Linear(width, hidden, bias=True)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states + self.down(self.act(self.up(self.norm(hidden_states))))


class LayerfoldStreamlineForCausalLM({base_class}):
    config_class = LayerfoldStreamlineConfig

    def __init__(self, config):
        super().__init__(config)
        layers = self
        for name in "{layers_path}".split("."):
            layers = getattr(layers, name)
        for index, spec in config.layerfold_ffn_layers.items():
            layers[int(index)] = FFNReplacement(config.hidden_size, spec["width"], spec["activation"], spec["eps"])
'''


def ffn_layers(model: nn.Module, arch: Architecture) -> dict[str, dict]:
    return {
        str(i): {"width": layer.up.out_features, "activation": layer.activation, "eps": layer.norm.eps}
        for i, layer in enumerate(decoder_layers(model, arch))
        if isinstance(layer, FFNReplacement)
    }


def portable_files(model: nn.Module, arch: Architecture) -> dict[str, str]:
    """Files to add to (or replace in) the saved folder; none for stock layers."""
    ffn = ffn_layers(model, arch)
    if not ffn:
        return {}
    model_type = f"layerfold_streamline_{model.config.model_type}"
    code = _TEMPLATE.format(
        config_class=type(model.config).__name__, base_class=type(model).__name__,
        model_type=model_type, layers_path=arch.layers,
    )
    config = model.config.to_dict()
    config.update({
        "model_type": model_type,
        "architectures": ["LayerfoldStreamlineForCausalLM"],
        "auto_map": {"AutoConfig": f"{MODULE_NAME}.LayerfoldStreamlineConfig",
                     "AutoModelForCausalLM": f"{MODULE_NAME}.LayerfoldStreamlineForCausalLM"},
        "layerfold_ffn_layers": ffn,
    })
    return {f"{MODULE_NAME}.py": code, "config.json": json.dumps(config, indent=2, sort_keys=True) + "\n"}

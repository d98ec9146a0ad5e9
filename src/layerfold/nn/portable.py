"""How a model holding replacements is written so that other tools load it.

Decoder-layer replacements (``layer``, ``swiglu``, ``none``) are ordinary layers of the
model's own class: nothing extra is needed, and stock transformers, vLLM and llama.cpp load
the folder. A plain FFN (``ffn``) has no place in a stock layer (a gated MLP cannot express
``W2 act(W1 x)`` exactly), so such a model is refused here rather than saved in a form that
stock code would load with a silently re-initialised layer.
"""

from __future__ import annotations

from torch import nn

from ..errors import LayerfoldError
from ..models.architectures import Architecture
from ..models.surgery import decoder_layers
from .replacements import FFNReplacement


def portable_files(model: nn.Module, arch: Architecture) -> dict[str, str]:
    """Extra files the saved folder needs (none for stock layers)."""
    ffn = [i for i, layer in enumerate(decoder_layers(model, arch)) if isinstance(layer, FFNReplacement)]
    if ffn:
        raise LayerfoldError(
            f"layer {ffn[0]} is a plain FFN, which stock model code cannot hold; "
            "use --replacement swiglu (an FFN in standard layer form) or layer"
        )
    return {}

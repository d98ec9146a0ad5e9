"""Architecture knowledge as data.

Each supported ``model_type`` has one entry saying where the decoder layers live and what
must be kept consistent when layers are removed, replaced or shared. Methods never branch
on architecture: they ask this table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import LayerfoldError


@dataclass(frozen=True)
class Architecture:
    """Where things are in a Hugging Face causal LM of one family."""

    model_type: str
    #: attribute path of the base model (embeddings + layers + final norm) inside the causal LM
    base_model: str = "model"
    #: attribute path of the decoder layer list inside the causal LM
    layers: str = "model.layers"
    #: attribute path of the final norm applied after the last layer
    final_norm: str = "model.norm"
    #: config key holding the number of decoder layers
    num_layers_key: str = "num_hidden_layers"
    #: config fields that are lists with one entry per layer; sliced to the kept layers
    per_layer_lists: tuple[str, ...] = ()
    #: config fields that hold a layer index threshold ("layers below i do X");
    #: rewritten to count only kept layers below the old threshold
    layer_thresholds: tuple[str, ...] = ()
    #: attribute names inside a layer's submodules that store the layer's own index
    #: (the KV cache is indexed by it), renumbered after surgery
    index_attributes: tuple[str, ...] = ("layer_idx",)
    #: submodules of a decoder layer whose outputs are added to the residual stream;
    #: FoldGPT's gates scale these
    residual_branches: tuple[str, ...] = ("self_attn", "mlp")
    #: the attention submodule of a decoder layer
    attention: str = "self_attn"
    #: linear layers (inside a decoder layer) whose output is the attention branch's output;
    #: zero weights there make the layer attention-free (LLM-Streamline's FFN-only form)
    attention_outputs: tuple[str, ...] = ("self_attn.o_proj",)
    #: config key of a cap the causal LM applies to its logits after the output head
    #: (logits = cap * tanh(logits / cap)); losses that compute logits chunk by chunk apply it
    logit_softcap: str | None = None
    #: extra notes for the model card
    notes: tuple[str, ...] = field(default_factory=tuple)


_POST_NORM_BRANCHES = ("post_attention_layernorm", "post_feedforward_layernorm")

ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in [
        Architecture("llama"),
        Architecture("mistral"),
        Architecture(
            "qwen2", per_layer_lists=("layer_types",), layer_thresholds=("max_window_layers",)
        ),
        Architecture(
            "qwen3", per_layer_lists=("layer_types",), layer_thresholds=("max_window_layers",)
        ),
        Architecture("gemma"),
        Architecture(
            "gemma2", per_layer_lists=("layer_types",), residual_branches=_POST_NORM_BRANCHES,
            logit_softcap="final_logit_softcapping",
        ),
        Architecture(
            "gemma3_text", per_layer_lists=("layer_types",), residual_branches=_POST_NORM_BRANCHES,
            logit_softcap="final_logit_softcapping",
        ),
        Architecture("phi3"),
        Architecture("olmo2", residual_branches=_POST_NORM_BRANCHES),
    ]
}


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def architecture_for(config) -> Architecture:
    """The table entry for a model config, or a clear error listing what is supported."""
    model_type = getattr(config, "model_type", None)
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise LayerfoldError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(supported_model_types())}"
        ) from None


def get_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj

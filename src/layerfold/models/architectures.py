"""Architecture knowledge as data.

Each supported ``model_type`` has one entry saying where the decoder layers live and what
must be kept consistent when layers are removed, replaced or shared. Methods never branch
on architecture: they ask this table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import LayerfoldError


@dataclass(frozen=True)
class LlamaCppLayout:
    """How llama.cpp holds one family: what a GGUF file of it must say (``export/gguf.py``).

    Tensor names come from the ``gguf`` package's map for ``arch``; this says what differs
    from the Hugging Face checkpoint beyond the names.
    """

    #: llama.cpp's architecture name (``general.architecture``)
    arch: str
    #: llama.cpp's llama rotates adjacent pairs of q/k, Hugging Face's the two halves: the
    #: rows of q_proj and k_proj are reordered on export
    permute_qk: bool = False
    #: gemma's RMSNorm scales by (1 + w), llama.cpp's by w: this is added to every norm weight
    norm_shift: float = 0.0
    #: the layer pattern llama.cpp fixes for sliding-window attention (layer i slides when
    #: i % n < n - 1); None: llama.cpp gives this family no sliding window at all
    swa_pattern: int | None = None
    #: llama.cpp's fixed rope base of the sliding layers (gemma3), if it fixes one
    swa_rope_theta: float | None = None
    #: llama.cpp scales queries by 1/sqrt(head_dim) and ignores ``query_pre_attn_scalar``
    query_scale_is_head_dim: bool = False
    #: gemma2's attention and final logit soft-capping go into the metadata
    softcapping: bool = False
    #: transformers' GGUF loader (``from_pretrained(dir, gguf_file=...)``) reads this family
    #: back; the tests compare logits through it
    transformers_reads: bool = True
    #: what is known not to work, printed with every export of the family
    caveat: str | None = None


_LLAMA_CPP_GEMMA = dict(norm_shift=1.0, query_scale_is_head_dim=True)


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
    #: how llama.cpp holds this family; None: llama.cpp does not know it (no GGUF export)
    llama_cpp: LlamaCppLayout | None = None
    #: the linear layer (inside a decoder layer) whose output is the MLP branch's output as it
    #: joins the residual stream; ReplaceMe's linear repair folds its transform into it. None
    #: where a norm follows the MLP (post-norm families): a linear map after the norm is not a
    #: linear map of the projection's output, so the fold would not be exact
    mlp_output: str | None = "mlp.down_proj"
    #: config key of the per-layer attention types ("full_attention", "sliding_attention", ...);
    #: None: every layer has the same kind of attention. transformers sizes the KV cache and the
    #: masks of each kind from the first layer of that kind, so that layer must stay a real
    #: attention layer (see :func:`cache_anchor_layers`)
    layer_types: str | None = None
    #: extra notes for the model card
    notes: tuple[str, ...] = field(default_factory=tuple)


_POST_NORM_BRANCHES = ("post_attention_layernorm", "post_feedforward_layernorm")

ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in [
        Architecture("llama", llama_cpp=LlamaCppLayout("llama", permute_qk=True)),
        Architecture("mistral", llama_cpp=LlamaCppLayout("llama", permute_qk=True)),
        Architecture(
            "qwen2", per_layer_lists=("layer_types",), layer_thresholds=("max_window_layers",),
            llama_cpp=LlamaCppLayout("qwen2"), layer_types="layer_types",
        ),
        Architecture(
            "qwen3", per_layer_lists=("layer_types",), layer_thresholds=("max_window_layers",),
            llama_cpp=LlamaCppLayout("qwen3"), layer_types="layer_types",
        ),
        Architecture("gemma", llama_cpp=LlamaCppLayout("gemma", **_LLAMA_CPP_GEMMA, transformers_reads=False)),
        Architecture(
            "gemma2", per_layer_lists=("layer_types",), residual_branches=_POST_NORM_BRANCHES, mlp_output=None,
            llama_cpp=LlamaCppLayout("gemma2", **_LLAMA_CPP_GEMMA, swa_pattern=2, softcapping=True),
            layer_types="layer_types", logit_softcap="final_logit_softcapping",
        ),
        Architecture(
            "gemma3_text", per_layer_lists=("layer_types",), residual_branches=_POST_NORM_BRANCHES,
            mlp_output=None,
            llama_cpp=LlamaCppLayout("gemma3", **_LLAMA_CPP_GEMMA, swa_pattern=6, swa_rope_theta=10000.0),
            layer_types="layer_types", logit_softcap="final_logit_softcapping",
        ),
        Architecture("phi3", llama_cpp=LlamaCppLayout("phi3")),
        Architecture("olmo2", residual_branches=_POST_NORM_BRANCHES, mlp_output=None,
                     llama_cpp=LlamaCppLayout("olmo2", transformers_reads=False)),
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


def attention_types(config, arch: Architecture) -> list[str]:
    """The attention type of every decoder layer (one type for models without a per-layer list)."""
    n = getattr(config, arch.num_layers_key)
    types = getattr(config, arch.layer_types, None) if arch.layer_types else None
    if isinstance(types, (list, tuple)) and len(types) == n:
        return list(types)
    return ["full_attention"] * n


def cache_anchor_layers(config, arch: Architecture) -> dict[str, int]:
    """The first layer of each attention type the model uses, by type.

    transformers reads the cached sequence length from layer 0 and the mask geometry of each
    attention type from the first layer of that type; a module there that keeps no KV cache
    (a plain FFN) breaks cached generation.
    """
    anchors: dict[str, int] = {}
    for i, kind in enumerate(attention_types(config, arch)):
        anchors.setdefault(kind, i)
    return anchors


def get_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj

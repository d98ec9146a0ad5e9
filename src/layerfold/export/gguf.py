"""GGUF: a model as one file for llama.cpp, Ollama and everything built on them.

What llama.cpp needs beyond the weights is written from the model's config and the family's
entry in the architecture table (``LlamaCppLayout``): the hyperparameters under the family's
llama.cpp name, tensor names from the ``gguf`` package's map, and what llama.cpp computes
differently (llama's q/k row order, gemma's norm offset). What llama.cpp cannot compute the
way the model does is refused before any weight is read (:func:`check_llama_cpp`): rope kinds
it would get wrong, gemma's fixed sliding-window layer pattern broken by pruning, a query
scale it ignores.

Weights go out as f32, f16, bf16 or q8_0 (norms and biases stay f32, as llama.cpp's own
converter keeps them; q8_0 rows whose length is not a multiple of 32 stay f16). The file is
written beside its destination under a temporary name and renamed into place when complete:
a failure leaves no partial file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import LayerfoldError
from ..models.architectures import Architecture, LlamaCppLayout, architecture_for

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass
class GGUFOptions:
    """A GGUF file for llama.cpp (``layerfold export --gguf``, ``layerfold compress --gguf``)."""

    path: str | None = field(default=None, metadata={
        "help": "write a GGUF file for llama.cpp / Ollama here (an existing file is refused)", "flag": "--gguf",
        "path": True, "metavar": "OUT.gguf"})
    outtype: str = field(default="f16", metadata={
        "help": "weight type in the GGUF file (norms and biases stay f32)", "choices": OUTTYPES,
        "flag": "--outtype"})
    check: bool = field(default=True, metadata={
        "help": "skip reading the written GGUF back with transformers and comparing its logits with the model's",
        "flag": "--no-gguf-check"})

    @property
    def enabled(self) -> bool:
        return bool(self.path)

    def validate(self) -> None:
        if self.outtype not in OUTTYPES:
            raise LayerfoldError(f"--outtype {self.outtype!r} is not one of {', '.join(OUTTYPES)}")
        if self.path and not str(self.path).lower().endswith(".gguf"):
            raise LayerfoldError(f"--gguf {self.path}: the file name must end in .gguf")


def check_gguf_path(path: str | Path, force: bool = False) -> Path:
    """Refuse an output that exists (unless ``force`` and it is a file) or whose folder is missing."""
    p = Path(path).expanduser()
    if p.exists() and (p.is_dir() or not force):
        raise LayerfoldError(f"{path}: exists; not overwriting it" + (" (use --force)" if p.is_file() else ""))
    if not p.resolve().parent.is_dir():
        raise LayerfoldError(f"{path}: folder {p.resolve().parent} does not exist")
    return p


# -- what llama.cpp can express ----------------------------------------------------------


@dataclass
class LlamaCppPlan:
    """What the file will say, decided from the config alone."""

    arch: Architecture
    layout: LlamaCppLayout
    num_layers: int
    head_dim: int
    context_length: int
    rope_theta: float
    rope_linear_factor: float | None
    sliding_window: int | None  # written to the file (the family's fixed pattern applies it)
    notes: list[str] = field(default_factory=list)


def llama_cpp_layout(config) -> tuple[Architecture, LlamaCppLayout]:
    arch = architecture_for(config)
    if arch.llama_cpp is None:
        from ..models.architectures import ARCHITECTURES

        known = sorted(a.model_type for a in ARCHITECTURES.values() if a.llama_cpp is not None)
        raise LayerfoldError(f"llama.cpp has no architecture for {config.model_type!r}; GGUF export supports "
                             f"{', '.join(known)}")
    return arch, arch.llama_cpp


def _rope(config, layer_type: str = "full_attention") -> dict:
    params = dict(getattr(config, "rope_parameters", None) or {})
    if isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    params.setdefault("rope_type", "default")
    return params


def check_llama_cpp(config) -> LlamaCppPlan:
    """What the GGUF file says about the model, or a one-line error naming what llama.cpp
    would compute differently. Reads the config only, so it runs before any slow work."""
    arch, layout = llama_cpp_layout(config)
    name = config.model_type
    n = int(getattr(config, arch.num_layers_key))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = _rope(config)
    if rope["rope_type"] not in ("default", "linear"):
        raise LayerfoldError(f"{name}: rope type {rope['rope_type']!r} is not exported to GGUF (default and linear are)")
    if rope.get("partial_rotary_factor", 1.0) not in (None, 1.0) and name != "phi3":
        raise LayerfoldError(f"{name}: partial rotary embeddings are not exported to GGUF")
    plan = LlamaCppPlan(arch, layout, n, int(head_dim), int(config.max_position_embeddings),
                        float(rope["rope_theta"]), float(rope["factor"]) if rope["rope_type"] == "linear" else None,
                        None)

    if layout.query_scale_is_head_dim:
        scalar = getattr(config, "query_pre_attn_scalar", None)
        if scalar is not None and scalar != head_dim:
            raise LayerfoldError(f"{name}: llama.cpp scales queries by 1/sqrt(head_dim={head_dim}); this model uses "
                                 f"query_pre_attn_scalar={scalar}")
    if layout.softcapping:
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, key, None) is None:
                raise LayerfoldError(f"{name}: llama.cpp always applies {key}; this model has none")
    else:
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, key, None) is not None:
                raise LayerfoldError(f"{name}: llama.cpp's {layout.arch} has no {key} (this model uses "
                                     f"{getattr(config, key)})")

    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    sliding = [t == "sliding_attention" for t in types] if types else [window is not None] * n
    if window is not None and any(sliding) and window < plan.context_length:
        if layout.swa_pattern is None:
            plan.context_length = int(window)
            plan.notes.append(f"context length set to the sliding window ({window} tokens): llama.cpp's "
                              f"{layout.arch} attends to every earlier token, so beyond the window it would differ")
        else:
            p = layout.swa_pattern
            fixed = [i % p < p - 1 for i in range(n)]
            if sliding != fixed:
                got = [i for i, s in enumerate(sliding) if not s]
                want = [i for i, s in enumerate(fixed) if not s]
                raise LayerfoldError(
                    f"{name}: llama.cpp fixes which layers attend globally (every {p}th: {want}); after pruning "
                    f"this model's are {got}. Remove layers in whole runs of {p} to keep the pattern")
            plan.sliding_window = int(window)
            if layout.swa_rope_theta is not None:
                local = _rope(config, "sliding_attention")
                if local["rope_type"] != "default" or float(local["rope_theta"]) != layout.swa_rope_theta:
                    raise LayerfoldError(f"{name}: llama.cpp fixes the sliding layers' rope base at "
                                         f"{layout.swa_rope_theta:g}; this model uses {local['rope_theta']:g}")
    elif window is not None and layout.swa_pattern is not None:
        plan.sliding_window = int(window)
    return plan


# -- writing -----------------------------------------------------------------------------


@dataclass
class GGUFResult:
    path: Path
    outtype: str
    arch: str  # llama.cpp's name
    tensors: int
    bytes: int
    tokenizer: str  # where the tokenizer came from
    notes: list[str] = field(default_factory=list)
    check: dict | None = None  # the read-back comparison, when it ran


def _file_type(outtype: str) -> int:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]


def _permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotary layout (first half, second half of each head) to llama.cpp's
    (adjacent pairs), applied to the rows of q_proj / k_proj (and their biases)."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_tensors(model, plan: LlamaCppPlan, outtype: str):
    """(llama.cpp name, data, ggml type) for every tensor of the model, converted."""
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == plan.layout.arch)
    names = gguf.get_tensor_name_map(arch_id, plan.num_layers)
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    q8 = gguf.GGMLQuantizationType
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp uses token_embd when there is no output tensor
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise LayerfoldError(f"tensor {name} has no llama.cpp name in {plan.layout.arch}")
        if t.device.type == "meta":
            raise LayerfoldError(f"tensor {name} is not in memory (load the model fully before exporting)")
        data = t.detach().to(device="cpu", dtype=torch.float32).numpy()
        if plan.layout.norm_shift and name.endswith("norm.weight"):
            data = data + np.float32(plan.layout.norm_shift)
        if plan.layout.permute_qk:
            if ".attn_q." in target:
                data = _permute_rows(data, config.num_attention_heads)
            elif ".attn_k." in target:
                data = _permute_rows(data, config.num_key_value_heads)
        data = np.ascontiguousarray(data)
        if data.ndim == 1 or outtype == "f32":
            yield target, data.astype(np.float32), q8.F32
        elif outtype == "f16" or (outtype == "q8_0" and data.shape[-1] % 32):
            yield target, data.astype(np.float16), q8.F16
        elif outtype == "bf16":
            yield target, gguf.quants.quantize(data, q8.BF16), q8.BF16
        else:
            yield target, gguf.quants.quantize(data, q8.Q8_0), q8.Q8_0


#: llama.cpp's vocabulary loader (src/llama-vocab.cpp, "set attributes by model/tokenizer/architecture
#: name") sets Phi-3's token attributes for any model whose ``general.name`` contains one of these
#: words, looking each token up with ``unordered_map::at``: a vocabulary without them fails to load
#: ("error loading model vocabulary: unordered_map::at"). Phi-3's own vocabulary has them all.
NAMES_NEEDING_TOKENS = {("phi-3", "phi3"): ("</s>", "<unk>", "<s>", "<|endoftext|>")}


def gguf_name(name: str, tokens) -> tuple[str | None, str | None]:
    """(``general.name`` to write or None to leave it out, a note saying why it was left out)."""
    have = set(tokens)
    for words, needed in NAMES_NEEDING_TOKENS.items():
        if any(w in name.lower() for w in words):
            missing = [t for t in needed if t not in have]
            if missing:
                return None, (f"general.name {name!r} left out: llama.cpp treats a model named like "
                              f"{words[0]} as Phi-3 and fails to load a vocabulary without {', '.join(missing)}")
    return name, None


def _write_metadata(w, plan: LlamaCppPlan, config, outtype: str, name: str | None, layer_map) -> None:
    import gguf

    w.add_type("model")
    if name is not None:
        w.add_name(name)
    w.add_context_length(plan.context_length)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(plan.num_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    w.add_key_length(plan.head_dim)
    w.add_value_length(plan.head_dim)
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_rope_freq_base(plan.rope_theta)
    rotary = _rope(config).get("partial_rotary_factor") or 1.0
    w.add_rope_dimension_count(int(plan.head_dim * rotary))
    if plan.rope_linear_factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(plan.rope_linear_factor)
    if plan.sliding_window is not None:
        w.add_sliding_window(plan.sliding_window)
    if plan.layout.softcapping:
        w.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        w.add_final_logit_softcapping(float(config.final_logit_softcapping))
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(_file_type(outtype))
    if outtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if layer_map is not None:  # provenance: which original layer each layer is (-1: a replacement)
        w.add_array("layerfold.layer_map", [-1 if i is None else int(i) for i in layer_map])


def original_gguf(source: str | None) -> Path | None:
    """The GGUF file a model was made from, if it is one on this machine (its tokenizer fields
    are the model's, with llama.cpp's own names)."""
    from ..models.loading import EMBEDDED_NAME, embedded_model_path

    if source in (None, "", "embedded", EMBEDDED_NAME):
        try:
            return embedded_model_path()
        except LayerfoldError:
            return None
    p = Path(str(source)).expanduser()
    return p if p.suffix.lower() == ".gguf" and p.is_file() else None


def gguf_tokenizer(loaded, source: str | None):
    """(copied fields, None) from the GGUF the model came from, else (None, Vocab) from its
    tokenizer.json; raises for a tokenizer llama.cpp cannot load. Cheap: run it before work."""
    from .gguf_vocab import tokenizer_fields_from_gguf, vocab_from_tokenizer

    vocab_size = loaded.model.config.vocab_size
    original = original_gguf(source)
    fields = tokenizer_fields_from_gguf(original, vocab_size) if original is not None else None
    if fields:
        return fields, None, f"copied from {original.name}"
    return None, vocab_from_tokenizer(loaded.tokenizer, vocab_size), "the model's tokenizer.json"


def write_gguf(loaded, path: str | Path, outtype: str = "f16", *, plan: LlamaCppPlan | None = None,
               source: str | None = None, layer_map=None, force: bool = False, progress: bool = True) -> GGUFResult:
    """Write ``loaded`` (a standard model, fully in memory) as a GGUF file at ``path``.

    ``source``: what the model was made from (a ``.gguf`` or the embedded model: its tokenizer
    fields are copied); ``layer_map``: original layer of each layer, recorded in the file.
    """
    import gguf

    if outtype not in OUTTYPES:
        raise LayerfoldError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    out = check_gguf_path(path, force).resolve()
    model, config = loaded.model, loaded.model.config
    plan = plan or check_llama_cpp(config)
    notes = list(plan.notes) + ([plan.layout.caveat] if plan.layout.caveat else [])

    fields, vocab, tokenizer_from = gguf_tokenizer(loaded, source)
    if vocab is not None:
        notes += vocab.notes

    name = Path(str(loaded.source)).name if loaded.source else "model"
    tokens = vocab.tokens if vocab is not None else next(v for k, v, *_ in fields if k == "tokenizer.ggml.tokens")
    name, why = gguf_name(name, tokens)
    if why:
        notes.append(why)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    count = 0
    try:
        w = gguf.GGUFWriter(str(tmp), plan.layout.arch)
        _write_metadata(w, plan, config, outtype, name, layer_map)
        if fields:
            for key, value, vtype, sub in fields:
                w.add_key_value(key, value, vtype, sub_type=sub)
        else:
            vocab.write(w)
        for target, data, qtype in gguf_tensors(model, plan, outtype):
            w.add_tensor(target, data, raw_dtype=qtype)
            count += 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress)
        w.close()
        if out.exists() and not force:
            raise LayerfoldError(f"{out}: appeared while writing; not replacing it")
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise LayerfoldError(f"{out}: cannot write ({e.strerror or e}); nothing was written") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return GGUFResult(out, outtype, plan.layout.arch, count, out.stat().st_size, tokenizer_from, notes)


# -- reading it back ---------------------------------------------------------------------

#: how far the read-back logits may be from the model's, by weight type (f32: rounding only)
TOLERANCE = {"f32": 1e-4, "f16": 5e-2, "bf16": 3e-1, "q8_0": 3e-1}


def check_with_transformers(loaded, path: str | Path, outtype: str, tokens: int = 16) -> dict | None:
    """Load the written file with transformers' GGUF reader and compare its logits on a fixed
    token row with the model's own; None when transformers cannot read this family."""
    from transformers import AutoModelForCausalLM

    _, layout = llama_cpp_layout(loaded.model.config)
    if not layout.transformers_reads:
        return None
    p = Path(path)
    back = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    vocab = loaded.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, tokens), generator=g)
    model = loaded.model
    with torch.no_grad():
        ref = model(ids.to(loaded.device)).logits.float().cpu()
        got = back(ids).logits.float()
    diff = (ref - got).abs().max().item()
    scale = ref.abs().max().item() or 1.0
    return {"tool": f"transformers {__import__('transformers').__version__} (from_pretrained gguf_file=)",
            "tokens": tokens, "max_abs_logit_diff": diff, "max_abs_logit": scale,
            "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
            "passed": diff <= TOLERANCE[outtype] * max(1.0, scale)}

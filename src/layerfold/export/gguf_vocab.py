"""The tokenizer of a GGUF file: what llama.cpp needs to tokenize like the model's own tokenizer.

llama.cpp knows two families that Hugging Face tokenizers come in:

- ``gpt2``: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): the tokens in id order, the merges,
  and the name of the pre-tokenizer (``tokenizer.ggml.pre``: how text is split before merging);
- ``llama``: SentencePiece (Llama 2, Mistral, Gemma, Phi-3): the pieces with scores (llama.cpp
  merges the pair whose result scores highest, so a BPE's merge rank becomes a score), and byte
  pieces ``<0xNN>`` for what the vocabulary cannot spell.

A model made from a GGUF file keeps its tokenizer, so its tokenizer fields are copied from that
file verbatim (:func:`tokenizer_fields_from_gguf`); that keeps llama.cpp's own name for its
pre-tokenizer, which a Hugging Face folder does not record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LayerfoldError


@dataclass
class Vocab:
    """Everything written under ``tokenizer.`` in a GGUF file."""

    model: str  # "gpt2" or "llama"
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad -> id
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    notes: list[str] = field(default_factory=list)

    def write(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        add = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
               "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
        for name, token_id in self.special_ids.items():
            add[name](token_id)
        if self.add_bos is not None:
            writer.add_add_bos_token(self.add_bos)
        if self.add_eos is not None:
            writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


# token types as llama.cpp numbers them (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def vocab_from_tokenizer(tokenizer, vocab_size: int) -> Vocab:
    """The GGUF tokenizer of a Hugging Face fast tokenizer (its ``tokenizer.json``)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LayerfoldError("GGUF export needs a fast tokenizer (tokenizer.json); this model has a slow one only")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    kind = model.get("type")
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    vocab = dict(model.get("vocab") or {}) if kind != "Unigram" else {}
    if kind == "Unigram":
        pieces = model.get("vocab") or []
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    for i, t in added.items():
        vocab.setdefault(t["content"], i)
    by_id = {i: tok for tok, i in vocab.items()}
    n = max(vocab_size, max(by_id) + 1 if by_id else 0)
    tokens, types = [], []
    for i in range(n):
        if i in by_id:
            tokens.append(by_id[i])
            a = added.get(i)
            types.append(NORMAL if a is None else CONTROL if a.get("special") else USER_DEFINED)
        else:  # rows of the embedding no token uses (vocabularies padded to a round size)
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)

    byte_level = _uses_byte_level(spec)
    if kind == "BPE" and byte_level:
        merges = [_merge_text(m) for m in model.get("merges") or []]
        if not merges:
            raise LayerfoldError("this byte-level BPE tokenizer has no merges; llama.cpp cannot load a BPE "
                                 "vocabulary without them")
        v = Vocab("gpt2", tokens, types, merges=merges, pre=_pre_tokenizer_name(spec))
        if v.pre is None:
            v.pre = "default"
            v.notes.append("pre-tokenizer not recognised: llama.cpp splits text with its default rule, "
                           "which may tokenize some text differently from the model's tokenizer")
    elif kind == "BPE" and model.get("byte_fallback"):
        ranks = {}
        for rank, m in enumerate(model.get("merges") or []):
            ranks.setdefault("".join(_merge_text(m).split(" ")), rank)
        scores = [-float(ranks[t]) if t in ranks else 0.0 for t in tokens]
        v = Vocab("llama", tokens, types, scores=scores, add_space_prefix=_adds_space_prefix(spec))
        _mark_spm_types(v, model.get("unk_token"))
    elif kind == "Unigram":
        scores = [float(s) for _, s in model.get("vocab") or []]
        scores += [0.0] * (len(tokens) - len(scores))
        v = Vocab("llama", tokens, types, scores=scores, add_space_prefix=_adds_space_prefix(spec))
        unk = model.get("unk_id")
        _mark_spm_types(v, tokens[unk] if unk is not None and unk < len(tokens) else None)
    else:
        raise LayerfoldError(f"GGUF export knows byte-level BPE and SentencePiece tokenizers; this one is {kind}"
                             + (" without byte-level or byte fallback" if kind == "BPE" else ""))
    v.special_ids = _special_ids(tokenizer)
    v.add_bos, v.add_eos = _adds_bos_eos(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    v.chat_template = template if isinstance(template, str) else None
    return v


def _merge_text(m) -> str:
    return " ".join(m) if isinstance(m, (list, tuple)) else str(m)


def _parts(node) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        key = "pretokenizers" if "pretokenizers" in node else "decoders" if "decoders" in node else "normalizers"
        return [p for sub in node.get(key) or [] for p in _parts(sub)]
    return [node]


def _uses_byte_level(spec: dict) -> bool:
    return any(p.get("type") == "ByteLevel" for p in _parts(spec.get("pre_tokenizer")) + _parts(spec.get("decoder")))


def _pre_tokenizer_name(spec: dict) -> str | None:
    """llama.cpp's name for how this byte-level tokenizer splits text, or None if unknown."""
    parts = _parts(spec.get("pre_tokenizer"))
    types = [p.get("type") for p in parts]
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's name (the tokenizer model is "gpt2", the pre-tokenizer "gpt-2")
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's rule
    if types == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pattern = (parts[0].get("pattern") or {}).get("Regex")
        return _known_split_names().get(pattern)
    return None


def _known_split_names() -> dict[str, str]:
    """Split regex -> a llama.cpp pre-tokenizer name, from transformers' table of them (the
    one its GGUF loader uses to split text the same way); first name of each regex wins."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        return {}
    out: dict[str, str] = {}
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        out.setdefault(regex, name)
    return out


def _adds_space_prefix(spec: dict) -> bool:
    for p in _parts(spec.get("pre_tokenizer")):
        if p.get("type") == "Metaspace":
            return p.get("prepend_scheme", "always") != "never" and p.get("add_prefix_space", True)
    for p in _parts(spec.get("normalizer")):
        if p.get("type") == "Prepend" and p.get("prepend") == "\u2581":
            return True
    return False


def _mark_spm_types(v: Vocab, unk: str | None) -> None:
    for i, t in enumerate(v.tokens):
        if v.token_types[i] != NORMAL:
            continue
        if unk is not None and t == unk:
            v.token_types[i] = UNKNOWN
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            v.token_types[i] = BYTE


def _special_ids(tokenizer) -> dict[str, int]:
    out = {}
    for name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if isinstance(token_id, int):
            out[name] = token_id
    return out


def _adds_bos_eos(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS, seen by encoding (the flags' names vary by class)."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bool(ids) and bos is not None and ids[0] == bos, bool(ids) and eos is not None and ids[-1] == eos


# -- from the GGUF file a model came from --------------------------------------------------


def tokenizer_fields_from_gguf(path: str | Path, vocab_size: int):
    """The ``tokenizer.*`` fields of a GGUF file as (key, value, type, sub_type), or None when
    its vocabulary does not have ``vocab_size`` tokens (then it is not this model's)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_size:
        return None
    out = []
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
        out.append((key, f.contents(), vtype, sub))
    return out

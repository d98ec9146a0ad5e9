"""Tiny random models of every supported architecture, built on the fly (nothing is downloaded)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("LAYERFOLD_CACHE", os.path.join(os.path.dirname(__file__), ".cache"))


def pytest_configure(config):
    # fixtures that save tiny models would otherwise print progress bars into captured output
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads; on a shared 2-core machine torch's spinning
    threads make them 5-50x slower. Modules of tiny-model tests use it for every test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


VOCAB = 260  # 3 special tokens + 256 byte symbols (+1 spare)

ARCH_CONFIGS = {
    "llama": {},
    "mistral": {"sliding_window": 8},
    "qwen2": {"sliding_window": 8, "use_sliding_window": True, "max_window_layers": 2},
    "qwen3": {"head_dim": 16, "sliding_window": 8, "use_sliding_window": True, "max_window_layers": 2},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 8},
    "gemma3_text": {"head_dim": 16, "sliding_window": 8, "sliding_window_pattern": 2},
    "phi3": {},
    "olmo2": {},
}


def tiny_tokenizer():
    """Byte-level BPE without merges or a chat template: one token per byte."""
    return tiny_bpe_tokenizer(words=(), chat_template=None)


CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
_WORDS = ["the", "cat", "sat", "on", "mat", "then", "there"]


def tiny_bpe_tokenizer(words=tuple(_WORDS), chat_template=CHAT_TEMPLATE):
    """Byte-level BPE with real merges (GPT-2 style) and a chat template; ``words=("t",)``
    makes one merge and fits the 260 rows of VOCAB."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    merges = []
    for word in ["\u0120" + w for w in words]:  # merge each word left to right
        cur = word[0]
        for ch in word[1:]:
            if (cur, ch) not in merges:
                merges.append((cur, ch))
            cur += ch
            vocab.setdefault(cur, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                pad_token="</s>")
    t.chat_template = chat_template
    return t


def tiny_spm_tokenizer():
    """SentencePiece-style BPE (byte fallback, '\u2581' for spaces), as Llama 2 / Mistral ship it."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for ch in "\u2581abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
    merges = []
    for word in ["\u2581" + w for w in _WORDS]:
        cur = word[0]
        for ch in word[1:]:
            if (cur, ch) not in merges:
                merges.append((cur, ch))
            cur += ch
            vocab.setdefault(cur, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def tiny_config(model_type: str, layers: int = 6, **overrides):
    """A tiny config of ``model_type``; ``overrides`` replace the family's defaults."""
    from transformers import AutoConfig

    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2, pad_token_id=2)
    return AutoConfig.for_model(model_type, **{**kwargs, **ARCH_CONFIGS[model_type], **overrides})


def build_tiny(model_type: str, layers: int = 6, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, layers, **overrides))
    # random init leaves many weights tiny; scale up so layers change the hidden state
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: a saved tiny model folder (safetensors + tokenizer) per architecture."""
    made: dict[str, str] = {}

    def make(model_type: str) -> str:
        if model_type not in made:
            path = tmp_path_factory.mktemp(f"tiny-{model_type}")
            build_tiny(model_type).save_pretrained(path, safe_serialization=True)
            tiny_tokenizer().save_pretrained(path)
            made[model_type] = str(path)
        return made[model_type]

    return make


@pytest.fixture(scope="session")
def pruned_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama without its layers 2 and 3, saved: a student that healing has something to repair."""
    from layerfold.models.loading import load_model
    from layerfold.models.surgery import remove_layers

    loaded = load_model(tiny_model_dir("llama"), dtype="fp32", device="cpu")
    remove_layers(loaded.model, loaded.arch, [2, 3])
    folder = tmp_path_factory.mktemp("pruned")
    loaded.model.save_pretrained(folder, safe_serialization=True)
    loaded.tokenizer.save_pretrained(folder)
    return str(folder)


def saved_weights(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model folder's safetensors files, by name."""
    from pathlib import Path

    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    paragraphs = [
        f"Paragraph {i}: the quick brown fox jumps over the lazy dog while number {i * 7} rises."
        for i in range(40)
    ]
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    return str(path)


def stability_by_hand(reference_examples, examples, norm: bool = False) -> float:
    """METHODS.md's stability, written out with plain arithmetic from the raw per-example
    scores of two results (``TaskResult.examples``), independently of ``eval.stability``:
    s_i = population std of the original's choice scores, w = softmax(s) over examples,
    stability = sum of w_i over the examples where both are right or both are wrong."""
    import math

    def scores(e):
        return [l / max(c, 1) for l, c in zip(e["ll"], e["chars"])] if norm else list(e["ll"])

    def right(e):
        s = scores(e)
        return s.index(max(s)) == e["gold"]

    spreads = []
    for e in reference_examples:
        s = scores(e)
        mean = sum(s) / len(s)
        spreads.append(math.sqrt(sum((x - mean) ** 2 for x in s) / len(s)))
    top = max(spreads)
    weights = [math.exp(x - top) for x in spreads]
    total = sum(weights)
    return sum(w / total for w, a, b in zip(weights, reference_examples, examples) if right(a) == right(b))

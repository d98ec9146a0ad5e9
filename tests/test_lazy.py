"""Layer-streamed models give exactly the in-memory results."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCH_CONFIGS

from layerfold import load_model
from layerfold.importance import measure_similarity
from layerfold.importance.layer_pass import final_hidden_states
from layerfold.models.lazy import layer_weights, materialize
from layerfold.models.surgery import decoder_layers


def _meta_layers(loaded):
    return sum(any(p.device.type == "meta" for p in l.parameters()) for l in decoder_layers(loaded.model, loaded.arch))


@pytest.mark.parametrize("model_type", sorted(ARCH_CONFIGS))
def test_lazy_pass_equals_in_memory(model_type, tiny_model_dir):
    src = tiny_model_dir(model_type)
    eager = load_model(src)
    lazy = load_model(src, lazy=True)
    assert layer_weights(lazy.model, lazy.arch).lazy
    assert _meta_layers(lazy) == 6  # nothing of the layers is in memory yet
    ids = torch.randint(3, 250, (3, 20), generator=torch.Generator().manual_seed(0))
    a = measure_similarity(eager.model, eager.arch, ids, batch_size=2, progress=False)
    b = measure_similarity(lazy.model, lazy.arch, ids, batch_size=2, progress=False)
    assert a.cosine == b.cosine and a.angular == b.angular
    assert _meta_layers(lazy) == 6  # every layer was released after use
    torch.testing.assert_close(final_hidden_states(lazy.model, lazy.arch, ids),
                               final_hidden_states(eager.model, eager.arch, ids), rtol=0, atol=0)
    materialize(lazy.model, lazy.arch)
    assert _meta_layers(lazy) == 0
    with torch.no_grad():
        torch.testing.assert_close(lazy.model(ids).logits, eager.model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "qwen2"])
def test_streamed_pruning_save_equals_in_memory(model_type, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from layerfold.models.card import model_card
    from layerfold.models.saving import save_model_folder
    from layerfold.models.surgery import remove_layers

    src = tiny_model_dir(model_type)
    outs = {}
    for mode in ("eager", "lazy"):
        loaded = load_model(src, lazy=(mode == "lazy"))
        kept = remove_layers(loaded.model, loaded.arch, [1, 4])
        card = model_card(base_model=src, command="test", recipe={}, layer_map=kept,
                          params_before=1, params_after=1, layers_before=6)
        outs[mode] = save_model_folder(loaded, tmp_path / mode, card=card)
    a = AutoModelForCausalLM.from_pretrained(outs["eager"])
    b = AutoModelForCausalLM.from_pretrained(outs["lazy"])
    assert b.config.num_hidden_layers == 4
    assert b.config.to_dict().get("layer_types") == a.config.to_dict().get("layer_types")
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)


def _compress_both_ways(src, text_file, tmp_path, repair=None, **selection):
    """compress() from a model loaded in memory and from one it streams itself: both folders."""
    from layerfold import CompressOptions, compress
    from layerfold.data.calibration import CalibrationSpec
    from layerfold.healing import HealOptions
    from layerfold.methods.registry import SelectionOptions
    from layerfold.models.saving import OutputOptions
    from layerfold.pipeline import EvalOptions, ModelOptions

    outs, lazy_loaded = {}, None
    for mode in ("eager", "lazy"):
        loaded = load_model(src, lazy=(mode == "lazy"))
        if mode == "lazy":
            lazy_loaded = loaded
        opts = CompressOptions(model=ModelOptions(src), data=CalibrationSpec(source=text_file, samples=6, seq_len=16),
                               output=OutputOptions(str(tmp_path / mode)), progress=False, healing=HealOptions(tokens=0),
                               evaluation=EvalOptions(enabled=False), selection=SelectionOptions(**selection),
                               **({"repair": repair} if repair else {}))
        outs[mode] = compress(opts, loaded=loaded).output
    return outs, lazy_loaded


def _same_weights(a, b):
    from safetensors.torch import load_file

    def tensors(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("method", ["bi", "angular"])
def test_streamed_compress_equals_in_memory(method, tiny_model_dir, text_file, tmp_path):
    outs, lazy = _compress_both_ways(tiny_model_dir("llama"), text_file, tmp_path, method=method, remove=2)
    _same_weights(outs["eager"], outs["lazy"])
    assert _meta_layers(lazy) == 4  # the kept layers were never all in memory
    assert lazy.model.get_output_embeddings().weight.device.type == "meta"  # the untied head was never read


def test_lazy_model_generates_like_the_eager_one(tiny_model_dir):
    from layerfold.models.lazy import fully_loaded

    src = tiny_model_dir("llama")
    eager, lazy = load_model(src), load_model(src, lazy=True)
    ids = torch.randint(3, 250, (1, 6), generator=torch.Generator().manual_seed(1))
    with fully_loaded(lazy.model, lazy.arch):
        out = lazy.model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, eager.model.generate(ids, max_new_tokens=5, do_sample=False))


@pytest.mark.parametrize("replacement", ["layer", "ffn"])
def test_streamed_streamline_equals_in_memory(replacement, tiny_model_dir, text_file, tmp_path):
    from layerfold.data.calibration import CalibrationSpec
    from layerfold.methods.streamline import StreamlineOptions

    # a pair loss: the in-place ones (the default lm) run the whole model
    so = StreamlineOptions(replacement=replacement, loss="cosine", init="last", ffn_width=16, train_tokens=64,
                           data=CalibrationSpec(source=text_file, seq_len=16, seed=1))
    outs, lazy = _compress_both_ways(tiny_model_dir("qwen2"), text_file, tmp_path, method="streamline", remove=2,
                                     repair=so)
    _same_weights(outs["eager"], outs["lazy"])
    assert _meta_layers(lazy) >= 3  # only the replacement holds weights of its own
    # the untied input embeddings went back to disk while the replacement trained, and were
    # saved from the input's files (the equality above)
    assert lazy.model.get_input_embeddings().weight.device.type == "meta"


def test_compress_streams_by_default(tiny_model_dir, text_file, tmp_path, monkeypatch):
    import layerfold.pipeline as pipeline

    seen = []
    real = pipeline._load
    monkeypatch.setattr(pipeline, "_load", lambda opts, lazy=False: seen.append(lazy) or real(opts, lazy=lazy))
    from layerfold.cli import main

    assert main(["-q", "compress", tiny_model_dir("llama"), "--remove", "1", "--calib", text_file,
                 "--calib-samples", "4", "--seq-len", "16", "--no-heal", "--no-eval", "-o", str(tmp_path / "o")]) == 0
    assert seen == [True]

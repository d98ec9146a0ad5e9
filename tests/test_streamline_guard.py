"""The FFN guard: a plain FFN must not sit where transformers reads the KV cache's geometry.

transformers takes the cached length from layer 0 and each attention type's mask sizes from
the first layer of that type (Gemma2's layer 1, Gemma3's first full layer, Qwen2's first
sliding layer). A plain FFN keeps no cache, so at such a slot cached generation of a padded
batch differs from uncached generation. Every start that the guard lets through must generate
the same with and without the cache, and the refused starts are exactly those anchors
(written out by hand below, not computed by the code under test).
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from layerfold.errors import LayerfoldError
from layerfold.methods.streamline import StreamlineOptions, check_block, replace_and_train
from layerfold.models.architectures import architecture_for, cache_anchor_layers
from layerfold.models.surgery import decoder_layers, replace_block
from layerfold.nn.replacements import ReplacementSpec, build_replacement

pytestmark = pytest.mark.usefixtures("one_thread")

S, F = "sliding_attention", "full_attention"
# Gemma3's real pattern (five sliding, one full) shortened: three sliding, one full
GEMMA3_TYPES = [S, S, S, F, S, S, S, F]

CASES = {  # model type, layers, layer types (None: the config's own), the anchors by hand
    "llama": (6, None, {0}),
    "gemma2": (6, None, {0, 1}),  # sliding, full, sliding, full, ...
    "gemma3_text": (8, GEMMA3_TYPES, {0, 3}),
    "qwen2": (6, None, {0, 2}),  # max_window_layers=2: full, full, sliding, ...
}


def _model(model_type: str, layers: int, types):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(model_type, layers)
    if types is not None:
        cfg.layer_types = list(types)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


def _padded_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 250, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 2, 0  # left padding: the masks must be built from the cache's sizes
    return ids, mask


def _cached_equals_uncached(model) -> bool:
    ids, mask = _padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False)
    plain = model.generate(ids, use_cache=False, **kw)
    return all(torch.equal(model.generate(ids, use_cache=True, **kw, **extra), plain)
               for extra in ({}, {"cache_implementation": "static"}))


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_anchor_layers_by_hand(model_type):
    layers, types, anchors = CASES[model_type]
    model = _model(model_type, layers, types)
    assert set(cache_anchor_layers(model.config, architecture_for(model.config)).values()) == anchors


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_ffn_guard_refuses_exactly_where_cached_generation_breaks(model_type):
    layers, types, anchors = CASES[model_type]
    spec = ReplacementSpec("ffn")
    refused = set()
    for start in range(layers - 1):
        model = _model(model_type, layers, types)
        arch = architecture_for(model.config)
        try:
            check_block(spec, start, model.config, arch)
        except LayerfoldError as e:
            assert str(e).count("\n") == 0 and f"layer {start}" in str(e)
            refused.add(start)
            continue
        ffn = build_replacement(decoder_layers(model, arch)[start], model.config, arch, spec)
        with torch.no_grad():
            ffn.down.weight.normal_(0, 0.08)  # not the identity it starts as
        replace_block(model, arch, start, 2, ffn)
        assert _cached_equals_uncached(model), f"FFN at layer {start} let through but cached generation differs"
    assert refused == anchors


@pytest.mark.parametrize("model_type,start", [("gemma2", 1), ("gemma3_text", 3)])
def test_an_ffn_at_an_anchor_does_break_cached_generation(model_type, start):
    """Why the guard exists: the same surgery without it gives different generations."""
    layers, types, _ = CASES[model_type]
    model = _model(model_type, layers, types)
    arch = architecture_for(model.config)
    ffn = build_replacement(decoder_layers(model, arch)[start], model.config, arch, ReplacementSpec("ffn"))
    with torch.no_grad():
        ffn.down.weight.normal_(0, 0.08)
    replace_block(model, arch, start, 2, ffn)
    assert not _cached_equals_uncached(model)


def test_replace_and_train_refuses_before_any_work(tmp_path):
    model = _model("gemma2", 6, None)
    arch = architecture_for(model.config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(3, 250, (4, 16))
    with pytest.raises(LayerfoldError, match="first full_attention layer"):
        replace_and_train(model, arch, ids, 1, 3, StreamlineOptions(replacement="ffn"), work_dir=tmp_path,
                          progress=False)
    assert len(decoder_layers(model, arch)) == 6 and list(tmp_path.iterdir()) == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

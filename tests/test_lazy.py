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

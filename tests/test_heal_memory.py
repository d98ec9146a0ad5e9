"""`layerfold heal --dry-run`: the memory estimate from shapes, checked against the model itself."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from layerfold.cli import main
from layerfold.healing import HealOptions, _make_trainable
from layerfold.models.loading import load_model, model_skeleton
from layerfold.train.memory import RUNTIME_BYTES, Shapes, healing_needs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("train,lm_head", [("lora", "auto"), ("lora+layers", "train"), ("layers", "freeze")])
def test_trained_parameters_equal_what_healing_really_trains(tiny_model_dir, train, lm_head):
    opts = HealOptions(tokens=64, train=train, layers="last:2", lm_head=lm_head, lora_rank=4)
    loaded = load_model(tiny_model_dir("llama"), dtype="fp32", device="cpu")
    skeleton = model_skeleton(tiny_model_dir("llama"), dtype="fp32", device="cpu")
    shapes = Shapes.of(skeleton.model, skeleton.arch)
    assert shapes.params == sum(p.numel() for p in loaded.model.parameters())
    need = healing_needs(shapes, None, replace_kl(opts), seq_len=32, dtype=torch.float32, tied=False)
    model, _, _ = _make_trainable(loaded, opts)
    really = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert need["trained_parameters"] == really


def replace_kl(opts):
    return replace(opts, kl=0.0, ce=1.0)


def test_the_sums_by_hand(tiny_model_dir):
    """The tiny Llama: hidden 64, key/value width 2 x 16, MLP 128, 6 layers, vocabulary 260."""
    skeleton = model_skeleton(tiny_model_dir("llama"), dtype="fp32", device="cpu")
    s = Shapes.of(skeleton.model, skeleton.arch)
    assert (s.hidden, s.kv, s.intermediate, s.layers, s.vocab) == (64, 32, 128, 6, 260)
    opts = HealOptions(tokens=64, batch_size=2, lora_rank=4, kl=0.0, ce=1.0, train_norm=False, lm_head="freeze")
    need = healing_needs(s, None, opts, seq_len=16, dtype=torch.float32, tied=False)
    # LoRA on q,k,v,o (64->64, 64->32, 64->32, 64->64) and gate, up, down (64->128, 64->128, 128->64)
    lora = 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 128))
    assert need["trained_parameters"] == 6 * lora
    assert need["trained_state_bytes"] == 6 * lora * 4 * 4
    per_layer = (6 * 64 + 2 * 32 + 4 * 128 + 4 * 7) * 4  # 6 H + 2 KV + 4 I + r per adapted linear
    assert need["activation_bytes"] == 32 * (6 * per_layer + 64 * 4)  # + the final norm's input
    # the whole batch's logits fit one chunk; a frozen head: logits + one buffer (train/head.py)
    logits = 2 * 32 * 260 * 4 + 32 * 64 * 4
    assert need["logit_bytes"] == logits
    trained_head = healing_needs(s, None, replace(opts, lm_head="train"), seq_len=16, dtype=torch.float32, tied=False)
    assert trained_head["logit_bytes"] == 4 * 32 * 260 * 4 + 32 * 64 * 4  # recomputed in backward: four copies
    plain = need["plans"][0]["device_bytes"]
    assert plain == RUNTIME_BYTES + s.weight_bytes + 6 * lora * 16 + 32 * (6 * per_layer + 64 * 4) + logits
    ckpt = need["plans"][1]["device_bytes"]
    assert ckpt == RUNTIME_BYTES + s.weight_bytes + 6 * lora * 16 + 32 * (64 * 4 * 7 + per_layer) + logits


def test_dry_run_prints_the_estimate_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "healed"
    code = main(["heal", tiny_model_dir("llama"), "--teacher", tiny_model_dir("llama"), "--dry-run", "-o", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "healing memory estimate" in text and "--heal-checkpointing" in text and "offload" in text
    assert not out.exists()


def _saved_for_backward(model, ids) -> int:
    """Bytes autograd keeps for backward in one forward pass of the decoder: every saved tensor's
    storage once, the model's own parameters left out (they are weights, not activations)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.get_decoder()(input_ids=ids, use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_matches_what_autograd_keeps(tiny_model_dir, checkpointing):
    """The per-token, per-layer count (6 H + 2 KV + 4 I + the LoRA middles, and the final norm's
    input) against the bytes the forward pass of LoRA healing really saves, with the final hidden
    states (which the estimate counts with the logit loss); the norms' 1/rms and the attention's
    log-sum-exp (one value per position and head) are the small rest."""
    opts = HealOptions(tokens=64, batch_size=4, lora_rank=4, checkpointing=checkpointing)
    loaded = load_model(tiny_model_dir("llama"), dtype="fp32", device="cpu")
    shapes = Shapes.of(loaded.model, loaded.arch)
    need = healing_needs(shapes, None, opts, seq_len=32, dtype=torch.float32, tied=True)
    model, _, _ = _make_trainable(loaded, opts)
    model.train()
    ids = torch.randint(3, 259, (4, 32), generator=torch.Generator().manual_seed(0))
    saved = _saved_for_backward(model, ids)
    final_hidden = 4 * 32 * shapes.hidden * 4
    if not checkpointing:
        estimate = need["activation_bytes"] + final_hidden
    else:
        # under checkpointing the forward pass saves the layers' inputs; the estimate adds one
        # layer's full set, which exists only while backward recomputes that layer
        one_layer = (need["activation_bytes"] - 4 * 32 * shapes.hidden * 4) // shapes.layers
        estimate = need["activation_bytes_checkpointing"] - one_layer + final_hidden
    assert 0.95 * saved <= estimate <= 1.05 * saved, (estimate, saved)

"""LoRA on shared weights (nn.lora): one adapter per shared tensor, merged once; FoldGPT's
LoRA cure; healing a shared (FoldGPT) model keeps it shared."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny
from layerfold.cli import main
from layerfold.models.architectures import ARCHITECTURES
from layerfold.models.loading import load_model
from layerfold.models.surgery import count_parameters, copy_model, remove_layers
from layerfold.nn.lora import LoRALinear, add_lora, has_lora, merge_lora
from layerfold.nn.shared import share_groups

ARCH = ARCHITECTURES["llama"]
IDS = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(1))


def _shared_model():
    model = build_tiny("llama", 4)
    share_groups(model, ARCH, [[0, 1], [2, 3]])
    return model


def test_one_adapter_per_shared_tensor_and_merged_once():
    model = _shared_model()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    stored = count_parameters(model)
    weights = add_lora(model, ARCH, rank=2, alpha=4.0, seed=0)
    layers = model.model.layers
    q = [layers[l].self_attn.q_proj for l in range(4)]
    assert all(isinstance(m, LoRALinear) for m in q)
    assert q[0].lora is q[1].lora and q[2].lora is q[3].lora and q[1].lora is not q[2].lora
    assert len(weights) == 2 * 7 and not any(w.requires_grad for w in weights)  # 7 linear tensors per group
    # B starts at 0: nothing changes yet; give B values to see the adapter act
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora.b.normal_(0, 0.02, generator=torch.Generator().manual_seed(id(m.lora) % 1000))
        adapted = model(input_ids=IDS).logits
    assert not torch.allclose(ref, adapted)
    # the expected merged weight, by hand: W + (alpha / r) B A, the same for both members
    a, b = q[0].lora.a.detach().clone(), q[0].lora.b.detach().clone()
    expected = base["model.layers.0.self_attn.q_proj.weight"] + 2.0 * (b @ a)
    assert merge_lora(model) == 2 * 7  # each shared tensor updated once, not once per member
    assert not has_lora(model)
    w0, w1 = layers[0].self_attn.q_proj.weight, layers[1].self_attn.q_proj.weight
    assert w0 is w1 and isinstance(layers[0].self_attn.q_proj, torch.nn.Linear)
    torch.testing.assert_close(w0.detach(), expected)
    assert count_parameters(model) == stored  # still shared: nothing added
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, adapted, rtol=1e-5, atol=1e-5)


def test_lora_cure_keeps_sharing_and_leaves_plain_layers():
    from layerfold.methods.foldgpt import CureOptions, run_cure

    teacher = build_tiny("llama", 6)
    student = copy_model(teacher)
    remove_layers(student, ARCH, [2, 3])
    share_groups(student, ARCH, [[0, 1], [2, 3]])
    stored = count_parameters(student)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    ids = torch.randint(3, 259, (8, 16), generator=torch.Generator().manual_seed(0))
    c = run_cure(student, teacher, ARCH, ids, CureOptions(steps=10, lr=3e-3, batch_size=4, tail_layers=2,
                                                          warmup_steps=0, lora_rank=4), progress=False)
    curve = [h["loss"] for h in c["history"]]
    assert curve[-1] < curve[0] and c["lr"] == 3e-3 and "LoRA r=4" in c["trained"]
    assert not has_lora(student) and count_parameters(student) == stored
    layers = student.model.layers
    assert layers[0].mlp.up_proj.weight is layers[1].mlp.up_proj.weight  # sharing survived the merge
    after = dict(student.named_parameters())
    assert not torch.equal(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(after["model.layers.1.input_layernorm.weight"], before["model.layers.1.input_layernorm.weight"])
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    # trainable: the adapters (2 groups x 7 tensors, rank 4) and every norm of the 4 layers
    rank_cost = sum(4 * (m.in_features + m.out_features) for l in (0, 2) for m in layers[l].modules()
                    if isinstance(m, torch.nn.Linear))
    norms = sum(p.numel() for l in layers for n, p in l.named_parameters() if "norm" in n)
    assert c["trainable_parameters"] == rank_cost + norms
    assert CureOptions().learning_rate() == 5e-5 and CureOptions(lora_rank=8).learning_rate() == 5e-4


def test_lora_cure_over_per_layer_deltas_merges_into_the_shared_tensor_and_trains_the_deltas():
    """LoRA wraps a LowRankDeltaLinear (W + B A): the merge must land in the one shared W, the
    deltas stay per member and train, and the model after the merge computes W' + B' A' + bias."""
    from layerfold.methods.foldgpt import CureOptions, run_cure
    from layerfold.nn.shared import LowRankDeltaLinear

    teacher = build_tiny("llama", 6)
    student = copy_model(teacher)
    remove_layers(student, ARCH, [2, 3])
    share_groups(student, ARCH, [[0, 1], [2, 3]], init="mean", delta_rank=2)
    stored = count_parameters(student)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    ids = torch.randint(3, 259, (8, 16), generator=torch.Generator().manual_seed(0))
    c = run_cure(student, teacher, ARCH, ids, CureOptions(steps=6, lr=3e-3, batch_size=4, tail_layers=2,
                                                          warmup_steps=0, lora_rank=4), progress=False)
    assert not has_lora(student) and count_parameters(student) == stored
    layers = student.model.layers
    up0, up1 = layers[0].mlp.up_proj, layers[1].mlp.up_proj
    assert isinstance(up0, LowRankDeltaLinear) and up0.weight is up1.weight  # sharing survived the merge
    after = dict(student.named_parameters())
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.delta_b",
                 "model.layers.1.mlp.up_proj.delta_b"):
        assert not torch.equal(after[name], before[name]), name
    x = torch.randn(3, up0.in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # each member: the merged shared weight plus its own delta, computed by hand
        for m in (up0, up1):
            w = after["model.layers.0.mlp.up_proj.weight"] + m.delta_b @ m.delta_a
            torch.testing.assert_close(m(x), x @ w.T, rtol=0, atol=1e-5)
    assert c["trainable_parameters"] > 0


def _foldgpt_folder(tiny_model_dir, text_file, out):
    code = main(["-q", "compress", tiny_model_dir("llama"), "--method", "foldgpt", "--remove", "2", "--calib",
                 text_file, "--calib-samples", "6", "--seq-len", "16", "--gate-steps", "2", "--cure-steps", "0",
                 "--no-eval", "-o", str(out)])
    assert code == 0
    return out


@pytest.mark.parametrize("train", ["lora", "layers"])
def test_healing_a_shared_model_keeps_it_shared(tiny_model_dir, text_file, tmp_path, capsys, train):
    folded = _foldgpt_folder(tiny_model_dir, text_file, tmp_path / "fold")
    before = load_model(str(folded), device="cpu")
    healed = tmp_path / "healed"
    code = main(["-q", "heal", str(folded), "--teacher", tiny_model_dir("llama"), "-o", str(healed),
                 "--heal-tokens", "256", "--heal-data", text_file, "--heal-seq-len", "32", "--heal-batch-size", "4",
                 "--heal-train", train, "--heal-layers", "all", "--lora-rank", "2", "--heal-lr", "1e-2"])
    assert code == 0, capsys.readouterr()
    cfg = json.loads((healed / "config.json").read_text())
    assert cfg["model_type"] == "layerfold_shared" and cfg["layerfold_groups"] == [[0, 1], [2, 3]]
    after = load_model(str(healed), device="cpu")
    assert count_parameters(after.model) == count_parameters(before.model)  # stored once, as before
    la, lb = after.model.model.layers, before.model.model.layers
    assert la[0].self_attn.o_proj.weight is la[1].self_attn.o_proj.weight
    assert not torch.equal(la[0].self_attn.o_proj.weight, lb[0].self_attn.o_proj.weight)  # it did train
    record = json.loads((healed / "layerfold.json").read_text())
    if train == "lora":
        assert "one adapter per shared tensor" in record["heal"]["trainable"]

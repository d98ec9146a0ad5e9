"""Per-layer low-rank deltas for shared groups, against an independent reconstruction."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import build_tiny
from layerfold.errors import LayerfoldError
from layerfold.models.architectures import ARCHITECTURES
from layerfold.models.surgery import count_parameters
from layerfold.nn.shared import LowRankDeltaLinear, share_groups

pytestmark = pytest.mark.usefixtures("one_thread")

GROUPS = [[0, 1], [2, 3]]
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def _model():
    model = build_tiny("llama", layers=4)
    originals = {(l, n): model.model.layers[l].get_submodule(n).weight.detach().double().numpy().copy()
                 for l in range(4) for n in LINEARS}
    return model, originals


def _best_rank_r(m: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def test_mean_sharing_with_deltas_is_the_mean_plus_the_best_rank_r_correction():
    model, w = _model()
    share_groups(model, ARCHITECTURES["llama"], GROUPS, init="mean", delta_rank=3)
    layers = model.model.layers
    for group in GROUPS:
        for name in LINEARS:
            mean = sum(w[(l, name)] for l in group) / len(group)
            mods = [layers[l].get_submodule(name) for l in group]
            assert all(isinstance(m, LowRankDeltaLinear) for m in mods)
            assert mods[0].weight is mods[1].weight  # still one shared matrix
            for l, mod in zip(group, mods):
                expected = mean + _best_rank_r(w[(l, name)] - mean, 3)
                np.testing.assert_allclose(mod.effective_weight().detach().double().numpy(), expected, atol=1e-5)
                x = torch.randn(5, mod.in_features)
                torch.testing.assert_close(mod(x), x @ mod.effective_weight().T, atol=1e-5, rtol=1e-4)


def test_full_rank_deltas_give_back_the_original_model_and_count_as_stored_parameters():
    model, w = _model()
    original = copy.deepcopy(model)
    before = count_parameters(model)
    rank = 64  # hidden size: the smaller side of every matrix, so the deltas are exact
    share_groups(model, ARCHITECTURES["llama"], GROUPS, init="important", importance=[0, 1, 1, 0], delta_rank=rank)
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, original(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    # by hand: each group stores each matrix once (saving one member's copy) and every member
    # adds rank * (in + out) per matrix
    shapes = {n: w[(0, n)].shape for n in LINEARS}
    saved = sum(o * i for o, i in shapes.values()) * len(GROUPS)
    deltas = sum(min(rank, o, i) * (o + i) for o, i in shapes.values()) * 4
    assert count_parameters(model) == before - saved + deltas
    # the member that gave its weights (importance: layer 1, layer 2) starts with a zero delta
    for l in (1, 2):
        mod = model.model.layers[l].self_attn.q_proj
        assert torch.count_nonzero(mod.delta_b) == 0 and torch.count_nonzero(mod.delta_a) > 0


def test_deltas_train_and_bad_rank():
    model, _ = _model()
    share_groups(model, ARCHITECTURES["llama"], [[0, 1]], init="important", delta_rank=2)
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids).logits.sum().backward()
    mod = model.model.layers[0].mlp.down_proj
    assert mod.delta_a.grad is not None and mod.delta_b.grad is not None
    with pytest.raises(LayerfoldError, match="delta rank"):
        share_groups(_model()[0], ARCHITECTURES["llama"], [[0, 1]], delta_rank=-1)


def test_a_shared_folder_stores_the_deltas_and_both_loaders_and_unfold_give_the_same_model(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from conftest import tiny_tokenizer
    from layerfold.cli import main
    from layerfold.export.shared import save_shared_folder
    from layerfold.models.loading import LoadedModel, load_model

    model, _ = _model()
    share_groups(model, ARCHITECTURES["llama"], GROUPS, init="mean", delta_rank=3)
    with torch.no_grad():  # the deltas after some training: every member's differs, none is zero
        for m in model.modules():
            if isinstance(m, LowRankDeltaLinear):
                m.delta_b.add_(0.01)
    stored = count_parameters(model)
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    loaded = LoadedModel(model=model, tokenizer=tiny_tokenizer(), arch=ARCHITECTURES["llama"], source="tiny",
                         base_model="tiny", local_dir=None)
    out = save_shared_folder(loaded, tmp_path / "shared", card="test")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["layerfold_deltas"]["model.layers.1.mlp.up_proj"] == 3 and len(cfg["layerfold_deltas"]) == 4 * 7
    ours = load_model(str(out), device="cpu").model
    theirs = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    for m in (ours, theirs):
        assert count_parameters(m) == stored  # the shared matrices once, every member's deltas
        layers = m.model.layers
        assert layers[2].self_attn.v_proj.weight is layers[3].self_attn.v_proj.weight
        with torch.no_grad():
            torch.testing.assert_close(m(input_ids=ids).logits, ref, rtol=0, atol=1e-5)
    target = tmp_path / "unfolded"
    assert main(["-q", "export", str(out), "--unfold", "-o", str(target)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(target)  # stock transformers, no custom code
    assert "layerfold_deltas" not in json.loads((target / "config.json").read_text())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, ref, rtol=0, atol=1e-5)


def test_compress_with_deltas_counts_and_saves_them(tiny_model_dir, text_file, tmp_path, capsys):
    import json

    from layerfold.cli import main
    from layerfold.models.loading import load_model

    runs = {}
    for rank in (0, 2):
        out = tmp_path / f"r{rank}"
        code = main(["-q", "compress", tiny_model_dir("llama"), "--method", "foldgpt", "--remove", "2", "--calib",
                     text_file, "--calib-samples", "6", "--seq-len", "16", "--gate-steps", "2", "--cure-steps", "1",
                     "--cure-samples", "4", "--no-eval", "--delta-rank", str(rank), "-o", str(out)])
        assert code == 0, capsys.readouterr()
        runs[rank] = json.loads((out / "layerfold.json").read_text())
        assert count_parameters(load_model(str(out), device="cpu").model) == runs[rank]["params_after"]
    # 4 kept layers in 2 pairs: each member adds 2 x (in + out) per linear matrix (tiny llama:
    # hidden 64, 4 heads of 16 with 2 kv heads, intermediate 128)
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
    assert runs[2]["params_after"] - runs[0]["params_after"] == 4 * sum(2 * (o + i) for o, i in shapes)
    assert runs[2]["plan"]["params_after"] == runs[2]["params_after"]

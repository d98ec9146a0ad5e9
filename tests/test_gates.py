"""FoldGPT gates on a constructed model whose removable layers are known."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import build_tiny
from layerfold.errors import LayerfoldError
from layerfold.importance.gates import GateOptions, LayerGates, gate_ranking, lowest_gated
from layerfold.models.architectures import ARCHITECTURES

NEAR_IDENTITY = (1, 4)


def _model_with_idle_layers():
    """A 6-layer llama whose layers 1 and 4 barely touch the residual stream."""
    model = build_tiny("llama", layers=6)
    arch = ARCHITECTURES["llama"]
    with torch.no_grad():
        for l in NEAR_IDENTITY:
            for name in arch.residual_branches:
                for p in model.model.layers[l].get_submodule(name).parameters():
                    p.mul_(0.02)
    return model, arch


def _ids():
    return torch.randint(3, 259, (8, 24), generator=torch.Generator().manual_seed(0))


def test_gate_zero_is_removal_and_gate_one_is_identity():
    from layerfold.models.surgery import copy_model, remove_layers

    model, arch = _model_with_idle_layers()
    ids = _ids()[:2]
    gates = LayerGates(6, init=50.0)  # sigmoid(50) == 1 in float32
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with gates.attached(model, arch):
            same = model(input_ids=ids).logits
            gates.logits[2] = -50.0  # sigmoid(-50) ~ 2e-22: layer 2 becomes the identity
            gated = model(input_ids=ids).logits
        pruned = copy_model(model)
        remove_layers(pruned, arch, [2])
        removed = pruned(input_ids=ids).logits
        after = model(input_ids=ids).logits  # hooks are gone again
    torch.testing.assert_close(same, ref)
    torch.testing.assert_close(gated, removed, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(after, ref)


def test_budgeted_gates_find_the_layers_whose_removal_hurts_least():
    model, arch = _model_with_idle_layers()
    before = [p.clone() for p in model.parameters()]
    r = gate_ranking(model, arch, _ids(), 2, GateOptions(steps=80, lr=0.1, polar_weight=2.0), progress=False)
    assert r.removed == list(NEAR_IDENTITY)
    kept = [g for l, g in enumerate(r.gates) if l not in NEAR_IDENTITY]
    assert max(r.gates[l] for l in NEAR_IDENTITY) < 0.5 < min(kept)
    log = r.rounds[0]["log"]
    assert abs(log[-1]["sum_g"] - 4) < 0.5  # the budget pulled sum(g) to the layers kept
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # weights frozen
    assert all(p.requires_grad for p in model.parameters())  # and given back as they were


def test_rounds_remove_in_steps():
    model, arch = _model_with_idle_layers()
    r = gate_ranking(model, arch, _ids(), 2, GateOptions(steps=40, lr=0.1, polar_weight=2.0, rounds=2),
                     progress=False)
    assert len(r.rounds) == 2 and len(r.rounds[1]["layers"]) == 5
    assert sorted(r.removed) == list(NEAR_IDENTITY)
    assert not any(math.isnan(g) for g in r.gates)
    assert len(model.model.layers) == 6  # the input model is untouched


def test_lowest_gated_and_bad_targets():
    assert lowest_gated([0.9, 0.1, 0.5, 0.2], 2) == [1, 3]
    model, arch = _model_with_idle_layers()
    with pytest.raises(LayerfoldError, match="cannot remove 6 of 6"):
        gate_ranking(model, arch, _ids(), 6, progress=False)
    with pytest.raises(LayerfoldError, match="gate-steps"):
        gate_ranking(model, arch, _ids(), 1, GateOptions(steps=0), progress=False)

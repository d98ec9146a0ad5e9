"""Criteria on constructed hidden states whose scores are known."""

from __future__ import annotations

import math

import pytest
import torch

from layerfold.errors import LayerfoldError
from layerfold.importance.criteria import LayerScores, SimilarityObserver
from layerfold.methods import pruning


def _run_observer(states: list[torch.Tensor]) -> LayerScores:
    obs = SimilarityObserver(len(states) - 1, store_dtype=torch.float32)
    obs.on_chunk_start(1)
    for l in range(len(states) - 1):
        obs(l, 0, states[l], states[l + 1])
    obs.on_chunk_end()
    return obs.scores()


def test_observer_matches_direct_cosine_and_angle():
    torch.manual_seed(0)
    states = [torch.randn(3, 5, 8) for _ in range(5)]  # 4 layers
    s = _run_observer(states)
    for l in range(5):
        for n in range(1, 5 - l):
            a, b = states[l], states[l + n]
            cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
            assert s.cosine[l][n] == pytest.approx(cos.mean().item(), abs=1e-5)
            ang = torch.arccos(cos[:, -1].clamp(-1, 1)) / math.pi
            assert s.angular[l][n] == pytest.approx(ang.mean().item(), abs=1e-5)
    assert s.tokens == 15 and s.samples == 3
    assert s.block_influence[0] == pytest.approx(1 - s.cosine[0][1])


def _scores(cos_by_pair: dict[tuple[int, int], float], L: int) -> LayerScores:
    cos = [[math.nan] * (L + 1) for _ in range(L + 1)]
    ang = [[math.nan] * (L + 1) for _ in range(L + 1)]
    for l in range(L + 1):
        for n in range(1, L + 1 - l):
            c = cos_by_pair.get((l, n), 0.0)
            cos[l][n] = c
            ang[l][n] = math.acos(c) / math.pi
    return LayerScores(L, cos, ang, tokens=1, samples=1)


def test_selection_rules():
    # layers 3 and 5 barely change the state; the block 2..3 is the most similar window of 2
    pairs = {(3, 1): 0.99, (5, 1): 0.98, (2, 2): 0.95, (1, 2): 0.5}
    s = _scores(pairs, L=6)
    assert pruning.block_influence(s, 2) == [3, 5]
    assert pruning.streamline_block(s, 2) == [2, 3]
    assert pruning.angular_block(s, 2) == [2, 3]
    assert pruning.last_layers(6, 2) == [4, 5]


@pytest.mark.parametrize(
    "remove,sparsity,expected",
    [(3, None, 3), (None, 0.25, 2), (None, 0.5, 4), (None, None, 2)],
)
def test_layers_for_target(remove, sparsity, expected):
    assert pruning.layers_for_target(8, remove, sparsity) == expected


@pytest.mark.parametrize("remove,sparsity", [(0, None), (8, None), (None, 1.2), (None, 0.0), (None, -0.1)])
def test_bad_targets_are_refused(remove, sparsity):
    with pytest.raises(LayerfoldError):
        pruning.layers_for_target(8, remove, sparsity)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma2", "gemma3_text", "phi3", "olmo2"])
def test_layer_arguments_from_zero_embeddings_equal_those_of_real_tokens(model_type):
    """Streamline's replacement trains with each layer's mask and rotary tables made from the
    batch shape alone (the embeddings may be back on disk): they must be what real tokens get."""
    from conftest import build_tiny
    from layerfold.importance.layer_pass import capture_layer_inputs, layer_arguments
    from layerfold.models.architectures import architecture_for

    model = build_tiny(model_type, layers=3)
    arch = architecture_for(model.config)
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    real = capture_layer_inputs(model, arch, ids).calls
    shaped = layer_arguments(model, arch, tuple(ids.shape), torch.device("cpu"), torch.float32)
    assert len(real) == len(shaped) == 3

    def flat(x):
        if isinstance(x, torch.Tensor):
            return [x]
        if isinstance(x, (tuple, list)):
            return [t for v in x for t in flat(v)]
        if isinstance(x, dict):
            return [t for k in sorted(x) for t in flat(x[k])]
        return [x]

    for (ra, rk), (sa, sk) in zip(real, shaped):
        assert sorted(rk) == sorted(sk)
        tensors = 0
        for r, s in zip(flat((ra, rk)), flat((sa, sk)), strict=True):
            if isinstance(r, torch.Tensor):
                assert torch.equal(r, s)
                tensors += 1
            elif not callable(r) and type(r).__module__ == "builtins":
                assert r == s
        assert tensors >= 2  # at least the rotary cos and sin (and positions or a mask)

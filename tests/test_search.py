"""Selections that search with forward passes (SLEB, iterative Block Influence, LaCo) and the
merge repair, against brute force computed with the stock model forward on pruned copies."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny
from layerfold.cli import main
from layerfold.methods.search import SearchOptions, iterative_bi, laco, merge_repair, merged_layer, sleb
from layerfold.models.architectures import ARCHITECTURES
from layerfold.models.surgery import remove_layers

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread

ARCH = ARCHITECTURES["llama"]


def _ids(rows=4, seq=24, seed=3):
    return torch.randint(3, 259, (rows, seq), generator=torch.Generator().manual_seed(seed))


def _pruned(model, removed):
    m = copy.deepcopy(model)
    remove_layers(m, ARCH, sorted(removed))
    return m


@torch.no_grad()
def _nll(model, ids):
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()


@torch.no_grad()
def _kl(model, original, ids):
    p = F.log_softmax(original(input_ids=ids, use_cache=False).logits, -1)
    q = F.log_softmax(model(input_ids=ids, use_cache=False).logits, -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.mark.parametrize("loss", ["nll", "kl"])
def test_sleb_is_greedy_brute_force(loss):
    """Each step removes, of the layers left (first and last excluded), the one whose removal gives
    the lowest loss, with the loss measured by the stock forward of the pruned model."""
    model = build_tiny("llama", layers=6)
    ids = _ids()
    found = sleb(model, ARCH, ids, 3, SearchOptions(rows=4, loss=loss), progress=False)
    removed: list[int] = []
    for step in found["steps"]:
        scores = {}
        for c in range(1, 5):
            if c not in removed:
                m = _pruned(model, removed + [c])
                scores[c] = _nll(m, ids) if loss == "nll" else _kl(m, model, ids)
        best = min(scores, key=scores.get)
        assert step["removed"] == best
        # the original's log-probs are kept in float16 for the KL
        assert step[loss] == pytest.approx(scores[best], rel=1e-4 if loss == "nll" else 1e-3, abs=1e-6)
        removed.append(best)
    assert found["removed"] == sorted(removed)


def test_iterative_bi_scores_the_pruned_model_again():
    model = build_tiny("llama", layers=6)
    ids = _ids()
    found = iterative_bi(model, ARCH, ids, 3, SearchOptions(), progress=False)
    removed: list[int] = []
    for step in found["steps"]:
        m = _pruned(model, removed)
        outs = []
        hooks = [layer.register_forward_hook(lambda mod, i, o: outs.append(o[0] if isinstance(o, tuple) else o))
                 for layer in m.model.layers]
        with torch.no_grad():
            hs = m(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        for h in hooks:
            h.remove()
        inputs = list(hs[: len(m.model.layers)])
        kept = [l for l in range(6) if l not in removed]
        bi = {kept[p]: 1 - F.cosine_similarity(inputs[p], outs[p], dim=-1).mean().item() for p in range(len(kept))}
        best = min(bi, key=lambda l: (bi[l], l))
        assert step["removed"] == best and step["bi"] == pytest.approx(bi[best], abs=1e-5)
        removed.append(best)
    assert found["removed"] == sorted(removed)


def test_merging_adds_differences_to_the_original_base():
    model = build_tiny("llama", layers=6)
    layers = model.model.layers
    merged = merged_layer(layers[1], [layers[2], layers[3]])
    w = lambda l: l.self_attn.q_proj.weight  # noqa: E731
    torch.testing.assert_close(w(merged), w(layers[2]) + w(layers[3]) - w(layers[1]))
    # norms are not merged; the notebook's bug (differences to the updated base) would give
    # theta_3 alone: check we are not that
    assert torch.equal(merged.input_layernorm.weight, layers[1].input_layernorm.weight)
    assert not torch.allclose(w(merged), w(layers[3]))
    repaired = copy.deepcopy(model)
    record = merge_repair(repaired, ARCH, [0, 2, 3, 5])
    assert record == {"merged": [{"into": 1, "merged": [2, 3]}, {"into": 4, "merged": [5]}], "unmerged": [[0, 0]]}
    torch.testing.assert_close(w(repaired.model.layers[1]), w(merged))
    torch.testing.assert_close(repaired.model.layers[4].mlp.down_proj.weight, layers[5].mlp.down_proj.weight)


def test_laco_accepts_merges_by_the_cosine_test():
    """Every accepted step's cosine, recomputed with the stock forward of the merged model, is
    the one recorded and lies above its threshold; the budget is met exactly."""
    model = build_tiny("llama", layers=8)
    ids = _ids()
    found = laco(model, ARCH, ids, 3, SearchOptions(rows=4, laco_merge=2, laco_threshold=0.5), progress=False)
    assert len(found["removed"]) == 3
    gone: set[int] = set()

    def last_states(m):
        out = []
        h = m.model.layers[-1].register_forward_hook(lambda mod, i, o: out.append(o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            m(input_ids=ids, use_cache=False)
        h.remove()
        return out[0]

    reference = last_states(model)
    for i, step in enumerate(found["steps"]):
        gone |= set(step["merged"])
        m = copy.deepcopy(model)
        merge_repair(m, ARCH, sorted(gone), found["steps"][: i + 1])
        remove_layers(m, ARCH, sorted(gone))
        cos = F.cosine_similarity(last_states(m), reference, dim=-1).mean().item()
        assert cos == pytest.approx(step["cosine"], abs=1e-5) and cos > step["threshold"]
    assert sorted(gone) == found["removed"]


def _last_states(m, ids):
    out = []
    h = m.model.layers[-1].register_forward_hook(lambda mod, i, o: out.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        m(input_ids=ids, use_cache=False)
    h.remove()
    return out[0]


@torch.no_grad()
def _laco_by_hand(model, ids, n, merge, interval, threshold):
    """LaCo's Algorithm 1 on a stock model, written out: merge, in the CURRENT model, the next
    merge-1 layers into position p (each linear weight W_p + sum (W_f - W_p), W_p un-updated
    within the step), keep the result if the mean per-token cosine of the last layer's output to
    the original's is above the threshold and move ``interval`` down, else one down; stop at n
    removed; a scan with no acceptance lowers the threshold by 0.05. Returns the steps
    (original layer numbers) and the final model."""
    reference = _last_states(model, ids)
    current = copy.deepcopy(model)
    names = list(range(len(model.model.layers)))  # original number of each current layer
    steps, removed = [], 0
    while removed < n:
        accepted = False
        p = len(names) - merge
        while p >= 1 and removed < n:
            take = min(merge - 1, n - removed)
            trial = copy.deepcopy(current)
            layers = trial.model.layers
            base = layers[p]
            for mod_name, lin in base.named_modules():
                if isinstance(lin, torch.nn.Linear):
                    w0 = lin.weight.detach().clone()
                    lin.weight += sum(dict(layers[p + k].named_modules())[mod_name].weight - w0
                                      for k in range(1, take + 1))
            for k in range(take, 0, -1):
                del layers[p + k]
            trial.config.num_hidden_layers = len(layers)
            for i, layer in enumerate(layers):
                layer.self_attn.layer_idx = i
            cos = F.cosine_similarity(_last_states(trial, ids), reference, dim=-1).mean().item()
            if cos > threshold:
                steps.append({"base": names[p], "merged": names[p + 1: p + 1 + take], "cosine": cos})
                names = names[: p + 1] + names[p + 1 + take:]
                current, removed, accepted = trial, removed + take, True
                p = min(p, len(names) - 1) - interval
            else:
                p -= 1
        if not accepted:
            threshold -= 0.05
    return steps, current


@pytest.mark.parametrize("threshold", [-1.0, 0.6], ids=["every-merge", "some-rejected"])
def test_laco_merges_the_already_merged_layers_as_algorithm_1(threshold):
    """With 3 layers a merge and an interval of 2 the second step's followers include the
    first step's base: the paper merges its MERGED weights again (M* in Algorithm 1), where
    merging every run from the original weights gives a different layer. The search's steps
    and cosines, and the model the merge repair builds from them, equal a by-hand run of the
    algorithm on the stock model."""
    model = build_tiny("llama", layers=10)
    ids = _ids()
    found = laco(model, ARCH, ids, 4, SearchOptions(rows=4, laco_merge=3, laco_interval=2, laco_threshold=threshold),
                 progress=False)
    steps, by_hand = _laco_by_hand(model, ids, 4, merge=3, interval=2, threshold=threshold)
    assert [(s["base"], s["merged"]) for s in found["steps"]] == [(s["base"], s["merged"]) for s in steps]
    for got, want in zip(found["steps"], steps):
        assert got["cosine"] == pytest.approx(want["cosine"], abs=1e-5)
    if threshold == -1.0:  # every candidate accepted: the re-merge happens at step 2
        assert [(s["base"], s["merged"]) for s in steps] == [(7, [8, 9]), (5, [6, 7])]
    built = copy.deepcopy(model)
    merge_repair(built, ARCH, found["removed"], found["steps"])
    remove_layers(built, ARCH, found["removed"])
    for a, b in zip(built.state_dict().items(), by_hand.state_dict().items()):
        assert a[0] == b[0]
        torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-6)
    # the flattened merge of each run from the original weights is NOT this model
    flat = copy.deepcopy(model)
    merge_repair(flat, ARCH, found["removed"])
    remove_layers(flat, ARCH, found["removed"])
    differs = [k for k, v in flat.state_dict().items() if not torch.allclose(v, by_hand.state_dict()[k])]
    assert differs if threshold == -1.0 else True


def test_merge_steps_must_remove_the_selected_layers():
    from layerfold.errors import LayerfoldError

    model = build_tiny("llama", layers=6)
    with pytest.raises(LayerfoldError, match="merge steps remove"):
        merge_repair(model, ARCH, [3, 4], [{"base": 2, "merged": [3]}])


@pytest.mark.parametrize("flags", [["--method", "sleb"], ["--select", "iterative-bi", "--repair", "linear"],
                                   ["--method", "laco", "--laco-threshold", "0.3"]],
                         ids=["sleb", "iterative-bi+linear", "laco"])
def test_search_selections_from_the_command_line(capsys, tiny_model_dir, text_file, tmp_path, flags):
    from transformers import AutoModelForCausalLM

    from layerfold.models.surgery import count_parameters

    out = tmp_path / "o"
    assert main(["-q", "compress", tiny_model_dir("llama"), "--remove", "2", "--calib", text_file,
                 "--calib-samples", "4", "--seq-len", "16", "--no-heal", "--no-eval", "-o", str(out), *flags]) == 0
    record = json.loads((out / "layerfold.json").read_text())
    assert len(record["recipe"]["removed_layers"]) == 2 and record["recipe"]["search"]["removed"] == \
        record["recipe"]["removed_layers"]
    assert count_parameters(AutoModelForCausalLM.from_pretrained(out)) == record["plan"]["params_after"]


def test_search_options_are_checked_before_any_work(capsys, tiny_model_dir, tmp_path):
    code = main(["-q", "compress", tiny_model_dir("llama"), "--method", "sleb", "--search-rows", "0",
                 "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--search-rows must be at least 1" in err and not (tmp_path / "o").exists()


"""ReplaceMe's linear repair: the fitted map equals an independent least-squares solution, the
folded model's hidden state after a removed run is exactly M T + Y, runs are repaired in order
on the repaired model's states, post-norm families are refused before any work."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch

from conftest import ARCH_CONFIGS, build_tiny
from layerfold.cli import main
from layerfold.methods.replaceme import (LinearRepairOptions, fit_cosine, linear_repair, removed_runs,
                                         solve_lstsq)
from layerfold.models.architectures import ARCHITECTURES
from layerfold.models.surgery import remove_layers

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread

FOLDABLE = [t for t in ARCH_CONFIGS if ARCHITECTURES[t].mlp_output is not None]
POST_NORM = [t for t in ARCH_CONFIGS if ARCHITECTURES[t].mlp_output is None]


def _ids(rows=8, seq=32, seed=1):
    return torch.randint(3, 259, (rows, seq), generator=torch.Generator().manual_seed(seed))


def _states(model, ids, layer=None):
    """All hidden states (hidden_states[l] enters layer l) and, for ``layer``, its down projection's output."""
    seen = []
    handle = None
    if layer is not None:
        handle = model.model.layers[layer].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    if handle:
        handle.remove()
    return [h.double() for h in hs], (seen[0].double() if seen else None)


def _lstsq(m, d):
    """torch.linalg.lstsq on the flattened tokens: the independent solution."""
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    return torch.linalg.lstsq(flat(m), flat(d), driver="gelsd").solution


def test_runs_of_removed_layers():
    assert removed_runs([7, 2, 3, 5]) == [(2, 3), (5, 5), (7, 7)]
    assert removed_runs([]) == []


def test_the_ridge_solution_is_least_squares_on_the_augmented_system():
    # |M T - D|^2 + alpha |T - I|^2 is ordinary least squares with sqrt(alpha) I appended to M
    # and sqrt(alpha) I appended to D
    g = torch.Generator().manual_seed(0)
    m = torch.randn(200, 16, generator=g, dtype=torch.float64)
    d = torch.randn(200, 16, generator=g, dtype=torch.float64)
    mtm = m.T @ m
    alpha = 0.3 * float(mtm.diagonal().mean())
    eye = torch.eye(16, dtype=torch.float64)
    aug_m = torch.cat([m, alpha ** 0.5 * eye])
    aug_d = torch.cat([d, alpha ** 0.5 * eye])
    expected = torch.linalg.lstsq(aug_m, aug_d).solution
    torch.testing.assert_close(solve_lstsq(mtm, m.T @ d, 0.3), expected)


def test_with_fewer_tokens_than_dimensions_unseen_directions_pass_through():
    # 10 tokens in 32 dimensions: the data say nothing about the 22 directions orthogonal to
    # the tokens, so the map must leave them as plain removal does (T v = v), not erase them
    g = torch.Generator().manual_seed(1)
    m = torch.randn(10, 32, generator=g, dtype=torch.float64)
    d = torch.randn(10, 32, generator=g, dtype=torch.float64)
    basis = torch.linalg.svd(m, full_matrices=True).Vh  # rows 10.. are orthogonal to every token
    unseen = basis[10:].T
    for ridge in (1e-4, 0.0):
        t = solve_lstsq(m.T @ m, m.T @ d, ridge)
        torch.testing.assert_close(unseen.T @ t, unseen.T, atol=1e-8, rtol=0)
    # and with no ridge the seen tokens are fitted exactly (10 equations per column, 32 unknowns)
    torch.testing.assert_close(m @ solve_lstsq(m.T @ m, m.T @ d, 0.0), d, atol=1e-8, rtol=0)


@pytest.mark.parametrize("model_type", FOLDABLE)
def test_folded_model_gives_m_t_plus_y_after_the_run(model_type):
    """Layers 2-3 removed: the folded model's state entering old layer 4 is M T + Y, with M, Y
    read from the original by hooks and T from torch.linalg.lstsq on the same tokens."""
    model = build_tiny(model_type)
    ids = _ids()
    hs, m = _states(model, ids, layer=1)
    y = hs[2] - m
    t_ref = _lstsq(m, hs[4] - y)
    repaired = copy.deepcopy(model)
    fit = linear_repair(repaired, ARCHITECTURES[model_type], ids, [2, 3], LinearRepairOptions(ridge=0.0),
                        batch_size=3, progress=False)
    assert [r["into"] for r in fit.runs] == [1] and fit.passes == 1 and fit.runs[0]["tokens"] == ids.numel()
    assert fit.runs[0]["fit_error"] < fit.runs[0]["removal_error"]
    remove_layers(repaired, ARCHITECTURES[model_type], [2, 3])
    after, _ = _states(repaired, ids)
    expected = y + m @ t_ref
    torch.testing.assert_close(after[2], expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    # the other layers are untouched; only layer 1's down projection changed
    for new, old in [(0, 0), (2, 4), (3, 5)]:
        for (name, p), q in zip(repaired.model.layers[new].named_parameters(), model.model.layers[old].parameters()):
            assert torch.equal(p, q), name
    assert not torch.equal(repaired.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)


def test_later_runs_are_fitted_on_the_repaired_model_against_the_original():
    """Removed {1} and {3, 4}: run 2's map is fitted on the model with run 1 already removed and
    folded, toward the ORIGINAL state entering layer 5; in one pass or (little memory) one per run."""
    model = build_tiny("llama")
    arch = ARCHITECTURES["llama"]
    ids = _ids()
    hs, m1 = _states(model, ids, layer=0)
    y1 = hs[1] - m1
    t1 = _lstsq(m1, hs[2] - y1)
    step = copy.deepcopy(model)
    w = step.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        w.copy_((t1.T @ w.double()).float())
    remove_layers(step, arch, [1])  # old layer 2 is now layer 1, old 3 is 2
    hs1, m2 = _states(step, ids, layer=1)
    y2 = hs1[2] - m2
    t2 = _lstsq(m2, hs[5] - y2)
    expected = y2 + m2 @ t2
    for memory in (2**30, 1):  # every batch in one chunk; one batch per chunk
        repaired = copy.deepcopy(model)
        fit = linear_repair(repaired, arch, ids, [1, 3, 4], LinearRepairOptions(ridge=0.0), batch_size=4,
                            max_memory=memory, progress=False)
        assert [r["into"] for r in fit.runs] == [0, 2] and fit.passes == (1 if memory > 1 else 2)
        remove_layers(repaired, arch, [1, 3, 4])
        after, _ = _states(repaired, ids)
        torch.testing.assert_close(after[2], expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_a_run_at_layer_zero_is_removed_unrepaired_and_block_target_differs():
    model = build_tiny("llama")
    arch = ARCHITECTURES["llama"]
    ids = _ids()
    fit = linear_repair(copy.deepcopy(model), arch, ids, [0, 1, 4], LinearRepairOptions(), progress=False)
    assert fit.unrepaired == [[0, 1]] and [r["into"] for r in fit.runs] == [3]
    # the block target: the run's own output on the repaired states (here the same as the
    # original's for the first repaired run, as nothing before it changed)
    hs, m = _states(model, ids, layer=1)
    a = copy.deepcopy(model)
    b = copy.deepcopy(model)
    linear_repair(a, arch, ids, [2], LinearRepairOptions(target="block", ridge=0.0), progress=False)
    linear_repair(b, arch, ids, [2], LinearRepairOptions(target="original", ridge=0.0), progress=False)
    torch.testing.assert_close(a.model.layers[1].mlp.down_proj.weight, b.model.layers[1].mlp.down_proj.weight)
    a2, b2 = copy.deepcopy(model), copy.deepcopy(model)
    linear_repair(a2, arch, ids, [1, 3], LinearRepairOptions(target="block"), progress=False)
    linear_repair(b2, arch, ids, [1, 3], LinearRepairOptions(target="original"), progress=False)
    assert not torch.allclose(a2.model.layers[2].mlp.down_proj.weight, b2.model.layers[2].mlp.down_proj.weight)


def test_the_cosine_objectives_lower_their_loss_from_the_identity():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(512, 8, generator=g)
    y = torch.randn(512, 8, generator=g)
    rot = torch.linalg.qr(torch.randn(8, 8, generator=g))[0]
    h = y + m @ rot + 0.01 * torch.randn(512, 8, generator=g)
    cos = torch.nn.functional.cosine_similarity
    opts = LinearRepairOptions(objective="cosine", steps=200, lr=0.01, batch_tokens=256)
    for objective, loss in [("cosine", lambda t: 1 - cos(m @ t, h - y, dim=-1).mean()),
                            ("cosine-output", lambda t: 1 - cos(m @ t + y, h, dim=-1).mean())]:
        t = fit_cosine([(m, y, h)], objective, opts, progress=False).float()
        assert loss(t) < 0.5 * loss(torch.eye(8)), objective


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_compress_with_the_linear_repair_saves_the_folded_model(capsys, tiny_model_dir, text_file, tmp_path):
    """From the command line (a layer-streamed model): the saved folder is a stock model with the
    parameters of plain removal, equal to the API's repair on the same calibration rows; the
    input folder is not modified."""
    from transformers import AutoModelForCausalLM

    from layerfold.data.calibration import CalibrationSpec, load_calibration
    from layerfold.models.loading import load_model
    from layerfold.models.surgery import count_parameters

    src = Path(tiny_model_dir("llama"))
    before = _tree_hash(src)
    out = tmp_path / "lin"
    assert main(["-q", "compress", str(src), "--select", "bi", "--repair", "linear", "--remove", "2",
                 "--calib", text_file, "--calib-samples", "6", "--seq-len", "16", "--no-heal", "--no-eval",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "linear map   layers" in printed
    assert _tree_hash(src) == before
    record = json.loads((out / "layerfold.json").read_text())
    removed = record["recipe"]["removed_layers"]
    assert record["recipe"]["repair"] == "linear" and record["recipe"]["linear"]["runs"]
    saved = AutoModelForCausalLM.from_pretrained(out)
    loaded = load_model(str(src), device="cpu")
    ids = load_calibration(CalibrationSpec(source=text_file, samples=6, seq_len=16), loaded, progress=False)
    linear_repair(loaded.model, loaded.arch, ids, removed, LinearRepairOptions(), progress=False)
    remove_layers(loaded.model, loaded.arch, removed)
    assert count_parameters(saved) == count_parameters(loaded.model) == record["plan"]["params_after"]
    test_ids = _ids(2, 16, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=test_ids).logits, loaded.model(input_ids=test_ids).logits)


@pytest.mark.parametrize("model_type", POST_NORM)
def test_post_norm_families_are_refused_before_any_work(capsys, tiny_model_dir, text_file, tmp_path, monkeypatch,
                                                         model_type):
    import layerfold.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_calibration", lambda *a, **k: (_ for _ in ()).throw(AssertionError("work")))
    code = main(["-q", "compress", tiny_model_dir(model_type), "--repair", "linear", "--remove", "2",
                 "--calib", text_file, "--no-heal", "--no-eval", "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "cannot be folded exactly" in err and "norm" in err and not (tmp_path / "x").exists()

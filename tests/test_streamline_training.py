"""LLM-Streamline's training: its own text and budget, the official batch where the budget
allows, a validation curve with standard errors, the pair losses, the initialisation."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny
from layerfold.cli import main
from layerfold.data.calibration import CalibrationSpec, load_calibration
from layerfold.data.pairs import PairStore
from layerfold.errors import LayerfoldError
from layerfold.methods.streamline import (
    PairRegression, StreamlineOptions, TrainingText, collect_pairs, replace_and_train, training_text,
)
from layerfold.models.architectures import ARCHITECTURES
from layerfold.models.surgery import decoder_layers, remove_layers

pytestmark = pytest.mark.usefixtures("one_thread")
LLAMA = ARCHITECTURES["llama"]


def _ids(n, T=16, seed=0):
    return torch.randint(3, 259, (n, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rows,expected", [
    (256, (4, 2)),  # 65,536 tokens of 256: 8 sequences a step keep 32 steps
    (1024, (4, 8)),  # 262,144 tokens: 32 a step
    (8192, (4, 32)),  # enough for the official 128 (32 steps of it)
    (100_000, (4, 32)),  # never more than the official batch
    (10, (1, 1)),  # fewer rows than steps: one sequence a step
])
def test_batch_is_official_where_the_budget_allows(rows, expected):
    assert StreamlineOptions().batches(rows) == expected


def test_batch_rule_follows_its_options():
    assert StreamlineOptions(batch=16, min_steps=4, batch_size=8).batches(1000) == (8, 2)
    assert StreamlineOptions(batch=16, min_steps=4, batch_size=8).batches(20) == (5, 1)  # 20 // 4 = 5
    assert StreamlineOptions(min_steps=32, epochs=2).batches(256) == (4, 4)  # two passes: 512 rows


def test_official_optimiser_settings():
    cfg = StreamlineOptions().train_config(100, 4, 32)
    assert (cfg.betas, cfg.lr, cfg.weight_decay, cfg.max_grad_norm) == ((0.9, 0.95), 2e-4, 1e-3, 5.0)
    assert cfg.lr * cfg.min_lr_ratio == pytest.approx(5e-5) and cfg.rows_per_step() == 128


# -- the training text -------------------------------------------------------------------


def test_training_text_from_a_file_is_budget_plus_validation_rows(tiny_model_dir, text_file):
    from layerfold.models.loading import load_model

    loaded = load_model(tiny_model_dir("llama"))
    opts = StreamlineOptions(train_tokens=70, val_rows=3, data=CalibrationSpec(source=text_file, seq_len=16))
    text = training_text(opts, loaded, progress=False)
    assert (text.train, text.val) == (5, 3)  # ceil(70 / 16) rows, then the validation rows
    whole = load_calibration(CalibrationSpec(source=text_file, samples=8, seq_len=16), loaded, progress=False)
    assert torch.equal(text.ids, whole)  # the file's first rows; the last three validate


def test_self_written_training_text_is_the_healing_text_not_the_calibration(tiny_model_dir):
    from layerfold.healing import HEAL_SEED
    from layerfold.models.loading import load_model

    loaded = load_model(tiny_model_dir("llama"))
    opts = StreamlineOptions(train_tokens=32, val_rows=2, data=CalibrationSpec(seq_len=8, seed=1))
    text = training_text(opts, loaded, progress=False)
    assert text.ids.shape == (6, 8) and (text.train, text.val) == (4, 2) and text.source == "self" and HEAL_SEED == 1
    healing = load_calibration(CalibrationSpec(seed=HEAL_SEED, samples=6, seq_len=8), loaded, progress=False)
    calibration = load_calibration(CalibrationSpec(seed=0, samples=6, seq_len=8), loaded, progress=False)
    assert torch.equal(text.ids, healing) and not torch.equal(text.ids, calibration)


def test_calib_source_holds_out_a_tenth_of_the_calibration():
    calibration = _ids(32)
    text = training_text(StreamlineOptions(data=CalibrationSpec(source="calib")), None, calibration)
    assert (text.train, text.val) == (29, 3) and torch.equal(text.ids, calibration)


def test_missing_or_evaluation_training_file_stops_before_any_work(tmp_path, tiny_model_dir, capsys):
    from layerfold.data.guard import _eval_files

    out = tmp_path / "o"
    cases = [(str(tmp_path / "nope.txt"), "no such file")]
    tasks = [p for p in _eval_files() if p.suffix == ".jsonl"]
    if tasks:  # a copy of an evaluation file is refused as the file itself would be
        copy = tmp_path / "copy.jsonl"
        copy.write_bytes(tasks[0].read_bytes())
        cases.append((str(copy), "evaluation"))
    for source, message in cases:
        code = main(["-q", "compress", tiny_model_dir("llama"), "--method", "streamline", "--train-data", source,
                     "-o", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, err
        assert not out.exists()


# -- the run: steps, batch, validation curve ----------------------------------------------


def _block_io(model, ids, start, window):
    """(h[start], h[start+window]) from the model's own hidden states (independent of the pair pass)."""
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    return hs[start], hs[start + window]


def test_run_records_batch_steps_tokens_and_a_validation_curve(tmp_path):
    model = build_tiny("llama", layers=6)
    reference = build_tiny("llama", layers=6)
    ids = _ids(44)
    start, window = 1, 3
    text = TrainingText(ids, 4)
    opts = StreamlineOptions(loss="mse", init="first", batch=8, min_steps=5, batch_size=4, lr=1e-3, min_lr=1e-4,
                             pair_dtype="fp32", eval_every=1)
    log = tmp_path / "log.jsonl"
    r = replace_and_train(model, LLAMA, text, start, window, opts, work_dir=tmp_path, log_path=log, progress=False)
    t = r.training
    # 40 training rows, 8 a step (40 // 5), 4 x 2 accumulated: 5 steps, 640 tokens
    assert {k: t[k] for k in ("train_rows", "val_rows", "micro_batch", "grad_accum", "batch", "steps", "train_tokens",
                              "tokens_seen")} == {"train_rows": 40, "val_rows": 4, "micro_batch": 4, "grad_accum": 2,
                                                  "batch": 8, "steps": 5, "train_tokens": 640, "tokens_seen": 640}
    steps = [json.loads(l) for l in log.read_text().splitlines() if json.loads(l).get("event") == "step"]
    assert [s["tokens"] for s in steps] == [128, 256, 384, 512, 640]
    assert [v["step"] for v in t["validation"]] == [0, 1, 2, 3, 4, 5]
    # the first validation: per-row MSE of the untrained copy of layer 1 on the last four rows,
    # computed here from the model's hidden states, and its standard error between rows
    x, y = _block_io(reference, ids[40:], start, window)
    layer = decoder_layers(reference, LLAMA)[start]
    from layerfold.importance.layer_pass import layer_arguments, run_layer

    with torch.no_grad():
        call = layer_arguments(reference, LLAMA, (1, 16), x.device, x.dtype)[start]
        per_row = torch.tensor([F.mse_loss(run_layer(layer, x[i : i + 1], call), y[i : i + 1]).item()
                                for i in range(4)], dtype=torch.float64)
    first = t["validation"][0]
    assert first["loss"] == pytest.approx(per_row.mean().item(), rel=1e-5)
    assert first["se"] == pytest.approx((per_row.std() / math.sqrt(4)).item(), rel=1e-4)
    assert min(v["loss"] for v in t["validation"]) == t["best_val"] < first["loss"]


@pytest.mark.parametrize("loss", ["lm", "kl"])
def test_in_place_losses_use_the_training_text_and_its_validation_rows(tmp_path, loss):
    model = build_tiny("llama", layers=6)
    opts = StreamlineOptions(loss=loss, init="first", batch=4, min_steps=3, batch_size=2, lr=2e-3, min_lr=5e-4)
    r = replace_and_train(model, LLAMA, TrainingText(_ids(14), 2), 1, 3, opts, work_dir=tmp_path, progress=False)
    assert (r.training["train_rows"], r.training["val_rows"], r.training["steps"]) == (12, 2, 3)
    assert r.fit.best_val < r.fit.first_val and len(decoder_layers(model, LLAMA)) == 4


@pytest.mark.parametrize("loss", ["lm", "kl"])
def test_in_place_losses_against_values_by_hand(tmp_path, loss):
    """lm is the pruned model's next-token loss, kl is KL(original || pruned) per token, both on
    the validation rows before any step (computed here from the models' own logits); training
    changes the replacement and nothing else."""
    import copy

    original = build_tiny("llama", layers=6)
    model, pruned = copy.deepcopy(original), copy.deepcopy(original)
    remove_layers(pruned, LLAMA, [2, 3])  # the block 1..3 with its first layer kept untrained
    ids = _ids(14)
    opts = StreamlineOptions(loss=loss, init="first", batch=4, min_steps=3, batch_size=2, lr=2e-3, min_lr=5e-4)
    r = replace_and_train(model, LLAMA, TrainingText(ids, 2), 1, 3, opts, work_dir=tmp_path, progress=False)
    per_row = []
    with torch.no_grad():
        for row in (12, 13):
            x = ids[row : row + 1]
            q = F.log_softmax(pruned(input_ids=x).logits[0].double(), -1)
            if loss == "lm":
                per_row.append(F.nll_loss(q[:-1], x[0, 1:]).item())
            else:
                p = F.log_softmax(original(input_ids=x).logits[0].double(), -1)
                per_row.append((p.exp() * (p - q)).sum(-1).mean().item())
    assert r.training["validation"][0]["loss"] == pytest.approx(sum(per_row) / 2, rel=1e-4)
    before = {n: p for n, p in pruned.named_parameters()}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("model.layers.1.") for n in changed)


# -- losses ------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["mse", "mse-normed", "cosine"])
def test_pair_losses_against_values_by_hand(tmp_path, loss):
    model = build_tiny("llama", layers=6)
    ids = _ids(3)
    store = PairStore(tmp_path / "pairs", 3, 16, 64, "fp32")
    collect_pairs(model, LLAMA, ids, 1, 3, store, progress=False)
    x, y = _block_io(build_tiny("llama", layers=6), ids, 1, 3)
    remove_layers(model, LLAMA, [2, 3])  # layer 1 stands in for the block 1..3
    objective = PairRegression(model, LLAMA, 1, store, loss)
    import contextlib

    with torch.no_grad():
        value, terms = objective([0, 1, 2], contextlib.nullcontext())
        from layerfold.importance.layer_pass import layer_arguments, run_layer

        call = layer_arguments(model, LLAMA, (3, 16), x.device, x.dtype)[1]
        pred = run_layer(decoder_layers(model, LLAMA)[1], x, call)
    if loss == "mse":
        expected = ((pred - y) ** 2).mean()
    elif loss == "mse-normed":
        rms = lambda h: h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()  # noqa: E731
        expected = ((rms(pred) - rms(y)) ** 2).mean()
    else:
        cos = (pred * y).sum(-1) / (pred.norm(dim=-1) * y.norm(dim=-1))
        expected = 1 - cos.mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5) and set(terms) == {loss}


def test_unknown_pair_loss_is_refused(tmp_path):
    store = PairStore(tmp_path / "pairs", 1, 4, 64, "fp32")
    with pytest.raises(LayerfoldError, match="pair loss"):
        PairRegression(build_tiny("llama"), LLAMA, 1, store, "kl")


# -- initialisation ----------------------------------------------------------------------


@pytest.mark.parametrize("init,source", [("first", 1), ("last", 3)])
def test_replacement_starts_as_the_chosen_layer(tmp_path, init, source):
    model = build_tiny("llama", layers=6)
    layer = decoder_layers(build_tiny("llama", layers=6), LLAMA)[source]
    original = {k: v.clone() for k, v in layer.state_dict().items()}
    # a learning rate too small to move anything: the trained layer is its starting point
    opts = StreamlineOptions(init=init, lr=1e-12, min_lr=1e-12, batch=2, min_steps=1, pair_dtype="fp32")
    replace_and_train(model, LLAMA, TrainingText(_ids(6), 2), 1, 3, opts, work_dir=tmp_path, progress=False)
    for name, value in decoder_layers(model, LLAMA)[1].state_dict().items():
        torch.testing.assert_close(value, original[name], rtol=0, atol=1e-6)


def test_last_layer_init_keeps_the_slots_attention_type():
    from layerfold.methods.streamline import init_layer

    cfg = build_tiny("gemma2", layers=6).config  # sliding, full, sliding, full, ...
    gemma2 = ARCHITECTURES["gemma2"]
    last = StreamlineOptions(init="last")
    assert init_layer(last, 0, 4, cfg, gemma2) == 2  # layer 3 is a full layer; the slot 0 a sliding one
    assert init_layer(last, 1, 3, cfg, gemma2) == 3
    assert init_layer(StreamlineOptions(init="first"), 1, 3, cfg, gemma2) == 1
    assert StreamlineOptions().init == "first"  # the default: the best measured (benchmarks/streamline.md)
    assert init_layer(last, 1, 4, build_tiny("llama", layers=6).config, LLAMA) == 4


def test_init_applies_only_to_layer_replacements():
    from layerfold.methods.streamline import init_layer

    cfg = build_tiny("llama", layers=6).config
    for kind in ("ffn", "none"):  # an FFN starts as the identity; none keeps the first layer
        opts = StreamlineOptions(replacement=kind, init="last")
        opts.validate()
        assert init_layer(opts, 1, 4, cfg, LLAMA) == 1


# -- the closed-form linear init -----------------------------------------------------------


def _pairs_mse(model, index, store, rows):
    from layerfold.importance.layer_pass import layer_arguments, run_layer

    x, y, ids = store.read(rows)
    call = layer_arguments(model, LLAMA, tuple(ids.shape), torch.device("cpu"), torch.float32)[index]
    with torch.no_grad():
        return F.mse_loss(run_layer(decoder_layers(model, LLAMA)[index], x, call), y).item()


@pytest.mark.parametrize("init,source", [("linear", 1), ("linear-last", 3)])
def test_linear_init_is_the_least_squares_fit_of_the_down_projection(tmp_path, init, source):
    from layerfold.importance.layer_pass import layer_arguments, run_layer

    text = TrainingText(_ids(66), 2)  # 1,024 training tokens for 64 x 64 unknowns: the fit generalises
    model = build_tiny("llama", layers=6)
    reference = build_tiny("llama", layers=6)
    store = PairStore(tmp_path / "pairs", 66, 16, model.config.hidden_size, "fp32")
    collect_pairs(model, LLAMA, text.ids, 1, 3, store, progress=False)
    # by hand: the source layer's MLP output M and the rest Y on the training rows' inputs,
    # T = argmin |M T - (h_out - Y)|^2 + alpha |T - I|^2 (alpha: 1e-4 x the mean of diag M^T M), W <- T^T W
    layer = decoder_layers(reference, LLAMA)[source]
    x, y, ids = store.read(list(range(64)))
    call = layer_arguments(reference, LLAMA, tuple(ids.shape), torch.device("cpu"), torch.float32)[1]
    seen = []
    hook = layer.mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        out = run_layer(layer, x, call)
    hook.remove()
    m = seen[0].reshape(-1, 64).double()
    d = (y.double() - (out - seen[0]).double()).reshape(-1, 64)
    alpha = 1e-4 * float((m * m).sum(0).mean())
    t = torch.linalg.lstsq(torch.cat([m, alpha**0.5 * torch.eye(64, dtype=torch.float64)]),
                           torch.cat([d, alpha**0.5 * torch.eye(64, dtype=torch.float64)])).solution
    expected = (t.T @ layer.mlp.down_proj.weight.double()).float()

    opts = StreamlineOptions(init=init, loss="cosine", lr=1e-12, min_lr=1e-12, batch=2, min_steps=1)
    r = replace_and_train(model, LLAMA, text, 1, 3, opts, work_dir=tmp_path, progress=False, store=store)
    got = decoder_layers(model, LLAMA)[1].mlp.down_proj.weight
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    fit = r.training["linear_init"]
    assert fit["tokens"] == 64 * 16 and fit["error_after"] < fit["error_before"]
    # the model's own MSE on the training pairs is below the plain layer's it started from (T = I)
    plain = build_tiny("llama", layers=6)
    replace_and_train(plain, LLAMA, text, 1, 3, StreamlineOptions(init=init.replace("linear-", "").replace(
        "linear", "first"), loss="cosine", lr=1e-12, min_lr=1e-12, batch=2, min_steps=1), work_dir=tmp_path,
        progress=False, store=store)
    assert _pairs_mse(model, 1, store, list(range(64))) < _pairs_mse(plain, 1, store, list(range(64)))


def test_linear_init_needs_a_pair_loss():
    with pytest.raises(LayerfoldError, match="pair loss"):
        StreamlineOptions(init="linear", loss="kl").validate()
    StreamlineOptions(init="linear", loss="mse").validate()
    StreamlineOptions(init="linear", replacement="ffn", loss="kl").validate()  # ffn: the init does not apply


def test_cli_linear_init_records_its_fit_and_refuses_an_in_place_loss(tmp_path, tiny_model_dir, text_file, capsys):
    out = tmp_path / "o"
    code = main(["-q", "compress", tiny_model_dir("llama"), "--method", "streamline", "--remove", "2",
                 "--calib", text_file, "--calib-samples", "6", "--seq-len", "16", "--train-tokens", "64",
                 "--train-data", text_file, "--train-seq-len", "16", "--train-init", "linear", "--loss", "cosine",
                 "--no-heal", "--no-eval", "-o", str(out)])
    capsys.readouterr()
    assert code == 0
    sl = json.loads((out / "layerfold.json").read_text())["recipe"]["streamline"]
    fit = sl["training"]["linear_init"]
    assert sl["init"] == "linear" and fit["tokens"] == 64 and fit["error_after"] < fit["error_before"]
    # the default loss (lm) trains in place, as kl does: the linear init needs a pair loss given
    for loss in (["--loss", "kl"], []):
        code = main(["-q", "compress", tiny_model_dir("llama"), "--method", "streamline", "--train-init", "linear",
                     *loss, "--calib", text_file, "-o", str(tmp_path / "k")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "pair loss" in err and not (tmp_path / "k").exists()


# -- trainings sharing one pair store ----------------------------------------------------


def test_trainings_sharing_a_pair_store_keep_their_own_best_state(tmp_path, monkeypatch):
    """Two replacements trained on one stored set of pairs (the grid's --pairs-dir, shared by
    parallel processes): B trains from start to end between A's last best-state keep and A's
    restore, as a parallel process can. A must still end with its own best state, exactly the
    weights it gets when trained alone, and neither leaves a best-state file behind."""
    from layerfold.train import loop

    ids = _ids(22)
    start, window = 1, 3
    text = TrainingText(ids, 4)
    store = PairStore(tmp_path / "pairs", 22, 16, 64, "fp32")
    collect_pairs(build_tiny("llama", layers=6), LLAMA, ids, start, window, store, progress=False)
    a_opts = StreamlineOptions(loss="mse", init="first", batch=6, min_steps=3, batch_size=3, lr=1e-3, min_lr=1e-4,
                               eval_every=1)
    b_opts = StreamlineOptions(loss="cosine", init="last", batch=6, min_steps=3, batch_size=3, lr=1e-3, min_lr=1e-4,
                               eval_every=1)

    def train(opts):
        model = build_tiny("llama", layers=6)
        r = replace_and_train(model, LLAMA, text, start, window, opts, work_dir=tmp_path, progress=False, store=store)
        return r, {n: p.detach().clone() for n, p in decoder_layers(model, LLAMA)[start].named_parameters()}

    alone, a_alone = train(a_opts)
    assert alone.fit.best_step is not None  # a validated run: its best state went to disk

    restore = loop._BestState.restore
    b_ran = []

    def restore_after_b(self):
        if not b_ran:  # A's restore: B runs its whole training first (B's own restore is the real one)
            b_ran.append(None)
            b_ran[0] = train(b_opts)
        restore(self)

    monkeypatch.setattr(loop._BestState, "restore", restore_after_b)
    _, a_shared = train(a_opts)
    assert b_ran and b_ran[0][0].fit.best_step is not None
    assert a_shared.keys() == a_alone.keys()
    for name, tensor in a_alone.items():
        torch.testing.assert_close(a_shared[name], tensor, rtol=0, atol=0, msg=name)
    # the pairs are all that stays in the store's folder
    assert sorted(p.name for p in store.folder.iterdir() if not p.is_file()) == []
    assert not list(store.folder.rglob("best_state*"))

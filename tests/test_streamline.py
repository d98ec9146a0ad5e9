"""LLM-Streamline on tiny random models: pairs, replacements, training, saving, the command."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny, stability_by_hand
from layerfold.cli import main
from layerfold.data.calibration import CalibrationSpec
from layerfold.data.pairs import PairStore
from layerfold.errors import LayerfoldError
from layerfold.healing import HealOptions
from layerfold.importance import measure_similarity
from layerfold.importance.layer_pass import capture_layer_inputs, run_layer
from layerfold.methods.streamline import (
    StreamlineOptions, block_window, collect_pairs, streamline,
)
from layerfold.models.architectures import ARCHITECTURES
from layerfold.models.surgery import decoder_layers
from layerfold.nn.replacements import ReplacementSpec, build_replacement
from layerfold.methods.registry import SelectionOptions
from layerfold.models.saving import OutputOptions
from layerfold.pipeline import CompressOptions, ModelOptions, compress
from layerfold.train import TrainConfig, lr_factor


def _text(path, seq_len=16):
    """Training text read from a file (self-written text would make each test generate it)."""
    return CalibrationSpec(source=path, seq_len=seq_len, seed=1)


def _ids(n=12, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (n, T), generator=g)


# -- pairs on disk ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_pair_store_equals_in_memory(tmp_path, dtype):
    torch.manual_seed(0)
    x, y, ids = torch.randn(10, 7, 5), torch.randn(10, 7, 5) * 3, _ids(10, 7)
    store = PairStore(tmp_path / "p", 10, 7, 5, dtype)
    for first in range(0, 10, 4):  # written in uneven batches
        store.write(first, x[first : first + 4], y[first : first + 4], ids[first : first + 4])
    rows = [7, 2, 3, 9, 0]
    rx, ry, rids = PairStore.open(tmp_path / "p").read(rows)
    cast = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert torch.equal(rx, x[rows].to(cast).float())
    assert torch.equal(ry, y[rows].to(cast).float())
    assert torch.equal(rids, ids[rows])
    assert store.nbytes() == 10 * 7 * (2 * 5 * (4 if dtype == "fp32" else 2) + 8)


def test_fp16_overflow_is_a_clear_error(tmp_path):
    store = PairStore(tmp_path / "p", 1, 2, 3, "fp16")
    with pytest.raises(LayerfoldError, match="bf16"):
        store.write(0, torch.full((1, 2, 3), 1e6), torch.zeros(1, 2, 3), _ids(1, 2))


def test_collected_pairs_are_the_block_input_and_output(tmp_path):
    model = build_tiny("llama", layers=6)
    arch = ARCHITECTURES["llama"]
    ids = _ids(10, 16)
    start, window = 1, 3
    store = PairStore(tmp_path / "p", 10, 16, 64, "fp32")
    collect_pairs(model, arch, ids, start, window, store, batch_size=4, progress=False)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states  # hs[l] enters layer l
    x, y, got_ids = store.read(range(10))
    torch.testing.assert_close(x, hs[start], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, hs[start + window], rtol=1e-5, atol=1e-5)
    assert torch.equal(got_ids, ids)


# -- the block and the target ----------------------------------------------------------


def test_block_window_for_remove_and_sparsity():
    layers = [100] * 10
    assert block_window(layers, 100, 2, None) == 3  # 2 net: 3 layers become 1
    assert block_window(layers, 100, None, 0.3) == 4  # 4 layers out, 1 layer in: 30% of 1000
    assert block_window(layers, 20, None, 0.3) == 3  # a small FFN: 300 - 20 = 28%, nearest to 30%
    with pytest.raises(LayerfoldError, match="at most 8"):
        block_window(layers, 100, 9, None)


def test_sparsity_reports_exact_parameters(tmp_path, tiny_model_dir, text_file):
    from layerfold.models.loading import load_model

    loaded = load_model(tiny_model_dir("llama"))
    per_layer = sum(p.numel() for p in decoder_layers(loaded.model, loaded.arch)[0].parameters())
    r = compress(CompressOptions(
        model=ModelOptions(tiny_model_dir("llama")), selection=SelectionOptions(method="streamline", sparsity=0.3),
        data=CalibrationSpec(source=text_file, samples=6, seq_len=16), output=OutputOptions(str(tmp_path / "o")),
        progress=False, repair=StreamlineOptions(replacement="ffn", ffn_width=16, train_tokens=32, data=_text(text_file)),
        healing=HealOptions(tokens=0),  # healing is tested in test_heal.py; here it would only cost minutes
    ), loaded=loaded)
    sl = r.streamline
    ffn = 2 * 64 * 16 + 16 + 64 + 64  # up, up bias, down bias, norm
    assert sl.replacement_params == ffn
    assert r.params_before - r.params_after == sl.window * per_layer - ffn
    record = json.loads((r.output / "layerfold.json").read_text())
    assert record["params_after"] == r.params_after
    assert record["recipe"]["streamline"]["replacement_parameters"] == ffn


# -- replacements ----------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "olmo2"])
def test_swiglu_replacement_has_no_attention(model_type):
    model = build_tiny(model_type, layers=4)
    arch = ARCHITECTURES[model_type]
    layer = build_replacement(decoder_layers(model, arch)[1], model.config, arch, ReplacementSpec("swiglu"))
    ids = _ids(2, 10)
    x = capture_layer_inputs(model, arch, ids)
    h = torch.randn(2, 10, 64)
    h2 = h.clone()
    h2[:, :5] = torch.randn(2, 5, 64)  # change earlier tokens: an attention-free layer cannot notice
    with torch.no_grad():
        a, b = run_layer(layer, h, x.calls[1]), run_layer(layer, h2, x.calls[1])
    torch.testing.assert_close(a[:, 5:], b[:, 5:])
    assert not any(p.requires_grad for p in layer.self_attn.parameters())
    assert any(p.requires_grad for p in layer.mlp.parameters())


def test_decoder_replacement_call_is_causal():
    """The arguments recomputed from token ids give the replacement a causal mask: changing
    later tokens leaves earlier outputs alone, while changing earlier ones changes later ones."""
    model = build_tiny("qwen2", layers=4)
    arch = ARCHITECTURES["qwen2"]
    layer = build_replacement(decoder_layers(model, arch)[1], model.config, arch, ReplacementSpec("layer"))
    ids = _ids(2, 12)
    call = capture_layer_inputs(model, arch, ids).calls[1]
    h = torch.randn(2, 12, 64)
    late, early = h.clone(), h.clone()
    late[:, 8:] += 1.0
    early[:, :2] += 1.0
    with torch.no_grad():
        base, a, b = (run_layer(layer, t, call) for t in (h, late, early))
    torch.testing.assert_close(a[:, :8], base[:, :8])
    assert (b[:, 4:] - base[:, 4:]).abs().max() > 1e-4


# -- training --------------------------------------------------------------------------


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = TrainConfig(lr=2e-4, min_lr_ratio=0.25, warmup_steps=10)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))
    assert lr_factor(100, 100, cfg) * cfg.lr == pytest.approx(5e-5)


@pytest.mark.parametrize("replacement,loss", [("layer", "mse"), ("ffn", "mse"), ("swiglu", "mse"),
                                               ("layer", "mse-normed")])
def test_mse_training_lowers_validation_loss(tmp_path, replacement, loss):
    model = build_tiny("llama", layers=6)
    arch = ARCHITECTURES["llama"]
    ids = _ids(20, 16)
    scores = measure_similarity(model, arch, ids, progress=False)
    opts = StreamlineOptions(replacement=replacement, loss=loss, init="first", epochs=4, batch_size=4, lr=2e-3,
                             min_lr=5e-4)
    log = tmp_path / "log.jsonl"
    r = streamline(model, arch, ids, scores, opts, remove=2, work_dir=tmp_path, log_path=log, progress=False)
    # an attention-free replacement cannot copy a random block's attention: it only improves
    # (the normalised loss is smaller in scale and falls more slowly at the same learning rate)
    factor = {"layer": 0.9, "ffn": 0.95, "swiglu": 1.0}[replacement] if loss == "mse" else 0.95
    assert r.fit.best_val < factor * r.fit.first_val
    events = [json.loads(l) for l in log.read_text().splitlines()]
    assert events[0]["event"] == "config" and events[-1]["event"] == "done"
    assert any(e["event"] == "val" and e["step"] > 0 for e in events)
    assert not any(p.name.startswith("pairs") for p in tmp_path.iterdir())  # temporary pairs removed
    assert len(decoder_layers(model, arch)) == 4


@pytest.mark.parametrize("loss", ["lm", "kl"])
def test_in_place_training_changes_only_the_replacement(tmp_path, loss):
    model = build_tiny("llama", layers=6)
    arch = ARCHITECTURES["llama"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids(16, 16)
    scores = measure_similarity(model, arch, ids, progress=False)
    opts = StreamlineOptions(loss=loss, init="first", epochs=4, batch_size=4, lr=2e-3, min_lr=5e-4)
    r = streamline(model, arch, ids, scores, opts, remove=2, work_dir=tmp_path, progress=False)
    assert r.fit.best_val < r.fit.first_val
    layers = decoder_layers(model, arch)
    for new, old in enumerate(r.layer_map):
        if old is None:
            continue
        for name, p in layers[new].state_dict().items():
            assert torch.equal(p, before[f"model.layers.{old}.{name}"]), (new, name)
    assert torch.equal(model.lm_head.weight, before["lm_head.weight"])


# -- saving and the command ------------------------------------------------------------


@pytest.mark.parametrize("model_type,replacement", [
    ("llama", "layer"), ("llama", "swiglu"), ("llama", "none"), ("llama", "ffn"),
    ("qwen2", "layer"), ("gemma2", "swiglu"),
])
def test_saved_model_reloads_with_same_logits(tmp_path, tiny_model_dir, text_file, model_type, replacement):
    from transformers import AutoModelForCausalLM

    from layerfold.models.loading import load_model

    loaded = load_model(tiny_model_dir(model_type))
    r = compress(CompressOptions(
        model=ModelOptions(tiny_model_dir(model_type)), selection=SelectionOptions(method="streamline", remove=2),
        data=CalibrationSpec(source=text_file, samples=6, seq_len=16), output=OutputOptions(str(tmp_path / "o")),
        progress=False, repair=StreamlineOptions(replacement=replacement, train_tokens=64, data=_text(text_file)),
        healing=HealOptions(tokens=0),
    ), loaded=loaded)
    assert (r.output / "training_log.jsonl").exists() == (replacement != "none")
    reloaded = AutoModelForCausalLM.from_pretrained(r.output, trust_remote_code=replacement == "ffn").eval()
    assert reloaded.config.num_hidden_layers == 4
    ids = _ids(2, 12, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, loaded.model(ids).logits, rtol=1e-5, atol=1e-5)
        # and with the KV cache, token by token
        gen_a = reloaded.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
        gen_b = loaded.model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
    assert torch.equal(gen_a, gen_b)
    if replacement == "ffn":  # stock code without the flag must refuse, not load a broken model
        with pytest.raises(Exception):
            AutoModelForCausalLM.from_pretrained(r.output, trust_remote_code=False)


def test_cli_streamline_writes_log_and_record(tmp_path, tiny_model_dir, text_file, capsys):
    out = tmp_path / "o"
    task = tmp_path / "mc.jsonl"
    task.write_text("".join(json.dumps({"query": f"Question: {i} plus one?\n", "choices": [str(i + 1), str(i + 2)],
                                        "gold": 0}) + "\n" for i in range(5)))
    code = main(["-q", "compress", tiny_model_dir("llama"), "--method", "streamline", "--remove", "2",
                 "--calib", text_file, "--calib-samples", "6", "--seq-len", "16", "--train-tokens", "64",
                 "--train-data", text_file, "--train-seq-len", "16", "--no-heal",
                 "--eval-tasks", str(task), "--eval-limit", "4", "-o", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "6 -> 4" in stdout and "training" in stdout
    record = json.loads((out / "layerfold.json").read_text())
    sl = record["recipe"]["streamline"]
    # the default trains in place (lm): no pairs, so no pair storage recorded
    assert sl["replacement"] == "layer" and sl["loss"] == "lm" and sl["init"] == "first" and sl["pair_dtype"] is None
    assert "--train-tokens 64" in record["command"]
    # 64 tokens of 16: 4 rows, one a step (4 // 32 steps rounds up to a batch of 1), 32 validation rows
    t = sl["training"]
    assert (t["train_rows"], t["val_rows"], t["batch"], t["steps"], t["tokens_seen"]) == (4, 32, 1, 4, 64)
    assert [v["step"] for v in t["validation"]] == [0, 1, 2, 3, 4] and all(v["se"] > 0 for v in t["validation"])
    assert "4 steps of 1 sequences" in (out / "README.md").read_text()
    assert record["layer_map"].count(None) == 1
    ev = record["evaluation"]
    before = json.loads((out / "eval_before.json").read_text())["tasks"]["mc"]["examples"]
    after = json.loads((out / "eval_after.json").read_text())["tasks"]["mc"]["examples"]
    assert ev["after"]["mc/stability"] == pytest.approx(stability_by_hand(before, after), abs=1e-12)
    assert "mc/acc" in ev["before"]
    assert "stability" in stdout and (out / "eval_after.json").exists()
    assert "| mc |" in (out / "README.md").read_text()


def test_cli_rejects_training_nothing(tmp_path, tiny_model_dir, text_file, capsys):
    code = main(["-q", "compress", tiny_model_dir("llama"), "--method", "streamline", "--replacement", "none",
                 "--loss", "kl", "--calib", text_file, "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("layerfold: error:") and "--replacement none" in err
    assert not (tmp_path / "o").exists()


def test_fit_restores_the_best_validation_steps_weights_in_memory_and_on_disk(tmp_path):
    """Validation losses are scripted so that step 3 is the best; each validation also takes
    its own copy of the weights. After training, the module holds exactly step 3's copy (not
    the last step's), whether the best state was kept in memory or on disk."""
    from layerfold.train import fit

    def run(best_state_dir):
        torch.manual_seed(0)
        module = torch.nn.Linear(4, 4)
        x = torch.randn(32, 4)
        y = x @ torch.randn(4, 4)
        scripted = iter([5.0, 4.0, 3.0, 1.0] + [2.0] * 20)  # validation losses: step 3 is the best
        seen = []  # the weights at each validation: before training (step 0), after step 1, 2, ...

        def validate():
            seen.append((module.weight.detach().clone(), module.bias.detach().clone()))
            return next(scripted)

        r = fit(module, lambda rows, autocast: torch.nn.functional.mse_loss(module(x[rows]), y[rows]),
                TrainConfig(steps=10, batch_size=16, lr=1e-2, eval_every=1, progress=False), rows=32,
                validate=validate, best_state_dir=best_state_dir)
        return r, module, seen

    for where in (None, tmp_path / "best"):
        r, module, seen = run(where)
        assert r.best_step == 3 and len(seen) == 11
        step3_weight, step3_bias = seen[3]
        torch.testing.assert_close(module.weight.detach(), step3_weight, rtol=0, atol=0)
        torch.testing.assert_close(module.bias.detach(), step3_bias, rtol=0, atol=0)
        last_weight, _ = seen[10]
        assert not torch.equal(step3_weight, last_weight)  # training moved on: restoring did something
        assert not torch.equal(step3_weight, seen[2][0])  # and step 3 is not a neighbour's state
    assert not any((tmp_path / "best").iterdir())  # removed once restored

"""FoldGPT: group parameter sharing, its storage and both loaders, unfold, cure, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import build_tiny, tiny_tokenizer
from layerfold.cli import main
from layerfold.errors import LayerfoldError
from layerfold.models.architectures import ARCHITECTURES
from layerfold.models.loading import load_model
from layerfold.models.surgery import count_parameters
from layerfold.export.shared import MODELING_FILE, save_shared_folder
from layerfold.nn.shared import adjacent_groups, parse_groups, share_groups, shared_parameter_map

IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 120, 64, 7, 11], [1, 2, 200, 31, 9, 77, 5, 5, 6, 250]])


def test_groups_parse_and_validate():
    assert adjacent_groups(5, 2) == [[0, 1], [2, 3], [4]]
    assert parse_groups("0-1, 3-4", 6) == [[0, 1], [2], [3, 4], [5]]
    for bad, msg in [("0-1,1-2", "twice"), ("2-1", "not a range"), ("0-9", "not a range"), ("a", "cannot read")]:
        with pytest.raises(LayerfoldError, match=msg):
            parse_groups(bad, 6)
    model = build_tiny("llama", 4)
    with pytest.raises(LayerfoldError, match="adjacent"):
        share_groups(model, ARCHITECTURES["llama"], [[0, 2], [1], [3]])


@pytest.mark.parametrize("init", ["important", "mean"])
def test_share_groups_ties_every_linear_weight_and_keeps_norms(init):
    arch = ARCHITECTURES["llama"]
    model = build_tiny("llama", 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    full = count_parameters(model)
    importance = [0.1, 0.9, 0.5, 0.2]
    tied = share_groups(model, arch, [[0, 1], [2, 3]], init=init, importance=importance)
    layers = model.model.layers
    linear = [n for n, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linear) == 7 and len(tied) == 2 * 7
    for name in linear:
        w = lambda l: layers[l].get_submodule(name).weight  # noqa: E731
        assert w(0) is w(1) and w(2) is w(3) and w(1) is not w(2)
        a, b = before[f"model.layers.0.{name}.weight"], before[f"model.layers.1.{name}.weight"]
        expected = b if init == "important" else (a + b) / 2  # layer 1 has the higher importance
        torch.testing.assert_close(w(0).detach(), expected)
    assert layers[0].input_layernorm.weight is not layers[1].input_layernorm.weight
    per_layer_linear = sum(m.weight.numel() for m in layers[0].modules() if isinstance(m, torch.nn.Linear))
    assert count_parameters(model) == full - 2 * per_layer_linear


@pytest.fixture
def shared_folder(tmp_path):
    """A tiny llama (tied embeddings) with layers 0-1 and 2-3 sharing, saved by layerfold."""
    base = tmp_path / "base"
    m = build_tiny("llama", 5)
    m.config.tie_word_embeddings = True
    m.tie_weights()
    m.save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    loaded = load_model(str(base), device="cpu")
    full = count_parameters(loaded.model)
    share_groups(loaded.model, loaded.arch, [[0, 1], [2, 3], [4]], init="mean")
    with torch.no_grad():
        ref = loaded.model(input_ids=IDS).logits
    out = save_shared_folder(loaded, tmp_path / "shared", card="test")
    return base, out, ref, count_parameters(loaded.model), full


def _tensor_names(folder: Path) -> set[str]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return set(index["weight_map"])


def _payload(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def test_shared_model_stores_each_tensor_once_and_reloads_both_ways(shared_folder):
    from transformers import AutoModelForCausalLM

    base, out, ref, stored, full = shared_folder
    names = _tensor_names(out)
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert "model.layers.1.self_attn.q_proj.weight" not in names  # stored once, under layer 0
    assert "model.layers.1.input_layernorm.weight" in names  # norms stay per layer
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "layerfold_shared" and cfg["layerfold_base_model_type"] == "llama"
    assert (out / MODELING_FILE).is_file()
    # the folder is smaller by the shared matrices: 4 bytes per stored fp32 parameter
    assert _payload(base) - _payload(out) == pytest.approx(4 * (full - stored), abs=4096)

    ours = load_model(str(out), device="cpu")
    stock = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    for model in (ours.model, stock):
        assert count_parameters(model) == stored
        layers = model.model.layers
        assert layers[0].mlp.down_proj.weight is layers[1].mlp.down_proj.weight
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=IDS).logits, ref, rtol=0, atol=0)


def test_stock_loading_without_remote_code_refuses_instead_of_random_weights(shared_folder):
    from transformers import AutoModelForCausalLM

    out = shared_folder[1]
    with pytest.raises(Exception, match="custom code|trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)


def test_export_unfold_writes_a_standard_model_with_identical_logits(shared_folder, capsys):
    from transformers import AutoModelForCausalLM

    base, out, ref = shared_folder[:3]
    target = out.parent / "unfolded"
    assert main(["-q", "export", str(out), "--unfold", "-o", str(target)]) == 0
    cfg = json.loads((target / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg and "layerfold_shared" not in cfg
    assert not (target / MODELING_FILE).exists()
    assert "model.layers.1.self_attn.q_proj.weight" in _tensor_names(target)
    model = AutoModelForCausalLM.from_pretrained(target)  # stock, no custom code
    assert not shared_parameter_map(model, exclude=set(model.all_tied_weights_keys))
    assert _payload(target) == pytest.approx(_payload(base), abs=4096)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, ref, rtol=0, atol=0)


def test_export_gguf_of_a_shared_model_is_unfolded_first(shared_folder):
    """The GGUF of a FoldGPT folder holds every layer's tensors and gives its logits."""
    import gguf
    from transformers import AutoModelForCausalLM

    from conftest import tiny_bpe_tokenizer

    _, out, ref = shared_folder[:3]
    tiny_bpe_tokenizer(words=("t",)).save_pretrained(out)  # llama.cpp needs merges; one fits the 260 rows
    path = out.parent / "shared.gguf"
    assert main(["-q", "export", str(out), "--gguf", str(path), "--outtype", "f32"]) == 0
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert {"blk.0.attn_q.weight", "blk.1.attn_q.weight"} <= names
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, ref, rtol=0, atol=1e-5)


def test_cure_trains_shared_weights_once_and_keeps_sharing():
    from layerfold.methods.foldgpt import CureOptions, run_cure
    from layerfold.models.surgery import copy_model, remove_layers

    arch = ARCHITECTURES["llama"]
    teacher = build_tiny("llama", 6)
    student = copy_model(teacher)
    remove_layers(student, arch, [2, 3])
    share_groups(student, arch, [[0, 1], [2, 3]])
    frozen = student.model.embed_tokens.weight.detach().clone()
    ids = torch.randint(3, 259, (8, 16), generator=torch.Generator().manual_seed(0))
    c = run_cure(student, teacher, arch, ids,
                 CureOptions(steps=12, lr=3e-3, batch_size=4, tail_layers=2, warmup_steps=0), progress=False)
    curve = [h["loss"] for h in c["history"]]
    assert curve[-1] < curve[0]
    assert {x["name"] for x in c["losses"]} == {"kl", "mse"}
    layers = student.model.layers
    assert layers[0].self_attn.q_proj.weight is layers[1].self_attn.q_proj.weight  # sharing survived
    assert torch.equal(student.model.embed_tokens.weight, frozen)  # embeddings not trained
    assert all(p.requires_grad for p in student.parameters())


def test_compress_foldgpt_end_to_end(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "fold"
    code = main(["-q", "compress", tiny_model_dir("llama"), "--method", "foldgpt", "--remove", "2",
                 "--group-size", "2", "--calib", text_file, "--calib-samples", "8", "--seq-len", "16",
                 "--gate-steps", "5", "--cure-steps", "2", "--cure-samples", "8", "-o", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "shared       2 groups of new layers: 0-1 2-3" in text
    assert "gate check   held-out KL to the original (8 rows): gates' choice" in text
    record = json.loads((out / "layerfold.json").read_text())
    check = record["gates"]["check"]  # the gates' choice against Block Influence's, recorded
    assert check["gates"]["removed"] == record["recipe"]["removed_layers"]
    assert check["gates"]["kl"] >= 0 and check["block_influence"]["kl"] >= 0
    assert "--gate-type" not in record["command"] and set(record["gates"]["gates"]) == {0.0, 1.0}
    assert record["recipe"]["groups"] == [[0, 1], [2, 3]]
    assert len(record["recipe"]["removed_layers"]) == 2
    assert record["params_stored"] < record["params_after_removal"] < record["params_before"]
    assert (out / "training_log.jsonl").read_text().count("\n") == 2
    assert (out / "gate_log.jsonl").read_text().count("\n") == 5
    assert "--method foldgpt" in (out / "README.md").read_text()
    loaded = load_model(str(out), device="cpu")
    assert count_parameters(loaded.model) == record["params_stored"]


def test_analyze_gates_column(tiny_model_dir, text_file, tmp_path, capsys):
    js = tmp_path / "scores.json"
    code = main(["-q", "analyze", tiny_model_dir("llama"), "--gates", "--remove", "2", "--gate-steps", "3",
                 "--calib", text_file, "--calib-samples", "4", "--seq-len", "16", "--json", str(js)])
    text = capsys.readouterr().out
    assert code == 0
    assert "  gate" in text.splitlines()[0] and "Remove 2 by gates" in text
    assert "Check: held-out KL to the original (8 rows): gates' choice" in text
    data = json.loads(js.read_text())
    assert len(data["gates"]) == 6 and len(data["gates_removed"]) == 2
    assert data["gates_check"]["gates"]["removed"] == data["gates_removed"]
    assert [e["step"] for e in data["gates_log"]] == [1, 2, 3]  # the step log, for a plot
    assert all(len(e["gates"]) == 6 and e["round"] == 1 for e in data["gates_log"])
    swaps = data["gates_swaps"]  # the swap refinement, on the 4 calibration rows there are (8 asked)
    assert swaps["rows"] == 4 and swaps["removed"] == data["gates_removed"]
    assert swaps["kl_after"] <= swaps["kl_before"] and swaps["tried"]


def test_foldgpt_bad_options(tiny_model_dir, text_file, tmp_path, capsys):
    for flags, needle in [(["--group-size", "0"], "--group-size"), (["--groups", "0-9"], "--groups"),
                          (["--cure-steps", "-1"], "--cure-steps")]:
        code = main(["-q", "compress", tiny_model_dir("llama"), "--method", "foldgpt", "--remove", "2",
                     "--calib", text_file, "--calib-samples", "4", "--seq-len", "16", "--gate-steps", "2",
                     "--cure-steps", "0", *flags, "-o", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "o").exists()


def test_fold_uses_given_gates_and_checks_their_budget():
    """A gate ranking trained once (e.g. by ``analyze --gates``) can be reused: fold removes
    exactly its layers and refuses one made for another budget."""
    from layerfold.importance.gates import GateResult
    from layerfold.methods.foldgpt import FoldGPTOptions, fold
    from layerfold.models.loading import LoadedModel

    arch = ARCHITECTURES["llama"]
    model = build_tiny("llama", 6)
    loaded = LoadedModel(model=model, tokenizer=tiny_tokenizer(), arch=arch, source="tiny", base_model="tiny", local_dir=None)
    gates = GateResult([0.9, 0.1, 0.8, 0.2, 0.95, 0.7], removed=[1, 3])
    opts = FoldGPTOptions()
    opts.cure.steps = 0
    r = fold(loaded, IDS, 2, opts, gates=gates, progress=False)
    assert r.removed == [1, 3] and r.kept == [0, 2, 4, 5]
    assert len(model.model.layers) == 4
    with pytest.raises(LayerfoldError, match="remove 2 of 6"):
        fold(LoadedModel(model=build_tiny("llama", 6), tokenizer=tiny_tokenizer(), arch=arch, source="tiny",
                         base_model="tiny", local_dir=None), IDS, 3, opts, gates=gates, progress=False)

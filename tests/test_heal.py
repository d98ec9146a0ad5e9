"""Healing: LoRA merge gives a standard model, partial fine-tuning, tied heads, the command line,
and the refusal to train on evaluation data."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import build_tiny, tiny_tokenizer
from layerfold.cli import main
from layerfold.data.calibration import CalibrationSpec
from layerfold.errors import LayerfoldError
from layerfold.healing import HealOptions, heal, is_tied
from layerfold.models.loading import load_model
from layerfold.models.surgery import remove_layers


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def _opts(text_file, **kw):
    base = HealOptions(tokens=6 * 4 * 32, data=CalibrationSpec(source=text_file, seq_len=32, seed=1),
                       batch_size=4, lr=3e-3, teacher_cache=False, progress=False)
    return replace(base, **kw)


def _pair(tiny_model_dir):
    teacher = load_model(tiny_model_dir("llama"), dtype="fp32", device="cpu")
    student = load_model(tiny_model_dir("llama"), dtype="fp32", device="cpu")
    remove_layers(student.model, student.arch, [2, 3])
    return student, teacher


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_heal_merges_into_a_standard_model_that_reloads_identically(tiny_model_dir, text_file, tmp_path):
    student, teacher = _pair(tiny_model_dir)
    r = heal(student, teacher, _opts(text_file, train="lora", lora_rank=4, ce=0.2, mse=0.5, mse_layers=2))
    h = r.train.history
    assert h[-1]["loss_kl"] < h[0]["loss_kl"]
    model = student.model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in model.named_parameters())
    model.save_pretrained(tmp_path, safe_serialization=True)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 250, (2, 16))
    assert torch.equal(_logits(model, ids), _logits(again, ids))
    assert r.trainable.startswith("LoRA r=4")


def test_layer_healing_trains_only_the_chosen_layers_and_norm(tiny_model_dir, text_file):
    student, teacher = _pair(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in student.model.named_parameters()}
    heal(student, teacher, _opts(text_file, train="layers", layers="last:1"))
    changed = {n for n, p in student.model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(n.startswith("model.layers.3.") or n == "model.norm.weight" or n == "lm_head.weight"
                           for n in changed)
    assert "model.norm.weight" in changed and "lm_head.weight" in changed  # untied head: trained


def test_a_tied_head_stays_frozen_by_default_and_untie_adds_its_own(tmp_path, text_file):
    model = build_tiny("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights() if hasattr(model, "tie_weights") else None
    model.lm_head.weight = model.model.embed_tokens.weight
    folder = tmp_path / "tied"
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    teacher = load_model(str(folder), dtype="fp32", device="cpu")
    for mode in ("auto", "untie"):
        student = load_model(str(folder), dtype="fp32", device="cpu")
        assert is_tied(student.model)
        emb = student.model.model.embed_tokens.weight.detach().clone()
        r = heal(student, teacher, _opts(text_file, train="layers", layers="last:1", lm_head=mode))
        m = student.model
        assert torch.equal(m.model.embed_tokens.weight, emb)  # the input embeddings never move
        if mode == "auto":
            assert is_tied(m) and r.lm_head == "freeze"
        else:
            assert not is_tied(m) and not torch.equal(m.lm_head.weight, emb)
            out = tmp_path / "untied"
            m.save_pretrained(out, safe_serialization=True)
            from transformers import AutoModelForCausalLM

            again = AutoModelForCausalLM.from_pretrained(out).eval()
            ids = torch.randint(3, 250, (1, 12))
            assert torch.equal(_logits(m, ids), _logits(again, ids))


def test_heal_resumes_from_its_checkpoint(tiny_model_dir, text_file, tmp_path):
    opts = _opts(text_file, train="lora+layers", layers="last:1", lora_rank=2,
                 checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=2)
    first, teacher = _pair(tiny_model_dir)
    heal(first, teacher, opts)
    # a second run that resumes finds the last checkpoint and ends with the same weights
    second, _ = _pair(tiny_model_dir)
    r = heal(second, teacher, replace(opts, resume=True))
    assert r.train.resumed_from == r.train.steps
    for (n, a), (_, b) in zip(first.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(a, b), n


def test_healing_refuses_evaluation_files(tmp_path, monkeypatch, text_file):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [json.dumps({"query": f"Question number {i}: what is the answer here?", "choices": ["a", "b"],
                        "gold": 0}) for i in range(50)]
    (tasks / "qa.jsonl").write_text("\n".join(rows) + "\n")
    monkeypatch.setenv("LAYERFOLD_EVAL_DATA", str(tasks))
    copy = tmp_path / "copy.jsonl"
    shutil.copy(tasks / "qa.jsonl", copy)
    shuffled = tmp_path / "mixed.jsonl"
    shuffled.write_text("\n".join(rows[::-3]) + "\n")
    pasted = tmp_path / "pasted.txt"
    pasted.write_text("Some harmless text of my own, long enough.\n\nQuestion number 7: what is the answer here?\n")
    for bad in (tasks / "qa.jsonl", copy, shuffled, pasted):
        with pytest.raises(LayerfoldError, match="evaluation"):
            HealOptions(tokens=100, data=CalibrationSpec(source=str(bad))).validate()
    HealOptions(tokens=100, data=CalibrationSpec(source=text_file)).validate()  # ordinary text is fine


@pytest.mark.skipif(not Path("../shared/data/tasks/piqa.jsonl").is_file(), reason="shared data not present")
def test_cli_refuses_a_shared_task_file(capsys, tiny_model_dir):
    code = main(["heal", tiny_model_dir("llama"), "--teacher", tiny_model_dir("llama"),
                 "--heal-data", "../shared/data/tasks/piqa.jsonl", "--text-field", "query"])
    err = capsys.readouterr().err
    assert code == 2 and "evaluation" in err and len(err.strip().splitlines()) == 1


def test_cli_compress_heals_and_heal_command_works(capsys, tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "pruned"
    code = main(["-q", "compress", tiny_model_dir("llama"), "--method", "last-n", "--remove", "2", "-o", str(out),
                 "--heal-tokens", "256", "--heal-data", text_file, "--heal-seq-len", "32",
                 "--heal-batch-size", "4", "--heal-train", "lora", "--lora-rank", "2", "--heal-mse", "0.5"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "healing" in text
    record = json.loads((out / "layerfold.json").read_text())
    assert record["heal"]["tokens"] == 256 and record["recipe"]["heal"]["mse"] == 0.5
    assert "--heal-tokens 256" in record["command"] and "--heal-mse 0.5" in record["command"]
    healed = tmp_path / "healed"
    code = main(["-q", "heal", str(out), "--teacher", tiny_model_dir("llama"), "-o", str(healed),
                 "--heal-tokens", "128", "--heal-data", text_file, "--heal-seq-len", "32", "--heal-batch-size", "4",
                 "--heal-train", "layers", "--heal-layers", "last:1", "--heal-log", str(tmp_path / "log.jsonl")])
    assert code == 0, capsys.readouterr()
    again = json.loads((healed / "layerfold.json").read_text())
    assert again["layer_map"] == record["layer_map"] and again["heal"]["steps"] == 1
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 1
    loaded = load_model(str(healed), device="cpu")
    assert loaded.model.config.num_hidden_layers == 4


def test_heal_without_teacher_uses_the_next_token_loss(capsys, tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "ce"
    code = main(["-q", "heal", tiny_model_dir("llama"), "--no-teacher", "-o", str(out), "--heal-tokens", "128",
                 "--heal-data", text_file, "--heal-seq-len", "32", "--heal-batch-size", "4"])
    assert code == 0, capsys.readouterr()
    record = json.loads((out / "layerfold.json").read_text())
    assert record["recipe"]["heal"]["ce"] == 1.0 and record["recipe"]["heal"]["kl"] == 0.0
    assert "--no-teacher" in record["command"]


def test_heal_needs_a_budget_and_valid_settings(capsys, tiny_model_dir):
    for argv, needle in ((["--heal-tokens", "0"], "positive"), (["--heal-kl", "0"], "loss weights"),
                         (["--resume"], "--checkpoint-dir"), (["--heal-layers", "last:x", "--heal-train", "layers"], "heal-layers")):
        code = main(["heal", tiny_model_dir("llama"), *argv])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_compress_heals_by_default_on_the_calibration_text(capsys, tiny_model_dir, text_file, tmp_path):
    """The main job heals unless told not to; its default healing text is the calibration text,
    so it writes no new text; --no-heal turns healing off and the record says so."""
    from layerfold.healing import compress_defaults

    d = compress_defaults()
    assert d.enabled and d.data.source == "calib"
    out = tmp_path / "default"
    code = main(["-q", "compress", tiny_model_dir("llama"), "--remove", "2", "-o", str(out), "--calib", text_file,
                 "--calib-samples", "4", "--seq-len", "32", "--heal-tokens", "256", "--no-eval"])
    assert code == 0, capsys.readouterr()
    record = json.loads((out / "layerfold.json").read_text())
    assert record["heal"]["rows"] == 4 and record["heal"]["seq_len"] == 32  # the 4 calibration rows, repeated
    assert record["heal"]["steps"] == 1 and record["recipe"]["heal"]["data"]["source"] == "calib"
    assert "--no-heal" not in record["command"] and "--heal-tokens 256" in record["command"]

    out = tmp_path / "unhealed"
    code = main(["-q", "compress", tiny_model_dir("llama"), "--remove", "2", "-o", str(out), "--calib", text_file,
                 "--calib-samples", "4", "--seq-len", "32", "--no-heal", "--no-eval"])
    assert code == 0, capsys.readouterr()
    record = json.loads((out / "layerfold.json").read_text())
    assert record["heal"] is None and "--no-heal" in record["command"]


def test_calibration_text_as_healing_text_is_only_for_compress(capsys, tiny_model_dir, tmp_path):
    code = main(["heal", tiny_model_dir("llama"), "--heal-data", "calib", "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "only with `layerfold compress`" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("train", ["lora", "layers"])
def test_activation_checkpointing_changes_memory_not_the_result(tiny_model_dir, text_file, train):
    results = []
    for checkpointing in (False, True):
        student, teacher = _pair(tiny_model_dir)
        seen = []  # was checkpointing on while training?
        r = heal(student, teacher, _opts(text_file, train=train, lora_rank=4, mse=0.5, mse_layers=2,
                                         checkpointing=checkpointing),
                 eval_fn=lambda m: seen.append(any(getattr(x, "gradient_checkpointing", False) for x in m.modules()))
                 or {}, eval_every=1)
        assert seen and all(s == checkpointing for s in seen)
        # switched off again for the saved model
        assert not any(getattr(m, "gradient_checkpointing", False) for m in student.model.modules())
        results.append(([h["loss"] for h in r.train.history], student.model.state_dict()))
    (loss_a, state_a), (loss_b, state_b) = results
    assert loss_a == loss_b
    for k in state_a:
        torch.testing.assert_close(state_a[k], state_b[k], rtol=0, atol=0, msg=k)


def test_heal_refuses_a_missing_student_before_loading_the_teacher(capsys, tmp_path, monkeypatch):
    import layerfold.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_load", lambda *a, **k: pytest.fail("nothing should be loaded"))
    code = main(["-q", "heal", str(tmp_path / "nope"), "--heal-tokens", "128", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "no such file or folder" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_default_micro_batch_is_one_row_of_an_eight_row_step():
    from layerfold.errors import LayerfoldError
    from layerfold.healing import HealOptions

    assert (HealOptions().micro_batch, HealOptions().accumulation) == (1, 8)
    # either one given: the other keeps its old default (8 rows per micro-batch, 1 per step)
    assert (HealOptions(batch_size=4).micro_batch, HealOptions(batch_size=4).accumulation) == (4, 1)
    assert (HealOptions(grad_accum=2).micro_batch, HealOptions(grad_accum=2).accumulation) == (8, 2)
    recipe = HealOptions(tokens=64).recipe()
    assert (recipe["batch_size"], recipe["grad_accum"]) == (1, 8)  # what ran, not the 0 that means default
    with pytest.raises(LayerfoldError, match="--heal-batch-size"):
        HealOptions(tokens=64, batch_size=-1).validate()


def test_the_held_out_curve_is_fitted_every_n_steps_when_asked(capsys, tiny_model_dir, text_file, tmp_path):
    """--eval-heldout-every N: the held-out fit before healing and after every N-th optimizer
    step; the default is about four fits a run (every steps // 4)."""
    def curve(out, *extra):
        code = main(["-q", "compress", tiny_model_dir("llama"), "--remove", "2", "-o", str(out), "--calib", text_file,
                     "--calib-samples", "4", "--seq-len", "32", "--heal-tokens", "2048", "--eval-ppl", "",
                     "--eval-speed-rounds", "0", "--eval-heldout-rows", "2", *extra])
        assert code == 0, capsys.readouterr()
        record = json.loads((out / "layerfold.json").read_text())
        assert record["heal"]["steps"] == 8  # 2,048 tokens in steps of 8 rows x 32
        return [p["tokens"] for p in record["heal_curve"] if p.get("heldout") is not None]

    step = 8 * 32
    assert curve(tmp_path / "every2") == [0, 2 * step, 4 * step, 6 * step, 8 * step]  # 8 // 4
    # every 3rd step, and the last step, which the training loop always validates
    assert curve(tmp_path / "every3", "--eval-heldout-every", "3") == [0, 3 * step, 6 * step, 8 * step]

"""Methods as plan and apply: the layer map, exact counts before any weight changes, dry runs,
plans from saved scores with no weight read, selections and repairs that compose."""

from __future__ import annotations

import json

import pytest

from layerfold.cli import main
from layerfold.errors import LayerfoldError
from layerfold.models.layer_map import LayerMap

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def test_layer_map_of_each_transform():
    removal = LayerMap.removal(8, [2, 3, 6])
    assert removal.to_list() == [0, 1, 4, 5, 7] and removal.removed == [2, 3, 6] and removal.kept == [0, 1, 4, 5, 7]
    assert removal.describe() == "0-1 2-3<-4-5 4<-7"
    block = LayerMap.replacement(8, 2, 3)  # layers 2, 3, 4 become one new layer 2
    assert block.to_list() == [0, 1, None, 5, 6, 7] and block.removed == [2, 3, 4]
    assert block.kept == [0, 1, 4, 5, 6, 7]  # the replacement stands for the block's last output
    assert block.describe() == "0-1 2<-[2..4] 3-5<-5-7"
    assert LayerMap.from_list(block.to_list(), 8) == block  # read back from layerfold.json
    untrained = LayerMap.replacement(8, 2, 3, keeps_first=True)
    assert untrained.to_list() == [0, 1, 2, 5, 6, 7] and untrained.blocks == ()
    # pruning the pruned model again: new layers 1 and 3 of the second model (originals 1, 5) go
    twice = block.then(LayerMap.removal(6, [1, 3]))
    assert twice.to_list() == [0, None, 6, 7] and twice.kept == [0, 4, 6, 7] and twice.removed == [1, 2, 3, 4, 5]
    with pytest.raises(LayerfoldError, match="not a layer map"):
        LayerMap((0, 0), 2)


def _compress(tiny_model_dir, text_file, tmp_path, name, *flags):
    out = tmp_path / name
    code = main(["-q", "compress", tiny_model_dir("llama"), "--remove", "2", "--calib", text_file,
                 "--calib-samples", "6", "--seq-len", "16", "--no-heal", "--no-eval", "-o", str(out),
                 *_train(flags, text_file)])
    assert code == 0
    return out


def _train(flags, text_file):
    """LLM-Streamline's training text from the small file, as short rows (not self-written)."""
    trains = "streamline" in flags or "replacement" in flags
    return [*flags, "--train-data", text_file, "--train-seq-len", "16"] if trains else list(flags)


@pytest.mark.parametrize("flags", [
    ["--method", "bi"], ["--method", "bi", "--repair", "linear"], ["--method", "sleb"],
    ["--method", "laco", "--laco-threshold", "0.3"], ["--method", "auto", "--auto-plans", "bi+none,bi+linear"],
    ["--method", "angular"], ["--method", "streamline-block"], ["--method", "last-n"],
    ["--method", "streamline", "--train-tokens", "32"],
    ["--method", "streamline", "--replacement", "ffn", "--ffn-width", "16", "--train-tokens", "32"],
    ["--method", "streamline", "--replacement", "none"],
    ["--method", "foldgpt", "--gate-steps", "3", "--cure-steps", "0"],
    ["--method", "foldgpt", "--select", "last-n", "--group-size", "3", "--cure-steps", "0"],
], ids=lambda f: "-".join(x.strip("-") for x in f[1:4]))
def test_the_dry_run_plan_is_what_compress_builds(capsys, tiny_model_dir, text_file, tmp_path, flags):
    """The plan's layer map and exact parameter count, printed by --dry-run before any layer
    changes, are those of the model compress then saves (counted on the reloaded folder)."""
    from transformers import AutoModelForCausalLM

    from layerfold.models.surgery import count_parameters

    capsys.readouterr()
    dry = tmp_path / "dry"
    assert main(["-q", "compress", tiny_model_dir("llama"), "--remove", "2", "--calib", text_file,
                 "--calib-samples", "6", "--seq-len", "16", "--no-heal", "--no-eval", "-o", str(dry),
                 "--dry-run", *_train(flags, text_file)]) == 0
    printed = capsys.readouterr().out
    assert not dry.exists()  # a dry run writes nothing
    out = _compress(tiny_model_dir, text_file, tmp_path, "real", *flags)
    record = json.loads((out / "layerfold.json").read_text())
    plan = record["plan"]
    assert f"parameters   {plan['params_before']:,} -> {plan['params_after']:,}" in printed
    assert f"layers       6 -> {plan['layers_after']}" in printed and "stages       load" in printed
    assert record["layer_map"] == plan["layer_map"]
    # stock transformers (the ffn replacement and sharing ship their ten lines of model code)
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert count_parameters(reloaded) == plan["params_after"] == record["params_after"]


def test_a_plan_from_saved_scores_reads_no_weight(capsys, tiny_model_dir, text_file, tmp_path, monkeypatch):
    scores = tmp_path / "scores.json"
    assert main(["-q", "analyze", tiny_model_dir("llama"), "--calib", text_file, "--calib-samples", "6",
                 "--seq-len", "16", "--json", str(scores)]) == 0
    capsys.readouterr()
    out = _compress(tiny_model_dir, text_file, tmp_path, "real", "--method", "bi")
    removed = json.loads((out / "layerfold.json").read_text())["recipe"]["removed_layers"]

    import transformers

    import layerfold.data.calibration as calibration
    import layerfold.models.lazy as lazy
    import layerfold.models.loading as loading
    import layerfold.pipeline as pipeline

    def refuse(*a, **k):
        raise AssertionError("no weight and no text may be read")

    # every way layerfold reads weights (whole models, streamed layers) or calibration text
    for module, name in [(pipeline, "load_model"), (loading, "load_model"), (pipeline, "load_calibration"),
                         (calibration, "load_calibration"), (lazy, "load_lazy"), (lazy.SafetensorsFolder, "load"),
                         (transformers.AutoModelForCausalLM, "from_pretrained")]:
        monkeypatch.setattr(module, name, refuse)
    assert main(["-q", "compress", tiny_model_dir("llama"), "--remove", "2", "--scores", str(scores),
                 "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"(removed {', '.join(map(str, removed))})" in printed


def test_scores_of_another_model_are_refused(capsys, tiny_model_dir, text_file, tmp_path):
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"num_layers": 9, "cosine": [[None] * 10] * 10, "angular": [[None] * 10] * 10}))
    code = main(["-q", "compress", tiny_model_dir("llama"), "--scores", str(scores), "--no-heal", "--no-eval",
                 "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "scores of a 9-layer model; this one has 6" in err and not (tmp_path / "o").exists()


def test_selections_and_repairs_compose(capsys, tiny_model_dir, text_file, tmp_path):
    """The block selection with the replacement repair is LLM-Streamline, whichever way it is asked
    for; a repair that needs a block refuses scattered layers before any work."""
    a = _compress(tiny_model_dir, text_file, tmp_path, "a", "--method", "streamline", "--train-tokens", "32")
    b = _compress(tiny_model_dir, text_file, tmp_path, "b", "--method", "streamline-block", "--repair", "replacement",
                  "--train-tokens", "32")
    ra, rb = (json.loads((x / "layerfold.json").read_text()) for x in (a, b))
    assert ra["layer_map"] == rb["layer_map"] and ra["layer_map"].count(None) == 1
    assert rb["recipe"]["selection"] == "block" and rb["recipe"]["repair"] == "replacement"
    code = main(["-q", "compress", tiny_model_dir("llama"), "--select", "bi", "--repair", "replacement",
                 "-o", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "chooses layers anywhere" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_foldgpt_runs_the_same_stages_and_is_evaluated(capsys, tiny_model_dir, text_file, tmp_path):
    task = tmp_path / "mc.jsonl"
    task.write_text("".join(json.dumps({"query": f"Question: {i} plus one?\n", "choices": [str(i + 1), str(i + 2)],
                                        "gold": 0}) + "\n" for i in range(4)))
    out = tmp_path / "fold"
    code = main(["-q", "compress", tiny_model_dir("llama"), "--method", "foldgpt", "--remove", "2", "--calib", text_file,
                 "--calib-samples", "6", "--seq-len", "16", "--gate-steps", "3", "--cure-steps", "1",
                 "--cure-samples", "4", "--eval-tasks", str(task), "-o", str(out)])
    assert code == 0, capsys.readouterr()
    assert (out / "eval_after.json").exists() and (out / "report.html").exists() and (out / "recipe.yaml").exists()
    record = json.loads((out / "layerfold.json").read_text())
    assert "mc/acc" in record["evaluation"]["after"] and record["cure"]["steps"] == 1
    assert record["plan"]["groups"] == [[0, 1], [2, 3]] and record["params_after"] == record["plan"]["params_after"]


@pytest.mark.parametrize("tied", [False, True])
def test_the_config_only_skeleton_has_the_model_s_exact_shapes(tmp_path, tied):
    from conftest import build_tiny, tiny_tokenizer

    from layerfold.models.loading import load_model, model_skeleton
    from layerfold.models.surgery import count_parameters

    model = build_tiny("qwen2", layers=4)
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    skeleton = model_skeleton(str(tmp_path))
    assert all(p.device.type == "meta" for p in skeleton.model.parameters())
    loaded = load_model(str(tmp_path), device="cpu")
    assert count_parameters(skeleton.model) == count_parameters(loaded.model) == count_parameters(model)
    assert [count_parameters(l) for l in skeleton.model.model.layers] == [count_parameters(l) for l in model.model.layers]

"""The memory plan of ``compress`` (``memory_plan.py``): stages fitted to a budget before any work.

A model of about 19 MB of fp32 weights stands in for a big one: ``--memory-limit`` set a few MiB
above the runtime's share leaves room for one layer at a time but not for the whole model.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from layerfold import memory_plan
from layerfold.cli import main
from layerfold.data.calibration import CalibrationSpec, bundled_corpus, load_calibration, read_texts
from layerfold.recipe import CompressOptions
from layerfold.schema import format_size
from layerfold.train.memory import RUNTIME_BYTES

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--calib-samples", "4", "--seq-len", "16", "--batch-size", "2"]
# the runtime's estimate and 10 MiB: one 2.4 MB layer at a time fits, 19 MB of weights do not
LIMIT = format_size(RUNTIME_BYTES + 10 * 2**20)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    from conftest import build_tiny, tiny_tokenizer

    path = tmp_path_factory.mktemp("wide-llama")
    model = build_tiny("llama", layers=8, hidden_size=256, intermediate_size=512)
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def options(*argv: str) -> CompressOptions:
    from layerfold import schema
    from layerfold.cli import build_parser

    args = build_parser().parse_args(["compress", *argv])
    return schema.from_arguments(args.root(), args)


def no_loading(monkeypatch):
    """Loading any weight fails the test: a refusal must come before work."""
    import layerfold.models.loading as loading
    import layerfold.pipeline as pipeline

    def fail(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pipeline, "_load", fail)
    monkeypatch.setattr(loading, "load_model", fail)


def test_weights_and_layers_come_from_the_skeleton(wide_model):
    plan = memory_plan.plan_memory(options(wide_model, "--memory-limit", "64GiB"))
    s = plan.sizes
    layer = 2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 512 + 2 * 256  # q, o; k, v (2 of 4 heads); mlp; norms
    assert (s.layers, s.layer_bytes) == (8, 4 * layer)
    assert s.weight_bytes == 4 * (8 * layer + 2 * 260 * 256 + 256)  # layers, embeddings, untied head, final norm
    assert s.resident_bytes == 4 * (260 * 256 + 256)  # the untied head stays on disk when streamed
    assert plan.budget == 64 * 2**30 and plan.budget_source == "--memory-limit"


def test_the_default_small_model_plan_changes_nothing(wide_model):
    opts = options(wide_model)
    plan = memory_plan.plan_memory(opts)
    # the only difference: the default method named (ReplaceMe: this Llama folds the linear map)
    assert opts.selection.method is None and plan.options.selection.method == "replaceme"
    assert not plan.streamed and plan.changes == [] and replace(plan.options, selection=opts.selection) == opts
    assert [(s.name, s.how) for s in plan.stages] == [
        ("calibration text", "in memory"), ("selection (bi)", "streamed"), ("repair", "streamed"),
        ("healing", "in memory"), ("evaluation", "in memory"), ("saving", "in memory")]
    assert plan.describe().count("\n") == 0 and plan.describe().startswith("memory plan  in memory")


def test_a_small_budget_streams_with_the_bundled_corpus(wide_model, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["-q", "compress", wide_model, "--memory-limit", LIMIT, *SMALL, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    first = printed.splitlines()[0]
    assert first.startswith("memory plan  streamed") and f"({'--memory-limit'})" in first
    assert "the bundled corpus, not self-written text" in printed
    assert "evaluation         skipped" in printed and f"layerfold eval {out} --reference {wide_model}" in printed
    assert "healing            skipped" in printed and f"layerfold heal {out} --teacher {wide_model}" in printed
    record = json.loads((out / "layerfold.json").read_text())
    plan = record["memory_plan"]
    assert plan["streamed"] and plan["budget_bytes"] == RUNTIME_BYTES + 10 * 2**20
    assert {s["stage"]: s["how"] for s in plan["stages"]} == {
        "calibration text": "no model", "selection (bi)": "streamed", "repair": "streamed", "healing": "skipped",
        "evaluation": "skipped", "saving": "streamed"}
    assert record["recipe"]["calibration"]["source"] == "bundled"
    assert record["heal"] is None and record["evaluation"] is None
    assert "--calib bundled" in record["command"] and "--no-eval" in record["command"]
    assert plan["peak_estimate_bytes"] <= RUNTIME_BYTES + 10 * 2**20
    recipe = (out / "recipe.yaml").read_text()
    assert "source: bundled" in recipe and "limit: 535822336" not in recipe  # sizes read as sizes
    assert not list(tmp_path.glob(".layerfold-*"))


@pytest.mark.parametrize("extra, what", [
    (["--heal-tokens", "64"], "healing (--heal-tokens)"),
    (["--method", "foldgpt"], "the selection (--method foldgpt)"),
    (["--eval-limit", "5"], "the evaluation (--eval-limit)"),
])
def test_what_was_asked_for_and_cannot_fit_is_refused_at_once(wide_model, tmp_path, capsys, monkeypatch, extra, what):
    no_loading(monkeypatch)
    out = tmp_path / "out"
    code = main(["-q", "compress", wide_model, "--memory-limit", LIMIT, *SMALL, *extra, "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"layerfold: error: memory plan: {what} needs ~") and "(--memory-limit)" in err
    assert f"what fits: layerfold compress {wide_model}" in err and f"--memory-limit {LIMIT}" in err
    assert not out.exists()


def test_the_command_a_refusal_names_fits(wide_model):
    with pytest.raises(Exception) as e:
        memory_plan.plan_memory(options(wide_model, "--memory-limit", LIMIT, *SMALL, "--heal-tokens", "64"))
    command = str(e.value).split("what fits: ")[1].split()
    assert "--no-heal" in command or "--heal-tokens" in command
    plan = memory_plan.plan_memory(options(*command[2:]))
    assert plan.streamed and plan.peak <= RUNTIME_BYTES + 10 * 2**20


def test_a_budget_below_even_the_streamed_plan_is_refused(wide_model, capsys, monkeypatch):
    no_loading(monkeypatch)
    code = main(["-q", "compress", wide_model, "--memory-limit", "100MiB", *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "memory plan: even streamed" in err and "0.10 GiB budget (--memory-limit)" in err


def test_big_models_on_a_cpu_run_whole_only_when_asked(wide_model, monkeypatch):
    monkeypatch.setattr(memory_plan, "CPU_WHOLE_MODEL_PARAMS", 1000)  # the wide model is "big"
    plan = memory_plan.plan_memory(options(wide_model, "--device", "cpu", *SMALL))
    assert plan.streamed and "run whole only when asked" in plan.reason
    assert plan.options.data.source == "bundled" and plan.options.healing.tokens == 0
    assert not plan.options.evaluation.enabled
    # a streamed plan keeps the pass's activations to about one layer's bytes
    assert plan.options.layer_pass.max_memory <= plan.sizes.layer_bytes
    assert {s.name: s.note for s in plan.stages}["evaluation"].startswith("needs the whole model: too slow")
    # asked for by name, and it fits: it runs, with a note
    asked = memory_plan.plan_memory(options(wide_model, "--device", "cpu", *SMALL, "--heal-tokens", "64"))
    heal = {s.name: s for s in asked.stages}["healing"]
    assert heal.how == "in memory" and "slow on a CPU" in heal.note and asked.options.healing.tokens == 64


def test_a_given_calibration_file_and_max_memory_are_kept(wide_model, text_file):
    opts = options(wide_model, "--memory-limit", LIMIT, *SMALL, "--calib", text_file, "--max-memory", "1MiB",
                   "--no-heal", "--no-eval")
    plan = memory_plan.plan_memory(opts)
    assert plan.options.data.source == text_file and plan.options.layer_pass.max_memory == 2**20
    assert plan.changes == []


def test_the_bundled_corpus_is_self_written_text_with_its_provenance(tiny_model_dir):
    texts = read_texts("bundled")
    assert len(texts) == 64 and all(len(t) > 200 for t in texts)
    assert 40_000 < bundled_corpus().stat().st_size < 100_000
    readme = (bundled_corpus().parent / "README.md").read_text()
    assert "SmolLM2-135M-Instruct" in readme and "Apache-2.0" in readme
    from layerfold.models.loading import load_model

    loaded = load_model(tiny_model_dir("llama"))
    ids = load_calibration(CalibrationSpec(source="bundled", samples=4, seq_len=32), loaded, progress=False)
    assert tuple(ids.shape) == (4, 32)


def test_available_memory_is_read_from_the_machine():
    free, where = memory_plan.available_memory()
    assert free is None or free > 0
    assert where in ("MemAvailable", "the cgroup's memory limit", "unknown")
    assert Path("/proc/meminfo").exists() <= (free is not None)


def test_a_big_models_streamline_repair_trains_on_the_bundled_corpus(wide_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory_plan, "CPU_WHOLE_MODEL_PARAMS", 1000)  # the wide model is "big"
    out = tmp_path / "out"
    assert main(["-q", "compress", wide_model, "--device", "cpu", "--method", "streamline", "--remove", "2", *SMALL,
                 "--train-tokens", "64", "--train-seq-len", "16", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "repair text        no model" in printed and "repair             streamed" in printed
    record = json.loads((out / "layerfold.json").read_text())
    assert record["options"]["repair"]["data"]["source"] == "bundled" and record["memory_plan"]["streamed"]
    assert record["layers_before"] - len([x for x in record["layer_map"] if x is not None]) >= 2
    # the default in-place loss trains through the whole model: a big one trains on pairs instead
    assert (record["options"]["repair"]["loss"], record["options"]["repair"]["init"]) == ("cosine", "last")
    assert "--loss cosine --train-init last" in record["command"]


def test_the_streamline_default_trains_in_place_where_the_whole_model_fits(wide_model):
    from layerfold.methods.streamline import DEFAULT_INIT, DEFAULT_LOSS

    plan = memory_plan.plan_memory(options(wide_model, "--method", "streamline", "--remove", "2"))
    assert (DEFAULT_LOSS, DEFAULT_INIT) == ("lm", "first") and plan.changes == []
    assert (plan.options.repair.loss, plan.options.repair.init) == ("lm", "first")
    repair = {s.name: s for s in plan.stages}["repair"]
    assert repair.how == "in memory" and "trains through the whole model" in repair.note


def test_over_the_budget_the_streamline_default_streams_and_an_asked_in_place_loss_is_refused(wide_model):
    # a replacement layer trained on pairs needs three layers' bytes and their optimiser state: 16 MiB
    limit = RUNTIME_BYTES + 16 * 2**20
    small = [*SMALL, "--method", "streamline", "--remove", "2", "--train-tokens", "64", "--train-seq-len", "16",
             "--memory-limit", format_size(limit)]
    streamed = memory_plan.plan_memory(options(wide_model, *small))
    assert (streamed.options.repair.loss, streamed.options.repair.init) == ("cosine", "last")
    assert "--loss cosine --train-init last" in streamed.changes
    repair = {s.name: s for s in streamed.stages}["repair"]
    assert repair.how == "streamed" and "not --loss lm (needs the whole model" in repair.note
    assert repair.need <= limit < repair.in_memory
    with pytest.raises(Exception) as e:
        memory_plan.plan_memory(options(wide_model, *small, "--loss", "kl"))
    assert "the repair (--loss kl) needs ~" in str(e.value)
    command = str(e.value).split("what fits: ")[1].split()
    assert command[command.index("--loss") + 1] == "cosine" and command[command.index("--train-init") + 1] == "last"

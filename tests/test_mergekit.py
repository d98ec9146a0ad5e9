"""mergekit.yaml: a pure layer removal as mergekit passthrough slices (half-open layer_range)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from layerfold.cli import main
from layerfold.errors import LayerfoldError
from layerfold.export.mergekit import is_pure_removal, mergekit_yaml, slices
from layerfold.models.layer_map import LayerMap

pytestmark = pytest.mark.usefixtures("one_thread")


def _layers(ranges):
    """The original layers a list of half-open ranges takes, in order (mergekit's reading)."""
    return [i for a, b in ranges for i in range(a, b)]


@pytest.mark.parametrize("removed,expected", [
    ([1, 3, 4], [(0, 1), (2, 3), (5, 8)]),
    ([0, 7], [(1, 7)]),
    ([5, 6, 7], [(0, 5)]),
    ([], [(0, 8)]),
])
def test_slices_are_half_open_runs_of_kept_layers(removed, expected):
    m = LayerMap.removal(8, removed)
    assert slices(m) == expected
    assert _layers(slices(m)) == [i for i in range(8) if i not in removed]


def test_only_a_pure_removal_has_slices():
    assert not is_pure_removal(LayerMap.replacement(8, 2, 3))
    assert is_pure_removal(LayerMap.replacement(8, 2, 3, keeps_first=True))  # the block's first layer stays as it is
    assert not is_pure_removal(LayerMap.identity(4), groups=[[0, 1], [2], [3]])
    with pytest.raises(LayerfoldError):
        slices(LayerMap.replacement(8, 2, 3))


def test_yaml_text():
    text = mergekit_yaml("/models/base", LayerMap.removal(6, [2, 3]), "bfloat16")
    d = yaml.safe_load(text)
    assert d["merge_method"] == "passthrough" and d["dtype"] == "bfloat16"
    assert [s["sources"][0]["layer_range"] for s in d["slices"]] == [[0, 2], [4, 6]]
    assert {s["sources"][0]["model"] for s in d["slices"]} == {"/models/base"}
    assert "half-open" in text


def _compress(tmp_path, source, method_args, name="out"):
    out = tmp_path / name
    rc = main(["-q", "compress", source, *method_args, "--no-heal", "--no-eval", "-o", str(out), "--dtype", "fp32"])
    assert rc == 0
    return out


def test_compress_writes_mergekit_yaml_for_a_removal(tmp_path, tiny_model_dir, text_file):
    import json

    out = _compress(tmp_path, tiny_model_dir("llama"), ["--method", "bi", "--remove", "2", "--calib", text_file,
                                                          "--calib-samples", "4", "--seq-len", "32"])
    removed = json.loads((out / "layerfold.json").read_text())["recipe"]["removed_layers"]
    d = yaml.safe_load((out / "mergekit.yaml").read_text())
    ranges = [s["sources"][0]["layer_range"] for s in d["slices"]]
    assert _layers(ranges) == [i for i in range(6) if i not in removed]
    assert d["slices"][0]["sources"][0]["model"] == str(Path(tiny_model_dir("llama")).resolve())
    assert "mergekit.yaml" in (out / "README.md").read_text()


def test_foldgpt_sharing_writes_no_mergekit_yaml(tmp_path, tiny_model_dir, text_file):
    out = _compress(tmp_path, tiny_model_dir("llama"), [
        "--method", "foldgpt", "--remove", "1", "--calib", text_file, "--calib-samples", "4", "--seq-len", "32",
        "--gate-steps", "2", "--cure-steps", "0"])
    assert not (out / "mergekit.yaml").exists()


def _mergekit_command() -> str | None:
    return os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")


@pytest.mark.skipif(_mergekit_command() is None, reason="mergekit not installed (set MERGEKIT_YAML to its mergekit-yaml)")
@pytest.mark.parametrize("method", [["--method", "last-n", "--remove", "2"], ["--method", "bi", "--remove", "3"]])
def test_mergekit_rebuilds_the_unhealed_model_bitwise(tmp_path, tiny_model_dir, text_file, method):
    from safetensors.torch import load_file

    calib = ["--calib", text_file, "--calib-samples", "4", "--seq-len", "32"] if "bi" in method else []
    out = _compress(tmp_path, tiny_model_dir("llama"), method + calib)
    merged = tmp_path / "merged"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run([_mergekit_command(), str(out / "mergekit.yaml"), str(merged)], check=True, env=env,
                   capture_output=True)

    def tensors(folder):
        d = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            d.update(load_file(f))
        return d

    ours, theirs = tensors(out), tensors(merged)
    assert set(ours) <= set(theirs)
    for name, t in ours.items():
        assert torch.equal(t, theirs[name]), name

"""Healing models that do not fit one device: accelerate device maps with offload.

There is no GPU here, so the map puts the first layers on the CPU and the rest in an offload
folder on disk; that is the hard case (offloaded weights live on the meta device between
calls), and the result must equal healing the same model in memory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import saved_weights
from layerfold.cli import main
from layerfold.data.calibration import CalibrationSpec
from layerfold.errors import LayerfoldError
from layerfold.healing import HealOptions
from layerfold.models.loading import Placement, load_model, parse_device_memory
from layerfold.models.saving import OutputOptions
from layerfold.pipeline import HealModelOptions, ModelOptions, heal_model

LAYER_BYTES = 150_000  # one decoder layer of the tiny Llama in fp32 is 148 kB


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def _placement(tmp_path) -> Placement:
    return Placement("auto", {"cpu": 2 * LAYER_BYTES}, str(tmp_path / "offload"))


def test_the_placement_offloads_most_of_the_tiny_model_to_disk(tiny_model_dir, tmp_path):
    loaded = load_model(tiny_model_dir("llama"), dtype="fp32", placement=_placement(tmp_path))
    where = set(loaded.model.hf_device_map.values())
    assert "disk" in where and "cpu" in where
    assert loaded.device == torch.device("cpu")
    ids = torch.randint(3, 250, (1, 8))
    plain = load_model(tiny_model_dir("llama"), dtype="fp32", device="cpu")
    with torch.no_grad():
        assert torch.allclose(loaded.model(input_ids=ids).logits, plain.model(input_ids=ids).logits, atol=1e-6)


def test_lora_healing_with_disk_offload_equals_healing_in_memory(tiny_model_dir, pruned_dir, text_file, tmp_path):
    heal_opts = HealOptions(tokens=3 * 4 * 32, data=CalibrationSpec(source=text_file, seq_len=32, seed=1),
                            batch_size=4, lr=3e-3, train="lora", lora_rank=4, mse=0.5, mse_layers=2, progress=False,
                            lm_head="freeze", train_norm=False)  # offloaded, these two would stay frozen
    outs = {}
    for name, placement in [("memory", None), ("offload", _placement(tmp_path))]:
        opts = HealModelOptions(model=ModelOptions(model=pruned_dir, dtype="fp32", device="cpu",
                                                   placement=placement),
                                teacher=tiny_model_dir("llama"), healing=heal_opts, output=OutputOptions(str(tmp_path / name)))
        r = heal_model(opts)
        assert r.heal["loss_last"] < r.heal["loss_first"]
        outs[name] = saved_weights(r.output)
    assert outs["memory"].keys() == outs["offload"].keys()
    original = saved_weights(Path(pruned_dir))
    key = "model.layers.3.mlp.down_proj.weight"  # an offloaded layer: its merged LoRA update was saved
    assert not torch.equal(outs["offload"][key], original[key])
    for k in outs["memory"]:
        assert torch.allclose(outs["memory"][k], outs["offload"][k], atol=1e-5), k


def test_offloaded_layers_cannot_be_fully_trained(tiny_model_dir, pruned_dir, text_file, tmp_path):
    heal_opts = HealOptions(tokens=4 * 32, data=CalibrationSpec(source=text_file, seq_len=32, seed=1),
                            batch_size=4, train="layers", layers="last:1", progress=False)
    opts = HealModelOptions(model=ModelOptions(model=pruned_dir, dtype="fp32", placement=_placement(tmp_path)),
                            teacher=tiny_model_dir("llama"), healing=heal_opts, output=OutputOptions(str(tmp_path / "out")))
    with pytest.raises(LayerfoldError, match="cannot train offloaded weights"):
        heal_model(opts)
    assert not (tmp_path / "out").exists()


def test_device_memory_is_read_like_accelerate_max_memory():
    assert parse_device_memory("0=20GiB, cuda:1=10GB,cpu=64GiB") == {0: "20GiB", 1: "10GB", "cpu": "64GiB"}
    for bad in ("20GiB", "gpu=3GB", "0=", ","):
        with pytest.raises(LayerfoldError, match="device-memory"):
            parse_device_memory(bad)


def test_cli_placement_flags(capsys, tiny_model_dir, pruned_dir, text_file, tmp_path):
    code = main(["-q", "heal", tiny_model_dir("llama"), "--device-memory", "cpu=1GiB", "--heal-data", text_file])
    assert code == 2
    err = capsys.readouterr().err
    assert "need --device-map" in err and len(err.strip().splitlines()) == 1
    out = tmp_path / "healed"
    code = main(["-q", "heal", pruned_dir, "--teacher", tiny_model_dir("llama"), "-o", str(out),
                 "--device-map", "auto", "--device-memory", f"cpu={2 * LAYER_BYTES}",
                 "--offload-folder", str(tmp_path / "off"), "--heal-tokens", "128", "--heal-data", text_file,
                 "--heal-seq-len", "32", "--heal-batch-size", "4", "--lora-rank", "2"])
    captured = capsys.readouterr()
    text = captured.out
    assert code == 0, captured.err
    # the offloaded head and final norm cannot train: said, not silently skipped
    assert "final norm frozen (offloaded" in text and "lm_head frozen (offloaded" in text
    assert load_model(str(out), device="cpu").model.config.num_hidden_layers == 4

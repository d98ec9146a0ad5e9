"""benchmarks/frontier.py's plan strings: a replacement plan's fields go to the repair group and
its block is one layer longer than the count removed (as ``--method streamline --remove N``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import build_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def frontier():
    path = Path(__file__).parent.parent / "benchmarks" / "frontier.py"
    spec = importlib.util.spec_from_file_location("frontier_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_replacement_fields_go_to_the_repair_group():
    from layerfold.methods.replaceme import LinearRepairOptions
    from layerfold.methods.streamline import StreamlineOptions

    f = frontier()
    opts = f.parse_plan("block+replacement:replacement=ffn:ffn_width=32:lr=0.01", 3)
    assert (opts.selection.select, opts.selection.repair) == ("block", "replacement")
    assert opts.repair.replacement == "ffn" and opts.repair.ffn_width == 32 and opts.repair.lr == 0.01
    assert opts.linear.lr == LinearRepairOptions().lr  # lr is in both groups: the replacement's own
    lin = f.parse_plan("bi+linear:lr=0.01", 3)
    assert lin.linear.lr == 0.01 and lin.repair.lr == StreamlineOptions().lr
    default = f.parse_plan("block+replacement", 3)
    assert default.repair == StreamlineOptions() and default.repair.replacement == "layer"
    with pytest.raises(SystemExit):
        f.parse_plan("block+replacement:no_such_field=1", 3)


def test_replacement_block_takes_one_more_layer_than_removed():
    from layerfold.importance import measure_similarity
    from layerfold.methods.registry import Evidence, make_plan
    from layerfold.models.architectures import architecture_for
    from layerfold.models.surgery import count_parameters

    f = frontier()
    model = build_tiny("llama", layers=8)
    arch = architecture_for(model.config)
    scores = measure_similarity(model, arch, torch.randint(3, 259, (2, 16)), progress=False)
    before = count_parameters(model)
    per_layer = count_parameters(model.model.layers[0])  # the tiny model's layers are alike
    plan = make_plan(f.parse_plan("block+replacement", 3), model, arch, Evidence(scores=scores))
    assert len(plan.selected) == 4 and plan.selected == list(range(plan.selected[0], plan.selected[0] + 4))
    assert plan.params_after == before - 3 * per_layer  # 4 layers out, one decoder layer in
    ffn = make_plan(f.parse_plan("block+replacement:replacement=ffn", 3), model, arch, Evidence(scores=scores))
    assert ffn.selected == plan.selected
    h, w = model.config.hidden_size, model.config.intermediate_size  # RMSNorm, up and down with biases
    assert ffn.params_after == before - 4 * per_layer + h + (h * w + w) + (w * h + h)


def test_plan_values_are_read_by_the_options_schema():
    f = frontier()
    gates = f.parse_plan("gates+linear:gate_steps=40:objective=cosine:ridge=1e-3", 8)
    assert gates.foldgpt.gates.steps == 40 and isinstance(gates.foldgpt.gates.steps, int)
    assert gates.linear.objective == "cosine" and gates.linear.ridge == 0.001
    assert gates.selection.remove == 8 and gates.progress is False
    for bad in ("bi+linear:ridge=abc", "gates+none:gate_steps=1.5", "bi+linear:objective=nope"):
        with pytest.raises(SystemExit):
            f.parse_plan(bad, 3)

"""benchmarks/frontier.py --gates-from: the gates' cache seeded from an analyze --gates --json file."""

import importlib.util
import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest

from layerfold.importance.gates import GateOptions

ROOT = Path(__file__).resolve().parents[1]


def _frontier():
    spec = importlib.util.spec_from_file_location("frontier_bench", ROOT / "benchmarks" / "frontier.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _scores_file(tmp_path, options):
    d = {"num_layers": 4, "tokens": 8192, "samples": 32, "block_influence": [1.0, 0.2, 0.1, 0.3],
         "gates": [1.0, None, 0.0, 1.0], "gates_removed": [1, 2], "gates_scores": [4.0, None, -9.0, 5.0],
         "gates_check": {"gates": {"kl": 1.0}}, "gates_swaps": {"rounds": 2, "removed": [1, 2]},
         "gates_options": options,
         "gates_log": [{"round": 1, "step": 1, "kl": 0.5}, {"round": 1, "step": 2, "kl": 0.4},
                       {"round": 2, "step": 1, "kl": 0.7}]}
    path = tmp_path / "gates.scores.json"
    path.write_text(json.dumps(d))
    return path


def _old_options(**changes):
    """Options as a file written before swap_window / swap_order existed."""
    o = asdict(GateOptions(**changes))
    del o["swap_window"], o["swap_order"]
    return o


def test_seeded_cache_reads_back_as_the_file_s_gates(tmp_path):
    fr = _frontier()
    path = _scores_file(tmp_path, _old_options(steps=40))
    seeded = fr.seed_gates(path, GateOptions(steps=40), 2, 4, seconds=12.5)
    cache = tmp_path / "search-gates:gate_steps=40-remove2.json"
    cache.write_text(json.dumps(seeded))
    gates, seconds = fr.read_gates(cache)
    assert seconds == 12.5
    assert gates.removed == [1, 2]
    assert gates.gates[0] == 1.0 and math.isnan(gates.gates[1]) and gates.gates[2] == 0.0
    assert gates.scores[3] == 5.0 and math.isnan(gates.scores[1])
    assert [len(r["log"]) for r in gates.rounds] == [2, 1]
    assert gates.rounds[0]["log"][1] == {"step": 2, "kl": 0.4}
    assert gates.options == asdict(GateOptions(steps=40))
    assert seeded["reused"]["missing_options"] == ["swap_order", "swap_window"]


def test_gates_of_other_options_budget_or_depth_are_refused(tmp_path):
    fr = _frontier()
    path = _scores_file(tmp_path, _old_options(steps=40))
    with pytest.raises(SystemExit, match="other options"):
        fr.seed_gates(path, GateOptions(), 2, 4, seconds=1.0)  # 100 steps, the file's 40
    with pytest.raises(SystemExit, match="other options"):  # a missing field off its default
        fr.seed_gates(path, GateOptions(steps=40, swap_window=3), 2, 4, seconds=1.0)
    with pytest.raises(SystemExit, match="remove 2 layers"):
        fr.seed_gates(path, GateOptions(steps=40), 3, 4, seconds=1.0)
    with pytest.raises(SystemExit, match="4-layer"):
        fr.seed_gates(path, GateOptions(steps=40), 2, 30, seconds=1.0)
    with pytest.raises(SystemExit, match="--gates-seconds"):
        fr.seed_gates(path, GateOptions(steps=40), 2, 4)


def test_the_committed_foldgpt_gates_seed_with_their_run_s_seconds():
    fr = _frontier()
    path = ROOT / "benchmarks" / "results" / "foldgpt-1203" / "gates.scores.json"
    seeded = fr.seed_gates(path, GateOptions(steps=40), 8, 30)
    assert seeded["removed"] == [4, 5, 12, 13, 14, 16, 17, 25]
    assert round(seeded["seconds"]) == 1685  # foldgpt.md 1a: "05:36-06:04 UTC, 1685 s"
    assert seeded["reused"]["seconds_from"].endswith("foldgpt-1203/gates.json")
    assert len(seeded["rounds"]) == 1 and len(seeded["rounds"][0]["log"]) == 40

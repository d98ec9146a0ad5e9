"""The benchmark grid's healing (``bi+heal`` and the budget split) spends exactly the training
rows' tokens, also when the packing gives fewer rows than ``--train-tokens`` asked for
(benchmarks/streamline_grid.py; LAMBADA docs 1000.. pack into 935 training rows for 262,144)."""

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

import layerfold.healing
from layerfold.methods.streamline import TrainingText

GRID = Path(__file__).resolve().parents[1] / "benchmarks" / "streamline_grid.py"


def _grid():
    spec = importlib.util.spec_from_file_location("streamline_grid", GRID)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@dataclass
class _Loaded:  # heal_bi replaces the model of a LoadedModel (a dataclass)
    model: object = None


def _fake_heal(calls):
    def heal(student, teacher, opts, *, ids=None, **kw):
        calls.append((opts.tokens, ids))
        train = SimpleNamespace(steps=1, tokens=opts.tokens, history=[{"loss": 1.0}])
        return SimpleNamespace(train=train, rows=ids.shape[0], seconds={})
    return heal


def test_heal_budget_is_the_training_rows_tokens(monkeypatch, tmp_path):
    grid = _grid()
    calls = []
    monkeypatch.setattr(layerfold.healing, "heal", _fake_heal(calls))
    ids = torch.arange(967 * 256).reshape(967, 256)
    text = TrainingText(ids, 32, "lambada[1000:]")  # 935 training rows + 32 validation rows
    loaded = _Loaded()
    grid.heal_bi(torch.nn.Linear(1, 1), loaded, text, tmp_path)
    tokens, rows = calls[-1]
    assert tokens == 935 * 256 == 239_360  # not the 262,144 asked for
    assert torch.equal(rows, ids[:935])  # every training row, no validation row

    # the split's healing half: rows 467.. (468 of them), then the validation rows
    half = TrainingText(ids[467:], 32, "lambada[1000:]")
    grid.heal_bi(torch.nn.Linear(1, 1), loaded, half, tmp_path)
    tokens, rows = calls[-1]
    assert tokens == 468 * 256
    assert torch.equal(rows, ids[467:935])

"""The curves plot of benchmarks/streamline_table.py: panels wrapped in rows of three, one colour
per init in every loss's panel, one line style per budget (the expected values written out here,
not taken from the module's tables)."""

import importlib.util
from pathlib import Path

import pytest

TABLE = Path(__file__).resolve().parents[1] / "benchmarks" / "streamline_table.py"


def _table():
    spec = importlib.util.spec_from_file_location("streamline_table", TABLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _trained(first: float) -> dict:
    return {"training": {"batch": 8, "seq_len": 256, "tokens_seen": 512,
                         "validation": [{"step": 0, "loss": first}, {"step": 2, "loss": first / 2}]}}


def test_layout_rows_of_three():
    t = _table()
    assert t.layout(1) == (1, 1)
    assert t.layout(3) == (1, 3)
    assert t.layout(4) == (2, 3)
    assert t.layout(6) == (2, 3)
    assert t.layout(7) == (3, 3)


def test_one_colour_per_init_across_panels(tmp_path):
    pytest.importorskip("matplotlib")
    t = _table()
    variants = {"cosine:last": _trained(0.2), "cosine:first": _trained(0.1), "kl:last": _trained(2.0),
                "kl:first": _trained(2.5), "lm:first": _trained(6.0), "mse:linear": _trained(200.0),
                "cosine:last+heal50": {**_trained(0.2), "heal": {"tokens": 512, "steps": 2, "loss": [1.0, 0.9]}},
                "bi+heal": {"heal": {"tokens": 1024, "steps": 4, "loss": [1.0, 0.8, 0.7, 0.6]}}}
    fig = t.plot({"variants": variants}, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 0
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(fig.axes) == 6 and len(visible) == 5  # cosine, kl, lm, mse, healing: 2 rows x 3, one hidden
    lines = {}
    for ax in visible:
        for line in ax.get_lines():
            lines.setdefault(line.get_label(), set()).add(line.get_color())
    # matplotlib's default cycle: C0 blue, C1 orange, C2 green, C4 purple, C5 brown
    assert lines["cosine:first"] == lines["kl:first"] == lines["lm:first"] == {"C0"}
    assert lines["cosine:last"] == lines["kl:last"] == {"C1"}
    assert lines["mse:linear"] == {"C2"}
    # the split is drawn in the cosine panel and the healing panel, in the same colour
    assert lines["cosine:last+heal50"] == {"C4"}
    assert lines["bi+heal"] == {"C5"}
    titles = [ax.get_title() for ax in visible]
    assert titles == ["cosine: validation loss", "kl: validation loss", "lm: validation loss",
                      "mse: validation loss", "healing (LoRA + KL): training KL"]


def test_budgets_get_line_styles(tmp_path):
    pytest.importorskip("matplotlib")
    t = _table()
    variants = {"cosine:last @239,360": _trained(0.2), "cosine:last @65,536": _trained(0.3)}
    fig = t.plot({"variants": variants}, str(tmp_path / "c.png"))
    styles = {line.get_label(): (line.get_color(), line.get_linestyle()) for line in fig.axes[0].get_lines()}
    # the smaller budget solid, the larger dashed, whatever the order of the rows
    assert styles == {"cosine:last @65,536": ("C1", "-"), "cosine:last @239,360": ("C1", "--")}

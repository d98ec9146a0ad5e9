"""--method auto: every candidate's held-out KL equals that of the model built by
--select S --repair R (measured on the saved folder), the search builds the lowest, the table is
printed and recorded, bad candidates are one-line errors before any work."""

from __future__ import annotations

import json

import pytest

from layerfold.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread

COMMON = ["--remove", "2", "--calib-samples", "4", "--seq-len", "16", "--no-heal", "--no-eval"]
PLANS = ["bi+none", "bi+linear", "last-n+none", "laco+merge"]


def _heldout_kl(folder, source, text_file):
    from layerfold.data.calibration import CalibrationSpec
    from layerfold.eval.heldout import compare_to_reference, heldout_ids, reference_log_probs
    from layerfold.models.loading import load_model

    original = load_model(source, device="cpu")
    rows = heldout_ids(CalibrationSpec(source=text_file, samples=4, seq_len=16), original, 8, progress=False)
    reference = reference_log_probs(original.model, rows)
    return compare_to_reference(load_model(str(folder), device="cpu").model, rows, reference).kl


def test_the_search_ranks_by_the_kl_of_the_built_models(capsys, tiny_model_dir, text_file, tmp_path):
    source = tiny_model_dir("llama")
    out = tmp_path / "auto"
    assert main(["-q", "compress", source, "--method", "auto", "--auto-plans", ",".join(PLANS),
                 "--laco-threshold", "0.3", "--calib", text_file, *COMMON, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "layerfold.json").read_text())
    table = record["auto"]["table"]
    assert [r["plan"] for r in sorted(table, key=lambda r: r["kl"])] == [r["plan"] for r in table]
    assert sorted(r["plan"] for r in table) == sorted(PLANS) and "plan search" in printed
    assert record["auto"]["chosen"] == table[0]["plan"] and f"chosen       {table[0]['plan']}" in printed
    assert record["recipe"]["selection"] + "+" + record["recipe"]["repair"] == table[0]["plan"]
    assert record["recipe"]["method"] == "auto"
    # brute force: build every candidate the ordinary way and measure it on the saved folder
    built = {}
    for plan in PLANS:
        selection, repair = plan.split("+")
        folder = tmp_path / plan
        assert main(["-q", "compress", source, "--select", selection, "--repair", repair, "--laco-threshold", "0.3",
                     "--calib", text_file, *COMMON,
                     "-o", str(folder)]) == 0
        built[plan] = _heldout_kl(folder, source, text_file)
    for row in table:
        assert row["kl"] == pytest.approx(built[row["plan"]], rel=1e-4, abs=1e-7), row["plan"]
    assert min(built, key=built.get) == record["auto"]["chosen"]
    assert _heldout_kl(out, source, text_file) == pytest.approx(table[0]["kl"], rel=1e-4, abs=1e-7)
    assert "Plan search" in (out / "report.html").read_text()


def test_a_post_norm_model_refuses_the_linear_candidates_and_scores_the_rest(capsys, tiny_model_dir, text_file,
                                                                            tmp_path):
    out = tmp_path / "auto"
    assert main(["-q", "compress", tiny_model_dir("olmo2"), "--method", "auto", "--auto-plans", "bi+none,bi+linear",
                 "--calib", text_file, *COMMON, "-o", str(out)]) == 0
    table = json.loads((out / "layerfold.json").read_text())["auto"]["table"]
    assert table[0]["plan"] == "bi+none" and "cannot be folded exactly" in table[1]["refused"]


@pytest.mark.parametrize("flags, message", [
    (["--method", "auto", "--select", "bi"], "chooses the selection and the repair itself"),
    (["--method", "auto", "--auto-plans", "bogus+none"], "unknown selection 'bogus'"),
    (["--method", "auto", "--auto-plans", "block+replacement"], "needs training"),
    (["--method", "auto", "--auto-rows", "0"], "--auto-rows must be at least 1"),
])
def test_bad_candidates_are_one_line_errors_before_any_work(capsys, tiny_model_dir, tmp_path, flags, message):
    code = main(["-q", "compress", tiny_model_dir("llama"), *flags, "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()

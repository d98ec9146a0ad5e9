"""The command line: help texts, one-line errors, no half-written outputs."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from layerfold.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, *needles):
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("layerfold: error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compress", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--method", "--remove", "--sparsity", "--output", "--force", "--calib",
                 "--calib-samples", "--seq-len", "--dtype", "--device", "--trust-remote-code"):
        assert flag in out
    assert "default: bi" in out and "default: 256" in out and "--no-heal" in out



def test_help_lists_every_method(capsys):
    """The methods section of compress --help names each registered method (it was a hand-kept
    list that missed sleb, replaceme, laco and auto)."""
    from layerfold.methods.registry import METHODS

    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    out = capsys.readouterr().out
    section = out[out.index("methods:"): out.index("options:")]
    listed = [line.split()[0] for line in section.splitlines()[1:] if line.startswith("  ") and not line.startswith("   ")]
    assert listed == list(METHODS)

def test_missing_model_path(capsys, tmp_path):
    code, _, err = _run(capsys, "compress", str(tmp_path / "nope"), "-o", str(tmp_path / "o"))
    _one_line_error(code, err, "no such file or folder")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_lists_supported(capsys, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()
    code, _, err = _run(capsys, "analyze", str(tmp_path / "gpt2"))
    _one_line_error(code, err, "unsupported architecture 'gpt2'", "llama", "qwen3", "olmo2")


def test_model_folder_without_tokenizer(capsys, tmp_path):
    from conftest import build_tiny

    build_tiny("llama", layers=2).save_pretrained(tmp_path / "m")
    code, _, err = _run(capsys, "compress", str(tmp_path / "m"), "-o", str(tmp_path / "o"))
    _one_line_error(code, err, "no tokenizer in the folder", "tokenizer.json")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("sparsity", ["1.2", "120%", "0", "-0.5"])
def test_bad_sparsity(capsys, tiny_model_dir, text_file, tmp_path, sparsity):
    code, _, err = _run(capsys, "-q", "compress", tiny_model_dir("llama"), "--sparsity", sparsity,
                        "--calib", text_file, "-o", str(tmp_path / "o"))
    _one_line_error(code, err, "--sparsity")
    assert not (tmp_path / "o").exists()


def test_empty_data_file(capsys, tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = _run(capsys, "-q", "compress", tiny_model_dir("llama"), "--calib", str(empty),
                        "-o", str(tmp_path / "o"))
    _one_line_error(code, err, "contains no text")
    assert not (tmp_path / "o").exists()


def test_jsonl_field_missing(capsys, tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"body": "hello"}) + "\n")
    code, _, err = _run(capsys, "-q", "analyze", tiny_model_dir("llama"), "--calib", str(data))
    _one_line_error(code, err, "no field 'text'", "--text-field")


def test_existing_output_needs_force(capsys, tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["-q", "compress", tiny_model_dir("llama"), "--calib", text_file, "--calib-samples", "4",
            "--seq-len", "32", "--remove", "2", "-o", str(out)]
    code, _, err = _run(capsys, *args)
    _one_line_error(code, err, "--force")
    assert (out / "keep.txt").read_text() == "mine"
    code, stdout, _ = _run(capsys, *args, "--force")
    assert code == 0 and "6 -> 4" in stdout
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_output_inside_input_is_refused(capsys, tiny_model_dir, text_file):
    src = tiny_model_dir("llama")
    code, _, err = _run(capsys, "-q", "compress", src, "--calib", text_file, "-o", src, "--force")
    _one_line_error(code, err, "input model folder")
    assert (Path(src) / "config.json").exists()


def test_full_disk_leaves_nothing(capsys, tiny_model_dir, text_file, tmp_path, monkeypatch):
    real_write_text = Path.write_text

    def no_space(self, *a, **k):
        if self.name == "README.md":  # the disk fills up halfway through the output folder
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", no_space)
    out = tmp_path / "o"
    code, _, err = _run(capsys, "-q", "compress", tiny_model_dir("llama"), "--calib", text_file,
                        "--calib-samples", "4", "--seq-len", "32", "-o", str(out))
    _one_line_error(code, err, "no space left on device")
    assert not out.exists()
    assert not list(tmp_path.glob(".o.tmp-*"))


def test_analyze_prints_table(capsys, tiny_model_dir, text_file, tmp_path):
    js = tmp_path / "s.json"
    code, out, _ = _run(capsys, "-q", "analyze", tiny_model_dir("qwen2"), "--calib", text_file,
                        "--calib-samples", "4", "--seq-len", "32", "--block-sizes", "1,2", "--json", str(js))
    assert code == 0
    assert "BI" in out and "cos n=2" in out and "Most redundant blocks" in out
    data = json.loads(js.read_text())
    assert len(data["block_influence"]) == 6


def test_max_memory_chunks_the_pass_without_changing_scores(capsys, tiny_model_dir, text_file, tmp_path):
    """A tiny activation budget runs one batch per chunk (each layer read once per batch);
    the scores are the same as with everything in one chunk."""
    results = []
    for budget in ("2GiB", "1KiB"):
        js = tmp_path / f"{budget}.json"
        code, _, err = _run(capsys, "-q", "analyze", tiny_model_dir("llama"), "--calib", text_file,
                            "--calib-samples", "6", "--seq-len", "16", "--batch-size", "2",
                            "--max-memory", budget, "--json", str(js))
        assert code == 0, err
        results.append(json.loads(js.read_text()))
    def flat(x):
        return [v for row in x for v in flat(row)] if isinstance(x, list) else [float("nan") if x is None else x]

    for key in ("block_influence", "cosine", "angular"):
        assert flat(results[0][key]) == pytest.approx(flat(results[1][key]), abs=1e-6, nan_ok=True), key


@pytest.mark.parametrize("argv, needle", [
    (["analyze", "--max-memory", "lots"], "not a memory size"),
    (["compress", "--remove", "abc"], "invalid int value"),
    (["compress", "--method", "magic"], "invalid choice"),
])
def test_usage_errors_are_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_parse_size():
    from layerfold.cli import parse_size

    assert parse_size("512MiB") == 512 * 2**20 and parse_size("2GB") == 2 * 10**9 and parse_size("4096") == 4096
    assert parse_size("1.5g") == 1_500_000_000

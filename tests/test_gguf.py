"""GGUF export: every family llama.cpp knows, read back by an independent reader.

transformers' GGUF loader (``from_pretrained(dir, gguf_file=...)``) has its own name map and
undoes llama.cpp's conventions itself (q/k row order, gemma's norm offset), so equal logits mean
the file says what llama.cpp expects. gemma and olmo2 GGUFs transformers cannot read: their
files are checked tensor by tensor here, and with llama.cpp in benchmarks/interop.md.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CHAT_TEMPLATE, build_tiny, tiny_bpe_tokenizer, tiny_spm_tokenizer, tiny_tokenizer

from layerfold.cli import main
from layerfold.models.architectures import ARCHITECTURES
from layerfold.models.surgery import remove_layers

pytestmark = pytest.mark.usefixtures("one_thread")

# configs both llama.cpp and transformers' GGUF reader can express: transformers reads neither
# qwen's nor mistral's sliding window, nor qwen3's head_dim (it assumes 128), nor gemma's
# query_pre_attn_scalar (it assumes 256 = head_dim)
GGUF_CONFIGS = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {"use_sliding_window": False},
    "qwen3": {"use_sliding_window": False, "head_dim": 128},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 256},
    "gemma3_text": {"head_dim": 256, "sliding_window_pattern": 6},
    "phi3": {},
    "olmo2": {},
}
# layers removed before export: gemma2/3 keep llama.cpp's fixed sliding-window pattern
REMOVE = {"gemma2": [2, 3], "gemma3_text": []}
READ_BACK = sorted(t for t, a in ARCHITECTURES.items() if a.llama_cpp and a.llama_cpp.transformers_reads)
LLAMA_CPP_ONLY = sorted(t for t, a in ARCHITECTURES.items() if a.llama_cpp and not a.llama_cpp.transformers_reads)


def _ids(vocab=300, t=20, seed=1):
    return torch.randint(3, vocab, (2, t), generator=torch.Generator().manual_seed(seed))


def _folder(tmp_path, model_type, tokenizer=tiny_bpe_tokenizer, remove=None, **overrides) -> Path:
    """A pruned tiny model folder, saved as layerfold would (stock transformers format)."""
    from layerfold.models.architectures import architecture_for

    model = build_tiny(model_type, **{"vocab_size": 320, **GGUF_CONFIGS[model_type], **overrides})
    remove_layers(model, architecture_for(model.config), REMOVE.get(model_type, [1, 3]) if remove is None else remove)
    d = tmp_path / f"{model_type}-folder"
    model.save_pretrained(d)
    tokenizer().save_pretrained(d)
    return d


def _export(folder, out, outtype="f32", *extra) -> int:
    return main(["-q", "export", str(folder), "--gguf", str(out), "--outtype", outtype, "--dtype", "fp32", *extra])


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _read_back(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _stock(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("model_type", READ_BACK)
def test_exported_f32_gives_the_folders_logits(tmp_path, model_type):
    folder = _folder(tmp_path, model_type)
    before = _tree_hash(folder)
    out = tmp_path / "m.gguf"
    assert _export(folder, out) == 0
    assert _tree_hash(folder) == before  # the input is only read
    ids = _ids()
    torch.testing.assert_close(_logits(_read_back(out), ids), _logits(_stock(folder), ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("outtype,atol", [("f16", 2e-2), ("bf16", 1.5e-1), ("q8_0", 1.5e-1)])
def test_lower_precision_stays_within_its_rounding(tmp_path, outtype, atol):
    import gguf

    folder = _folder(tmp_path, "llama")
    out = tmp_path / f"m-{outtype}.gguf"
    assert _export(folder, out, outtype) == 0
    ids = _ids()
    ref, got = _logits(_stock(folder), ids), _logits(_read_back(out), ids)
    err = (ref - got).abs().max().item()
    assert 0 < err < atol  # rounded (not silently f32), yet close
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    want = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[outtype]
    assert types["blk.0.attn_q.weight"] == want and types["token_embd.weight"] == want
    assert types["blk.0.attn_norm.weight"] == "F32"  # norms stay f32, as llama.cpp's converter keeps them


def test_llama_q_and_k_rows_are_in_llama_cpps_order(tmp_path):
    """llama.cpp's llama rotates adjacent pairs; each head's rows (first half, second half)
    are interleaved: new row 2j is old row j, new row 2j+1 is old row j + head_dim/2."""
    import gguf

    folder = _folder(tmp_path, "llama")
    out = tmp_path / "m.gguf"
    assert _export(folder, out) == 0
    hf = _stock(folder).model.layers[0].self_attn
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    for name, w, heads in [("attn_q", hf.q_proj.weight, 4), ("attn_k", hf.k_proj.weight, 2)]:
        w = w.detach().numpy()
        d = w.shape[0] // heads
        order = [h * d + (j // 2 if j % 2 == 0 else d // 2 + j // 2) for h in range(heads) for j in range(d)]
        got = np.asarray(tensors[f"blk.0.{name}.weight"].data).reshape(w.shape)
        np.testing.assert_array_equal(got, w[order])
        assert not np.array_equal(got, w)


@pytest.mark.parametrize("model_type", LLAMA_CPP_ONLY)
def test_families_transformers_cannot_read_hold_every_tensor(tmp_path, model_type):
    """gemma and olmo2: each tensor under its llama.cpp name with llama.cpp's conventions
    (gemma's norms +1); the run in llama.cpp itself is in benchmarks/interop.md."""
    import gguf

    folder = _folder(tmp_path, model_type)
    out = tmp_path / "m.gguf"
    assert _export(folder, out) == 0
    model = _stock(folder)
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(out)).tensors}
    sd = model.state_dict()
    tied = model.config.tie_word_embeddings
    assert len(tensors) == len(sd) - (1 if tied else 0)
    shift = 1.0 if model_type == "gemma" else 0.0
    np.testing.assert_array_equal(tensors["output_norm.weight"], sd["model.norm.weight"].numpy() + shift)
    down = sd["model.layers.1.mlp.down_proj.weight"].numpy()
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight"].reshape(down.shape), down)
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == model_type
    assert reader.fields[f"{model_type}.block_count"].contents() == 4


@pytest.mark.parametrize("make", [tiny_bpe_tokenizer, tiny_spm_tokenizer], ids=["bpe", "spm"])
def test_tokenizer_and_chat_template_travel(tmp_path, make):
    from transformers import AutoTokenizer

    folder = _folder(tmp_path, "llama", tokenizer=make)
    out = tmp_path / "m.gguf"
    assert _export(folder, out) == 0
    src = AutoTokenizer.from_pretrained(str(folder))
    back = AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    for text in ["the cat sat on the mat", "then there, 42 cats!", "zebra"]:
        assert back(text, add_special_tokens=False)["input_ids"] == src(text, add_special_tokens=False)["input_ids"]
    import gguf

    fields = gguf.GGUFReader(str(out)).fields
    assert fields["tokenizer.ggml.model"].contents() == ("gpt2" if make is tiny_bpe_tokenizer else "llama")
    assert len(fields["tokenizer.ggml.tokens"].data) == 320  # padded to the embedding's rows
    if make is tiny_bpe_tokenizer:
        assert fields["tokenizer.chat_template"].contents() == CHAT_TEMPLATE
        assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # llama.cpp refuses "gpt2" here


def test_a_models_own_gguf_tokenizer_is_copied(tmp_path):
    """A model made from a GGUF keeps that file's tokenizer fields verbatim."""
    import gguf

    folder = _folder(tmp_path, "llama")
    first = tmp_path / "first.gguf"
    assert _export(folder, first) == 0
    second = tmp_path / "second.gguf"
    assert main(["-q", "export", str(first), "--gguf", str(second), "--dtype", "fp32", "--outtype", "f32"]) == 0
    a, b = gguf.GGUFReader(str(first)).fields, gguf.GGUFReader(str(second)).fields
    keys = sorted(k for k in a if k.startswith("tokenizer."))
    assert keys == sorted(k for k in b if k.startswith("tokenizer."))
    for k in keys:
        assert a[k].contents() == b[k].contents(), k


def test_a_phi3_name_is_left_out_when_the_vocabulary_lacks_phi3s_tokens(tmp_path):
    """llama.cpp looks up </s>, <unk>, <s> and <|endoftext|> in any model named like phi3 and
    fails to load a vocabulary without one of them; the tiny vocabulary has no <|endoftext|>."""
    import gguf

    from layerfold.export.gguf import gguf_name

    folder = _folder(tmp_path, "phi3")  # "phi3-folder"
    out = tmp_path / "m.gguf"
    assert _export(folder, out) == 0
    assert "general.name" not in gguf.GGUFReader(str(out)).fields
    assert gguf_name("Phi-3-mini-4k-instruct", ["<unk>", "<s>", "</s>", "<|endoftext|>", "a"]) == (
        "Phi-3-mini-4k-instruct", None)
    name, why = gguf_name("my-PHI3-cut", ["<unk>", "<s>", "</s>", "a"])
    assert name is None and "<|endoftext|>" in why and "</s>" not in why
    llama = tmp_path / "l.gguf"
    assert _export(_folder(tmp_path, "llama"), llama) == 0
    assert gguf.GGUFReader(str(llama)).fields["general.name"].contents() == "llama-folder"


# -- refusals: one line, non-zero exit, no file --------------------------------------------


def _no_partial_files(where: Path):
    return [p.name for p in where.iterdir() if ".tmp-" in p.name]


def test_unknown_outtype_is_one_line(tmp_path, capsys):
    folder = _folder(tmp_path, "llama")
    with pytest.raises(SystemExit) as e:
        _export(folder, tmp_path / "m.gguf", "q4_k")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "q4_k" in err
    assert not (tmp_path / "m.gguf").exists()


def test_existing_output_is_refused_and_untouched(tmp_path, capsys):
    folder = _folder(tmp_path, "llama")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    assert _export(folder, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exists" in err
    assert out.read_bytes() == b"mine"


def test_architecture_llama_cpp_lacks_is_refused(tmp_path, capsys, monkeypatch):
    import dataclasses

    import layerfold.models.architectures as archs

    folder = _folder(tmp_path, "olmo2")
    monkeypatch.setitem(archs.ARCHITECTURES, "olmo2", dataclasses.replace(archs.ARCHITECTURES["olmo2"], llama_cpp=None))
    assert _export(folder, tmp_path / "m.gguf") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "llama.cpp has no architecture for 'olmo2'" in err
    assert not (tmp_path / "m.gguf").exists() and not _no_partial_files(tmp_path)


def test_broken_sliding_window_pattern_is_refused(tmp_path, capsys):
    """llama.cpp fixes gemma2's pattern (even layers slide); removing one layer breaks it."""
    folder = _folder(tmp_path, "gemma2", remove=[2])
    assert _export(folder, tmp_path / "m.gguf") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "llama.cpp fixes which layers attend globally" in err
    assert not (tmp_path / "m.gguf").exists()


def test_bpe_tokenizer_without_merges_is_refused(tmp_path, capsys):
    folder = _folder(tmp_path, "llama", tokenizer=tiny_tokenizer)  # byte-level, no merges
    assert _export(folder, tmp_path / "m.gguf") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no merges" in err
    assert not (tmp_path / "m.gguf").exists()


def test_failure_while_writing_leaves_no_file(tmp_path, monkeypatch):
    import layerfold.export.gguf as g

    folder = _folder(tmp_path, "llama")
    real = g.gguf_tensors

    def failing(*a, **k):
        for i, item in enumerate(real(*a, **k)):
            if i == 5:
                raise OSError(28, "No space left on device")
            yield item

    monkeypatch.setattr(g, "gguf_tensors", failing)
    assert _export(folder, tmp_path / "m.gguf") == 2
    assert not (tmp_path / "m.gguf").exists() and not _no_partial_files(tmp_path)


def test_sliding_window_families_llama_cpp_lacks_cap_the_context():
    from layerfold.export.gguf import check_llama_cpp
    from conftest import tiny_config

    plan = check_llama_cpp(tiny_config("mistral", sliding_window=8))
    assert plan.context_length == 8 and "sliding window" in plan.notes[0]
    assert check_llama_cpp(tiny_config("mistral", sliding_window=None)).context_length == 256


# -- compress --gguf ----------------------------------------------------------------------


def test_compress_writes_a_checked_gguf_beside_the_folder(tmp_path, capsys):
    source = _folder(tmp_path, "llama", remove=[])
    out = tmp_path / "pruned"
    gguf_path = tmp_path / "pruned.gguf"
    rc = main(["-q", "compress", str(source), "--method", "last-n", "--remove", "2", "--no-heal",
               "--no-eval", "-o", str(out), "--gguf", str(gguf_path), "--outtype", "f32", "--dtype", "fp32"])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "gguf check   ok" in printed
    ids = _ids()
    torch.testing.assert_close(_logits(_read_back(gguf_path), ids), _logits(_stock(out), ids), rtol=0, atol=1e-5)
    card = (out / "README.md").read_text()
    assert "## Outputs and how each was checked" in card and "pruned.gguf" in card and "read back with transformers" in card
    assert "llama.cpp itself was not run on this file" in card  # what was not checked is said too
    import json

    assert json.loads((out / "layerfold.json").read_text())["gguf"]["check"]["passed"] is True


def test_compress_refuses_a_tokenizer_llama_cpp_cannot_load_before_any_work(tmp_path, tiny_model_dir, capsys,
                                                                              monkeypatch):
    import layerfold.pipeline as pipeline

    def no_calibration(*a, **k):
        raise AssertionError("calibrated before refusing")

    monkeypatch.setattr(pipeline, "load_calibration", no_calibration)
    rc = main(["-q", "compress", tiny_model_dir("llama"), "--method", "bi", "--remove", "2", "--no-heal",
               "-o", str(tmp_path / "o"), "--gguf", str(tmp_path / "o.gguf")])
    assert rc == 2 and "no merges" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.gguf").exists()


def test_compress_refuses_an_existing_gguf_before_any_work(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import layerfold.pipeline as pipeline

    gguf_path = tmp_path / "there.gguf"
    gguf_path.write_bytes(b"x")

    def no_loading(*a, **k):
        raise AssertionError("loaded a model before refusing")

    monkeypatch.setattr(pipeline, "_load", no_loading)
    rc = main(["-q", "compress", tiny_model_dir("llama"), "--method", "last-n", "--remove", "2", "--no-heal",
               "-o", str(tmp_path / "o"), "--gguf", str(gguf_path)])
    assert rc == 2 and "exists" in capsys.readouterr().err
    assert gguf_path.read_bytes() == b"x" and not (tmp_path / "o").exists()


def test_compress_then_export_as_the_readme_shows(tmp_path, capsys):
    """The README's two commands: `layerfold compress -o pruned`, then `layerfold export pruned
    --gguf pruned-q8_0.gguf --outtype q8_0`; the file carries the cut's layer map and reads back
    close to the folder."""
    import gguf

    source = _folder(tmp_path, "llama", remove=[])
    pruned = tmp_path / "pruned"
    assert main(["-q", "compress", str(source), "--method", "last-n", "--remove", "2", "--no-heal", "--no-eval",
                 "-o", str(pruned), "--dtype", "fp32"]) == 0
    before = _tree_hash(pruned)
    out = tmp_path / "pruned-q8_0.gguf"
    assert main(["export", str(pruned), "--gguf", str(out), "--outtype", "q8_0"]) == 0
    assert "gguf check   ok" in capsys.readouterr().out
    assert _tree_hash(pruned) == before
    fields = gguf.GGUFReader(str(out)).fields
    assert fields["llama.block_count"].contents() == 4
    assert fields["layerfold.layer_map"].contents() == [0, 1, 2, 3]  # of 6: last-n removed layers 4 and 5
    ids = _ids()
    err = (_logits(_read_back(out), ids) - _logits(_stock(pruned), ids)).abs().max().item()
    assert 0 < err < 1.5e-1


def test_compress_refuses_an_architecture_llama_cpp_lacks_before_any_work(tmp_path, tiny_model_dir, capsys,
                                                                          monkeypatch):
    import dataclasses

    import layerfold.models.architectures as archs
    import layerfold.pipeline as pipeline

    def no_calibration(*a, **k):
        raise AssertionError("calibrated before refusing")

    monkeypatch.setattr(pipeline, "load_calibration", no_calibration)
    monkeypatch.setitem(archs.ARCHITECTURES, "llama", dataclasses.replace(archs.ARCHITECTURES["llama"], llama_cpp=None))
    rc = main(["-q", "compress", tiny_model_dir("llama"), "--method", "bi", "--remove", "2", "--no-heal",
               "-o", str(tmp_path / "o"), "--gguf", str(tmp_path / "o.gguf")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "llama.cpp has no architecture for 'llama'" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.gguf").exists() and not _no_partial_files(tmp_path)


def test_compress_refuses_an_unknown_outtype_before_any_work(tmp_path, tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["-q", "compress", tiny_model_dir("llama"), "--method", "last-n", "--remove", "2", "--no-heal",
              "-o", str(tmp_path / "o"), "--gguf", str(tmp_path / "o.gguf"), "--outtype", "q4_k"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "q4_k" in err.splitlines()[-1]
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.gguf").exists()

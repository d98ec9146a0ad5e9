"""Every supported architecture: load, analyze, prune, save, reload with stock transformers,
and check the pruned model equals one built from scratch with the smaller config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ARCH_CONFIGS, build_tiny, tiny_config

from layerfold import CompressOptions, compress, load_model
from layerfold.data.calibration import CalibrationSpec
from layerfold.healing import HealOptions
from layerfold.importance.layer_pass import final_hidden_states
from layerfold.models.architectures import architecture_for, get_path
from layerfold.models.compat import cache_kwargs, returned_cache
from layerfold.models.surgery import remove_layers
from layerfold.methods.registry import SelectionOptions
from layerfold.models.saving import OutputOptions
from layerfold.pipeline import ModelOptions

ARCHS = sorted(ARCH_CONFIGS)


def _ids(n=2, t=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (n, t), generator=g)


@pytest.mark.parametrize("model_type", ARCHS)
def test_layer_loop_matches_the_models_own_forward(model_type):
    model = build_tiny(model_type)
    arch = architecture_for(model.config)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        h = final_hidden_states(model, arch, ids)
        norm = get_path(model, arch.final_norm)
        logits = model.lm_head(norm(h))
        if getattr(model.config, "final_logit_softcapping", None):
            cap = model.config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ARCHS)
def test_pruned_model_equals_model_built_with_smaller_config(model_type):
    from transformers import AutoModelForCausalLM

    model = build_tiny(model_type)
    arch = architecture_for(model.config)
    remove = [1, 2]
    kept = remove_layers(model, arch, remove)
    assert kept == [0, 3, 4, 5]

    # the same weights in a model constructed directly with 4 layers and the sliced config
    cfg = tiny_config(model_type, layers=6)
    for key in arch.per_layer_lists:
        if getattr(cfg, key, None) is not None:
            setattr(cfg, key, [getattr(cfg, key)[i] for i in kept])
    for key in arch.layer_thresholds:
        setattr(cfg, key, sum(1 for i in kept if i < getattr(cfg, key)))
    cfg.num_hidden_layers = 4
    scratch = AutoModelForCausalLM.from_config(cfg).eval()
    missing = scratch.load_state_dict(model.state_dict(), strict=False)
    assert not missing.unexpected_keys
    ids = _ids(t=20)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, scratch(ids).logits)
        # with the KV cache: prefill then one token at a time must match the full forward
        full = model(ids).logits
        out = model(ids[:, :12], use_cache=True)
        past, steps = returned_cache(out), [out.logits]
        for t in range(12, ids.shape[1]):
            out = model(ids[:, t : t + 1], use_cache=True, **cache_kwargs(model, past))
            past = returned_cache(out)
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)
    for i, layer in enumerate(get_path(model, arch.layers)):
        assert layer.self_attn.layer_idx == i


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("method", ["streamline-block", "bi", "angular", "last-n"])
def test_compress_save_reload_generate(model_type, method, tiny_model_dir, text_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_model_dir(model_type)
    before = {p.name: p.stat().st_mtime_ns for p in Path(src).iterdir()}
    out = tmp_path / "out"
    r = compress(
        CompressOptions(
            model=ModelOptions(model=src),
            data=CalibrationSpec(source=text_file, samples=4, seq_len=32),
            selection=SelectionOptions(method=method, remove=2),
            output=OutputOptions(str(out)),
            progress=False,
        )
    )
    assert r.layers_before == 6 and r.layers_after == 4 and len(r.removed) == 2
    assert r.params_after < r.params_before
    # the input folder is untouched
    assert {p.name: p.stat().st_mtime_ns for p in Path(src).iterdir()} == before

    names = {p.name for p in out.iterdir()}
    for expected in ("config.json", "generation_config.json", "README.md", "layerfold.json",
                     "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"):
        assert expected in names, expected
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert all((out / shard).exists() for shard in set(index["weight_map"].values()))
    record = json.loads((out / "layerfold.json").read_text())
    assert record["layer_map"] == [i for i in range(6) if i not in r.removed]
    card = (out / "README.md").read_text()
    assert "layerfold compress" in card and f"{r.params_after:,}" in card

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    cfg = model.config
    assert cfg.num_hidden_layers == 4
    assert getattr(cfg, "quantization_config", None) is None
    if getattr(cfg, "layer_types", None) is not None:
        original = tiny_config(model_type).layer_types
        assert cfg.layer_types == [original[i] for i in record["layer_map"]]
    for p in model.parameters():
        assert torch.isfinite(p).all()
    ids = tok("the quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape[1] == ids.shape[1] + 8
    assert torch.equal(cached, uncached)

    # layerfold's own loader reads it back the same way
    again = load_model(str(out))
    assert len(get_path(again.model, again.arch.layers)) == 4


@pytest.mark.parametrize("model_type", ARCHS)
def test_default_method_per_architecture(model_type, tiny_model_dir, text_file, tmp_path):
    """No --method: ReplaceMe (Block Influence + the folded linear map) where the architecture's MLP
    output joins the residual stream directly, Block Influence alone where a norm sits in between
    (the map cannot be folded: without the fallback these models refuse their own default); with
    --repair X and no --method, Block Influence + X. The same layers go in every case."""
    src = tiny_model_dir(model_type)
    folds = architecture_for(tiny_config(model_type)).mlp_output is not None

    def run(name, **selection):
        out = tmp_path / name
        r = compress(CompressOptions(model=ModelOptions(model=src),
                                     data=CalibrationSpec(source=text_file, samples=4, seq_len=32),
                                     selection=SelectionOptions(remove=2, **selection),
                                     healing=HealOptions(tokens=0), output=OutputOptions(str(out)), progress=False))
        return r, json.loads((out / "layerfold.json").read_text()), load_model(str(out), dtype="fp32")

    default, record, model = run("default")
    pruned, pruned_record, pruned_model = run("prune-only", repair="none")
    record, pruned_record = record["recipe"], pruned_record["recipe"]
    assert (record["method"], record["repair"]) == (("replaceme", "linear") if folds else ("bi", "none"))
    assert (pruned_record["method"], pruned_record["repair"]) == ("bi", "none")
    assert default.removed == pruned.removed
    # the linear map lives in the down projection of the layer before each removed run (the layer
    # kept at new index i-1 when original layer i went); elsewhere the weights are the original's
    down = lambda m, i: dict(get_path(m.model, m.arch.layers)[i].named_parameters())[  # noqa: E731
        m.arch.mlp_output + ".weight" if m.arch.mlp_output else "mlp.down_proj.weight"]
    changed = [i for i in range(4) if not torch.equal(down(model, i), down(pruned_model, i))]
    before_runs = sorted({default.layer_map.index(l - 1) for l in default.removed if l - 1 in default.layer_map})
    assert changed == (before_runs if folds else [])

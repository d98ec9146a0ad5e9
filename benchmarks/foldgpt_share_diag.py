"""Why is a shared FoldGPT model so bad before its cure? Held-out KL, no training.

Removes Block Influence's 8 layers (the afternoon gates' choice, ``results/foldgpt/gates.scores.json``),
then shares the 22 kept layers in 11 adjacent pairs in several ways, and measures each model's
KL to the original on the 8 held-out rows (``layerfold.eval.heldout``, the gate check's metric)
with its stored parameter count:

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/foldgpt_share_diag.py [VARIANT ...] --json out.json

Variants: ``remove8`` (no sharing), ``bi19`` (BI removing 19: the equal-size baseline of plain
sharing; ``bi18``: of sharing with rank-16 deltas),
``important`` / ``mean`` (share init), ``important-norms`` (the weak member also takes the
important member's norms: the important layer run twice exactly), ``drop-weak`` (remove the
weak member of each pair instead of sharing: 19 removed, FoldGPT's pairs), ``important-dR`` /
``mean-dR`` (per-layer SVD deltas of rank R), and ``pair-K`` (only pair K shared, important
init: which pairs cost most).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "foldgpt"


def main() -> None:
    from layerfold.data.calibration import CalibrationSpec
    from layerfold.eval.heldout import compare_to_reference, heldout_ids, reference_log_probs
    from layerfold.models.loading import load_model
    from layerfold.models.surgery import count_parameters, decoder_layers, remove_layers
    from layerfold.nn.shared import adjacent_groups, share_groups

    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="*", default=["remove8", "bi19", "important", "important-norms", "mean",
                                                   "drop-weak", "important-d16", "mean-d16", "important-d64"])
    ap.add_argument("--json", default="/tmp/fold16b/share_diag.json")
    args = ap.parse_args()

    scores = json.loads((RESULTS / "gates.scores.json").read_text())
    removed8, importance = sorted(scores["gates_removed"]), scores["gates_scores"]
    base = load_model(None)
    ids = heldout_ids(CalibrationSpec(), base, progress=False)
    ref = reference_log_probs(base.model, ids)
    out = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}

    def fresh():
        from layerfold.models.surgery import copy_model
        m = copy_model(base.model)
        kept = remove_layers(m, base.arch, removed8)
        return m, kept

    for name in args.variants:
        if name in out:
            continue
        t = time.perf_counter()
        if name in ("bi18", "bi19"):
            from layerfold.models.surgery import copy_model  # BI's 19 lowest, from the recorded scores
            m = copy_model(base.model)
            bi = scores["block_influence"]
            drop = sorted(sorted(range(len(bi)), key=lambda l: bi[l])[:int(name[2:])])
            remove_layers(m, base.arch, drop)
            info = {"removed": drop}
        elif name == "remove8":
            m, kept = fresh()
            info = {"removed": removed8}
        elif name == "drop-weak":
            m, kept = fresh()
            groups = adjacent_groups(len(kept), 2)
            weak = [min(g, key=lambda j: importance[kept[j]]) for g in groups if len(g) == 2]
            remove_layers(m, base.arch, weak)
            info = {"removed": sorted(removed8 + [kept[j] for j in weak])}
        else:
            m, kept = fresh()
            groups = adjacent_groups(len(kept), 2)
            init, _, rest = name.partition("-")
            rank = int(rest[1:]) if rest.startswith("d") else 0
            if init == "pair":
                groups = [groups[int(rest)]]
                init = "important"
            share_groups(m, base.arch, groups, init=init, importance=[importance[l] for l in kept], delta_rank=rank)
            if rest == "norms":  # the weak member takes the important member's norms too
                layers = decoder_layers(m, base.arch)
                for g in groups:
                    best = max(g, key=lambda j: importance[kept[j]])
                    for j in g:
                        for (pn, p), (_, q) in zip(layers[j].named_parameters(), layers[best].named_parameters()):
                            if p is not q and p.dim() == 1:
                                p.data.copy_(q.data)
            info = {"removed": removed8, "groups": [[kept[j] for j in g] for g in groups], "init": init,
                    "delta_rank": rank}
        with torch.no_grad():
            fit = compare_to_reference(m, ids, ref).to_dict()
        out[name] = {**info, "stored_params": count_parameters(m), **fit, "seconds": time.perf_counter() - t}
        print(name, json.dumps({k: v for k, v in out[name].items() if k not in ("groups",)}), flush=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
        del m


if __name__ == "__main__":
    sys.exit(main())

"""The gates' swap refinement under other candidate windows, from one saved gate run (issue 16, section 1).

The gate training is deterministic and its result is saved (``analyze --gates --json``:
``gates_scores``, the final log a, and ``gates_removed`` before the swap is in
``gates_swaps.kl_before``'s set); only the refinement after the top-k changes between the
variants here, so this script reruns ``importance.gates.swap_refine`` (the library's own) on
the same model, the same first ``--rows`` calibration rows (``data.calibration``, the cached
self-written text the gates trained on) and the same teacher, with each window:

    gates-4   the default: the 4 removed / 4 kept layers nearest the boundary by log a
    bi-4      the same count ordered by Block Influence (on the same calibration rows)
    bi-8      8 x 8 by Block Influence
    gates-8   8 x 8 by log a

Candidates already scored (same rows, same removal set) are not run again (``memo``).
Writes ``swaps.json`` in ``--work``: every variant's accepted swaps, final set and tried list.

    python benchmarks/foldgpt_swaps.py --scores benchmarks/results/foldgpt-1203/gates.scores.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

VARIANTS = {"gates-4": ("gates", 4), "bi-4": ("block-influence", 4), "bi-8": ("block-influence", 8),
            "gates-8": ("gates", 8)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scores", required=True)
    ap.add_argument("--work", default="benchmarks/results/foldgpt-gates-1203b")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    import torch

    from layerfold.data.calibration import CalibrationSpec, load_calibration
    from layerfold.eval.heldout import reference_log_probs
    from layerfold.importance.gates import lowest_gated, swap_refine
    from layerfold.models.loading import load_model

    d = json.loads(Path(args.scores).read_text())
    scores, bi = d["gates_scores"], d["block_influence"]
    n_remove = len(d["gates_removed"])
    topk = lowest_gated(scores, n_remove)  # the gates' own choice, before the swap
    warm = lowest_gated(bi, n_remove)
    loaded = load_model(None)
    model = loaded.model.eval()
    ids = load_calibration(CalibrationSpec(), loaded, progress=False)[: args.rows]
    with torch.no_grad():
        teacher = reference_log_probs(model, ids, 2)
    out = Path(args.work) / "swaps.json"
    record = json.loads(out.read_text()) if out.exists() else {}
    memo = {tuple(t["removed"]): t["kl"] for v in record.values() for t in v["swaps"]["tried"]}
    # the gate run's own swap candidates, scored on the same rows by the same scorer (each variant's
    # start set is scored again: kl_before is compared with the saved one below, a check of the rows)
    saved = d.get("gates_swaps") or {}
    if saved.get("rows") == args.rows:
        memo.update({tuple(t["removed"]): t["kl"] for t in saved["tried"]})
    for name in args.variants.split(","):
        if name in record:
            continue
        order, window = VARIANTS[name]
        t = time.perf_counter()
        swaps = swap_refine(model, loaded.arch, ids, teacher, topk, bi if order == "block-influence" else scores,
                            args.rounds, warm=warm, window=window, rows=args.rows, batch_size=2, progress=False,
                            memo=memo)
        record[name] = {"order": order, "window": window, "topk": sorted(topk), "seconds": time.perf_counter() - t,
                        "load": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                        "swaps": swaps}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1))
        if saved.get("kl_before") is not None:
            print(f"start set's KL {swaps['kl_before']:.6f}, the gate run's {saved['kl_before']:.6f}", flush=True)
        print(f"== {name}: {swaps['kl_before']:.4f} -> {swaps['kl_after']:.4f}, removed {swaps['removed']}, "
              f"{len(swaps['tried'])} tried, {time.perf_counter() - t:.0f} s (load {os.getloadavg()[0]:.1f})",
              flush=True)


if __name__ == "__main__":
    main()

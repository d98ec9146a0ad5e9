"""Agreement of layerfold's scorer with lm-evaluation-harness on the same local task file.

Both score the embedded SmolLM2-135M-Instruct on the same prompts (lm-eval reads the task
through the config ``layerfold.eval.lm_eval_bridge.task_config`` writes); the script reports
both accuracies and, from lm-eval's logged samples, the largest per-choice log-likelihood
difference and how many predictions differ.

    PYTHONPATH=src nice -n 10 python benchmarks/lm_eval_agreement.py --task piqa \
        --out benchmarks/results/lm_eval_agreement.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from layerfold.eval import evaluate_task, load_task, resolve_task_path
from layerfold.eval.lm_eval_bridge import task_config
from layerfold.models.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="piqa")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default="benchmarks/results/lm_eval_agreement.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(None)
    path = resolve_task_path(args.task, args.data_dir)
    task = load_task(path, args.limit)
    t = time.perf_counter()
    ours = evaluate_task(loaded.model, loaded.tokenizer, task, batch_size=args.batch_size)
    ours_s = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "t.yaml").write_text(task_config(task.name, path))
        lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=args.batch_size, device="cpu")
        t = time.perf_counter()
        out = lm_eval.simple_evaluate(model=lm, tasks=[f"layerfold_{task.name}"],
                                      task_manager=TaskManager(include_path=tmp), limit=args.limit,
                                      log_samples=True, bootstrap_iters=0)
        theirs_s = time.perf_counter() - t
    res = out["results"][f"layerfold_{task.name}"]
    samples = sorted(out["samples"][f"layerfold_{task.name}"], key=lambda s: s["doc_id"])
    diffs, pred_diff, pred_norm_diff = [], 0, 0
    for s in samples:
        theirs = [float(r[0]) for r in s["filtered_resps"]]
        mine = ours.examples[s["doc_id"]]
        diffs.append(max(abs(a - b) for a, b in zip(theirs, mine["ll"])))
        pred_diff += int(np.argmax(theirs) != np.argmax(mine["ll"]))
        norm_t = [l / c for l, c in zip(theirs, mine["chars"])]
        norm_m = [l / c for l, c in zip(mine["ll"], mine["chars"])]
        pred_norm_diff += int(np.argmax(norm_t) != np.argmax(norm_m))
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "torch": torch.__version__, "lm_eval": lm_eval.__version__,
        "task": task.name, "examples": ours.n, "threads": torch.get_num_threads(),
        "layerfold": {**ours.metrics, "seconds": ours_s},
        "lm_eval_harness": {"acc": res["acc,none"], "acc_norm": res.get("acc_norm,none"), "seconds": theirs_s},
        "max_abs_loglik_diff": max(diffs), "mean_abs_loglik_diff": float(np.mean(diffs)),
        "predictions_differing_acc": pred_diff, "predictions_differing_acc_norm": pred_norm_diff,
    }
    print(json.dumps(report, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

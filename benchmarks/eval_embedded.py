"""Benchmark the evaluator on the embedded SmolLM2-135M-Instruct, every task of the shared data.

For each task: accuracy, wall time, examples per second, and token accounting of the
shared-prefix scorer against one-sequence-per-choice (the naive scorer), both from the same
run: tokens run through the model / distinct context+choice tokens, for ours and for naive.
The naive scorer is also timed on the first ``--naive-limit`` examples of each task, next to
ours on the same examples, and their log-likelihoods are compared.

    PYTHONPATH=src nice -n 10 python benchmarks/eval_embedded.py --data-dir ../shared/data \
        --out benchmarks/results/eval_embedded.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from layerfold.eval import evaluate_task, load_task, measure_cost, perplexity, read_documents
from layerfold.eval.scoring import score_examples, score_examples_naive
from layerfold.eval.tasks import resolve_task_path
from layerfold.models.loading import embedded_model_path, load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--tasks", default="piqa,arc_easy,boolq,winogrande,lambada_openai")
    ap.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    ap.add_argument("--naive-limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--ppl-docs", type=int, default=500, help="LAMBADA documents for perplexity (0: none)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default="benchmarks/results/eval_embedded.json")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    loaded = load_model(None)
    model, tok = loaded.model, loaded.tokenizer
    report = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "python": platform.python_version(),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
              "load_seconds": time.perf_counter() - t, "batch_size": args.batch_size, "limit": args.limit,
              "naive_limit": args.naive_limit, "tasks": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.tasks.split(","):
        task = load_task(resolve_task_path(name, args.data_dir), args.limit)
        r = evaluate_task(model, tok, task, batch_size=args.batch_size)
        st = r.stats
        row = {"examples": r.n, "metrics": r.metrics, "seconds": r.seconds, "examples_per_s": r.n / r.seconds,
               "tokens_distinct": st["tokens_distinct"], "tokens_run": st["tokens_run"],
               "tokens_padded": st["tokens_padded"], "tokens_naive": st["tokens_naive"],
               "ratio_ours": st["tokens_run"] / st["tokens_distinct"],
               "ratio_ours_padded": st["tokens_padded"] / st["tokens_distinct"],
               "ratio_naive": st["tokens_naive"] / st["tokens_distinct"]}
        # the naive scorer and ours on the same first examples: time and agreement
        sub = [ex.requests for ex in task.examples[: args.naive_limit]]
        fast, fs = score_examples(model, tok, sub, batch_size=args.batch_size)
        slow, ns = score_examples_naive(model, tok, sub)
        diffs = [abs(a.loglik - b.loglik) for ra, rb in zip(fast, slow) for a, b in zip(ra, rb)]
        row["subset"] = {"examples": len(sub), "seconds_ours": fs.seconds, "seconds_naive": ns.seconds,
                         "speedup": ns.seconds / fs.seconds, "max_abs_loglik_diff": max(diffs),
                         "greedy_mismatches": sum(a.greedy != b.greedy for ra, rb in zip(fast, slow)
                                                  for a, b in zip(ra, rb))}
        report["tasks"][task.name] = row
        print(task.name, json.dumps(row), flush=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
    if args.ppl_docs:  # 0: skip (a run that only adds tasks to an earlier one)
        docs = read_documents(resolve_task_path("lambada_openai", args.data_dir), args.ppl_docs)
        p = perplexity(model, tok, docs, window=512, batch_size=4)
        report["perplexity"] = {"documents": p.documents, "tokens": p.tokens, "window": p.window,
                                "stride": p.stride, "perplexity": p.perplexity, "seconds": p.seconds}
    c = measure_cost(model, path=embedded_model_path())
    report["cost"] = vars(c)
    print(json.dumps({"perplexity": report.get("perplexity"), "cost": report["cost"]}), flush=True)
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Two versions of the shared-prefix scorer on the same examples, in one process.

Loads ``src/layerfold/eval/scoring.py`` as it was at ``--old`` (a git revision) beside the
current one, scores the first ``--limit`` examples of each task with both on the embedded
model, and prints time, padded tokens / distinct tokens and the largest log-likelihood
difference (eval_embedded.md, "The padding fix"):

    python benchmarks/scorer_versions.py --old a57ddac --tasks piqa,arc_easy,winogrande --limit 200 --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from layerfold.eval import load_task
from layerfold.eval import scoring as current
from layerfold.eval.tasks import resolve_task_path
from layerfold.models.loading import load_model


def old_scoring(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:src/layerfold/eval/scoring.py"], capture_output=True,
                            text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "scoring_old.py"
    # the old file's relative imports point into the installed package
    path.write_text(source.replace("from ..models.", "from layerfold.models."))
    spec = importlib.util.spec_from_file_location("scoring_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["scoring_old"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="git revision of the older scorer")
    ap.add_argument("--tasks", default="piqa,arc_easy,winogrande")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    old = old_scoring(args.old)
    loaded = load_model(None)
    for name in args.tasks.split(","):
        examples = [e.requests for e in load_task(resolve_task_path(name), args.limit).examples]
        results = {}
        for label, module in (("old", old), ("new", current)):
            scored, st = module.score_examples(loaded.model, loaded.tokenizer, examples, batch_size=args.batch_size)
            results[label] = scored
            print(f"{name} {label}: {st.seconds:.1f} s, padded/distinct {st.tokens_padded / st.tokens_distinct:.3f}, "
                  f"forward passes {st.forward_passes}", flush=True)
        diff = max(abs(a.loglik - b.loglik) for x, y in zip(results["old"], results["new"]) for a, b in zip(x, y))
        print(f"{name}: largest log-likelihood difference {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()

"""Healing benchmark: SmolLM2-135M minus 8 of 30 layers, per pruning method, unhealed vs healed
with the same token budget, against the original.

    PYTHONPATH=src python benchmarks/healing.py --tokens 16384 --limit 60 --lambada 60

Every measured result is written as JSON under --work (one file per model variant) and skipped
when it already exists, so a killed run continues where it stopped. At the end the script
writes the Markdown table and the learning-curve plot.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from quick_eval import TASKS, evaluate, stability  # noqa: E402

from layerfold.data.calibration import CalibrationSpec, load_calibration  # noqa: E402
from layerfold.healing import HealOptions, heal, healing_data, prepare_teacher  # noqa: E402
from layerfold.importance import measure_similarity  # noqa: E402
from layerfold.methods import pruning  # noqa: E402
from layerfold.models.loading import load_model  # noqa: E402
from layerfold.models.surgery import count_parameters, remove_layers  # noqa: E402

RECIPES = {
    # LoRA (Gromov et al., Shortened LLaMA) trained by distillation from the original
    "lora-kl": dict(train="lora", lora_rank=16, lora_alpha=32, kl=1.0, lr=5e-4),
    # "Reassessing Layer Pruning": the last three layers + final norm (SmolLM2's lm_head is tied: frozen)
    "last3-kl": dict(train="layers", layers="last:3", kl=1.0, lr=2e-4),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384, help="healing tokens per model")
    ap.add_argument("--remove", type=int, default=8)
    ap.add_argument("--methods", default="bi,angular,last-n,streamline-block")
    ap.add_argument("--recipes", default="lora-kl,last3-kl")
    ap.add_argument("--limit", type=int, default=60, help="samples per multiple-choice task")
    ap.add_argument("--lambada", type=int, default=60, help="LAMBADA passages")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--heal-rows", type=int, default=0,
                    help="rows of self-written healing text (0: one pass of the budget); fewer rows are repeated")
    ap.add_argument("--heal-seed", type=int, default=1,
                    help="seed of the self-written healing text (0 is the calibration text itself)")
    ap.add_argument("--data", default="../shared/data/tasks")
    ap.add_argument("--work", default="benchmarks/results/healing")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    recipes = [r for r in args.recipes.split(",") if r]

    if not args.report_only:
        run(args, work, methods, recipes)
    report(args, work, methods, recipes)


def _done(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _save(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.rename(path)


def _eval(model, tok, args) -> dict:
    t = time.perf_counter()
    r = evaluate(model, tok, args.data, limit=args.limit, lambada_limit=args.lambada)
    r["eval_seconds"] = time.perf_counter() - t
    return r


def run(args, work: Path, methods, recipes) -> None:
    original = load_model(None, dtype="fp32", device="cpu")
    n_layers = original.model.config.num_hidden_layers
    path = work / "original.json"
    if not _done(path):
        print("evaluating the original", flush=True)
        r = _eval(original.model, original.tokenizer, args)
        r["params"] = count_parameters(original.model)
        _save(path, r)

    # which layers each method removes (one calibration pass, the pipeline's defaults)
    path = work / "selection.json"
    selection = _done(path)
    if not selection:
        ids = load_calibration(CalibrationSpec(), original)
        scores = measure_similarity(original.model, original.arch, ids)
        selection = {m: (pruning.last_layers(n_layers, args.remove) if m == "last-n"
                         else pruning.PRUNING_METHODS[m](scores, args.remove))
                     for m in ("bi", "angular", "last-n", "streamline-block")}
        _save(path, selection)

    base = HealOptions(tokens=args.tokens, batch_size=args.batch_size,
                       data=replace(HealOptions().data, seq_len=args.seq_len, seed=args.heal_seed), progress=True)
    t = time.perf_counter()
    if args.heal_rows:
        ids = load_calibration(replace(base.data, samples=args.heal_rows), original)
    else:
        ids = healing_data(base, original)
    t_data = time.perf_counter() - t
    t = time.perf_counter()
    cache = prepare_teacher(base, original, ids)
    t_cache = time.perf_counter() - t
    _save(work / "healing_data.json", {"rows": ids.shape[0], "seq_len": ids.shape[1], "data_seconds": t_data,
                                       "cache_seconds": t_cache, "cache_folder": str(cache.folder),
                                       "cache_bytes": sum(p.stat().st_size for p in cache.folder.glob('*.npy'))})

    def pruned(method):
        student = replace(original, model=copy.deepcopy(original.model))
        remove_layers(student.model, student.arch, selection[method])
        return student

    # every method unhealed first, then one recipe at a time across all methods, so a run cut
    # short still compares the methods on equal terms
    for method in methods:
        path = work / f"{method}.json"
        if not _done(path):
            print(f"evaluating {method} unhealed", flush=True)
            student = pruned(method)
            r = _eval(student.model, student.tokenizer, args)
            r["params"] = count_parameters(student.model)
            _save(path, r)
            del student
    for recipe in recipes:
        for method in methods:
            path = work / f"{method}+{recipe}.json"
            if _done(path):
                continue
            print(f"healing {method} with {recipe}", flush=True)
            student = pruned(method)
            log = work / f"{method}+{recipe}.log.jsonl"
            opts = replace(base, **RECIPES[recipe], log_file=str(log))
            h = heal(student, None, opts, ids=ids, prepared_teacher=cache)
            r = _eval(student.model, student.tokenizer, args)
            r["params"] = count_parameters(student.model)
            r["heal"] = h.summary()
            r["heal"]["recipe"] = opts.recipe()
            r["history"] = h.train.history
            _save(path, r)
            del student


def report(args, work: Path, methods, recipes) -> None:
    orig = _done(work / "original.json")
    if not orig:
        print("no results yet")
        return
    data = _done(work / "healing_data.json") or {}
    rows = [("original", "-", orig)]
    for m in methods:
        r = _done(work / f"{m}.json")
        if r:
            rows.append((m, "none", r))
        for rec in recipes:
            r = _done(work / f"{m}+{rec}.json")
            if r:
                rows.append((m, rec, r))
    o_mean, o_ppl = orig["mean_acc"], orig["lambada"]["ppl"]
    head = ["method", "healing", *TASKS, "mean acc", "% of original", "LAMBADA ppl", "x original",
            "LAMBADA acc", "stability", "params", "heal tokens", "heal train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, rec, r in rows:
        h = r.get("heal") or {}
        secs = h.get("seconds", {}).get("train")
        cells = [m, rec, *(f"{100 * r['tasks'][t]['acc']:.1f}" for t in TASKS),
                 f"{100 * r['mean_acc']:.1f}", f"{100 * r['mean_acc'] / o_mean:.1f}%",
                 f"{r['lambada']['ppl']:.2f}", f"{r['lambada']['ppl'] / o_ppl:.2f}", f"{100 * r['lambada']['acc']:.1f}",
                 f"{stability(orig, r)['mean']:.3f}" if m != "original" else "1",
                 f"{r['params'] / 1e6:.1f}M", f"{h['tokens']:,}" if h else "-", f"{secs:.0f}" if secs else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (work / "table.md").write_text(table + "\n")
    print(table)
    print(json.dumps(data))
    _plot(work, methods, recipes)


def _plot(work: Path, methods, recipes) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(recipes), figsize=(6 * len(recipes), 4), squeeze=False)
    for ax, rec in zip(axes[0], recipes):
        for m in methods:
            r = _done(work / f"{m}+{rec}.json")
            if not r:
                continue
            h = r["history"]
            ax.plot([x["tokens"] for x in h], [x["loss"] for x in h], marker=".", label=m)
        ax.set_title(f"healing loss ({rec})")
        ax.set_xlabel("healing tokens")
        ax.set_ylabel("KL to the original (top-64 cache)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(work.parent.parent / "healing_curves.png", dpi=110)


if __name__ == "__main__":
    main()

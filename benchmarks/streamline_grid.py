"""LLM-Streamline on the embedded SmolLM2-135M, 8 layers removed net (9 -> 1): loss x init.

    PYTHONPATH=src nice -n 10 python benchmarks/streamline_grid.py --train-tokens 65536 \\
        --variants original,bi,none,mse:first,mse:last,cosine:first,cosine:linear,bi+heal --limit 100 \\
        --pairs-dir /tmp/lf-pairs-64k --out benchmarks/results/streamline/grid-64k.json

One process: the original is loaded once; the block is chosen on the calibration text (seed 0,
32 x 256, cached); the replacement's training text is its own (seed 1, the healing text,
cached), ``--train-tokens`` of it plus 32 validation rows; the training pairs of the block
are collected once and shared by every pair-loss variant. Each variant trains a copy of the
original through ``replace_and_train`` (the library's path) and is evaluated with
``layerfold.eval`` on the first ``--limit`` examples of LAMBADA (perplexity of the last word
given the context, and last-word accuracy), PIQA and ARC-Easy, with stability against the
original. Peak memory is the process's VmHWM, reset before each variant (it includes the
resident original, about 0.5 GiB). Results are written after every variant; a second invocation with the
same ``--out`` adds its variants to the file, reusing the original's evaluation (its JSON beside
``--out``) and, with ``--pairs-dir``, the collected pairs (kept there, reused when they are of the
same block and text).

Variants: ``original``; ``bi`` (Block Influence prune-only, 8 layers); ``bi+heal`` (the same, then
healed by the library's default healing, LoRA + KL to the original, on the training rows: the
same ``--train-tokens``); ``none`` (prune-only of the same block: its first layer kept untrained);
``LOSS:INIT`` for LOSS in mse, mse-normed, cosine, lm, kl and INIT in first, last, linear,
linear-last; ``LOSS:INIT+healP`` the budget split: the replacement trained on the first (100 - P)%
of the training rows (its own pairs), then healed like ``bi+heal`` on the other P% (default 50):
the same total training tokens as ``bi+heal``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from layerfold.data.calibration import CalibrationSpec, load_calibration
from layerfold.data.pairs import PairStore
from layerfold.eval import evaluate
from layerfold.eval.result import EvalResult
from layerfold.importance import measure_similarity
from layerfold.methods import pruning
from layerfold.methods.streamline import (
    PAIR_LOSSES, StreamlineOptions, choose_block, collect_pairs, replace_and_train, training_text,
)
from layerfold.models.loading import load_model
from layerfold.models.surgery import count_parameters, decoder_layers, remove_layers

TASKS = ("lambada_openai", "piqa", "arc_easy")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak resident set)


def peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stored_key(pairs_dir: Path) -> dict | None:
    """The reuse key of the pairs in ``pairs_dir``: ``grid-key.json``, or, in a folder written
    before that file existed (up to 6d68242), the key the grid wrote over PairStore's
    ``done.json`` (a dict with "block"; PairStore's own progress there is {"rows": n})."""
    for name in ("grid-key.json", "done.json"):
        try:
            key = json.loads((pairs_dir / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(key, dict) and "block" in key:
            return key
    return None


def figures(ev) -> dict:
    out = {}
    for name, task in ev.tasks.items():
        out[name] = {k: task.metrics[k] for k in ("acc", "acc_norm", "perplexity", "stability") if k in task.metrics}
        out[name]["n"] = len(task.examples)
    for name, p in ev.perplexity.items():
        out[f"text:{name}"] = {"perplexity": p.perplexity}
    return out


def heal_bi(model, loaded, text, work: Path):
    """A pruned ``model`` (Block Influence's, or a trained replacement's) healed as ``layerfold
    compress`` heals by default (LoRA rank 16, KL to the original's logits), on ``text``'s
    training rows: the same budget. The budget is the rows' tokens (``text.train`` x seq_len),
    not ``--train-tokens``: when the packing gives fewer rows than asked (LAMBADA docs 1000..
    pack into 935 training rows for 262,144 tokens), healing asked for 262,144 tokens would
    repeat 89 rows and train 9.5% more tokens than the replacement's 239,360."""
    from dataclasses import replace

    from layerfold.healing import HealOptions, heal

    opts = HealOptions(tokens=text.train * text.ids.shape[1], progress=False)
    student = replace(loaded, model=model)
    t = time.perf_counter()
    r = heal(student, loaded, opts, ids=text.ids[: text.train])
    return student.model, {"seconds": time.perf_counter() - t, "steps": r.train.steps, "tokens": r.train.tokens,
                           "rows": r.rows, "parts": r.seconds,
                           "loss": [x["loss"] for x in r.train.history if "loss" in x]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-tokens", type=int, default=16_384)
    ap.add_argument("--remove", type=int, default=8)
    ap.add_argument("--variants", default="original,bi,none,mse:first,mse:last,mse-normed:first,cosine:first")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-source", default="self", choices=("self", "lambada"),
                    help="self: the library's default (seed 1, self-written); lambada: LAMBADA documents 1000.. "
                         "packed (disjoint from the evaluated documents 0..limit-1, but the same domain)")
    ap.add_argument("--out", default="benchmarks/results/streamline/grid.json")
    ap.add_argument("--reference", help="the original's evaluation JSON (default: beside --out); read when a "
                    "variant is evaluated, so a parallel invocation can wait for another's")
    ap.add_argument("--no-eval", action="store_true", help="train only: the learning curves, times and memory")
    ap.add_argument("--pairs-dir", help="keep the training pairs here and reuse them on the next invocation")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out_path.read_text()) if out_path.exists() else {"variants": {}}
    results.setdefault("runs", []).append({"argv": sys.argv[1:], "started": datetime.now(timezone.utc).isoformat(
        timespec="seconds")})
    results.update(settings=vars(args), started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   machine=f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
                           "2 cores shared with other runs")

    def save() -> None:
        out_path.write_text(json.dumps(results, indent=1))

    t = time.perf_counter()
    loaded = load_model(None)
    original, arch, tok = loaded.model, loaded.arch, loaded.tokenizer
    results["load_seconds"] = time.perf_counter() - t
    calibration = load_calibration(CalibrationSpec(), loaded, progress=False)
    scores = measure_similarity(original, arch, calibration, progress=False)
    window = args.remove + 1
    start = choose_block(scores, window)
    results["block"] = [start, start + window - 1]
    results["block_cosine"] = scores.cosine[start][window]
    base_opts = StreamlineOptions(train_tokens=args.train_tokens, eval_every=args.eval_every)
    if args.train_source == "self":
        text = training_text(base_opts, loaded, progress=False)
    else:
        from layerfold.data.calibration import pack_texts
        from layerfold.methods.streamline import TrainingText

        rows = [json.loads(l) for l in open(Path(args.data) / "tasks" / "lambada_openai.jsonl", encoding="utf-8")]
        docs = [r["context"] + " " + r["continuation"] for r in rows[1000:]]
        n = -(-args.train_tokens // 256)
        text = TrainingText(pack_texts(docs, tok, n + base_opts.val_rows, 256, "lambada[1000:]"), base_opts.val_rows,
                            "lambada[1000:]")
    results["text"] = {"train_rows": text.train, "val_rows": text.val, "seq_len": text.ids.shape[1]}
    work = Path(tempfile.mkdtemp(prefix="lf-grid-", dir="."))
    evals: dict = {}
    ref_path = Path(args.reference) if args.reference else out_path.with_suffix(".original.eval.json")
    names = args.variants.split(",")
    if "original" not in names and not (args.reference or args.no_eval or "original" in results["variants"]):
        names.insert(0, "original")
    try:
        pairs_dir = Path(args.pairs_dir) if args.pairs_dir else work / "pairs"
        key = {"block": results["block"], "rows": list(text.ids.shape), "source": args.train_source,
               "ids_sum": int(text.ids.sum())}
        done = pairs_dir / "grid-key.json"  # not done.json: PairStore keeps its own progress there
        if not any(n.partition(":")[0] in PAIR_LOSSES and "+heal" not in n for n in names):  # a split has its own
            store = None
        elif stored_key(pairs_dir) == key:
            store = PairStore.open(pairs_dir)
            # the key's sum could coincide; the stored token ids cannot (2 MB to read)
            if not torch.equal(store.read(range(store.samples))[2], text.ids):
                sys.exit(f"{pairs_dir}: the stored pairs are of other text; remove the folder or use another")
        else:
            t = time.perf_counter()
            reset_peak()
            store = PairStore(pairs_dir, text.ids.shape[0], text.ids.shape[1], original.config.hidden_size, "bf16")
            collect_pairs(original, arch, text.ids, start, window, store, progress=False)
            done.write_text(json.dumps(key))
            results["pairs"] = {"seconds": time.perf_counter() - t, "bytes": store.nbytes(), "tokens": store.tokens,
                                "peak_mib": peak_mib()}
            save()
        for name in names:
            reset_peak()
            t0 = time.perf_counter()
            entry: dict = {}
            model = original if name == "original" else copy.deepcopy(original)
            if name in ("bi", "bi+heal"):
                entry["removed"] = pruning.block_influence(scores, args.remove)
                remove_layers(model, arch, entry["removed"])
                if name == "bi+heal":
                    model, entry["heal"] = heal_bi(model, loaded, text, work)
            elif name != "original":
                # LOSS:INIT+healP: the budget split, the replacement trains on the first (100 - P)% of
                # the training rows, then the library's default healing spends the other P% (default 50)
                name_, _, heal_pct = name.partition("+heal")
                split = "+heal" in name
                loss, _, init = name_.partition(":")
                opts = StreamlineOptions(replacement="layer" if loss != "none" else "none",
                                         loss=loss if loss != "none" else StreamlineOptions().loss,
                                         init=init or "first",
                                         train_tokens=args.train_tokens, eval_every=args.eval_every)
                own_text, own_store = text, store if loss in PAIR_LOSSES else None
                if split:
                    from layerfold.methods.streamline import TrainingText

                    heal_rows = round(text.train * int(heal_pct or 50) / 100)
                    first = text.train - heal_rows
                    # the replacement's rows, then the same validation rows; its pairs are its own
                    own_text = TrainingText(torch.cat([text.ids[:first], text.ids[text.train:]]), text.val,
                                            text.source)
                    own_store = None
                r = replace_and_train(model, arch, own_text, start, window, opts, work_dir=work, progress=False,
                                      store=own_store)
                entry.update(training=r.training, seconds_parts=r.seconds, removed=r.removed)
                if split:
                    heal_text = TrainingText(text.ids[first:], text.val, text.source)  # rows first.., then val
                    model, entry["heal"] = heal_bi(model, loaded, heal_text, work)
                    entry["split"] = {"replacement_rows": first, "heal_rows": heal_rows}
            entry["make_seconds"] = time.perf_counter() - t0
            entry["make_peak_mib"] = peak_mib()
            entry["layers"], entry["params"] = len(decoder_layers(model, arch)), count_parameters(model)
            if args.no_eval:
                results["variants"][name] = entry
                save()
                print(name, json.dumps({k: v for k, v in entry.items() if k != "training"}), flush=True)
                del model
                continue
            if name != "original" and "original" not in evals and ref_path.exists():
                evals["original"] = EvalResult.load(ref_path)
            t = time.perf_counter()
            ev = evaluate(model, tok, tasks=list(TASKS), limit=args.limit, data_dir=args.data,
                          ppl=["lambada_openai"], ppl_limit=args.limit, reference=evals.get("original"),
                          cost=False, speed=False)
            entry["eval_seconds"] = time.perf_counter() - t
            if name == "original":
                evals["original"] = ev
                ev.save(ref_path)
            entry["tasks"] = figures(ev)
            results["variants"][name] = entry
            results["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            save()
            print(name, json.dumps({k: v for k, v in entry.items() if k != "training"}), flush=True)
            if model is not original:
                del model
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

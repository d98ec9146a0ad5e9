"""LAMBADA last-word accuracy of removal sets of the embedded model, per example (issue 16, section 1).

Why: in foldgpt.md 1a, gates + swap (remove 4, 5, 12-14, 16, 17, 25) beat Block Influence
(12-17, 25, 26) on held-out KL and LAMBADA text perplexity but lost last-word accuracy,
4% against 13% on 100 examples. This script loads the original once, removes each set of
layers from a copy (``models.surgery.remove_layers``, what ``compress --no-heal`` saves, no
weight training) and scores LAMBADA with the library's own scorer (``eval.scoring.score_examples``,
the code behind ``layerfold eval``), keeping every example's log-likelihood and greedy flag so
that two sets can be compared example by example. ``--diag`` adds, per example, the token the
model ranks first where the last word starts and the gold token's rank there (one extra
forward pass per example). ``--heldout`` adds the gate check's metric (KL to the original on
the 8 held-out rows, ``eval.heldout``); ``--ppl N`` LAMBADA text perplexity on N documents.

    python benchmarks/foldgpt_lambada.py run bi8=12-17,25,26 swap=4,5,12-14,16,17,25 --limit 500
    python benchmarks/foldgpt_lambada.py compare bi8 swap        # paired: both right, only one, ...
    python benchmarks/foldgpt_lambada.py table bi8 swap ...

Results (one ``NAME.json`` each) go to ``--work``; a set whose file exists with at least
``--limit`` examples is not rerun.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

LAMBADA = "lambada_openai"


def parse_set(text: str) -> list[int]:
    """``4,5,12-14`` -> [4, 5, 12, 13, 14]; ``-`` or empty: nothing removed."""
    out: list[int] = []
    for part in filter(None, text.split(",")):
        if part == "-":
            continue
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return sorted(set(out))


def _diagnose(model, tokenizer, requests) -> list[dict]:
    """Top-1 token and the gold token's rank at the position predicting the last word's first token."""
    import torch

    from layerfold.eval.scoring import _base, encode_pair, output_logits

    rows = []
    with torch.no_grad():
        for (ctx, cont), in requests:
            e = encode_pair(tokenizer, ctx, cont)
            hidden = _base(model)(input_ids=torch.tensor([e.context]), use_cache=False).last_hidden_state
            logits = output_logits(model, hidden[0, -1:])[0]  # the head at the one position that matters
            gold = e.continuation[0]
            top = int(logits.argmax())
            rows.append({"top": top, "top_text": tokenizer.decode([top]), "gold": gold,
                         "gold_text": tokenizer.decode([gold]),
                         "gold_rank": int((logits > logits[gold]).sum()),
                         "top_in_context": top in set(e.context)})
    return rows


def induction(model, vocab: int, rows: int = 16, length: int = 64, seed: int = 0) -> float:
    """Copying: top-1 accuracy on the second half of random token sequences repeated twice
    (after the first token of the repeat); what an induction circuit does and what LAMBADA's
    last word (often a name seen earlier in the passage) needs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    half = torch.randint(100, vocab, (rows, length), generator=g)
    ids = torch.cat([half, half], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    pred = logits[:, length:-1].argmax(-1)  # position length+i predicts token length+i+1
    return float((pred == ids[:, length + 1:]).float().mean())


def text_copy(model, tokenizer, rows: int = 16, length: int = 64, first: int = 3000) -> float:
    """Copying in prose: top-1 accuracy on the second copy of a LAMBADA passage repeated twice
    (the first ``length`` tokens of passages ``first``.., outside the examples scored here)."""
    import torch

    from layerfold.eval.tasks import resolve_task_path

    with open(resolve_task_path(LAMBADA), encoding="utf-8") as f:
        lines = f.readlines()[first:]
    halves = []
    for x in lines:  # the first ``rows`` passages of at least ``length`` tokens
        t = tokenizer.encode(json.loads(x)["context"], add_special_tokens=False)
        if len(t) >= length:
            halves.append(t[:length])
        if len(halves) == rows:
            break
    ids = torch.tensor([h + h for h in halves])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    pred = logits[:, length:-1].argmax(-1)
    return float((pred == ids[:, length + 1:]).float().mean())


def run(work: Path, sets: dict[str, list[int]], limit: int, diag: bool, heldout: bool, ppl: int,
        copy_test: bool = False, extra: bool = False, tasks: list[str] | None = None, mc_limit: int = 100,
        reference: str | None = None) -> None:
    import torch

    from layerfold.eval.result import language_modeling_result
    from layerfold.eval.scoring import score_examples
    from layerfold.eval.tasks import load_task, resolve_task_path
    from layerfold.models.loading import load_model
    from layerfold.models.surgery import copy_model, remove_layers

    work.mkdir(parents=True, exist_ok=True)
    task = load_task(resolve_task_path(LAMBADA), limit)
    requests = [ex.requests for ex in task.examples]
    original = load_model(None)
    arch = original.arch
    ids = ref = None
    for name, removed in sets.items():
        path = work / f"{name}.json"
        old = json.loads(path.read_text()) if path.exists() else None
        if old and old["limit"] >= limit and not extra:
            print(f"== {name}: done before ({path})", flush=True)
            continue
        model = copy_model(original.model) if removed else original.model
        if removed:
            remove_layers(model, arch, removed)
        model.eval()
        if extra and old:  # only the extra measures (--ppl, --copy, --heldout) on a set already scored
            rec = old
            if ppl and rec.get("text_ppl_docs") != ppl:
                rec.update(_text_ppl(model, original.tokenizer, ppl), text_ppl_docs=ppl)
            if copy_test:
                rec["copy_acc"] = induction(model, len(original.tokenizer))
                rec["copy_text_acc"] = text_copy(model, original.tokenizer)
            if tasks:
                rec.setdefault("tasks", {}).update(_choice_tasks(model, original.tokenizer, tasks, mc_limit, reference))
                rec["tasks_limit"] = mc_limit
            if heldout and not rec.get("heldout"):
                ids, ref = _heldout_rows(original, ids, ref)
                from layerfold.eval.heldout import compare_to_reference
                rec["heldout"] = compare_to_reference(model, ids, ref).to_dict()
            path.write_text(json.dumps(rec))
            print(f"== {name} removed {removed}: text ppl {rec.get('text_ppl')} copy {rec.get('copy_acc')} "
                  f"prose copy {rec.get('copy_text_acc')} "
                  f"tasks {rec.get('tasks')} "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
            del model
            continue
        t = time.perf_counter()
        scored, _ = score_examples(model, original.tokenizer, requests, batch_size=8) if limit else ([], None)
        seconds = time.perf_counter() - t
        rows = [{"ll": s[0].loglik, "greedy": s[0].greedy, "tokens": s[0].tokens} for s in scored]
        res = language_modeling_result(LAMBADA, rows) if rows else None
        rec = {"name": name, "removed": removed, "limit": limit, "metrics": res.metrics if res else {}, "seconds": seconds,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load": os.getloadavg(),
               "examples": rows}
        path.write_text(json.dumps(rec))  # the slow part is kept even if an extra measure below fails
        if diag:  # the first ``diag`` examples
            for r, d in zip(rows, _diagnose(model, original.tokenizer, requests[:diag])):
                r.update(d)
        if heldout:
            from layerfold.eval.heldout import compare_to_reference

            ids, ref = _heldout_rows(original, ids, ref)
            rec["heldout"] = compare_to_reference(model, ids, ref).to_dict()
        if ppl:
            rec.update(_text_ppl(model, original.tokenizer, ppl), text_ppl_docs=ppl)
        if copy_test:
            rec["copy_acc"] = induction(model, len(original.tokenizer))
            rec["copy_text_acc"] = text_copy(model, original.tokenizer)
        if tasks:
            rec["tasks"], rec["tasks_limit"] = _choice_tasks(model, original.tokenizer, tasks, mc_limit, reference), mc_limit
        for k in ("copy_acc", "copy_text_acc", "heldout", "text_ppl", "text_ppl_docs", "tasks", "tasks_limit"):  # measured by an earlier run
            if old and k in old and k not in rec:
                rec[k] = old[k]
        path.write_text(json.dumps(rec, indent=None))
        print(f"== {name} removed {removed}: "
              + (f"acc {res.metrics['acc']:.3f} last-word ppl {res.metrics['perplexity']:.1f} " if res else "")
              + f"({seconds:.0f} s, load {os.getloadavg()[0]:.1f})"
              + (f" copy {rec['copy_acc']:.3f}" if copy_test else "")
              + (f" held-out KL {rec['heldout']['kl']:.4f}" if heldout else "")
              + (f" text ppl {rec['text_ppl']:.1f}" if ppl else ""), flush=True)
        del model
        torch.manual_seed(0)


def _heldout_rows(original, ids, ref):
    """The gate check's 8 held-out rows (self-written, seed 2) and the original's log-probs there, once."""
    if ids is None:
        from layerfold.data.calibration import CalibrationSpec
        from layerfold.eval.heldout import heldout_ids, reference_log_probs

        ids = heldout_ids(CalibrationSpec(), original, progress=False)
        ref = reference_log_probs(original.model, ids)
    return ids, ref


def _text_ppl(model, tokenizer, docs: int) -> dict:
    """LAMBADA text perplexity on the first ``docs`` documents, window 512 (``layerfold eval --ppl``'s)."""
    from layerfold.eval.perplexity import perplexity, read_documents
    from layerfold.eval.tasks import resolve_task_path

    texts = read_documents(resolve_task_path(LAMBADA), docs)
    return {"text_ppl": perplexity(model, tokenizer, texts, window=512, batch_size=4, name=LAMBADA).perplexity}


def _choice_tasks(model, tokenizer, tasks: list[str], limit: int, reference: str) -> dict:
    """Multiple-choice tasks through ``layerfold.eval.evaluate`` (as ``layerfold eval --tasks``),
    with stability against the original's evaluation on the same examples (``reference``)."""
    from layerfold.eval import evaluate

    res = evaluate(model, tokenizer, tasks=tasks, limit=limit, reference=reference, cost=False, speed=False)
    return {name: {k: v for k, v in t.metrics.items()} for name, t in res.tasks.items()}


def load(work: Path, name: str) -> dict:
    return json.loads((work / f"{name}.json").read_text())


def acc_se(values: list[bool]) -> tuple[float, float]:
    n = len(values)
    p = sum(values) / n
    return p, math.sqrt(p * (1 - p) / n)


def compare(work: Path, a: str, b: str, first: int | None = None) -> str:
    """Paired comparison on the examples both have (the first ``first`` if given)."""
    ra, rb = load(work, a)["examples"], load(work, b)["examples"]
    n = min(len(ra), len(rb), first or 10**9)
    ga, gb = [r["greedy"] for r in ra[:n]], [r["greedy"] for r in rb[:n]]
    both = sum(x and y for x, y in zip(ga, gb))
    only_a = sum(x and not y for x, y in zip(ga, gb))
    only_b = sum(y and not x for x, y in zip(ga, gb))
    diff = [(x - y) for x, y in zip(ga, gb)]
    mean = sum(diff) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diff) / (n - 1) / n)
    dll = [x["ll"] - y["ll"] for x, y in zip(ra[:n], rb[:n])]
    mll = sum(dll) / n
    sell = math.sqrt(sum((d - mll) ** 2 for d in dll) / (n - 1) / n)
    better = sum(d > 0 for d in dll)
    return (f"{a} vs {b} on {n} examples: acc {sum(ga) / n:.3f} vs {sum(gb) / n:.3f}, difference "
            f"{mean:+.3f} (paired SE {se:.3f}, {mean / se if se else 0:+.1f} SE); both right {both}, only {a} "
            f"{only_a}, only {b} {only_b}; last-word log-lik difference {mll:+.3f} nats (SE {sell:.3f}), "
            f"{a} higher on {better} of {n}")


def table(work: Path, names: list[str], reference: str | None) -> str:
    lines = ["| set | removed | examples | LAMBADA acc (SE) | last-word ppl | held-out KL | text ppl | copy acc (random, prose) | "
             "PIQA acc | ARC-E acc | stability (PIQA, ARC-E) |" + (f" acc - {reference} (paired SE) |" if reference else ""),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if reference else "")]
    for name in names:
        d = load(work, name)
        p, se = acc_se([r["greedy"] for r in d["examples"]]) if d["examples"] else (math.nan, math.nan)
        cells = [name, ",".join(map(str, d["removed"])) or "-", str(len(d["examples"])), f"{100 * p:.1f} ({100 * se:.1f})",
                 f"{d['metrics']['perplexity']:.0f}" if d["metrics"] else "-",
                 f"{d['heldout']['kl']:.4f}" if d.get("heldout") else "-",
                 f"{d['text_ppl']:.1f}" if d.get("text_ppl") else "-",
                 f"{d['copy_acc']:.3f}, {d.get('copy_text_acc', math.nan):.3f}" if d.get("copy_acc") is not None else "-"]
        t = d.get("tasks") or {}
        cells += [f"{100 * t[k]['acc']:.0f}" if k in t else "-" for k in ("piqa", "arc_easy")]
        stab = [t[k]["stability"] for k in ("piqa", "arc_easy") if "stability" in t.get(k, {})]
        cells.append(", ".join(f"{x:.3f}" for x in stab) or "-")
        if reference and d["examples"]:
            ra = load(work, reference)["examples"]
            diff = [x["greedy"] - y["greedy"] for x, y in zip(d["examples"], ra)]
            m = sum(diff) / len(diff)
            s = math.sqrt(sum((x - m) ** 2 for x in diff) / (len(diff) - 1) / len(diff))
            cells.append(f"{100 * m:+.1f} ({100 * s:.1f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["run", "compare", "table"])
    ap.add_argument("items", nargs="*", help="run: NAME=LAYERS (e.g. bi8=12-17,25,26; NAME=- for the original); "
                                              "compare: A B; table: names")
    ap.add_argument("--work", default="benchmarks/results/foldgpt-gates-1203b")
    ap.add_argument("--limit", type=int, default=500, help="LAMBADA examples (0: none, only the other measures)")
    ap.add_argument("--first", type=int, default=None, help="compare: only the first N examples")
    ap.add_argument("--reference", default=None, help="table: a column of the paired difference to this set")
    ap.add_argument("--diag", type=int, default=0, help="top-1 token and gold rank on the first N examples")
    ap.add_argument("--heldout", action="store_true")
    ap.add_argument("--ppl", type=int, default=0)
    ap.add_argument("--copy", action="store_true", help="copying accuracy on repeated random tokens")
    ap.add_argument("--tasks", default="", help="multiple-choice tasks, e.g. piqa,arc_easy (with stability)")
    ap.add_argument("--mc-limit", type=int, default=100)
    ap.add_argument("--mc-reference", default="benchmarks/results/foldgpt-1203/original.eval.json",
                    help="the original's evaluation on the same --mc-limit examples (stability)")
    ap.add_argument("--extra", action="store_true", help="sets already scored: add only --ppl/--copy/--heldout")
    args = ap.parse_args()
    work = Path(args.work)
    if args.action == "run":
        sets = {}
        for item in args.items:
            name, sep, layers = item.partition("=")
            if not sep:
                raise SystemExit(f"run: expected NAME=LAYERS, got {item!r}")
            sets[name] = parse_set(layers)
        run(work, sets, args.limit, args.diag, args.heldout, args.ppl, args.copy, args.extra,
            [t for t in args.tasks.split(",") if t], args.mc_limit, args.mc_reference)
    elif args.action == "compare":
        if len(args.items) != 2:
            raise SystemExit("compare: two names")
        print(compare(work, *args.items, first=args.first))
    else:
        print(table(work, args.items, args.reference))


if __name__ == "__main__":
    main()

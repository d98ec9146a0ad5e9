"""Issue 18's one table: every measured recipe of the quality frontier, unhealed and healed.

Reads every record the frontier scripts wrote and prints ONE Markdown table, a row per recipe:

- unhealed: ``benchmarks/frontier.py``'s per-plan JSONs (``PLAN-remove8.json``) in
  ``results/frontier/`` and ``results/frontier-unhealed-*/``, with the process's
  ``/usr/bin/time -v`` file ``PLAN.time.txt`` beside it when there is one (CPU s, wall s, peak RSS);
- healed: ``benchmarks/frontier_healed.py``'s records in ``results/frontier-healed-*/`` and
  ``results/frontier/healed/``: ``NAME.layerfold.json`` (recipe, figures, seconds), ``NAME.run.json``
  (CPU s, wall s, peak RSS of the run), ``NAME.eval.json`` (per-example scores: the agreement with
  the original when the summary predates it).

The folders are globbed, so new records appear without a change here. A plan recorded in two
folders (e.g. an earlier held-out-only run and a later run with the tasks) gets one row: the
record with more figures (tasks first, then the newer date). Every cell comes from a record; a
figure a record lacks is "-".

    python benchmarks/frontier_table.py > /tmp/table.md
    python benchmarks/frontier_table.py --results benchmarks/results   # another results folder
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from layerfold.methods.replaceme import removed_runs

RESULTS = Path(__file__).parent / "results"
UNHEALED = ("frontier", "frontier-unhealed-*")
HEALED = ("frontier/healed", "frontier-healed-*")
# records written under another name than the recipe's (frontier.md's healed table names them so);
# their run record is looked up under the recipe's name
ALIASES = {"bi+linear+lora-kl": "bi+linear+calib"}
TASKS = ("piqa/acc", "arc_easy/acc", "lambada_openai/acc")


def folders(results: Path, patterns) -> list[Path]:
    out = []
    for pattern in patterns:
        out += sorted(p for p in results.glob(pattern) if p.is_dir())
    return out


def ranges(layers) -> str:
    """3,12,13,14 -> 3,12-14."""
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in removed_runs(list(layers)))


def time_file(path: Path) -> dict:
    """CPU s (user + system), wall s and peak RSS bytes of a ``/usr/bin/time -v`` file."""
    if not path.exists():
        return {}
    text, out = path.read_text(), {}
    user = re.search(r"User time \(seconds\): ([\d.]+)", text)
    system = re.search(r"System time \(seconds\): ([\d.]+)", text)
    if user and system:
        out["cpu_seconds"] = float(user.group(1)) + float(system.group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if wall:
        secs = 0.0
        for part in wall.group(1).split(":"):
            secs = secs * 60 + float(part)
        out["wall_seconds"] = secs
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if rss:
        out["peak_rss_bytes"] = int(rss.group(1)) * 1024
    return out


def unhealed_rows(results: Path) -> tuple[list[dict], dict | None]:
    """One row per plan of frontier.py's records, and the original's task summary."""
    best: dict[str, dict] = {}
    original = None
    for folder in folders(results, UNHEALED):
        for path in sorted(folder.glob("original-limit*.json")):
            summary = json.loads(path.read_text())["summary"]
            if original is None:
                original = {"summary": summary, "source": path}
            elif summary.get("ppl/lambada_openai") != original["summary"].get("ppl/lambada_openai"):
                print(f"warning: {path} differs from {original['source']}", file=sys.stderr)
        for path in sorted(folder.glob("*-remove*.json")):
            if path.name.startswith("search-"):
                continue
            r = json.loads(path.read_text())
            t = r.get("tasks") or {}
            timed = time_file(folder / f"{r['plan']}.time.txt")
            repair = r["seconds"].get("repair")
            if repair is not None and "train_data" in r["seconds"]:
                repair += r["seconds"]["train_data"]  # a replacement's own training text
            row = {
                "recipe": r["plan"], "healing": "none", "removed": r["removed"], "tasks": t,
                "replaced": (r.get("streamline") or {}).get("block_layers"),
                "kl": r["heldout"]["kl"], "top1": r["heldout"]["top1"],
                "params": r["params"], "select": r["seconds"].get("select"), "repair": repair, "heal": None,
                "eval": r["seconds"].get("tasks"),
                "cpu": timed.get("cpu_seconds"), "wall": timed.get("wall_seconds"),
                "rss": r["peak_rss_mib"] * 2**20 if "peak_rss_mib" in r else timed.get("peak_rss_bytes"),
                "limit": r.get("task_limit"), "folder": folder.relative_to(results).as_posix(),
                "date": r.get("date", ""),
            }
            key = r["plan"]
            old = best.get(key)
            if old is None or (bool(row["tasks"]), row["date"]) > (bool(old["tasks"]), old["date"]):
                best[key] = row
    return list(best.values()), original


def healing_text(record: dict) -> str:
    recipe = record.get("recipe") or {}
    if record.get("cure") or recipe.get("cure"):
        cure = record.get("cure") or {}
        opts = cure.get("options") or recipe.get("cure") or {}
        steps = cure.get("steps", opts.get("steps"))
        batch = (opts.get("batch_size") or 0) * (opts.get("grad_accum") or 1)
        tokens = cure.get("tokens") or cure.get("tokens_seen")
        lora = f", LoRA r{opts['lora_rank']}" if opts.get("lora_rank") else ""
        return (f"FoldGPT cure{lora}, {steps} steps" + (f" x {batch} rows" if batch else "")
                + (f" ({tokens:,} tokens)" if tokens else ""))
    heal, done = recipe.get("heal"), record.get("heal") or {}
    if not heal:
        return "none"
    train = {"lora": f"LoRA r{heal.get('lora_rank')}"}.get(heal.get("train"), str(heal.get("train")))
    loss = "+".join(k for k in ("kl", "ce", "mse") if heal.get(k))
    tokens = done.get("tokens", heal.get("tokens"))
    return f"{train} {loss}, {tokens:,} tokens ({heal['data']['source']})"


def healed_rows(results: Path) -> tuple[list[dict], dict | None]:
    from layerfold.eval.result import EvalResult
    from layerfold.eval.stability import agreement

    rows, original, runs, evals = [], None, {}, {}
    dirs = folders(results, HEALED)
    for folder in dirs:  # run records and per-example scores by recipe name, any healed folder
        for path in folder.glob("*.run.json"):
            runs.setdefault(path.name[: -len(".run.json")], json.loads(path.read_text()))
        orig = folder / "original.limit100.eval.json"
        if orig.exists() and "original" not in evals:
            evals["original"] = EvalResult.load(orig)
    for folder in dirs:
        for path in sorted(folder.glob("*.layerfold.json")):
            stem = path.name[: -len(".layerfold.json")]
            name = ALIASES.get(stem, stem)
            d = json.loads(path.read_text())
            ev = d.get("evaluation") or {}
            before, after = ev.get("before") or {}, dict(ev.get("after") or {})
            if before and original is None:
                original = {"summary": before, "source": path}
            if not after:
                continue
            for task in ("piqa", "arc_easy"):  # written before `agreement` existed: from the examples
                scores = folder / f"{stem}.eval.json"
                if f"{task}/agreement" not in after and scores.exists() and "original" in evals:
                    mine = EvalResult.load(scores)
                    after[f"{task}/agreement"] = agreement(evals["original"].tasks[task].correct(),
                                                           mine.tasks[task].correct())
            secs, run = d.get("seconds") or {}, runs.get(name, {})
            # as frontier_healed.py's table: select = the calibration pass, search or gates;
            # repair = the linear fit or the replacement (its text, pairs, training); heal = healing or cure
            select = secs.get("importance", 0) + secs.get("search", 0) + secs.get("gates", 0)
            saved = run.get("search_seconds_saved")
            recipe = d.get("recipe") or {}
            limit = re.search(r"--eval-limit (\d+)", d.get("command", ""))
            rows.append({
                "recipe": name, "healing": healing_text(d), "removed": recipe.get("removed_layers") or [],
                "replaced": (recipe.get("streamline") or {}).get("block_layers"),
                "tasks": after, "kl": after.get("heldout/kl"), "top1": after.get("heldout/top1"),
                "params": d.get("params_after", after.get("cost/parameters")),
                "select": select, "select_note": f"{saved:.0f} (reused)" if saved else None,
                "repair": sum(secs.get(k, 0) for k in ("linear_repair", "replacement", "train_data", "pairs",
                                                       "linear_init", "train")),
                "heal": secs.get("heal", 0) + secs.get("cure", 0), "eval": secs.get("eval_after"),
                "cpu": run.get("cpu_seconds"), "wall": run.get("wall_seconds"), "rss": run.get("peak_rss_bytes"),
                "limit": int(limit.group(1)) if limit else None,
                "folder": folder.relative_to(results).as_posix(),
            })
    return rows, original


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def acc(t: dict, k: str) -> str:
    if k not in t:
        return "-"
    v = t[k] * 100
    return f"{v:.0f}" if abs(v - round(v)) < 1e-6 else f"{v:.1f}"


def mean_acc(t: dict) -> float | None:
    return sum(t[k] for k in TASKS) / len(TASKS) if all(k in t for k in TASKS) else None


def table(results: Path) -> str:
    unhealed, orig_u = unhealed_rows(results)
    healed, orig_h = healed_rows(results)
    orig = (orig_u or orig_h or {}).get("summary", {})
    if orig_u and orig_h and orig_u["summary"].get("ppl/lambada_openai") != orig_h["summary"].get("ppl/lambada_openai"):
        print(f"warning: the originals of {orig_u['source']} and {orig_h['source']} differ", file=sys.stderr)
    m0, p0 = mean_acc(orig), orig.get("ppl/lambada_openai")
    head = ["recipe", "healing", "removed", "PIQA", "ARC-e", "LAMBADA acc", "mean acc (% of orig)",
            "LAMBADA text ppl (x orig)", "held-out KL", "top-1", "stability PIQA/ARC", "agreement PIQA/ARC",
            "stored params", "select s", "repair s", "heal s", "eval s", "CPU s (run)", "wall s (run)",
            "peak RSS GiB", "record"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if orig:
        lines.append(f"| original | - | - | {acc(orig, 'piqa/acc')} | {acc(orig, 'arc_easy/acc')} "
                     f"| {acc(orig, 'lambada_openai/acc')} | {fmt(m0 and m0 * 100, '.1f')} (100%) "
                     f"| {fmt(p0, '.2f')} (1.00) | 0 | 100% | - | - | {fmt(orig.get('cost/parameters'), ',')} "
                     "| - | - | - | - | - | - | - | - |")

    def order(r):
        t = r["tasks"]
        return (r["healing"] != "none", t.get("ppl/lambada_openai", float("inf")), r["kl"] if r["kl"] is not None
                else float("inf"))

    for r in sorted(unhealed + healed, key=order):
        t = r["tasks"]
        m, p = mean_acc(t), t.get("ppl/lambada_openai")
        mean = f"{m * 100:.1f} ({m / m0 * 100:.1f}%)" if m is not None and m0 else "-"
        ppl = f"{p:.2f} ({p / p0:.2f})" if p is not None and p0 else "-"
        pair = lambda k, f: "-" if all(f"{x}/{k}" not in t for x in ("piqa", "arc_easy")) else (  # noqa: E731
            "/".join(fmt(t.get(f"{x}/{k}"), f) for x in ("piqa", "arc_easy")))
        removed = ranges(r["removed"]) + (f" ({r['replaced']} replaced by 1)" if r.get("replaced") else "")
        recipe = r["recipe"] + (f" [{r['limit']} examples]" if r.get("limit") not in (None, 100) and t else "")
        lines.append(
            f"| {recipe} | {r['healing']} | {removed} | {acc(t, 'piqa/acc')} | {acc(t, 'arc_easy/acc')} "
            f"| {acc(t, 'lambada_openai/acc')} | {mean} | {ppl} | {fmt(r['kl'], '.3f')} "
            f"| {fmt(r['top1'] and r['top1'] * 100, '.1f')}{'%' if r['top1'] is not None else ''} "
            f"| {pair('stability', '.2f')} | {pair('agreement', '.2f')} | {fmt(r['params'], ',')} "
            f"| {r.get('select_note') or fmt(r['select'], '.0f')} | {fmt(r['repair'], '.0f')} | {fmt(r['heal'], '.0f')} "
            f"| {fmt(r['eval'], '.0f')} | {fmt(r['cpu'], '.0f')} | {fmt(r['wall'], '.0f')} "
            f"| {fmt(r['rss'] and r['rss'] / 2**30, '.2f')} | {r['folder']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(RESULTS), help="the folder holding the frontier* result folders")
    args = ap.parse_args(argv)
    print(table(Path(args.results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

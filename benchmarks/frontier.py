"""The quality frontier on the embedded SmolLM2-135M: every selection x repair, unhealed.

For each plan SELECTION+REPAIR[:FIELD=VALUE...] (fields of LinearRepairOptions or SearchOptions,
or ``gate_FIELD`` for a GateOptions field), remove ``--remove`` layers as ``layerfold compress
--select SELECTION --repair REPAIR`` would (the same registry: make_plan / apply_plan), then
measure, with no training of the model's weights (``gates``, FoldGPT's selection, trains its
layer gates once with the library's default GateOptions, as ``compress --select gates`` does;
cached in ``--work`` and checkpointed every 10 steps, so a stopped run resumes):

- held-out fit: KL to the original, top-1 agreement and perplexity on the held-out rows
  (8 x 256 self-written tokens, seed 2; ``layerfold.eval.heldout``), what ``--method auto`` ranks by;
- tasks (``--tasks``): PIQA, ARC-Easy and LAMBADA (last-word accuracy and per-token perplexity of
  the continuation) on the first ``--limit`` examples, with stability against the original;
  LAMBADA text perplexity on the first ``--ppl-docs`` documents (window 512);
- stored parameters and time per stage (selection, repair, evaluation).

Calibration: 32 x 256 self-written tokens (seed 0), the compress default. Results go to
``--work/PLAN.json``; a plan whose file exists is not rerun, so the script can be stopped and
resumed.

    python benchmarks/frontier.py run bi+none bi+linear sleb+none laco+merge ...
    python benchmarks/frontier.py run --tasks bi+none ...         # also the task suite
    python benchmarks/frontier.py run gates+none gates+linear     # gate training first (tens of minutes)
    python benchmarks/frontier.py table > rows.md
    python benchmarks/frontier.py run --gates-from SCORES.json gates+none:gate_steps=40   # gates reused

``--gates-from FILE`` seeds the gates' cache from gates already trained by ``layerfold analyze
--gates --remove N [--gate-... options] --json FILE`` (its ``gates_*`` fields) instead of
training them again: only for a plan whose cache file does not exist yet, and only if the
file's gate options are the plan's (a field the file lacks, added to GateOptions after it was
written, must be at its default; it is named in the seeded file's ``reused.missing_options``)
and it removes ``--remove`` layers of a model of the same depth. The seeded ``seconds`` are the
original training's, from ``--gates-seconds`` or else the ``seconds`` of foldgpt.py's run record
``gates.json`` beside FILE; the seeded file's ``reused`` says where they come from.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from layerfold import schema
from layerfold.data.calibration import CalibrationSpec, load_calibration
from layerfold.errors import LayerfoldError
from layerfold.eval import evaluate
from layerfold.eval.heldout import compare_to_reference, heldout_ids, reference_log_probs
from layerfold.importance import measure_similarity
from layerfold.importance.gates import GateOptions, GateResult, gate_ranking
from layerfold.methods.registry import SELECTIONS, Evidence, SelectionOptions, apply_plan, make_plan
from layerfold.methods.replaceme import LinearRepairOptions
from layerfold.methods.search import SearchOptions
from layerfold.methods.streamline import StreamlineOptions, training_text
from layerfold.models.loading import load_model
from layerfold.models.surgery import count_parameters
from layerfold.recipe import CompressOptions
from layerfold.report.record import streamline_record

TASKS = ["piqa", "arc_easy", "lambada_openai"]


def parse_plan(spec: str, remove: int) -> CompressOptions:
    """SELECTION+REPAIR[:FIELD=VALUE...], the fields of LinearRepairOptions or SearchOptions, or
    gate_FIELD for a GateOptions field (the prefix keeps its steps/lr/seed apart from the others').
    Each FIELD=VALUE is read as the recipe's ``--set GROUP.FIELD=VALUE`` is, by the options schema."""
    head, *pairs = spec.split(":")
    selection, _, repair = head.partition("+")
    groups = {"linear": LinearRepairOptions, "search": SearchOptions, "repair": StreamlineOptions}
    where = {"linear": "linear", "search": "search", "repair": "repair", "gates": "foldgpt.gates"}  # recipe groups
    # a replacement plan's fields are the repair group's first (its loss, lr, seed are its own)
    order = ("repair", "linear", "search") if repair == "replacement" else ("linear", "search", "repair")
    values = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key.startswith("gate_"):
            group, key = "gates", key[len("gate_"):]
            if key not in {f.name for f in fields(GateOptions)}:
                raise SystemExit(f"unknown GateOptions field {key!r}")
        else:
            group = next((g for g in order if key in {f.name for f in fields(groups[g])}), None)
        if group is None:
            raise SystemExit(f"unknown LinearRepairOptions, SearchOptions or StreamlineOptions field {key!r}")
        try:
            path, parsed = schema.parse_assignment(CompressOptions, f"{where[group]}.{key}={value}")
        except LayerfoldError as e:
            raise SystemExit(f"{spec}: {e}") from None
        values[path] = parsed
    opts = CompressOptions(selection=SelectionOptions(select=selection, repair=repair or "none", remove=remove),
                           progress=False)
    return schema.with_values(opts, values)


def search_key(opts: CompressOptions) -> str:
    """The search options that differ from the defaults, for the search's cache file name."""
    default = SearchOptions()
    return "".join(f":{f.name}={getattr(opts.search, f.name)}" for f in fields(SearchOptions)
                   if getattr(opts.search, f.name) != getattr(default, f.name))


def gate_key(opts: CompressOptions) -> str:
    """The gate options that differ from the defaults, for the gates' cache file name."""
    default, gates = GateOptions(), opts.foldgpt.gates
    return "".join(f":gate_{f.name}={getattr(gates, f.name)}" for f in fields(GateOptions)
                   if getattr(gates, f.name) != getattr(default, f.name))


def seed_gates(scores_path: Path, opts: GateOptions, remove: int, num_layers: int,
               seconds: float | None = None) -> dict:
    """The record ``Bench.gates`` caches, built from an ``analyze --gates --json`` scores file
    (see the module docstring: ``--gates-from``). Refuses gates trained with other options,
    for another budget or another depth."""
    d = json.loads(Path(scores_path).read_text())
    if "gates" not in d:
        raise SystemExit(f"{scores_path}: no gates (write it with layerfold analyze --gates --json)")
    saved, wanted = d.get("gates_options") or {}, asdict(opts)
    differ = {k: (saved[k], wanted[k]) for k in saved if k in wanted and saved[k] != wanted[k]}
    unknown = sorted(k for k in saved if k not in wanted)
    missing = sorted(k for k in wanted if k not in saved)
    default = asdict(GateOptions())
    off_default = {k: wanted[k] for k in missing if wanted[k] != default[k]}
    if differ or unknown or off_default:
        raise SystemExit(f"{scores_path}: gates trained with other options: differ {differ}, unknown {unknown}, "
                         f"not in the file and not at their defaults {off_default}")
    if d["num_layers"] != num_layers or len(d["gates"]) != num_layers:
        raise SystemExit(f"{scores_path}: gates of a {d['num_layers']}-layer model; this one has {num_layers}")
    if len(d["gates_removed"]) != remove:
        raise SystemExit(f"{scores_path}: the gates remove {len(d['gates_removed'])} layers, the run {remove}")
    source = "--gates-seconds"
    if seconds is None:
        record = Path(scores_path).with_name("gates.json")  # foldgpt.py's record of the analyze run
        if not record.exists():
            raise SystemExit(f"{scores_path}: give --gates-seconds (no foldgpt.py record {record})")
        seconds, source = float(json.loads(record.read_text())["seconds"]), str(record)
    rounds: dict[int, list] = {}
    for rec in d.get("gates_log") or []:
        rounds.setdefault(rec["round"], []).append({k: v for k, v in rec.items() if k != "round"})
    return {"gates": d["gates"], "removed": d["gates_removed"], "scores": d.get("gates_scores") or [],
            "check": d.get("gates_check"), "swaps": d.get("gates_swaps"),
            "rounds": [{"log": rounds[r]} for r in sorted(rounds)], "options": {**wanted, **saved},
            "seconds": seconds,
            "reused": {"from": str(scores_path), "seconds_from": source, "missing_options": missing,
                       "note": "gates trained by another run, not here; seconds are that run's"}}


def read_gates(path: Path) -> tuple[GateResult, float]:
    """The cached gates (``Bench.gates``' file) and the seconds their training took."""
    d = json.loads(Path(path).read_text())
    nan = lambda xs: [float("nan") if x is None else x for x in xs]  # noqa: E731
    return GateResult(nan(d["gates"]), list(d["removed"]), d["rounds"], d["options"], nan(d["scores"]),
                      d["check"], d["swaps"]), d["seconds"]


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        if args.tasks:  # a missing data folder is an error now, not after the first plan's minutes
            from layerfold.eval.tasks import resolve_task_path

            for name in TASKS:
                resolve_task_path(name)
        t = time.perf_counter()
        self.loaded = load_model(None)
        self.load_seconds = time.perf_counter() - t
        spec = CalibrationSpec()
        self.calib = load_calibration(spec, self.loaded, progress=False)
        self.heldout = heldout_ids(spec, self.loaded, progress=False)
        self.reference = reference_log_probs(self.loaded.model, self.heldout)
        self._scores = None
        self._original = None

    def scores(self):
        if self._scores is None:
            t = time.perf_counter()
            self._scores = measure_similarity(self.loaded.model, self.loaded.arch, self.calib, progress=False)
            self.score_seconds = time.perf_counter() - t
        return self._scores

    def evidence(self, selection: str, opts: CompressOptions) -> tuple[Evidence, float]:
        sel = SELECTIONS[selection]
        if sel.needs == "scores":
            self.scores()
            return Evidence(scores=self._scores), self.score_seconds
        if sel.needs == "search":  # cached per selection: every repair reuses its choice
            path = self.work / f"search-{selection}{search_key(opts)}-remove{self.args.remove}.json"
            if not path.exists():
                t = time.perf_counter()
                found = sel.search(self.loaded.model, self.loaded.arch, self.calib, self.args.remove, opts.search,
                                   progress=True)
                found["seconds"] = time.perf_counter() - t
                path.write_text(json.dumps(found, indent=1))
            found = json.loads(path.read_text())
            return Evidence(search=found), found["seconds"]
        if sel.needs == "gates":  # trained once per gate setting: every repair reuses the choice
            return self.gates(opts)
        return Evidence(), 0.0

    def gates(self, opts: CompressOptions) -> tuple[Evidence, float]:
        """FoldGPT's gates as ``compress --select gates`` trains them (same calibration rows, the
        same held-out rows for its check against Block Influence); the result is cached."""
        name = f"gates{gate_key(opts)}-remove{self.args.remove}"
        path = self.work / f"search-{name}.json"  # "search-" keeps it out of the table's rows
        if not path.exists() and self.args.gates_from:
            from layerfold.models.surgery import decoder_layers

            n = len(decoder_layers(self.loaded.model, self.loaded.arch))
            seeded = seed_gates(Path(self.args.gates_from), opts.foldgpt.gates, self.args.remove, n,
                                self.args.gates_seconds)
            path.write_text(json.dumps(seeded, indent=1))
            print(f"{name}: gates reused from {self.args.gates_from} (removed {seeded['removed']}, "
                  f"{seeded['seconds']:.0f} s of training, not run here)", flush=True)
        if not path.exists():
            from layerfold.train.loop import Checkpoints

            t = time.perf_counter()
            g = gate_ranking(self.loaded.model, self.loaded.arch, self.calib, self.args.remove, opts.foldgpt.gates,
                             heldout=self.heldout, progress=True,
                             checkpoints=Checkpoints(str(Path(self.args.checkpoints or self.work) / f"{name}.ckpt"),
                                                     10, True))
            # a resumed run's seconds are this process's only; the log's steps say where it resumed
            path.write_text(json.dumps(g.to_dict() | {"seconds": time.perf_counter() - t,
                                                      "load_average": os.getloadavg()[0]}, indent=1))
        gates, seconds = read_gates(path)
        return Evidence(gates=gates), seconds

    def original(self):
        path = self.work / f"original-limit{self.args.limit}.json"
        if self._original is None:
            if path.exists():
                from layerfold.eval import EvalResult

                self._original = EvalResult.load(path)
            else:
                self._original = self.tasks(self.loaded.model, None)
                self._original.save(path)
        return self._original

    def tasks(self, model, reference):
        return evaluate(model, self.loaded.tokenizer, tasks=TASKS, ppl=["lambada_openai"], limit=self.args.limit,
                        ppl_limit=self.args.ppl_docs, batch_size=8, reference=reference, speed=False)

    def build(self, spec: str, fit: bool = True) -> tuple[dict, torch.nn.Module]:
        """The plan applied to a copy of the original, and its held-out fit (unless ``fit`` is False:
        a rebuild for the tasks of a plan whose fit is already recorded)."""
        opts = parse_plan(spec, self.args.remove)
        selection = opts.selection.select
        evidence, select_seconds = self.evidence(selection, opts)
        plan = make_plan(opts, self.loaded.model, self.loaded.arch, evidence)
        ids, data_seconds = self.calib, 0.0
        if plan.repair == "replacement" and opts.repair.spec.trainable:
            # its own training text, as compress writes it (written by the original; cached)
            t = time.perf_counter()
            ids = training_text(opts.repair, self.loaded, self.calib, progress=False)
            data_seconds = time.perf_counter() - t
        work = replace(self.loaded, model=copy.deepcopy(self.loaded.model))
        t = time.perf_counter()
        # the replacement's training pairs (~170 MB) go to a scratch folder, not the results
        with tempfile.TemporaryDirectory(prefix="frontier-", dir=self.args.checkpoints) as scratch:
            applied = apply_plan(plan, work, ids, opts, evidence=evidence, work_dir=Path(scratch))
        repair_seconds = time.perf_counter() - t
        t = time.perf_counter()
        if not fit:
            return {"removed": plan.removed}, work.model
        fit = compare_to_reference(work.model, self.heldout, self.reference)
        record = {"plan": spec, "selection": selection, "repair": plan.repair, "removed": plan.removed,
                  "params": count_parameters(work.model), "params_before": plan.params_before,
                  "heldout": fit.to_dict(), "seconds": {"select": select_seconds, "train_data": data_seconds, "repair": repair_seconds,
                                                         "heldout": time.perf_counter() - t},
                  "linear": applied.linear.to_dict() if applied.linear is not None else None,
                  "merge": applied.merge, "machine": machine(),
                  "streamline": None if applied.streamline is None else
                  streamline_record(opts.repair, applied.streamline) | {"seconds": applied.streamline.seconds,
                                                                        "train_data_seconds": data_seconds},
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        print(f"{spec}: KL {fit.kl:.3f} top1 {fit.top1:.3f} ppl {fit.ppl:.1f}", flush=True)
        return record, work.model

    def run(self, spec: str) -> dict:
        path = self.work / f"{spec}-remove{self.args.remove}.json"
        record = json.loads(path.read_text()) if path.exists() else None
        model = None
        if record is None:
            record, model = self.build(spec)
            path.write_text(json.dumps(record, indent=1))
        if self.args.tasks and "tasks" not in record:
            if model is None:  # rebuilt: a plan costs forward passes, and the same ones again
                fresh, model = self.build(spec, fit=False)
                assert fresh["removed"] == record["removed"], (spec, fresh["removed"], record["removed"])
            t = time.perf_counter()
            result = self.tasks(model, self.original())
            record["tasks"] = result.summary()
            record["seconds"]["tasks"] = time.perf_counter() - t
            record["task_limit"] = self.args.limit
            record["ppl_docs"] = self.args.ppl_docs
            record["peak_rss_mib"] = peak_rss_mib()  # the process's peak so far: run one plan per process
            path.write_text(json.dumps(record, indent=1))
            s = record["tasks"]
            print(f"{spec}: PIQA {s.get('piqa/acc', float('nan')):.3f} ARC-e {s.get('arc_easy/acc', float('nan')):.3f} "
                  f"LAMBADA acc {s.get('lambada_openai/acc', float('nan')):.3f} "
                  f"text ppl {s.get('ppl/lambada_openai', float('nan')):.1f}", flush=True)
        return record


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def recorded_peak(work: Path, record: dict) -> str:
    """The plan's peak RSS: its record's, else that of ``/usr/bin/time -v -o WORK/PLAN.time.txt``."""
    if "peak_rss_mib" in record:
        return f"{record['peak_rss_mib']:,.0f}"
    path = work / f"{record['plan']}.time.txt"
    if path.exists():
        for line in path.read_text().splitlines():
            if "Maximum resident set size" in line:
                return f"{int(line.split(':')[-1]) / 1024:,.0f}"
    return "-"


def machine() -> dict:
    import os

    return {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load_average": os.getloadavg()[0]}


def table(work: Path, remove: int) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(work.glob(f"*-remove{remove}.json"))
            if not p.name.startswith("search-")]
    rows.sort(key=lambda r: r["heldout"]["kl"])
    original = next(iter(sorted(work.glob("original-limit*.json"))), None)
    orig = json.loads(original.read_text())["summary"] if original else {}
    head = ("| plan | removed | held-out KL | top-1 | held-out ppl | PIQA | ARC-e | LAMBADA acc | LAMBADA ppl "
            "| text ppl (x orig) | stability PIQA/ARC | params | select s | repair s | tasks s | peak RSS MiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    if orig:
        lines.append(f"| original | - | 0 | 1 | {rows[0]['heldout']['reference_ppl']:.1f} | {orig['piqa/acc']:.3f} "
                     f"| {orig['arc_easy/acc']:.3f} | {orig['lambada_openai/acc']:.3f} "
                     f"| {orig['lambada_openai/perplexity']:.1f} | {orig['ppl/lambada_openai']:.1f} (1.00) | - "
                     f"| {rows[0]['params_before']:,} | - | - | - | - |")
    for r in rows:
        h, t = r["heldout"], r.get("tasks") or {}
        ratio = t.get("ppl/lambada_openai", float("nan")) / orig.get("ppl/lambada_openai", float("nan")) if orig else float("nan")
        cell = lambda k, f="{:.3f}": f.format(t[k]) if k in t else "-"  # noqa: E731
        stab = f"{cell('piqa/stability', '{:.2f}')}/{cell('arc_easy/stability', '{:.2f}')}"
        tasks_s = f"{r['seconds']['tasks']:.0f}" if "tasks" in r["seconds"] else "-"
        # one f-string per row: a conditional between implicitly joined strings used to drop the
        # first eleven columns of every row without tasks
        lines.append(f"| {r['plan']} | {','.join(map(str, r['removed']))} | {h['kl']:.3f} | {h['top1']:.3f} "
                     f"| {h['ppl']:.1f} | {cell('piqa/acc')} | {cell('arc_easy/acc')} | {cell('lambada_openai/acc')} "
                     f"| {cell('lambada_openai/perplexity', '{:.1f}')} | {cell('ppl/lambada_openai', '{:.1f}')}{f' ({ratio:.2f})' if t else ''} "
                     f"| {stab} | {r['params']:,} | {r['seconds']['select']:.0f} | {r['seconds']['repair']:.0f} "
                     f"| {tasks_s} | {recorded_peak(work, r)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["run", "table"])
    ap.add_argument("plans", nargs="*")
    ap.add_argument("--remove", type=int, default=8)
    ap.add_argument("--tasks", action="store_true", help="also PIQA, ARC-Easy, LAMBADA")
    ap.add_argument("--limit", type=int, default=200, help="examples of each task")
    ap.add_argument("--ppl-docs", type=int, default=100, help="LAMBADA documents for text perplexity")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoints", help="folder of the gate training's checkpoints (default: --work)")
    ap.add_argument("--gates-from", metavar="SCORES_JSON",
                    help="seed the gates' cache from analyze --gates --json's file instead of training them")
    ap.add_argument("--gates-seconds", type=float,
                    help="with --gates-from: the seconds that gate training took (default: foldgpt.py's gates.json)")
    ap.add_argument("--work", default=str(Path(__file__).parent / "results" / "frontier"))
    args = ap.parse_intermixed_args()  # plans may come after the options
    torch.set_num_threads(args.threads)
    if args.command == "table":
        print(table(Path(args.work), args.remove))
        return
    bench = Bench(args)
    for spec in args.plans:
        bench.run(spec)


if __name__ == "__main__":
    main()

"""FoldGPT on the embedded SmolLM2-135M against Block Influence, through the command line.

Every variant is the `layerfold` command a user would type (run as a subprocess, so each
row is exactly that command's output), then `layerfold eval` of the saved folder against one
evaluation of the original:

    python benchmarks/foldgpt.py run original gates foldgpt bi19-cure    # in this order
    python benchmarks/foldgpt.py heldout                                 # held-out KL of each saved model
    python benchmarks/foldgpt.py table                                   # the Markdown table
    python benchmarks/foldgpt.py commands                                # every command, as run
    python benchmarks/foldgpt.py full-eval foldgpt-mean-d16              # every task for a --quick row
    python benchmarks/foldgpt.py plot-gates gates gates-cold             # gate values per step -> foldgpt_gates.png

``gates`` trains FoldGPT's gates once (`layerfold analyze --gates --json`); every FoldGPT
variant plans from that file (`compress --scores`), so the gates are trained once and shared.
A variant whose result file exists is not rerun. Models go to ``--models`` (not committed),
results (`VARIANT.json`: command, exit code, wall time, the output's layerfold.json figures,
file size; `VARIANT.eval.json`: the `layerfold eval` result) to ``--work``.

Settings are kept small for shared cores (say so in the note): 100 examples per task, LAMBADA
text perplexity on 100 documents, a cure of 16 steps x 4 sequences x 256 tokens (two passes
over 32 self-written sequences, seed 1), gates 40 steps of 2 rows. ``--quick`` evaluates
LAMBADA only (last-word accuracy and text perplexity), for rows that must finish sooner.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

TASKS = ["piqa", "arc_easy", "boolq", "winogrande"]
LAMBADA = "lambada_openai"
LIMIT, PPL_DOCS = 100, 100
GATE_STEPS = 40
CURE = ["--cure-steps", "16", "--cure-batch-size", "4", "--cure-samples", "32"]
FOLD = ["--method", "foldgpt", "--remove", "8", "--scores", "{gates}"]
# BI + the very same cure (the same function, text, steps and losses), no sharing: the equal-size
# baseline removes 19 layers (11 left: as many stored layer matrices as FoldGPT's 11 shared pairs)
BI_CURED = ["--method", "foldgpt", "--select", "bi", "--group-size", "1"]

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "original": ("eval", []),
    "gates": ("analyze", ["--gates", "--remove", "8", "--gate-steps", str(GATE_STEPS)]),
    # the same without the warm start from Block Influence (every log a starts at 3, target ramped)
    "gates-cold": ("analyze", ["--gates", "--remove", "8", "--gate-steps", str(GATE_STEPS),
                               "--gate-warm-start", "none"]),
    "gates-cold-choice": ("compress", ["--method", "foldgpt", "--remove", "8", "--scores", "{gates-cold}",
                                       "--group-size", "1", "--cure-steps", "0"]),
    # the gates' choice without any weight training (no sharing, no cure)
    "gates-choice": ("compress", [*FOLD, "--group-size", "1", "--cure-steps", "0"]),
    "bi8": ("compress", ["--method", "bi", "--remove", "8", "--no-heal"]),
    # FoldGPT complete: remove 8, share adjacent pairs, cure
    "foldgpt": ("compress", [*FOLD, *CURE]),
    "foldgpt-mean": ("compress", [*FOLD, "--share-init", "mean", *CURE]),
    "foldgpt-lora": ("compress", [*FOLD, *CURE, "--cure-lora-rank", "16"]),
    # where it loses: the same without the cure; the cure without sharing
    "foldgpt-nocure": ("compress", [*FOLD, "--cure-steps", "0"]),
    "foldgpt-mean-nocure": ("compress", [*FOLD, "--share-init", "mean", "--cure-steps", "0"]),
    "noshare-cure": ("compress", [*FOLD, "--group-size", "1", *CURE]),
    # Block Influence at FoldGPT's stored size, with and without the same cure
    "bi19-cure": ("compress", [*BI_CURED, "--remove", "19", *CURE]),
    "bi19": ("compress", ["--method", "bi", "--remove", "19", "--no-heal"]),
    # per-layer SVD deltas (issue 16 item 4): rank 16 on every member adds 223,872 x 16 stored
    # parameters (about one layer), so the equal-size baseline removes one layer fewer: BI-18
    # (70,793,280 stored) <= FoldGPT-d16 (70,847,808); benchmarks/foldgpt_share_diag.py chose mean
    "foldgpt-mean-d16": ("compress", [*FOLD, "--share-init", "mean", "--delta-rank", "16", *CURE]),
    "bi18-cure": ("compress", [*BI_CURED, "--remove", "18", *CURE]),
    # the same two with the LoRA cure (rank 16 on each shared tensor once, merged once; the deltas,
    # norms and biases train too; lr 5e-4, the LoRA default): the stored size does not change
    "foldgpt-mean-d16-lora": ("compress", [*FOLD, "--share-init", "mean", "--delta-rank", "16", *CURE,
                                           "--cure-lora-rank", "16"]),
    "bi18-lora": ("compress", [*BI_CURED, "--remove", "18", *CURE, "--cure-lora-rank", "16"]),
}


def layerfold(*args: str) -> list[str]:
    return [sys.executable, "-m", "layerfold", "-q", *args]


class Runner:
    def __init__(self, work: Path, models: Path):
        self.work, self.models = work, models
        work.mkdir(parents=True, exist_ok=True)
        models.mkdir(parents=True, exist_ok=True)
        self.gates = work / "gates.scores.json"

    def command(self, name: str) -> list[str]:
        kind, args = VARIANTS[name]
        args = [a.replace("{gates}", str(self.gates)).replace("{gates-cold}", str(self.scores_path("gates-cold")))
                for a in args]
        if kind == "eval":  # the original: always every task (the reference of both modes)
            return layerfold("eval", *Runner.eval_args(Runner.__new__(Runner)), "--json",
                             str(self.work / "original.eval.json"))
        if kind == "analyze":
            return layerfold("analyze", *args, "--json", str(self.scores_path(name)))
        return layerfold("compress", *args, "--no-eval", "-o", str(self.models / name), "--force")

    def scores_path(self, name: str) -> Path:
        """``gates``' file is the one every FoldGPT variant plans from; other gate runs have their own."""
        return self.gates if name == "gates" else self.work / f"{name}.scores.json"

    quick = False  # --quick: LAMBADA only (last-word accuracy and text perplexity), no multiple-choice tasks

    def eval_args(self) -> list[str]:
        tasks = [LAMBADA] if self.quick else [*TASKS, LAMBADA]
        return ["--tasks", ",".join(tasks), "--ppl", LAMBADA, "--limit", str(LIMIT),
                "--ppl-limit", str(PPL_DOCS), "--no-speed"]

    def run(self, name: str) -> None:
        path = self.work / f"{name}.json"
        if path.exists():
            print(f"== {name}: done before ({path})", flush=True)
            return
        running = self.work / f"{name}.running"
        if running.exists():
            print(f"== {name}: another runner has it ({running})", flush=True)
            return
        running.write_text(str(os.getpid()))
        try:
            self._run(name, path)
        finally:
            running.unlink(missing_ok=True)

    def _run(self, name: str, path: Path) -> None:
        kind = VARIANTS[name][0]
        built = self.work / f"{name}.built.json"  # a compress that finished; its evaluation may not have
        if kind == "compress" and built.exists() and (self.models / name / "layerfold.json").exists():
            print(f"== {name}: built before ({built}), evaluating", flush=True)
            record = json.loads(built.read_text())
        else:
            cmd = self.command(name)
            print(f"== {name}: {shlex.join(cmd[2:])}", flush=True)
            record = {"variant": name, "quick": self.quick, "command": "layerfold " + shlex.join(cmd[3:]),
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            record.update(seconds=time.perf_counter() - t, exit_code=proc.returncode, stdout=proc.stdout,
                          stderr=proc.stderr[-4000:])
            if proc.returncode != 0:
                print(proc.stdout, proc.stderr, sep="\n", flush=True)
                (self.work / f"{name}.failed.json").write_text(json.dumps(record, indent=1))
                raise SystemExit(f"{name} failed")
            if kind == "compress":
                built.write_text(json.dumps(record, indent=1, default=str))
        record["quick"] = self.quick
        if kind == "analyze":
            scores = json.loads(self.scores_path(name).read_text())
            record.update(removed=scores["gates_removed"], check=scores["gates_check"], gates=scores["gates"])
        if kind == "compress":
            out = self.models / name
            made = json.loads((out / "layerfold.json").read_text())
            record.update(removed=made["recipe"]["removed_layers"], params_before=made["params_before"],
                          params_stored=made["params_after"], seconds_by_stage=made["seconds"],
                          bytes=sum(p.stat().st_size for p in out.glob("*.safetensors")),
                          cure=made.get("cure"), groups=made["recipe"].get("groups"),
                          gate_check=(made.get("gates") or {}).get("check"), peak_rss_mib=made.get("peak_rss_mib"))
            reference = self.work / "original.eval.json"
            while not reference.exists():  # another runner process evaluates the original
                time.sleep(20)
            ecmd = layerfold("eval", str(out), *self.eval_args(), "--reference",
                             str(self.work / "original.eval.json"), "--json", str(self.work / f"{name}.eval.json"))
            record["eval_command"] = "layerfold " + shlex.join(ecmd[3:])
            t = time.perf_counter()
            proc = subprocess.run(ecmd, capture_output=True, text=True)
            record.update(eval_seconds=time.perf_counter() - t, eval_stdout=proc.stdout)
            if proc.returncode != 0:
                print(proc.stdout, proc.stderr, sep="\n", flush=True)
                raise SystemExit(f"{name}: evaluation failed")
        path.write_text(json.dumps(record, indent=1, default=str))
        print(proc.stdout[-3000:], flush=True)


def full_eval(runner: Runner, names: list[str]) -> None:
    """Every task (the default evaluation) for rows built and evaluated with ``--quick``: the
    saved folder again through ``layerfold eval``, to ``NAME.full.eval.json`` (which ``table``
    prefers); the command and its wall time go into ``NAME.json``. The folder is not rebuilt."""
    full = Runner(runner.work, runner.models)  # quick = False: every task
    for name in names:
        rec_path, out = runner.work / f"{name}.json", runner.work / f"{name}.full.eval.json"
        folder = runner.models / name
        if out.exists() or not rec_path.exists():
            print(f"== {name}: " + ("done before" if out.exists() else f"not built ({rec_path} missing)"), flush=True)
            continue
        if not (folder / "layerfold.json").exists():
            raise SystemExit(f"{name}: no saved model in {folder} (give --models)")
        ecmd = layerfold("eval", str(folder), *full.eval_args(), "--reference",
                         str(runner.work / "original.eval.json"), "--json", str(out))
        print(f"== {name}: {shlex.join(ecmd[2:])}", flush=True)
        t = time.perf_counter()
        proc = subprocess.run(ecmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, sep="\n", flush=True)
            raise SystemExit(f"{name}: evaluation failed")
        rec = json.loads(rec_path.read_text())
        rec.update(full_eval_command="layerfold " + shlex.join(ecmd[3:]), full_eval_seconds=time.perf_counter() - t,
                   full_eval_date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        rec_path.write_text(json.dumps(rec, indent=1, default=str))
        print(proc.stdout[-3000:], flush=True)


def heldout(work: Path, models: Path, names: list[str]) -> None:
    """KL to the original, top-1 agreement and perplexity on the 8 held-out rows of
    self-written text (``layerfold.eval.heldout``, the metric of the gate check), for every
    saved variant; cheap (one forward pass of 2,048 tokens each)."""
    from layerfold.data.calibration import CalibrationSpec
    from layerfold.eval.heldout import compare_to_reference, heldout_ids, reference_log_probs
    from layerfold.models.loading import load_model

    original = load_model(None)
    ids = heldout_ids(CalibrationSpec(), original, progress=False)
    ref = reference_log_probs(original.model, ids)
    for name in names:
        folder, path = models / name, work / f"{name}.heldout.json"
        if path.exists() or not (folder / "layerfold.json").exists():
            continue
        fit = compare_to_reference(load_model(str(folder)).model, ids, ref).to_dict()
        path.write_text(json.dumps(fit, indent=1))
        print(name, fit, flush=True)


def curves(work: Path, models: Path, names: list[str]) -> str:
    """The cure's training loss per step, side by side (the same rows in the same order for
    every variant: the same seeds), from each folder's training_log.jsonl (or a copy in
    ``work/NAME.cure-log.jsonl``, e.g. of a run still going)."""
    logs = {}
    for name in names:
        for path in (models / name / "training_log.jsonl", work / f"{name}.cure-log.jsonl"):
            if path.exists():
                logs[name] = {r["step"]: r for r in map(json.loads, path.read_text().splitlines())
                              if r.get("event") == "step"}
                break
    names = [n for n in names if n in logs]
    steps = sorted({s for log in logs.values() for s in log})
    lines = ["| step | " + " | ".join(f"{n} KL | {n} tail MSE" for n in names) + " |",
             "|---:|" + "---:|---:|" * len(names)]
    for step in steps:
        cells = []
        for n in names:
            r = logs[n].get(step)
            cells += [f"{r['loss_kl']:.3f}", f"{r['loss_mse']:.3f}"] if r else ["-", "-"]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_gates(work: Path, names: list[str], out: Path) -> None:
    """The deterministic gates clip(sigmoid(log a) * 1.2 - 0.1, 0, 1) at every step, BEFORE the
    final top-k (red: the layers finally removed), from each gate run's step log
    (``gates_log`` of ``layerfold analyze --gates --json``), one panel per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for name in names:
        path = work / ("gates.scores.json" if name == "gates" else f"{name}.scores.json")
        if path.exists() and json.loads(path.read_text()).get("gates_log"):
            runs.append((name, json.loads(path.read_text())))
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False)
    for ax, (name, d) in zip(axes[0], runs):
        log = d["gates_log"]
        steps = [e["step"] for e in log]
        removed = set(d["gates_removed"])
        last = log[-1]["gates"]
        # dashed: a layer the swap refinement (after training) moved across the boundary
        moved = {l for l, g in enumerate(last) if (l in removed) != (g < 0.5)}
        for l, values in enumerate(zip(*[e["gates"] for e in log])):
            ax.plot(steps, values, color="tab:red" if l in removed else "tab:blue", lw=1.4 if l in moved else 0.8,
                    ls="--" if l in moved else "-", alpha=0.8)
        undecided = sum(0.01 < g < 0.99 for g in last)
        o = d["gates_options"]
        ax.axvline(o.get("polarise", 1) * o["steps"], color="grey", ls=":", lw=0.8)
        swaps = [a["move"] for a in (d.get("gates_swaps") or {}).get("accepted", [])]
        ax.set(title=f"{name}: {o['gate_type']}, warm start {o['warm_start']}\n"
                     f"{undecided} of {len(last)} gates in (0.01, 0.99) at step {steps[-1]}"
                     + (f"\nthen swaps (dashed): {'; '.join(swaps)}" if swaps else ""),
               xlabel="step (dotted: polarising multiplier starts)", ylabel="deterministic gate",
               ylim=(-0.05, 1.05))
    axes[0][0].plot([], [], color="tab:red", label="layers removed")
    axes[0][0].plot([], [], color="tab:blue", label="layers kept")
    axes[0][0].legend(loc="center left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"plot written to {out}")


def table(work: Path, names: list[str], models: Path | None = None) -> str:
    from layerfold.eval import EvalResult

    ref = EvalResult.load(work / "original.eval.json")
    head = ["variant", "layers removed", "stored params", "file MiB", *TASKS, "mean acc", "LAMBADA acc",
            "LAMBADA text ppl", "stability", "agreement", "held-out KL", "build s (shared)", "of which cure s",
            "build peak RSS MiB"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for name in names:
        if name in ("gates", "gates-cold"):
            continue
        if name == "original":
            ev, rec = ref, {"removed": [], "params_stored": ref.cost.parameters if ref.cost else None}
        else:
            p = work / f"{name}.json"
            if p.exists():
                rec = json.loads(p.read_text())
                full = work / f"{name}.full.eval.json"  # every task, evaluated after a --quick row
                ev = EvalResult.load(full if full.exists() else work / f"{name}.eval.json")
            elif models is not None and (models / name / "layerfold.json").exists():  # built, not evaluated yet
                made = json.loads((models / name / "layerfold.json").read_text())
                rec = {"removed": made["recipe"]["removed_layers"], "params_stored": made["params_after"],
                       "bytes": sum(f.stat().st_size for f in (models / name).glob("*.safetensors")),
                       "seconds_by_stage": made["seconds"], "seconds": sum(made["seconds"].values()),
                       "peak_rss_mib": made.get("peak_rss_mib")}
                ev = None
            else:
                continue
        fit_path = work / f"{name}.heldout.json"
        fit = json.loads(fit_path.read_text()) if fit_path.exists() else ({"kl": 0.0} if name == "original" else None)
        if ev is not None and any(t not in ev.tasks for t in TASKS):  # a --quick row: LAMBADA only
            accs, stab, agree = [], [None], [None]
        else:
            accs = [ev.tasks[t].metrics["acc"] for t in TASKS] if ev else []
            stab = [ev.tasks[t].metrics.get("stability") for t in TASKS] if ev else [None]
            # unweighted: stability's confidence weights rest on 1 of PIQA's 100 examples and 2 of ARC-Easy's
            agree = [ev.tasks[t].metrics.get("agreement") for t in TASKS] if ev else [None]
        cure = (rec.get("seconds_by_stage") or {}).get("cure")
        removed = rec.get("removed") or []
        cells = [name, ",".join(map(str, removed)) or "-",
                 f"{rec['params_stored']:,}" if rec.get("params_stored") else "-",
                 f"{rec['bytes'] / 2**20:.1f}" if rec.get("bytes") else "-",
                 *((f"{100 * a:.0f}" for a in accs) if accs else ["-"] * len(TASKS)),
                 f"{100 * sum(accs) / len(accs):.1f}" if accs else "-",
                 f"{100 * ev.tasks[LAMBADA].metrics['acc']:.0f}" if ev else "-",
                 f"{ev.perplexity[LAMBADA].perplexity:.1f}" if ev else "-",
                 f"{sum(stab) / len(stab):.3f}" if None not in stab else "-",
                 f"{sum(agree) / len(agree):.3f}" if None not in agree else "-",
                 f"{fit['kl']:.3f}" if fit else "-", f"{rec['seconds']:.0f}" if name != "original" else "-", f"{cure:.0f}" if cure else "-",
                 f"{rec['peak_rss_mib']:,.0f}" if rec.get("peak_rss_mib") else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["run", "full-eval", "table", "commands", "heldout", "curves", "plot-gates"])
    ap.add_argument("variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--work", default="benchmarks/results/foldgpt")
    ap.add_argument("--quick", action="store_true", help="evaluate LAMBADA only (no multiple-choice tasks)")
    ap.add_argument("--plot", default="benchmarks/foldgpt_gates.png", help="plot-gates: the figure's path")
    ap.add_argument("--models", default=os.environ.get("LAYERFOLD_BENCH_MODELS", "/tmp/foldgpt-models"))
    args = ap.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    runner = Runner(Path(args.work), Path(args.models))
    runner.quick = args.quick
    evaluates = args.action == "full-eval" or (args.action == "run" and any(
        VARIANTS[v][0] in ("eval", "compress") for v in args.variants))
    if evaluates:  # a task file that cannot be found fails now, not after a 30-minute build
        from layerfold.eval.tasks import resolve_task_path
        from layerfold.errors import LayerfoldError

        try:
            for task in (LAMBADA,) if args.quick else (*TASKS, LAMBADA):
                resolve_task_path(task)
        except LayerfoldError as e:
            raise SystemExit(f"{e} (export LAYERFOLD_DATA=/work/shared/data)")
    if args.action == "run":
        (runner.work / "machine.json").write_text(json.dumps({
            "platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
            "omp_threads": os.environ.get("OMP_NUM_THREADS")}, indent=1))
        for v in args.variants:
            runner.run(v)
    if args.action == "commands":
        for v in args.variants:
            print(f"{v}: layerfold {shlex.join(runner.command(v)[3:])}")
    if args.action == "curves":
        print(curves(runner.work, runner.models, args.variants))
    if args.action == "plot-gates":  # e.g. plot-gates gates gates-cold
        plot_gates(runner.work, args.variants, Path(args.plot))
    if args.action == "full-eval":
        full_eval(runner, args.variants)
    if args.action == "heldout":
        heldout(runner.work, runner.models, args.variants)
    if args.action in ("run", "table"):
        print(table(runner.work, args.variants, runner.models))


if __name__ == "__main__":
    main()

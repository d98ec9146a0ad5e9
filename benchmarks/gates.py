"""FoldGPT's gate ranking against Block Influence on the embedded SmolLM2-135M (no weight training).

For each gate variant: train the gates (every weight frozen) to remove ``--remove`` layers on
the calibration text (32 x 256 self-written tokens, seed 0), then score the chosen layers the
way ``layerfold`` checks them: KL to the original on the held-out rows (8 x 256, seed 2,
``layerfold.eval.heldout``) and LAMBADA text perplexity (first 100 documents, window 512,
as ``layerfold eval --ppl lambada_openai --ppl-limit 100``), beside Block Influence's choice
of the same number of layers.

    python benchmarks/gates.py run hard-concrete topk soft        # one result file per variant
    python benchmarks/gates.py run "hard-concrete:lr=0.2:steps=200"  # any GateOptions field
    python benchmarks/gates.py table hard-concrete topk soft       # Markdown rows
    python benchmarks/gates.py plot hard-concrete topk soft        # gate values over training
    python benchmarks/gates.py share hard-concrete                 # then pairs sharing weights:
                                                                   # --share-init important vs mean, deltas

A variant is ``GATE_TYPE[:FIELD=VALUE...]``. Results go to ``--work`` as ``VARIANT.json``; a
variant whose file exists is not rerun.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

from layerfold.data.calibration import CalibrationSpec, load_calibration
from layerfold.eval import perplexity, read_documents, resolve_task_path
from layerfold.eval.evaluate import DEFAULT_PPL_WINDOW
from layerfold.eval.heldout import heldout_ids, reference_log_probs
from layerfold.importance import measure_similarity
from layerfold.importance.gates import GateOptions, check_choice, gate_ranking
from layerfold.methods.pruning import block_influence
from layerfold.models.loading import load_model
from layerfold.models.surgery import copy_model, remove_layers

LAMBADA = "lambada_openai"


def parse_variant(spec: str) -> GateOptions:
    gate_type, *pairs = spec.split(":")
    kinds = {f.name: f.type for f in fields(GateOptions)}
    changes = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in kinds:
            raise SystemExit(f"unknown GateOptions field {key!r}")
        kind = kinds[key]
        changes[key] = int(value) if kind in ("int", int) else (value if kind in ("str", str) else float(value))
    return replace(GateOptions(gate_type=gate_type), **changes)


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.docs = read_documents(resolve_task_path(LAMBADA), args.ppl_docs)  # a missing file fails first
        t = time.perf_counter()
        self.loaded = load_model(None)
        self.load_seconds = time.perf_counter() - t
        spec = CalibrationSpec()
        self.calib = load_calibration(spec, self.loaded, progress=False)
        self.heldout = heldout_ids(spec, self.loaded, progress=False)
        self.reference = reference_log_probs(self.loaded.model, self.heldout)

    def lambada(self, removed) -> float:
        pruned = copy_model(self.loaded.model)
        remove_layers(pruned, self.loaded.arch, list(removed))
        ppl = perplexity(pruned, self.loaded.tokenizer, self.docs, window=DEFAULT_PPL_WINDOW, batch_size=4)
        return ppl.perplexity

    def block_influence(self) -> dict:
        path = self.work / f"bi-remove{self.args.remove}.json"
        if path.exists():
            return json.loads(path.read_text())
        t = time.perf_counter()
        scores = measure_similarity(self.loaded.model, self.loaded.arch, self.calib, progress=False)
        removed = block_influence(scores, self.args.remove)
        seconds = time.perf_counter() - t
        check = check_choice(self.loaded.model, self.loaded.arch, self.heldout, {"bi": removed}, self.reference)
        record = {"removed": removed, "block_influence": scores.block_influence, "kl": check["bi"]["kl"],
                  "top1": check["bi"]["top1"], "heldout_ppl": check["bi"]["ppl"],
                  "reference_heldout_ppl": check["reference_ppl"], "lambada_ppl": self.lambada(removed),
                  "original_lambada_ppl": self.lambada([]), "seconds": seconds}
        path.write_text(json.dumps(record, indent=1))
        return record

    def share(self, spec: str, deltas: list[int]) -> list[dict]:
        """The gates' 8 layers removed, the 22 kept in adjacent pairs sharing their matrices
        (FoldGPT's step 3, no cure): shared from the more important member, or from the mean,
        with or without per-layer low-rank deltas."""
        from layerfold.methods.foldgpt import FoldGPTOptions, choose_groups
        from layerfold.models.surgery import count_parameters
        from layerfold.nn.shared import share_groups

        gates = json.loads((self.work / f"{spec}-remove{self.args.remove}.json").read_text())
        rows = []
        for init in ("important", "mean"):
            for rank in [0, *deltas]:
                path = self.work / f"share-{spec}-{init}-r{rank}.json"
                if path.exists():
                    rows.append(json.loads(path.read_text()))
                    continue
                t = time.perf_counter()
                model = copy_model(self.loaded.model)
                kept = remove_layers(model, self.loaded.arch, gates["removed"])
                groups = choose_groups(len(kept), FoldGPTOptions())
                share_groups(model, self.loaded.arch, groups, init=init,
                             importance=[gates["scores"][l] for l in kept], delta_rank=rank)
                seconds = time.perf_counter() - t
                from layerfold.eval.heldout import compare_to_reference

                fit = compare_to_reference(model, self.heldout, self.reference)
                ppl = perplexity(model, self.loaded.tokenizer, self.docs, window=DEFAULT_PPL_WINDOW, batch_size=4)
                row = {"choice": spec, "init": init, "delta_rank": rank, "removed": gates["removed"],
                       "groups": groups, "stored_params": count_parameters(model), "kl": fit.kl, "top1": fit.top1,
                       "heldout_ppl": fit.ppl, "lambada_ppl": ppl.perplexity, "share_seconds": seconds}
                path.write_text(json.dumps(row, indent=1))
                print(json.dumps({k: v for k, v in row.items() if k != "groups"}), flush=True)
                rows.append(row)
        return rows

    def run(self, spec: str) -> dict:
        path = self.work / f"{spec}-remove{self.args.remove}.json"
        if path.exists():
            return json.loads(path.read_text())
        bi = self.block_influence()
        opts = parse_variant(spec)
        print(f"== {spec}: {opts}", flush=True)
        t = time.perf_counter()
        with torch.enable_grad():
            r = gate_ranking(self.loaded.model, self.loaded.arch, self.calib, self.args.remove, opts,
                             heldout=self.heldout, block_influence_removed=bi["removed"], progress=True)
        seconds = time.perf_counter() - t
        record = {"variant": spec, **r.to_dict(), "seconds": seconds, "lambada_ppl": self.lambada(r.removed),
                  "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        path.write_text(json.dumps(record, indent=1))
        return record


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "python": sys.version.split()[0],
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def load(work: Path, spec: str, remove: int) -> dict | None:
    path = work / f"{spec}-remove{remove}.json"
    return json.loads(path.read_text()) if path.exists() else None


def table(work: Path, specs: list[str], remove: int) -> str:
    bi = json.loads((work / f"bi-remove{remove}.json").read_text())
    lines = ["| choice | layers removed | held-out KL | top-1 agreement | held-out ppl | LAMBADA text ppl | "
             "final gates in {0, 1} | gate training s |",
             "|---|---|---:|---:|---:|---:|---|---:|",
             f"| original | - | 0 | 1.000 | {bi['reference_heldout_ppl']:.2f} | {bi['original_lambada_ppl']:.1f} | - | - |",
             f"| Block Influence | {', '.join(map(str, bi['removed']))} | {bi['kl']:.4f} | {bi['top1']:.3f} | "
             f"{bi['heldout_ppl']:.2f} | {bi['lambada_ppl']:.1f} | - | - |"]
    for spec in specs:
        r = load(work, spec, remove)
        if r is None:
            continue
        g = r["check"]["gates"]
        binary = "yes" if all(x in (0.0, 1.0) for x in r["gates"]) else "no"
        lines.append(f"| gates: {spec} | {', '.join(map(str, g['removed']))} | {g['kl']:.4f} | {g['top1']:.3f} | "
                     f"{g['ppl']:.2f} | {r['lambada_ppl']:.1f} | {binary} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def plot(work: Path, specs: list[str], remove: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(s, load(work, s, remove)) for s in specs]
    runs = [(s, r) for s, r in runs if r is not None]
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), squeeze=False)
    for ax, (spec, r) in zip(axes[0], runs):
        log = r["rounds"][0]["log"]
        steps = [e["step"] for e in log]
        values = list(zip(*[e["gates"] for e in log]))
        removed = set(r["removed"])
        for l, v in enumerate(values):
            ax.plot(steps, v, color="tab:red" if l in removed else "tab:blue", lw=0.8, alpha=0.8)
        ax.set(title=spec, xlabel="step", ylabel="gate value", ylim=(-0.05, 1.05))
    axes[0][0].plot([], [], color="tab:red", label="layers the gates remove")
    axes[0][0].plot([], [], color="tab:blue", label="layers kept")
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"plot written to {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["run", "table", "plot", "share"])
    ap.add_argument("--deltas", default="", help="share: comma-separated delta ranks to try besides none")
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--remove", type=int, default=8)
    ap.add_argument("--ppl-docs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="benchmarks/results/gates")
    ap.add_argument("--plot", default="benchmarks/gates.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    if args.action == "run":
        bench = Bench(args)
        for spec in args.variants:
            r = bench.run(spec)
            print(json.dumps({k: r[k] for k in ("variant", "removed", "seconds", "lambada_ppl")}), flush=True)
            print(json.dumps(r["check"]), flush=True)
    if args.action == "share":
        bench = Bench(args)
        for spec in args.variants:
            bench.share(spec, [int(r) for r in args.deltas.split(",") if r])
    if args.action in ("run", "table"):
        print(table(work, args.variants, args.remove))
    if args.action == "plot":
        plot(work, args.variants, args.remove, Path(args.plot))


if __name__ == "__main__":
    main()

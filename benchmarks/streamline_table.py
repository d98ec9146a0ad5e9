"""The Markdown table and the learning-curve plot of a ``streamline_grid.py`` result file.

    python benchmarks/streamline_table.py benchmarks/results/streamline/grid-16k.json \\
        --plot benchmarks/streamline_curves.png
"""

from __future__ import annotations

import argparse
import json


def table(r: dict) -> str:
    head = ("| variant | LAMBADA ppl | LAMBADA acc | PIQA acc | PIQA stab. | ARC-E acc | ARC-E stab. | steps x batch "
            "| best step | val loss first -> best (se) | train s | peak RSS MiB |")
    rows = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for name, v in r["variants"].items():
        t, tr = v["tasks"], v.get("training") or {}
        lam, piqa, arc = t["lambada_openai"], t["piqa"], t["arc_easy"]
        stab = lambda x: f"{x['stability']:.2f}" if "stability" in x else "-"  # noqa: E731
        if tr:
            se = tr["validation"][0].get("se")
            best = next(x for x in tr["validation"] if x["step"] == tr["best_step"])
            val = f"{tr['first_val']:.4g} -> {tr['best_val']:.4g} ({se:.2g}, {best.get('se', float('nan')):.2g})"
            steps = f"{tr['steps']} x {tr['batch']}"
        else:
            val, steps = "-", "-"
        train_s = v.get("seconds_parts", {}).get("train")
        rows.append(f"| {name} | {lam['perplexity']:,.1f} | {lam['acc']:.2f} | {piqa['acc']:.2f} | {stab(piqa)} "
                    f"| {arc['acc']:.2f} | {stab(arc)} | {steps} | {tr.get('best_step', '-')} | {val} "
                    f"| {'-' if train_s is None else f'{train_s:.0f}'} | {v['make_peak_mib']:,.0f} |")
    return "\n".join(rows)


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = {n: v["training"] for n, v in r["variants"].items() if v.get("training")}
    losses = sorted({n.split(":")[0] for n in trained})
    fig, axes = plt.subplots(1, len(losses), figsize=(4 * len(losses), 3.2), squeeze=False)
    for ax, loss in zip(axes[0], losses):
        for name, tr in trained.items():
            if name.split(":")[0] != loss:
                continue
            steps = [x["step"] for x in tr["validation"]]
            vals = [x["loss"] / tr["first_val"] for x in tr["validation"]]
            ax.plot(steps, vals, marker="o", label=name)
        ax.set_title(f"{loss}: validation loss / step 0")
        ax.set_xlabel("optimiser step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--plot")
    args = ap.parse_args()
    r = json.loads(open(args.results).read())
    print(table(r))
    if args.plot:
        plot(r, args.plot)


if __name__ == "__main__":
    main()

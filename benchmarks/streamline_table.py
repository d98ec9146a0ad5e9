"""The Markdown table and the learning-curve plot of ``streamline_grid.py`` result files.

    python benchmarks/streamline_table.py benchmarks/results/streamline/grid-64k.json \\
        benchmarks/results/streamline/grid-64k-heal.json --plot benchmarks/streamline_curves.png

Several files (e.g. a parallel invocation's) are merged, variants in the order given; files of
different ``--train-tokens`` keep their rows apart, each name followed by its training tokens.
"""

from __future__ import annotations

import argparse
import json


def _training(v: dict) -> tuple[str, str, str, str]:
    """(steps x batch, best step, validation first -> best (standard errors), linear fit error)."""
    tr, heal = v.get("training") or {}, v.get("heal")
    healed = (f"{heal['steps']} x {heal['tokens'] // heal['steps'] // 256}",
              f"train KL {heal['loss'][0]:.3g} -> {heal['loss'][-1]:.3g}") if heal else None
    if tr:
        se = tr["validation"][0].get("se")
        best = next(x for x in tr["validation"] if x["step"] == tr["best_step"])
        val = f"{tr['first_val']:.4g} -> {tr['best_val']:.4g} ({se:.2g}, {best.get('se', float('nan')):.2g})"
        lin = tr.get("linear_init")
        fit = f"{lin['error_before']:.3f} -> {lin['error_after']:.3f}" if lin else "-"
        steps = f"{tr['steps']} x {tr['batch']}"
        if healed:  # the budget split: the replacement's training, then healing
            steps, val = f"{steps} + heal {healed[0]}", f"{val}; heal {healed[1]}"
        return steps, str(tr["best_step"]), val, fit
    if healed:
        return healed[0], "-", healed[1], "-"
    return "-", "-", "-", "-"


def table(r: dict) -> str:
    head = ("| variant | LAMBADA last-word ppl | LAMBADA acc | LAMBADA text ppl | PIQA acc | PIQA stab. | ARC-E acc "
            "| ARC-E stab. | steps x batch | best step | val loss first -> best (se) | linear fit rel. error "
            "| train s | peak RSS MiB |")
    rows = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    for name, v in r["variants"].items():
        if "tasks" not in v:  # a --no-eval row: only its curve (the plot)
            continue
        t = v["tasks"]
        lam, piqa, arc = t["lambada_openai"], t["piqa"], t["arc_easy"]
        text = t.get("text:lambada_openai", {}).get("perplexity")
        stab = lambda x: f"{x['stability']:.2f}" if "stability" in x else "-"  # noqa: E731
        steps, best, val, fit = _training(v)
        parts = [v.get("seconds_parts", {}).get("train"), (v.get("heal") or {}).get("seconds")]
        train_s = sum(x for x in parts if x is not None) if any(x is not None for x in parts) else None
        rows.append(f"| {name} | {lam['perplexity']:,.1f} | {lam['acc']:.2f} | "
                    f"{'-' if text is None else f'{text:,.1f}'} | {piqa['acc']:.2f} | {stab(piqa)} "
                    f"| {arc['acc']:.2f} | {stab(arc)} | {steps} | {best} | {val} | {fit} "
                    f"| {'-' if train_s is None else f'{train_s:.0f}'} | {v['make_peak_mib']:,.0f} |")
    return "\n".join(rows)


INIT_COLOURS = {"first": "C0", "last": "C1", "linear": "C2", "linear-last": "C3"}
OTHER_COLOURS = ["C4", "C5", "C6", "C7", "C8", "C9"]
BUDGET_STYLES = ["-", "--", ":", "-."]


def layout(panels: int, cols: int = 3) -> tuple[int, int]:
    """(rows, columns) of the plot's grid: at most ``cols`` panels a row."""
    cols = max(1, min(cols, panels))
    return -(-panels // cols), cols


def line_style(name: str, budgets: list[str], others: list[str]) -> tuple[str, str]:
    """(colour, line style) of a variant's curve: the colour says its init (the same in every
    loss's panel; a name that is no plain LOSS:INIT, e.g. ``bi+heal`` or a budget split, gets
    its own colour, ``others`` keeping their order), the line style its budget (the order of
    ``budgets``, the `` @TOKENS`` suffixes of merged files of different budgets)."""
    base, _, budget = name.partition(" @")
    init = base.split(":", 1)[1] if ":" in base else base
    if init in INIT_COLOURS:
        colour = INIT_COLOURS[init]
    else:
        if init not in others:
            others.append(init)
        colour = OTHER_COLOURS[others.index(init) % len(OTHER_COLOURS)]
    style = BUDGET_STYLES[budgets.index(budget) % len(BUDGET_STYLES)] if budget in budgets else "-"
    return colour, style


def _legend(ax) -> None:
    """The legend under the panel, in two columns: inside it would hide curves that fill the panel."""
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)


def plot(r: dict, path: str):
    """Validation loss against training tokens seen, one panel per loss, one line per variant
    (absolute values: a closed-form init starts lower, which a ratio to step 0 would hide); a
    last panel for the healed rows' training KL. Panels in rows of three; one colour per init
    in every panel, one line style per budget. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = {n: v["training"] for n, v in r["variants"].items() if v.get("training")}
    healed = {n: v for n, v in r["variants"].items() if v.get("heal")}
    losses = sorted({n.split(":")[0] for n in trained})
    budgets = sorted({n.partition(" @")[2] for n in r["variants"] if " @" in n},
                     key=lambda b: int(b.replace(",", "")))
    others: list[str] = []
    panels = len(losses) + bool(healed)
    rows, cols = layout(panels)
    fig, grid = plt.subplots(rows, cols, figsize=(4.5 * cols, 4.0 * rows), squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[panels:]:
        ax.set_visible(False)
    if healed:
        # healing's training KL per step against the run's total training tokens: a budget split's
        # healing starts after the tokens its replacement trained on, so equal budgets end together
        ax = axes[panels - 1]
        for name, v in healed.items():
            heal, tr = v["heal"], v.get("training") or {}
            offset, per_step = tr.get("tokens_seen", 0), heal["tokens"] / heal["steps"]
            colour, style = line_style(name, budgets, others)
            ax.plot([offset + (i + 1) * per_step for i in range(len(heal["loss"]))], heal["loss"], marker="o",
                    markersize=2, label=name, color=colour, linestyle=style)
        ax.set_title("healing (LoRA + KL): training KL")
        ax.set_xlabel("training tokens seen (replacement + healing)")
        _legend(ax)
    for ax, loss in zip(axes, losses):
        for name, tr in trained.items():
            if name.split(":")[0] != loss:
                continue
            # training tokens seen, not steps: budgets of different batch sizes share one axis
            seen = [x["step"] * tr["batch"] * tr["seq_len"] for x in tr["validation"]]
            colour, style = line_style(name, budgets, others)
            ax.plot(seen, [x["loss"] for x in tr["validation"]], marker="o", markersize=3, label=name,
                    color=colour, linestyle=style)
        ax.set_title(f"{loss}: validation loss")
        ax.set_xlabel("training tokens seen")
        if loss == "mse":
            ax.set_yscale("log")
        _legend(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--plot")
    args = ap.parse_args()
    files = [json.loads(open(path).read()) for path in args.results]
    budgets = {f["settings"]["train_tokens"] for f in files}
    r = files[0]
    if len(budgets) > 1:  # files of different budgets: each name says its budget (rows of equal names differ)
        r = {**r, "variants": {}}
        for f in files:
            r["variants"].update({f"{n} @{f['text']['train_rows'] * f['text']['seq_len']:,}": v
                                  for n, v in f["variants"].items()})
    else:
        for f in files[1:]:
            r["variants"].update(f["variants"])
    print(table(r))
    if args.plot:
        plot(r, args.plot)


if __name__ == "__main__":
    main()

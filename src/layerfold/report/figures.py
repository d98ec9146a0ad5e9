"""Figures of a compression run, as PNG bytes (matplotlib, no screen needed).

Each function takes plain data (the ``layerfold.json`` record, evaluation summaries) and
returns PNG bytes, or None when there is nothing to draw.
"""

from __future__ import annotations

import io
import math

KEPT, REMOVED, REPLACED, SHARED = "#4c72b0", "#c44e52", "#dd8452", "#55a868"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def layer_roles(record: dict) -> list[str]:
    """'kept', 'removed', 'replaced' or 'shared' for every original layer."""
    n = int(record.get("layers_before") or 0)
    roles = ["kept"] * n
    recipe = record.get("recipe") or {}
    for l in recipe.get("removed_layers") or record.get("removed_layers") or []:
        if 0 <= l < n:
            roles[l] = "removed"
    for l in record.get("replaced_layers") or recipe.get("replaced_layers") or []:
        if 0 <= l < n:
            roles[l] = "replaced"
    for group in record.get("shared_groups") or recipe.get("shared_groups") or []:
        if len(group) > 1:
            for l in group:
                if 0 <= l < n and roles[l] == "kept":
                    roles[l] = "shared"
    return roles


def importance_figure(record: dict) -> bytes | None:
    """Per-layer importance by each criterion, removed layers marked."""
    scores = record.get("scores")
    if not scores:
        return None
    plt = _plt()
    L = scores["num_layers"]
    roles = layer_roles(record)
    series = {"Block Influence 1 - cos(h[l], h[l+1]) (low = removable)": scores.get("block_influence")}
    ang = scores.get("angular")
    if ang:
        series["angular distance, one layer, last tokens (low = removable)"] = [
            (ang[l][1] if ang[l][1] is not None else math.nan) for l in range(L)]
    for key, values in (record.get("importance") or {}).items():  # e.g. FoldGPT gates
        series[key] = values
    series = {k: v for k, v in series.items() if v}
    fig, axes = plt.subplots(len(series), 1, figsize=(9, 2.3 * len(series)), sharex=True, squeeze=False)
    for ax, (label, values) in zip(axes[:, 0], series.items()):
        colors = [{"removed": REMOVED, "replaced": REPLACED, "shared": SHARED}.get(roles[i] if i < len(roles)
                  else "kept", KEPT) for i in range(len(values))]
        ax.bar(range(len(values)), [v if v is not None else math.nan for v in values], color=colors)
        ax.set_title(label, fontsize=9, loc="left")
        ax.grid(axis="y", alpha=0.3)
    axes[-1, 0].set_xlabel("layer (red: removed, orange: replaced, green: shared)")
    return _png(fig)


def block_heatmap(record: dict) -> bytes | None:
    """cos(h[l], h[l+n]) for every window size n and start layer l (LLM-Streamline's criterion)."""
    scores = record.get("scores")
    if not scores or not scores.get("cosine"):
        return None
    plt = _plt()
    import numpy as np

    L = scores["num_layers"]
    grid = np.full((L, L), np.nan)
    for l in range(L):
        for n in range(1, L - l + 1):
            v = scores["cosine"][l][n] if n < len(scores["cosine"][l]) else None
            if v is not None:
                grid[n - 1, l] = v
    fig, ax = plt.subplots(figsize=(7.5, 6))
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
    fig.colorbar(im, ax=ax, label="mean cos(h[l], h[l+n])")
    removed = (record.get("recipe") or {}).get("removed_layers") or []
    if removed and sorted(removed) == list(range(min(removed), max(removed) + 1)):
        ax.plot([min(removed)], [len(removed) - 1], marker="s", mfc="none", mec="red", ms=12, mew=2)
    ax.set_xlabel("start layer l")
    ax.set_ylabel("window size n (layers)")
    ax.set_yticks(range(0, L, max(1, L // 10)))
    ax.set_yticklabels([str(n + 1) for n in range(0, L, max(1, L // 10))])
    ax.set_title("Block similarity (high = the n layers from l change little); red square: removed block",
                 fontsize=9)
    return _png(fig)


def layer_map_figure(record: dict) -> bytes | None:
    roles = layer_roles(record)
    if not roles:
        return None
    plt = _plt()
    colors = {"kept": KEPT, "removed": REMOVED, "replaced": REPLACED, "shared": SHARED}
    fig, ax = plt.subplots(figsize=(9, 1.2))
    for i, role in enumerate(roles):
        ax.add_patch(plt.Rectangle((i, 0), 0.9, 1, color=colors[role]))
        ax.text(i + 0.45, 0.5, str(i), ha="center", va="center", fontsize=7, color="white")
    ax.set_xlim(0, len(roles))
    ax.set_ylim(0, 1)
    ax.axis("off")
    used = [r for r in colors if r in roles]
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[r]) for r in used]
    ax.legend(handles, used, ncol=len(used), loc="upper center", bbox_to_anchor=(0.5, -0.05), frameon=False,
              fontsize=8)
    ax.set_title("original layers", fontsize=9, loc="left")
    return _png(fig)


def before_after_figure(before: dict, after: dict, speed: dict | None = None) -> bytes | None:
    """Accuracy per task, and every other figure after as a share of before. Speeds timed in
    alternation (``speed``: ``Cost.speed_vs_reference``) show the median of their per-round
    ratios with its range as an error bar, and are left out when too noisy to quote."""
    speed = speed or {}
    keys = [k for k in before if after.get(k) is not None and before[k] is not None and "stability" not in k]
    acc = [k for k in keys if k.endswith("/acc") or k.endswith("/acc_norm") or k == "heldout/top1"]
    rest = [k for k in keys if k not in acc and before[k]]
    ratio_of = {}
    for k in list(rest):
        if k.endswith("_tokens_per_s") and k.split("/")[-1].split("_")[0] in speed:
            c = speed[k.split("/")[-1].split("_")[0]]
            if c["noisy"]:
                rest.remove(k)
            else:
                ratio_of[k] = c
    if not acc and not rest:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * max(len(acc), len(rest), 3) + 1.2), squeeze=False)
    if acc:
        ax = axes[0, 0]
        y = range(len(acc))
        ax.barh([i + 0.2 for i in y], [before[k] for k in acc], height=0.4, color="#999999", label="before")
        ax.barh([i - 0.2 for i in y], [after[k] for k in acc], height=0.4, color=KEPT, label="after")
        ax.set_yticks(list(y))
        ax.set_yticklabels(acc, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("accuracy / agreement")
        ax.legend(fontsize=8)
    else:
        axes[0, 0].axis("off")
    if rest:
        ax = axes[0, 1]
        share = [100 * ratio_of[k]["ratio"] if k in ratio_of else 100 * after[k] / before[k] for k in rest]
        err = [[100 * (ratio_of[k]["ratio"] - ratio_of[k]["low"]) if k in ratio_of else 0 for k in rest],
               [100 * (ratio_of[k]["high"] - ratio_of[k]["ratio"]) if k in ratio_of else 0 for k in rest]]
        ax.barh(range(len(rest)), share, xerr=err, capsize=3,
                color=[REMOVED if s > 100 and ("ppl" in k or "perplexity" in k) else KEPT for s, k in zip(share, rest)])
        ax.axvline(100, color="black", lw=0.8)
        ax.set_yticks(range(len(rest)))
        ax.set_yticklabels([k + (" (alternating)" if k in ratio_of else "") for k in rest], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("after, % of before (speed: median of alternating rounds, bar = range)")
        for i, s in enumerate(share):
            ax.text(s, i, f" {s:.0f}%", va="center", fontsize=7)
    else:
        axes[0, 1].axis("off")
    return _png(fig)


def healing_figure(record: dict) -> bytes | None:
    """The healing loss, and the held-out KL and top-1 agreement if measured, against tokens."""
    curve = record.get("heal_curve") or []
    losses = [(c["tokens"], c["loss"]) for c in curve if c.get("loss") is not None]
    fits = [(c["tokens"], c["heldout"]) for c in curve if c.get("heldout")]
    if not losses:
        return None
    plt = _plt()
    panels = 2 if fits else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.4), squeeze=False)
    ax = axes[0, 0]
    ax.plot([t for t, _ in losses], [v for _, v in losses], marker=".", color=KEPT)
    ax.set_xlabel("healing tokens")
    ax.set_ylabel("training loss")
    ax.set_title("healing loss per step", fontsize=9, loc="left")
    ax.grid(alpha=0.3)
    if fits:
        ax = axes[0, 1]
        xs = [t for t, _ in fits]
        ax.plot(xs, [f["kl"] for _, f in fits], marker="o", color=REMOVED, label="KL to the original")
        ax.set_xlabel("healing tokens")
        ax.set_ylabel("held-out KL", color=REMOVED)
        ax.grid(alpha=0.3)
        ax2 = ax.twinx()
        ax2.plot(xs, [100 * f["top1"] for _, f in fits], marker="s", color=SHARED, label="top-1 agreement")
        ax2.set_ylabel("held-out top-1 agreement (%)", color=SHARED)
        ax.set_title("held-out rows (0 tokens: pruned, before healing)", fontsize=9, loc="left")
    fig.tight_layout()
    return _png(fig)

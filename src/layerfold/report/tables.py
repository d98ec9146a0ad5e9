"""Plain-text tables for the terminal."""

from __future__ import annotations

import math

from ..importance.criteria import LayerScores


def _fmt(x: float, width: int = 7) -> str:
    return " " * (width - 1) + "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{width}.4f}"


def importance_table(scores: LayerScores, block_sizes: list[int]) -> str:
    """Per-layer scores, plus per-block cosine and angular distance for each window size.

    Row l describes layer l (Block Influence) and the window of n layers starting at l.
    """
    L = scores.num_layers
    sizes = [n for n in block_sizes if 1 <= n <= L]
    bi = scores.block_influence
    gates = scores.extra.get("gates")
    head = ["layer", "    BI"] + (["  gate"] if gates else []) + [f" cos n={n}" for n in sizes] + [f" ang n={n}" for n in sizes]
    lines = ["  ".join(head)]
    for l in range(L):
        row = [f"{l:5d}", _fmt(bi[l], 6)] + ([_fmt(gates[l], 6)] if gates else [])
        row += [_fmt(scores.cosine[l][n] if l + n <= L else math.nan, 8) for n in sizes]
        row += [_fmt(scores.angular[l][n] if l + n <= L else math.nan, 8) for n in sizes]
        lines.append("  ".join(row))
    lines.append("")
    lines.append("BI: 1 - cos(h[l], h[l+1]), low = removable (ShortGPT).")
    lines.append("cos n: cos(h[l], h[l+n]) over all tokens, high = the block l..l+n-1 is removable (LLM-Streamline).")
    lines.append("ang n: arccos(cos)/pi on last tokens, low = removable (Gromov et al.).")
    if gates:
        k = len(scores.extra.get("gates_removed", []))
        by_bi = sorted(sorted(range(L), key=lambda l: (bi[l], l))[:k])
        removed = scores.extra.get("gates_removed", [])
        lines.append("gate: FoldGPT's learned gate (all layers trained jointly, weights frozen), low = removable.")
        lines.append(f"Remove {k} by gates: {removed}; by BI: {by_bi}; "
                     f"agree on {len(set(removed) & set(by_bi))} of {k}.")
    best = []
    for n in sizes:
        if n < L:
            cos = scores.block_cosine(n)
            s = max(range(len(cos)), key=lambda i: cos[i])
            best.append(f"n={n}: layers {s}..{s + n - 1}")
    if best:
        lines.append("Most redundant blocks by cosine: " + "; ".join(best))
    return "\n".join(lines)

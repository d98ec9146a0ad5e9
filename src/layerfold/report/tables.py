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
        lines.append("gate: FoldGPT's learned gate (all layers trained jointly, weights frozen), low = removable "
                     "(hard-concrete and topk gates end at exactly 0 or 1).")
        lines.append(f"Remove {k} by gates: {removed}; by BI: {by_bi}; "
                     f"agree on {len(set(removed) & set(by_bi))} of {k}.")
        if scores.extra.get("gates_check"):
            from ..importance.gates import describe_check

            lines.append("Check: " + describe_check(scores.extra["gates_check"]))
    best = []
    for n in sizes:
        if n < L:
            cos = scores.block_cosine(n)
            s = max(range(len(cos)), key=lambda i: cos[i])
            best.append(f"n={n}: layers {s}..{s + n - 1}")
    if best:
        lines.append("Most redundant blocks by cosine: " + "; ".join(best))
    return "\n".join(lines)


def _human(x: float, unit: str = "") -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}{unit}"
    return f"{x:.0f}{unit}"


def _metric_rows(results) -> list[tuple[str, str]]:
    """(key in EvalResult.summary(), label) for every figure any of the results has."""
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    order = ["acc", "acc_norm", "stability", "stability_norm", "stability_examples", "agreement", "perplexity"]
    for r in results:
        for name, t in r.tasks.items():
            for m in sorted(t.metrics, key=lambda k: order.index(k) if k in order else 99):
                key = f"{name}/{m}"
                if key not in seen:
                    seen.add(key)
                    rows.append((key, f"{name} {m}"))
    for r in results:
        for name, p in r.perplexity.items():
            key = f"ppl/{name}"
            if key not in seen:
                seen.add(key)
                rows.append((key, f"perplexity {name} ({p.tokens:,} tok)"))
    for key, label in (("heldout/kl", "held-out KL to the original"), ("heldout/top1", "held-out top-1 agreement"),
                       ("heldout/ppl", "held-out perplexity")):
        if any(key in r.summary() for r in results):
            rows.append((key, label))
    for key, label in (("cost/parameters", "parameters"), ("cost/weight_bytes", "weights in memory"),
                       ("cost/bytes_on_disk", "bytes on disk"),
                       ("cost/peak_memory_bytes", "peak memory"), ("cost/prefill_tokens_per_s", "prefill tok/s"),
                       ("cost/decode_tokens_per_s", "decode tok/s")):
        if any(key in r.summary() for r in results):
            rows.append((key, label))
    return rows


def format_value(key: str, v: float | None) -> str:
    if v is None:
        return "-"
    if key in ("cost/parameters",):
        return _human(v)
    if key.endswith("bytes") or key.endswith("bytes_on_disk"):
        return f"{v / 2**20:.1f} MiB"
    if key == "heldout/top1":
        return f"{100 * v:.1f}%"
    if key.endswith("_per_s"):
        return f"{v:.1f}"
    if key.startswith("ppl/") or key.endswith("/perplexity"):
        return f"{v:.2f}"
    return f"{v:.4f}"


def speed_comparison(key: str, result) -> dict | None:
    """The alternating runs' comparison with the reference behind a speed figure, if any."""
    if not key.endswith("_tokens_per_s") or result is None or result.cost is None:
        return None
    return (result.cost.speed_vs_reference or {}).get(key.split("/")[-1].split("_")[0])


def share_text(key: str, value, ref, result=None) -> str:
    """A figure as a share of the reference's: ``93.1%``; a speed timed in alternation: the
    median of its per-round ratios with their range, or 'too noisy'; nothing for stability
    and for figures whose reference is 0 (the original's KL to itself)."""
    from ..eval.before_after import describe_ratio

    comparison = speed_comparison(key, result)
    if comparison is not None:
        return describe_ratio(comparison)
    if value is None or ref in (None, 0) or "stability" in key or key == "heldout/top1":  # a share already
        return ""
    return f"{100 * value / ref:.1f}%"


def eval_table(results, names: list[str] | None = None) -> str:
    """Side-by-side figures of several evaluations; the first is the reference.

    Every figure after the first column is followed by its percentage of the reference's
    (the share "kept"); stability has no reference value and is shown alone.
    """
    names = names or [r.model for r in results]
    summaries = [r.summary() for r in results]
    rows = _metric_rows(results)
    label_w = max([len("metric")] + [len(lbl) for _, lbl in rows])
    cells: list[list[str]] = []
    for key, _ in rows:
        ref = summaries[0].get(key)
        line = [format_value(key, ref)]
        for s, r in zip(summaries[1:], results[1:]):
            v = s.get(key)
            text = format_value(key, v)
            share = share_text(key, v, ref, r)
            if share:
                text += f" ({share})"
            line.append(text)
        cells.append(line)
    widths = [max([len(_short(n))] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    out = ["  ".join([f"{'metric':<{label_w}}"] + [f"{_short(n):>{w}}" for n, w in zip(names, widths)])]
    for (_, label), line in zip(rows, cells):
        out.append("  ".join([f"{label:<{label_w}}"] + [f"{c:>{w}}" for c, w in zip(line, widths)]))
    if len(results) > 1:
        out.append("")
        out.append(" ".join(notes(rows, results, _short(names[0]))))
    return "\n".join(out)


def notes(rows, results, reference_name: str) -> list[str]:
    """One sentence for each kind of figure the table shows, and none for the others."""
    keys = {k for k, _ in rows}
    text = [f"(x%) = share of the reference ({reference_name})."]
    if any(k.endswith("/stability") for k in keys):
        text.append("stability: agreement of right and wrong answers with the reference, weighted by its "
                    "confidence (1 = no answer changed); stability_examples: how many examples those weights "
                    "effectively rest on (1 / sum of squared weights); agreement: the same comparison unweighted.")
    if "heldout/kl" in keys:
        r = next((r.heldout for r in results if r.heldout), None) or {}
        text.append(f"held-out: {r.get('rows', '?')} rows of {r.get('tokens', 0) // max(1, r.get('rows', 1))} "
                    "tokens of calibration-style text that selection and healing never saw; KL(original || model) "
                    "per token, share of positions with the same most likely next token, perplexity.")
    if any(speed_comparison(k, r) for k in keys for r in results[1:]):
        text.append("speed: batch 1, the two models timed in alternation; (ratio) = median of the per-round "
                    "ratios (lowest-highest), 'too noisy' when they spread by more than 20%.")
    return text


def _short(name: str, width: int = 32) -> str:
    name = str(name).rstrip("/").split("/")[-1] or str(name)
    return name if len(name) <= width else "..." + name[-(width - 3):]

"""A self-contained HTML report of one compression run (figures embedded as base64 PNG).

``write_report`` is what ``compress`` calls; it also writes the figures as PNG files beside
the report, so they can be reused elsewhere.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from . import figures


def _as_result(x):
    from ..eval.result import EvalResult

    if x is None or isinstance(x, EvalResult):
        return x
    if isinstance(x, dict):
        return EvalResult.from_dict(x)
    return EvalResult.load(x)


def _esc(x) -> str:
    return html.escape(str(x))


def _comparison_table(before, after) -> str:
    from .tables import _metric_rows, format_value, share_text

    results = [r for r in (before, after) if r is not None]
    rows = _metric_rows(results)
    sb = before.summary() if before else {}
    sa = after.summary() if after else {}
    head = "<tr><th>figure</th>" + ("<th>before</th>" if before else "") + (
        "<th>after</th><th>after / before</th>" if after else "") + "</tr>"
    body = []
    for key, label in rows:
        b, a = sb.get(key), sa.get(key)
        cells = [f"<td>{_esc(label)}</td>"]
        if before:
            cells.append(f"<td>{_esc(format_value(key, b))}</td>")
        if after:
            cells.append(f"<td>{_esc(format_value(key, a))}</td>")
            cells.append(f"<td>{_esc(share_text(key, a, b, after))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _notes(before, after) -> list[str]:
    """What the figures of the table mean: only those it shows."""
    from .tables import _metric_rows, notes

    results = [r for r in (before, after) if r is not None]
    rows = _metric_rows(results)
    keys = {k for k, _ in rows}
    text = []
    if any(k.endswith("/acc") or k.endswith("/acc_norm") for k in keys):
        text.append("acc: the choice with the highest summed log-likelihood; acc_norm: per character "
                    "(lm-evaluation-harness).")
    text += notes(rows, results, "before")[1:] if after is not None else []
    if any(k.startswith("ppl/") for k in keys):
        text.append("Perplexity of a text: fixed window, tokens scored in brackets.")
    if "cost/peak_memory_bytes" in keys:
        text.append("Peak memory: the weights plus what running them at batch 1 added to the process.")
    return text


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 980px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
code, pre { background: #f4f4f4; padding: 2px 4px; }
img { max-width: 100%; }
.note { color: #666; font-size: 0.9em; }
"""


def write_report(out_dir: str | os.PathLike, record: dict, eval_before=None, eval_after=None) -> Path:
    """Write ``report.html`` and ``figures/*.png`` into ``out_dir``; returns the report's path.

    ``record`` is the run's ``layerfold.json`` content (base model, command, recipe,
    ``layer_map``, ``layers_before``, ``params_before``/``params_after``, ``scores``; optional
    ``replaced_layers``, ``shared_groups`` and ``importance`` {name: per-layer values}).
    ``eval_before``/``eval_after``: ``EvalResult`` objects, their dicts, or JSON paths.
    """
    from ..eval.result import write_text_atomically

    out = Path(out_dir)
    before, after = _as_result(eval_before), _as_result(eval_after)
    pngs = {
        "layer_map": figures.layer_map_figure(record),
        "importance": figures.importance_figure(record),
        "block_similarity": figures.block_heatmap(record),
    }
    if before and after:
        pngs["before_after"] = figures.before_after_figure(before.summary(), after.summary(),
                                                           (after.cost.speed_vs_reference if after.cost else None))
    pngs["healing"] = figures.healing_figure(record)
    pngs = {k: v for k, v in pngs.items() if v}
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for name, data in pngs.items():
        tmp = out / "figures" / f".{name}.png.tmp-{os.getpid()}"
        tmp.write_bytes(data)
        os.replace(tmp, out / "figures" / f"{name}.png")

    def img(name: str, alt: str) -> str:
        if name not in pngs:
            return ""
        b64 = base64.b64encode(pngs[name]).decode("ascii")
        return f'<p><img alt="{_esc(alt)}" src="data:image/png;base64,{b64}"></p>'

    recipe = record.get("recipe") or {}
    n_before = record.get("layers_before")
    layer_map = record.get("layer_map") or []
    pb, pa = record.get("params_before"), record.get("params_after")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>layerfold report: {_esc(record.get('base_model', ''))}</title><style>{_CSS}</style></head><body>",
        f"<h1>layerfold report</h1><p>Base model <b>{_esc(record.get('base_model', ''))}</b>, "
        f"method <b>{_esc(recipe.get('method', ''))}</b>.</p>",
        f"<p>Command: <code>{_esc(record.get('command', ''))}</code></p>",
        "<table>",
        f"<tr><td>decoder layers</td><td>{_esc(n_before)} &rarr; {len(layer_map)}</td></tr>",
    ]
    if pb and pa:
        parts.append(f"<tr><td>parameters</td><td>{pb:,} &rarr; {pa:,} ({100 * (1 - pa / pb):.1f}% fewer)</td></tr>")
    if recipe.get("removed_layers") is not None:
        parts.append(f"<tr><td>removed layers</td><td>{_esc(', '.join(map(str, recipe['removed_layers'])))}</td></tr>")
    parts.append("</table>")
    auto = record.get("auto")
    if auto:
        parts.append(f"<h2>Plan search</h2><p>{len(auto['table'])} candidate plans scored by KL to the original on "
                     f"{auto['heldout_rows']} held-out rows; built: <b>{_esc(auto['chosen'])}</b>.</p>")
        rows = "".join(
            f"<tr><td>{_esc(r['plan'])}</td><td>{r['kl']:.4f}</td><td>{r['top1']:.3f}</td><td>{r['ppl']:.2f}</td>"
            f"<td>{_esc(','.join(map(str, r['removed'])))}</td></tr>" if "kl" in r else
            f"<tr><td>{_esc(r['plan'])}</td><td colspan='4'>refused: {_esc(r['refused'])}</td></tr>"
            for r in auto["table"])
        parts.append("<table><tr><th>plan</th><th>held-out KL</th><th>top-1</th><th>held-out ppl</th>"
                     f"<th>removed</th></tr>{rows}</table>")
    parts.append("<h2>Which layers</h2>" + img("layer_map", "kept and removed layers"))
    parts.append("<p class='note'>Layer map, new &larr; old: " + _esc(", ".join(
        f"{i}&larr;{o}" if o is not None else f"{i}&larr;new" for i, o in enumerate(layer_map))).replace(
        "&amp;larr;", "&larr;") + "</p>")
    if before or after:
        parts.append("<h2>Before and after</h2>" + _comparison_table(before, after))
        parts.append("<p class='note'>" + _esc(" ".join(_notes(before, after))) + "</p>")
        if before and before.settings.get("limit"):
            parts.append(f"<p class='note'>Tasks limited to their first {before.settings['limit']} examples.</p>")
        parts.append(img("before_after", "before and after"))
    else:
        parts.append("<p class='note'>No evaluation was run (pass <code>--eval-tasks</code> to compress, or use "
                     "<code>layerfold eval</code>).</p>")
    if "healing" in pngs:
        heal = record.get("heal") or {}
        parts.append("<h2>Healing</h2>" + img("healing", "healing loss and held-out fit against tokens"))
        parts.append(f"<p class='note'>{_esc(heal.get('trainable', ''))}; {heal.get('tokens', 0):,} tokens in "
                     f"{heal.get('steps', '?')} steps. Loss: the training loss of each step (the healing recipe's "
                     "mix of KL to the original, next-token and hidden-state losses). Held-out: the fit to the "
                     "original on the held-out rows, measured before healing (0 tokens) and along the way.</p>")
    if "importance" in pngs or "block_similarity" in pngs:
        parts.append("<h2>Layer importance</h2>" + img("importance", "per-layer importance"))
        parts.append(img("block_similarity", "block similarity heatmap"))
        scores = record.get("scores") or {}
        parts.append(f"<p class='note'>From one calibration pass: {scores.get('samples', '?')} sequences, "
                     f"{scores.get('tokens', '?'):,} tokens.</p>" if isinstance(scores.get("tokens"), int) else "")
    parts.append(f"<p class='note'>layerfold {_esc(record.get('layerfold_version', ''))}</p></body></html>")
    path = out / "report.html"
    write_text_atomically(path, "\n".join(parts) + "\n")
    return path

"""Perplexity of held-out text with a fixed window and stride.

The text is tokenized once as one stream (documents joined by a blank line). Windows of
``window`` tokens start every ``stride`` tokens; each window scores only the tokens the
previous window did not, so with ``stride < window`` every token but the stream's first is
scored exactly once, with at least ``window - stride`` tokens of left context.
``stride == window`` (the default) gives independent, non-overlapping windows, each scoring
all its tokens but its first (which has nothing to be predicted from). The number of scored
tokens is reported with the result.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import LayerfoldError
from .scoring import LOGIT_CHUNK, _base, output_logits


@dataclass
class PerplexityResult:
    name: str
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored
    window: int
    stride: int
    documents: int
    seconds: float
    path: str = ""


def read_documents(path: str | os.PathLike, limit: int | None = None, text_field: str | None = None) -> list[str]:
    """Documents of a .txt (paragraphs split by blank lines) or .jsonl file.

    In a .jsonl file the text is ``text_field`` (default ``text``), or, for LAMBADA's layout,
    ``context + " " + continuation``.
    """
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as e:
        raise LayerfoldError(f"{path}: {e.strerror}") from None
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise LayerfoldError(f"{path}:{lineno}: not JSON") from None
            field = text_field or "text"
            if field in row:
                docs.append(str(row[field]))
            elif text_field is None and "context" in row and "continuation" in row:
                docs.append(f"{row['context']} {row['continuation']}")
            else:
                raise LayerfoldError(f"{path}:{lineno}: no field {field!r}")
    else:
        docs = [p.strip() for p in raw.split("\n\n") if p.strip()]
    if limit is not None:
        docs = docs[:limit]
    if not docs:
        raise LayerfoldError(f"{path}: no text")
    return docs


@torch.no_grad()
def perplexity(model, tokenizer, documents: list[str], *, window: int = 512, stride: int | None = None,
               batch_size: int = 4, max_tokens: int | None = None, name: str = "text") -> PerplexityResult:
    """Perplexity of ``documents`` joined into one token stream."""
    stride = stride or window
    if window < 2 or not 1 <= stride <= window:
        raise LayerfoldError(f"perplexity needs window >= 2 and 1 <= stride <= window (got {window}, {stride})")
    t0 = time.perf_counter()
    ids = tokenizer.encode("\n\n".join(documents), add_special_tokens=False)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise LayerfoldError(f"{name}: fewer than two tokens of text")
    ids_t = torch.tensor(ids)
    # (begin, end, first scored input position) of every window
    spans = []
    prev_end = 1  # token 0 is never predicted
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + window, len(ids))
        if end <= prev_end:
            break
        spans.append((begin, end, max(prev_end, begin + 1) - 1 - begin))
        prev_end = end
        if end == len(ids):
            break
    device = next(model.parameters()).device
    base = _base(model)
    total_nll, total_tokens = 0.0, 0
    # windows of equal length batch without padding; the last, shorter one runs alone
    for s in range(0, len(spans), batch_size):
        chunk = spans[s: s + batch_size]
        by_len: dict[int, list] = {}
        for sp in chunk:
            by_len.setdefault(sp[1] - sp[0], []).append(sp)
        for spans_same in by_len.values():
            x = torch.stack([ids_t[b:e] for b, e, _ in spans_same]).to(device)
            h = base(input_ids=x).last_hidden_state
            for row, (b, e, first) in enumerate(spans_same):
                hid = h[row, first: e - b - 1]
                tgt = x[row, first + 1: e - b]
                for c in range(0, len(tgt), LOGIT_CHUNK):
                    lg = output_logits(model, hid[c: c + LOGIT_CHUNK])
                    total_nll += float(F.cross_entropy(lg, tgt[c: c + LOGIT_CHUNK], reduction="sum"))
                total_tokens += len(tgt)
    nll = total_nll / total_tokens
    return PerplexityResult(name, math.exp(nll), nll, total_tokens, window, stride, len(documents),
                            time.perf_counter() - t0)

"""A small stand-in evaluator for the healing benchmark, until ``layerfold.eval`` lands.

Conventions as in lm-evaluation-harness (METHODS.md section 5): a multiple-choice sample is
scored by the summed log-likelihood of each choice's tokens given the query (acc); WinoGrande
scores the shared continuation after each context option; LAMBADA gives perplexity over the
whole passage (each passage its own window) and last-word accuracy (every continuation token
is the greedy choice). Stability is the formula of METHODS.md section 2, against the
original model's per-sample scores.

Cost matters on 2 shared cores: rows are left-padded so only the last positions go through
the output head, and choices of one token that share a context (BoolQ's no/yes) are scored
by one forward.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

TASKS = ("piqa", "arc_easy", "boolq", "winogrande")


def _load(data_dir: Path, name: str, limit: int | None) -> list[dict]:
    rows = []
    with open(data_dir / f"{name}.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if limit and len(rows) >= limit:
                break
    return rows


def _requests(task: str, row: dict) -> list[tuple[str, str]]:
    """(context, continuation) per choice."""
    if task == "winogrande":
        return [(opt, " " + row["continuation"]) for opt in row["context_options"]]
    q = row["query"]
    sep = "Answer: " if q.endswith("\n") else "\nAnswer: "
    return [(q + sep.rstrip(" "), " " + c) for c in row["choices"]]


def _split(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx) :]
    return ctx, tok(continuation, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _score(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 8, max_len: int = 512):
    """Summed log-prob and all-greedy flag of each continuation given its context."""
    out: list[tuple[float, bool]] = [None] * len(pairs)  # type: ignore[list-item]
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    dev = next(model.parameters()).device
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        seqs = [(pairs[i][0] + pairs[i][1])[-max_len:] for i in idx]
        conts = [pairs[i][1] for i in idx]
        width = max(len(s) for s in seqs)
        keep = max(len(c) for c in conts) + 1
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s) :] = torch.tensor(s)
            mask[r, width - len(s) :] = 1
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                       logits_to_keep=keep).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        for r, (i, c) in enumerate(zip(idx, conts)):
            # logits position j predicts token j+1; the last keep positions are kept
            pred = logp[r, keep - 1 - len(c) : keep - 1]
            target = torch.tensor(c, device=pred.device)
            lp = pred.gather(-1, target[:, None]).sum().item()
            greedy = bool((pred.argmax(-1) == target).all())
            out[i] = (lp, greedy)
    return out


def evaluate(model, tok, data_dir: str | Path, limit: int = 100, lambada_limit: int = 100,
             batch_size: int = 8) -> dict:
    """Accuracy per task (with per-sample choice scores for stability) and LAMBADA numbers."""
    data_dir = Path(data_dir)
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    result: dict = {"tasks": {}}
    for task in TASKS:
        rows = _load(data_dir, task, limit)
        pairs, owner = [], []
        for n, row in enumerate(rows):
            for ctx, cont in _requests(task, row):
                pairs.append(_split(tok, ctx, cont))
                owner.append(n)
        scores = _score(model, pairs, pad, batch_size)
        per_sample: list[list[float]] = [[] for _ in rows]
        for n, (lp, _) in zip(owner, scores):
            per_sample[n].append(lp)
        correct = [int(max(range(len(s)), key=s.__getitem__) == row["gold"]) for s, row in zip(per_sample, rows)]
        result["tasks"][task] = {"acc": sum(correct) / len(correct), "n": len(rows), "correct": correct,
                                 "scores": per_sample}
    rows = _load(data_dir, "lambada_openai", lambada_limit)
    pairs = [_split(tok, r["context"], " " + r["continuation"]) for r in rows]
    last = _score(model, pairs, pad, batch_size)
    # perplexity over whole passages
    nll, count = 0.0, 0
    full = [([p[0][0]], p[0][1:] + p[1]) for p in pairs]
    for lp, _ in _score(model, full, pad, batch_size):
        nll -= lp
    count = sum(len(c) for _, c in full)
    result["lambada"] = {"ppl": math.exp(nll / count), "acc": sum(g for _, g in last) / len(last), "n": len(rows),
                         "tokens": count}
    result["mean_acc"] = sum(t["acc"] for t in result["tasks"].values()) / len(TASKS)
    return result


def stability(original: dict, compressed: dict) -> dict:
    """Per task: sum_i softmax(std of the original's choice scores)_i * [same correctness]."""
    out = {}
    for task, o in original["tasks"].items():
        c = compressed["tasks"][task]
        s = torch.tensor([torch.tensor(x).std().item() if len(x) > 1 else 0.0 for x in o["scores"]])
        w = torch.softmax(s, dim=0)
        same = torch.tensor([float(a == b) for a, b in zip(o["correct"], c["correct"])])
        out[task] = float((w * same).sum())
    out["mean"] = sum(out.values()) / len(original["tasks"])
    return out

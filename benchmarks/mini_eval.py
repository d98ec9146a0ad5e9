"""A small stand-in evaluator for benchmarks, used while ``layerfold.eval`` is not on main.

Multiple choice (PIQA, ARC-Easy, BoolQ, WinoGrande): summed log-likelihood of each choice
given the query (``acc``) and that divided by the choice's length in characters
(``acc_norm``), as in lm-evaluation-harness; the query runs once and each choice continues it
from the KV cache. WinoGrande scores the shared continuation after each context option.
LAMBADA: perplexity over the continuation tokens given the context (per token), and greedy
last-word accuracy. Stability as in METHODS.md section 2.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch

MC_TASKS = ("piqa", "arc_easy", "boolq", "winogrande")


def read_task(data_dir: Path, name: str, limit: int | None) -> list[dict]:
    rows = []
    with open(Path(data_dir) / "tasks" / f"{name}.jsonl", encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if limit and len(rows) >= limit:
                break
    return rows


def _join(query: str, choice: str) -> tuple[str, str]:
    """The continuation as scored: a space between query and choice unless the query ends in one."""
    if query.endswith((" ", "\n")) or choice.startswith(" "):
        return query, choice
    return query, " " + choice


def _encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: encode the whole, take the context's tokens as prefix."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    n = len(ctx)
    while n > 0 and whole[:n] != ctx[:n]:
        n -= 1
    n = min(n, len(whole) - 1)
    return whole[:n], whole[n:]


@torch.no_grad()
def _loglik_after(model, ctx_ids: list[int], conts: list[list[int]]) -> list[float]:
    """Sum of log p(continuation tokens | context) for each continuation, context run once."""
    out = model(input_ids=torch.tensor([ctx_ids]), use_cache=True)
    first = torch.log_softmax(out.logits[0, -1].float(), -1)
    scores = []
    for cont in conts:
        lp = first[cont[0]].item()
        if len(cont) > 1:
            o = model(input_ids=torch.tensor([cont[:-1]]), past_key_values=copy.deepcopy(out.past_key_values),
                      use_cache=True)
            logp = torch.log_softmax(o.logits[0].float(), -1)
            lp += logp.gather(1, torch.tensor(cont[1:])[:, None]).sum().item()
        scores.append(lp)
    return scores


@torch.no_grad()
def _loglik_full(model, ctx_ids: list[int], cont: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([ctx_ids + cont])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, len(ctx_ids) - 1 : -1].float(), -1)
    target = torch.tensor(cont)
    ll = logp.gather(1, target[:, None]).sum().item()
    greedy = bool((logp.argmax(-1) == target).all())
    return ll, greedy


def eval_mc(model, tok, rows: list[dict], task: str) -> dict:
    per_sample = []
    for r in rows:
        if task == "winogrande":
            scores, lengths = [], []
            for ctx in r["context_options"]:
                c, cont = _join(ctx, r["continuation"])
                ctx_ids, cont_ids = _encode_pair(tok, c, cont)
                scores.append(_loglik_full(model, ctx_ids, cont_ids)[0])
                lengths.append(len(cont))
        else:
            encoded = [_encode_pair(tok, *_join(r["query"], ch)) for ch in r["choices"]]
            ctx_ids = encoded[0][0]
            if all(e[0] == ctx_ids for e in encoded):
                scores = _loglik_after(model, ctx_ids, [e[1] for e in encoded])
            else:
                scores = [_loglik_full(model, *e)[0] for e in encoded]
            lengths = [len(_join(r["query"], ch)[1]) for ch in r["choices"]]
        norm = [s / max(1, n) for s, n in zip(scores, lengths)]
        per_sample.append({"scores": scores, "pred": int(max(range(len(scores)), key=scores.__getitem__)),
                           "pred_norm": int(max(range(len(norm)), key=norm.__getitem__)), "gold": int(r["gold"])})
    n = len(per_sample)
    return {
        "acc": sum(s["pred"] == s["gold"] for s in per_sample) / n,
        "acc_norm": sum(s["pred_norm"] == s["gold"] for s in per_sample) / n,
        "n": n,
        "samples": per_sample,
    }


def eval_lambada(model, tok, rows: list[dict]) -> dict:
    total_ll, total_tokens, correct = 0.0, 0, 0
    for r in rows:
        ctx_ids, cont_ids = _encode_pair(tok, r["context"], " " + r["continuation"])
        ll, greedy = _loglik_full(model, ctx_ids, cont_ids)
        total_ll += ll
        total_tokens += len(cont_ids)
        correct += greedy
    return {"ppl": math.exp(-total_ll / total_tokens), "acc": correct / len(rows), "n": len(rows)}


def stability(original: dict, compressed: dict) -> float:
    """sum_i w_i [compressed correct on i == original correct on i], w = softmax over samples of
    the standard deviation of the original's per-choice scores (its confidence)."""
    s = torch.tensor([torch.tensor(x["scores"]).std(unbiased=False).item() for x in original["samples"]])
    w = torch.softmax(s, 0)
    same = torch.tensor([float((a["pred"] == a["gold"]) == (b["pred"] == b["gold"]))
                         for a, b in zip(original["samples"], compressed["samples"])])
    return float((w * same).sum())


def evaluate(model, tok, data_dir: Path, limit: int) -> dict:
    model.eval()
    out = {t: eval_mc(model, tok, read_task(data_dir, t, limit), t) for t in MC_TASKS}
    out["lambada"] = eval_lambada(model, tok, read_task(data_dir, "lambada_openai", limit))
    return out

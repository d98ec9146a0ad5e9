"""FoldGPT benchmark on the embedded SmolLM2-135M (results: benchmarks/foldgpt.md).

    PYTHONPATH=src python benchmarks/foldgpt_bench.py --out benchmarks/foldgpt_results.json

Trains the gates once (remove 8 of 30), then builds every variant from a fresh copy of the
original: Block Influence vs gates, sharing pairs (both initialisations), cure with and
without tail-layer distillation, and plain pruning to the same stored size with the same
cure budget. Every model is scored by the same small evaluator (below; the project's
``layerfold.eval`` had not landed when this ran): multiple-choice acc/acc_norm and stability
on the first ``--limit`` rows of each task in ../shared/data/tasks, LAMBADA last-word
accuracy and perplexity of the first ``--lambada`` rows. Results are appended to the JSON
file as each variant finishes, so a partial run keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from layerfold.data.calibration import CalibrationSpec, load_calibration
from layerfold.importance import measure_similarity
from layerfold.importance.gates import GateOptions, gate_ranking
from layerfold.methods import pruning
from layerfold.methods.foldgpt import CureOptions, run_cure
from layerfold.models.loading import load_model
from layerfold.models.surgery import count_parameters, decoder_layers, remove_layers
from layerfold.nn.shared import adjacent_groups, deduplicated_state_dict, share_groups

TASKS = ("piqa", "arc_easy", "boolq", "winogrande")


# -- a small evaluator --------------------------------------------------------------------


def _rows(path: Path, limit: int) -> list[dict]:
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
            if len(out) >= limit:
                break
    return out


def _join(ctx: str, cont: str) -> tuple[str, str]:
    return ctx, (cont if ctx.endswith((" ", "\n")) or cont.startswith(" ") else " " + cont)


@torch.no_grad()
def _loglik(model, tok, pairs: list[tuple[str, str]]) -> list[float]:
    """Summed log-likelihood of each continuation given its context (one padded batch)."""
    seqs, spans = [], []
    for ctx, cont in pairs:
        c = tok(ctx, add_special_tokens=False)["input_ids"]
        x = tok(cont, add_special_tokens=False)["input_ids"]
        seqs.append(c + x)
        spans.append((len(c), len(c) + len(x)))
    width = max(map(len, seqs))
    pad = tok.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    logp = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    out = []
    for i, (a, b) in enumerate(spans):
        target = ids[i, a:b]
        out.append(float(logp[i, a - 1 : b - 1].gather(-1, target[:, None]).sum()))
    return out


def evaluate(model, tok, data: Path, limit: int, lambada: int, boolq_limit: int) -> dict:
    model.eval()
    res: dict = {}
    for task in TASKS:
        rows = _rows(data / f"{task}.jsonl", boolq_limit if task == "boolq" else limit)
        acc = acc_norm = 0
        detail = []
        for r in rows:
            if "context_options" in r:
                pairs = [_join(c, r["continuation"]) for c in r["context_options"]]
                lengths = [len(r["continuation"])] * len(pairs)
            else:
                pairs = [_join(r["query"], ch) for ch in r["choices"]]
                lengths = [len(ch) for ch in r["choices"]]
            ll = _loglik(model, tok, pairs)
            pred = max(range(len(ll)), key=lambda i: ll[i])
            pred_n = max(range(len(ll)), key=lambda i: ll[i] / max(1, lengths[i]))
            acc += pred == r["gold"]
            acc_norm += pred_n == r["gold"]
            detail.append({"scores": ll, "correct": pred == r["gold"]})
        res[task] = {"acc": acc / len(rows), "acc_norm": acc_norm / len(rows), "n": len(rows), "detail": detail}
    rows = _rows(data / "lambada_openai.jsonl", lambada)
    nll = 0.0
    tokens = 0
    hits = 0
    with torch.no_grad():
        for r in rows:
            ctx, cont = _join(r["context"], r["continuation"])
            c = tok(ctx, add_special_tokens=False)["input_ids"]
            x = tok(cont, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([c + x])
            logp = F.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]
            # perplexity of the whole passage (context + continuation), a fixed per-document window
            nll -= float(logp[:-1].gather(-1, ids[0, 1:, None]).sum())
            tokens += ids.shape[1] - 1
            hits += bool((logp[len(c) - 1 : len(c) + len(x) - 1].argmax(-1) == ids[0, len(c):]).all())
    res["lambada"] = {"ppl": math.exp(nll / tokens), "acc": hits / len(rows), "n": len(rows), "tokens": tokens}
    return res


def stability(reference: dict, result: dict) -> dict:
    """METHODS.md: sum_i softmax(std of the original's choice scores)_i * [same correctness]."""
    out = {}
    for task in TASKS:
        ref, new = reference[task]["detail"], result[task]["detail"]
        s = torch.tensor([torch.tensor(d["scores"]).std().item() for d in ref])
        w = torch.softmax(s, dim=0)
        same = torch.tensor([float(a["correct"] == b["correct"]) for a, b in zip(ref, new)])
        out[task] = float((w * same).sum())
    return out


# -- the variants -------------------------------------------------------------------------


def stored_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in deduplicated_state_dict(model).values())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/foldgpt_results.json")
    ap.add_argument("--data", default="../shared/data/tasks")
    ap.add_argument("--limit", type=int, default=20, help="rows per multiple-choice task")
    ap.add_argument("--boolq-limit", type=int, default=8, help="rows of BoolQ (long passages)")
    ap.add_argument("--lambada", type=int, default=40, help="LAMBADA rows")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--remove", type=int, default=8)
    ap.add_argument("--gate-steps", type=int, default=25)
    ap.add_argument("--cure-steps", type=int, default=15)
    ap.add_argument("--cure-samples", type=int, default=16)
    ap.add_argument("--only", default=None, help="comma-separated variant names to run")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: the 2 cores were shared by 4 busy workers, where 2 threads ran 2.5x slower)")
    ap.add_argument("--gate-batch", type=int, default=2)
    ap.add_argument("--gate-lr", type=float, default=0.1)
    ap.add_argument("--gate-init", type=float, default=3.0)
    ap.add_argument("--cure-batch", type=int, default=2)
    ap.add_argument("--cure-seed", type=int, default=0, help="seed of the cure text (0: reuse the calibration text)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {"variants": {}}
    data = Path(args.data)

    def save():
        out_path.write_text(json.dumps(results, indent=1, default=str))

    loaded = load_model(None, device="cpu")
    orig, arch, tok = loaded.model, loaded.arch, loaded.tokenizer
    L = len(decoder_layers(orig, arch))
    calib_spec = CalibrationSpec(samples=args.calib_samples, seq_len=args.seq_len)
    ids = load_calibration(calib_spec, loaded)
    cure_spec = dataclasses.replace(calib_spec, samples=args.cure_samples, seed=args.cure_seed)
    cure_ids = load_calibration(cure_spec, loaded)
    results["setup"] = {"calibration": dataclasses.asdict(calib_spec), "cure_data": dataclasses.asdict(cure_spec),
                        "limit": args.limit, "boolq_limit": args.boolq_limit, "lambada": args.lambada,
                        "gate_steps": args.gate_steps, "cure_steps": args.cure_steps,
                        "gate_batch": args.gate_batch, "gate_lr": args.gate_lr, "gate_init": args.gate_init, "cure_batch": args.cure_batch, "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    t = time.time()
    scores = measure_similarity(orig, arch, ids, batch_size=8)
    bi = scores.block_influence
    results["bi"] = bi
    results["bi_seconds"] = time.time() - t
    if "gates" not in results:
        t = time.time()
        g = gate_ranking(orig, arch, ids, args.remove, GateOptions(steps=args.gate_steps, batch_size=args.gate_batch, lr=args.gate_lr, init=args.gate_init))
        results["gates"] = g.to_dict()
        results["gates"]["rounds"] = [{k: v for k, v in r.items()} for r in g.rounds]
        results["gate_seconds"] = time.time() - t
        save()
    gates = results["gates"]["gates"]
    gate_removed = sorted(results["gates"]["removed"])
    bi_removed = pruning.block_influence(scores, args.remove)
    print("gates remove", gate_removed, "BI removes", bi_removed, flush=True)

    def done(name):
        return name in results["variants"]

    def record(name, model, desc, extra=None):
        t = time.time()
        ev = evaluate(model, tok, data, args.limit, args.lambada, args.boolq_limit)
        row = {
            "desc": desc,
            "layers": len(decoder_layers(model, arch)),
            "params_stored": count_parameters(model),
            "bytes_stored": stored_bytes(model),
            "eval": ev,
            "eval_seconds": time.time() - t,
            **(extra or {}),
        }
        if "original" in results["variants"]:
            row["stability"] = stability(results["variants"]["original"]["eval"], ev)
        results["variants"][name] = row
        save()
        mc = sum(ev[t]["acc"] for t in TASKS) / len(TASKS)
        print(f"{name}: mean acc {mc:.4f} lambada ppl {ev['lambada']['ppl']:.2f} params {row['params_stored']:,}",
              flush=True)

    wanted = set(args.only.split(",")) if args.only else None

    def want(name):
        return (wanted is None or name in wanted) and not done(name)

    if not done("original"):
        record("original", orig, "the embedded SmolLM2-135M-Instruct")

    def pruned(remove):
        m = copy.deepcopy(orig)
        kept = remove_layers(m, arch, remove)
        return m, kept

    def cure(m, tail: bool, steps=args.cure_steps):
        opts = CureOptions(steps=steps, samples=args.cure_samples, batch_size=args.cure_batch, warmup_steps=2,
                           tail_layers=3 if tail else 0)
        t = time.time()
        c = run_cure(m, orig, arch, cure_ids, opts)
        return {"cure": {k: v for k, v in c.items() if k != "history"}, "cure_curve": [h["loss"] for h in c["history"]],
                "cure_seconds": time.time() - t}

    n8 = args.remove
    if want("bi-8"):
        m, _ = pruned(bi_removed)
        record("bi-8", m, f"remove {bi_removed} by Block Influence")
    if want("gates-8"):
        m, _ = pruned(gate_removed)
        record("gates-8", m, f"remove {gate_removed} by gates")
    for init in ("important", "mean"):
        name = f"gates-8-share2-{init}"
        if want(name):
            m, kept = pruned(gate_removed)
            share_groups(m, arch, adjacent_groups(len(kept), 2), init=init, importance=[gates[l] for l in kept])
            record(name, m, f"remove by gates, share pairs, init {init}")
    # the cured variants start from the better initialisation (lower LAMBADA perplexity)
    inits = {i: results["variants"].get(f"gates-8-share2-{i}") for i in ("important", "mean")}
    best_init = min((i for i in inits if inits[i]), key=lambda i: inits[i]["eval"]["lambada"]["ppl"], default="important")
    results["best_init"] = best_init
    for tail in (True,):
        name = f"foldgpt-8-share2-cure-{'kl+tail' if tail else 'kl'}"
        if want(name):
            m, kept = pruned(gate_removed)
            share_groups(m, arch, adjacent_groups(len(kept), 2), init=best_init, importance=[gates[l] for l in kept])
            extra = cure(m, tail)
            record(name, m, f"remove by gates, share pairs ({best_init}), cure {'KL + tail-3 MSE' if tail else 'KL only'}", extra)
    # equal stored parameters: 30 - 8 = 22 layers in 11 shared pairs store 11 layers' weights;
    # plain pruning keeps 11 layers
    n_same = L - math.ceil((L - n8) / 2)
    bi_same = pruning.block_influence(scores, n_same)
    if want(f"bi-{n_same}-cure-kl+tail"):
        m, _ = pruned(bi_same)
        extra = cure(m, True)
        record(f"bi-{n_same}-cure-kl+tail", m, f"plain pruning: remove {n_same} by BI, same cure", extra)
    for tail in (False,):
        name = f"foldgpt-8-share2-cure-{'kl+tail' if tail else 'kl'}"
        if want(name):
            m, kept = pruned(gate_removed)
            share_groups(m, arch, adjacent_groups(len(kept), 2), init=best_init, importance=[gates[l] for l in kept])
            extra = cure(m, tail)
            record(name, m, f"remove by gates, share pairs ({best_init}), cure {'KL + tail-3 MSE' if tail else 'KL only'}", extra)
    if want(f"bi-{n_same}"):
        m, _ = pruned(bi_same)
        record(f"bi-{n_same}", m, f"plain pruning: remove {n_same} by Block Influence")
    if want("gates-8-cure-kl+tail"):
        m, _ = pruned(gate_removed)
        extra = cure(m, True)
        record("gates-8-cure-kl+tail", m, "remove by gates, no sharing, cure KL + tail-3 MSE", extra)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""LLM-Streamline on the embedded SmolLM2-135M: remove 8 of 30 layers, every replacement and loss.

    PYTHONPATH=src:benchmarks python benchmarks/streamline_bench.py --limit 30 --out benchmarks/streamline_results.json

Training text: LAMBADA rows 1000.. (context + continuation), packed into --train-seqs sequences
of --seq-len tokens; evaluation uses LAMBADA rows 0..limit-1, so the two never overlap.
Everything runs in one process, one variant after another, on one thread (the machine's two
cores are shared); peak memory is the process's VmHWM, reset before each variant.
Results are written after each variant, so a cut-short run keeps what it finished.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

import mini_eval
from layerfold.data.calibration import pack_texts
from layerfold.data.pairs import PairStore
from layerfold.importance import measure_similarity
from layerfold.methods import pruning
from layerfold.methods.streamline import StreamlineOptions, block_window, choose_block, collect_pairs, streamline
from layerfold.models.loading import load_model
from layerfold.models.surgery import count_parameters, decoder_layers, decoder_parameters, remove_layers


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak resident set)


def peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=30)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--remove", type=int, default=8)
    ap.add_argument("--train-seqs", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--mse-tokens", type=int, default=76_800, help="training tokens of each MSE run")
    ap.add_argument("--lm-tokens", type=int, default=4_096, help="training tokens of each LM/KL run")
    ap.add_argument("--variants", default="original,none,layer-mse,bi,swiglu-mse,ffn-mse,layer-lm,layer-kl")
    ap.add_argument("--out", default="benchmarks/streamline_results.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-memory-check", action="store_true", help="skip collecting half the pairs first")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = Path(args.data)
    out_path = Path(args.out)
    results: dict = {"settings": vars(args), "machine": f"{platform.processor() or platform.machine()}, "
                     f"torch {torch.__version__}, {args.threads} thread(s)", "variants": {}}

    def save() -> None:
        out_path.write_text(json.dumps(results, indent=1))

    t = time.perf_counter()
    loaded = load_model(None)
    original, arch, tok = loaded.model, loaded.arch, loaded.tokenizer
    results["load_seconds"] = time.perf_counter() - t

    rows = [json.loads(l) for l in open(data / "tasks" / "lambada_openai.jsonl", encoding="utf-8")][1000:]
    texts = [r["context"] + " " + r["continuation"] for r in rows]
    ids = pack_texts(texts, tok, args.train_seqs, args.seq_len, "lambada[1000:]")
    t = time.perf_counter()
    scores = measure_similarity(original, arch, ids, progress=False)
    results["scores_seconds"] = time.perf_counter() - t
    results["block_cosine"] = scores.block_cosine(args.remove + 1)
    results["block_influence"] = scores.block_influence
    params_original = count_parameters(original)

    work = Path(tempfile.mkdtemp(prefix="lf-streamline-bench-", dir="."))
    store = None
    evals: dict = {}

    def pairs_for(window: int, seqs: int) -> tuple[PairStore, dict]:
        start = choose_block(scores, window)
        reset_peak()
        base = peak_mib()
        t = time.perf_counter()
        st = PairStore(work / f"pairs-{seqs}", seqs, args.seq_len, original.config.hidden_size, "bf16")
        collect_pairs(original, arch, ids[:seqs], start, window, st, progress=False)
        info = {"sequences": seqs, "tokens": st.tokens, "bytes_on_disk": st.nbytes(),
                "seconds": time.perf_counter() - t, "rss_before_mib": base, "peak_mib": peak_mib()}
        return st, info

    try:
        window = block_window(decoder_parameters(original, arch), 0, args.remove, None)
        # memory while collecting pairs: half the tokens, then all of them
        infos = []
        if not args.no_memory_check:
            half, info_half = pairs_for(window, args.train_seqs // 2)
            shutil.rmtree(half.folder)
            infos.append(info_half)
        store, info_full = pairs_for(window, args.train_seqs)
        results["pairs_memory"] = infos + [info_full]
        save()

        for name in args.variants.split(","):
            reset_peak()
            t0 = time.perf_counter()
            entry: dict = {}
            model = original if name == "original" else copy.deepcopy(original)
            if name == "original":
                entry["layers"] = len(decoder_layers(model, arch))
            elif name == "bi":
                removed = pruning.block_influence(scores, args.remove)
                remove_layers(model, arch, removed)
                entry["removed"] = removed
            else:
                kind, _, loss = name.partition("-")
                loss = loss or "mse"
                lm = loss in ("lm", "kl")
                opts = StreamlineOptions(
                    replacement=kind, loss=loss, train_tokens=args.lm_tokens if lm else args.mse_tokens,
                    batch_size=4, eval_every=2 if lm else 15,
                )
                log = work / f"{name}.jsonl"
                r = streamline(model, arch, ids, scores, opts, remove=args.remove, work_dir=work,
                               log_path=log, progress=False, store=store if kind != "none" else None)
                entry.update({"block": [r.start, r.start + r.window - 1], "removed": r.removed,
                              "replacement_params": r.replacement_params})
                if r.fit:
                    entry.update({"steps": r.fit.steps, "first_val": r.fit.first_val, "best_val": r.fit.best_val,
                                  "best_step": r.fit.best_step, "train_seconds": r.fit.seconds,
                                  "log": [json.loads(l) for l in log.read_text().splitlines()]})
            entry["make_seconds"] = time.perf_counter() - t0
            entry["layers"] = len(decoder_layers(model, arch))
            entry["params"] = count_parameters(model)
            t = time.perf_counter()
            ev = mini_eval.evaluate(model, tok, data, args.limit)
            entry["eval_seconds"] = time.perf_counter() - t
            entry["peak_mib"] = peak_mib()
            evals[name] = ev
            entry["tasks"] = {k: {m: v[m] for m in ("acc", "acc_norm", "ppl", "n") if m in v} for k, v in ev.items()}
            if name != "original" and "original" in evals:
                entry["stability"] = {task: mini_eval.stability(evals["original"][task], ev[task])
                                      for task in mini_eval.MC_TASKS}
            results["variants"][name] = entry
            results["params_original"] = params_original
            save()
            print(name, json.dumps({k: v for k, v in entry.items() if k not in ("log",)}), flush=True)
            if model is not original:
                del model
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save()


if __name__ == "__main__":
    main()

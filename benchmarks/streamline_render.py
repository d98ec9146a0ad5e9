"""Render benchmarks/streamline_results.json as the Markdown tables of benchmarks/streamline.md.

    python benchmarks/streamline_render.py benchmarks/streamline_results.json
"""

from __future__ import annotations

import json
import sys

TASKS = ("piqa", "arc_easy", "boolq", "winogrande")
NAMES = {
    "original": "original (30 layers)",
    "none": "prune only: Streamline block, first layer kept untrained",
    "layer-mse": "Streamline `layer`, MSE",
    "swiglu-mse": "Streamline `swiglu`, MSE",
    "ffn-mse": "Streamline `ffn` (gelu, width 1536), MSE",
    "layer-lm": "Streamline `layer`, LM loss",
    "layer-kl": "Streamline `layer`, KL to original",
    "bi": "ShortGPT BI, 8 layers removed",
}


def main(path: str) -> None:
    d = json.load(open(path))
    v = d["variants"]
    print("| variant | " + " | ".join(f"{t} acc / norm" for t in TASKS)
          + " | mean acc | LAMBADA ppl | LAMBADA acc | stability (mean of 4) | parameters | training | peak RSS |")
    print("|---|" + "---:|" * (len(TASKS) + 7))
    for name, e in v.items():
        t = e["tasks"]
        accs = [t[k]["acc"] for k in TASKS]
        cells = [f"{t[k]['acc']:.2f} / {t[k]['acc_norm']:.2f}" for k in TASKS]
        stab = e.get("stability")
        stab_s = f"{sum(stab.values()) / len(stab):.3f}" if stab else "1 (itself)"
        train = f"{e['train_seconds']:.0f} s, {e['steps']} steps" if "steps" in e else "-"
        print(f"| {NAMES.get(name, name)} | " + " | ".join(cells)
              + f" | {sum(accs) / len(accs):.3f} | {t['lambada']['ppl']:.2f} | {t['lambada']['acc']:.2f}"
              + f" | {stab_s} | {e['params']:,} | {train} | {e['peak_mib']:.0f} MiB |")
    print()
    print("Stability per task:")
    print()
    print("| variant | " + " | ".join(TASKS) + " |")
    print("|---|" + "---:|" * len(TASKS))
    for name, e in v.items():
        if "stability" in e:
            print(f"| {NAMES.get(name, name)} | " + " | ".join(f"{e['stability'][k]:.3f}" for k in TASKS) + " |")
    print()
    print("Training (validation MSE for MSE runs, validation loss otherwise; best state kept):")
    print()
    print("| variant | block | steps | val loss before | best val loss | at step | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, e in v.items():
        if "steps" in e:
            print(f"| {NAMES.get(name, name)} | {e['block'][0]}..{e['block'][1]} | {e['steps']} | {e['first_val']:.4g} | "
                  f"{e['best_val']:.4g} | {e['best_step']} | {e['train_seconds']:.0f} |")
    if "pairs_memory" in d:
        print()
        print("Collecting training pairs (one pass to the block's end, bf16 on disk):")
        print()
        print("| sequences | tokens | pairs on disk | RSS before | peak RSS while collecting | seconds |")
        print("|---:|---:|---:|---:|---:|---:|")
        for p in d["pairs_memory"]:
            print(f"| {p['sequences']} | {p['tokens']:,} | {p['bytes_on_disk'] / 2**20:.1f} MiB | "
                  f"{p['rss_before_mib']:.0f} MiB | {p['peak_mib']:.0f} MiB | {p['seconds']:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/streamline_results.json")

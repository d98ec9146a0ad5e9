"""Render the tables of benchmarks/foldgpt.md from foldgpt_bench.py's JSON.

    python benchmarks/foldgpt_table.py benchmarks/foldgpt_results.json
"""

from __future__ import annotations

import json
import sys

TASKS = ("piqa", "arc_easy", "boolq", "winogrande")


def main(path: str, *more: str) -> None:
    """``more``: results of earlier runs whose variants join the table, named run1:..., run2:..."""
    r = json.load(open(path))
    v = dict(r["variants"])
    orig = v["original"]
    for i, extra in enumerate(more, 1):
        for name, row in json.load(open(extra))["variants"].items():
            v[f"run{i}: {name}"] = row
    print("| variant | layers | stored params | stored MiB | " + " | ".join(TASKS)
          + " | mean acc | kept | LAMBADA acc | LAMBADA ppl | mean stability | cure s |")
    print("|---|---:|---:|---:|" + "---:|" * len(TASKS) + "---:|---:|---:|---:|---:|---:|")
    base_mean = sum(orig["eval"][t]["acc"] for t in TASKS) / len(TASKS)
    for name, row in v.items():
        ev = row["eval"]
        accs = [ev[t]["acc"] for t in TASKS]
        mean = sum(accs) / len(accs)
        stab = row.get("stability")
        stab_s = f"{sum(stab.values()) / len(stab):.3f}" if stab else "-"
        cure = f"{row['cure_seconds']:.0f}" if "cure_seconds" in row else "-"
        print(f"| {name} | {row['layers']} | {row['params_stored'] / 1e6:.1f}M | {row['bytes_stored'] / 2**20:.0f} | "
              + " | ".join(f"{a:.3f}" for a in accs)
              + f" | {mean:.3f} | {100 * mean / base_mean:.0f}% | {ev['lambada']['acc']:.3f} | {ev['lambada']['ppl']:.1f} | {stab_s} | {cure} |")
    print()
    g = r["gates"]["gates"]
    bi = r["bi"]
    L = len(g)
    order_g = sorted(range(L), key=lambda l: (g[l], l))
    order_b = sorted(range(L), key=lambda l: (bi[l], l))
    print("| layer | " + " | ".join(str(l) for l in range(L)) + " |")
    print("|---|" + "---:|" * L)
    print("| gate | " + " | ".join(f"{x:.2f}" for x in g) + " |")
    print("| BI | " + " | ".join(f"{x:.3f}" for x in bi) + " |")
    print("| gate rank | " + " | ".join(str(order_g.index(l)) for l in range(L)) + " |")
    print("| BI rank | " + " | ".join(str(order_b.index(l)) for l in range(L)) + " |")
    n = len(r["gates"]["removed"])
    print(f"\nremove {n}: gates {sorted(order_g[:n])}, BI {sorted(order_b[:n])}, "
          f"overlap {len(set(order_g[:n]) & set(order_b[:n]))}")
    # Spearman rank correlation
    d2 = sum((order_g.index(l) - order_b.index(l)) ** 2 for l in range(L))
    print(f"Spearman rank correlation gate vs BI: {1 - 6 * d2 / (L * (L * L - 1)):.3f}")
    for name, row in v.items():
        if "cure_curve" in row:
            c = row["cure_curve"]
            print(f"{name}: cure loss {c[0]:.3f} -> {c[-1]:.3f} over {len(c)} steps")


if __name__ == "__main__":
    main(*sys.argv[1:])

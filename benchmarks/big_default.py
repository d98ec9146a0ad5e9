"""A model larger than the streamed plan's memory, with the defaults (issue 21, item 4).

    python benchmarks/big_default.py make --work /tmp/big21     # the 4.68 GB random Llama (once)
    python benchmarks/big_default.py run --work /tmp/big21      # `layerfold compress BIG --no-heal`
    python benchmarks/big_default.py run --heal --tag streamline -- --method streamline --remove 6 \
        --calib-samples 8 --seq-len 128                         # the issue's first try, as a user would

``make`` writes perf.py's "5gb" shape (hidden 2,048, 22 layers, untied head, the embedded
model's tokenizer, fp32 safetensors). ``run`` runs the command with no other option in a fresh
process and measures its peak RSS two ways: ``getrusage`` of that process (its maximum resident
set) and ``/proc/PID/status`` sampled every 0.5 s (VmRSS, labelled with the last line the
command printed, so the peak can be placed in a stage). The figures go to
``benchmarks/results/perf/big-default.json``; ``benchmarks/perf.md`` quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf import machine, make_random_llama  # noqa: E402

from layerfold.memory_plan import rss_bytes  # noqa: E402

OUT = Path("benchmarks/results/perf")


def make(args) -> None:
    folder = Path(args.work) / "llama-5gb"
    t = time.perf_counter()
    n = make_random_llama("5gb", folder)
    print(json.dumps({"folder": str(folder), "weight_bytes": n, "seconds": time.perf_counter() - t}))


def run(args) -> None:
    work = Path(args.work)
    folder = work / "llama-5gb"
    weight_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    out = work / "out-default"
    cmd = [sys.executable, "-m", "layerfold", "compress", str(folder), *([] if args.heal else ["--no-heal"]),
           "-o", str(out), "--force", *args.extra]
    env = dict(os.environ, TQDM_DISABLE="1")
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    samples: list[tuple[float, int, str]] = []

    def sample():
        while proc.poll() is None:
            samples.append((time.perf_counter() - t, rss_bytes(proc.pid), lines[-1] if lines else ""))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        print(line, end="", flush=True)
    rc = proc.wait()
    seconds = time.perf_counter() - t
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the only child this process ran
    top = max(samples, key=lambda s: s[1]) if samples else (0, 0, "")
    record = {"command": " ".join(["layerfold", *cmd[3:]]), "returncode": rc, "weight_bytes": weight_bytes,
              "peak_rss_bytes": peak, "ratio": peak / weight_bytes, "seconds": seconds,
              "sampled_peak": {"seconds": top[0], "vmrss_bytes": top[1], "after_line": top[2]},
              "output": lines, "machine": machine(),
              "load_average": os.getloadavg()}
    OUT.mkdir(parents=True, exist_ok=True)
    name = "big-default" + (("-" + args.tag) if args.tag else "")
    (OUT / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    (OUT / f"{name}-rss.tsv").write_text("".join(f"{s:.1f}\t{b}\t{w}\n" for s, b, w in samples))
    print(json.dumps({k: v for k, v in record.items() if k != "output"}, indent=1))
    if rc != 0:
        raise SystemExit(rc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["make", "run"])
    ap.add_argument("--work", default="/tmp/big21")
    ap.add_argument("--tag", default="", help="run: suffix of the result file")
    ap.add_argument("--heal", action="store_true", help="run: without --no-heal (the plan decides about healing)")
    args, extra = ap.parse_known_args()  # run: more options for the command, after --
    args.extra = [a for a in extra if a != "--"]
    {"make": make, "run": run}[args.action](args)


if __name__ == "__main__":
    main()

"""Quick gate experiments on the embedded SmolLM2-135M: short rows, a cached teacher, many variants.

For trying gate settings in minutes instead of half an hour (benchmarks/foldgpt.md, section 1,
"exploratory"): the first NROWS calibration rows (32 x 256 self-written, seed 0) cut to SEQ
tokens, the original's log-probabilities and Block Influence (on the full rows) cached in
/tmp/fold16, then each variant trains gates toward keeping 22 of 30 layers and prints the
held-out check (8 x 256 rows, seed 2) against Block Influence's 8 and the step log, one
character per gate: 0 / 1 when the deterministic gate is within 0.01 of it, '.' otherwise.

    SEQ=128 python benchmarks/gates_quick.py "hard-concrete:steps=40" "hard-concrete:warm_start=none:steps=40"

A variant is gates.py's GATE_TYPE[:FIELD=VALUE...].
"""
import os
import sys
import time
from pathlib import Path

import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gates import parse_variant
from layerfold.data.calibration import CalibrationSpec, load_calibration
from layerfold.eval.heldout import heldout_ids, reference_log_probs
from layerfold.importance import measure_similarity
from layerfold.importance.gates import train_gates, check_choice, lowest_gated
from layerfold.models.loading import load_model

T = int(os.environ.get("SEQ", 128))
ROWS = int(os.environ.get("NROWS", 32))
cache = Path(os.environ.get("CACHE", "/tmp/fold16")) / f"cache-{ROWS}x{T}.pt"
loaded = load_model(None)
m, arch = loaded.model, loaded.arch
cache.parent.mkdir(parents=True, exist_ok=True)
if cache.exists():
    c = torch.load(cache)
else:
    spec = CalibrationSpec()
    calib = load_calibration(spec, loaded, progress=False)[:ROWS, :T].contiguous()
    held = heldout_ids(spec, loaded, progress=False)
    c = {"calib": calib, "teacher": reference_log_probs(m, calib, 2), "held": held,
         "ref": reference_log_probs(m, held),
         "bi": measure_similarity(m, arch, load_calibration(spec, loaded, progress=False), progress=False).block_influence}
    torch.save(c, cache)
bi_removed = lowest_gated(c["bi"], 8)
for spec in sys.argv[1:]:
    opts = parse_variant(spec)
    t0 = time.time()
    prior = c["bi"] if opts.warm_start == "block-influence" and opts.gate_type == "hard-concrete" else None
    with torch.enable_grad():
        t = train_gates(m, arch, c["calib"], 22, opts, teacher=c["teacher"], prior=prior, progress=False)
    secs = time.time() - t0
    g = t.log[-1]["gates"]
    between = sum(0.01 < x < 0.99 for x in g)
    chk = check_choice(m, arch, c["held"], {"g": t.removed, "bi": bi_removed}, c["ref"])
    print(f"{spec}: {secs:.0f}s between={between} removed={t.removed} kl={chk['g']['kl']:.4f} bi_kl={chk['bi']['kl']:.4f}", flush=True)
    for e in t.log[:: max(1, len(t.log)//8)] + [t.log[-1]]:
        print("  ", e["step"], f"kl={e['kl']:.2f}", {k: round(e[k], 2) for k in ("expected_kept", "lambda1", "lambda2", "mu", "target") if k in e}, "off", e["off"], "".join("0" if x <= 0.01 else "1" if x >= 0.99 else "." for x in e["gates"]))
    print("   scores", [round(s, 1) for s in t.scores], flush=True)

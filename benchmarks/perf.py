"""Cost floors of the streamed pipeline (issue "Scale"): each figure is a ratio measured in one run.

    python benchmarks/perf.py analysis   # importance pass (all criteria) / one plain forward pass
    python benchmarks/perf.py decode     # decode tokens/s of the pruned model / the original's
    python benchmarks/perf.py rss        # peak RSS of `layerfold compress --method streamline` / weight bytes,
                                         # on random Llama models this script writes (default ~5 GB)
    python benchmarks/perf.py heal       # peak RSS and healing tokens/s of the main job (--heal-tokens 4096),
                                         # chunked logits / full logits, with and without --heal-checkpointing,
                                         # and healing tokens/s / the bound set by this machine's GEMM FLOP/s
    python benchmarks/perf.py alloc      # CPU seconds (user, system) per token of the healed decoder's forward +
                                         # backward with glibc's own thresholds / fixed by train.allocator
    python benchmarks/perf.py parallel   # `accelerate launch` healing with 2 CPU processes (gloo) against
                                         # 1 process, the same global batch: weight difference and times

Results go to ``benchmarks/results/perf/ACTION.json``; ``benchmarks/perf.md`` quotes them.
Timings alternate the two things compared (A B A B ...) and take medians, so a machine that
is busy with something else slows both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

OUT = Path("benchmarks/results/perf")


def machine() -> dict:
    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def save(name: str, record: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps({**record, "machine": machine()}, indent=1) + "\n")
    print(json.dumps(record, indent=1))


def alternate(a, b, repeats: int) -> tuple[list[float], list[float]]:
    """Time ``a`` and ``b`` in turns after one warm-up each."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        for f, times in ((a, ta), (b, tb)):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
    return ta, tb


def analysis(args) -> None:
    """All criteria from one layer-by-layer pass, against the model's own forward pass over the
    same tokens in the same batches (hidden states only: neither computes logits)."""
    from layerfold.data.calibration import CalibrationSpec, load_calibration
    from layerfold.importance import measure_similarity
    from layerfold.models.loading import load_model

    loaded = load_model(None, dtype="fp32", device="cpu")
    ids = load_calibration(CalibrationSpec(samples=args.samples, seq_len=args.seq_len), loaded, progress=False)
    model, arch = loaded.model, loaded.arch
    base = model.get_decoder()

    @torch.no_grad()
    def plain():
        for i in range(0, ids.shape[0], args.batch_size):
            base(input_ids=ids[i: i + args.batch_size], use_cache=False)

    def scores():
        measure_similarity(model, arch, ids, batch_size=args.batch_size, progress=False)

    t_scores, t_plain = alternate(scores, plain, args.repeats)
    ratio = statistics.median(t_scores) / statistics.median(t_plain)
    save("analysis", {"tokens": ids.numel(), "batch_size": args.batch_size, "seconds_analysis": t_scores,
                      "seconds_forward": t_plain, "ratio": ratio})


def decode(args) -> None:
    """Greedy decoding speed, batch 1, of the original and of the same model with --remove layers
    removed by Block Influence (the weights do not change the speed, so no healing)."""
    import copy

    from layerfold.data.calibration import CalibrationSpec, load_calibration
    from layerfold.eval.cost import measure_cost
    from layerfold.importance import measure_similarity
    from layerfold.methods.pruning import PRUNING_METHODS
    from layerfold.models.loading import load_model
    from layerfold.models.surgery import remove_layers

    loaded = load_model(None, dtype="fp32", device="cpu")
    original = loaded.model
    ids = load_calibration(CalibrationSpec(), loaded, progress=False)
    scores = measure_similarity(original, loaded.arch, ids, progress=False)
    pruned = copy.deepcopy(original)
    n = original.config.num_hidden_layers
    remove_layers(pruned, loaded.arch, PRUNING_METHODS["bi"](scores, args.remove))

    def speed(model):
        return lambda: runs.setdefault(id(model), []).append(
            measure_cost(model, prefill_tokens=args.prefill, decode_tokens=args.tokens, repeats=1))

    runs: dict[int, list] = {}
    alternate(speed(original), speed(pruned), args.repeats)
    dec = {k: statistics.median(c.decode_tokens_per_s for c in v[1:]) for k, v in runs.items()}
    pre = {k: statistics.median(c.prefill_tokens_per_s for c in v[1:]) for k, v in runs.items()}
    o, p = id(original), id(pruned)
    save("decode", {"layers": [n, n - args.remove], "ideal_ratio": n / (n - args.remove),
                    "decode_tokens": args.tokens, "prefill_tokens": args.prefill,
                    "decode_tokens_per_s": {"original": dec[o], "pruned": dec[p]}, "decode_ratio": dec[p] / dec[o],
                    "prefill_tokens_per_s": {"original": pre[o], "pruned": pre[p]}, "prefill_ratio": pre[p] / pre[o]})


# -- peak memory of the streamed compress ---------------------------------------------

SHAPES = {  # Llama-architecture shapes; fp32 weight bytes in the comment
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2),  # ~25 MB, a smoke test
    "1gb": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=22, num_attention_heads=16,
                num_key_value_heads=4),  # ~1.1 GB
    "5gb": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4),  # ~4.9 GB
}


def make_random_llama(shape: str, folder: Path) -> int:
    """A random Llama model with the embedded model's tokenizer; returns its weight bytes."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from layerfold.models.loading import load_model

    if (folder / "config.json").exists():
        return _weight_bytes(folder)
    tok = load_model(None).tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=False,
                      **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="1GB")
    tok.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(tmp)  # readable
    tmp.rename(folder)
    return _weight_bytes(folder)


def _weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# a fresh parent per measurement: RUSAGE_CHILDREN keeps the maximum over all children ever run
PEAK_OF_CHILD = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
    "sys.exit(rc)\n"
)


def rss(args) -> None:
    """Peak RSS of a fresh `layerfold compress --method streamline` process per model size and
    calibration budget, divided by the model's weight bytes."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    text = work / "calib.txt"
    if not text.exists():  # any text will do for a random model; this is the project's own docs
        docs = [Path("README.md").read_text(), *(p.read_text() for p in Path("benchmarks").glob("*.md"))]
        text.write_text("\n\n".join(docs))
    rows = []
    for shape in args.shapes.split(","):
        folder = work / f"llama-{shape}"
        t = time.perf_counter()
        weight_bytes = make_random_llama(shape, folder)
        made = time.perf_counter() - t
        for samples in [int(s) for s in args.samples.split(",")]:
            out = work / f"out-{shape}-{samples}"
            cmd = [sys.executable, "-m", "layerfold", "-q", "compress", str(folder), "--method", "streamline",
                   "--remove", str(args.remove), "--calib", str(text), "--calib-samples", str(samples),
                   "--seq-len", str(args.seq_len), "--no-heal", "--no-eval", "--force", "-o", str(out),
                   "--pairs-dir", str(work)]
            t = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", PEAK_OF_CHILD, *cmd], capture_output=True, text=True)
            seconds = time.perf_counter() - t
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
            peak = int(done.stdout.strip().splitlines()[-1])
            row = {"shape": shape, "weight_bytes": weight_bytes, "calib_tokens": samples * args.seq_len,
                   "peak_rss_bytes": peak, "ratio": peak / weight_bytes, "seconds": seconds,
                   "make_model_seconds": made, "command": " ".join(cmd[1:])}
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    save(f"rss-{args.shapes.replace(',', '-')}", {"rows": rows})

HEAL_VARIANTS = {  # name: the flags beside `layerfold -q compress --heal-tokens N --no-eval`
    # no flag: each code's own defaults (with --src, the same command on older code)
    "defaults (no flag)": [],
    # 8 rows per micro-batch, 1 micro-batch per step: healing's default until micro-batches of 1
    "chunked logits (8 x 1, the old default)": ["--heal-batch-size", "8"],
    "full logits (--heal-logit-chunk -1)": ["--heal-batch-size", "8", "--heal-logit-chunk", "-1"],
    "chunked logits, --heal-checkpointing": ["--heal-batch-size", "8", "--heal-checkpointing"],
    "full logits, --heal-checkpointing": ["--heal-batch-size", "8", "--heal-logit-chunk", "-1", "--heal-checkpointing"],
    # the same 8-row optimizer steps (the same rows, train.loop._Rows) in micro-batches of 4, 2 or 1
    "micro-batches 4 x 2 (--heal-batch-size 4 --grad-accum 2)": ["--heal-batch-size", "4", "--grad-accum", "2"],
    "micro-batches 2 x 4 (--heal-batch-size 2 --grad-accum 4)": ["--heal-batch-size", "2", "--grad-accum", "4"],
    "micro-batches 1 x 8 (--heal-batch-size 1 --grad-accum 8, the default)": ["--heal-batch-size", "1",
                                                                                "--grad-accum", "8"],
    "micro-batches 1 x 8, --heal-checkpointing": ["--heal-batch-size", "1", "--grad-accum", "8",
                                                  "--heal-checkpointing"],
}


def _linear_shapes(config, layers: int) -> list[tuple[int, int]]:
    """(in, out) of every matrix product a token goes through in a Llama-type decoder, head included."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (getattr(config, "head_dim", None) or h // config.num_attention_heads)
    per_layer = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    return per_layer * layers + [(h, config.vocab_size)]


def gemm_flops_per_second(shapes: list[tuple[int, int]], tokens: int, repeats: int = 3,
                          clock=time.perf_counter) -> float:
    """FLOP/s of X[tokens, in] @ W[in, out] over the model's distinct shapes, weighted as the model
    uses them (best of ``repeats`` per shape), in this process with its torch threads.
    ``clock=time.process_time``: per CPU second instead of per wall second, which the other
    jobs on shared cores slow far less (set beside healing's own CPU seconds per token)."""
    flops = seconds = 0.0
    counts: dict[tuple[int, int], int] = {}
    for s in shapes:
        counts[s] = counts.get(s, 0) + 1
    for (n_in, n_out), count in counts.items():
        x, w = torch.randn(tokens, n_in), torch.randn(n_in, n_out)
        x @ w
        # a CPU clock ticks coarsely: repeat the product until each sample is long enough
        reps = max(1, int(0.05 / max(_timed(lambda: x @ w), 1e-6)))
        best = min(_timed(lambda: [x @ w for _ in range(reps)], clock) for _ in range(repeats)) / reps
        flops += count * 2 * tokens * n_in * n_out
        seconds += count * best
    return flops / seconds


def _timed(f, clock=time.perf_counter) -> float:
    t = clock()
    f()
    return clock() - t


def heal_flops_per_token(config, layers: int, seq_len: int, lora_rank: int, checkpointing: bool) -> dict:
    """Forward + backward FLOPs per token of LoRA healing against a cached teacher: the frozen
    matrices' forward (2 per weight) and input gradient (2 more; no weight gradient), LoRA's
    three products each way, causal attention (QK^T and AV, half the positions on average:
    2 x seq x H per layer forward, twice that backward); --heal-checkpointing recomputes the
    decoder's forward once more."""
    shapes = _linear_shapes(config, layers)
    dense = sum(a * b for a, b in shapes)
    decoder = dense - config.hidden_size * config.vocab_size
    lora = sum(lora_rank * (a + b) for a, b in shapes[:-1])
    attention = 2 * seq_len * config.hidden_size * layers  # forward, causal
    forward = 2 * dense + 2 * lora + attention
    backward = 2 * dense + 4 * lora + 2 * attention
    recompute = 2 * decoder + 2 * lora + attention if checkpointing else 0
    return {"forward": forward, "backward": backward, "recompute": recompute,
            "total": forward + backward + recompute}


# the same, and the child's CPU seconds (user + system) as a second line
PEAK_AND_CPU_OF_CHILD = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(u.ru_maxrss * 1024)\n"
    "print(u.ru_utime + u.ru_stime)\n"
    "sys.exit(rc)\n"
)


def heal(args) -> None:
    """Peak RSS and healing tokens/s of `layerfold compress` (the main job) per variant, in fresh
    processes in turns; GEMM FLOP/s on the model's shapes measured between the runs. Beside the
    wall times, CPU seconds per healing token (the steps' ``cpu_seconds`` in the training log):
    on shared cores the wall time measures the others' load too, the CPU time this run's work.
    ``--env KEY=VALUE,...`` adds variables to the runs' environment (e.g. glibc's
    MALLOC_MMAP_THRESHOLD_); ``--label`` names the result file."""
    from transformers import AutoConfig

    from layerfold.models.loading import model_skeleton

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads or 1))
    extra_env = dict(kv.split("=", 1) for kv in args.env.split(",") if kv)
    env.update(extra_env)
    if args.src:  # the code to measure (e.g. a git archive of an older commit), for the runs only
        env["PYTHONPATH"] = str(Path(args.src).resolve())
    rows, gemm, gemm_cpu = [], [], []
    names = list(HEAL_VARIANTS) if args.variants == "all" else [n for n in HEAL_VARIANTS
                                                                 if any(v in n for v in args.variants.split(","))]
    for r in range(args.repeats):
        for name in names:
            out, log = work / f"heal-out-{os.getpid()}", work / f"heal-log-{os.getpid()}.jsonl"
            log.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "layerfold", "-q", "compress", "-o", str(out), "--force",
                   "--heal-tokens", str(args.heal_tokens), "--no-eval", "--heal-log", str(log), *HEAL_VARIANTS[name]]
            t = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", PEAK_AND_CPU_OF_CHILD, *cmd], capture_output=True, text=True,
                                  env=env)
            seconds = time.perf_counter() - t
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
            steps = [json.loads(line) for line in log.read_text().splitlines() if '"event": "step"' in line]
            record = json.loads((out / "layerfold.json").read_text())
            config = AutoConfig.from_pretrained(out)
            peak, cpu = done.stdout.strip().splitlines()[-2:]
            heal_cpu = sum(s["cpu_seconds"] for s in steps) if all("cpu_seconds" in s for s in steps) else None
            row = {"variant": name, "repeat": r, "env": extra_env, "peak_rss_bytes": int(peak),
                   "heal_tokens_per_second": steps[-1]["tokens_per_second"], "heal_steps": len(steps),
                   "heal_cpu_seconds": heal_cpu,
                   "heal_cpu_seconds_per_token": heal_cpu / steps[-1]["tokens"] if heal_cpu is not None else None,
                   "heal_seconds": record.get("seconds", {}).get("heal"), "wall_seconds": seconds,
                   "cpu_seconds": float(cpu), "layers_after": config.num_hidden_layers, "command": " ".join(cmd[1:])}
            rows.append(row)
            print(json.dumps(row), flush=True)
            # the machine's GEMM rate on the healed model's shapes, between the runs, same threads
            seq, batch = record["recipe"]["heal"]["data"]["seq_len"], record["recipe"]["heal"]["batch_size"]
            shapes = _linear_shapes(config, config.num_hidden_layers)
            gemm.append(gemm_flops_per_second(shapes, batch * seq))
            gemm_cpu.append(gemm_flops_per_second(shapes, batch * seq, clock=time.process_time))
            print(json.dumps({"gemm_flops_per_second": gemm[-1], "gemm_flops_per_cpu_second": gemm_cpu[-1]}),
                  flush=True)
    original = model_skeleton(None, dtype="fp32", device="cpu").model
    weight_bytes = 4 * sum(p.numel() for p in original.parameters())  # fp32, the tied head once
    heal_cfg = record["recipe"]["heal"]
    flops = {ck: heal_flops_per_token(config, config.num_hidden_layers, heal_cfg["data"]["seq_len"],
                                      heal_cfg["lora_rank"], ck) for ck in (False, True)}
    label = args.label or ("" if args.variants == "all" else args.variants.replace(",", "-").replace(" ", ""))
    save(f"heal-{args.heal_tokens}" + (f"-{label}" if label else ""), {
        "rows": rows, "src": args.src, "gemm_flops_per_second": gemm, "gemm_flops_per_cpu_second": gemm_cpu,
        "flops_per_token": {"plain": flops[False], "checkpointing": flops[True]}, "original_weight_bytes": weight_bytes})


ALLOC_CHILD = r"""
import json, resource, sys, torch
from layerfold.healing import HealOptions, _make_trainable
from layerfold.models.loading import load_model
from layerfold.models.surgery import remove_layers
torch.set_num_threads(1)
mode, batch, seq, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if mode == "fixed":
    from layerfold.train.allocator import return_freed_memory
    return_freed_memory()
loaded = load_model(None, dtype="fp32", device="cpu")
n = loaded.model.config.num_hidden_layers
remove_layers(loaded.model, loaded.arch, list(range(n - 10, n - 2)))
model, _, _ = _make_trainable(loaded, HealOptions(tokens=1))
model.train()
decoder = model.get_decoder()
ids = torch.randint(0, 49152, (batch, seq), generator=torch.Generator().manual_seed(0))
rows = []
for step in range(steps):
    u0 = resource.getrusage(resource.RUSAGE_SELF)
    decoder(input_ids=ids, use_cache=False).last_hidden_state.pow(2).mean().backward()
    u1 = resource.getrusage(resource.RUSAGE_SELF)
    rows.append({"user": u1.ru_utime - u0.ru_utime, "system": u1.ru_stime - u0.ru_stime,
                 "minor_faults": u1.ru_minflt - u0.ru_minflt})
print(json.dumps({"mode": mode, "steps": rows, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def alloc(args) -> None:
    """What train.allocator costs in CPU time: fresh processes in turns (plain, fixed, plain,
    fixed, ...), each running forward + backward of the main job's healed decoder (22 layers,
    LoRA r=16, a micro-batch of --batch-size x --seq-len tokens; the loss is the hidden states'
    mean square, so only the decoder's allocations count) --steps times; the first step is a
    warm-up, the others are reported as user and system CPU seconds per token and page faults."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads or 1))
    for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        env.pop(k, None)
    runs = []
    for r in range(args.repeats):
        for mode in ("plain", "fixed"):
            done = subprocess.run([sys.executable, "-c", ALLOC_CHILD, mode, str(args.batch_size), str(args.seq_len),
                                   str(args.steps)], capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-2000:])
            run = json.loads(done.stdout.strip().splitlines()[-1])
            runs.append(run)
            print(json.dumps(run), flush=True)
    tokens = args.batch_size * args.seq_len
    summary = {}
    for mode in ("plain", "fixed"):
        steps = [s for run in runs if run["mode"] == mode for s in run["steps"][1:]]
        summary[mode] = {k: statistics.median(s[k] for s in steps) / tokens for k in ("user", "system", "minor_faults")}
    save("alloc", {"tokens_per_step": tokens, "runs": runs, "median_per_token_after_warmup": summary})


# accelerate's multi-process launcher (torchrun underneath); with no GPU layerfold joins the
# processes over gloo on the CPU (train.parallel). `--cpu` would start one process only.
LAUNCH = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no"]


def parallel(args) -> None:
    """`layerfold heal` of the embedded model with --remove layers removed (a fixed set: which ones
    does not matter here), LoRA and KL to the cached teacher, once in 1 process with
    ``--batch-size`` rows per micro-batch and once under `accelerate launch` with 2 processes of
    half that: the same global batch, so the same training up to float rounding. Each run has
    its own teacher cache (both build it). Weight difference of the two outputs and times.
    ``--launchers ddp,fsdp``: which 2-process runs (``fsdp``: `accelerate launch --use_fsdp`, the
    decoder layers sharded over the processes, train.sharding)."""
    from safetensors.torch import load_file

    from layerfold.models.loading import load_model
    from layerfold.models.surgery import remove_layers

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    student, teacher = work / "student", work / "teacher"
    if not (student / "config.json").exists():
        loaded = load_model(None, dtype="fp32", device="cpu")
        loaded.model.save_pretrained(teacher, safe_serialization=True)
        loaded.tokenizer.save_pretrained(teacher)
        n = loaded.model.config.num_hidden_layers
        remove_layers(loaded.model, loaded.arch, list(range(n - 2 - args.remove, n - 2)))
        loaded.model.save_pretrained(student, safe_serialization=True)
        loaded.tokenizer.save_pretrained(student)
    text = work / "heal.txt"  # any text: the project's own docs
    if not text.exists():
        text.write_text("\n\n".join([Path("README.md").read_text(), *(p.read_text() for p in sorted(Path("benchmarks").glob("*.md")))]))
    if args.batch_size % 2:
        raise SystemExit("--batch-size must split over 2 processes")

    def heal_args(out: Path, batch: int) -> list[str]:
        return ["-m", "layerfold", "-q", "heal", str(student), "--teacher", str(teacher), "--heal-data", str(text),
                "--heal-log", str(out) + ".log.jsonl",
                "--heal-seq-len", str(args.seq_len), "--heal-tokens", str(args.heal_tokens),
                "--heal-batch-size", str(batch), "--dtype", "fp32", "--device", "cpu", "--force", "-o", str(out)]

    port = str(29500 + os.getpid() % 500)
    launchers = [x.strip() for x in args.launchers.split(",") if x.strip()]
    outs = {"1 process": work / "out-1", "2 processes": work / "out-2", "2 processes, FSDP": work / "out-2-fsdp"}
    runs = {"1 process": heal_args(outs["1 process"], args.batch_size)}
    if "ddp" in launchers:
        runs["2 processes"] = [*LAUNCH, "--num_processes", "2", "--main_process_port", port,
                               *heal_args(outs["2 processes"], args.batch_size // 2)]
    if "fsdp" in launchers:  # the same launcher with ACCELERATE_USE_FSDP
        runs["2 processes, FSDP"] = [*[("--use_fsdp" if a == "--multi_gpu" else a) for a in LAUNCH], "--num_processes",
                                     "2", "--main_process_port", port,
                                     *heal_args(outs["2 processes, FSDP"], args.batch_size // 2)]
    rows = {}
    for name, cmd in runs.items():
        cache = work / f"cache-{name.split()[0]}{'-fsdp' if 'FSDP' in name else ''}"
        shutil.rmtree(cache, ignore_errors=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads or 1), LAYERFOLD_CACHE=str(cache),
                   ACCELERATE_CONFIG_FILE=os.devnull)
        env.pop("WORLD_SIZE", None)
        t = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", PEAK_AND_CPU_OF_CHILD, sys.executable, *cmd], capture_output=True,
                              text=True, env=env)
        seconds = time.perf_counter() - t
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        peak, cpu = done.stdout.strip().splitlines()[-2:]
        out = outs[name]
        record = json.loads((out / "layerfold.json").read_text())
        steps = [json.loads(line) for line in Path(str(out) + ".log.jsonl").read_text().splitlines()
                 if '"event": "step"' in line]
        rows[name] = {"wall_seconds": seconds, "cpu_seconds_all_processes": float(cpu),
                      "largest_process_peak_rss_bytes": int(peak), "heal_seconds": record["heal"]["seconds"],
                      "train_cpu_seconds_main_process": sum(s["cpu_seconds"] for s in steps),
                      "loss_last": record["heal"]["loss_last"],
                      "command": " ".join(["python", *cmd])}
        print(json.dumps({name: rows[name]}), flush=True)

    def weights(folder: Path) -> dict:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    w1, w0 = weights(outs["1 process"]), weights(student)
    diffs = {}
    for name in runs:
        if name != "1 process":
            w2 = weights(outs[name])
            assert w1.keys() == w2.keys()
            diffs[name] = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w1 if k in w0)
    record = {"heal_tokens": args.heal_tokens, "seq_len": args.seq_len, "global_batch": args.batch_size,
              "max_abs_healing_change": moved, "runs": rows}
    if launchers == ["ddp"]:  # the file as it was first written
        save("parallel", {**record, "max_abs_weight_difference": diffs["2 processes"]})
    else:
        save("parallel-" + "-".join(launchers), {**record, "max_abs_weight_difference": diffs})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["analysis", "decode", "rss", "heal", "parallel", "alloc"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--samples", default="32", help="calibration sequences (rss: comma-separated list)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--remove", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="alloc: forward + backward passes per process (the first a warm-up)")
    ap.add_argument("--tokens", type=int, default=64, help="decode: new tokens per measurement")
    ap.add_argument("--prefill", type=int, default=256, help="decode: prompt tokens")
    ap.add_argument("--shapes", default="5gb", help=f"rss: model shapes, of {sorted(SHAPES)}")
    ap.add_argument("--work", default="/tmp/layerfold-perf", help="rss: folder for the random models")
    ap.add_argument("--heal-tokens", type=int, default=4096, help="heal, parallel: healing budget of each run")
    ap.add_argument("--launchers", default="ddp", help="parallel: the 2-process runs, of ddp,fsdp")
    ap.add_argument("--variants", default="all", help="heal: all, or comma-separated parts of variant names")
    ap.add_argument("--env", default="", help="heal: KEY=VALUE,... added to the runs' environment")
    ap.add_argument("--label", default="", help="heal: result file name part (default: from --variants)")
    ap.add_argument("--src", default="", help="heal: the runs' PYTHONPATH (the code measured), e.g. a git archive's src")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.action != "rss":
        args.samples = int(args.samples)
    {"analysis": analysis, "decode": decode, "rss": rss, "heal": heal, "parallel": parallel, "alloc": alloc}[args.action](args)


if __name__ == "__main__":
    main()

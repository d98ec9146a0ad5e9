"""Build, heal and evaluate compressed variants of the embedded SmolLM2-135M, side by side.

One runner serves every method benchmark (healing.md, streamline.md, foldgpt.md), so all of
them compare against the same evaluation of the original, on the same examples, with the
same evaluator (``layerfold.eval``) and the same healing text.

    python benchmarks/variants.py run bi,angular+last3-kl,streamline:swiglu --limit 200
    python benchmarks/variants.py table bi,angular+last3-kl,streamline:swiglu

A variant is ``METHOD[:OPTION...][+HEALING]``:

    bi | angular | streamline-block | last-n   prune --remove layers (``bi:19``: remove 19)
    streamline[:REPLACEMENT][:LOSS][:eN]     LLM-Streamline: the block (chosen on the calibration
                                             text) -> one module trained on the healing text for
                                             N epochs (default 1) (layer|swiglu|ffn|none;
                                             mse|mse-normed|lm|kl)
    foldgpt[:noshare][:notail][:mean][:gN]   FoldGPT: gates, removal, sharing groups of N
                                             (default 2); ``+cure`` is its own healing; gate
                                             training: ``:gtsoft`` gate type, ``:bw50`` budget
                                             weight, ``:glr0.2`` learning rate, ``:pw2``
                                             polarising weight
    +RECIPE                                  then heal with a recipe of RECIPES

Results go to ``--work`` as ``VARIANT.json`` (what was done, healing history, sample text)
and ``VARIANT.eval.json`` (a ``layerfold eval`` result, also readable by ``layerfold
compare``); a variant whose files exist is not rerun, so a killed run goes on where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from layerfold.data.calibration import CalibrationSpec, load_calibration
from layerfold.eval import EvalResult, evaluate, perplexity, read_documents, resolve_task_path
from layerfold.healing import HealOptions, heal, prepare_teacher
from layerfold.importance import measure_similarity
from layerfold.importance.gates import GateResult, gate_ranking
from layerfold.methods import pruning
from layerfold.methods.foldgpt import CureOptions, FoldGPTOptions, fold
from layerfold.methods.streamline import StreamlineOptions, streamline
from layerfold.models.loading import load_model
from layerfold.models.surgery import count_parameters, remove_layers

TASKS = ["piqa", "arc_easy", "boolq", "winogrande"]
LAMBADA = "lambada_openai"
RECIPES = {
    # LoRA on every linear layer, distilled from the original (Shortened LLaMA, Gromov et al.)
    "lora-kl": dict(train="lora", lora_rank=16, lora_alpha=32, kl=1.0, lr=5e-4),
    # "Reassessing Layer Pruning": the last three layers and the final norm, here distilled
    # (SmolLM2 ties lm_head to the embeddings, so the head stays frozen)
    "last3-kl": dict(train="layers", layers="last:3", kl=1.0, lr=2e-4),
    # what FoldGPT's cure trains, for plain pruning: every layer, logit KL + tail-layer MSE
    "all-kl-tail": dict(train="layers", layers="all", kl=1.0, mse=1.0, mse_layers=3, lr=5e-5),
}
BATCH, SEQ = 8, 256
PROMPTS = ["The capital of France is", "Here is a short story about a cat:"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["run", "table", "plot"])
    ap.add_argument("variants", help="comma-separated variants")
    ap.add_argument("--tokens", type=int, default=65536, help="healing tokens per variant")
    ap.add_argument("--remove", type=int, default=8)
    ap.add_argument("--limit", type=int, default=200, help="first N examples of each task")
    ap.add_argument("--ppl-docs", type=int, default=100, help="LAMBADA documents for text perplexity")
    ap.add_argument("--curve-docs", type=int, default=40, help="documents for the learning curves")
    ap.add_argument("--curve-every", type=int, default=4, help="optimizer steps between curve points")
    ap.add_argument("--gate-steps", type=int, default=120, help="FoldGPT gate training steps")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--work", default="benchmarks/results/variants")
    ap.add_argument("--plot", default=None, help="plot file (plot action)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    variants = [v for v in args.variants.split(",") if v]
    if args.action == "run":
        Runner(args, work).run(variants)
    if args.action in ("run", "table"):
        print(table(work, variants))
    if args.action == "plot":
        plot(work, variants, Path(args.plot or work / "curves.png"))


def reset_peak_rss() -> None:
    """Restart the kernel's peak-resident-set counter (Linux), so each variant gets its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float | None:
    """The process's peak resident set since the last reset (VmHWM), in MiB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def load_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def save_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


@torch.no_grad()
def samples(loaded, new_tokens: int = 40) -> list[str]:
    """Greedy continuations of a few prompts: does the model still write fluent text?"""
    out = []
    for prompt in PROMPTS:
        enc = loaded.tokenizer(prompt, return_tensors="pt")
        ids = loaded.model.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=loaded.tokenizer.eos_token_id)
        out.append(loaded.tokenizer.decode(ids[0], skip_special_tokens=True))
    return out


class Runner:
    """Holds what every variant shares: the original, its evaluation, calibration scores, the
    healing text and the teacher's cached logits."""

    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        t = time.perf_counter()
        self.original = load_model(None, dtype="fp32", device="cpu")
        print(f"loaded in {time.perf_counter() - t:.1f} s", flush=True)
        self.n_layers = self.original.model.config.num_hidden_layers
        ref = work / "original.eval.json"
        if ref.exists():
            self.reference = EvalResult.load(ref)
        else:
            print("== original", flush=True)
            self.reference = self.evaluate(self.original, None, "original")
            self.reference.save(ref)
            save_json(work / "original.json", {"variant": "original", "samples": samples(self.original),
                                                "params": count_parameters(self.original.model)})
        self.calib = load_calibration(CalibrationSpec(), self.original, progress=False)
        self.scores = measure_similarity(self.original.model, self.original.arch, self.calib, progress=False)
        self._heal_ids = self._teacher = None
        self.docs = read_documents(resolve_task_path(LAMBADA), args.curve_docs)

    def evaluate(self, loaded, reference, name) -> EvalResult:
        a = self.args
        return evaluate(loaded.model, loaded.tokenizer, tasks=[*TASKS, LAMBADA], ppl=[LAMBADA], limit=a.limit,
                        ppl_limit=a.ppl_docs, reference=reference, name=name, speed=False)

    @property
    def steps(self) -> int:
        return math.ceil(self.args.tokens / (BATCH * SEQ))

    def healing_text(self):
        """The original writes it (seed 1: not the calibration text); one pass of the budget."""
        if self._heal_ids is None:
            t = time.perf_counter()
            spec = CalibrationSpec(seed=1, samples=self.steps * BATCH, seq_len=SEQ)
            self._heal_ids = load_calibration(spec, self.original, progress=False)
            t_data = time.perf_counter() - t
            t = time.perf_counter()
            self._teacher = prepare_teacher(HealOptions(tokens=self.args.tokens, batch_size=BATCH),
                                            self.original, self._heal_ids)
            save_json(self.work / "healing_data.json", {
                "tokens": self.args.tokens, "rows": self._heal_ids.shape[0], "seq_len": SEQ, "data_seconds": t_data,
                "teacher_cache_seconds": time.perf_counter() - t, "curve_docs": self.args.curve_docs,
                "original_curve_ppl": self.curve_point(self.original.model)["ppl"]})
        return self._heal_ids, self._teacher

    def curve_point(self, model) -> dict:
        return {"ppl": perplexity(model, self.original.tokenizer, self.docs, batch_size=4).perplexity}

    def gates(self, n_remove: int, **changes) -> GateResult:
        """FoldGPT's gate ranking, trained once per budget and settings and cached (it is the slow part).

        ``changes`` override ``GateOptions`` fields (variant options ``bw50``: budget weight,
        ``glr0.2``: learning rate, ``pw2``: polarising weight)."""
        gate_type = changes.pop("gate_type", FoldGPTOptions().gates.gate_type)
        extra = "".join(f"-{k}{v:g}" for k, v in sorted(changes.items()))
        kind = "" if gate_type == "soft" else f"-{gate_type}"  # the soft gates' files keep their names
        path = self.work / f"gates{kind}-remove{n_remove}-steps{self.args.gate_steps}{extra}.json"
        if path.exists():
            d = load_json(path)
            return GateResult([math.nan if g is None else g for g in d["gates"]], d["removed"], d["rounds"],
                              d["options"], d.get("scores") or [], d.get("check"))
        opts = replace(FoldGPTOptions().gates, steps=self.args.gate_steps, gate_type=gate_type, **changes)
        t = time.perf_counter()
        g = gate_ranking(self.original.model, self.original.arch, self.calib, n_remove, opts)
        save_json(path, {**g.to_dict(), "seconds": time.perf_counter() - t})
        return g

    def run(self, variants: list[str]) -> None:
        for v in variants:
            if not (self.work / f"{v}.json").exists():
                self.build(v)
        save_json(self.work / "machine.json", {
            "platform": platform.platform(), "processor": platform.processor(), "python": sys.version.split()[0],
            "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")})

    def build(self, variant: str) -> None:
        print(f"== {variant}", flush=True)
        spec, _, healing = variant.partition("+")
        method, *options = spec.split(":")
        student = replace(self.original, model=copy.deepcopy(self.original.model))
        record: dict = {"variant": variant, "method": method, "options": options, "healing": healing or "none"}
        self.healing_text()  # read (or built) before the peak-memory window: every variant shares it
        reset_peak_rss()
        t = time.perf_counter()
        if method == "streamline":
            so = StreamlineOptions()
            for o in options:
                if o in ("mse", "mse-normed", "lm", "kl"):
                    so = replace(so, loss=o)
                elif o.startswith("e") and o[1:].isdigit():
                    so = replace(so, epochs=float(o[1:]))
                else:
                    so = replace(so, replacement=o)
            # trained on the healing text: the same data (and budget, at one epoch) as healing
            train_ids = self.healing_text()[0]
            with torch.enable_grad():
                pairs_dir = self.work / f".pairs-{variant}"
                sl = streamline(student.model, student.arch, train_ids, self.scores, so, remove=self.args.remove,
                                work_dir=pairs_dir, progress=True)
                shutil.rmtree(pairs_dir, ignore_errors=True)  # streamline() deleted the pairs; not their folder
            record.update(removed=sl.removed, block=[sl.start, sl.window], block_cosine=sl.block_cosine,
                          replacement_params=sl.replacement_params, seconds=sl.seconds,
                          fit=None if sl.fit is None else {k: getattr(sl.fit, k) for k in
                                                            ("steps", "best_val", "best_step", "first_val", "seconds")})
        elif method == "foldgpt":
            cure = healing == "cure"
            heal_ids = self.healing_text()[0] if cure else None
            fo = FoldGPTOptions()
            gate_changes = {}
            for o in options:
                if o.startswith("bw"):
                    gate_changes["budget_weight"] = float(o[2:])
                elif o.startswith("glr"):
                    gate_changes["lr"] = float(o[3:])
                elif o.startswith("pw"):
                    gate_changes["polar_weight"] = float(o[2:])
                elif o.startswith("gt"):
                    gate_changes["gate_type"] = o[2:]
                elif o == "noshare":
                    fo = replace(fo, group_size=1)
                elif o == "mean":
                    fo = replace(fo, share_init="mean")
                elif o.startswith("g"):
                    fo = replace(fo, group_size=int(o[1:]))
            fo.cure = CureOptions(steps=self.steps if cure else 0, batch_size=BATCH,
                                  samples=self.steps * BATCH, tail_layers=0 if "notail" in options else 3)
            with torch.enable_grad():
                fr = fold(student, self.calib, self.args.remove, fo, cure_ids=heal_ids,
                          log_file=str(self.work / f"{variant}.log.jsonl") if cure else None,
                          gates=self.gates(self.args.remove, **gate_changes))
            record.update(removed=fr.removed, groups=fr.groups, params_stored=fr.params_stored,
                          gates=fr.gates.gates)
            if cure:
                record["heal"] = {k: v for k, v in fr.cure.items() if k not in ("history",)}
                record["history"] = fr.cure["history"]
            healing = ""  # the cure is FoldGPT's healing
        else:
            n = int(options[0]) if options else self.args.remove
            remove = (pruning.last_layers(self.n_layers, n) if method == "last-n"
                      else pruning.PRUNING_METHODS[method](self.scores, n))
            record["removed"] = remove
            remove_layers(student.model, student.arch, remove)
        record["repair_seconds"] = time.perf_counter() - t
        record["peak_rss_mib"] = peak_rss_mib()  # includes the runner's original model (the teacher)
        base = variant.partition("+")[0]
        if healing and not (self.work / f"{base}.json").exists():
            # the unhealed model is right here: evaluate it now instead of rebuilding it later
            self.finish(student, {**record, "variant": base, "healing": "none"}, base)
        if healing:
            ids, teacher = self.healing_text()
            opts = replace(HealOptions(tokens=self.args.tokens, batch_size=BATCH), **RECIPES[healing],
                           log_file=str(self.work / f"{variant}.log.jsonl"))
            if opts.mse > 0:  # the shared cache holds logits only; this recipe also needs the tail's outputs
                teacher = prepare_teacher(opts, self.original, ids)
            h = heal(student, None, opts, ids=ids, prepared_teacher=teacher, eval_fn=self.curve_point,
                     eval_every=self.args.curve_every)
            record["heal"] = {**h.summary(), "recipe": opts.recipe()}
            record["history"] = h.train.history
            record["peak_rss_mib"] = peak_rss_mib()
        self.finish(student, record, variant)

    def finish(self, student, record: dict, variant: str) -> None:
        print(f"   evaluating {variant}", flush=True)
        record["params"] = count_parameters(student.model)
        record["samples"] = samples(student)
        t = time.perf_counter()
        result = self.evaluate(student, self.reference, variant)
        record["eval_seconds"] = time.perf_counter() - t
        result.save(self.work / f"{variant}.eval.json")
        save_json(self.work / f"{variant}.json", record)


# -- tables and plots ---------------------------------------------------------------------------


def _heal_seconds(record: dict) -> float | None:
    if record.get("healing") == "cure":
        return None  # FoldGPT's cure runs inside fold(): already in repair_seconds
    h = record.get("heal") or {}
    s = h.get("seconds")
    if isinstance(s, dict):
        return s.get("train")
    return s


def table(work: Path, variants: list[str]) -> str:
    ref = EvalResult.load(work / "original.eval.json")
    ref_mean = sum(ref.tasks[t].metrics["acc"] for t in TASKS) / len(TASKS)
    ref_ppl = ref.perplexity[LAMBADA].perplexity
    head = ["variant", *TASKS, "mean acc", "% of original", "LAMBADA text ppl", "x original", "LAMBADA acc",
            "stability", "params", "heal tokens", "repair + heal s", "peak RSS"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for v in ["original", *variants]:
        if v == "original":
            ev, record = ref, load_json(work / "original.json") or {}
        else:
            record = load_json(work / f"{v}.json")
            if not record:
                continue
            ev = EvalResult.load(work / f"{v}.eval.json")
        accs = [ev.tasks[t].metrics["acc"] for t in TASKS]
        mean = sum(accs) / len(accs)
        ppl = ev.perplexity[LAMBADA].perplexity
        stab = [ev.tasks[t].metrics.get("stability") for t in TASKS]
        h = record.get("heal") or {}
        secs = (record.get("repair_seconds") or 0) + (_heal_seconds(record) or 0)
        cells = [v, *(f"{100 * a:.1f}" for a in accs), f"{100 * mean:.1f}", f"{100 * mean / ref_mean:.1f}%",
                 f"{ppl:.1f}", f"{ppl / ref_ppl:.2f}", f"{100 * ev.tasks[LAMBADA].metrics['acc']:.1f}",
                 f"{sum(stab) / len(stab):.3f}" if None not in stab else "-",
                 f"{record.get('params_stored', record.get('params', 0)) / 1e6:.1f}M",
                 f"{h['tokens']:,}" if h.get("tokens") else "-", f"{secs:.0f}" if secs else "-",
                 f"{record['peak_rss_mib'] / 1024:.2f} GiB" if record.get("peak_rss_mib") else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(work: Path, variants: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(12, 4.5))
    for v in variants:
        record = load_json(work / f"{v}.json")
        if not record or not record.get("history"):
            continue
        h = record["history"]
        ax_loss.plot([x["tokens"] for x in h], [x["loss"] for x in h], label=v, alpha=0.8)
        pts = [(x["tokens"], x["eval"]["ppl"]) for x in h if "ppl" in (x.get("eval") or {})]
        if pts:
            ax_ppl.plot(*zip(*pts), marker=".", label=v)
    data = load_json(work / "healing_data.json") or {}
    if "original_curve_ppl" in data:
        ax_ppl.axhline(data["original_curve_ppl"], color="k", ls="--", lw=1, label="original")
    ax_loss.set(title="healing loss", xlabel="healing tokens", ylabel="training loss")
    ax_loss.set_yscale("log")
    ax_ppl.set(title=f"LAMBADA text perplexity ({data.get('curve_docs', '?')} documents) while healing",
               xlabel="healing tokens", ylabel="perplexity")
    ax_ppl.set_yscale("log")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

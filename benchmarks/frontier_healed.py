"""The healed frontier on the embedded SmolLM2-135M: healing recipes at one common budget.

Each row is one ``layerfold compress`` run (the CLI's own code, in this process), with the tasks
evaluated before and after in the same run:

    python benchmarks/frontier_healed.py run NAME [--prompts topics] [--cache DIR] -- COMPRESS ARGS...
    python benchmarks/frontier_healed.py collect NAME OUT_FOLDER      # copy the records into --results
    python benchmarks/frontier_healed.py table                        # the Markdown table
    python benchmarks/frontier_healed.py plot                         # learning curves (PNG)

``--prompts topics`` is the healing-data lever of issue 18 ("more prompts and topics, the same
total budget"): while the healing text is written (``--heal-data self``), the model continues
the 64 openings of ``TOPIC_PROMPTS`` below instead of the library's 12 ``SELF_PROMPTS``; nothing
else changes (seed, temperature, length, rows). The prompt list is part of the text cache's
key, so this text never collides with the library's.

``--search-from FILE`` reuses a searching selection's saved choice (``search-sleb-remove8.json``
of ``frontier.py``, same calibration text and search options) instead of searching again: SLEB's
search costs ~2,000 s on shared cores, and the healed row needs only its result. The run's own
"select s" is then ~0; the table shows the saved search's seconds, marked "(reused)".

``--cache DIR`` gives the run a private cache (``LAYERFOLD_CACHE``): every entry of the shared
``~/.cache/layerfold`` is linked into it (so cached calibration text and teacher logits are
reused), and whatever the run writes lands in DIR only, so two runs that write the same text
at the same time on a shared machine never meet.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "frontier-healed-1203b"

# Openings over many topics and registers (science, history, cooking, code, news, letters,
# dialogue, instructions, fiction, sport, money, geography, ...): written for this benchmark,
# none taken from an evaluation task.
TOPIC_PROMPTS = (
    "The history of the Roman Empire",
    "In this article, we explain how vaccines",
    "Once upon a time, in a small fishing village,",
    "The following is a conversation between a doctor and a patient about",
    "Scientists have recently discovered that octopuses",
    "Here is a recipe for a simple vegetable soup:",
    "def parse_csv(path):",
    "The main reasons why prices rise",
    "Dear hiring manager,",
    "According to the weather report,",
    "A simple way to understand electricity is",
    "Question: Why do leaves change colour in autumn?\nAnswer:",
    "Step 1: Preheat the oven",
    "The rules of chess are",
    "In 1969, astronauts",
    "My favourite book is",
    "The best way to learn a new language is",
    "Photosynthesis is the process by which",
    "The city council voted on Tuesday to",
    "To repair a wooden chair,",
    "import numpy as np\n",
    "The human heart has four chambers",
    "Q: How often should I water a cactus?\nA:",
    "Mount Everest is",
    "The French Revolution began",
    "Climate change affects",
    "A good night's sleep",
    "The guitar is a musical instrument",
    "Water freezes when",
    "The match ended in a draw after",
    "When buying a used car,",
    "The Pacific Ocean",
    "Our company is pleased to announce",
    "The painting shows",
    "If you want to start a vegetable garden,",
    "The teacher asked the students to",
    "Ancient Egyptians built",
    "SELECT name, age FROM",
    "The elephant is the largest",
    "Breaking news:",
    "Here are five tips for saving money:",
    "The law of supply and demand",
    "She opened the door and",
    "The first computers were",
    "To solve the equation 2x + 3 = 7,",
    "In the morning, the farmer",
    "The difference between a virus and a bacterium",
    "Welcome to our hotel!",
    "Football, also called soccer,",
    "The Great Wall of China",
    "The volcano erupted",
    "How to write a good essay:",
    "The moon orbits the Earth",
    "He picked up the phone and said,",
    "Many people believe that exercise",
    "The train to London",
    "Honey bees communicate by",
    "The judge ruled that",
    "The internet has changed the way",
    "Jupiter is the largest planet",
    "My grandmother always told me",
    "The museum's new exhibition",
    "function add(a, b) {",
    "There are three kinds of rock:",
)


def link_shared_cache(private: Path) -> None:
    """Link every entry of the shared cache into ``private`` (entries already there are kept)."""
    from layerfold.data.calibration import cache_dir

    shared = cache_dir()
    for kind in ("calibration", "teacher", "gguf"):
        (private / kind).mkdir(parents=True, exist_ok=True)
        if not (shared / kind).is_dir():
            continue
        for entry in (shared / kind).iterdir():
            if ".tmp-" in entry.name:
                continue  # another run's unfinished write
            target = private / kind / entry.name
            if not target.exists() and not target.is_symlink():
                target.symlink_to(entry)


def use_topic_prompts() -> None:
    """Healing text from TOPIC_PROMPTS: only while ``healing_data`` writes or reads it, so the
    calibration text and the held-out rows stay the library's."""
    import layerfold.data.calibration as calibration
    import layerfold.healing as healing

    original = healing.healing_data

    def healing_data(*args, **kwargs):
        saved = calibration.SELF_PROMPTS
        calibration.SELF_PROMPTS = TOPIC_PROMPTS
        try:
            return original(*args, **kwargs)
        finally:
            calibration.SELF_PROMPTS = saved

    healing.healing_data = healing_data


def reuse_before(path: str) -> None:
    """The original's task figures read from an earlier run's JSON with the same settings
    instead of measured again (about five minutes of the shared cores per row): the first
    ``evaluate`` call of the run (the original, before) returns it; the held-out reference and
    everything after are computed as usual."""
    import layerfold.eval as ev
    from layerfold.eval.result import EvalResult

    original = ev.evaluate
    state = {"first": True}

    def evaluate(*a, **kw):
        if state["first"]:
            state["first"] = False
            result = EvalResult.load(path)
            if result.settings.get("limit") != kw.get("limit"):
                raise SystemExit(f"{path}: limit {result.settings.get('limit')} != {kw.get('limit')}")
            return result
        return original(*a, **kw)

    ev.evaluate = evaluate


def reuse_search(path: str) -> dict:
    """The selection's search returns the saved choice of ``path`` (checked: same selection and
    number of layers) instead of running; nothing else of the run changes."""
    import layerfold.methods.search as search

    found = json.loads(Path(path).read_text())
    name = found["selection"].replace("-", "_")

    def saved(model, arch, ids, n, opts, progress=True):
        if len(found["removed"]) != n:
            raise SystemExit(f"{path}: {len(found['removed'])} layers removed, the run asks for {n}")
        if opts != search.SearchOptions():
            raise SystemExit(f"{path}: saved with the default search options; this run sets {opts}")
        return dict(found)

    setattr(search, name, saved)
    return found


def cmd_run(args) -> int:
    compress = list(args.compress)
    if args.heldout_every:  # the library's option; kept here so that older commands still run
        compress += ["--eval-heldout-every", str(args.heldout_every)]
    reused = reuse_search(args.search_from) if args.search_from else None
    if args.before:
        reuse_before(args.before)
    if args.cache:
        private = Path(args.cache).resolve()
        link_shared_cache(private)  # cache_dir() is still the shared one here
        os.environ["LAYERFOLD_CACHE"] = str(private)
    if args.prompts == "topics":
        use_topic_prompts()
    from layerfold.cli import main

    t, cpu = time.time(), os.times()
    rc = main(["compress", *compress])
    end = os.times()
    record = {
        "name": args.name, "prompts": args.prompts, "argv": args.compress, "rc": rc,
        "wall_seconds": time.time() - t,
        "cpu_seconds": (end.user - cpu.user) + (end.system - cpu.system),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)),
        "load_average_end": os.getloadavg(),
        "heldout_every": args.heldout_every or None,
    }
    if reused is not None:
        record["search_from"] = args.search_from
        record["search_seconds_saved"] = reused.get("seconds")
    print(json.dumps(record), file=sys.stderr)
    if args.record:
        Path(args.record).write_text(json.dumps(record, indent=1))
    return rc


def cmd_collect(args) -> int:
    out = Path(args.folder)
    dest = Path(args.results)
    dest.mkdir(parents=True, exist_ok=True)
    for name, target in [("layerfold.json", "layerfold.json"), ("eval_after.json", "eval.json")]:
        if (out / name).exists():
            shutil.copy(out / name, dest / f"{args.name}.{target}")
    return 0


def _rows(results: Path, also=()):
    """(name, layerfold.json, run record) per row: --results' rows, then each --also NAME=PATH
    (a layerfold.json of a run made elsewhere, e.g. an earlier session's)."""
    paths = [(p.name[: -len(".layerfold.json")], p) for p in sorted(results.glob("*.layerfold.json"))]
    paths += [(a.partition("=")[0], Path(a.partition("=")[2])) for a in also]
    for name, path in paths:
        d = json.loads(path.read_text())
        run = results / f"{name}.run.json"
        yield name, d, (json.loads(run.read_text()) if run.exists() else {})


def cmd_table(args) -> int:
    results = Path(args.results)
    print("| recipe | PIQA | ARC-e | LAMBADA acc | mean acc (% of orig) | LAMBADA text ppl (x orig) | held-out KL | top-1 "
          "| stability PIQA/ARC | agreement PIQA/ARC | params | select s | repair s | heal s | CPU s (run) | wall s (run) | peak RSS |")
    print("|" + "---|" * 17)
    from layerfold.eval.result import EvalResult

    orig = None
    orig_path = results / "original.limit100.eval.json"
    orig_eval = EvalResult.load(orig_path) if orig_path.exists() else None
    evals = {}
    for spec in args.also:
        name, _, path = spec.partition("=")
        ev_path = Path(path.replace(".layerfold.json", ".eval.json"))
        if ev_path.exists():
            evals[name] = EvalResult.load(ev_path)
    for name, d, run in _rows(results, args.also):
        ev = d.get("evaluation") or {}
        b, a = ev.get("before") or {}, ev.get("after") or {}
        if orig is None and b:
            orig = b
            m = (b["piqa/acc"] + b["arc_easy/acc"] + b["lambada_openai/acc"]) / 3
            print(f"| original | {b['piqa/acc']*100:.0f} | {b['arc_easy/acc']*100:.0f} | {b['lambada_openai/acc']*100:.0f} "
                  f"| {m*100:.1f} (100%) | {b['ppl/lambada_openai']:.2f} (1.00) | 0 | 100% | - | - | {b['cost/parameters']:,} "
                  "| - | - | - | - | - | - |")
        if not a:
            continue
        m = (a["piqa/acc"] + a["arc_easy/acc"] + a["lambada_openai/acc"]) / 3
        m0 = (orig["piqa/acc"] + orig["arc_easy/acc"] + orig["lambada_openai/acc"]) / 3
        secs = d.get("seconds") or {}
        # select: the calibration pass or search (FoldGPT: the gates); repair: the linear fit, or
        # LLM-Streamline's replacement (its training text, pairs and training); heal: healing, or
        # FoldGPT's cure, which takes healing's place
        sel = secs.get("importance", 0) + secs.get("search", 0) + secs.get("gates", 0)
        sel_text = f"{run['search_seconds_saved']:.0f} (reused)" if run.get("search_seconds_saved") else f"{sel:.0f}"
        rep = sum(secs.get(k, 0) for k in ("linear_repair", "replacement", "train_data", "pairs", "linear_init", "train"))
        heal = secs.get("heal", 0) + secs.get("cure", 0)
        for task in ("piqa", "arc_easy"):  # results written before `agreement` existed: from the examples
            if f"{task}/agreement" not in a and name in evals and orig_eval is not None:
                from layerfold.eval.stability import agreement
                a[f"{task}/agreement"] = agreement(orig_eval.tasks[task].correct(), evals[name].tasks[task].correct())
        rec = (lambda k, f: f.format(run[k]) if k in run else "-")
        gb = f"{run['peak_rss_bytes'] / 2**30:.2f} GiB" if "peak_rss_bytes" in run else "-"
        print(f"| {name} | {a['piqa/acc']*100:.0f} | {a['arc_easy/acc']*100:.0f} | {a['lambada_openai/acc']*100:.0f} "
              f"| {m*100:.1f} ({m/m0*100:.1f}%) | {a['ppl/lambada_openai']:.2f} ({a['ppl/lambada_openai']/orig['ppl/lambada_openai']:.2f}) "
              f"| {a['heldout/kl']:.3f} | {a['heldout/top1']*100:.1f}% "
              f"| {a.get('piqa/stability', float('nan')):.3f}/{a.get('arc_easy/stability', float('nan')):.3f} "
              f"| {a.get('piqa/agreement', float('nan')):.2f}/{a.get('arc_easy/agreement', float('nan')):.2f} "
              f"| {a['cost/parameters']:,} | {sel_text} | {rep:.0f} | {heal:.0f} "
              f"| {rec('cpu_seconds', '{:.0f}')} | {rec('wall_seconds', '{:.0f}')} | {gb} |")
    return 0


def cmd_plot(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = Path(args.results)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, d, _ in _rows(results, args.also):
        curve = d.get("heal_curve") or []
        held = [(p["tokens"], p["heldout"]["kl"]) for p in curve if p.get("heldout")]
        loss = [(p["tokens"], p["loss"]) for p in curve if p.get("loss") is not None]
        if held:
            ax1.plot(*zip(*held), marker="o", label=name)
        if loss:
            ax2.plot(*zip(*loss), label=name)
    ax1.set(xlabel="healing tokens", ylabel="held-out KL to the original (8 x 256, seed 2)", title="held-out KL")
    ax2.set(xlabel="healing tokens", ylabel="training loss (KL on the healing text)", title="training loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(RESULTS))
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("name")
    r.add_argument("--prompts", choices=["library", "topics"], default="library")
    r.add_argument("--cache", help="private cache folder (shared entries linked in)")
    r.add_argument("--before", help="the original's EvalResult JSON (same limit and documents) instead of measuring it")
    r.add_argument("--record", help="write wall/CPU seconds and peak RSS here (JSON)")
    r.add_argument("--search-from", help="a searching selection's saved choice (frontier.py's search-*.json) "
                                         "instead of searching again")
    r.add_argument("--heldout-every", type=int, default=0,
                   help="= compress --eval-heldout-every N: held-out fit every N healing steps (0: steps // 4)")
    c = sub.add_parser("collect")
    c.add_argument("name")
    c.add_argument("folder")
    t = sub.add_parser("table")
    pl = sub.add_parser("plot")
    for q in (t, pl):
        q.add_argument("--also", action="append", default=[], metavar="NAME=LAYERFOLD_JSON")
    pl.add_argument("--out", default=str(HERE / "frontier_healed_curves.png"))
    argv = list(sys.argv[1:] if argv is None else argv)
    # everything after "--" goes to `layerfold compress` untouched
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    args.compress = argv[cut + 1:]
    return {"run": cmd_run, "collect": cmd_collect, "table": cmd_table, "plot": cmd_plot}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

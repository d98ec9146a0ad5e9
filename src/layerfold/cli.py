"""The ``layerfold`` command: thin wrappers over the Python API.

Each command's options are one dataclass tree in ``recipe.py``; ``schema`` turns it into the
parser (one help section per group). What is here is what a terminal needs on top: the
commands' descriptions, what each prints, and errors as one line.

Every problem a user can fix ends as one line on stderr and a non-zero exit; ``--debug``
shows the traceback instead. Before any weight loads, ``validation.check`` checks the options
against the model's config and file headers (bad input: exit 2). Exit codes (``errors``):
0 done, 1 internal error, 2 bad input, 3 runtime failure (diverged training, full disk),
130 interrupted (Ctrl-C), 143 stopped by SIGTERM; none leaves a half-written output.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import signal
import sys
import threading
import time

from . import preflight, schema
from ._version import __version__
from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_RUNTIME, EXIT_TERMINATED, EXIT_USAGE, LayerfoldError, Terminated
from .recipe import (
    AnalyzeOptions,
    CompareOptions,
    CompressOptions,
    EvaluateOptions,
    ExportOptions,
    GlobalOptions,
    HealModelOptions,
    RunOptions,
)
from .schema import parse_size  # noqa: F401  (the size syntax of --max-memory, for scripts)


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line, like every other error of the tool."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _methods_text() -> str:
    """The --method list from the registry itself, so a new method cannot be left out of --help."""
    import textwrap

    from .methods.registry import METHODS

    lines = ["methods:"]
    for m in METHODS.values():
        wrapped = textwrap.wrap(m.help, 72, break_on_hyphens=False) or [""]
        lines.append(f"  {m.name:<17} {wrapped[0]}")
        lines += [" " * 20 + w for w in wrapped[1:]]
    return "\n".join(lines)


_METHODS_TEXT = _methods_text()

COMMANDS = {
    "compress": (CompressOptions, "remove layers and save a model that stock transformers loads",
                 "Remove decoder layers by a criterion and save a complete Hugging Face model folder, with the\n"
                 "recipe that made it (recipe.yaml: `layerfold run recipe.yaml` builds it again).\n\n"
                 + _METHODS_TEXT),
    "run": (RunOptions, "build the model a recipe describes (every output folder holds its recipe.yaml)",
            "Run a compression recipe: the YAML form of `layerfold compress`'s options, grouped as in\n"
            "`layerfold compress --help` (model, data, selection, repair, healing, evaluation, output, ...).\n\n"
            "example:  layerfold run OUT/recipe.yaml -o OUT2               (the same model again)\n"
            "          layerfold run recipe.yaml --set healing.tokens=65536 --set selection.remove=6"),
    "heal": (HealModelOptions, "recovery training of a compressed model with the original as teacher",
             "Heal a compressed model: train LoRA adapters (merged at the end) and/or whole layers to "
             "match the original model's next-token distribution (KL), its last layers' outputs (MSE) and/or the "
             "text (next-token loss). The output is a standard model folder.\n\n"
             "By default the original writes the healing text itself and its top-k logits are cached on disk.\n"
             "Healing never trains on evaluation data: a --heal-data file that is (or copies) an evaluation task\n"
             "file is refused.\n\n"
             "example:  layerfold heal ./SmolLM2-135M-Instruct-replaceme-minus8 --heal-tokens 65536\n"
             "big model on several GPUs:  layerfold heal ./Llama-70B-minus20 --teacher meta-llama/Llama-3.1-70B \\\n"
             "            --device-map auto --device-memory 0=70GiB,1=70GiB,cpu=200GiB --offload-folder /scratch/offload"),
    "analyze": (AnalyzeOptions, "print per-layer and per-block importance by every criterion",
                "Score every layer by Block Influence and every block of consecutive layers by cosine "
                "similarity and angular distance, from one calibration pass."),
    "eval": (EvaluateOptions, "accuracy, perplexity, stability, size and speed of a model",
             "Evaluate a model on multiple-choice tasks (acc, acc_norm as in lm-evaluation-harness), "
             "LAMBADA-style last-word prediction, perplexity with a fixed window, and its cost "
             "(parameters, bytes on disk, peak memory, prefill and decode tokens/s).\n\n"
             "With --reference, the reference is evaluated the same way (or read from its JSON result) and "
             "every figure is also shown as a share of it, with stability per task.\n\n"
             "example:  layerfold eval ./pruned --reference embedded --tasks piqa,winogrande --limit 200"),
    "compare": (CompareOptions, "side-by-side table of saved evaluation results",
                "Print JSON results of `layerfold eval --json` side by side; the first is the reference: "
                "every figure of the others is also shown as a share of it, and stability is computed against it."),
    "export": (ExportOptions, "write a model as a GGUF file for llama.cpp (--gguf) or a standard folder (-o)",
               "Write a finished model for the tools users run it with:\n"
               "  --gguf OUT.gguf   one GGUF file for llama.cpp / Ollama (--outtype f32, f16, bf16 or q8_0), with the\n"
               "                    tokenizer and chat template; read back with transformers and checked\n"
               "  -o OUT            a standard Hugging Face folder\n"
               "A model whose layers share weights (layerfold compress --method foldgpt) is written out with every\n"
               "shared tensor materialised, since neither form can share them.\n\n"
               "example:  layerfold export ./SmolLM2-135M-Instruct-replaceme-minus8 --gguf pruned-f16.gguf --outtype f16"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="layerfold",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Make decoder-only language models shallower and report what it cost.\n\n"
        "Quick start:  layerfold compress        (prunes the embedded SmolLM2-135M by 25% and heals it)\n"
        "              layerfold analyze MODEL   (per-layer and per-block importance)\n"
        "              layerfold run recipe.yaml (a compression written down as YAML)",
    )
    parser.add_argument("--version", action="version", version=f"layerfold {__version__}")
    schema.add_arguments(parser, GlobalOptions())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (root, short, description) in COMMANDS.items():
        positional = [o.name.upper() for o in schema.options(root) if o.positional]
        usage = f"layerfold {name} {' '.join(f'[{p}]' for p in positional)} [options]".replace("  ", " ")
        p = sub.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter, help=short,
                           description=description, usage=usage)
        schema.add_arguments(p, root())
        p.set_defaults(root=root, func=_HANDLERS[name])
    return parser


def _quiet(opts, quiet: bool):
    """The options with every progress switch of the tree set."""
    changes = {}
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        if f.name == "progress":
            changes[f.name] = not quiet
        elif dataclasses.is_dataclass(value):
            changes[f.name] = _quiet(value, quiet)
    return dataclasses.replace(opts, **changes)


# -- compress and run --------------------------------------------------------------------


def _cmd_compress(opts: CompressOptions, glob: GlobalOptions) -> int:
    from .memory_plan import plan_memory
    from .pipeline import compress
    from .train.parallel import processes

    t0 = time.perf_counter()
    memory = plan_memory(opts)  # before any work: what fits, or a one-line refusal
    if processes().main:  # first on stdout: what will run, and how, before it runs
        print(memory.describe(), flush=True)
    r = compress(opts, memory=memory)

    if not processes().main:  # under `accelerate launch` the main process reports
        return 0
    if r.output is None:  # --dry-run
        if r.extra.get("auto_text"):
            print(r.extra["auto_text"])
        print(r.plan.describe())
        return 0
    _print_compress(r, opts, time.perf_counter() - t0)
    return 0


def _cmd_run(opts: RunOptions, glob: GlobalOptions) -> int:
    from .recipe import run_recipe

    recipe = run_recipe(opts)
    preflight.check(recipe)  # the recipe is the command's real options
    handler = next(_HANDLERS[name] for name, (root, *_) in COMMANDS.items() if isinstance(recipe, root))
    return handler(_quiet(recipe, glob.quiet), glob)


def _print_compress(r, opts: CompressOptions, total: float) -> None:
    if r.extra.get("auto_text"):
        print(r.extra["auto_text"])
        print(f"chosen       {r.extra['auto']['chosen']}")
    print(f"method       {r.method}")
    print(f"layers       {r.layers_before} -> {r.layers_after} (removed {', '.join(map(str, r.removed))})")
    pct = 100 * (1 - r.params_after / r.params_before)
    print(f"parameters   {r.params_before:,} -> {r.params_after:,} ({pct:.1f}% fewer)"
          + (" stored; shared weights counted once" if r.method == "foldgpt" else ""))
    if r.method == "foldgpt":
        groups = [g for g in r.extra["groups"] if len(g) > 1]
        print(f"shared       {len(groups)} groups of new layers: {' '.join('-'.join(map(str, (g[0], g[-1]))) for g in groups) or 'none'}")
        if r.extra.get("gate_check"):
            from .importance.gates import describe_check

            print(f"gate check   {describe_check(r.extra['gate_check'])}")
        if r.extra.get("cure"):
            c = r.extra["cure"]
            print(f"cure         {c['steps']} steps, {c['tokens']:,} tokens, final loss {c['loss']:.4f}, {c['seconds']:.0f}s")
    print(f"on disk      {r.bytes_on_disk / 2**20:.1f} MiB of safetensors")
    if r.streamline is not None:
        sl = r.streamline
        print(f"block        layers {sl.start}..{sl.start + sl.window - 1} (cosine {sl.block_cosine:.4f}), "
              f"replacement {opts.repair.replacement} ({sl.replacement_params:,} parameters)")
        if sl.fit:
            print(f"training     {opts.repair.loss} loss {sl.fit.first_val:.4g} -> {sl.fit.best_val:.4g} "
                  f"(best of {sl.fit.steps} steps, {sl.fit.seconds:.1f}s); log in training_log.jsonl")
    if r.extra.get("linear"):
        fit = r.extra["linear"]
        for run in fit["runs"]:
            print(f"linear map   layers {run['removed'][0]}..{run['removed'][1]} -> folded into layer {run['into']} "
                  f"({fit['options']['objective']}; relative error {run['removal_error']:.3f} removed, "
                  f"{run['fit_error']:.3f} repaired, {run['tokens']:,} tokens)")
        for a, b in fit["unrepaired"]:
            print(f"linear map   layers {a}..{b} removed unrepaired (no layer before them to fold into)")
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in r.seconds.items())
    if r.heal:
        _print_heal(r.heal)
    print(f"time         {total:.1f}s ({steps})")
    print(f"saved to     {r.output}")
    if r.eval_after is not None:
        from .report.tables import eval_table

        print()
        print(eval_table([r.eval_before, r.eval_after], names=["before", "after"]))
    if r.extra.get("gguf") is not None:
        _print_gguf(r.extra["gguf"])
    if r.report is not None:
        print(f"report       {r.report}")


def _print_heal(h: dict) -> None:
    print(f"healing      {h['tokens']:,} tokens in {h['steps']} steps; {h['trainable']}")
    print(f"             {h['trainable_parameters']:,} trainable parameters; "
          f"loss {h['loss_first']:.4f} -> {h['loss_last']:.4f}")


# -- the other commands ------------------------------------------------------------------


def _cmd_heal(opts: HealModelOptions, glob: GlobalOptions) -> int:
    from .pipeline import heal_model

    t0 = time.perf_counter()
    r = heal_model(opts)
    from .train.parallel import processes

    if r.memory is not None:  # --dry-run
        from .train.memory import describe

        print(describe(r.memory))
        return 0

    if not processes().main:  # under `accelerate launch` the main process reports
        return 0
    _print_heal(r.heal)
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in r.seconds.items())
    print(f"parameters   {r.params:,}")
    print(f"time         {time.perf_counter() - t0:.1f}s ({steps})")
    print(f"saved to     {r.output}")
    return 0


def _cmd_analyze(opts: AnalyzeOptions, glob: GlobalOptions) -> int:
    from .pipeline import analyze
    from .report.tables import importance_table

    sizes = opts.block_size_list()
    r = analyze(opts)
    print(importance_table(r.scores, sizes))
    print(f"\n{r.scores.samples} sequences, {r.scores.tokens:,} tokens, {r.seconds:.1f}s")
    if opts.json:
        import json
        from pathlib import Path

        from .eval.result import write_text_atomically

        write_text_atomically(Path(opts.json), json.dumps(r.scores.to_dict(), indent=2))
        print(f"scores written to {opts.json}")
    return 0


def _cmd_export(opts: ExportOptions, glob: GlobalOptions) -> int:
    from .pipeline import export

    r = export(opts)
    if r["unshared_tensors"]:
        print(f"unfolded     {r['unshared_tensors']} shared tensors materialised")
        print(f"parameters   {r['params_stored_before']:,} stored -> {r['params_after']:,}")
    if r["output"] is not None:
        print(f"on disk      {r['bytes_on_disk'] / 2**20:.1f} MiB of safetensors")
        print(f"saved to     {r['output']}")
    if r["gguf"] is not None:
        _print_gguf(r["gguf"])
    return 0


def _print_gguf(g) -> None:
    print(f"gguf         {g.path} ({g.outtype}, llama.cpp arch {g.arch}, {g.tensors} tensors, "
          f"{g.bytes / 2**20:.1f} MiB; tokenizer {g.tokenizer})")
    for note in g.notes:
        print(f"             note: {note}")
    c = g.check
    if c is None:
        print("gguf check   not run: transformers cannot read this family's GGUF files")
    elif c.get("passed") is None:
        print(f"gguf check   not run: {c['error']}" if c["tool"] == "none" else
              f"gguf check   could not read it back: {c['error']}", file=sys.stdout if c["tool"] == "none" else sys.stderr)
    else:
        verdict = "ok" if c["passed"] else "DIFFERS MORE THAN EXPECTED"
        print(f"gguf check   {verdict}: read back with transformers, max |logit diff| {c['max_abs_logit_diff']:.3g} "
              f"on {c['tokens']} tokens, top-1 agreement {c['top1_agreement']:.0%}")


def _cmd_eval(opts: EvaluateOptions, glob: GlobalOptions) -> int:
    from .pipeline import evaluate_model
    from .report.tables import eval_table

    if not opts.tasks and not opts.ppl and not opts.lm_eval:
        print("layerfold: note: no --tasks or --ppl given; measuring cost only", file=sys.stderr)
    reference, result = evaluate_model(opts)
    results = [reference, result] if reference is not None else [result]
    print(eval_table(results))
    if "lm_eval" in result.settings:
        for name, metrics in result.settings["lm_eval"].items():
            print(f"lm-evaluation-harness {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    print(f"\n{result.seconds:.1f}s")
    if opts.json:
        print(f"result written to {result.save(opts.json)}")
    return 0


def _cmd_compare(opts: CompareOptions, glob: GlobalOptions) -> int:
    from .eval import EvalResult
    from .report.tables import eval_table

    results = [EvalResult.load(p) for p in opts.results]
    for r in results[1:]:
        try:
            r.add_stability(results[0])
        except LayerfoldError as e:
            print(f"layerfold: note: no stability for {r.model}: {e}", file=sys.stderr)
    print(eval_table(results, names=opts.results))
    return 0


_HANDLERS = {"compress": _cmd_compress, "run": _cmd_run, "heal": _cmd_heal, "analyze": _cmd_analyze,
             "eval": _cmd_eval, "compare": _cmd_compare, "export": _cmd_export}


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # option defaults may read the environment ($LAYERFOLD_HEAL_TOKENS)
    except LayerfoldError as e:
        print(f"layerfold: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    args = parser.parse_args(argv)
    glob = schema.from_arguments(GlobalOptions(), args)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if glob.quiet:
        os.environ["TQDM_DISABLE"] = "1"
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # SIGTERM unwinds like Ctrl-C: every temporary folder is removed on the way out
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        opts = _quiet(schema.from_arguments(args.root(), args), glob.quiet)
        from . import validation

        validation.check(opts)  # everything the options, the config and the file headers can tell
        preflight.check(opts)  # packages and devices the options need, before any model or data (after
        # validation: importing peft takes seconds, a bad option is refused without it)
        return args.func(opts, glob)
    except LayerfoldError as e:
        if glob.debug:
            raise
        print(f"layerfold: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("layerfold: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("layerfold: stopped by SIGTERM; nothing was written", file=sys.stderr)
        return EXIT_TERMINATED
    except OSError as e:
        if glob.debug:
            raise
        what = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"layerfold: error: {what}{where}; nothing was written", file=sys.stderr)
        return EXIT_RUNTIME
    except Exception as e:  # a bug: still one line, with a way to see more
        if glob.debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"layerfold: internal error: {type(e).__name__}: {first} (rerun with --debug for details)",
              file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

"""The public entry points: ``analyze`` and ``compress``.

Each takes one options dataclass (what the command line parses) and returns a result
dataclass; printing is left to the caller.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .data.calibration import CalibrationSpec, load_calibration
from .errors import LayerfoldError
from .healing import HealOptions, compress_defaults, heal_command_defaults
from .importance import DEFAULT_ACTIVATION_BYTES, LayerScores, measure_similarity
from .methods import pruning
from .importance.gates import GateOptions
from .methods.foldgpt import FoldGPTOptions
from .methods.streamline import StreamlineOptions, StreamlineResult
from .models.card import model_card
from .models.loading import EMBEDDED_NAME, LoadedModel, Placement, load_model, locate_model
from .models.saving import folder_bytes, save_model_folder
from .models.surgery import count_parameters, decoder_layers, remove_layers

METHODS = ("streamline", "streamline-block", "bi", "angular", "last-n", "foldgpt")
DEFAULT_METHOD = "bi"  # best measured on the embedded model (benchmarks/healing.md)


@dataclass
class ModelOptions:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    placement: Placement | None = None  # an accelerate device map (``--device-map``); replaces ``device``


@dataclass
class AnalyzeOptions:
    model: ModelOptions = field(default_factory=ModelOptions)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    batch_size: int = 8
    progress: bool = True
    gates: GateOptions | None = None  # also train FoldGPT gates (``analyze --gates``)
    gate_remove: int | None = None  # the gates' budget: layers to remove (default 25%)
    max_memory: int = DEFAULT_ACTIVATION_BYTES  # activations of the calibration pass held at once


@dataclass
class EvalOptions:
    """What ``compress`` measures before and after, for the report in the output folder.

    By default only perplexity on the first ``ppl_limit`` LAMBADA documents (when the shared
    data folder is found) and the cost figures, so the main job stays fast.
    """

    tasks: list[str] = field(default_factory=list)  # e.g. ["piqa", "winogrande"]
    limit: int | None = None  # first N examples of each task
    ppl: list[str] | None = None  # None: lambada_openai if the data folder has it
    ppl_limit: int = 20
    data_dir: str | None = None
    enabled: bool = True  # False: no evaluation at all
    report: bool = True  # write report.html and figures/ into the output folder
    batch_size: int = 8

    def evaluate_kwargs(self) -> dict | None:
        """Arguments for ``layerfold.eval.evaluate``, or None when nothing is to be measured."""
        if not self.enabled:
            return None
        from .eval.tasks import data_dir, resolve_task_path

        ppl = self.ppl
        if ppl is None:
            ppl = []
            root = data_dir(self.data_dir)
            if root is not None:
                try:
                    resolve_task_path("lambada_openai", root)
                    ppl = ["lambada_openai"]
                except LayerfoldError:
                    pass
        return dict(tasks=list(self.tasks), ppl=list(ppl), limit=self.limit, ppl_limit=self.ppl_limit,
                    data_dir=self.data_dir, batch_size=self.batch_size, speed_tokens=(64, 16))


@dataclass
class CompressOptions:
    model: ModelOptions = field(default_factory=ModelOptions)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    method: str = DEFAULT_METHOD
    remove: int | None = None
    sparsity: float | None = None
    output: str | None = None
    force: bool = False
    batch_size: int = 8
    max_memory: int = DEFAULT_ACTIVATION_BYTES  # activations of the calibration pass held at once
    progress: bool = True
    streamline: StreamlineOptions = field(default_factory=StreamlineOptions)
    evaluation: EvalOptions = field(default_factory=EvalOptions)
    heal: HealOptions = field(default_factory=compress_defaults)
    foldgpt: FoldGPTOptions = field(default_factory=FoldGPTOptions)

    def command(self) -> str:
        """The equivalent command line, written into the output's model card."""
        parts = ["layerfold", "compress"]
        if self.model.model:
            parts.append(self.model.model)
        parts += ["--method", self.method]
        if self.remove is not None:
            parts += ["--remove", str(self.remove)]
        if self.sparsity is not None:
            parts += ["--sparsity", f"{self.sparsity:g}"]
        defaults = CalibrationSpec()
        flags = {"source": "--calib", "samples": "--calib-samples", "seq_len": "--seq-len",
                 "text_field": "--text-field", "seed": "--seed"}
        for name, flag in flags.items():
            value = getattr(self.calibration, name)
            if value != getattr(defaults, name):
                parts += [flag, str(value)]
        if self.method == "foldgpt":
            parts += _foldgpt_flags(self.foldgpt)
        if self.model.dtype != "auto":
            parts += ["--dtype", self.model.dtype]
        if self.method == "streamline":
            parts += _streamline_flags(self.streamline)
        ev = self.evaluation
        if ev.tasks:
            parts += ["--eval-tasks", ",".join(ev.tasks)]
        if ev.limit is not None:
            parts += ["--eval-limit", str(ev.limit)]
        if not ev.enabled:
            parts.append("--no-eval")
        if self.method == "foldgpt":
            pass  # its cure is its healing (the --cure-* flags)
        elif self.heal.enabled:
            parts += heal_flags(self.heal, compress_defaults())
        elif compress_defaults().enabled:
            parts.append("--no-heal")
        if self.output:
            parts += ["-o", self.output]
        return shlex.join(parts)


@dataclass
class AnalyzeResult:
    scores: LayerScores
    source: str
    seconds: float


@dataclass
class CompressResult:
    output: Path
    method: str
    removed: list[int]
    layer_map: list[int | None]
    layers_before: int
    layers_after: int
    params_before: int
    params_after: int
    bytes_on_disk: int
    seconds: dict[str, float]
    scores: LayerScores | None = None
    streamline: StreamlineResult | None = None
    eval_before: object | None = None  # layerfold.eval.EvalResult
    eval_after: object | None = None
    report: Path | None = None
    heal: dict | None = None  # HealResult.summary() when the model was healed
    extra: dict = field(default_factory=dict)


def _streamline_flags(o: StreamlineOptions) -> list[str]:
    """The flags that differ from their defaults, for the recorded command."""
    d = StreamlineOptions()
    flags = {"replacement": "--replacement", "loss": "--loss", "ffn_width": "--ffn-width",
             "ffn_activation": "--ffn-activation", "epochs": "--epochs", "train_tokens": "--train-tokens",
             "batch_size": "--train-batch-size", "val_fraction": "--val-fraction", "pair_dtype": "--pair-dtype"}
    parts = []
    for name, flag in flags.items():
        value = getattr(o, name)
        if value != getattr(d, name):
            parts += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    for name, flag in {"lr": "--lr", "min_lr": "--min-lr"}.items():
        value = getattr(o.train, name)
        if value != getattr(d.train, name):
            parts += [flag, f"{value:g}"]
    return parts


def _load(opts: ModelOptions, lazy: bool = False) -> LoadedModel:
    return load_model(opts.model, dtype=opts.dtype, device=opts.device,
                      trust_remote_code=opts.trust_remote_code, lazy=lazy, placement=opts.placement)


def analyze(opts: AnalyzeOptions, loaded: LoadedModel | None = None) -> AnalyzeResult:
    """Score every layer and block of a model by every criterion, in one calibration pass."""
    t0 = time.perf_counter()
    # layers are read from disk one at a time; self-generated calibration text needs the whole
    # model, so it is made (or read from its cache) before that
    # gates train through the whole model at once, so they need every layer in memory
    loaded = loaded or _load(opts.model, lazy=opts.gates is None)
    ids = load_calibration(opts.calibration, loaded, progress=opts.progress)
    scores = measure_similarity(
        loaded.model, loaded.arch, ids, batch_size=opts.batch_size, max_activation_bytes=opts.max_memory,
        progress=opts.progress,
    )
    if opts.gates is not None:
        from .importance.gates import gate_ranking

        n = scores.num_layers
        n_remove = pruning.layers_for_target(n, opts.gate_remove, None)
        heldout = _gate_check_rows(opts.calibration, loaded, opts.progress)
        g = gate_ranking(loaded.model, loaded.arch, ids, n_remove, opts.gates, heldout=heldout,
                         block_influence_removed=pruning.block_influence(scores, n_remove), progress=opts.progress)
        scores.extra["gates"] = g.gates
        scores.extra["gates_removed"] = sorted(g.removed)
        scores.extra["gates_scores"] = g.scores
        scores.extra["gates_check"] = g.check
        scores.extra["gates_options"] = g.options
    return AnalyzeResult(scores, loaded.source, time.perf_counter() - t0)


def _gate_check_rows(spec: CalibrationSpec, loaded: LoadedModel, progress: bool):
    """Held-out rows for checking the gates' choice against Block Influence's; None (no
    check) when a calibration file has no text left after the calibration rows."""
    from .eval.heldout import heldout_ids

    try:
        return heldout_ids(spec, loaded, progress=progress)
    except LayerfoldError:
        return None


def default_output_name(source: str, method: str, n_remove: int) -> str:
    name = EMBEDDED_NAME.split(":")[1] if source == EMBEDDED_NAME else Path(source.rstrip("/")).name
    name = re.sub(r"\.gguf$", "", name, flags=re.I)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"
    return f"{name}-{method}-minus{n_remove}"


def compress(opts: CompressOptions, loaded: LoadedModel | None = None) -> CompressResult:
    """Remove layers by ``opts.method`` (and, for ``streamline``, train a replacement for them);
    save a stock-loadable model folder."""
    if opts.method not in METHODS:
        raise LayerfoldError(f"unknown method {opts.method!r}; choose from {', '.join(METHODS)}")
    opts.calibration.validate()
    if opts.heal.enabled:
        opts.heal.validate()
    pruning.check_target(opts.remove, opts.sparsity)
    if opts.method == "streamline":
        opts.streamline.validate()
    if opts.method == "foldgpt":
        opts.foldgpt.validate()
        if opts.foldgpt.delta_rank:
            raise LayerfoldError("per-layer deltas (delta_rank) cannot be saved in a shared folder yet")
    if opts.output:
        from .models.saving import check_output_dir

        check_output_dir(Path(opts.output), opts.force)  # fail before any slow work
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    # layer-streamed: weights stay on disk until a layer is used, so importance, pair
    # collection and saving need about one layer in memory (FoldGPT trains all gates at once)
    loaded = loaded or _load(opts.model, lazy=opts.method != "foldgpt")
    seconds["load"] = time.perf_counter() - t
    if opts.method == "foldgpt":
        return _compress_foldgpt(opts, loaded, seconds)
    model, arch = loaded.model, loaded.arch
    n_layers = len(decoder_layers(model, arch))
    params_before = count_parameters(model)

    scores = ids = None
    if opts.method != "last-n":
        t = time.perf_counter()
        ids = load_calibration(opts.calibration, loaded, progress=opts.progress)
        seconds["calibration"] = time.perf_counter() - t
        t = time.perf_counter()
        scores = measure_similarity(model, arch, ids, batch_size=opts.batch_size,
                                    max_activation_bytes=opts.max_memory, progress=opts.progress)
        seconds["importance"] = time.perf_counter() - t

    eval_kw = opts.evaluation.evaluate_kwargs()
    eval_before = eval_after = None
    if eval_kw is not None or opts.heal.enabled:
        # evaluating the original and teaching the healed model need all of it at once
        from .models.lazy import materialize

        t = time.perf_counter()
        materialize(model, arch)
        seconds["load"] += time.perf_counter() - t
    if eval_kw is not None:
        from .eval import evaluate

        t = time.perf_counter()
        eval_before = evaluate(loaded, name=loaded.source, progress=opts.progress, **eval_kw)
        source = str(loaded.source)
        if eval_before.cost and (source.startswith("embedded:") or source.lower().endswith(".gguf")):
            eval_before.cost.bytes_on_disk = None  # a quantized GGUF file: not comparable to safetensors
        seconds["eval_before"] = time.perf_counter() - t

    heal_ids = heal_teacher = None
    if opts.heal.enabled:
        # the healing text and the teacher's answers come from the original, before surgery
        from .healing import healing_data, prepare_teacher, teacher_copy

        from .data.guard import check_not_eval_data
        from .healing import CALIBRATION_TEXT

        t = time.perf_counter()
        if opts.heal.data.source == CALIBRATION_TEXT:
            check_not_eval_data(opts.calibration.source)  # never heal on evaluation data
            heal_ids = ids if ids is not None else load_calibration(opts.calibration, loaded, progress=opts.progress)
        else:
            heal_ids = healing_data(opts.heal, loaded)
        seconds["heal_data"] = time.perf_counter() - t
        t = time.perf_counter()
        if opts.heal.needs_teacher:
            if opts.heal.teacher_cache:
                # the layer map is not known yet: keep every layer the student's tail can come from
                # (+1: LLM-Streamline's replacement takes one slot)
                spare = pruning.layers_for_target(n_layers, opts.remove, opts.sparsity) + 1
                heal_teacher = prepare_teacher(opts.heal, loaded, heal_ids, removed=spare)
            else:
                heal_teacher = teacher_copy(loaded).model
        seconds["heal_teacher"] = time.perf_counter() - t

    extra_files: dict[str, str] = {}
    sl = None
    if opts.method == "streamline":
        sl, extra_files = _streamline(opts, loaded, ids, scores)
        seconds.update(sl.seconds)
        remove, layer_map = sl.removed, sl.layer_map
        n_remove = len(remove)
    else:
        n_remove = pruning.layers_for_target(n_layers, opts.remove, opts.sparsity)
        if opts.method == "last-n":
            remove = pruning.last_layers(n_layers, n_remove)
        else:
            remove = pruning.PRUNING_METHODS[opts.method](scores, n_remove)
        layer_map = list(remove_layers(model, arch, remove))

    heal_summary = None
    if opts.heal.enabled:
        from .healing import heal

        t = time.perf_counter()
        healed = heal(loaded, None, opts.heal, ids=heal_ids, prepared_teacher=heal_teacher, layer_map=layer_map)
        seconds["heal"] = time.perf_counter() - t
        heal_summary = healed.summary()
        model = loaded.model
    params_after = count_parameters(model)
    out = Path(opts.output or default_output_name(loaded.source, opts.method, n_remove))
    if eval_kw is not None:
        from .eval import evaluate

        t = time.perf_counter()
        eval_after = evaluate(model, loaded.tokenizer, name=str(out), reference=eval_before,
                              progress=opts.progress, **eval_kw)
        seconds["eval_after"] = time.perf_counter() - t

    recipe = {
        "method": opts.method,
        "remove": n_remove,
        "sparsity": opts.sparsity,
        "removed_layers": remove,
        "calibration": asdict(opts.calibration) if scores is not None else None,
        "dtype": opts.model.dtype,
        "heal": opts.heal.recipe() if opts.heal.enabled else None,
    }
    summary = f"Removed {n_remove} of {n_layers} decoder layers by `{opts.method}`; " + (
        heal_sentence(heal_summary) if heal_summary else "no retraining."
    )
    if sl is not None:
        recipe["streamline"] = _streamline_record(opts.streamline, sl)
        summary = _streamline_summary(opts.streamline, sl, n_layers)
        if heal_summary:
            summary += " Then " + heal_sentence(heal_summary)
    if eval_after is not None:
        summary += "\n\n" + _evaluation_table(eval_before, eval_after, opts.evaluation.limit)
    card = model_card(
        base_model=loaded.base_model,
        command=opts.command(),
        recipe=recipe,
        layer_map=layer_map,
        params_before=params_before,
        params_after=params_after,
        layers_before=n_layers,
        summary=summary,
    )
    record = {
        "layerfold_version": _version(),
        "base_model": loaded.base_model,
        "source": loaded.source,
        "command": opts.command(),
        "recipe": recipe,
        "layer_map": layer_map,
        "layers_before": n_layers,
        "params_before": params_before,
        "params_after": params_after,
        "scores": scores.to_dict() if scores else None,
        "evaluation": {"before": eval_before.summary(), "after": eval_after.summary()} if eval_after else None,
        "heal": heal_summary,
    }
    extra_files["layerfold.json"] = json.dumps(record, indent=2, default=str) + "\n"
    t = time.perf_counter()
    out = save_model_folder(loaded, out, card=card, extra_files=extra_files, force=opts.force)
    seconds["save"] = time.perf_counter() - t
    report = None
    if eval_after is not None and eval_after.cost is not None:
        eval_after.cost.bytes_on_disk = folder_bytes(out)
    if opts.evaluation.report:
        report = _write_report(out, record, eval_before, eval_after)
    return CompressResult(
        output=out,
        method=opts.method,
        removed=remove,
        layer_map=layer_map,
        layers_before=n_layers,
        layers_after=len(layer_map),
        params_before=params_before,
        params_after=params_after,
        bytes_on_disk=folder_bytes(out),
        seconds=seconds,
        scores=scores,
        streamline=sl,
        heal=heal_summary,
        eval_before=eval_before,
        eval_after=eval_after,
        report=report,
    )


def _write_report(out: Path, record: dict, eval_before, eval_after) -> Path | None:
    """Evaluation results and the HTML report, added to the finished model folder.

    The model folder is complete before this runs; a report that cannot be written is a
    warning, never a lost model.
    """
    import sys

    from .report.html import write_report

    try:
        if eval_before is not None:
            eval_before.save(out / "eval_before.json")
        if eval_after is not None:
            eval_after.save(out / "eval_after.json")
        return write_report(out, record, eval_before, eval_after)
    except (OSError, ImportError) as e:
        print(f"layerfold: warning: report not written: {e}", file=sys.stderr)
        return None


def _streamline(opts: CompressOptions, loaded: LoadedModel, ids, scores) -> tuple[StreamlineResult, dict]:
    """Run LLM-Streamline in place on ``loaded.model``; returns its result and the files it adds
    to the output folder (the training log, and model code where the replacement needs it)."""
    import os
    import shutil
    import tempfile

    from .methods.streamline import streamline
    from .nn.portable import portable_files

    so = opts.streamline
    # pairs go beside the output (same disk, never a RAM-backed /tmp) unless told otherwise
    if so.pairs_dir:
        base = Path(so.pairs_dir).expanduser()
    else:
        base = Path(opts.output).expanduser().resolve().parent if opts.output else Path.cwd()
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".layerfold-streamline-{os.getpid()}-", dir=base))
    try:
        log_path = work / "training_log.jsonl"
        result = streamline(
            loaded.model, loaded.arch, ids, scores, so, remove=opts.remove, sparsity=opts.sparsity,
            work_dir=work, log_path=log_path, progress=opts.progress, batch_size=opts.batch_size,
        )
        files = {"training_log.jsonl": log_path.read_text()} if log_path.exists() else {}
        files.update(portable_files(loaded.model, loaded.arch))
        return result, files
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _evaluation_table(before, after, limit: int | None) -> str:
    """Accuracy before and after, and stability against the original, as a Markdown table."""
    rows = ["| task | original acc | compressed acc | stability |", "|---|---:|---:|---:|"]
    for name, task in after.tasks.items():
        o, c = before.tasks[name].metrics, task.metrics
        if "acc" in o and "stability" in c:
            rows.append(f"| {name} | {o['acc']:.3f} | {c['acc']:.3f} | {c['stability']:.3f} |")
    if len(rows) == 2:
        return ""
    scope = f"first {limit} examples of each task" if limit else "all examples"
    return f"Evaluation ({scope}; stability as in LLM-Streamline: confidence-weighted agreement " \
           "with the original on which answers are right; `eval_after.json` has everything):\n\n" + "\n".join(rows)


def _streamline_record(so: StreamlineOptions, sl: StreamlineResult) -> dict:
    fit = sl.fit
    return {
        "replacement": so.replacement,
        "loss": so.loss,
        "ffn_width": so.ffn_width,
        "ffn_activation": so.ffn_activation if so.replacement == "ffn" else None,
        "block_start": sl.start,
        "block_layers": sl.window,
        "block_cosine": sl.block_cosine,
        "replacement_parameters": sl.replacement_params,
        "pair_tokens": sl.pair_tokens,
        "pair_bytes": sl.pair_bytes,
        "pair_dtype": so.pair_dtype if sl.pair_tokens else None,
        "train": asdict(so.train) | {"epochs": so.epochs, "train_tokens": so.train_tokens,
                                     "batch_size": so.batch_size, "val_fraction": so.val_fraction},
        "steps": fit.steps if fit else 0,
        "first_val_loss": fit.first_val if fit else None,
        "best_val_loss": fit.best_val if fit else None,
        "best_step": fit.best_step if fit else None,
        "train_seconds": fit.seconds if fit else 0.0,
    }


def _streamline_summary(so: StreamlineOptions, sl: StreamlineResult, n_layers: int) -> str:
    block = f"layers {sl.start}..{sl.start + sl.window - 1}"
    if so.replacement == "none":
        return (f"LLM-Streamline block choice without training: of the most redundant block ({block}, "
                f"cosine {sl.block_cosine:.4f}) only the first layer is kept; {len(sl.removed)} of "
                f"{n_layers} layers removed.")
    fit = sl.fit
    trained = (f"validation {so.loss} loss {fit.first_val:.4g} -> {fit.best_val:.4g} in {fit.steps} steps"
               if fit else "untrained")
    return (f"LLM-Streamline: the most redundant block ({block}, cosine {sl.block_cosine:.4f}) was replaced "
            f"by one trained `{so.replacement}` replacement ({so.loss} loss; {trained}); "
            f"{len(sl.removed)} of {n_layers} layers removed net. Training log: `training_log.jsonl`.")


def heal_sentence(summary: dict) -> str:
    return (f"healed on {summary['tokens']:,} tokens ({summary['trainable']}; "
            f"{summary['trainable_parameters']:,} trainable parameters) with the original model as teacher.")


def heal_flags(h: HealOptions, d: HealOptions) -> list[str]:
    """The command-line flags that reproduce a healing recipe (those off the command's defaults ``d``)."""
    parts = ["--heal-tokens", str(h.tokens)]
    flags = {"train": "--heal-train", "layers": "--heal-layers", "lm_head": "--heal-lm-head",
             "lora_rank": "--lora-rank", "lora_alpha": "--lora-alpha", "lora_modules": "--lora-modules",
             "ce": "--heal-ce", "kl": "--heal-kl", "mse": "--heal-mse", "mse_layers": "--heal-mse-layers",
             "temperature": "--heal-temperature", "topk": "--heal-topk", "batch_size": "--heal-batch-size",
             "grad_accum": "--grad-accum", "rows": "--heal-rows", "lr": "--heal-lr", "precision": "--heal-precision", "seed": "--heal-seed"}
    for name, flag in flags.items():
        value = getattr(h, name)
        if value != getattr(d, name):
            parts += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    if not h.train_norm:
        parts.append("--heal-no-norm")
    if not h.teacher_cache:
        parts.append("--no-teacher-cache")
    if h.checkpointing:
        parts.append("--heal-checkpointing")
    for name, flag in {"source": "--heal-data", "seq_len": "--heal-seq-len", "seed": "--heal-data-seed"}.items():
        value = getattr(h.data, name)
        if value != getattr(d.data, name):
            parts += [flag, str(value)]
    return parts


_FOLDGPT_FLAGS = {
    "group_size": "--group-size", "groups": "--groups", "share_init": "--share-init",
    "gates.steps": "--gate-steps", "gates.lr": "--gate-lr", "gates.rounds": "--gate-rounds",
    "gates.budget_weight": "--budget-weight", "gates.polar_weight": "--polar-weight",
    "gates.gate_type": "--gate-type", "gates.batch_size": "--gate-batch-size",
    "cure.steps": "--cure-steps", "cure.lr": "--cure-lr", "cure.samples": "--cure-samples",
    "cure.batch_size": "--cure-batch-size", "cure.kl_weight": "--kl-weight",
    "cure.tail_layers": "--tail-layers", "cure.tail_weight": "--tail-weight",
}

def _foldgpt_flags(o: FoldGPTOptions) -> list[str]:
    """The flags that differ from the defaults, for the model card's command line."""
    default = FoldGPTOptions()
    parts = []
    for key, flag in _FOLDGPT_FLAGS.items():
        value = _dig(o, key)
        if value != _dig(default, key):
            parts += [flag, str(value)]
    return parts

def _dig(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj

def _compress_foldgpt(opts: CompressOptions, loaded: LoadedModel, seconds: dict) -> CompressResult:
    """Gate, remove, share, cure, save (METHODS.md section 3)."""
    import dataclasses
    import resource
    import tempfile

    from .methods.foldgpt import fold
    from .nn.shared import save_shared_folder

    model, arch = loaded.model, loaded.arch
    n_layers = len(decoder_layers(model, arch))
    n_remove = pruning.layers_for_target(n_layers, opts.remove, opts.sparsity)
    fo = opts.foldgpt
    name = f"foldgpt-g{fo.group_size}" if not fo.groups else "foldgpt"
    out = Path(opts.output or default_output_name(loaded.source, name, n_remove))
    t = time.perf_counter()
    ids = load_calibration(opts.calibration, loaded, progress=opts.progress)
    cure_ids = None
    if fo.cure.steps > 0:
        # fresh text for the cure (another seed), so the gates and the cure see different samples
        spec = dataclasses.replace(opts.calibration, samples=fo.cure.samples, seed=opts.calibration.seed + 1)
        cure_ids = load_calibration(spec, loaded, progress=opts.progress)
    heldout = _gate_check_rows(opts.calibration, loaded, opts.progress)
    seconds["calibration"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "training_log.jsonl"
        t = time.perf_counter()
        r = fold(loaded, ids, n_remove, fo, cure_ids=cure_ids, log_file=str(log_path), progress=opts.progress,
                 heldout=heldout)
        seconds["foldgpt"] = time.perf_counter() - t
        cure_log = log_path.read_text(encoding="utf-8") if log_path.exists() else ""
    gate_log = "".join(
        json.dumps({"round": i + 1, **rec}) + "\n" for i, rnd in enumerate(r.gates.rounds) for rec in rnd["log"]
    )
    recipe = {
        "method": "foldgpt",
        "remove": n_remove,
        "sparsity": opts.sparsity,
        "removed_layers": r.removed,
        "groups": r.groups,
        "share_init": fo.share_init,
        "gates": asdict(fo.gates),
        "cure": asdict(fo.cure) if fo.cure.steps > 0 else None,
        "calibration": asdict(opts.calibration),
        "dtype": opts.model.dtype,
    }
    shared = sum(len(g) for g in r.groups if len(g) > 1)
    summary = (
        f"FoldGPT: removed {n_remove} of {n_layers} decoder layers by learned gates, then "
        f"{shared} of the remaining {len(r.kept)} layers share their linear weights in groups "
        f"({', '.join('-'.join(map(str, (g[0], g[-1]))) for g in r.groups if len(g) > 1) or 'none'}); "
        + (f"cured for {fo.cure.steps} steps with logit KL + tail-layer distillation."
           if fo.cure.steps > 0 else "no cure.")
        + " Shared tensors are stored once: load with layerfold, or with "
        "`AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)`; "
        "`layerfold export PATH --unfold -o OUT` writes a standard model."
    )
    card = model_card(
        base_model=loaded.base_model, command=opts.command(), recipe=recipe, layer_map=list(r.kept),
        params_before=r.params_before, params_after=r.params_stored, layers_before=n_layers, summary=summary,
    )
    record = {
        "layerfold_version": _version(),
        "base_model": loaded.base_model,
        "source": loaded.source,
        "command": opts.command(),
        "recipe": recipe,
        "layer_map": list(r.kept),
        "layers_before": n_layers,
        "params_before": r.params_before,
        "params_after_removal": r.params_after_removal,
        "params_stored": r.params_stored,
        "params_after": r.params_stored,
        "gates": r.gates.to_dict() | {"rounds": [{k: v for k, v in x.items() if k != "log"} for x in r.gates.rounds]},
        "cure": {k: v for k, v in r.cure.items() if k != "history"} if r.cure else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds": seconds,
    }
    t = time.perf_counter()
    files = {"gate_log.jsonl": gate_log}
    if cure_log:
        files["training_log.jsonl"] = cure_log
    files["layerfold.json"] = json.dumps(record, indent=2, default=str) + "\n"
    out = save_shared_folder(loaded, out, card=card, extra_files=files, force=opts.force)
    seconds["save"] = time.perf_counter() - t
    return CompressResult(
        output=out, method="foldgpt", removed=r.removed, layer_map=list(r.kept), layers_before=n_layers,
        layers_after=len(r.kept), params_before=r.params_before, params_after=r.params_stored,
        bytes_on_disk=folder_bytes(out), seconds=seconds, scores=None,
        extra={"groups": r.groups, "gates": r.gates.gates, "gate_check": r.gates.check,
               "params_after_removal": r.params_after_removal,
               "cure": record["cure"]},
    )

@dataclass
class ExportOptions:
    model: ModelOptions = field(default_factory=ModelOptions)
    unfold: bool = True
    output: str | None = None
    force: bool = False

def export(opts: ExportOptions, loaded: LoadedModel | None = None) -> dict:
    """Write a standard model folder: shared tensors materialised (``--unfold``)."""
    from .models.saving import check_output_dir
    from .nn.shared import unfold

    if not opts.output:
        raise LayerfoldError("export needs an output folder (-o OUT)")
    if not opts.unfold:
        raise LayerfoldError("export knows one format so far: --unfold (a standard model folder)")
    check_output_dir(Path(opts.output), opts.force)
    loaded = loaded or _load(opts.model)
    stored = count_parameters(loaded.model)
    n = unfold(loaded)
    card = model_card(
        base_model=loaded.base_model, command=shlex.join(["layerfold", "export", loaded.source, "--unfold", "-o", opts.output]),
        recipe={"method": "unfold", "unshared_tensors": n}, layer_map=list(range(len(decoder_layers(loaded.model, loaded.arch)))),
        params_before=stored, params_after=count_parameters(loaded.model),
        layers_before=len(decoder_layers(loaded.model, loaded.arch)),
        summary=f"Unfolded: {n} shared weight tensors written out per layer, for tools that cannot express sharing.",
    )
    out = save_model_folder(loaded, Path(opts.output), card=card, force=opts.force)
    return {"output": out, "unshared_tensors": n, "params_stored_before": stored,
            "params_after": count_parameters(loaded.model), "bytes_on_disk": folder_bytes(out)}


def _version() -> str:
    from . import __version__

    return __version__


@dataclass
class HealModelOptions:
    """``layerfold heal``: heal an already compressed model folder against its original."""

    model: ModelOptions = field(default_factory=ModelOptions)
    teacher: str | None = None  # the original model; None: the embedded model
    no_teacher: bool = False  # heal with the next-token loss only
    heal: HealOptions = field(default_factory=heal_command_defaults)
    output: str | None = None
    force: bool = False

    def command(self) -> str:
        parts = ["layerfold", "heal"]
        if self.model.model:
            parts.append(self.model.model)
        if self.no_teacher:
            parts.append("--no-teacher")
        elif self.teacher:
            parts += ["--teacher", self.teacher]
        parts += heal_flags(self.heal, heal_command_defaults())
        if self.output:
            parts += ["-o", self.output]
        return shlex.join(parts)




@dataclass
class HealModelResult:
    output: Path
    heal: dict
    params: int
    seconds: dict[str, float]


def heal_model(opts: HealModelOptions) -> HealModelResult:
    """Load a compressed model and its teacher, heal, and save a new model folder."""
    from .healing import CALIBRATION_TEXT, heal, healing_data, prepare_teacher
    from .models.saving import check_output_dir

    opts.heal.validate()
    if opts.heal.data.source == CALIBRATION_TEXT:
        raise LayerfoldError("--heal-data calib (the calibration text) works only with `layerfold compress`")
    if not opts.heal.enabled:
        raise LayerfoldError("--heal-tokens must be positive for layerfold heal")
    if opts.no_teacher:
        opts.heal = replace_heal_losses_without_teacher(opts.heal)
    if opts.model.model is None:
        raise LayerfoldError("give the compressed model folder to heal")
    out = Path(opts.output or f"{Path(opts.model.model.rstrip('/')).name}-healed")
    check_output_dir(out, opts.force, protect=Path(opts.model.model) if Path(opts.model.model).is_dir() else None)
    student_dir = locate_model(opts.model.model)[4]  # a path that is not a model fails now, not after the teacher's work
    recorded = student_dir / "layerfold.json" if student_dir is not None else None
    # the student's layer map (from its own record): the mse loss compares the layers it came from
    recorded_map = json.loads(recorded.read_text()).get("layer_map") if recorded and recorded.is_file() else None
    seconds: dict[str, float] = {}
    teacher = ids = prepared = None
    if opts.heal.needs_teacher:
        # the teacher first: its outputs are cached on disk, and then it leaves memory before
        # the student arrives, so the two never need room together (big models, device maps)
        t = time.perf_counter()
        teacher = _load(replace(opts.model, model=opts.teacher))  # the student's loading options
        seconds["load teacher"] = time.perf_counter() - t
        t = time.perf_counter()
        ids = healing_data(opts.heal, teacher)
        prepared = prepare_teacher(opts.heal, teacher, ids, recorded_map)
        seconds["teacher outputs"] = time.perf_counter() - t
    t = time.perf_counter()
    student = _load(opts.model)
    seconds["load"] = time.perf_counter() - t
    if teacher is not None and teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise LayerfoldError("the teacher and the student use different tokenizers")
    teacher_base = teacher.base_model if teacher is not None else None
    if opts.heal.teacher_cache:
        teacher = None
        _free_memory()
    previous = {}
    if student.local_dir is not None and (student.local_dir / "layerfold.json").is_file():
        previous = json.loads((student.local_dir / "layerfold.json").read_text())
    t = time.perf_counter()
    result = heal(student, teacher, opts.heal, ids=ids, prepared_teacher=prepared, layer_map=recorded_map)
    seconds["heal"] = time.perf_counter() - t
    summary = result.summary()
    n_layers = len(decoder_layers(student.model, student.arch))
    layer_map = previous.get("layer_map") or list(range(n_layers))
    params = count_parameters(student.model)
    recipe = dict(previous.get("recipe") or {"method": "healed"})
    recipe["heal"] = opts.heal.recipe()
    base = previous.get("base_model") or teacher_base or student.base_model
    card = model_card(
        base_model=base, command=opts.command(), recipe=recipe, layer_map=layer_map,
        params_before=previous.get("params_before") or params, params_after=params,
        layers_before=previous.get("layers_before") or n_layers,
        summary=f"{student.source} {heal_sentence(summary)}",
    )
    record = dict(previous, layerfold_version=_version(), base_model=base, source=student.source,
                  command=opts.command(), recipe=recipe, layer_map=layer_map, heal=summary,
                  params_after=params)
    t = time.perf_counter()
    out = save_model_folder(student, out, card=card, force=opts.force,
                            extra_files={"layerfold.json": json.dumps(record, indent=2, default=str) + "\n"})
    seconds["save"] = time.perf_counter() - t
    return HealModelResult(out, summary, params, seconds)


def _free_memory() -> None:
    """Hand the memory of dropped models back (to the OS on CPU, to the allocator's pool on GPU)."""
    import gc

    import torch

    from .models.lazy import return_freed_memory

    gc.collect()
    return_freed_memory()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def replace_heal_losses_without_teacher(h: HealOptions) -> HealOptions:
    from dataclasses import replace

    return replace(h, ce=h.ce or 1.0, kl=0.0, mse=0.0)

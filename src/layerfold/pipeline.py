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

from . import recipe as recipes
from .data.calibration import load_calibration
from .errors import LayerfoldError
from .eval.evaluate import EvalOptions
from .healing import HealOptions
from .importance import LayerScores, measure_similarity
from .methods import pruning
from .methods.plan import METHODS
from .methods.streamline import StreamlineOptions, StreamlineResult
from .models.card import model_card
from .models.loading import EMBEDDED_NAME, LoadedModel, ModelOptions, load_model, locate_model
from .models.saving import folder_bytes, save_model_folder
from .models.surgery import count_parameters, decoder_layers, remove_layers
from .recipe import AnalyzeOptions, CompressOptions, EvaluateOptions, ExportOptions, HealModelOptions

__all__ = ["AnalyzeOptions", "CompressOptions", "EvalOptions", "EvaluateOptions", "ExportOptions",
           "HealModelOptions", "ModelOptions", "analyze", "compress", "evaluate_model", "export", "heal_model"]

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
    ids = load_calibration(opts.data, loaded, progress=opts.progress)
    scores = measure_similarity(
        loaded.model, loaded.arch, ids, batch_size=opts.layer_pass.batch_size, max_activation_bytes=opts.layer_pass.max_memory,
        progress=opts.progress,
    )
    if opts.gates is not None:
        from .importance.gates import gate_ranking

        n = scores.num_layers
        n_remove = pruning.layers_for_target(n, opts.gate_remove, None)
        g = gate_ranking(loaded.model, loaded.arch, ids, n_remove, opts.gates, progress=opts.progress)
        scores.extra["gates"] = g.gates
        scores.extra["gates_removed"] = sorted(g.removed)
        scores.extra["gates_options"] = g.options
    return AnalyzeResult(scores, loaded.source, time.perf_counter() - t0)


def default_output_name(source: str, method: str, n_remove: int) -> str:
    name = EMBEDDED_NAME.split(":")[1] if source == EMBEDDED_NAME else Path(source.rstrip("/")).name
    name = re.sub(r"\.gguf$", "", name, flags=re.I)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"
    return f"{name}-{method}-minus{n_remove}"


def compress(opts: CompressOptions, loaded: LoadedModel | None = None) -> CompressResult:
    """Remove layers by ``opts.selection.method`` (and, for ``streamline``, train a replacement for them);
    save a stock-loadable model folder."""
    if opts.selection.method not in METHODS:
        raise LayerfoldError(f"unknown method {opts.selection.method!r}; choose from {', '.join(METHODS)}")
    opts.data.validate()
    opts.layer_pass.validate()
    opts.evaluation.validate()
    if opts.healing.enabled:
        opts.healing.validate()
    pruning.check_target(opts.selection.remove, opts.selection.sparsity)
    if opts.selection.method == "streamline":
        opts.repair.validate()
    if opts.selection.method == "foldgpt":
        opts.foldgpt.validate()
    if opts.output.path:
        from .models.saving import check_output_dir

        check_output_dir(Path(opts.output.path), opts.output.force)  # fail before any slow work
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    # layer-streamed: weights stay on disk until a layer is used, so importance, pair
    # collection and saving need about one layer in memory (FoldGPT trains all gates at once)
    loaded = loaded or _load(opts.model, lazy=opts.selection.method != "foldgpt")
    seconds["load"] = time.perf_counter() - t
    if opts.selection.method == "foldgpt":
        return _compress_foldgpt(opts, loaded, seconds)
    model, arch = loaded.model, loaded.arch
    n_layers = len(decoder_layers(model, arch))
    params_before = count_parameters(model)

    scores = ids = None
    if opts.selection.method != "last-n":
        t = time.perf_counter()
        ids = load_calibration(opts.data, loaded, progress=opts.progress)
        seconds["calibration"] = time.perf_counter() - t
        t = time.perf_counter()
        scores = measure_similarity(model, arch, ids, batch_size=opts.layer_pass.batch_size,
                                    max_activation_bytes=opts.layer_pass.max_memory, progress=opts.progress)
        seconds["importance"] = time.perf_counter() - t

    eval_kw = opts.evaluation.evaluate_kwargs()
    eval_before = eval_after = None
    if eval_kw is not None or opts.healing.enabled:
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
    if opts.healing.enabled:
        # the healing text and the teacher's answers come from the original, before surgery
        from .healing import healing_data, prepare_teacher, teacher_copy

        from .data.guard import check_not_eval_data
        from .healing import CALIBRATION_TEXT

        t = time.perf_counter()
        if opts.healing.data.source == CALIBRATION_TEXT:
            check_not_eval_data(opts.data.source)  # never heal on evaluation data
            heal_ids = ids if ids is not None else load_calibration(opts.data, loaded, progress=opts.progress)
        else:
            heal_ids = healing_data(opts.healing, loaded)
        seconds["heal_data"] = time.perf_counter() - t
        t = time.perf_counter()
        if opts.healing.needs_teacher:
            if opts.healing.teacher_cache:
                heal_teacher = prepare_teacher(opts.healing, loaded, heal_ids)
            else:
                heal_teacher = teacher_copy(loaded).model
        seconds["heal_teacher"] = time.perf_counter() - t

    extra_files: dict[str, str] = {}
    sl = None
    if opts.selection.method == "streamline":
        sl, extra_files = _streamline(opts, loaded, ids, scores)
        seconds.update(sl.seconds)
        remove, layer_map = sl.removed, sl.layer_map
        n_remove = len(remove)
    else:
        n_remove = pruning.layers_for_target(n_layers, opts.selection.remove, opts.selection.sparsity)
        if opts.selection.method == "last-n":
            remove = pruning.last_layers(n_layers, n_remove)
        else:
            remove = pruning.PRUNING_METHODS[opts.selection.method](scores, n_remove)
        layer_map = list(remove_layers(model, arch, remove))

    heal_summary = None
    if opts.healing.enabled:
        from .healing import heal

        t = time.perf_counter()
        healed = heal(loaded, None, opts.healing, ids=heal_ids, prepared_teacher=heal_teacher)
        seconds["heal"] = time.perf_counter() - t
        heal_summary = healed.summary()
        model = loaded.model
    params_after = count_parameters(model)
    out = Path(opts.output.path or default_output_name(loaded.source, opts.selection.method, n_remove))
    if eval_kw is not None:
        from .eval import evaluate

        t = time.perf_counter()
        eval_after = evaluate(model, loaded.tokenizer, name=str(out), reference=eval_before,
                              progress=opts.progress, **eval_kw)
        seconds["eval_after"] = time.perf_counter() - t

    recipe = {
        "method": opts.selection.method,
        "remove": n_remove,
        "sparsity": opts.selection.sparsity,
        "removed_layers": remove,
        "calibration": asdict(opts.data) if scores is not None else None,
        "dtype": opts.model.dtype,
        "heal": opts.healing.recipe() if opts.healing.enabled else None,
    }
    summary = f"Removed {n_remove} of {n_layers} decoder layers by `{opts.selection.method}`; " + (
        heal_sentence(heal_summary) if heal_summary else "no retraining."
    )
    if sl is not None:
        recipe["streamline"] = _streamline_record(opts.repair, sl)
        summary = _streamline_summary(opts.repair, sl, n_layers)
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
        recipe_yaml=recipes.to_yaml(opts),
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
    extra_files[recipes.RECIPE_FILE] = recipes.to_yaml(opts)
    t = time.perf_counter()
    out = save_model_folder(loaded, out, card=card, extra_files=extra_files, force=opts.output.force)
    seconds["save"] = time.perf_counter() - t
    report = None
    if eval_after is not None and eval_after.cost is not None:
        eval_after.cost.bytes_on_disk = folder_bytes(out)
    if opts.evaluation.report:
        report = _write_report(out, record, eval_before, eval_after)
    return CompressResult(
        output=out,
        method=opts.selection.method,
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

    so = opts.repair
    # pairs go beside the output (same disk, never a RAM-backed /tmp) unless told otherwise
    if so.pairs_dir:
        base = Path(so.pairs_dir).expanduser()
    else:
        base = Path(opts.output.path).expanduser().resolve().parent if opts.output.path else Path.cwd()
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".layerfold-streamline-{os.getpid()}-", dir=base))
    try:
        log_path = work / "training_log.jsonl"
        result = streamline(
            loaded.model, loaded.arch, ids, scores, so, remove=opts.selection.remove, sparsity=opts.selection.sparsity,
            work_dir=work, log_path=log_path, progress=opts.progress, batch_size=opts.layer_pass.batch_size,
            checkpoints=opts.healing.checkpoints("replacement"),
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
        "train": {k: getattr(so, k) for k in ("lr", "min_lr", "weight_decay", "warmup", "grad_clip", "epochs",
                                              "train_tokens", "batch_size", "grad_accum", "val_fraction",
                                              "precision", "seed")},
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


def _compress_foldgpt(opts: CompressOptions, loaded: LoadedModel, seconds: dict) -> CompressResult:
    """Gate, remove, share, cure, save (METHODS.md section 3)."""
    import dataclasses
    import resource
    import tempfile

    from .methods.foldgpt import fold
    from .export.shared import save_shared_folder

    model, arch = loaded.model, loaded.arch
    n_layers = len(decoder_layers(model, arch))
    n_remove = pruning.layers_for_target(n_layers, opts.selection.remove, opts.selection.sparsity)
    fo = opts.foldgpt
    name = f"foldgpt-g{fo.group_size}" if not fo.groups else "foldgpt"
    out = Path(opts.output.path or default_output_name(loaded.source, name, n_remove))
    t = time.perf_counter()
    ids = load_calibration(opts.data, loaded, progress=opts.progress)
    cure_ids = None
    if fo.cure.steps > 0:
        # fresh text for the cure (another seed), so the gates and the cure see different samples
        spec = dataclasses.replace(opts.data, samples=fo.cure.samples, seed=opts.data.seed + 1)
        cure_ids = load_calibration(spec, loaded, progress=opts.progress)
    seconds["calibration"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "training_log.jsonl"
        t = time.perf_counter()
        r = fold(loaded, ids, n_remove, fo, cure_ids=cure_ids, log_file=str(log_path), progress=opts.progress,
                 checkpoints=opts.healing.checkpoints())
        seconds["foldgpt"] = time.perf_counter() - t
        cure_log = log_path.read_text(encoding="utf-8") if log_path.exists() else ""
    gate_log = "".join(
        json.dumps({"round": i + 1, **rec}) + "\n" for i, rnd in enumerate(r.gates.rounds) for rec in rnd["log"]
    )
    recipe = {
        "method": "foldgpt",
        "remove": n_remove,
        "sparsity": opts.selection.sparsity,
        "removed_layers": r.removed,
        "groups": r.groups,
        "share_init": fo.share_init,
        "gates": asdict(fo.gates),
        "cure": asdict(fo.cure) if fo.cure.steps > 0 else None,
        "calibration": asdict(opts.data),
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
        recipe_yaml=recipes.to_yaml(opts),
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
    files[recipes.RECIPE_FILE] = recipes.to_yaml(opts)
    out = save_shared_folder(loaded, out, card=card, extra_files=files, force=opts.output.force)
    seconds["save"] = time.perf_counter() - t
    return CompressResult(
        output=out, method="foldgpt", removed=r.removed, layer_map=list(r.kept), layers_before=n_layers,
        layers_after=len(r.kept), params_before=r.params_before, params_after=r.params_stored,
        bytes_on_disk=folder_bytes(out), seconds=seconds, scores=None,
        extra={"groups": r.groups, "gates": r.gates.gates, "params_after_removal": r.params_after_removal,
               "cure": record["cure"]},
    )

def export(opts: ExportOptions, loaded: LoadedModel | None = None) -> dict:
    """Write a standard model folder: shared tensors materialised (``--unfold``)."""
    from .models.saving import check_output_dir
    from .export.unfold import unfold

    if not opts.output.path:
        raise LayerfoldError("export needs an output folder (-o OUT)")
    if not opts.unfold:
        raise LayerfoldError("export knows one format so far: --unfold (a standard model folder)")
    check_output_dir(Path(opts.output.path), opts.output.force)
    loaded = loaded or _load(opts.model)
    stored = count_parameters(loaded.model)
    n = unfold(loaded)
    card = model_card(
        base_model=loaded.base_model, command=shlex.join(["layerfold", "export", loaded.source, "--unfold", "-o", opts.output.path]),
        recipe={"method": "unfold", "unshared_tensors": n}, layer_map=list(range(len(decoder_layers(loaded.model, loaded.arch)))),
        params_before=stored, params_after=count_parameters(loaded.model),
        layers_before=len(decoder_layers(loaded.model, loaded.arch)),
        summary=f"Unfolded: {n} shared weight tensors written out per layer, for tools that cannot express sharing.",
    )
    out = save_model_folder(loaded, Path(opts.output.path), card=card, force=opts.output.force)
    return {"output": out, "unshared_tensors": n, "params_stored_before": stored,
            "params_after": count_parameters(loaded.model), "bytes_on_disk": folder_bytes(out)}


def _version() -> str:
    from ._version import __version__

    return __version__


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

    opts.healing.validate()
    if opts.healing.data.source == CALIBRATION_TEXT:
        raise LayerfoldError("--heal-data calib (the calibration text) works only with `layerfold compress`")
    if not opts.healing.enabled:
        raise LayerfoldError("--heal-tokens must be positive for layerfold heal")
    if opts.no_teacher:
        opts.healing = replace_heal_losses_without_teacher(opts.healing)
    if opts.model.model is None:
        raise LayerfoldError("give the compressed model folder to heal")
    out = Path(opts.output.path or f"{Path(opts.model.model.rstrip('/')).name}-healed")
    check_output_dir(out, opts.output.force, protect=Path(opts.model.model) if Path(opts.model.model).is_dir() else None)
    locate_model(opts.model.model)  # a student path that is not a model fails now, not after the teacher's work
    seconds: dict[str, float] = {}
    teacher = ids = prepared = None
    if opts.healing.needs_teacher:
        # the teacher first: its outputs are cached on disk, and then it leaves memory before
        # the student arrives, so the two never need room together (big models, device maps)
        t = time.perf_counter()
        teacher = _load(replace(opts.model, model=opts.teacher))  # the student's loading options
        seconds["load teacher"] = time.perf_counter() - t
        t = time.perf_counter()
        ids = healing_data(opts.healing, teacher)
        prepared = prepare_teacher(opts.healing, teacher, ids)
        seconds["teacher outputs"] = time.perf_counter() - t
    t = time.perf_counter()
    student = _load(opts.model)
    seconds["load"] = time.perf_counter() - t
    if teacher is not None and teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise LayerfoldError("the teacher and the student use different tokenizers")
    teacher_base = teacher.base_model if teacher is not None else None
    if opts.healing.teacher_cache:
        teacher = None
        _free_memory()
    previous = {}
    if student.local_dir is not None and (student.local_dir / "layerfold.json").is_file():
        previous = json.loads((student.local_dir / "layerfold.json").read_text())
    t = time.perf_counter()
    result = heal(student, teacher, opts.healing, ids=ids, prepared_teacher=prepared)
    seconds["heal"] = time.perf_counter() - t
    summary = result.summary()
    n_layers = len(decoder_layers(student.model, student.arch))
    layer_map = previous.get("layer_map") or list(range(n_layers))
    params = count_parameters(student.model)
    recipe = dict(previous.get("recipe") or {"method": "healed"})
    recipe["heal"] = opts.healing.recipe()
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
    out = save_model_folder(student, out, card=card, force=opts.output.force,
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
    return replace(h, ce=h.ce or 1.0, kl=0.0, mse=0.0)


def evaluate_model(opts: EvaluateOptions):
    """``layerfold eval``: the model's result, and its reference's (evaluated the same way, or
    read from its JSON result) when one is given: (reference or None, result)."""
    import os

    from .eval import EvalResult, evaluate

    if opts.batch_size < 1:
        raise LayerfoldError(f"--batch-size must be at least 1 (got {opts.batch_size})")
    kw = dict(tasks=list(opts.tasks), ppl=list(opts.ppl), limit=opts.limit, batch_size=opts.batch_size,
              data_dir=opts.data_dir, ppl_window=opts.ppl_window, ppl_stride=opts.ppl_stride,
              ppl_limit=opts.ppl_limit, speed=opts.speed, progress=opts.progress)
    reference = None
    if opts.reference:
        if opts.reference.endswith(".json") and os.path.isfile(opts.reference):
            reference = EvalResult.load(opts.reference)
        else:
            source = None if opts.reference == "embedded" else opts.reference
            reference = evaluate(_load(replace(opts.model, model=source)), **kw)
            if opts.reference_json:
                reference.save(opts.reference_json)
    loaded = _load(opts.model)
    result = evaluate(loaded, reference=reference, **kw)
    if opts.lm_eval:
        from .eval.lm_eval_bridge import run_lm_eval

        result.settings["lm_eval"] = run_lm_eval(loaded, list(opts.lm_eval), limit=opts.limit,
                                                 batch_size=opts.batch_size, data_dir=opts.data_dir)
    return reference, result

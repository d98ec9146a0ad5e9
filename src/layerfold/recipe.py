"""The recipe: every command's options, declared once, grouped as the pipeline runs.

A compression recipe (``layerfold compress``, ``layerfold run``) is one :class:`CompressOptions`:

    model       which model and how to load it
    data        the calibration text (scores, training pairs, by default the healing text)
    layer_pass  how the layer-by-layer calibration pass runs
    selection   which layers go (``--method``) and how many
    repair      what stands in for them (LLM-Streamline's trained replacement)
    auto        the plan search of --method auto
    search      selections that search with forward passes (sleb, iterative-bi, laco)
    linear      ReplaceMe's linear repair (--repair linear)
    foldgpt     FoldGPT's gates, sharing and cure
    healing     recovery training with the original as teacher
    evaluation  what is measured before and after
    memory      the memory plan's budget (``memory_plan.py``)
    output      where the model goes

Each group is the options dataclass of the code that uses it (``HealOptions`` in
``healing.py``, ``StreamlineOptions`` in ``methods/streamline.py``, ...); every field carries
its help text. ``schema`` turns the tree into the command line (``layerfold compress --help``
shows one section per group), into the YAML recipe every output folder holds (``recipe.yaml``),
and into the command line recorded in the model card. ``layerfold run recipe.yaml --set
healing.tokens=65536`` reads a recipe back; unknown keys and bad values are one-line errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import schema
from ._version import __version__
from .data.calibration import CalibrationSpec
from .errors import LayerfoldError
from .eval.evaluate import DEFAULT_PPL_WINDOW, EvalOptions
from .export.gguf import GGUFOptions
from .healing import HealOptions, compress_defaults, heal_command_defaults
from .importance.gates import GateOptions
from .importance.layer_pass import LayerPassOptions
from .methods.foldgpt import GATES_METADATA, FoldGPTOptions
from .methods.registry import SelectionOptions
from .methods.auto import AutoOptions
from .methods.replaceme import LinearRepairOptions
from .methods.search import SearchOptions
from .methods.streamline import StreamlineOptions
from .memory_plan import MemoryOptions
from .models.loading import ModelOptions
from .models.saving import OutputOptions

RECIPE_FILE = "recipe.yaml"
GGUF_HELP = ("also write the model as one GGUF file for llama.cpp / Ollama (shared weights written out per layer), "
             "read back and checked")
_CALIBRATION_FLAGS = {"source": "--calib", "seq_len": "--seq-len", "text_field": "--text-field", "split": "--split",
                      "seed": "--seed"}


@dataclass
class CompressOptions:
    """``layerfold compress``: the whole recipe of one compression."""

    model: ModelOptions = field(default_factory=ModelOptions, metadata={
        "help": "the model to compress; it is only ever read", "exclude": ("placement",)})
    data: CalibrationSpec = field(default_factory=CalibrationSpec, metadata={
        "help": "calibration text: importance scores, training pairs and (by default) the healing text",
        "prefix": "calib-", "flags": _CALIBRATION_FLAGS})
    layer_pass: LayerPassOptions = field(default_factory=LayerPassOptions, metadata={
        "help": "the calibration pass runs the model one decoder layer at a time"})
    selection: SelectionOptions = field(default_factory=SelectionOptions, metadata={
        "help": "which layers go: --remove N layers, or --sparsity F of the decoder's parameters"})
    repair: StreamlineOptions = field(default_factory=StreamlineOptions, metadata={
        "help": "LLM-Streamline (--method streamline): --remove N replaces N+1 consecutive layers by one trained "
                "replacement; --sparsity counts the replacement's own parameters", "prefix": "train-"})
    auto: AutoOptions = field(default_factory=AutoOptions, metadata={
        "help": "--method auto: candidate plans scored by held-out KL to the original; the best is built and healed"})
    search: SearchOptions = field(default_factory=SearchOptions, metadata={
        "help": "selections that search with forward passes of candidate models (--select sleb, iterative-bi, laco)"})
    linear: LinearRepairOptions = field(default_factory=LinearRepairOptions, metadata={
        "help": "ReplaceMe (--repair linear): each run of removed layers becomes a linear map folded into the kept "
                "layer before it", "prefix": "linear-"})
    foldgpt: FoldGPTOptions = field(default_factory=FoldGPTOptions, metadata={
        "help": "FoldGPT (--method foldgpt): learned gates choose the layers, adjacent retained layers share "
                "their linear weights, then a cure"})
    healing: HealOptions = field(default_factory=compress_defaults, metadata={
        "help": "a short recovery training with the original model as teacher (see `layerfold heal --help`)",
        "prefix": "heal-"})
    evaluation: EvalOptions = field(default_factory=EvalOptions, metadata={
        "help": "before and after, written into the output folder with report.html", "prefix": "eval-",
        "flags": {"tasks": "--eval-tasks", "ppl": "--eval-ppl", "limit": "--eval-limit"}})
    memory: MemoryOptions = field(default_factory=MemoryOptions, metadata={
        "help": "the memory plan: before any work, what each stage needs against the memory there is; stages "
                "that do not fit are streamed, replaced or skipped (printed, and recorded in layerfold.json)",
        "prefix": "memory-"})
    output: OutputOptions = field(default_factory=OutputOptions, metadata={"help": "where the model goes"})
    gguf: GGUFOptions = field(default_factory=GGUFOptions, metadata={"help": GGUF_HELP, "prefix": "gguf-"})
    progress: bool = field(default=True, metadata={"schema": False})

    def command(self) -> str:
        """The shortest equivalent command line (the model card shows it)."""
        return schema.command_line(self, CompressOptions(), ["layerfold", "compress"])


@dataclass
class HealModelOptions:
    """``layerfold heal``: heal an already compressed model folder against its original."""

    model: ModelOptions = field(default_factory=ModelOptions, metadata={
        "help": "the compressed model to heal; it is only ever read"})
    teacher: str | None = field(default=None, metadata={
        "help": "the original model (folder, hub id or .gguf; default: the embedded SmolLM2-135M-Instruct)",
        "flag": "--teacher", "path": True})
    no_teacher: bool = field(default=False, metadata={
        "help": "no teacher: next-token loss on the healing text only", "flag": "--no-teacher", "sets": True})
    healing: HealOptions = field(default_factory=heal_command_defaults, metadata={
        "help": "what trains, on what, for how long (the original model is the teacher)", "prefix": "heal-"})
    output: OutputOptions = field(default_factory=OutputOptions, metadata={
        "help": "where the healed model goes", "helps": {"path": "output folder (default: ./<model>-healed)"}})
    progress: bool = field(default=True, metadata={"schema": False})

    def command(self) -> str:
        return schema.command_line(self, HealModelOptions(), ["layerfold", "heal"])


@dataclass
class AnalyzeOptions:
    """``layerfold analyze``: every criterion's scores, from one calibration pass."""

    model: ModelOptions = field(default_factory=ModelOptions, metadata={
        "help": "the model to score", "exclude": ("placement",)})
    data: CalibrationSpec = field(default_factory=CalibrationSpec, metadata={
        "help": "calibration text", "prefix": "calib-", "flags": _CALIBRATION_FLAGS})
    layer_pass: LayerPassOptions = field(default_factory=LayerPassOptions, metadata={
        "help": "the calibration pass runs the model one decoder layer at a time"})
    gates: GateOptions | None = field(default=None, metadata={
        **GATES_METADATA, "switch": "--gates",
        "help": "also train FoldGPT's learnable layer gates (weights frozen) and show them beside BI and cosine"})
    gate_remove: int | None = field(default=None, metadata={
        "help": "with --gates: the gates' budget, layers to remove (default: 25% of them)", "flag": "--remove"})
    block_sizes: list[str] = field(default_factory=lambda: ["1", "2", "4", "8"], metadata={
        "help": "window sizes for the block table", "flag": "--block-sizes"})
    json: str | None = field(default=None, metadata={
        "help": "also write all scores to this JSON file (compress --scores plans from it)", "flag": "--json",
        "path": True})
    progress: bool = field(default=True, metadata={"schema": False})

    def block_size_list(self) -> list[int]:
        try:
            return [int(x) for x in self.block_sizes]
        except ValueError:
            raise LayerfoldError(f"--block-sizes must be comma-separated integers (got {','.join(self.block_sizes)!r})") from None


@dataclass
class EvaluateOptions:
    """``layerfold eval``: accuracy, perplexity, stability and cost of one model."""

    model: ModelOptions = field(default_factory=ModelOptions, metadata={
        "help": "the model to evaluate", "exclude": ("placement",)})
    tasks: list[str] = field(default_factory=list, metadata={
        "help": "comma-separated task names (piqa -> DATA/tasks/piqa.jsonl) or .jsonl paths", "flag": "--tasks"})
    ppl: list[str] = field(default_factory=list, metadata={
        "help": "comma-separated .txt/.jsonl files or task names for perplexity", "flag": "--ppl"})
    limit: int | None = field(default=None, metadata={
        "help": "first N examples of each task (default: all)", "flag": "--limit"})
    ppl_limit: int | None = field(default=None, metadata={
        "help": "first N documents of each perplexity text (default: --limit)", "flag": "--ppl-limit"})
    ppl_window: int | None = field(default=None, metadata={
        "help": f"perplexity window in tokens (default: {DEFAULT_PPL_WINDOW}, or the model's positions if it has fewer)",
        "flag": "--ppl-window"})
    ppl_stride: int | None = field(default=None, metadata={"help": "perplexity stride (default: the window)",
                                                            "flag": "--ppl-stride"})
    data_dir: str | None = field(default=None, metadata={
        "help": "folder holding tasks/*.jsonl (default: $LAYERFOLD_DATA, else ../shared/data if present)",
        "flag": "--data-dir", "path": True})
    batch_size: int = field(default=8, metadata={
        "help": "examples per forward pass (results do not depend on it)", "flag": "--batch-size"})
    speed: bool = field(default=True, metadata={"help": "skip the prefill/decode speed measurement",
                                                "flag": "--no-speed"})
    lm_eval: list[str] | None = field(default=None, metadata={
        "help": "also run lm-evaluation-harness on these comma-separated local tasks (needs the lm-eval extra)",
        "flag": "--lm-eval"})
    reference: str | None = field(default=None, metadata={
        "help": "the original model (folder, hub id, .gguf, 'embedded') or a JSON result of it",
        "flag": "--reference", "path": True})
    json: str | None = field(default=None, metadata={
        "help": "write the full result (per-example scores included) here", "flag": "--json", "path": True})
    reference_json: str | None = field(default=None, metadata={
        "help": "also write the reference's result here", "flag": "--reference-json", "path": True})
    progress: bool = field(default=True, metadata={"schema": False})


@dataclass
class ExportOptions:
    """``layerfold export``: a finished model written in another form."""

    model: ModelOptions = field(default_factory=ModelOptions, metadata={
        "help": "the model to export", "exclude": ("placement",)})
    unfold: bool = field(default=True, metadata={
        "help": "materialise shared tensors (always done: neither a standard folder nor GGUF can share them)",
        "flag": "--unfold"})
    output: OutputOptions = field(default_factory=OutputOptions, metadata={
        "help": "a standard model folder (-o), and/or a GGUF file (--gguf)", "helps": {"path": "output folder"}})
    gguf: GGUFOptions = field(default_factory=GGUFOptions, metadata={"help": GGUF_HELP, "prefix": "gguf-"})
    progress: bool = field(default=True, metadata={"schema": False})


@dataclass
class CompareOptions:
    """``layerfold compare``: saved evaluation results side by side."""

    results: list[str] = field(default_factory=list, metadata={
        "help": "JSON files written by `layerfold eval --json`", "positional": True})


@dataclass
class RunOptions:
    """``layerfold run``: build the model a recipe describes."""

    recipe: str | None = field(default=None, metadata={
        "help": "a recipe YAML file (every output folder holds the one that made it: recipe.yaml)",
        "positional": True, "path": True})
    set: list[str] = field(default_factory=list, metadata={
        "help": "override one option of the recipe, e.g. --set healing.tokens=65536 (repeatable)", "flag": "--set",
        "repeat": True, "metavar": "GROUP.KEY=VALUE"})
    output: str | None = field(default=None, metadata={
        "help": "output folder instead of the recipe's", "flag": "--output", "aliases": ("-o",), "path": True})
    force: bool = field(default=False, metadata={"help": "replace an existing non-empty output folder",
                                                 "flag": "--force"})
    dry_run: bool = field(default=False, metadata={"help": "print the plan of a compression recipe and stop",
                                                   "flag": "--dry-run"})


@dataclass
class GlobalOptions:
    """Options of the ``layerfold`` command itself, before the subcommand."""

    debug: bool = field(default=False, metadata={"help": "show tracebacks instead of one-line errors",
                                                 "flag": "--debug"})
    quiet: bool = field(default=False, metadata={"help": "no progress bars", "flag": "--quiet", "aliases": ("-q",)})


# -- the recorded recipe -----------------------------------------------------------------


def absolute_paths(opts):
    """The options with every existing local file or folder they name made absolute, so that a
    recorded recipe works from any folder."""
    values = {}
    for o in schema.options(type(opts)):
        value = schema.get(opts, o.path)
        if o.is_path and isinstance(value, str) and value and Path(value).expanduser().exists():
            values[o.path] = str(Path(value).expanduser().resolve())
    return schema.with_values(opts, values)


def versions() -> dict[str, str]:
    """The versions a bitwise rebuild needs to match (a package not installed: "none")."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = {"layerfold": __version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "safetensors", "tokenizers", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "none"
    return found


def seeds(opts) -> dict[str, int]:
    """Every seed among the options, by its recipe path (``data.seed``, ``healing.seed``, ...)."""
    return {".".join(o.path): schema.get(opts, o.path) for o in schema.options(type(opts)) if o.path[-1] == "seed"}


RECIPES = {"compress": CompressOptions, "heal": HealModelOptions, "export": ExportOptions}


def to_yaml(opts) -> str:
    """``recipe.yaml``: every option of the run, commented with its help text."""
    command = next(name for name, root in RECIPES.items() if isinstance(opts, root))
    header = (f"layerfold recipe: `layerfold run recipe.yaml -o OUT` runs `layerfold {command}` with these options\n"
              "again and builds the same model (bitwise, with the same library versions: "
              + ", ".join(f"{k} {v}" for k, v in versions().items()) + ").\n"
              f"Override an option with --set GROUP.KEY=VALUE; `layerfold {command} --help` explains each.")
    body = schema.to_yaml(absolute_paths(opts), header=header)
    head, _, rest = body.partition("\n\n")
    return f"{head}\n\ncommand: {command}  # the layerfold command these options are for\n\n{rest}"


def read_recipe(path: str | Path, overrides: list[str] = ()):
    """The options in a recipe file, with ``--set KEY=VALUE`` overrides; every key and value
    checked against the schema of its command (``command:``, compress when absent)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise LayerfoldError(f"{path}: no such recipe file")
    return from_text(p.read_text(encoding="utf-8"), overrides, where=str(path))


def run_recipe(opts: RunOptions):
    """The options ``layerfold run`` runs: the recipe's, with ``--set``, ``-o``, ``--force``
    and ``--dry-run`` applied."""
    import dataclasses

    if not opts.recipe:
        raise LayerfoldError("give the recipe file to run (e.g. layerfold run OUT/recipe.yaml)")
    recipe = read_recipe(opts.recipe, opts.set)
    output = {"path": opts.output} if opts.output is not None else {}
    output.update({"force": True} if opts.force else {})
    if opts.dry_run:
        if not isinstance(recipe, CompressOptions):
            raise LayerfoldError("--dry-run plans compressions; this recipe is not one")
        output["dry_run"] = True
    return dataclasses.replace(recipe, output=dataclasses.replace(recipe.output, **output))


def from_text(text: str, overrides: list[str] = (), where: str = "the recipe"):
    """:func:`read_recipe` for the text of a recipe."""
    import yaml

    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0]
        raise LayerfoldError(f"{where}: not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise LayerfoldError(f"{where}: a recipe is a mapping of groups to options")
    command = data.pop("command", "compress")
    if command not in RECIPES:
        raise LayerfoldError(f"{where}: command {command!r} has no recipes; use one of {', '.join(RECIPES)}")
    root = RECIPES[command]
    opts = schema.from_dict(root(), data)
    values = dict(schema.parse_assignment(root, text) for text in overrides)
    return schema.with_values(opts, values)

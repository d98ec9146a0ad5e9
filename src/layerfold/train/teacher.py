"""The teacher's side of distillation: computed on the fly, or read from a disk cache.

A full logit cache for SmolLM2's 49,152-token vocabulary would take 96 KiB per token in
fp16 (9.4 GiB for 100k tokens). The cache keeps, per token, the teacher's K largest logits
and their token ids plus the logsumexp over the whole vocabulary at the distillation
temperature, which is all :class:`~layerfold.train.losses.LogitKL` needs for an exact KL
over K+1 outcomes: with K=64 that is 386 bytes per token (37 MiB for 100k tokens). Hidden
states of chosen teacher layers are cached in fp16 (2 bytes x hidden size per layer and
token). Files are numpy memory maps, so a cache larger than RAM still works.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.calibration import _model_fingerprint, cache_dir, cache_lock
from ..models.loading import input_device
from .capture import layer_outputs, model_layers
from .head import OutputHead, run_for_hidden
from .losses import TeacherOutputs


class OnTheFlyTeacher:
    """Runs the teacher model on each batch (exact logits; costs one forward per batch)."""

    def __init__(self, model: nn.Module, arch=None):
        self.model = model.eval()
        self.layers = model_layers(model, arch)
        self.num_layers = len(self.layers)
        self.head = OutputHead(model, arch)

    def describe(self) -> dict:
        return {"kind": "on-the-fly", "num_layers": self.num_layers}

    @torch.no_grad()
    def outputs(self, input_ids: torch.Tensor, rows: list[int], layers: set[int], need_logits: bool,
                temperature: float = 1.0, chunked: bool = False) -> TeacherOutputs:
        """With ``chunked`` (or no logits needed) the teacher's head computes nothing here: its
        final hidden states and head go to the losses, which take logits chunk by chunk."""
        with layer_outputs(self.layers, layers, detach=True) as hidden:
            if chunked or not need_logits:
                final = run_for_hidden(self.model, self.head, input_ids)
                out = TeacherOutputs(final_hidden=final if need_logits else None, head=self.head)
            else:
                out = TeacherOutputs(logits=self.model(input_ids=input_ids).logits)
        out.hidden, out.num_layers = dict(hidden), self.num_layers
        return out


class TeacherCache:
    """Top-k logits (+ logsumexp) and chosen layer outputs of a teacher, for every row of a
    fixed token tensor, stored on disk. Build with :func:`build_teacher_cache`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.num_layers = self.meta["num_layers"]
        self.temperature = self.meta["temperature"]
        self.values = np.load(self.folder / "values.npy", mmap_mode="r")
        self.indices = np.load(self.folder / "indices.npy", mmap_mode="r")
        self.lse = np.load(self.folder / "lse.npy", mmap_mode="r")
        self.hidden = {int(l): np.load(self.folder / f"hidden_{l}.npy", mmap_mode="r")
                       for l in self.meta["layers"]}

    def describe(self) -> dict:
        return {"kind": "cache", "folder": str(self.folder), **{k: self.meta[k] for k in ("topk", "temperature", "layers")}}

    def outputs(self, input_ids: torch.Tensor, rows: list[int], layers: set[int], need_logits: bool,
                temperature: float = 1.0) -> TeacherOutputs:
        missing = {l % self.num_layers for l in layers} - set(self.hidden)
        if missing:
            raise ValueError(f"the teacher cache has no outputs of layers {sorted(missing)}")
        dev = input_ids.device

        def take(a):
            return torch.from_numpy(np.ascontiguousarray(a[rows])).to(dev)

        out = TeacherOutputs(num_layers=self.num_layers, temperature=self.temperature)
        if need_logits:
            out.topk_values, out.topk_indices, out.logsumexp = take(self.values), take(self.indices), take(self.lse)
        out.hidden = {l: take(self.hidden[l]).float() for l in {l % self.num_layers for l in layers}}
        return out


def teacher_cache_key(teacher, data: torch.Tensor, topk: int, temperature: float, layers) -> str:
    blob = json.dumps(
        [_model_fingerprint(teacher), list(data.shape), hashlib.sha256(data.numpy().tobytes()).hexdigest(),
         topk, temperature, sorted(layers)], default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@torch.no_grad()
def build_teacher_cache(
    teacher, data: torch.Tensor, *, topk: int = 64, temperature: float = 1.0, layers=(),
    batch_size: int = 8, folder: Path | None = None, progress: bool = True,
) -> TeacherCache:
    """Run ``teacher`` (a LoadedModel) once over ``data`` and keep what distillation needs.

    The cache is keyed by the teacher's weights, the data and the settings, and reused when
    it exists (the same teacher and healing text serve every pruned model of a benchmark).
    """
    from tqdm.auto import tqdm

    data = data.cpu().long()
    model = teacher.model.eval()
    layer_list = model_layers(model, teacher.arch)
    n_layers = len(layer_list)
    layers = sorted({l % n_layers for l in layers})
    key = teacher_cache_key(teacher, data, topk, temperature, layers)
    folder = Path(folder) if folder else cache_dir() / "teacher" / key
    if (folder / "meta.json").is_file():
        return TeacherCache(folder)

    # two runs on one fresh cache (two benchmarks, or processes not launched together) write it once
    with cache_lock(folder):
        if (folder / "meta.json").is_file():
            return TeacherCache(folder)
        tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            n, t = data.shape
            hidden_size = model.config.hidden_size
            mm = np.lib.format.open_memmap
            values = mm(tmp / "values.npy", "w+", np.float16, (n, t, topk))
            indices = mm(tmp / "indices.npy", "w+", np.int32, (n, t, topk))
            lse = mm(tmp / "lse.npy", "w+", np.float32, (n, t))
            hidden = {l: mm(tmp / f"hidden_{l}.npy", "w+", np.float16, (n, t, hidden_size)) for l in layers}
            dev = input_device(model)
            head = OutputHead(model, teacher.arch)
            step = head.chunk_tokens(0)
            for start in tqdm(range(0, n, batch_size), desc="teacher cache", unit="batch", disable=not progress):
                ids = data[start : start + batch_size].to(dev)
                with layer_outputs(layer_list, layers, detach=True) as hs:
                    final = run_for_hidden(model, head, ids)
                end = start + ids.shape[0]
                # the logits of a chunk of positions at a time (the batch's would be [b, t, vocab])
                flat = final.reshape(-1, final.shape[-1])
                top_v, top_i, sums = [], [], []
                for s in range(0, flat.shape[0], step):
                    logits = head(flat[s : s + step]).float()
                    top = logits.topk(topk, dim=-1)
                    top_v.append(top.values.cpu())
                    top_i.append(top.indices.cpu())
                    sums.append(torch.logsumexp(logits / temperature, dim=-1).cpu())
                    del logits, top
                shape = (ids.shape[0], ids.shape[1])
                values[start:end] = torch.cat(top_v).reshape(*shape, topk).half().numpy()
                indices[start:end] = torch.cat(top_i).reshape(*shape, topk).int().numpy()
                lse[start:end] = torch.cat(sums).reshape(shape).numpy()
                for l in layers:
                    hidden[l][start:end] = hs[l].float().cpu().half().numpy()
            for a in [values, indices, lse, *hidden.values()]:
                a.flush()
            del values, indices, lse, hidden
            meta = {"topk": topk, "temperature": temperature, "layers": layers, "num_layers": n_layers,
                    "rows": n, "seq_len": t, "teacher": teacher.source}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            if folder.exists():
                shutil.rmtree(folder)
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return TeacherCache(folder)


def cache_bytes(cache: TeacherCache) -> int:
    return sum(p.stat().st_size for p in cache.folder.glob("*.npy"))

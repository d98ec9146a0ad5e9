"""What a model costs to keep and to run: parameters, bytes, memory, prefill and decode speed.

Speed is measured on batch 1: prefill is one forward over ``prefill_tokens`` tokens (the
median of ``repeats`` runs after a warm-up); decode generates ``decode_tokens`` tokens one at
a time with the KV cache after a short prompt. Peak memory is what running the model needs:
on CUDA the allocator's peak during those runs; on CPU the model's weight bytes plus the
largest growth of the process's resident set over its level before the runs, sampled every
few milliseconds. (The process's whole resident set would also count whatever else it holds:
after healing in the same process, an allocator keeps gigabytes it no longer uses.)
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.compat import cache_kwargs, returned_cache
from ..models.surgery import count_parameters


@dataclass
class Cost:
    parameters: int
    weight_bytes: int  # parameters and buffers in memory, in their dtype (shared tensors once)
    bytes_on_disk: int | None  # weight files of the model folder (or the .gguf file)
    peak_memory_bytes: int | None
    prefill_tokens_per_s: float | None
    decode_tokens_per_s: float | None
    prefill_tokens: int = 0
    decode_tokens: int = 0
    device: str = "cpu"
    threads: int = 0
    speed_runs: dict | None = None  # every timed run ({"prefill": [...], "decode": [...]}) when alternated
    speed_vs_reference: dict | None = None  # per-round ratios to the reference (eval.before_after)


def weight_bytes(model) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def disk_bytes(path: str | os.PathLike | None) -> int | None:
    """Bytes of weight files: a .gguf file, or a folder's *.safetensors (else *.bin, *.gguf)."""
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        for pattern in ("*.safetensors", "*.bin", "*.gguf"):
            files = list(p.glob(pattern))
            if files:
                return sum(f.stat().st_size for f in files)
    return None


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _PeakMemory:
    """Allocator peak (CUDA), or growth of the resident set (CPU, sampled), over a with-block."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = self.start = 0
        self._stop = threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import gc

            from ..models.lazy import return_freed_memory

            gc.collect()
            return_freed_memory()  # a clean start: growth from here is what the runs need
            self.start = self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())

    def model_peak(self, weight_bytes: int) -> int:
        """Peak memory of running the model: its weights and what the runs added."""
        if self.device.type == "cuda":
            return self.peak
        return weight_bytes + max(0, self.peak - self.start)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill_seconds(model, prompt: torch.Tensor) -> float:
    """Seconds of one uncached forward over ``prompt`` (only the last position's logits)."""
    _sync(prompt.device)
    t = time.perf_counter()
    model(input_ids=prompt, use_cache=False, logits_to_keep=1)
    _sync(prompt.device)
    return time.perf_counter() - t


@torch.no_grad()
def decode_tokens_per_s(model, prompt: torch.Tensor, decode_tokens: int) -> float:
    """Tokens per second of ``decode_tokens`` greedy cached steps after a 16-token prefix of ``prompt``."""
    out = model(input_ids=prompt[:, :16], use_cache=True, logits_to_keep=1)
    cache, nxt = returned_cache(out), out.logits[:, -1:].argmax(-1)
    _sync(prompt.device)
    t = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(input_ids=nxt, use_cache=True, **cache_kwargs(model, cache))
        cache, nxt = returned_cache(out), out.logits[:, -1:].argmax(-1)
    _sync(prompt.device)
    return decode_tokens / (time.perf_counter() - t)


@torch.no_grad()
def measure_cost(model, *, path=None, prefill_tokens: int = 256, decode_tokens: int = 32,
                 repeats: int = 3, speed: bool = True) -> Cost:
    device = next(model.parameters()).device
    cost = Cost(count_parameters(model), weight_bytes(model), disk_bytes(path), None, None, None,
                device=str(device), threads=torch.get_num_threads())
    if not speed:
        return cost
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    # random token ids: speed does not depend on which tokens run
    prompt = torch.randint(3, vocab, (1, prefill_tokens), generator=g).to(device)
    with _PeakMemory(device) as mem:
        times = [prefill_seconds(model, prompt) for _ in range(repeats + 1)]
        cost.prefill_tokens_per_s = prefill_tokens / statistics.median(times[1:])
        cost.decode_tokens_per_s = decode_tokens_per_s(model, prompt, decode_tokens)
    cost.peak_memory_bytes = mem.model_peak(cost.weight_bytes)
    cost.prefill_tokens, cost.decode_tokens = prefill_tokens, decode_tokens
    return cost

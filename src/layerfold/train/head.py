"""Logit losses without the batch's full-vocabulary logits.

A causal LM's output head turns every position's final hidden state (``H`` floats) into
``V`` logits. For a batch of 8 x 256 tokens and SmolLM2's 49,152-token vocabulary that is
400 MB of fp32 logits, and the KL and its gradient hold several such copies at once; with a
128k vocabulary and 2,048-token rows it is gigabytes per copy. The losses only need the
logits of a few positions at a time, so here:

1. the model runs with ``logits_to_keep`` = no position (its own forward, the head computes
   nothing) and a hook on the final norm keeps the final hidden states ``[B, T, H]``;
2. positions are taken in chunks of ``chunk`` tokens: the head gives the chunk's logits, every
   logit loss adds its sum over the chunk, and the logits are dropped;
3. each chunk runs under activation checkpointing, so backward recomputes the chunk's
   logits instead of keeping them: at any moment one chunk's logits (and their gradient)
   exist, not the batch's.

The loss is the same sum, only grouped by chunk; its value and gradients equal the
full-logit path's up to float rounding (tests/test_lean_losses.py checks 1e-6).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..models.architectures import Architecture, architecture_for, get_path
from .capture import unwrap

#: fp32 logits per chunk with ``chunk=0`` (auto): a chunk's logits, their log-softmax and
#: gradient are a few times this
AUTO_CHUNK_BYTES = 16 * 2**20


class OutputHead:
    """The model's last step from final hidden states to logits: its output head, then the
    architecture's logit cap, if any (``Architecture.logit_softcap``)."""

    def __init__(self, model: nn.Module, arch: Architecture | None = None):
        base = unwrap(model)
        self.arch = arch or architecture_for(base.config)
        self.head = base.get_output_embeddings()
        self.norm = get_path(base, self.arch.final_norm)
        self.vocab = self.head.weight.shape[0]
        cap = getattr(base.config, self.arch.logit_softcap, None) if self.arch.logit_softcap else None
        self.cap = float(cap) if cap else None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        if self.cap is not None:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits

    def chunk_tokens(self, chunk: int) -> int:
        """Positions per chunk: ``chunk``, or (0) as many as fill ``AUTO_CHUNK_BYTES`` with fp32 logits."""
        return chunk if chunk > 0 else max(1, AUTO_CHUNK_BYTES // (4 * self.vocab))


NO_POSITION = torch.zeros(0, dtype=torch.long)


@contextmanager
def final_hidden(head: OutputHead):
    """Within the block, a forward of the model with ``logits_to_keep=NO_POSITION`` leaves the
    final hidden states (the final norm's output, the head's input) in ``store["hidden"]``."""
    store: dict[str, torch.Tensor] = {}

    def hook(module, args, out):
        store["hidden"] = out[0] if isinstance(out, (tuple, list)) else out

    handle = head.norm.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def run_for_hidden(model: nn.Module, head: OutputHead, input_ids: torch.Tensor) -> torch.Tensor:
    """The final hidden states ``[B, T, H]`` of ``model`` on ``input_ids``, no logits computed."""
    with final_hidden(head) as store:
        model(input_ids=input_ids, logits_to_keep=NO_POSITION.to(input_ids.device), use_cache=False)
    return store["hidden"]


def chunked_sums(hidden: torch.Tensor, head: OutputHead, terms, chunk: int) -> torch.Tensor:
    """``sum over chunks of terms(logits_of_chunk, start, end)`` (a vector of per-loss sums) over
    the flattened positions of ``hidden`` [B, T, H], each chunk checkpointed (see the module
    docstring). ``terms(logits [n, V], start, end)`` returns a vector; positions are b * T + t."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    n = flat.shape[0]
    step = head.chunk_tokens(chunk)

    def one(h, start, end):
        return terms(head(h), start, end)

    total = None
    for start in range(0, n, step):
        end = min(n, start + step)
        part = (checkpoint(one, flat[start:end], start, end, use_reentrant=False)
                if torch.is_grad_enabled() and flat.requires_grad else one(flat[start:end], start, end))
        total = part if total is None else total + part
    return total


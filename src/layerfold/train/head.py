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

When every logit loss can give its gradient with respect to the logits directly
(``Loss.position_sum_and_grad``: cross-entropy and the KLs) and the head itself is not trained,
step 3 is replaced by taking each chunk's gradient in its forward pass: the head's logits, one
loss's gradient buffer, and that gradient taken back through the head to the chunk's hidden
states ([n, H], kept for backward). Backward then only scales the kept gradients; the chunk
is not recomputed (one pass through the head per chunk fewer, and two [n, V] buffers at the
peak instead of four or five).

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


class _ChunkWithGrad(torch.autograd.Function):
    """The per-loss sums of one chunk, their gradients with respect to the chunk's hidden states
    taken in forward (``grads``: one [n, H] per loss); backward combines them by the incoming
    weights of the sums."""

    @staticmethod
    def forward(ctx, h, values, grads):  # noqa: ARG004 - h only ties the output to the graph
        ctx.save_for_backward(grads)
        return values

    @staticmethod
    def backward(ctx, weights):
        (grads,) = ctx.saved_tensors
        return torch.einsum("l,lnh->nh", weights.to(grads.dtype), grads), None, None


def _with_grad(head: OutputHead, h: torch.Tensor, start: int, end: int, terms_and_grads):
    """One chunk by ``terms_and_grads`` (see :func:`chunked_sums`), or None if a loss has no
    direct gradient."""
    with torch.enable_grad():
        x = h.detach().requires_grad_()
        logits = head(x)
    with torch.no_grad():
        out = terms_and_grads(logits.detach(), start, end)
    if out is None:
        return None
    values, grads = [], []
    for i, (value, grad) in enumerate(out):
        out[i] = None  # one loss's [n, V] gradient alive at a time
        (g,) = torch.autograd.grad(logits, x, grad.to(logits.dtype), retain_graph=i + 1 < len(out))
        del grad
        values.append(value.float())
        grads.append(g)
    del logits, x
    return _ChunkWithGrad.apply(h, torch.stack(values), torch.stack(grads))


def _head_trains(head: OutputHead) -> bool:
    return any(p.requires_grad for p in head.head.parameters())


def chunked_sums(hidden: torch.Tensor, head: OutputHead, terms, chunk: int, terms_and_grads=None) -> torch.Tensor:
    """``sum over chunks of terms(logits_of_chunk, start, end)`` (a vector of per-loss sums) over
    the flattened positions of ``hidden`` [B, T, H], each chunk checkpointed (see the module
    docstring). ``terms(logits [n, V], start, end)`` returns a vector; positions are b * T + t.
    ``terms_and_grads(logits, start, end)``, if given, returns [(sum, d sum / d logits)] per
    loss, or None: then chunks take their gradients in forward instead of being recomputed
    (when the head is not trained)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    n = flat.shape[0]
    step = head.chunk_tokens(chunk)
    training = torch.is_grad_enabled() and flat.requires_grad
    direct = terms_and_grads is not None and training and not _head_trains(head)

    def one(h, start, end):
        return terms(head(h), start, end)

    total = None
    for start in range(0, n, step):
        end = min(n, start + step)
        part = _with_grad(head, flat[start:end], start, end, terms_and_grads) if direct else None
        if part is None:
            direct = False  # a loss without a direct gradient: every chunk by checkpointing
            part = (checkpoint(one, flat[start:end], start, end, use_reentrant=False)
                    if training else one(flat[start:end], start, end))
        total = part if total is None else total + part
    return total

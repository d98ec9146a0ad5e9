"""FSDP healing: the decoder layers sharded over the processes while they train, whole again after.

Under ``accelerate launch --use_fsdp`` (``ACCELERATE_USE_FSDP``, see :mod:`.parallel`) each
decoder layer is given to FSDP2's ``fully_shard`` for the training: every process keeps
1/N of each layer's weights (frozen ones and LoRA adapters alike), the layer gathers its
whole weights for its forward and again for its backward, and FSDP averages the gradients of
the sharded trainable tensors over the processes itself (a reduce-scatter per layer).

What stays whole in every process: the embeddings, the final norm and the output head. The
chunked logit losses (:mod:`.head`) call the head outside the model's forward, chunk by chunk,
where FSDP would not gather a sharded head; they are the small part of a 7B-70B model (Llama-3
8B: 1 of 8 billion parameters), and the trainable ones among them (the final norm, an untied
head) are averaged by the loop's one all-reduce as under data parallelism.

After the training the layers are gathered and FSDP is taken off them (:func:`unshard`): the
model is a plain transformers model again, so LoRA merging, saving and evaluation are the
same code as in one process. Checkpoints hold the gathered (full) tensors and optimizer state
(:func:`full_tensor`, :func:`full_optimizer_state`), the same file a one-process or
data-parallel run writes; resuming shards them again (:func:`load_sharded`).

With the same global batch the result equals one process's up to float rounding
(tests/test_parallel.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LayerfoldError

# the hook tables of nn.Module that fully_shard registers into; what it adds is removed again
_HOOK_TABLES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
                "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
                "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def is_sharded(t) -> bool:
    """Whether ``t`` is a DTensor (an FSDP-sharded parameter, its gradient or AdamW moment)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (a collective: every process calls it), or ``t``."""
    return t.full_tensor() if is_sharded(t) else t


@dataclass
class _Before:
    """A module as it was before ``fully_shard``: its class, hook ids and attribute names."""

    module: nn.Module
    cls: type
    hooks: dict[str, set]
    attrs: set[str]


@dataclass
class Sharded:
    """Layers sharded by :func:`shard`; :func:`unshard` makes them whole."""

    layers: list[nn.Module]
    before: list[_Before]


def _check_not_shared(layers: Sequence[nn.Module]) -> None:
    """FSDP shards each layer's tensors on their own: a tensor two layers share (a FoldGPT
    model) cannot be sharded."""
    owner: dict[int, int] = {}
    for i, layer in enumerate(layers):
        for _, p in layer.named_parameters(remove_duplicate=False):
            if owner.setdefault(id(p), i) != i:
                raise LayerfoldError("FSDP cannot shard decoder layers that share weights (a FoldGPT model): heal it "
                                     "data-parallel (accelerate launch --multi_gpu ...)")


def shard(layers: Sequence[nn.Module], reshard_after_forward: bool = True, model: nn.Module | None = None) -> Sharded:
    """Shard every decoder layer over the process group (FSDP2's ``fully_shard``, in place).
    The parameters become DTensors of the same names, ``requires_grad`` kept. ``model``: the
    model the layers belong to; its other (whole) tensors in CPU memory are copied out of the
    weight file's memory mapping, which then closes: otherwise the whole layers' file pages
    stay resident beside their shards (benchmarks/perf.md, FSDP)."""
    from torch.distributed.fsdp import fully_shard

    _check_not_shared(layers)
    before = []
    for layer in layers:
        for m in layer.modules():
            before.append(_Before(m, type(m), {t: set(getattr(m, t, {}).keys()) for t in _HOOK_TABLES},
                                  set(vars(m))))
    for layer in layers:
        # explicit True: a layer is its own FSDP root (nothing above it is sharded), and a root
        # would otherwise keep its whole weights from the forward to the backward
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    if model is not None:
        with torch.no_grad():
            for p in model.parameters():  # tied tensors once: the copy stays tied
                if not is_sharded(p) and p.device.type == "cpu":
                    p.data = p.data.clone()
    return Sharded(list(layers), before)


@torch.no_grad()
def unshard(sharded: Sharded, keep: bool = True) -> None:
    """Gather every sharded parameter (collective) and take FSDP off the layers: plain
    modules with whole plain parameters again. ``keep=False`` (the processes that neither
    merge nor save): the gathered tensors are dropped, the parameters left empty (meta)."""
    for layer in sharded.layers:
        for m in layer.modules():
            for name, p in list(m._parameters.items()):
                if p is None or not is_sharded(p):
                    continue
                whole = p.full_tensor()
                if not keep:
                    whole = torch.empty_like(whole, device="meta")
                # a plain attribute write: nn.Module.__setattr__ would go through FSDP's class
                m._parameters[name] = nn.Parameter(whole, requires_grad=p.requires_grad)
    # fully_shard's registry of the modules it manages: without this a second training of the
    # same layers (another stage, another call) would be refused as sharding them twice
    from torch.distributed._composable_state import _module_state_mapping

    for b in sharded.before:
        m = b.module
        for table, ids in b.hooks.items():
            hooks = getattr(m, table, None)
            if hooks is not None:
                for k in [k for k in hooks if k not in ids]:
                    del hooks[k]
        for attr in [a for a in vars(m) if a not in b.attrs and "fsdp" in a]:  # FSDP's markers
            delattr(m, attr)
        _module_state_mapping.pop(m, None)
        m.__class__ = b.cls


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor gathered (collective)."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: full_tensor(v) if torch.is_tensor(v) else v for k, v in s.items()}
                      for i, s in state["state"].items()}
    return state


@torch.no_grad()
def load_sharded(optimizer: torch.optim.Optimizer, params: Sequence[tuple[str, nn.Parameter]],
                 trainable: dict[str, torch.Tensor], optimizer_state: dict) -> None:
    """Resume from a checkpoint of whole tensors: each process takes its shards of the
    trainable tensors and of the optimizer state (every process read the same file, so no
    communication is needed)."""
    from torch.distributed.tensor import distribute_tensor

    def local(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if not is_sharded(like):
            return whole
        return distribute_tensor(whole.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)

    by_name = dict(params)
    for n, t in trainable.items():
        p = by_name[n]
        p.copy_(local(t.to(p.device), p))
    optimizer.load_state_dict(optimizer_state)
    # load_state_dict casts the moments to the parameter's device and dtype, but not its sharding
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not is_sharded(p):
                continue
            s = optimizer.state.get(p, {})
            for k, v in list(s.items()):
                if torch.is_tensor(v) and not is_sharded(v) and tuple(v.shape) == tuple(p.shape):
                    s[k] = local(v, p)


def grad_norm_and_clip(params: Sequence[nn.Parameter], max_norm: float) -> float:
    """``clip_grad_norm_`` over gradients some of which are sharded (DTensors) and some whole
    (the same in every process): the 2-norm of all of them, and every gradient scaled by
    ``min(1, max_norm / (norm + 1e-6))`` as torch's function does."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    whole = sum((g.detach().float().pow(2).sum() for g in grads if not is_sharded(g)), torch.zeros(()))
    parts = sum((g.to_local().detach().float().pow(2).sum() for g in grads if is_sharded(g)), torch.zeros(()))
    parts = parts.to(grads[0].to_local().device if is_sharded(grads[0]) else grads[0].device)
    torch.distributed.all_reduce(parts, op=torch.distributed.ReduceOp.SUM)  # each process has 1/N of them
    norm = float((whole.to(parts.device) + parts).sqrt())
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return norm

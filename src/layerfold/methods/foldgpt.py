"""FoldGPT (arXiv 2407.00928; METHODS.md section 3): gate, remove, share, cure.

1. Learnable gates rank the layers jointly (``importance.gates``).
2. The lowest-gated layers are removed (``models.surgery``).
3. The retained layers are grouped into runs of adjacent layers that share every linear
   weight; norms and biases stay per layer (``nn.shared``).
4. Cure: a short fine-tune of the shared weights and the per-layer parameters with the
   original model as teacher, on logit KL plus tail-layer distillation (MSE between the
   outputs of the student's last k layers and of the teacher layers they came from, the
   layer map ``kept``), through the project's one training loop
   (``layerfold.train``).

The paper publishes no hyperparameters and no code; every default below is ours and the
alternatives are measured in ``benchmarks/foldgpt.md``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch

from ..errors import LayerfoldError
from ..importance.gates import GateOptions, GateResult, gate_ranking
from ..models.surgery import count_parameters, decoder_layers, remove_layers
from ..nn.shared import SHARE_INITS, adjacent_groups, parse_groups, share_groups


@dataclass
class CureOptions:
    """The cure: which losses, how long. ``steps=0`` skips it."""

    steps: int = 40
    lr: float = 5e-5
    batch_size: int = 4
    grad_accum: int = 1
    samples: int = 64  # rows of cure text (the calibration source, same seq_len)
    kl_weight: float = 1.0
    temperature: float = 1.0
    tail_layers: int = 3  # k of tail-layer distillation; 0 turns it off
    tail_weight: float = 1.0
    warmup_steps: int = 4
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False

    def validate(self) -> None:
        if self.steps < 0:
            raise LayerfoldError(f"--cure-steps must be 0 or more (got {self.steps})")
        if self.tail_layers < 0:
            raise LayerfoldError(f"--tail-layers must be 0 or more (got {self.tail_layers})")
        if self.samples < 1 or self.batch_size < 1:
            raise LayerfoldError("--cure-samples and the cure batch size must be at least 1")
        if self.lr <= 0 or self.kl_weight < 0 or self.tail_weight < 0:
            raise LayerfoldError("cure learning rate must be positive and loss weights non-negative")


@dataclass
class FoldGPTOptions:
    gates: GateOptions = field(default_factory=GateOptions)
    group_size: int = 2  # 1: no sharing
    groups: str | None = None  # explicit grouping of the retained layers, e.g. "0-1,2-3"
    share_init: str = "important"
    delta_rank: int = field(default=0, metadata={
        "help": "give every member of a shared group its own rank-r delta on each shared matrix, initialised "
                "from the truncated SVD of its difference to the shared weight (0: none; Python API only "
                "until shared folders can store deltas)"})
    cure: CureOptions = field(default_factory=CureOptions)

    def validate(self) -> None:
        self.gates.validate()
        self.cure.validate()
        if self.group_size < 1:
            raise LayerfoldError(f"--group-size must be at least 1 (got {self.group_size})")
        if self.share_init not in SHARE_INITS:
            raise LayerfoldError(f"--share-init must be one of {', '.join(SHARE_INITS)}")
        if self.delta_rank < 0:
            raise LayerfoldError(f"the delta rank must be 0 or more (got {self.delta_rank})")


@dataclass
class FoldGPTResult:
    removed: list[int]  # original indices
    kept: list[int]  # original index of each new layer
    groups: list[list[int]]  # groups of new layer indices that share weights
    gates: GateResult
    params_before: int
    params_after_removal: int
    params_stored: int
    cure: dict | None = None  # training summary and history


def choose_groups(num_layers: int, opts: FoldGPTOptions) -> list[list[int]]:
    if opts.groups:
        return parse_groups(opts.groups, num_layers)
    return adjacent_groups(num_layers, opts.group_size)


def fold(
    loaded,
    calib_ids: torch.Tensor,
    n_remove: int,
    opts: FoldGPTOptions,
    *,
    cure_ids: torch.Tensor | None = None,
    log_file: str | None = None,
    progress: bool = True,
    gates: GateResult | None = None,
    heldout: torch.Tensor | None = None,
) -> FoldGPTResult:
    """Run FoldGPT on ``loaded.model`` in place; returns what was done.

    ``gates``: a ranking already trained on this model for ``n_remove`` (``analyze --gates``
    prints one); by default the gates are trained here, and ``heldout`` rows check their
    choice against Block Influence's (``GateResult.check``)."""
    opts.validate()
    model, arch = loaded.model, loaded.arch
    n = len(decoder_layers(model, arch))
    params_before = count_parameters(model)
    cure_on = opts.cure.steps > 0
    teacher = copy.deepcopy(model).eval() if cure_on else None

    # 1-2. gates, then removal of the lowest-gated layers
    if gates is None:
        gates = gate_ranking(model, arch, calib_ids, n_remove, opts.gates, heldout=heldout, progress=progress)
    elif len(gates.removed) != n_remove or len(gates.gates) != n:
        raise LayerfoldError(f"the given gates remove {len(gates.removed)} of {len(gates.gates)} layers, "
                             f"not {n_remove} of {n}")
    kept = remove_layers(model, arch, sorted(gates.removed))
    params_after_removal = count_parameters(model)

    # 3. group parameter sharing of the retained layers
    groups = choose_groups(len(kept), opts)
    share_groups(model, arch, groups, init=opts.share_init, importance=[gates.importance()[l] for l in kept],
                 delta_rank=opts.delta_rank)

    # 4. cure
    cure = None
    if cure_on:
        if cure_ids is None:
            raise LayerfoldError("the cure needs training text")
        cure = run_cure(model, teacher, arch, cure_ids, opts.cure, kept=kept, log_file=log_file,
                        progress=progress)
        del teacher
    return FoldGPTResult(
        removed=sorted(gates.removed),
        kept=kept,
        groups=[list(g) for g in groups],
        gates=gates,
        params_before=params_before,
        params_after_removal=params_after_removal,
        params_stored=count_parameters(model),
        cure=cure,
    )


def run_cure(model, teacher, arch, ids: torch.Tensor, opts: CureOptions, *, kept=None,
             log_file: str | None = None, progress: bool = True) -> dict:
    """Fine-tune every decoder-layer parameter (shared weights once, per-layer norms) of
    ``model`` toward ``teacher``: logit KL + tail-layer MSE, student layer j against teacher
    layer ``kept[j]`` (the layer map). Embeddings and lm_head stay."""
    from ..train import HiddenMSE, LogitKL, TrainConfig, tail_map, train

    losses = []
    if opts.kl_weight > 0:
        losses.append(LogitKL(weight=opts.kl_weight, temperature=opts.temperature))
    if opts.tail_layers > 0 and opts.tail_weight > 0:
        k = min(opts.tail_layers, len(decoder_layers(model, arch)))
        losses.append(HiddenMSE(tail_map(k, kept), weight=opts.tail_weight))
    if not losses:
        raise LayerfoldError("the cure has no loss: give --kl-weight or --tail-layers/--tail-weight above 0")
    config = TrainConfig(
        steps=opts.steps, batch_size=opts.batch_size, grad_accum=opts.grad_accum, lr=opts.lr,
        warmup_steps=opts.warmup_steps, checkpoint_dir=opts.checkpoint_dir,
        checkpoint_every=opts.checkpoint_every, resume=opts.resume, log_file=log_file,
        progress=progress, desc="cure",
    )
    prefix = arch.layers + "."
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        result = train(model, ids, config, losses, teacher=teacher, arch=arch,
                       trainable=lambda name, p: name.startswith(prefix))
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, True))
    summary = {k: v for k, v in asdict(result).items() if k != "history"}
    return {"options": asdict(opts), "losses": [l.describe() for l in losses], **summary,
            "history": result.history}

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
import dataclasses
from dataclasses import asdict, dataclass, field

import torch

from ..errors import LayerfoldError
from ..importance.gates import GateOptions, GateResult, gate_ranking
from ..models.surgery import count_parameters, decoder_layers, remove_layers
from ..nn.shared import SHARE_INITS, adjacent_groups, parse_groups, share_groups
from ..train.loop import Checkpoints


@dataclass
class CureOptions:
    """The cure: which losses, how long. ``steps=0`` skips it."""

    steps: int = field(default=40, metadata={"help": "optimiser steps of the cure; 0 skips it"})
    lr: float | None = field(default=None, metadata={
        "help": "AdamW learning rate of the cure (default: 5e-5 for every decoder-layer weight, 5e-4 with "
                "--cure-lora-rank)"})
    batch_size: int = field(default=4, metadata={"help": "sequences per cure step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per cure step"})
    samples: int = field(default=64, metadata={
        "help": "sequences of cure text (same source and length as the calibration, the next seed)"})
    kl_weight: float = field(default=1.0, metadata={"help": "weight of the logit KL to the original",
                                                    "flag": "--kl-weight"})
    temperature: float = field(default=1.0, metadata={"help": "temperature of the logit KL"})
    tail_layers: int = field(default=3, metadata={
        "help": "k of tail-layer distillation (MSE of the last k layers' outputs); 0 turns it off",
        "flag": "--tail-layers"})
    tail_weight: float = field(default=1.0, metadata={"help": "weight of tail-layer distillation",
                                                      "flag": "--tail-weight"})
    warmup_steps: int = field(default=4, metadata={"help": "steps of linear learning-rate warmup"})
    lora_rank: int = field(default=0, metadata={
        "help": "train LoRA adapters of this rank on the linear weights instead of the weights themselves: one "
                "adapter per shared tensor, merged into it once at the end, so sharing survives; norms and "
                "biases still train (0: every decoder-layer weight trains)"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scaling numerator (scale = alpha / rank)"})

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 5e-4 if self.lora_rank else 5e-5

    def validate(self) -> None:
        if self.steps < 0:
            raise LayerfoldError(f"--cure-steps must be 0 or more (got {self.steps})")
        if self.tail_layers < 0:
            raise LayerfoldError(f"--tail-layers must be 0 or more (got {self.tail_layers})")
        if self.samples < 1 or self.batch_size < 1:
            raise LayerfoldError("--cure-samples and the cure batch size must be at least 1")
        if self.lora_rank < 0:
            raise LayerfoldError(f"--cure-lora-rank must be 0 or more (got {self.lora_rank})")
        if (self.lr is not None and self.lr <= 0) or self.kl_weight < 0 or self.tail_weight < 0:
            raise LayerfoldError("cure learning rate must be positive and loss weights non-negative")


# GateOptions belongs to importance/gates.py; its fields join the schema as they are (a new
# field gets --gate-<name>), with these flags (kept from before), and these help texts only
# where the field has none of its own
_GATE_FLAGS = {"budget_weight": "--budget-weight", "polar_weight": "--polar-weight"}
_GATE_HELPS = {
    "steps": "optimiser steps per round of gate training",
    "lr": "Adam learning rate of the gate logits",
    "init": "initial gate logit (sigmoid(3) = 0.95: every layer starts nearly on)",
    "budget_weight": "weight of the term pulling sum(gates) toward the number of layers kept",
    "polar_weight": "weight of the term pushing each gate to 0 or 1 (ramped up over the first half)",
    "polar_ramp": "fraction of the steps over which the polarising weight ramps up from 0",
    "batch_size": "sequences per gate step",
    "rounds": "remove the layers in this many rounds, retraining the gates in between",
    "seed": "seed of the gates' batch order",
}
_HELPED = {f.name for f in dataclasses.fields(GateOptions) if f.metadata.get("help")}
GATES_METADATA = {"help": "FoldGPT's learnable layer gates (weights frozen)", "prefix": "gate-",
                  "flags": _GATE_FLAGS, "helps": {k: v for k, v in _GATE_HELPS.items() if k not in _HELPED}}


@dataclass
class FoldGPTOptions:
    gates: GateOptions = field(default_factory=GateOptions, metadata=GATES_METADATA)
    group_size: int = field(default=2, metadata={
        "help": "adjacent retained layers per weight-sharing group; 1 turns sharing off", "flag": "--group-size"})
    groups: str | None = field(default=None, metadata={
        "help": "explicit groups of retained-layer indices instead of --group-size, e.g. 0-1,2-3,5-7",
        "flag": "--groups"})
    share_init: str = field(default="important", metadata={
        "help": "shared weights start as the highest-gated member's, or the members' mean", "choices": SHARE_INITS,
        "flag": "--share-init"})
    delta_rank: int = field(default=0, metadata={
        "help": "give every member of a shared group its own rank-r delta on each shared matrix, initialised "
                "from the truncated SVD of its difference to the shared weight; stored in the shared folder and "
                "counted in the stored parameters (0: none)", "flag": "--delta-rank"})
    cure: CureOptions = field(default_factory=CureOptions, metadata={
        "help": "FoldGPT's cure: logit KL + tail-layer distillation to the original (checkpoints: --checkpoint-dir)",
        "prefix": "cure-"})

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
    checkpoints: Checkpoints | None = None,
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
        cure = run_cure(model, teacher, arch, cure_ids, opts.cure, kept=kept, log_file=log_file, progress=progress,
                        checkpoints=checkpoints)
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
             log_file: str | None = None, progress: bool = True, checkpoints: Checkpoints | None = None) -> dict:
    """Fine-tune the decoder layers of ``model`` toward ``teacher`` through the one training
    loop (``train.loop.fit``): logit KL + tail-layer MSE, student layer j against teacher
    layer ``kept[j]`` (the layer map). What trains: every decoder-layer parameter (a shared
    weight once: it is one Parameter), or with ``opts.lora_rank`` LoRA adapters on the linear
    weights (one per shared tensor, ``nn.lora``) plus the per-layer norms and biases, merged
    into the weights once at the end. Embeddings and lm_head stay."""
    from ..nn.lora import add_lora, merge_lora
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
        steps=opts.steps, batch_size=opts.batch_size, grad_accum=opts.grad_accum, lr=opts.learning_rate(),
        warmup_steps=opts.warmup_steps, **(checkpoints or Checkpoints()).settings(), log_file=log_file,
        progress=progress, desc="cure",
    )
    prefix = arch.layers + "."
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    frozen: set[int] = set()
    if opts.lora_rank:
        frozen = {id(w) for w in add_lora(model, arch, opts.lora_rank, opts.lora_alpha)}
    try:
        result = train(model, ids, config, losses, teacher=teacher, arch=arch,
                       trainable=lambda name, p: name.startswith(prefix) and id(p) not in frozen)
    finally:
        if opts.lora_rank:
            merge_lora(model)
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, True))
    summary = {k: v for k, v in asdict(result).items() if k != "history"}
    what = (f"LoRA r={opts.lora_rank} on the linear weights (one adapter per shared tensor, merged once) + "
            "per-layer norms and biases" if opts.lora_rank else "every decoder-layer weight (a shared one once)")
    return {"options": asdict(opts), "lr": opts.learning_rate(), "trained": what,
            "losses": [l.describe() for l in losses], **summary, "history": result.history}

"""LLM-Streamline (arXiv 2403.19135): prune the most redundant block, train a light replacement.

1. Choose the block: for k = n + 1 consecutive layers (n removed net), the window whose input
   and output hidden states are most similar, cos(h[l], h[l+k]), on the raw last-layer output.
2. Collect training pairs (h[l*], h[l*+k]) in one layer-by-layer pass, streamed to disk.
3. Train the replacement f to minimise MSE(f(h[l*]), h[l*+k]) with everything else frozen
   (AdamW, lr 2e-4, weight decay 1e-3, warmup + cosine to 5e-5, clipping 5, best validation
   state kept). A decoder-layer replacement gets the causal mask and rotary positions the
   model itself would give it, recomputed from each batch's token ids.
4. Or, the LM-loss variant: put the replacement in the pruned model and train only it with the
   next-token loss (``lm``) or KL to the original model's logits (``kl``).
5. Insert it: the result is the same architecture with fewer layers.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.pairs import STORAGE_DTYPES, PairStore
from ..errors import LayerfoldError
from ..importance import LayerScores
from ..importance.layer_pass import layer_arguments, layer_pass, run_layer
from ..models.architectures import Architecture, cache_anchor_layers
from ..models.layer_map import LayerMap
from ..models.lazy import layer_weights, materialize, return_freed_memory
from ..models.surgery import count_parameters, decoder_layers, decoder_parameters, replace_block
from ..nn.replacements import ACTIVATIONS, REPLACEMENTS, FFNReplacement, ReplacementSpec, build_replacement
from ..train.losses import LogitKL, NextTokenLoss
from ..train.loop import Checkpoints, Distillation, Objective, TrainConfig, TrainResult, fit, mean_loss
from . import pruning

LOSSES = ("mse", "mse-normed", "lm", "kl")
PAIR_LOSSES = ("mse", "mse-normed")  # trained on the cached (input, output) pairs


@dataclass
class StreamlineOptions:
    """What replaces the block and how it is trained (the training defaults are the paper's)."""

    replacement: str = field(default="layer", metadata={
        "help": "layer: a decoder layer initialised from the block's first layer (official default); swiglu: that "
                "layer with attention silenced, i.e. a gated FFN in standard layer form; ffn: a plain FFN (cannot be "
                "saved in stock form); none: keep the first layer untrained",
        "choices": REPLACEMENTS, "flag": "--replacement"})
    loss: str = field(default="mse", metadata={
        "help": "mse: match the block's output on cached pairs (the paper); mse-normed: the same after "
                "RMS-normalising each token's vector; lm: next-token loss with the replacement in the pruned model; "
                "kl: KL to the original model's logits", "choices": LOSSES, "flag": "--loss"})
    ffn_width: int | None = field(default=None, metadata={
        "help": "ffn: hidden width (default: the model's intermediate size)", "flag": "--ffn-width"})
    ffn_activation: str = field(default="gelu", metadata={
        "help": "ffn: activation", "choices": tuple(sorted(ACTIVATIONS)), "flag": "--ffn-activation"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training sequences", "flag": "--epochs"})
    train_tokens: int | None = field(default=None, metadata={
        "help": "train on this many tokens instead of --epochs", "flag": "--train-tokens"})
    batch_size: int = field(default=4, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimiser step"})
    val_fraction: float = field(default=0.1, metadata={
        "help": "share of calibration sequences held out; the best validation state is kept", "flag": "--val-fraction"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate (AdamW)", "flag": "--lr"})
    min_lr: float = field(default=5e-5, metadata={"help": "learning rate at the end of the cosine", "flag": "--min-lr"})
    weight_decay: float = field(default=1e-3, metadata={"help": "AdamW weight decay (matrices only)"})
    warmup: float = field(default=0.03, metadata={"help": "fraction of the steps spent warming up linearly"})
    grad_clip: float = field(default=5.0, metadata={"help": "gradient norm clipping"})
    precision: str = field(default="fp32", metadata={"help": "bf16 autocast or fp32", "choices": ("fp32", "bf16")})
    eval_every: int = field(default=0, metadata={"help": "steps between validations; 0: about ten per run"})
    pair_dtype: str = field(default="bf16", metadata={
        "help": "storage of the cached training pairs on disk", "choices": STORAGE_DTYPES, "flag": "--pair-dtype"})
    pairs_dir: str | None = field(default=None, metadata={
        "help": "folder for the temporary training pairs (default: beside the output; removed after)",
        "flag": "--pairs-dir", "path": True})
    seed: int = field(default=0, metadata={"help": "seed of the validation split, batch order and training"})

    @property
    def spec(self) -> ReplacementSpec:
        return ReplacementSpec(self.replacement, self.ffn_width, self.ffn_activation)

    def validate(self) -> None:
        self.spec.validate()
        if self.loss not in LOSSES:
            raise LayerfoldError(f"unknown loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        if self.pair_dtype not in STORAGE_DTYPES:
            raise LayerfoldError(f"--pair-dtype must be one of {', '.join(STORAGE_DTYPES)}")
        if not 0 < self.val_fraction < 1:
            raise LayerfoldError(f"--val-fraction must be between 0 and 1 (got {self.val_fraction:g})")
        if self.epochs <= 0:
            raise LayerfoldError(f"--epochs must be positive (got {self.epochs:g})")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise LayerfoldError(f"--train-batch-size and --train-grad-accum must be at least 1 "
                                 f"(got {self.batch_size}, {self.grad_accum})")
        if self.train_tokens is not None and self.train_tokens < 1:
            raise LayerfoldError(f"--train-tokens must be positive (got {self.train_tokens})")
        if not 0 < self.min_lr <= self.lr:
            raise LayerfoldError(f"--min-lr must be positive and at most --lr (got {self.min_lr:g}, {self.lr:g})")
        if not 0 <= self.warmup < 1:
            raise LayerfoldError(f"--train-warmup must be a fraction in [0, 1) (got {self.warmup:g})")
        if self.loss != "mse" and self.replacement == "none":
            raise LayerfoldError("--replacement none trains nothing; drop --loss or choose a replacement")

    def train_config(self, steps: int, **bookkeeping) -> TrainConfig:
        """The loop's settings for ``steps`` optimiser steps of replacement training."""
        return TrainConfig(
            steps=steps, batch_size=self.batch_size, grad_accum=self.grad_accum, lr=self.lr,
            min_lr_ratio=self.min_lr / self.lr, weight_decay=self.weight_decay,
            warmup_steps=max(1, round(self.warmup * steps)) if self.warmup > 0 else 0,
            max_grad_norm=self.grad_clip, precision=self.precision, seed=self.seed,
            eval_every=self.eval_every or max(1, steps // 10), **bookkeeping,
        )


@dataclass
class StreamlineResult:
    start: int
    window: int  # layers in the replaced block
    removed: list[int]  # original indices of the layers that are gone (the block minus its slot)
    layer_map: LayerMap
    replacement_params: int
    block_cosine: float | None
    fit: TrainResult | None  # the replacement's training (validation losses included)
    pair_tokens: int = 0
    pair_bytes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


# -- 1. the block ----------------------------------------------------------------------


def replacement_size(model: nn.Module, arch: Architecture, spec: ReplacementSpec) -> int:
    """Parameters the replacement adds (as stored), computed without allocating it."""
    first = decoder_layers(model, arch)[0]
    if spec.kind != "ffn":
        return count_parameters(first)  # a decoder layer, attention zeros included for swiglu
    cfg = model.config
    with torch.device("meta"):
        ffn = FFNReplacement(cfg.hidden_size, spec.ffn_width or cfg.intermediate_size, spec.ffn_activation)
    return count_parameters(ffn)


def block_window(
    layer_params: list[int], replacement_params: int, remove: int | None, sparsity: float | None
) -> int:
    """How many consecutive layers the replacement takes the place of.

    ``--remove N``: N + 1 (one slot is taken by the replacement). ``--sparsity F``: the window
    whose removal, less the replacement's own parameters, comes nearest to F of the decoder's
    parameters (layers of one model have the same size).
    """
    L = len(layer_params)
    if remove is None and sparsity is None:
        remove = max(1, round(0.25 * L))
    if remove is not None:
        window = remove + 1
    else:
        per_layer, total = sum(layer_params) / L, sum(layer_params)
        window = max(1, round((sparsity * total + replacement_params) / per_layer))
        if window * per_layer - replacement_params <= 0:
            window += 1
    if not 1 <= window < L:
        raise LayerfoldError(
            f"the replaced block would be {window} of {L} layers; remove at most {L - 2} layers net"
        )
    return window


def choose_block(scores: LayerScores, window: int) -> int:
    """Start l* of the ``window``-layer block with the highest cos(h[l], h[l+window])."""
    return pruning.streamline_block(scores, window)[0]


# -- 2. the training pairs -------------------------------------------------------------


@torch.no_grad()
def collect_pairs(
    model: nn.Module, arch: Architecture, ids: torch.Tensor, start: int, window: int, store: PairStore,
    *, batch_size: int = 8, progress: bool = True,
) -> None:
    """One layer-by-layer pass up to the block's end, writing (h[l*], h[l*+k]) to ``store``."""
    end = start + window - 1  # last layer of the block
    inputs: dict[int, torch.Tensor] = {}
    written = [0]

    def observe(l: int, b: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        if l == start:
            inputs[b] = h_in
        if l == end:  # batches arrive in order (one batch per chunk)
            first, rows = written[0], h_in.shape[0]
            store.write(first, inputs.pop(b), h_out, ids[first : first + rows])
            written[0] += rows

    layer_pass(model, arch, ids, batch_size=batch_size, chunk_batches=1, observe=observe,
               progress=progress, desc="collecting training pairs", stop_at=end + 1)
    if written[0] != ids.shape[0]:
        raise RuntimeError(f"collected {written[0]} of {ids.shape[0]} sequences")


def split_rows(samples: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A fixed random validation split of sequence rows (at least one of each)."""
    if samples < 2:
        raise LayerfoldError("LLM-Streamline needs at least 2 calibration sequences (one for validation)")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(samples, generator=g).tolist()
    n_val = min(samples - 1, max(1, round(val_fraction * samples)))
    return sorted(order[n_val:]), sorted(order[:n_val])


def _total_steps(n_train_rows: int, seq_len: int, opts: StreamlineOptions) -> int:
    per_step = opts.batch_size * opts.grad_accum
    if opts.train_tokens is not None:
        return max(1, math.ceil(opts.train_tokens / (per_step * seq_len)))
    return max(1, math.ceil(opts.epochs * math.ceil(n_train_rows / per_step)))


def _run(module, objective, opts: StreamlineOptions, rows: int, seq_len: int, *, log_path, progress,
         checkpoints: Checkpoints | None, best_state_dir=None, trainable=None) -> TrainResult:
    """Replacement training through the project's loop: validation on held-out rows, the best
    validation state kept, and the run described at the head of its log."""
    train_rows, val_rows = split_rows(rows, opts.val_fraction, opts.seed)
    steps = _total_steps(len(train_rows), seq_len, opts)
    config = opts.train_config(steps, log_file=str(log_path) if log_path else None, progress=progress,
                               desc=f"training replacement ({opts.loss})", **(checkpoints or Checkpoints()).settings())
    header = {"replacement": opts.replacement, "loss": opts.loss, **config.result_fields(),
              "total_steps": steps, "train_rows": len(train_rows), "val_rows": len(val_rows)}
    return fit(module, objective, config, rows=train_rows, trainable=trainable,
               validate=mean_loss(objective, val_rows, opts.batch_size), best_state_dir=best_state_dir,
               log_header=header)


# -- 3. MSE on cached pairs ------------------------------------------------------------


class PairRegression(Objective):
    """MSE between the module at layer ``index`` applied to stored block inputs and the stored
    block outputs (optionally both RMS-normalised per token)."""

    def __init__(self, model: nn.Module, arch: Architecture, index: int, store: PairStore, normed: bool):
        self.model, self.arch, self.index, self.store, self.normed = model, arch, index, store, normed
        self.layer = decoder_layers(model, arch)[index]
        first = next(self.layer.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.tokens_per_row = store.seq_len
        self.name = "mse-normed" if normed else "mse"
        self._calls: dict[tuple, dict] = {}

    def __call__(self, rows, autocast):
        x, y, ids = self.store.read(sorted(rows))  # in file order: the mean does not care
        # the layer's own arguments (causal mask, rotary cos/sin, position ids), as the model gives
        # them; they depend on the batch shape only, so they are made once per shape
        if ids.shape not in self._calls:
            self._calls[ids.shape] = layer_arguments(self.model, self.arch, tuple(ids.shape), self.device,
                                                     self.dtype)[self.index]
        with autocast:
            pred = run_layer(self.layer, x.to(self.device, self.dtype), self._calls[ids.shape])
        pred, y = pred.float(), y.to(self.device)
        if self.normed:
            pred, y = _rms_normalize(pred), _rms_normalize(y)
        loss = F.mse_loss(pred, y)
        return loss, {self.name: loss}

    def describe(self) -> dict:
        return {"kind": "pairs", "rows": self.store.samples, "seq_len": self.store.seq_len,
                "dtype": self.store.dtype, "index": self.index, "normed": self.normed}


def train_mse(
    model: nn.Module, arch: Architecture, index: int, store: PairStore, opts: StreamlineOptions,
    *, log_path: Path | None = None, progress: bool = True, checkpoints: Checkpoints | None = None,
) -> TrainResult:
    """Train the module at layer ``index`` of ``model`` to map stored block inputs to outputs."""
    objective = PairRegression(model, arch, index, store, normed=opts.loss == "mse-normed")
    return _run(objective.layer, objective, opts, store.samples, store.seq_len, log_path=log_path,
                progress=progress, checkpoints=checkpoints, best_state_dir=store.folder)  # beside the pairs


def _rms_normalize(h: torch.Tensor) -> torch.Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


# -- 4. the LM-loss variant ------------------------------------------------------------


def train_in_place(
    model: nn.Module, arch: Architecture, index: int, ids: torch.Tensor, opts: StreamlineOptions,
    *, teacher: nn.Module | None = None, log_path: Path | None = None, progress: bool = True,
    checkpoints: Checkpoints | None = None,
) -> TrainResult:
    """Train only layer ``index`` of the pruned ``model`` with the next-token loss, or with KL
    to ``teacher``'s logits when a teacher is given. Every other weight stays frozen."""
    replacement = decoder_layers(model, arch)[index]
    trainable = {id(p) for p in replacement.parameters() if p.requires_grad}
    frozen = [p for p in model.parameters() if id(p) not in trainable and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    losses = [NextTokenLoss()] if teacher is None else [LogitKL()]
    objective = Distillation(model, ids, losses, teacher=teacher, arch=arch)
    try:
        return _run(replacement, objective, opts, ids.shape[0], ids.shape[1], log_path=log_path,
                    progress=progress, checkpoints=checkpoints)
    finally:
        for p in frozen:
            p.requires_grad_(True)


# -- the whole method ------------------------------------------------------------------


def check_block(spec: ReplacementSpec, start: int, config, arch: Architecture) -> None:
    """What a block choice must satisfy for the replacement (checked when planning).

    A plain FFN keeps no KV cache; transformers reads the cached length and each attention
    type's mask geometry from the first layer of that type, so the FFN must not take one of
    those slots (layers before the block are unchanged, so the slot's anchors are the original's).
    """
    if spec.kind != "ffn":
        return
    anchors = {i: kind for kind, i in cache_anchor_layers(config, arch).items()}
    if start in anchors:
        raise LayerfoldError(f"the chosen block starts at layer {start}, the first {anchors[start]} layer, where a "
                             "plain FFN breaks generation with the KV cache; use --replacement swiglu or layer")


def streamline(
    model: nn.Module,
    arch: Architecture,
    ids: torch.Tensor,
    scores: LayerScores,
    opts: StreamlineOptions,
    *,
    remove: int | None = None,
    sparsity: float | None = None,
    work_dir: Path,
    log_path: Path | None = None,
    progress: bool = True,
    batch_size: int = 8,
    store: PairStore | None = None,
    checkpoints: Checkpoints | None = None,
) -> StreamlineResult:
    """Replace the most redundant block of ``model`` (in place) by a trained replacement: steps
    1-5 of the module docstring.

    ``store``: training pairs already collected for this block (reused, e.g. to train several
    replacements of one block); by default they are collected into ``work_dir`` and deleted.
    ``checkpoints``: where the replacement's training checkpoints (and resumes from).
    """
    opts.validate()
    window = block_window(decoder_parameters(model, arch), replacement_size(model, arch, opts.spec), remove, sparsity)
    start = choose_block(scores, window)
    check_block(opts.spec, start, model.config, arch)
    return replace_and_train(model, arch, ids, start, window, opts, block_cosine=scores.cosine[start][window],
                             work_dir=work_dir, log_path=log_path, progress=progress, batch_size=batch_size,
                             store=store, checkpoints=checkpoints)


def replace_and_train(
    model: nn.Module,
    arch: Architecture,
    ids: torch.Tensor,
    start: int,
    window: int,
    opts: StreamlineOptions,
    *,
    block_cosine: float | None = None,
    work_dir: Path,
    log_path: Path | None = None,
    progress: bool = True,
    batch_size: int = 8,
    store: PairStore | None = None,
    checkpoints: Checkpoints | None = None,
) -> StreamlineResult:
    """Steps 2-5 for the block ``start .. start+window-1``: collect its pairs, put the
    replacement in its first slot, train it."""
    opts.validate()
    check_block(opts.spec, start, model.config, arch)
    seconds: dict[str, float] = {}
    spec = opts.spec
    removed = list(range(start + 1, start + window)) if window > 1 else []

    weights = layer_weights(model, arch)
    if opts.loss not in PAIR_LOSSES:
        materialize(model, arch)  # the in-place losses run the whole model
    torch.manual_seed(opts.seed)
    teacher = None
    if opts.loss == "kl":
        import copy

        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    own_store = store is None
    if store is not None and (store.samples, store.seq_len) != tuple(ids.shape):
        raise LayerfoldError("the given training pairs do not match the calibration ids")
    if own_store and spec.trainable and opts.loss in PAIR_LOSSES:
        t = time.perf_counter()
        store = PairStore(work_dir / "pairs", ids.shape[0], ids.shape[1], model.config.hidden_size, opts.pair_dtype)
        collect_pairs(model, arch, ids, start, window, store, batch_size=batch_size, progress=progress)
        seconds["pairs"] = time.perf_counter() - t

    # a layer-streamed model reads the block's first layer from disk (the pair pass released it)
    replacement = build_replacement(weights.acquire(start), model.config, arch, spec)
    weights.release(start)  # the replacement is a copy; a streamed model drops the original again
    for p in model.parameters():
        p.requires_grad_(False)
    # build_replacement set the replacement's own trainable flags; the rest of the model is frozen
    replace_block(model, arch, start, window, replacement)
    n_layers = len(decoder_layers(model, arch)) + window - 1
    layer_map = LayerMap.replacement(n_layers, start, window, keeps_first=spec.kind == "none")

    result_fit = None
    if spec.trainable:
        t = time.perf_counter()
        try:
            if opts.loss in PAIR_LOSSES:
                weights.park_input_embeddings()  # training reads cached pairs: no pass needs them now
                result_fit = train_mse(model, arch, start, store, opts, log_path=log_path, progress=progress,
                                       checkpoints=checkpoints)
            else:
                result_fit = train_in_place(model, arch, start, ids, opts, teacher=teacher,
                                            log_path=log_path, progress=progress, checkpoints=checkpoints)
        finally:
            seconds["train"] = time.perf_counter() - t
        return_freed_memory()  # the optimiser's state is gone; saving comes next
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    pair_bytes = store.nbytes() if store else 0
    if store and own_store:
        shutil.rmtree(store.folder, ignore_errors=True)
    return StreamlineResult(
        start=start, window=window, removed=removed, layer_map=layer_map,
        replacement_params=count_parameters(decoder_layers(model, arch)[start]),
        block_cosine=block_cosine, fit=result_fit,
        pair_tokens=store.tokens if store else 0, pair_bytes=pair_bytes, seconds=seconds,
    )


__all__ = ["LOSSES", "REPLACEMENTS", "StreamlineOptions", "StreamlineResult", "streamline", "replace_and_train",
           "block_window", "choose_block", "check_block", "collect_pairs", "train_mse", "train_in_place",
           "PairRegression"]

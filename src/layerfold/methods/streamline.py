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

import contextlib
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.calibration import CalibrationSpec
from ..data.pairs import STORAGE_DTYPES, PairStore
from ..errors import LayerfoldError
from ..importance import LayerScores
from ..importance.layer_pass import layer_arguments, layer_pass, run_layer
from ..models.architectures import Architecture, attention_types, cache_anchor_layers
from ..models.layer_map import LayerMap
from ..models.lazy import layer_weights, materialize, return_freed_memory
from ..models.surgery import count_parameters, decoder_layers, decoder_parameters, replace_block
from ..nn.replacements import ACTIVATIONS, REPLACEMENTS, FFNReplacement, ReplacementSpec, build_replacement
from ..train.losses import LogitKL, NextTokenLoss
from ..train.loop import Checkpoints, Distillation, Objective, TrainConfig, TrainResult, data_digest, fit
from . import pruning

LOSSES = ("mse", "mse-normed", "cosine", "lm", "kl")
PAIR_LOSSES = ("mse", "mse-normed", "cosine")  # trained on the cached (input, output) pairs
# which layer of the block a decoder-layer replacement starts as; the linear ones then refit that
# layer's MLP output projection in closed form (ReplaceMe's least squares) on the training pairs
INITS = ("first", "last", "linear", "linear-last")
LINEAR_INITS = {"linear": "first", "linear-last": "last"}
TRAIN_SEED = 1  # self-written training text: calibration is seed 0, held-out rows seed 2
FROM_CALIBRATION = "calib"  # --train-data calib: the calibration text itself (the paper's code)
OFFICIAL_BATCH = 128  # sequences per optimiser step in the official code
# the defaults are the best measured on SmolLM2-135M (benchmarks/streamline.md), not the paper's
# mse (at 16,384 training tokens mse from the first layer made the model worse than dropping the
# block untrained): the next-token loss with the replacement in the pruned model, starting as the
# block's first layer (the official init). It needs the whole model; where the memory plan cannot
# give it that, the replacement trains on streamed pairs with the best pair loss measured instead
DEFAULT_LOSS = "lm"
DEFAULT_INIT = "first"
STREAMED_LOSS = "cosine"
STREAMED_INIT = "last"


def _training_text() -> CalibrationSpec:
    # seed 1 and the default settings: the very text (and cache) of healing's default
    return CalibrationSpec(seed=TRAIN_SEED)


@dataclass
class StreamlineOptions:
    """What replaces the block and how it is trained (the optimiser settings are the paper's)."""

    replacement: str = field(default="layer", metadata={
        "help": "layer: a decoder layer initialised from the block (official default); swiglu: that "
                "layer with attention silenced, i.e. a gated FFN in standard layer form; ffn: a plain FFN (cannot be "
                "saved in stock form); none: keep the first layer untrained",
        "choices": REPLACEMENTS, "flag": "--replacement"})
    loss: str = field(default=DEFAULT_LOSS, metadata={
        "help": "mse: match the block's output on cached pairs (the paper); mse-normed: the same after "
                "RMS-normalising each token's vector; cosine: 1 - cos(output, target) per token (direction only); "
                "lm (default): next-token loss with the replacement in the pruned model; kl: KL to the original "
                "model's logits. lm and kl train through the whole model; where the memory plan cannot hold it "
                f"(or on a CPU above 500 M parameters) the default becomes {STREAMED_LOSS} from the {STREAMED_INIT} "
                "layer, on pairs streamed from disk", "choices": LOSSES, "flag": "--loss"})
    init: str = field(default=DEFAULT_INIT, metadata={
        "help": "first (default): the replacement layer starts as the block's first layer (the official code); last: as its "
                "last (of the slot's attention type); linear / linear-last: first / last with its MLP output "
                "projection refitted in closed form so that the layer maps the block's inputs to its outputs on the "
                "training pairs (ReplaceMe's least squares; pair losses only); for layer and swiglu replacements "
                "(ffn starts as the identity, none keeps the first layer)", "choices": INITS})
    ffn_width: int | None = field(default=None, metadata={
        "help": "ffn: hidden width (default: the model's intermediate size)", "flag": "--ffn-width"})
    ffn_activation: str = field(default="gelu", metadata={
        "help": "ffn: activation", "choices": tuple(sorted(ACTIVATIONS)), "flag": "--ffn-activation"})
    data: CalibrationSpec = field(default_factory=_training_text, metadata={
        "help": "the replacement's training text; the block itself is chosen on the calibration text",
        "prefix": "train-data-", "flags": {"source": "--train-data", "seq_len": "--train-seq-len"},
        "helps": {"source": "'self' (the original model writes it: seed 1, the same cached text as healing's), "
                            f"'{FROM_CALIBRATION}' (the calibration text itself, as the paper's code) or a "
                            ".txt/.jsonl file; evaluation files are refused",
                  "seq_len": "tokens per training sequence",
                  "seed": "seed of self-written training text (calibration uses 0, held-out rows 2)"},
        "exclude": ("samples",)})
    train_tokens: int = field(default=65_536, metadata={
        "help": "training budget: distinct tokens of training text (the validation rows come on top)",
        "flag": "--train-tokens"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training tokens", "flag": "--epochs"})
    batch: int = field(default=OFFICIAL_BATCH, metadata={
        "help": "sequences per optimiser step (the official 128), lowered only as far as needed for "
                "--train-min-steps steps"})
    min_steps: int = field(default=32, metadata={
        "help": "fewest optimiser steps a run gets: a small budget trains with a smaller batch, not with fewer steps"})
    batch_size: int = field(default=4, metadata={
        "help": "sequences per micro-batch (memory); gradient accumulation makes up the batch"})
    val_rows: int = field(default=32, metadata={
        "help": "held-out sequences of the training text that choose the best state (at most a tenth of a file "
                "or of the calibration text)"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate (AdamW, betas 0.9/0.95)", "flag": "--lr"})
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
    seed: int = field(default=0, metadata={"help": "seed of the batch order and training"})

    @property
    def spec(self) -> ReplacementSpec:
        return ReplacementSpec(self.replacement, self.ffn_width, self.ffn_activation)

    def validate(self) -> None:
        self.spec.validate()
        if self.loss not in LOSSES:
            raise LayerfoldError(f"unknown loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        if self.init not in INITS:
            raise LayerfoldError(f"unknown --train-init {self.init!r}; choose from {', '.join(INITS)}")
        if self.pair_dtype not in STORAGE_DTYPES:
            raise LayerfoldError(f"--pair-dtype must be one of {', '.join(STORAGE_DTYPES)}")
        for name, flag in (("train_tokens", "--train-tokens"), ("batch", "--train-batch"),
                           ("min_steps", "--train-min-steps"), ("batch_size", "--train-batch-size"),
                           ("val_rows", "--train-val-rows")):
            if getattr(self, name) < 1:
                raise LayerfoldError(f"{flag} must be at least 1 (got {getattr(self, name)})")
        if self.epochs <= 0:
            raise LayerfoldError(f"--epochs must be positive (got {self.epochs:g})")
        if not 0 < self.min_lr <= self.lr:
            raise LayerfoldError(f"--min-lr must be positive and at most --lr (got {self.min_lr:g}, {self.lr:g})")
        if not 0 <= self.warmup < 1:
            raise LayerfoldError(f"--train-warmup must be a fraction in [0, 1) (got {self.warmup:g})")
        if self.init in LINEAR_INITS and self.replacement in ("layer", "swiglu") and self.loss not in PAIR_LOSSES:
            raise LayerfoldError(f"--train-init {self.init} fits on the cached pairs of a pair loss "
                                 f"({', '.join(PAIR_LOSSES)}); --loss {self.loss} trains in place without them (add --loss cosine)")
        if self.loss != DEFAULT_LOSS and self.replacement == "none":
            raise LayerfoldError("--replacement none trains nothing; drop --loss or choose a replacement")
        if self.data.source != FROM_CALIBRATION:
            self.data.validate()
            _check_source(self.data.source)

    def batches(self, train_rows: int) -> tuple[int, int]:
        """(micro-batch, accumulation) for ``train_rows`` training sequences: the official batch
        where the budget gives at least ``min_steps`` steps of it, else the largest batch that does."""
        effective = max(1, min(self.batch, int(self.epochs * train_rows) // self.min_steps))
        micro = min(self.batch_size, effective)
        return micro, max(1, round(effective / micro))

    def train_config(self, steps: int, micro: int, accum: int, **bookkeeping) -> TrainConfig:
        """The loop's settings for ``steps`` optimiser steps of replacement training."""
        return TrainConfig(
            steps=steps, batch_size=micro, grad_accum=accum, lr=self.lr, betas=(0.9, 0.95),
            min_lr_ratio=self.min_lr / self.lr, weight_decay=self.weight_decay,
            warmup_steps=max(1, round(self.warmup * steps)) if self.warmup > 0 else 0,
            max_grad_norm=self.grad_clip, precision=self.precision, seed=self.seed,
            eval_every=self.eval_every or max(1, steps // 10), **bookkeeping,
        )


def _check_source(source: str) -> None:
    """A training file that is missing, or is evaluation data, stops the run before any work."""
    from ..data.calibration import BUNDLED

    if source in ("self", BUNDLED) or source.startswith("hf:"):  # the bundled corpus ships with layerfold
        return
    from pathlib import Path as _Path

    from ..data.guard import check_not_eval_data

    if not _Path(source).expanduser().is_file():
        raise LayerfoldError(f"--train-data {source}: no such file")
    check_not_eval_data(source, "replacement training")


@dataclass
class TrainingText:
    """The replacement's training rows and, after them, its validation rows (one text)."""

    ids: torch.Tensor  # [train + val, seq_len]
    val: int  # the last ``val`` rows validate
    source: str = "given"

    @property
    def train(self) -> int:
        return self.ids.shape[0] - self.val

    @classmethod
    def split(cls, ids: torch.Tensor, val_rows: int, source: str = "given") -> "TrainingText":
        """``ids`` with its last rows held out: ``val_rows`` of them, at most a tenth (at least one)."""
        n = ids.shape[0]
        if n < 2:
            raise LayerfoldError("LLM-Streamline needs at least 2 training sequences (one for validation)")
        return cls(ids, min(val_rows, max(1, n // 10)), source)


def training_text(opts: StreamlineOptions, loaded, calibration: torch.Tensor | None = None, *,
                  progress: bool = True) -> TrainingText:
    """The training text of ``opts``: ``train_tokens`` tokens of rows plus ``val_rows`` rows,
    written by / read for the original ``loaded`` (before any surgery)."""
    from dataclasses import replace as _replace

    from ..data.calibration import load_calibration

    if opts.data.source == FROM_CALIBRATION:
        if calibration is None:
            raise LayerfoldError(f"--train-data {FROM_CALIBRATION} needs the calibration text")
        return TrainingText.split(calibration, opts.val_rows, FROM_CALIBRATION)
    seq = opts.data.seq_len
    train = max(1, math.ceil(opts.train_tokens / seq))
    ids = load_calibration(_replace(opts.data, samples=train + opts.val_rows), loaded, progress=progress)
    if ids.shape[0] < train + opts.val_rows:  # a short file: hold out a tenth of what there is
        return TrainingText.split(ids, opts.val_rows, opts.data.source)
    return TrainingText(ids, opts.val_rows, opts.data.source)


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
    training: dict = field(default_factory=dict)  # text, rows, batch, steps, tokens, validation curve

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
    """One layer-by-layer pass up to the block's end, writing (h[l*], h[l*+k]) to ``store``,
    one batch at a time; a store that a killed pass filled in part (``store.rows_done``) is
    continued at its first missing batch (the same batches, so the same numbers)."""
    end = start + window - 1  # last layer of the block
    inputs: dict[int, torch.Tensor] = {}
    done = store.rows_done()
    written = [done]
    if done >= ids.shape[0]:
        return

    def observe(l: int, b: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        if l == start:
            inputs[b] = h_in
        if l == end:  # batches arrive in order (one batch per chunk)
            first, rows = written[0], h_in.shape[0]
            store.write(first, inputs.pop(b), h_out, ids[first : first + rows])
            written[0] += rows
            store.mark_done(written[0])

    layer_pass(model, arch, ids[done:], batch_size=batch_size, chunk_batches=1, observe=observe,
               progress=progress, desc="collecting training pairs", stop_at=end + 1)
    if written[0] != ids.shape[0]:
        raise RuntimeError(f"collected {written[0]} of {ids.shape[0]} sequences")


def _validation(objective: Objective, rows: Sequence[int]) -> Callable[[], tuple[float, dict]]:
    """The mean loss over the validation rows, one row at a time so that its standard error
    (between rows) joins the validation's record (``val_se``): it says which differences the
    best-state choice can see. In the record, it survives a resumed run."""
    rows = list(rows)

    def validate() -> tuple[float, dict]:
        values = torch.tensor([objective([r], contextlib.nullcontext())[0].item() for r in rows], dtype=torch.float64)
        se = float(values.std() / math.sqrt(len(rows))) if len(rows) > 1 else float("nan")
        return float(values.mean()), {"val_se": se}

    return validate


def _run(module, objective, opts: StreamlineOptions, text: TrainingText, *, log_path, progress,
         checkpoints: Checkpoints | None, best_state_dir=None, trainable=None) -> tuple[TrainResult, dict]:
    """Replacement training through the project's loop: the training rows at the official
    batch (where the budget allows), the best state on the validation rows kept; what was run
    is described at the head of the log and returned for the record."""
    train_rows = list(range(text.train))
    val_rows = list(range(text.train, text.train + text.val))
    micro, accum = opts.batches(text.train)
    steps = max(1, math.ceil(opts.epochs * text.train / (micro * accum)))
    config = opts.train_config(steps, micro, accum, log_file=str(log_path) if log_path else None, progress=progress,
                               desc=f"training replacement ({opts.loss})", **(checkpoints or Checkpoints()).settings())
    seq_len = text.ids.shape[1]
    training = {"source": text.source, "train_rows": text.train, "val_rows": text.val, "seq_len": seq_len,
                "train_tokens": text.train * seq_len, "micro_batch": micro, "grad_accum": accum,
                "batch": micro * accum, "steps": steps, "tokens_seen": steps * micro * accum * seq_len}
    header = {"replacement": opts.replacement, "loss": opts.loss, "init": opts.init, **training,
              **config.result_fields()}
    result = fit(module, objective, config, rows=train_rows, trainable=trainable,
                 validate=_validation(objective, val_rows), best_state_dir=best_state_dir, log_header=header)
    training["validation"] = [{"step": r["step"], "loss": r["val_loss"], "se": r["val_se"]}
                              for r in result.history if r.get("event") == "val"]
    training.update(best_step=result.best_step, first_val=result.first_val, best_val=result.best_val)
    return result, training


# -- 3. MSE on cached pairs ------------------------------------------------------------


class PairRegression(Objective):
    """The module at layer ``index`` applied to stored block inputs against the stored block
    outputs: MSE (the paper), MSE of both RMS-normalised per token (``mse-normed``), or
    1 - cos per token (``cosine``: direction only, ReplaceMe's observation)."""

    def __init__(self, model: nn.Module, arch: Architecture, index: int, store: PairStore, loss: str = "mse"):
        if loss not in PAIR_LOSSES:
            raise LayerfoldError(f"pair loss must be one of {', '.join(PAIR_LOSSES)} (got {loss!r})")
        self.model, self.arch, self.index, self.store, self.loss = model, arch, index, store, loss
        self.layer = decoder_layers(model, arch)[index]
        first = next(self.layer.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.tokens_per_row = store.seq_len
        self.name = loss
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
        if self.loss == "cosine":
            loss = 1 - F.cosine_similarity(pred, y, dim=-1).mean()
        else:
            if self.loss == "mse-normed":
                pred, y = _rms_normalize(pred), _rms_normalize(y)
            loss = F.mse_loss(pred, y)
        return loss, {self.name: loss}

    def describe(self) -> dict:
        return {"kind": "pairs", "rows": self.store.samples, "seq_len": self.store.seq_len,
                "dtype": self.store.dtype, "index": self.index, "loss": self.loss}


def train_pairs(
    model: nn.Module, arch: Architecture, index: int, store: PairStore, text: TrainingText, opts: StreamlineOptions,
    *, log_path: Path | None = None, progress: bool = True, checkpoints: Checkpoints | None = None,
) -> tuple[TrainResult, dict]:
    """Train the module at layer ``index`` of ``model`` to map stored block inputs to outputs
    (``store`` holds the pairs of ``text``'s rows, validation rows last)."""
    objective = PairRegression(model, arch, index, store, opts.loss)
    # the best state goes to disk beside the pairs, in a folder of this training's own: trainings
    # sharing one store (several replacements of a block, parallel processes on one --pairs-dir)
    # would otherwise overwrite, and on restoring delete, each other's best state
    best_dir = Path(tempfile.mkdtemp(prefix=f"best-{opts.loss}-{opts.init}-", dir=store.folder))
    try:
        return _run(objective.layer, objective, opts, text, log_path=log_path, progress=progress,
                    checkpoints=checkpoints, best_state_dir=best_dir)
    finally:
        shutil.rmtree(best_dir, ignore_errors=True)


@torch.no_grad()
def linear_init(model: nn.Module, arch: Architecture, index: int, store: PairStore, rows: Sequence[int], *,
                ridge: float = 1e-4, batch_size: int = 8) -> dict:
    """Refit the MLP output projection of the layer at ``index`` so that the layer maps the stored
    block inputs of ``rows`` to the stored block outputs, in closed form (ReplaceMe's least squares).

    The layer's output is ``Y + M`` (``M`` what its MLP writes into the residual stream); the
    matrix T minimising |M T + Y - h_out|^2 over the rows' tokens is folded into the projection
    (W <- T^T W), so the layer keeps its shape. Returns the relative errors |M T - D|^2 / |D|^2
    (D = h_out - Y) before (T = I) and after the fit."""
    from .replaceme import _Stats, _with_mlp_output, check_foldable, fold_into, solve_lstsq
    from ..models.architectures import get_path

    check_foldable(arch)
    layer = decoder_layers(model, arch)[index]
    first = next(layer.parameters())
    stats = _Stats(model.config.hidden_size, keep_samples=False)
    calls: dict[tuple, tuple] = {}
    rows = sorted(rows)
    for i in range(0, len(rows), batch_size):
        x, y, ids = store.read(rows[i : i + batch_size])
        if ids.shape not in calls:
            calls[ids.shape] = layer_arguments(model, arch, tuple(ids.shape), first.device, first.dtype)[index]
        out, m = _with_mlp_output(layer, arch, x.to(first.device, first.dtype), calls[ids.shape])
        stats.add(m, out - m, y.to(first.device))
    t = solve_lstsq(stats.mtm, stats.mtd, ridge)
    fold_into(get_path(layer, arch.mlp_output), t)
    dd = max(stats.dd, 1e-30)
    return {"tokens": stats.tokens, "ridge": ridge, "error_before": stats.removal_err / dd,
            "error_after": stats.error(t) / dd}


def _rms_normalize(h: torch.Tensor) -> torch.Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


# -- 4. the LM-loss variant ------------------------------------------------------------


def train_in_place(
    model: nn.Module, arch: Architecture, index: int, text: TrainingText, opts: StreamlineOptions,
    *, teacher: nn.Module | None = None, log_path: Path | None = None, progress: bool = True,
    checkpoints: Checkpoints | None = None,
) -> tuple[TrainResult, dict]:
    """Train only layer ``index`` of the pruned ``model`` with the next-token loss, or with KL
    to ``teacher``'s logits when a teacher is given. Every other weight stays frozen."""
    replacement = decoder_layers(model, arch)[index]
    trainable = {id(p) for p in replacement.parameters() if p.requires_grad}
    frozen = [p for p in model.parameters() if id(p) not in trainable and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    losses = [NextTokenLoss()] if teacher is None else [LogitKL()]
    objective = Distillation(model, text.ids, losses, teacher=teacher, arch=arch)
    try:
        return _run(replacement, objective, opts, text, log_path=log_path, progress=progress, checkpoints=checkpoints)
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
    ids: torch.Tensor | TrainingText,
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
    1-5 of the module docstring. ``scores`` (from the calibration text) choose the block;
    ``ids`` is the training text (:func:`training_text`; a plain tensor has its last tenth,
    at most ``opts.val_rows`` rows, held out for validation).

    ``store``: training pairs already collected for this block and text (reused, e.g. to
    train several replacements of one block); by default they are collected into ``work_dir``
    and deleted. ``checkpoints``: where the replacement's training checkpoints (and resumes from).
    """
    opts.validate()
    window = block_window(decoder_parameters(model, arch), replacement_size(model, arch, opts.spec), remove, sparsity)
    start = choose_block(scores, window)
    check_block(opts.spec, start, model.config, arch)
    return replace_and_train(model, arch, ids, start, window, opts, block_cosine=scores.cosine[start][window],
                             work_dir=work_dir, log_path=log_path, progress=progress, batch_size=batch_size,
                             store=store, checkpoints=checkpoints)


def init_layer(opts: StreamlineOptions, start: int, window: int, config, arch: Architecture) -> int:
    """The original layer a decoder-layer replacement starts as: the block's first, or its last
    layer of the slot's attention type (a sliding-window layer cannot become a full one)."""
    if LINEAR_INITS.get(opts.init, opts.init) == "first" or opts.spec.kind not in ("layer", "swiglu"):
        return start
    types = attention_types(config, arch)
    return max(i for i in range(start, start + window) if types[i] == types[start])


def spec_fits_linear(opts: StreamlineOptions) -> bool:
    """Whether ``opts``' replacement has an MLP output projection that the linear init refits."""
    return opts.spec.kind in ("layer", "swiglu") and opts.spec.trainable


def replace_and_train(
    model: nn.Module,
    arch: Architecture,
    ids: torch.Tensor | TrainingText,
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
    """Steps 2-5 for the block ``start .. start+window-1``: collect its pairs on the training
    text ``ids`` (see :func:`streamline`), put the replacement in its first slot, train it."""
    opts.validate()
    check_block(opts.spec, start, model.config, arch)
    linear = opts.init in LINEAR_INITS and spec_fits_linear(opts)
    if linear:
        from .replaceme import check_foldable

        check_foldable(arch)  # before any work
    source = init_layer(opts, start, window, model.config, arch)
    text = ids if isinstance(ids, TrainingText) else TrainingText.split(ids, opts.val_rows)
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
    if store is not None and (store.samples, store.seq_len) != tuple(text.ids.shape):
        raise LayerfoldError("the given training pairs do not match the training text")
    if own_store and spec.trainable and opts.loss in PAIR_LOSSES:
        t = time.perf_counter()
        shape = (text.ids.shape[0], text.ids.shape[1], model.config.hidden_size, opts.pair_dtype)
        if checkpoints is not None and checkpoints.folder:
            # beside the training checkpoints: a killed collection continues where it stopped
            key = {"ids": data_digest(text.ids), "start": start, "window": window, "batch_size": batch_size}
            store = PairStore.reopen(Path(checkpoints.folder) / "pairs", *shape, key=key, resume=checkpoints.resume)
        else:
            store = PairStore(work_dir / "pairs", *shape)
        collect_pairs(model, arch, text.ids, start, window, store, batch_size=batch_size, progress=progress)
        seconds["pairs"] = time.perf_counter() - t

    # a layer-streamed model reads the layer from disk (the pair pass released it)
    replacement = build_replacement(weights.acquire(source), model.config, arch, spec)
    weights.release(source)  # the replacement is a copy; a streamed model drops the original again
    for p in model.parameters():
        p.requires_grad_(False)
    # build_replacement set the replacement's own trainable flags; the rest of the model is frozen
    replace_block(model, arch, start, window, replacement)
    n_layers = len(decoder_layers(model, arch)) + window - 1
    layer_map = LayerMap.replacement(n_layers, start, window, keeps_first=spec.kind == "none")

    result_fit, training = None, {}
    if spec.trainable:
        t = time.perf_counter()
        try:
            if opts.loss in PAIR_LOSSES:
                weights.park_input_embeddings()  # training reads cached pairs: no pass needs them now
                fitted = None
                if linear:
                    t_fit = time.perf_counter()
                    fitted = linear_init(model, arch, start, store, range(text.train), batch_size=opts.batch_size)
                    seconds["linear_init"] = fitted["seconds"] = time.perf_counter() - t_fit
                result_fit, training = train_pairs(model, arch, start, store, text, opts, log_path=log_path,
                                                   progress=progress, checkpoints=checkpoints)
                if fitted is not None:
                    training["linear_init"] = fitted
            else:
                result_fit, training = train_in_place(model, arch, start, text, opts, teacher=teacher,
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
        pair_tokens=store.tokens if store else 0, pair_bytes=pair_bytes, seconds=seconds, training=training,
    )


__all__ = ["LOSSES", "PAIR_LOSSES", "INITS", "DEFAULT_LOSS", "DEFAULT_INIT", "STREAMED_LOSS", "STREAMED_INIT", "REPLACEMENTS", "StreamlineOptions", "StreamlineResult", "TrainingText",
           "training_text", "streamline", "replace_and_train", "block_window", "choose_block", "check_block",
           "init_layer", "linear_init", "collect_pairs", "train_pairs", "train_in_place", "PairRegression"]

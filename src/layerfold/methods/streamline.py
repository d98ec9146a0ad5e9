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
from ..models.architectures import Architecture
from ..models.lazy import layer_weights, materialize, return_freed_memory
from ..models.surgery import decoder_layers, decoder_parameters, replace_block
from ..nn.replacements import REPLACEMENTS, FFNReplacement, ReplacementSpec, build_replacement, parameter_count
from ..train.fit import FitResult, TrainConfig, fit
from . import pruning

LOSSES = ("mse", "mse-normed", "lm", "kl")
PAIR_LOSSES = ("mse", "mse-normed")  # trained on the cached (input, output) pairs


@dataclass
class StreamlineOptions:
    """What replaces the block and how it is trained."""

    replacement: str = "layer"  # layer | ffn | swiglu | none
    # mse: on cached pairs (the paper); mse-normed: the same after RMS-normalising each token's
    # vector, so a few huge residual dimensions do not dominate; lm: next-token loss in place;
    # kl: KL to the original's logits
    loss: str = "mse"
    ffn_width: int | None = None  # ffn: hidden width (None: the model's intermediate size)
    ffn_activation: str = "gelu"
    epochs: float = 1.0
    train_tokens: int | None = None  # cap on tokens trained on (overrides epochs)
    batch_size: int = 4  # sequences per optimiser step
    val_fraction: float = 0.1
    pair_dtype: str = "bf16"  # storage of the cached pairs: bf16, fp16 or fp32
    pairs_dir: str | None = None  # where pairs are written (default: beside the output; deleted after)
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)

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
        if self.batch_size < 1:
            raise LayerfoldError(f"--train-batch-size must be at least 1 (got {self.batch_size})")
        if self.train_tokens is not None and self.train_tokens < 1:
            raise LayerfoldError(f"--train-tokens must be positive (got {self.train_tokens})")


@dataclass
class StreamlineResult:
    start: int
    window: int  # layers in the replaced block
    removed: list[int]  # original indices of the layers that are gone (the block minus its slot)
    layer_map: list[int | None]
    replacement_params: int
    block_cosine: float
    fit: FitResult | None
    pair_tokens: int = 0
    pair_bytes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


# -- 1. the block ----------------------------------------------------------------------


def replacement_size(model: nn.Module, arch: Architecture, spec: ReplacementSpec) -> int:
    """Parameters the replacement adds (as stored), computed without allocating it."""
    first = decoder_layers(model, arch)[0]
    if spec.kind != "ffn":
        return parameter_count(first)  # a decoder layer, attention zeros included for swiglu
    cfg = model.config
    with torch.device("meta"):
        ffn = FFNReplacement(cfg.hidden_size, spec.ffn_width or cfg.intermediate_size, spec.ffn_activation)
    return parameter_count(ffn)


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


def _shuffled_batches(rows: list[int], batch_size: int, seed: int):
    """Endless epochs of shuffled batches of rows."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(rows), generator=g).tolist()
        for i in range(0, len(order), batch_size):
            yield sorted(rows[j] for j in order[i : i + batch_size])


def _total_steps(n_train_rows: int, seq_len: int, opts: StreamlineOptions) -> int:
    if opts.train_tokens is not None:
        return max(1, math.ceil(opts.train_tokens / (opts.batch_size * seq_len)))
    return max(1, math.ceil(opts.epochs * math.ceil(n_train_rows / opts.batch_size)))


# -- 3. MSE on cached pairs ------------------------------------------------------------


def train_mse(
    model: nn.Module, arch: Architecture, index: int, store: PairStore, opts: StreamlineOptions,
    *, log_path: Path | None = None, progress: bool = True,
) -> FitResult:
    """Train the module at layer ``index`` of ``model`` to map stored block inputs to outputs."""
    replacement = decoder_layers(model, arch)[index]
    device = next(replacement.parameters()).device
    dtype = next(replacement.parameters()).dtype
    train_rows, val_rows = split_rows(store.samples, opts.val_fraction, opts.seed)
    calls: dict[tuple, tuple] = {}

    def loss_of(rows) -> torch.Tensor:
        x, y, ids = store.read(rows)
        # the layer's own arguments (causal mask, rotary cos/sin, position ids), as the model gives
        # them; they depend on the batch shape only, so they are made once per shape
        if ids.shape not in calls:
            calls[ids.shape] = layer_arguments(model, arch, tuple(ids.shape), device, dtype)[index]
        call = calls[ids.shape]
        pred = run_layer(replacement, x.to(device, dtype), call).float()
        y = y.to(device)
        if opts.loss == "mse-normed":
            pred, y = _rms_normalize(pred), _rms_normalize(y)
        return F.mse_loss(pred, y)

    @torch.no_grad()
    def val_loss() -> float:
        total = 0.0
        for i in range(0, len(val_rows), opts.batch_size):
            rows = val_rows[i : i + opts.batch_size]
            total += loss_of(rows).item() * len(rows)
        return total / len(val_rows)

    steps = _total_steps(len(train_rows), store.seq_len, opts)
    return fit(replacement, loss_of, val_loss, _shuffled_batches(train_rows, opts.batch_size, opts.seed),
               steps, opts.train, log_path=log_path, progress=progress, desc="training replacement (mse)",
               best_state_dir=store.folder)  # beside the pairs, on disk


def _rms_normalize(h: torch.Tensor) -> torch.Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


# -- 4. the LM-loss variant ------------------------------------------------------------


def train_in_place(
    model: nn.Module, arch: Architecture, index: int, ids: torch.Tensor, opts: StreamlineOptions,
    *, teacher: nn.Module | None = None, log_path: Path | None = None, progress: bool = True,
) -> FitResult:
    """Train only layer ``index`` of the pruned ``model`` with the next-token loss, or with KL
    to ``teacher``'s logits when a teacher is given. Every other weight stays frozen."""
    replacement = decoder_layers(model, arch)[index]
    trainable = {id(p) for p in replacement.parameters() if p.requires_grad}
    frozen = [p for p in model.parameters() if id(p) not in trainable and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    device = next(model.parameters()).device
    train_rows, val_rows = split_rows(ids.shape[0], opts.val_fraction, opts.seed)

    def loss_of(rows) -> torch.Tensor:
        batch = ids[rows].to(device)
        if teacher is None:
            return model(input_ids=batch, labels=batch, use_cache=False).loss
        logits = model(input_ids=batch, use_cache=False).logits.float()
        with torch.no_grad():
            target = teacher(input_ids=batch, use_cache=False).logits.float()
        return F.kl_div(F.log_softmax(logits, -1).flatten(0, 1), F.log_softmax(target, -1).flatten(0, 1),
                        log_target=True, reduction="batchmean")

    @torch.no_grad()
    def val_loss() -> float:
        total = 0.0
        for i in range(0, len(val_rows), opts.batch_size):
            rows = val_rows[i : i + opts.batch_size]
            total += loss_of(rows).item() * len(rows)
        return total / len(val_rows)

    steps = _total_steps(len(train_rows), ids.shape[1], opts)
    try:
        return fit(replacement, loss_of, val_loss, _shuffled_batches(train_rows, opts.batch_size, opts.seed),
                   steps, opts.train, log_path=log_path, progress=progress,
                   desc=f"training replacement ({opts.loss})")
    finally:
        for p in frozen:
            p.requires_grad_(True)


# -- the whole method ------------------------------------------------------------------


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
) -> StreamlineResult:
    """Replace the most redundant block of ``model`` (in place) by a trained replacement.

    ``store``: training pairs already collected for this block (reused, e.g. to train several
    replacements of one block); by default they are collected into ``work_dir`` and deleted.
    """
    opts.validate()
    if opts.loss != "mse" and opts.replacement == "none":
        raise LayerfoldError("--replacement none trains nothing; drop --loss or choose a replacement")
    seconds: dict[str, float] = {}
    spec = opts.spec
    r_params = replacement_size(model, arch, spec)
    window = block_window(decoder_parameters(model, arch), r_params, remove, sparsity)
    start = choose_block(scores, window)
    if spec.kind == "ffn" and start == 0:
        # the KV cache reads the sequence length from layer 0, which a plain FFN never fills
        raise LayerfoldError("the chosen block starts at layer 0, where a plain FFN breaks generation "
                             "with the KV cache; use --replacement swiglu or layer")
    removed = list(range(start + 1, start + window)) if window > 1 else []
    similarity = scores.cosine[start][window]

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
    layer_map = replace_block(model, arch, start, window, replacement)
    if spec.kind == "none":
        layer_map[start] = start  # the untouched first layer of the block

    result_fit = None
    if spec.trainable:
        t = time.perf_counter()
        try:
            if opts.loss in PAIR_LOSSES:
                weights.park_input_embeddings()  # training reads cached pairs: no pass needs them now
                result_fit = train_mse(model, arch, start, store, opts, log_path=log_path, progress=progress)
            else:
                result_fit = train_in_place(model, arch, start, ids, opts, teacher=teacher,
                                            log_path=log_path, progress=progress)
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
        replacement_params=parameter_count(decoder_layers(model, arch)[start]),
        block_cosine=similarity, fit=result_fit,
        pair_tokens=store.tokens if store else 0, pair_bytes=pair_bytes, seconds=seconds,
    )


__all__ = ["LOSSES", "REPLACEMENTS", "StreamlineOptions", "StreamlineResult", "streamline", "block_window",
           "choose_block", "collect_pairs", "train_mse", "train_in_place"]

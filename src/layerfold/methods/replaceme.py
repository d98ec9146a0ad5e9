"""ReplaceMe (arXiv 2505.02819): a removed block becomes a linear map folded into the layer before it.

For each run of removed layers ``first..last``, let ``i = first - 1`` be the kept layer before
it. On calibration tokens, layer ``i``'s output is ``Y + M``: ``M`` the output of its MLP (what
its down projection writes into the residual stream) and ``Y`` the rest (its input plus the
attention branch). Without the block, the next kept layer should still see ``h_target``, the
hidden state the block would have produced. ReplaceMe finds one matrix ``T`` with

    M T + Y ~ h_target

1. least squares (the paper's ``lstsq``): T = (M^T M + alpha I)^-1 M^T (h_target - Y), in
   float64. M^T M and M^T (h_target - Y) are summed token by token in the layer pass, so the
   memory does not grow with the calibration text;
2. or the cosine variant: Adam on 1 - cos(M T, h_target - Y) from T = I (``cosine``), or on
   1 - cos(M T + Y, h_target), the whole output's direction (``cosine-output``);
3. fold T into layer i's down projection: the branch's output x W^T becomes x W^T T, so
   W <- T^T W (and a bias b <- b T). The block is then removed: the model keeps its stock
   architecture and gains no parameter.

Runs are repaired in order, each on the hidden states of the model with the earlier runs
already removed and folded (so a later run also corrects what the earlier ones left), and
``h_target`` is by default the ORIGINAL model's hidden state after the run (``--linear-target
original``); ``block`` takes the block's output on the repaired model's own states instead
(each block fitted alone, as the paper describes it). A run that starts at layer 0 has no
layer before it to fold into and is removed unrepaired. Post-norm families (a norm after the
MLP) are refused: the fold would not be exact there.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import LayerfoldError
from ..importance.layer_pass import batches, capture_layer_inputs, run_layer
from ..models.architectures import Architecture, get_path
from ..models.lazy import layer_weights

OBJECTIVES = ("lstsq", "cosine", "cosine-output")
TARGETS = ("original", "block")


@dataclass
class LinearRepairOptions:
    """ReplaceMe's linear repair: how the map that stands in for each removed block is fitted."""

    objective: str = field(default="lstsq", metadata={
        "help": "lstsq: closed-form least squares (the paper's default); cosine: Adam on 1-cos(M T, h_target - Y) "
                "from T = I (the paper's cosine variant); cosine-output: Adam on 1-cos(M T + Y, h_target)",
        "choices": OBJECTIVES})
    target: str = field(default="original", metadata={
        "help": "original: the map reproduces the original model's hidden state after the block (it also corrects "
                "what earlier removals left); block: the block's output on the repaired model's own states",
        "choices": TARGETS})
    ridge: float = field(default=1e-4, metadata={
        "help": "lstsq: ridge alpha, relative to the mean diagonal of M^T M; it pulls the map towards "
                "the identity (plain removal)"})
    steps: int = field(default=300, metadata={"help": "cosine objectives: Adam steps"})
    lr: float = field(default=1e-3, metadata={"help": "cosine objectives: Adam learning rate"})
    batch_tokens: int = field(default=1024, metadata={"help": "cosine objectives: tokens per Adam step"})
    seed: int = field(default=0, metadata={"help": "cosine objectives: seed of the token batches"})

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise LayerfoldError(f"unknown --linear-objective {self.objective!r}; choose from {', '.join(OBJECTIVES)}")
        if self.target not in TARGETS:
            raise LayerfoldError(f"unknown --linear-target {self.target!r}; choose from {', '.join(TARGETS)}")
        if not (self.ridge >= 0 and math.isfinite(self.ridge)):
            raise LayerfoldError(f"--linear-ridge must be a finite number >= 0 (got {self.ridge:g})")
        if self.objective != "lstsq" and (self.steps < 1 or self.batch_tokens < 1 or not self.lr > 0):
            raise LayerfoldError("--linear-steps, --linear-batch-tokens and --linear-lr must be positive")


def check_foldable(arch: Architecture) -> None:
    """The linear repair folds into the MLP's output projection; refuse where that is not exact."""
    if arch.mlp_output is None:
        norm = arch.residual_branches[-1]
        raise LayerfoldError(
            f"the linear repair cannot be folded exactly into a {arch.model_type} model: its MLP output passes "
            f"through a norm ({norm}) before it joins the residual stream, so a linear map of that output is no "
            "change of the down projection; use --repair none or replacement")


def removed_runs(removed: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive layers, as (first, last)."""
    runs: list[tuple[int, int]] = []
    for l in sorted(removed):
        if runs and l == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], l)
        else:
            runs.append((l, l))
    return runs


# -- the statistics --------------------------------------------------------------------------


class _Stats:
    """Sums over tokens for one run: M^T M, M^T D (D = h_target - Y), |D|^2, |M - D|^2; and, for
    the cosine objectives, the samples themselves."""

    def __init__(self, d: int, keep_samples: bool):
        self.mtm = torch.zeros(d, d, dtype=torch.float64)
        self.mtd = torch.zeros(d, d, dtype=torch.float64)
        self.dd = 0.0
        self.removal_err = 0.0  # |M - D|^2: the error of removing the block with T = I
        self.tokens = 0
        self.samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = [] if keep_samples else None

    def add(self, m: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> None:
        m64 = m.reshape(-1, m.shape[-1]).double().cpu()
        d64 = (target.double() - y.double()).reshape(-1, m.shape[-1]).cpu()
        self.mtm += m64.T @ m64
        self.mtd += m64.T @ d64
        self.dd += float((d64 * d64).sum())
        self.removal_err += float(((m64 - d64) ** 2).sum())
        self.tokens += m64.shape[0]
        if self.samples is not None:
            flat = lambda t: t.reshape(-1, t.shape[-1]).float().cpu()  # noqa: E731
            self.samples.append((flat(m), flat(y), flat(target)))

    def error(self, t: torch.Tensor) -> float:
        """|M T - D|^2 from the sums: tr(T^T MtM T) - 2 tr(T^T MtD) + |D|^2."""
        t = t.double()
        return float((t * (self.mtm @ t)).sum() - 2 * (t * self.mtd).sum() + self.dd)


def solve_lstsq(mtm: torch.Tensor, mtd: torch.Tensor, ridge: float) -> torch.Tensor:
    """T = argmin |M T - D|^2 + alpha |T - I|^2 in float64, alpha = ridge x the mean diagonal of M^T M.

    The ridge pulls T towards the identity, plain removal, rather than towards zero: directions
    of the MLP output that the calibration tokens never excite keep passing through unchanged.
    With fewer tokens than the hidden size (a quick run), a pull towards zero would erase those
    directions in the folded down projection, for every input the model later sees.
    """
    d = mtm.shape[0]
    alpha = ridge * float(mtm.diagonal().mean())
    eye = torch.eye(d, dtype=torch.float64)
    a = mtm + alpha * eye
    # solve for the change from the identity: (M^T M + alpha I)(T - I) = M^T D - M^T M
    rhs = mtd - mtm
    if alpha > 0:
        return eye + torch.linalg.solve(a, rhs)
    # no ridge: M^T M may be singular; gelsd gives the change of minimum norm
    return eye + torch.linalg.lstsq(a, rhs, driver="gelsd").solution


def fit_cosine(samples, objective: str, opts: LinearRepairOptions, progress: bool = True) -> torch.Tensor:
    """T by Adam on the cosine distance, from T = I (ReplaceMe's cosine variant)."""
    from tqdm.auto import tqdm

    m = torch.cat([s[0] for s in samples])
    y = torch.cat([s[1] for s in samples])
    h = torch.cat([s[2] for s in samples])
    d = m.shape[1]
    t = torch.eye(d, requires_grad=True)
    optimizer = torch.optim.Adam([t], lr=opts.lr)
    gen = torch.Generator().manual_seed(opts.seed)
    n = m.shape[0]
    with torch.enable_grad():
        for _ in tqdm(range(opts.steps), desc="fitting the linear map (cosine)", disable=not progress, leave=False):
            idx = torch.randint(0, n, (min(opts.batch_tokens, n),), generator=gen)
            pred = m[idx] @ t
            if objective == "cosine":
                goal = h[idx] - y[idx]
            else:
                pred, goal = pred + y[idx], h[idx]
            loss = 1 - nn.functional.cosine_similarity(pred, goal, dim=-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return t.detach().double()


@torch.no_grad()
def fold_into(linear: nn.Linear, t: torch.Tensor) -> None:
    """Make ``linear``'s output x W^T + b become (x W^T + b) T: W <- T^T W, b <- b T."""
    w = linear.weight
    linear.weight.copy_((t.T.to(torch.float64) @ w.double()).to(w.dtype))
    if linear.bias is not None:
        linear.bias.copy_((linear.bias.double() @ t.double()).to(linear.bias.dtype))


def _with_mlp_output(layer: nn.Module, arch: Architecture, hidden, call) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output and its MLP branch's output M (read at ``arch.mlp_output``)."""
    seen = []
    handle = get_path(layer, arch.mlp_output).register_forward_hook(lambda mod, inp, out: seen.append(out))
    try:
        out = run_layer(layer, hidden, call)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise RuntimeError(f"{arch.mlp_output} ran {len(seen)} times in one layer call")
    return out, seen[0]


# -- the repair ------------------------------------------------------------------------------


@dataclass
class LinearRepairResult:
    """What the repair did, run by run (``layerfold.json`` records it)."""

    runs: list[dict]  # {"removed": [first, last], "into": i, "tokens", "removal_error", "fit_error"}
    unrepaired: list[list[int]]  # runs starting at layer 0: removed as they are
    options: dict
    passes: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def linear_repair(model: nn.Module, arch: Architecture, ids: torch.Tensor, removed: list[int],
                  opts: LinearRepairOptions, *, batch_size: int = 8, max_memory: int = 2 * 2**30,
                  progress: bool = True) -> LinearRepairResult:
    """Fit one map per run of ``removed`` and fold it into the kept layer before the run.

    The model keeps all its layers (the caller removes ``removed`` afterwards); only the down
    projections of the layers before the runs change. Errors are relative: |M T - D|^2 / |D|^2
    with the fitted T (``fit_error``) and with T = I, plain removal (``removal_error``).
    """
    from tqdm.auto import tqdm

    check_foldable(arch)
    opts.validate()
    t0 = time.perf_counter()
    gone = set(removed)
    runs = removed_runs(removed)
    todo = [r for r in runs if r[0] > 0]
    unrepaired = [list(r) for r in runs if r[0] == 0]
    weights = layer_weights(model, arch)
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    hidden = model.config.hidden_size
    all_batches = list(batches(ids, batch_size))
    rows = min(batch_size, ids.shape[0])
    # per batch: three streams (original, repaired, the block on the repaired states), M and Y
    per_batch = rows * ids.shape[1] * hidden * 4 * 5
    per_chunk = max(1, max_memory // max(per_batch, 1))
    chunks = [all_batches[i : i + per_chunk] for i in range(0, len(all_batches), per_chunk)]
    # with every batch in one chunk, each run is solved when the pass reaches its end and the
    # repaired states are corrected at once: one pass for all runs. Otherwise, one pass per run.
    one_pass = len(chunks) == 1
    done: list[dict] = []
    unfolded: dict[int, tuple] = {}  # folded layer -> its MLP output's original (weight, bias)
    passes = 0
    depth = [max((r[1] for r in todo), default=-1) + 1] if one_pass else [r[1] + 1 for r in todo]
    bar = tqdm(total=sum(depth) * len(all_batches), desc="linear repair (ReplaceMe)", unit="layer", disable=not progress)
    try:
        while todo:
            this = todo if one_pass else todo[:1]
            passes += 1
            stats = {r: _Stats(hidden, keep_samples=opts.objective != "lstsq") for r in this}
            before = {r[0] - 1: r for r in this}  # kept layer -> the run after it
            ending = {r[1]: r for r in this}
            inside = {l: r for r in this for l in range(r[0], r[1] + 1)}
            stop = max(r[1] for r in this) + 1
            for chunk in chunks:
                inputs = [capture_layer_inputs(model, arch, b.to(device)) for b in chunk]
                orig = [x.hidden for x in inputs]  # the original model's states
                rep = list(orig)  # the repaired model's states (removed layers skipped)
                blk = [None] * len(inputs)  # the block's output on the repaired states ('block' target)
                parts: dict[tuple[int, int], list] = {r: [None] * len(inputs) for r in this}
                for l in range(stop):
                    layer = weights.acquire(l)
                    for b, x in enumerate(inputs):
                        call = x.calls[l]
                        same = rep[b] is orig[b]
                        if l in before:
                            out, m = _with_mlp_output(layer, arch, rep[b], call)
                            parts[before[l]][b] = (m, out - m)
                            o = out if same else run_layer(layer, orig[b], call)
                            rep[b] = blk[b] = out
                            orig[b] = o
                        else:
                            with _unfolded(layer, arch, unfolded.get(l)):  # the original stream: the original weights
                                o = run_layer(layer, orig[b], call)
                            if l in inside and opts.target == "block":
                                blk[b] = run_layer(layer, blk[b], call)
                            if l not in gone:
                                rep[b] = o if same and l not in unfolded else run_layer(layer, rep[b], call)
                            orig[b] = o
                        if l in ending:
                            r = ending[l]
                            m, y = parts[r][b]
                            stats[r].add(m, y, orig[b] if opts.target == "original" else blk[b])
                        bar.update(1)
                    if one_pass and l in ending:  # solve now and correct the repaired states
                        r = ending[l]
                        t = _solve(stats[r], opts, progress)
                        done.append(_fold(model, arch, weights, r, t, stats[r]))
                        for b in range(len(inputs)):
                            m, y = parts[r][b]
                            rep[b] = (y.double() + m.double() @ t).to(y.dtype)
                        parts[r] = []
                    weights.release(l)  # a folded layer was kept in memory and stays
            if not one_pass:  # later passes run the original stream through this layer's original weights
                r = this[0]
                unfolded[r[0] - 1] = _weights_of(get_path(weights.acquire(r[0] - 1), arch.mlp_output))
                done.append(_fold(model, arch, weights, r, _solve(stats[r], opts, progress), stats[r]))
            todo = [r for r in todo if r not in this]
    finally:
        bar.close()
    return LinearRepairResult(runs=done, unrepaired=unrepaired, options=asdict(opts), passes=passes,
                              seconds=time.perf_counter() - t0)


def _weights_of(linear: nn.Linear) -> tuple:
    return (linear.weight.detach().clone(), None if linear.bias is None else linear.bias.detach().clone())


@contextmanager
def _unfolded(layer: nn.Module, arch: Architecture, saved: tuple | None):
    """Within the block, ``layer``'s MLP output has its weights from before the fold."""
    if saved is None:
        yield
        return
    linear = get_path(layer, arch.mlp_output)
    current = (linear.weight, linear.bias)
    linear.weight = nn.Parameter(saved[0], requires_grad=False)
    if saved[1] is not None:
        linear.bias = nn.Parameter(saved[1], requires_grad=False)
    try:
        yield
    finally:
        linear.weight = current[0]
        if saved[1] is not None:
            linear.bias = current[1]


def _solve(stats: _Stats, opts: LinearRepairOptions, progress: bool) -> torch.Tensor:
    if opts.objective == "lstsq":
        return solve_lstsq(stats.mtm, stats.mtd, opts.ridge)
    return fit_cosine(stats.samples, opts.objective, opts, progress)


def _fold(model, arch, weights, run: tuple[int, int], t: torch.Tensor, stats: _Stats) -> dict:
    into = run[0] - 1
    layer = weights.acquire(into)
    fold_into(get_path(layer, arch.mlp_output), t)
    weights.keep(into)  # changed: stays in memory, saved as it is now
    dd = max(stats.dd, 1e-30)
    return {"removed": list(run), "into": into, "tokens": stats.tokens,
            "removal_error": stats.removal_err / dd, "fit_error": stats.error(t) / dd}

"""Selections that search with forward passes: SLEB, iterative Block Influence, LaCo.

They share :class:`LayerStack`, the decoder as layers that can be run in any subset on fixed
calibration rows (the arguments each layer gets, masks and rotary tables, recorded once):

- **SLEB** (arXiv 2402.09025): greedy. At each of n steps, try removing each remaining layer
  (the first and the last layer stay) and keep the removal whose model has the lowest
  calibration loss: next-token NLL (the paper's perplexity) or KL to the original's logits.
  The states entering each remaining layer are computed once per step, so a candidate runs
  only the layers after it.
- **Iterative Block Influence**: ShortGPT's BI, 1 - mean cos(input, output) of a layer, scored
  again on the pruned model after each removal; the lowest goes.
- **LaCo** (arXiv 2402.11187, Algorithm 1): from the top of the model down, merge the next
  ``merge - 1`` layers of the CURRENT (already merged) model into its layer l,
  theta_l + sum_k (theta_{l+k} - theta_l) on the attention and MLP matrices (norms not merged),
  every difference within a step taken to the un-updated theta_l (the official notebook
  subtracts the weights it is updating, which collapses to the last layer's). A layer merged
  in an earlier step enters a later one with its merged weights, as the paper's M* does. Accept
  when the cosine between the merged model's and the ORIGINAL model's last-layer outputs stays
  above the threshold, then move ``interval`` layers down, else one. For an exact budget the
  scan stops at n removed layers; a scan that accepts nothing lowers the threshold by 0.05
  (recorded). The ``merge`` repair replays LaCo's accepted steps in order, and for any other
  selection merges each run into the kept layer before it (one step per run).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LayerfoldError
from ..importance.layer_pass import batches, capture_layer_inputs, run_layer
from ..models.architectures import Architecture, get_path
from ..models.surgery import decoder_layers

SEARCH_LOSSES = ("nll", "kl")


@dataclass
class SearchOptions:
    """Selections that search with forward passes (sleb, iterative-bi, laco)."""

    rows: int = field(default=4, metadata={
        "help": "calibration rows that sleb and laco score each candidate on (iterative-bi uses all)",
        "flag": "--search-rows"})
    loss: str = field(default="nll", metadata={
        "help": "sleb: next-token NLL on the calibration rows (the paper) or KL to the original's logits",
        "choices": SEARCH_LOSSES, "flag": "--sleb-loss"})
    laco_merge: int = field(default=3, metadata={
        "help": "laco: layers merged into one per accepted step (the base and the next merge-1)", "flag": "--laco-merge"})
    laco_interval: int = field(default=2, metadata={
        "help": "laco: layers to move down after an accepted merge", "flag": "--laco-interval"})
    laco_threshold: float = field(default=0.9, metadata={
        "help": "laco: accept a merge while the cosine of last-layer outputs to the original stays above this",
        "flag": "--laco-threshold"})

    def validate(self) -> None:
        if self.rows < 1:
            raise LayerfoldError(f"--search-rows must be at least 1 (got {self.rows})")
        if self.loss not in SEARCH_LOSSES:
            raise LayerfoldError(f"unknown --sleb-loss {self.loss!r}; choose from {', '.join(SEARCH_LOSSES)}")
        if self.laco_merge < 2 or self.laco_interval < 1:
            raise LayerfoldError("--laco-merge must be at least 2 and --laco-interval at least 1")
        if not -1 <= self.laco_threshold <= 1:
            raise LayerfoldError(f"--laco-threshold is a cosine, between -1 and 1 (got {self.laco_threshold:g})")


# -- the decoder as separate layers ------------------------------------------------------------


class LayerStack:
    """Run any subset of a model's decoder layers (in order) on fixed rows; the model must be in memory."""

    def __init__(self, model: nn.Module, arch: Architecture, ids: torch.Tensor, batch_size: int = 4):
        from ..models.loading import input_device

        self.model, self.arch = model, arch
        self.layers = list(decoder_layers(model, arch))
        self.norm = get_path(model, arch.final_norm)
        device = input_device(model)
        self.rows = [b.to(device) for b in batches(ids, batch_size)]
        self.inputs = [capture_layer_inputs(model, arch, b) for b in self.rows]

    def run(self, kept: list[int], b: int, h: torch.Tensor | None = None, start: int = 0,
            override: dict[int, nn.Module] | None = None, record: list | None = None) -> torch.Tensor:
        """Batch ``b`` through layers ``kept[start:]`` from ``h`` (default: the embeddings); the raw
        output of the last one. ``record`` receives the state entering each of them."""
        x = self.inputs[b]
        h = x.hidden if h is None else h
        for l in kept[start:]:
            if record is not None:
                record.append(h)
            h = run_layer((override or {}).get(l, self.layers[l]), h, x.calls[l])
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        from ..eval.scoring import output_logits

        return output_logits(self.model, self.norm(h))

    def loss(self, h: torch.Tensor, b: int, kind: str, reference: list[torch.Tensor] | None = None) -> float:
        """Summed next-token NLL, or KL(original || model) over every position, of batch ``b``."""
        logits = self.logits(h)
        if kind == "nll":
            ids = self.rows[b]
            return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        from ..eval.heldout import kl_terms

        return float(kl_terms(logits, reference[b].to(logits.device)).sum())

    def count(self, kind: str) -> int:
        return sum(r.shape[0] * (r.shape[1] - (1 if kind == "nll" else 0)) for r in self.rows)


def _reference(stack: LayerStack, kept: list[int]) -> list[torch.Tensor]:
    return [F.log_softmax(stack.logits(stack.run(kept, b)), dim=-1).to(torch.float16) for b in range(len(stack.rows))]


def _check(n: int, num_layers: int, low: int = 1) -> None:
    if not low <= n < num_layers:
        raise LayerfoldError(f"cannot remove {n} of {num_layers} layers (choose {low} to {num_layers - 1})")


# -- SLEB --------------------------------------------------------------------------------------


@torch.no_grad()
def sleb(model: nn.Module, arch: Architecture, ids: torch.Tensor, n: int, opts: SearchOptions,
         *, progress: bool = True) -> dict:
    """SLEB's greedy removal (see the module docstring); returns the removed layers and each step."""
    from tqdm.auto import tqdm

    stack = LayerStack(model, arch, ids[: opts.rows])
    L = len(stack.layers)
    _check(n, L - 2 + 1)  # the first and the last layer stay
    kept = list(range(L))
    reference = _reference(stack, kept) if opts.loss == "kl" else None
    tokens = stack.count(opts.loss)
    steps = []
    bar = tqdm(total=sum(L - 2 - k for k in range(n)), desc="SLEB: greedy removal", unit="candidate",
               disable=not progress)
    try:
        for _ in range(n):
            entering = []
            for b in range(len(stack.rows)):
                rec: list = []
                stack.run(kept, b, record=rec)
                entering.append(rec)
            best = None
            for p, layer in enumerate(kept):
                if layer in (0, L - 1):
                    continue
                rest = kept[:p] + kept[p + 1:]
                total = 0.0
                for b in range(len(stack.rows)):  # skip `layer`: start from the state entering it
                    h = stack.run(rest, b, h=entering[b][p], start=p)
                    total += stack.loss(h, b, opts.loss, reference)
                loss = total / tokens
                if best is None or loss < best[1]:
                    best = (layer, loss)
                bar.update(1)
            kept.remove(best[0])
            steps.append({"removed": best[0], opts.loss: best[1]})
    finally:
        bar.close()
    return {"selection": "sleb", "removed": sorted(set(range(L)) - set(kept)), "steps": steps,
            "loss": opts.loss, "rows": len(ids[: opts.rows]), "tokens": tokens}


# -- iterative Block Influence -----------------------------------------------------------------


@torch.no_grad()
def iterative_bi(model: nn.Module, arch: Architecture, ids: torch.Tensor, n: int, opts: SearchOptions,
                 *, progress: bool = True, batch_size: int = 8) -> dict:
    """Remove the lowest-BI layer, score BI again on the pruned model, n times."""
    from tqdm.auto import tqdm

    stack = LayerStack(model, arch, ids, batch_size=batch_size)
    L = len(stack.layers)
    _check(n, L)
    kept = list(range(L))
    steps = []
    for _ in tqdm(range(n), desc="iterative Block Influence", disable=not progress):
        cos_sum = torch.zeros(len(kept), dtype=torch.float64)
        count = 0
        for b in range(len(stack.rows)):
            rec: list = []
            out = stack.run(kept, b, record=rec)
            states = rec + [out]
            for p in range(len(kept)):
                cos_sum[p] += F.cosine_similarity(states[p].float(), states[p + 1].float(), dim=-1).double().sum()
            count += states[0].shape[0] * states[0].shape[1]
        bi = [1 - float(c) / count for c in cos_sum]
        p = min(range(len(kept)), key=lambda i: (bi[i], kept[i]))
        steps.append({"removed": kept[p], "bi": bi[p], "scores": dict(zip(kept, bi))})
        kept.pop(p)
    return {"selection": "iterative-bi", "removed": sorted(set(range(L)) - set(kept)),
            "steps": [{k: v for k, v in s.items() if k != "scores"} for s in steps],
            "first_scores": steps[0]["scores"] if steps else {}}


# -- LaCo: merging layers ----------------------------------------------------------------------


def _merged_matrices(layer: nn.Module) -> list[str]:
    """The attention and MLP parameters LaCo merges: every linear layer's weight and bias."""
    names = []
    for mod_name, mod in layer.named_modules():
        if isinstance(mod, nn.Linear):
            names += [f"{mod_name}.{p}" for p, _ in mod.named_parameters(recurse=False)]
    return names


@torch.no_grad()
def merged_layer(base: nn.Module, others: list[nn.Module]) -> nn.Module:
    """A copy of ``base`` with theta_base + sum_k (theta_k - theta_base) on its linear layers
    (always from the original weights: each difference is to the unchanged base)."""
    merged = copy.deepcopy(base)
    params = dict(merged.named_parameters())
    originals = dict(base.named_parameters())
    for name in _merged_matrices(base):
        theta = originals[name]
        delta = sum(dict(o.named_parameters())[name].double() - theta.double() for o in others)
        params[name].copy_((theta.double() + delta).to(theta.dtype))
    return merged


def runs_with_bases(removed: list[int]) -> list[tuple[int, list[int]]]:
    """(base, absorbed layers) for each run of removed layers: the kept layer before it absorbs it."""
    from .replaceme import removed_runs

    return [(a - 1, list(range(a, b + 1))) for a, b in removed_runs(removed) if a > 0]


def merge_steps(removed: list[int], steps: list[dict] | None = None) -> list[dict]:
    """The merges that remove ``removed``, in order: LaCo's accepted ``steps`` (each
    ``{"base", "merged"}`` in original layer numbers, a later step seeing the earlier ones'
    results), else one step per run of removed layers into the kept layer before it."""
    if steps is None:
        return [{"base": b, "merged": absorbed} for b, absorbed in runs_with_bases(removed)]
    gone = [j for s in steps for j in s["merged"]]
    if sorted(gone) != sorted(removed) or len(set(gone)) != len(gone):
        raise LayerfoldError(f"the merge steps remove {sorted(gone)}, not the selected {sorted(removed)}")
    return [{"base": s["base"], "merged": list(s["merged"])} for s in steps]


@torch.no_grad()
def merge_repair(model: nn.Module, arch: Architecture, removed: list[int], steps: list[dict] | None = None) -> dict:
    """The ``merge`` repair: the merges of :func:`merge_steps` applied in order, in place (the
    caller removes ``removed`` afterwards); a base merged earlier is merged again with its new
    weights. Runs starting at layer 0 stay unmerged."""
    from ..models.lazy import layer_weights

    weights = layer_weights(model, arch)
    layers = decoder_layers(model, arch)
    done = []
    for step in merge_steps(removed, steps):
        base, absorbed = step["base"], step["merged"]
        others = [copy.deepcopy(weights.acquire(j)) for j in absorbed]
        for j in absorbed:
            weights.release(j)
        new = merged_layer(weights.acquire(base), others)
        params = dict(layers[base].named_parameters())
        for name, p in new.named_parameters():
            params[name].copy_(p)
        weights.keep(base)
        done.append({"into": base, "merged": absorbed})
    from .replaceme import removed_runs

    return {"merged": done, "unmerged": [[a, b] for a, b in removed_runs(removed) if a == 0]}


@torch.no_grad()
def laco(model: nn.Module, arch: Architecture, ids: torch.Tensor, n: int, opts: SearchOptions,
         *, progress: bool = True) -> dict:
    """LaCo's top-down merging scan with its cosine acceptance test, to exactly n removed layers."""
    from tqdm.auto import tqdm

    stack = LayerStack(model, arch, ids[: opts.rows])
    L = len(stack.layers)
    _check(n, L - 1)
    original = [stack.run(list(range(L)), b) for b in range(len(stack.rows))]
    removed: set[int] = set()
    threshold = opts.laco_threshold
    steps = []
    bar = tqdm(total=n, desc="LaCo: merging layers", unit="layer", disable=not progress)

    current: dict[int, nn.Module] = {}  # the merged layers of the model so far (M*), by base

    def layer(j: int) -> nn.Module:
        return current.get(j, stack.layers[j])

    def similarity(kept: list[int], override: dict[int, nn.Module]) -> float:
        cos = count = 0.0
        for b in range(len(stack.rows)):
            out = stack.run(kept, b, override=override)
            cos += float(F.cosine_similarity(out.float(), original[b].float(), dim=-1).double().sum())
            count += out.shape[0] * out.shape[1]
        return cos / count

    try:
        while len(removed) < n:
            accepted = False
            kept = [l for l in range(L) if l not in removed]
            p = len(kept) - opts.laco_merge  # position of the base in the kept layers, from the top
            while p >= 1 and len(removed) < n:  # layer 0 is never a base; the top layer may be a follower
                take = min(opts.laco_merge - 1, n - len(removed))
                base, followers = kept[p], kept[p + 1: p + 1 + take]
                merged = merged_layer(layer(base), [layer(j) for j in followers])
                override = {j: m for j, m in current.items() if j not in followers} | {base: merged}
                sim = similarity([l for l in kept if l not in followers], override)
                if sim > threshold:
                    removed |= set(followers)
                    current = override
                    steps.append({"base": base, "merged": followers, "cosine": sim, "threshold": threshold})
                    bar.update(take)
                    accepted = True
                    kept = [l for l in range(L) if l not in removed]
                    p = min(p, len(kept) - 1) - opts.laco_interval
                else:
                    p -= 1
            if not accepted:
                threshold -= 0.05
                if threshold < -1:
                    raise LayerfoldError(f"LaCo found no merge to remove {n} layers")
    finally:
        bar.close()
    return {"selection": "laco", "removed": sorted(removed), "steps": steps, "final_threshold": threshold,
            "rows": len(ids[: opts.rows]), "cosine": steps[-1]["cosine"] if steps else math.nan}

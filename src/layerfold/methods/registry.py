"""Methods by name: a selection (which layers go) and a repair (what stands in for them).

    selection   bi, angular, block, last-n, gates,         -> the original layers that go
                sleb, iterative-bi, laco
    repair      none, linear, merge, replacement           -> what takes their place
    method      a named combination, plus FoldGPT's extra steps (sharing, its cure)

A compression is planned first (:func:`make_plan`: from scores and shapes only, exact
parameter counts included) and applied second (:func:`apply_plan`: the model changes). Any
selection composes with any repair that accepts what it chooses: ``replacement`` needs one
block of consecutive layers, so it works after ``block``, ``angular`` or ``last-n`` and refuses
``bi``'s scattered layers; ``linear`` (ReplaceMe) and ``merge`` (LaCo) repair every run of
removed layers. ``--select`` and ``--repair`` override a method's own choice.

To add a selection: a function ``(evidence, num_layers, n) -> sorted layer indices`` and one
``SELECTIONS`` entry. To add a repair: its parameter cost, an apply function, one ``REPAIRS``
entry (and, for options of its own, a dataclass group in ``recipe.CompressOptions``). To add a
method: one ``METHODS`` entry naming both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import LayerfoldError
from ..models.layer_map import LayerMap
from ..models.surgery import count_parameters, remove_layers
from ..schema import parse_fraction
from . import pruning
from .plan import Plan, bytes_per_parameter, delta_parameters, layer_parameters, shared_parameters

if TYPE_CHECKING:
    from ..importance.criteria import LayerScores
    from ..models.architectures import Architecture
    from ..importance.gates import GateResult
    from ..recipe import CompressOptions


# -- selections --------------------------------------------------------------------------


@dataclass
class Evidence:
    """What selections read: the calibration pass's scores and FoldGPT's trained gates."""

    scores: LayerScores | None = None
    gates: GateResult | None = None
    search: dict | None = None  # a searching selection's choice and its steps (methods.search)


@dataclass(frozen=True)
class Selection:
    name: str
    help: str
    needs: str  # "nothing", "scores" (one calibration pass), "gates" (gate training, the whole model)
    #              or "search" (forward passes of candidate models, the whole model: ``search`` below)
    choose: Callable[[Evidence, int, int], list[int]]  # (evidence, num_layers, n) -> layers that go
    contiguous: bool = False  # always one block of consecutive layers
    search: Callable | None = None  # (model, arch, ids, n, SearchOptions, progress=) -> Evidence.search


def _from_search(name: str):
    def choose(evidence: Evidence, num_layers: int, n: int) -> list[int]:
        found = evidence.search
        if found is None or found.get("selection") != name or len(found["removed"]) != n:
            raise LayerfoldError(f"the {name} selection needs its own search for {n} layers")
        return sorted(found["removed"])

    return choose


def _search(name: str):
    def run(model, arch, ids, n, opts, progress=True):
        from . import search

        return getattr(search, name)(model, arch, ids, n, opts, progress=progress)

    return run


def _from_gates(evidence: Evidence, num_layers: int, n: int) -> list[int]:
    g = evidence.gates
    if len(g.gates) != num_layers or len(g.removed) != n:
        raise LayerfoldError(f"the gates remove {len(g.removed)} of {len(g.gates)} layers, not {n} of {num_layers}; "
                             "train them for this budget (analyze --gates --remove N)")
    return sorted(g.removed)


SELECTIONS: dict[str, Selection] = {s.name: s for s in [
    Selection("bi", "the layers with the lowest Block Influence, anywhere (ShortGPT)", "scores",
              lambda e, L, n: pruning.block_influence(e.scores, n)),
    Selection("angular", "the block with the smallest angular distance on last tokens (Gromov et al.)", "scores",
              lambda e, L, n: pruning.angular_block(e.scores, n), contiguous=True),
    Selection("block", "the block whose input and output are most similar (LLM-Streamline's cosine)", "scores",
              lambda e, L, n: pruning.streamline_block(e.scores, n), contiguous=True),
    Selection("last-n", "the last layers (Reassessing Layer Pruning); needs no calibration", "nothing",
              lambda e, L, n: pruning.last_layers(L, n), contiguous=True),
    Selection("gates", "the lowest of FoldGPT's learned layer gates", "gates", _from_gates),
    Selection("sleb", "SLEB: greedily the layer whose removal raises the calibration loss least, one at a time",
              "search", _from_search("sleb"), search=_search("sleb")),
    Selection("iterative-bi", "Block Influence scored again after each removal", "search",
              _from_search("iterative-bi"), search=_search("iterative_bi")),
    Selection("laco", "LaCo: top-down merges of layers into the one before, accepted while the output stays "
                      "similar (use with the merge repair)", "search", _from_search("laco"), search=_search("laco")),
]}


# -- repairs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Repair:
    name: str
    help: str
    slots: int  # new layers it puts in place of each block it repairs
    contiguous: bool  # repairs one block of consecutive layers
    needs_text: bool = False  # reads the calibration text
    check: Callable[[Architecture], None] | None = None  # refuses architectures it cannot repair


def _check_linear(arch: Architecture) -> None:
    from .replaceme import check_foldable

    check_foldable(arch)


REPAIRS: dict[str, Repair] = {r.name: r for r in [
    Repair("none", "nothing: the selected layers are removed", 0, False),
    Repair("linear", "ReplaceMe: each run of removed layers becomes a linear map fitted in closed form and folded "
                     "into the kept layer before it (no new parameters; options: the linear group)", 0, False,
           needs_text=True, check=_check_linear),
    Repair("merge", "LaCo: each run of removed layers merged into the kept layer before it (the run's "
                    "differences to that layer's weights added to it; after the laco selection, its "
                    "accepted merges in order)", 0, False),
    Repair("replacement", "LLM-Streamline: one trained replacement (options: the repair group) stands in for "
                          "the block", 1, True, needs_text=True),
]}


def _replacement_cost(model, arch, opts) -> int:
    from .streamline import replacement_size

    return replacement_size(model, arch, opts.repair.spec)


# -- methods -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    selection: str
    repair: str
    share: bool = False  # FoldGPT: adjacent kept layers then share their linear weights
    cure: bool = False  # FoldGPT: its cure is the healing
    auto: bool = False  # the selection and repair are chosen by a plan search (methods/auto.py)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("streamline", "LLM-Streamline: the most redundant block replaced by one trained layer or FFN",
           "block", "replacement"),
    Method("streamline-block", "the consecutive block whose input and output are most similar", "block", "none"),
    Method("bi", "the layers with the lowest Block Influence (ShortGPT)", "bi", "none"),
    Method("angular", "the block with the smallest angular distance on last tokens (Gromov et al.)", "angular",
           "none"),
    Method("last-n", "the last layers (Reassessing Layer Pruning); needs no calibration", "last-n", "none"),
    Method("sleb", "SLEB: greedy removal by calibration loss", "sleb", "none"),
    Method("replaceme", "ReplaceMe: Block Influence's layers removed, each run replaced by a folded linear map",
           "bi", "linear"),
    Method("laco", "LaCo: layers merged into the layer before them while the output stays similar", "laco",
           "merge"),
    Method("auto", "search: score candidate plans (selection x repair, no training) by held-out KL to the "
                   "original, build the best, then heal (candidates: --auto-plans)", "bi", "none", auto=True),
    Method("foldgpt", "FoldGPT: learned gates choose the layers, adjacent retained layers share their linear "
                      "weights, then a cure", "gates", "none", share=True, cure=True),
]}
# The method of a run without --method: the best measured plan that keeps the main job near five
# minutes on 2 cores (benchmarks/frontier.md, "Healed": bi+linear beat bi alone on held-out KL,
# LAMBADA perplexity and mean accuracy at the same healing budget; SLEB's better selection costs
# ~30 minutes of search). Where the linear map cannot be folded (the architecture's MLP output
# passes through a norm), Block Influence alone; `--repair X` without --method is Block Influence + X.
DEFAULT_METHOD = "replaceme"
DEFAULT_METHOD_UNFOLDABLE = "bi"


def default_method(arch: Architecture | None, repair: str | None = None) -> str:
    """The method a run uses when --method is not given (see DEFAULT_METHOD)."""
    if repair is not None or (arch is not None and arch.mlp_output is None):
        return DEFAULT_METHOD_UNFOLDABLE
    return DEFAULT_METHOD


@dataclass
class SelectionOptions:
    """Which layers go, what stands in for them, and how many."""

    method: str | None = field(default=None, metadata={
        "help": f"how to choose the layers and what stands in for them (see the methods above; default: "
                f"{DEFAULT_METHOD}, or {DEFAULT_METHOD_UNFOLDABLE} where the model's MLP output is normed "
                f"(Gemma 2/3, OLMo 2) or --repair is given)",
        "choices": tuple(METHODS), "flag": "--method"})
    select: str | None = field(default=None, metadata={
        "help": "choose the layers by this selection instead of the method's own", "choices": tuple(SELECTIONS),
        "flag": "--select"})
    repair: str | None = field(default=None, metadata={
        "help": "put this in their place instead of the method's own repair (replacement: LLM-Streamline's "
                "trained layer, options in the repair group)", "choices": tuple(REPAIRS), "flag": "--repair"})
    remove: int | None = field(default=None, metadata={
        "help": "number of layers to remove (default: 25% of them)", "flag": "--remove"})
    sparsity: float | None = field(default=None, metadata={
        "help": "fraction of decoder-layer parameters to remove, e.g. 0.25 or 25%", "flag": "--sparsity",
        "parse": parse_fraction, "allowed": "a fraction like 0.25 or 25%"})
    scores: str | None = field(default=None, metadata={
        "help": "plan from the scores `layerfold analyze --json` saved instead of a calibration pass "
                "(with --dry-run no weight is read)", "flag": "--scores", "path": True})

    def parts(self) -> tuple[Method, Selection, Repair]:
        """The method, and the selection and repair it runs with (after --select / --repair)."""
        name = self.method or default_method(None, self.repair)  # resolved by with_default_method
        if name not in METHODS:
            raise LayerfoldError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
        method = METHODS[name]
        if method.auto and (self.select or self.repair) and not getattr(self, "_chosen", False):
            raise LayerfoldError("--method auto chooses the selection and the repair itself; list the candidates "
                                 "with --auto-plans SELECTION+REPAIR,... instead of --select/--repair")
        selection = SELECTIONS[self.select or method.selection]
        repair = REPAIRS[self.repair or method.repair]
        if repair.contiguous and not selection.contiguous:
            raise LayerfoldError(f"the {repair.name} repair stands in for one block of consecutive layers; "
                                 f"the {selection.name} selection chooses layers anywhere (use block, angular "
                                 "or last-n)")
        return method, selection, repair

    def validate(self) -> None:
        self.parts()
        pruning.check_target(self.remove, self.sparsity)

    def with_default_method(self, arch: Architecture) -> SelectionOptions:
        """These options with the method named: the default for this architecture if none was given."""
        from dataclasses import replace

        return self if self.method else replace(self, method=default_method(arch, self.repair))

    def chosen(self, selection: str, repair: str) -> SelectionOptions:
        """These options with the plan search's choice (``--method auto``) filled in."""
        from dataclasses import replace

        out = replace(self, select=selection, repair=repair)
        out._chosen = True
        return out


# -- planning ----------------------------------------------------------------------------


def layers_to_select(opts: CompressOptions, model, arch) -> int:
    """How many original layers the selection picks for ``--remove N`` / ``--sparsity F``: N,
    plus the layers a repair puts back (N+1 for one replacement: it takes one slot)."""
    _, _, repair = opts.selection.parts()
    params = layer_parameters(model, arch)
    if repair.slots == 0:
        return pruning.layers_for_target(len(params), opts.selection.remove, opts.selection.sparsity)
    from .streamline import block_window

    return block_window(params, _replacement_cost(model, arch, opts), opts.selection.remove, opts.selection.sparsity)


def make_plan(opts: CompressOptions, model, arch, evidence: Evidence) -> Plan:
    """The plan of ``opts`` for ``model`` (only its shapes are read: weights may be on the meta device)."""
    method, selection, repair = opts.selection.parts()
    params = layer_parameters(model, arch)
    n_layers = len(params)
    n = layers_to_select(opts, model, arch)
    if selection.needs == "scores" and evidence.scores is None:
        raise LayerfoldError(f"the {selection.name} selection needs importance scores")
    if selection.needs == "search" and evidence.search is None:
        raise LayerfoldError(f"the {selection.name} selection needs its search (forward passes of the model)")
    if selection.needs == "gates" and evidence.gates is None:
        raise LayerfoldError("the gates selection needs trained gates (analyze --gates --json, or a calibration pass)")
    if repair.check is not None:
        repair.check(arch)
    selected = selection.choose(evidence, n_layers, n)
    before = count_parameters(model)
    replacements, details = [], {}
    if repair.slots == 0:
        layer_map = LayerMap.removal(n_layers, selected)
        after = before - sum(params[i] for i in selected)
        if repair.name == "linear":
            from .replaceme import removed_runs

            runs = removed_runs(selected)
            details["linear"] = {"folded_into": {f"{a}..{b}": a - 1 for a, b in runs if a > 0},
                                 "unrepaired": [[a, b] for a, b in runs if a == 0]}
        if repair.name == "merge":
            from .replaceme import removed_runs

            runs = removed_runs(selected)
            details["merge"] = {"merged_into": {f"{a}..{b}": a - 1 for a, b in runs if a > 0},
                                "unmerged": [[a, b] for a, b in runs if a == 0]}
    else:  # one replacement in the block's first slot
        from .streamline import check_block

        start, window = selected[0], len(selected)
        check_block(opts.repair.spec, start, model.config, arch)
        cost = _replacement_cost(model, arch, opts)
        kind = opts.repair.replacement
        layer_map = LayerMap.replacement(n_layers, start, window, keeps_first=kind == "none")
        after = before - sum(params[i] for i in selected) + cost
        replacements.append({"new": start, "block": [start, start + window - 1], "kind": kind, "parameters": cost})
        if evidence.scores is not None:
            details["block_cosine"] = evidence.scores.cosine[start][window]
    groups: list[list[int]] = []
    if method.share:
        from .foldgpt import choose_groups

        groups = choose_groups(len(layer_map), opts.foldgpt)
        members = [[layer_map.sources[j] for j in g] for g in groups if len(g) > 1]
        if any(s is None for g in members for s in g):
            raise LayerfoldError("a replacement cannot share its weights with kept layers; use --repair none")
        after -= shared_parameters(model, arch, members)  # counted on the original layers: they are alike
        after += delta_parameters(model, arch, members, opts.foldgpt.delta_rank)
    if evidence.search is not None:
        details["search"] = evidence.search
    if evidence.gates is not None:
        details["gates"] = evidence.gates.gates
    return Plan(method=method.name, selection=selection.name, repair=repair.name, selected=selected,
                layer_map=layer_map, params_before=before, params_after=after,
                bytes_per_parameter=bytes_per_parameter(model), replacements=replacements, groups=groups,
                details=details)


# -- applying ----------------------------------------------------------------------------


@dataclass
class Applied:
    """What applying a plan did: the layer map of the result, and what it leaves for the record."""

    layer_map: LayerMap
    params_after_removal: int = 0  # before any sharing
    streamline: object | None = None  # methods.streamline.StreamlineResult
    linear: object | None = None  # methods.replaceme.LinearRepairResult
    merge: dict | None = None  # methods.search.merge_repair's record
    files: dict[str, str] = field(default_factory=dict)  # extra files for the output folder
    seconds: dict[str, float] = field(default_factory=dict)


def apply_plan(plan: Plan, loaded, ids: torch.Tensor | None, opts: CompressOptions, *, evidence: Evidence,
               work_dir: Path, checkpoints=None) -> Applied:
    """Change ``loaded.model`` in place as ``plan`` says: remove, or replace (and train), then share."""
    model, arch = loaded.model, loaded.arch
    t = time.perf_counter()
    if plan.repair == "none":
        remove_layers(model, arch, plan.selected)
        applied = Applied(plan.layer_map)
    elif plan.repair == "linear":
        from .replaceme import linear_repair

        fit = linear_repair(model, arch, ids, plan.selected, opts.linear, batch_size=opts.layer_pass.batch_size,
                            max_memory=opts.layer_pass.max_memory, progress=opts.progress)
        remove_layers(model, arch, plan.selected)
        applied = Applied(plan.layer_map, linear=fit, seconds={"linear_repair": fit.seconds})
    elif plan.repair == "merge":
        from .search import merge_repair

        search = plan.details.get("search") or {}  # LaCo's steps, replayed in order (a base merged again)
        steps = search.get("steps") if search.get("selection") == "laco" else None
        merged = merge_repair(model, arch, plan.selected, steps)
        remove_layers(model, arch, plan.selected)
        applied = Applied(plan.layer_map, merge=merged)
    else:
        from .streamline import replace_and_train

        log_path = work_dir / "training_log.jsonl"
        start, window = plan.selected[0], len(plan.selected)
        sl = replace_and_train(
            model, arch, ids, start, window, opts.repair, block_cosine=plan.details.get("block_cosine"),
            work_dir=work_dir, log_path=log_path, progress=opts.progress, batch_size=opts.layer_pass.batch_size,
            checkpoints=checkpoints)
        files = {"training_log.jsonl": log_path.read_text()} if log_path.exists() else {}
        from ..nn.portable import portable_files

        files.update(portable_files(model, arch))
        applied = Applied(sl.layer_map, streamline=sl, files=files, seconds=dict(sl.seconds))
    applied.params_after_removal = count_parameters(model)
    if plan.groups:
        from ..nn.shared import share_groups

        # the gates end at 0/1; their scores (log a, logits) still rank the kept layers
        gates = evidence.gates.importance() if evidence.gates is not None else None
        importance = [gates[s] for s in plan.layer_map.sources] if gates is not None else None
        share_groups(model, arch, plan.groups, init=opts.foldgpt.share_init, importance=importance,
                     delta_rank=opts.foldgpt.delta_rank)
    applied.seconds["apply"] = time.perf_counter() - t
    if count_parameters(model) != plan.params_after:  # the plan's counts are exact, or it is a bug
        raise RuntimeError(f"planned {plan.params_after:,} parameters, made {count_parameters(model):,}")
    return applied

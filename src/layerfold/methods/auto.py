"""``--method auto``: score candidate plans by held-out KL and build the best.

Each candidate is a selection x repair that needs no training (``bi+linear``, ``laco+merge``,
...). For the requested budget, every candidate is planned and applied to a copy of the model
exactly as ``--select S --repair R`` would build it, and scored by its KL to the original on
held-out calibration-style rows (``eval.heldout``: rows that neither the selection nor the
repair sees). That costs forward passes, not training. The ranked table is printed and kept in
``layerfold.json``; compress then builds the best plan and heals it as usual.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace

from ..errors import LayerfoldError

# sleb costs about N x L forward passes (33 minutes of the embedded model's 8-of-30 search on
# loaded shared cores) but its sleb+linear is the best plan measured there (benchmarks/frontier.md):
# without it the search's choice was 10% off the best held-out perplexity
DEFAULT_CANDIDATES = ("bi+none", "bi+linear", "iterative-bi+none", "iterative-bi+linear", "sleb+none",
                      "sleb+linear", "angular+none", "angular+linear", "block+none", "block+linear", "last-n+none",
                      "last-n+linear", "laco+merge")


@dataclass
class AutoOptions:
    """``--method auto``: which plans compete, and on how many held-out rows."""

    plans: list[str] = field(default_factory=lambda: list(DEFAULT_CANDIDATES), metadata={
        "help": "comma-separated candidate plans SELECTION+REPAIR with no training (repairs none, linear, merge; "
                "the searches sleb, iterative-bi and laco cost forward passes: sleb about N x L)", "flag": "--auto-plans"})
    rows: int = field(default=8, metadata={
        "help": "held-out rows the candidates are scored on (KL to the original)", "flag": "--auto-rows"})

    def candidates(self) -> list[tuple[str, str]]:
        """The plans as (selection, repair), each checked."""
        from .registry import REPAIRS, SELECTIONS

        out = []
        for text in self.plans:
            selection, plus, repair = text.partition("+")
            repair = repair if plus else "none"
            if selection not in SELECTIONS:
                raise LayerfoldError(f"--auto-plans: unknown selection {selection!r} in {text!r}; choose from "
                                     f"{', '.join(SELECTIONS)}")
            if repair not in REPAIRS:
                raise LayerfoldError(f"--auto-plans: unknown repair {repair!r} in {text!r}; choose from "
                                     f"{', '.join(REPAIRS)}")
            if repair == "replacement" or SELECTIONS[selection].needs == "gates":
                raise LayerfoldError(f"--auto-plans: {text} needs training; the search compares plans that need "
                                     "forward passes only")
            out.append((selection, repair))
        if not out:
            raise LayerfoldError("--auto-plans: give at least one candidate plan")
        return out

    def validate(self) -> None:
        self.candidates()
        if self.rows < 1:
            raise LayerfoldError(f"--auto-rows must be at least 1 (got {self.rows})")


@dataclass
class AutoResult:
    """The ranked candidates (best first) and the evidence of the winner."""

    table: list[dict]  # {"plan", "selection", "repair", "kl", "top1", "ppl", "reference_ppl", "removed", "seconds"}
    chosen: tuple[str, str]
    evidence: object  # registry.Evidence of the chosen plan
    heldout_rows: int
    seconds: float

    def to_dict(self) -> dict:
        return {"table": self.table, "chosen": "+".join(self.chosen), "heldout_rows": self.heldout_rows,
                "seconds": self.seconds}

    def describe(self) -> str:
        """The ranked table as compress prints it."""
        lines = [f"plan search   {len(self.table)} candidates scored by KL to the original on "
                 f"{self.heldout_rows} held-out rows (lower is better)",
                 f"  {'rank':>4}  {'plan':<22} {'KL':>8} {'top-1':>7} {'ppl':>9}  removed"]
        for i, row in enumerate(self.table, 1):
            if row.get("refused"):
                lines.append(f"  {'-':>4}  {row['plan']:<22} refused: {row['refused']}")
                continue
            lines.append(f"  {i:>4}  {row['plan']:<22} {row['kl']:8.4f} {row['top1']:7.3f} {row['ppl']:9.2f}  "
                         + ",".join(map(str, row["removed"])))
        return "\n".join(lines)


def search_plans(opts, loaded, ids, *, progress: bool = True) -> AutoResult:
    """Score every candidate of ``opts.auto`` on held-out rows; ``loaded.model`` is not changed."""
    from tqdm.auto import tqdm

    from ..eval.heldout import compare_to_reference, heldout_ids, reference_log_probs
    from ..importance import measure_similarity
    from .registry import SELECTIONS, Evidence, apply_plan, make_plan

    t0 = time.perf_counter()
    model, arch = loaded.model, loaded.arch
    heldout = heldout_ids(opts.data, loaded, opts.auto.rows, progress=progress)
    reference = reference_log_probs(model, heldout)
    scores = None
    searched: dict[str, dict] = {}
    rows, evidences = [], {}
    for selection, repair in tqdm(opts.auto.candidates(), desc="plan search", disable=not progress):
        name = f"{selection}+{repair}"
        t = time.perf_counter()
        sel = SELECTIONS[selection]
        trial = replace(opts, selection=opts.selection.chosen(selection, repair), progress=False)
        evidence = Evidence()
        if sel.needs == "scores":
            if scores is None:
                scores = measure_similarity(model, arch, ids, batch_size=opts.layer_pass.batch_size,
                                            max_activation_bytes=opts.layer_pass.max_memory, progress=False)
            evidence.scores = scores
        elif sel.needs == "search":
            if selection not in searched:
                from .registry import layers_to_select

                n = layers_to_select(trial, model, arch)
                searched[selection] = sel.search(model, arch, ids, n, opts.search, progress=False)
            evidence.search = searched[selection]
        try:
            plan = make_plan(trial, model, arch, evidence)
        except LayerfoldError as e:  # e.g. a post-norm model refuses the linear repair
            rows.append({"plan": name, "selection": selection, "repair": repair, "refused": str(e)})
            continue
        work = replace(loaded, model=copy.deepcopy(model))
        apply_plan(plan, work, ids, trial, evidence=evidence, work_dir=None)
        fit = compare_to_reference(work.model, heldout, reference)
        del work
        rows.append({"plan": name, "selection": selection, "repair": repair, "kl": fit.kl, "top1": fit.top1,
                     "ppl": fit.ppl, "reference_ppl": fit.reference_ppl, "removed": plan.removed,
                     "seconds": time.perf_counter() - t})
        evidences[(selection, repair)] = evidence
    scored = sorted((r for r in rows if "kl" in r), key=lambda r: r["kl"])
    if not scored:
        raise LayerfoldError("--method auto: every candidate plan was refused: "
                             + "; ".join(f"{r['plan']}: {r['refused']}" for r in rows))
    best = (scored[0]["selection"], scored[0]["repair"])
    table = scored + [r for r in rows if "kl" not in r]
    return AutoResult(table, best, evidences[best], int(heldout.shape[0]), time.perf_counter() - t0)

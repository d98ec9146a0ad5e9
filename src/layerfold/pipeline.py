"""The public entry points: ``analyze``, ``compress``, ``heal_model``, ``export``, ``evaluate_model``.

Each takes one options dataclass (``recipe.py``: what the command line parses and a YAML
recipe holds) and returns a result dataclass; printing is left to the caller.

``compress`` runs the same stages for every method:

    load -> calibrate -> score -> plan -> (dry run) -> apply -> heal -> evaluate -> save

The method decides what happens inside a stage (``methods.registry``): which layers the
selection picks and from what evidence, what the repair puts in their place, whether kept
layers then share weights (FoldGPT) and whether its cure is the healing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import recipe as recipes
from . import validation
from .data.calibration import load_calibration
from .errors import LayerfoldError
from .eval.evaluate import EvalOptions
from .importance import LayerScores, measure_similarity
from .methods.plan import Plan
from .methods.registry import Applied, Evidence, apply_plan, layers_to_select, make_plan
from .methods.streamline import StreamlineResult
from .models.card import model_card
from .export.mergekit import MERGEKIT_FILE
from .models.layer_map import LayerMap
from .models.loading import LoadedModel, ModelOptions, load_model, locate_model
from .models.saving import check_output_dir, default_output_name, folder_bytes, save_model_folder
from .models.surgery import count_parameters, decoder_layers
from .recipe import AnalyzeOptions, CompressOptions, EvaluateOptions, ExportOptions, HealModelOptions
from .report import record as records
from .train.parallel import processes

__all__ = ["AnalyzeOptions", "CompressOptions", "EvalOptions", "EvaluateOptions", "ExportOptions",
           "HealModelOptions", "ModelOptions", "analyze", "compress", "evaluate_model", "export", "heal_model"]


def _load(opts: ModelOptions, lazy: bool = False) -> LoadedModel:
    return load_model(opts.model, dtype=opts.dtype, device=opts.device,
                      trust_remote_code=opts.trust_remote_code, lazy=lazy, placement=opts.placement)


# -- analyze -----------------------------------------------------------------------------


@dataclass
class AnalyzeResult:
    scores: LayerScores
    source: str
    seconds: float


def analyze(opts: AnalyzeOptions, loaded: LoadedModel | None = None) -> AnalyzeResult:
    """Score every layer and block of a model by every criterion, in one calibration pass."""
    from .methods import pruning

    t0 = time.perf_counter()
    validation.check(opts, loaded)
    # layers are read from disk one at a time; gates train through the whole model at once
    loaded = loaded or _load(opts.model, lazy=opts.gates is None)
    ids = load_calibration(opts.data, loaded, progress=opts.progress)
    scores = measure_similarity(loaded.model, loaded.arch, ids, batch_size=opts.layer_pass.batch_size,
                                max_activation_bytes=opts.layer_pass.max_memory, progress=opts.progress)
    if opts.gates is not None:
        from .importance.gates import gate_ranking

        n_remove = pruning.layers_for_target(scores.num_layers, opts.gate_remove, None)
        g = gate_ranking(loaded.model, loaded.arch, ids, n_remove, opts.gates,
                         heldout=_gate_check_rows(opts.data, loaded, opts.progress),
                         block_influence_removed=pruning.block_influence(scores, n_remove), progress=opts.progress)
        scores.extra["gates"] = g.gates
        scores.extra["gates_removed"] = sorted(g.removed)
        scores.extra["gates_scores"] = g.scores
        scores.extra["gates_check"] = g.check
        scores.extra["gates_swaps"] = g.swaps  # the swap refinement after the top-k (None when off)
        scores.extra["gates_options"] = g.options
        # every step (loss, multipliers, the deterministic gates before the top-k): what a plot
        # of the gates over training needs, as compress's gate_log.jsonl
        scores.extra["gates_log"] = [{"round": i + 1, **rec} for i, rnd in enumerate(g.rounds) for rec in rnd["log"]]
    return AnalyzeResult(scores, loaded.source, time.perf_counter() - t0)


def _gate_check_rows(spec, loaded: LoadedModel, progress: bool):
    """Held-out rows for checking the gates' choice against Block Influence's; None (no
    check) when a calibration file has no text left after the calibration rows."""
    from .eval.heldout import heldout_ids

    try:
        return heldout_ids(spec, loaded, progress=progress)
    except LayerfoldError:
        return None


# -- compress ----------------------------------------------------------------------------


@dataclass
class CompressResult:
    output: Path | None  # None after a dry run
    method: str
    removed: list[int]
    layer_map: list[int | None]
    layers_before: int
    layers_after: int
    params_before: int
    params_after: int
    bytes_on_disk: int
    seconds: dict[str, float]
    scores: LayerScores | None = None
    streamline: StreamlineResult | None = None
    eval_before: object | None = None  # layerfold.eval.EvalResult
    eval_after: object | None = None
    report: Path | None = None
    heal: dict | None = None  # HealResult.summary() when the model was healed
    extra: dict = field(default_factory=dict)
    plan: Plan | None = None


def compress(opts: CompressOptions, loaded: LoadedModel | None = None, memory=None) -> CompressResult:
    """Compress a model as ``opts`` says and save a complete model folder (with ``--dry-run``:
    only plan). ``loaded``: the model, already loaded (it is changed in place). ``memory``: the
    memory plan of ``opts`` (``memory_plan.plan_memory``), when the caller made it already (to
    print it first); the run uses its options."""
    run = _Compression(opts, loaded, memory)
    if opts.selection.scores and opts.output.dry_run:
        return run.dry(run.plan(_skeleton(opts.model), run.saved_evidence()))
    loaded = run.load(loaded)
    run.check_gguf(loaded)  # the family and its rope: refused before any slow work
    procs = processes()  # under `accelerate launch`: every process prunes alike, healing is data-parallel
    with procs.main_first():  # the main process writes the shared text and teacher caches, the others read them
        ids = run.calibrate(loaded)
    evidence = run.score(loaded, ids)
    plan = run.plan(loaded, evidence)
    if opts.output.dry_run:
        return run.dry(plan)
    before = run.evaluate_before(loaded)
    with procs.main_first():
        healing = run.prepare_healing(loaded, ids, plan)
    applied = run.apply(loaded, plan, ids, evidence)
    run.check_gguf(loaded)  # the pruned layer pattern, before healing
    healed = run.heal(loaded, healing, applied)
    if not procs.main:  # the same weights in every process: the main one evaluates and saves
        return run.dry(plan)
    after = run.evaluate_after(loaded, plan, before)
    return run.save(loaded, plan, evidence, applied, healed, before, after)


def _skeleton(opts: ModelOptions) -> LoadedModel:
    from .models.loading import model_skeleton

    return model_skeleton(opts.model, dtype=opts.dtype, device=opts.device, trust_remote_code=opts.trust_remote_code)


@dataclass
class _Healing:
    """What healing needs from the original model, taken before surgery changes it."""

    ids: object = None  # token rows
    teacher: object = None  # a teacher cache, a frozen copy of the original, or None


class _Compression:
    """The stages of :func:`compress`, sharing the options and the stage timings."""

    def __init__(self, opts: CompressOptions, loaded: LoadedModel | None = None, memory=None):
        from .memory_plan import plan_memory

        self.opts = opts
        self.method, self.selection, self.repair = opts.selection.parts()
        self._check(loaded)  # bad options first, then the memory plan (before any work)
        self.memory = memory or plan_memory(opts, loaded)
        self.opts = opts = self.memory.options  # what the plan fits: the options the run uses and records
        self.method, self.selection, self.repair = opts.selection.parts()  # the default method, named
        self.plan_opts = opts  # with --method auto: the options with the search's choice, once made
        self.auto = None  # methods.auto.AutoResult
        self.seconds: dict[str, float] = {}
        self.heldout = None  # (held-out rows, the original's log-probs on them)
        self.original = None  # a copy of the original, for the alternating speed runs
        self.heal_curve: list[dict] = []  # held-out fit and loss against healing tokens
        if self.memory.changes:
            self._check(loaded)

    def _check(self, loaded: LoadedModel | None) -> None:
        """Every option, against the model's config and file headers, before any slow work."""
        o = self.opts
        validation.check(o, loaded)
        o.data.validate()
        o.layer_pass.validate()
        o.selection.validate()
        o.evaluation.validate()
        if self.heals:
            o.healing.validate()
        if self.repair.name == "replacement":
            o.repair.validate()
        if self.repair.name == "linear":
            o.linear.validate()
        if self.method.auto:
            o.auto.validate()
            if o.selection.scores:
                raise LayerfoldError("--method auto scores candidate models; saved scores (--scores) cannot stand in")
            for _, repair in o.auto.candidates():
                if repair == "linear":
                    o.linear.validate()
        if self.selection.needs == "search" or self.method.auto:
            o.search.validate()
            if o.selection.scores:
                raise LayerfoldError(f"the {self.selection.name} selection searches with forward passes; saved "
                                     "scores (--scores) cannot stand in for it")
        if self.method.share or self.method.cure:
            o.foldgpt.validate()
        if o.selection.scores and not Path(o.selection.scores).expanduser().is_file():
            raise LayerfoldError(f"{o.selection.scores}: no such scores file (write one with layerfold analyze --json)")
        if o.output.reproducible and o.evaluation.enabled:
            raise LayerfoldError("--reproducible: the evaluation times runs and meters memory, which never repeat; "
                                 "add --no-eval (and evaluate the folder with layerfold eval)")
        if o.output.path and not o.output.dry_run:
            check_output_dir(Path(o.output.path), o.output.force)
        o.gguf.validate()
        if o.gguf.enabled and not o.output.dry_run:
            from .export.gguf import check_gguf_path

            check_gguf_path(o.gguf.path, o.output.force)

    def check_gguf(self, loaded: LoadedModel) -> None:
        """With --gguf: what llama.cpp cannot express is refused now, not after the work."""
        if not self.opts.output.dry_run:
            _gguf_plan(self.opts.gguf, loaded)

    @property
    def heals(self) -> bool:
        return self.opts.healing.enabled and not self.method.cure

    @property
    def cures(self) -> bool:
        return self.method.cure and self.opts.foldgpt.cure.steps > 0

    def _timed(self, name: str, start: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    # load -> calibrate -> score -> plan ------------------------------------------------------

    def load(self, loaded: LoadedModel | None) -> LoadedModel:
        """Layer-streamed unless the whole model must be in memory at once (FoldGPT's gates and
        sharing): weights stay on disk until a layer is used, so importance, pair collection
        and saving need about one layer in memory."""
        t = time.perf_counter()
        lazy = self.selection.needs not in ("gates", "search") and not self.method.share and not self.method.auto
        loaded = loaded or _load(self.opts.model, lazy=lazy)
        if self.repair.check is not None and not self.method.auto:  # before any calibration work
            self.repair.check(loaded.arch)
        self._timed("load", t)
        return loaded

    def calibrate(self, loaded: LoadedModel):
        """The calibration text, where the selection or the repair reads it."""
        needs = (self.selection.needs != "nothing" and not self.opts.selection.scores) or self.repair.needs_text
        if not needs:
            return None
        t = time.perf_counter()
        ids = load_calibration(self.opts.data, loaded, progress=self.opts.progress)
        self._timed("calibration", t)
        return ids

    def saved_evidence(self) -> Evidence:
        from .importance.gates import GateResult

        path = Path(self.opts.selection.scores).expanduser()
        try:
            scores = LayerScores.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as e:
            raise LayerfoldError(f"{path}: not a scores file of layerfold analyze --json ({e})") from None
        gates = None
        if "gates" in scores.extra:
            nan = lambda xs: [float("nan") if x is None else x for x in xs]  # noqa: E731
            gates = GateResult(nan(scores.extra["gates"]), list(scores.extra.get("gates_removed", [])),
                               scores=nan(scores.extra.get("gates_scores") or []),
                               check=scores.extra.get("gates_check"), swaps=scores.extra.get("gates_swaps"))
        return Evidence(scores, gates)

    def score(self, loaded: LoadedModel, ids) -> Evidence:
        o = self.opts
        if o.selection.scores:
            evidence = self.saved_evidence()
            n = len(decoder_layers(loaded.model, loaded.arch))
            if evidence.scores.num_layers != n:
                raise LayerfoldError(f"{o.selection.scores}: scores of a {evidence.scores.num_layers}-layer model; "
                                     f"this one has {n}")
            return evidence
        t = time.perf_counter()
        evidence = Evidence()
        if self.method.auto:
            from .methods.auto import search_plans
            from .methods.registry import REPAIRS, SELECTIONS

            self.auto = search_plans(o, loaded, ids, progress=o.progress)
            selection, repair = self.auto.chosen
            self.plan_opts = replace(o, selection=o.selection.chosen(selection, repair))
            self.selection, self.repair = SELECTIONS[selection], REPAIRS[repair]
            self._timed("plan_search", t)
            return self.auto.evidence
        if self.selection.needs == "scores":
            evidence.scores = measure_similarity(loaded.model, loaded.arch, ids, batch_size=o.layer_pass.batch_size,
                                                 max_activation_bytes=o.layer_pass.max_memory, progress=o.progress)
            self._timed("importance", t)
        elif self.selection.needs == "search":
            n = layers_to_select(o, loaded.model, loaded.arch)
            evidence.search = self.selection.search(loaded.model, loaded.arch, ids, n, o.search, progress=o.progress)
            self._timed("search", t)
        elif self.selection.needs == "gates":
            from .importance.gates import gate_ranking

            n = layers_to_select(o, loaded.model, loaded.arch)
            evidence.gates = gate_ranking(loaded.model, loaded.arch, ids, n, o.foldgpt.gates,
                                          heldout=_gate_check_rows(o.data, loaded, o.progress), progress=o.progress,
                                          checkpoints=o.healing.checkpoints("gates"))
            self._timed("gates", t)
        return evidence

    def plan(self, loaded: LoadedModel, evidence: Evidence) -> Plan:
        plan = make_plan(self.plan_opts, loaded.model, loaded.arch, evidence)
        plan.stages = self._stages()
        return plan

    def _stages(self) -> list[str]:
        o = self.opts
        streamed = self.selection.needs not in ("gates", "search") and not self.method.share and not self.method.auto
        stages = ["load" + (" (layers streamed)" if streamed else "")]
        if self.method.auto:
            stages += ["calibrate", f"plan search ({len(o.auto.plans)} candidates by held-out KL; chose "
                                    f"{self.selection.name}+{self.repair.name})"]
        elif o.selection.scores:
            stages.append(f"scores from {o.selection.scores}")
        elif self.selection.needs == "scores":
            stages += ["calibrate", "score (one layer-by-layer pass)"]
        elif self.selection.needs == "search":
            stages += ["calibrate", f"search ({self.selection.name}: forward passes of candidate models)"]
        elif self.selection.needs == "gates":
            stages += ["calibrate", f"train layer gates ({o.foldgpt.gates.steps} steps x {o.foldgpt.gates.rounds})"]
        if o.evaluation.enabled:
            stages.append("evaluate before")
        if self.repair.name == "none":
            stages.append("remove layers")
        elif self.repair.name == "linear":
            stages.append(f"fit a linear map per removed run ({o.linear.objective}), fold it, remove the layers")
        else:
            r = o.repair
            text = ("the calibration text" if r.data.source == "calib"
                    else f"{r.train_tokens:,} tokens of '{r.data.source}' text")
            stages.append(f"replace the block by a trained {r.replacement} ({r.loss} loss, {text})"
                          if r.spec.trainable else "replace the block by its first layer (untrained)")
        if self.method.share:
            stages.append("share weights")
        if self.cures:
            stages.append(f"cure ({o.foldgpt.cure.steps} steps)")
        elif self.heals:
            stages.append(f"heal ({o.healing.train}, {o.healing.tokens:,} tokens)")
        if o.evaluation.enabled:
            stages.append("evaluate after")
        return stages + ["save"]

    def dry(self, plan: Plan) -> CompressResult:
        return CompressResult(output=None, method=plan.method, removed=plan.removed, layer_map=plan.layer_map.to_list(),
                              layers_before=plan.layers_before, layers_after=plan.layers_after,
                              params_before=plan.params_before, params_after=plan.params_after, bytes_on_disk=0,
                              seconds=self.seconds, plan=plan,
                              extra={"auto": self.auto.to_dict(), "auto_text": self.auto.describe()} if self.auto else {})

    # evaluate before -> apply -> heal -> evaluate after --------------------------------------

    def _eval_kwargs(self):
        return self.opts.evaluation.evaluate_kwargs()

    def evaluate_before(self, loaded: LoadedModel):
        """The original's figures (the whole model: a streamed one is read in for it)."""
        kw = self._eval_kwargs()
        if kw is None and not self.heals and not self.cures:
            return None
        from .models.lazy import materialize

        t = time.perf_counter()
        materialize(loaded.model, loaded.arch)  # evaluating and teaching need all of it at once
        self._timed("load", t)
        if kw is None:
            return None
        from .eval import evaluate

        t = time.perf_counter()
        before = evaluate(loaded, name=loaded.source, progress=self.opts.progress, **kw)
        source = str(loaded.source)
        if before.cost and (source.startswith("embedded:") or source.lower().endswith(".gguf")):
            before.cost.bytes_on_disk = None  # a quantized GGUF file: not comparable to safetensors
        self._heldout_reference(loaded, before)
        self._keep_original_for_speed(loaded)
        self._timed("eval_before", t)
        return before

    def _heldout_reference(self, loaded: LoadedModel, before) -> None:
        """Held-out rows and the original's log-probabilities on them (eval.heldout): the
        data-free quality figures before and after, and along the healing."""
        import sys

        from .eval.heldout import heldout_ids, reference_fit, reference_log_probs

        rows = self.opts.evaluation.heldout_rows
        if not rows:
            return
        try:
            ids = heldout_ids(self.opts.data, loaded, rows, progress=self.opts.progress)
        except LayerfoldError as e:
            print(f"layerfold: note: no held-out figures: {e}", file=sys.stderr)
            return
        ref = reference_log_probs(loaded.model, ids)
        self.heldout = (ids, ref)
        before.heldout = reference_fit(ids, ref).to_dict()

    def _keep_original_for_speed(self, loaded: LoadedModel) -> None:
        """A copy of the original, to time it in alternation with the compressed model at the end."""
        import copy

        from .models.loading import is_dispatched

        if self.opts.evaluation.speed_rounds and not is_dispatched(loaded.model):
            self.original = copy.deepcopy(loaded.model)
            self.original.requires_grad_(False)

    def heldout_fit(self, model) -> dict | None:
        from .eval.heldout import compare_to_reference

        if self.heldout is None:
            return None
        ids, ref = self.heldout
        return compare_to_reference(model, ids, ref).to_dict()

    def prepare_healing(self, loaded: LoadedModel, ids, plan: Plan) -> _Healing | None:
        """The healing text and the teacher's answers come from the original, before surgery
        (the teacher cache keeps the layers the plan's layer map aligns the student's tail with)."""
        from .healing import CALIBRATION_TEXT, healing_data, prepare_teacher, teacher_copy

        o = self.opts
        if not (self.cures or self.heals):
            return None
        t = time.perf_counter()
        if self.cures:
            # fresh text for the cure (another seed), so the gates and the cure see different samples
            spec = replace(o.data, samples=o.foldgpt.cure.samples, seed=o.data.seed + 1)
            healing = _Healing(load_calibration(spec, loaded, progress=o.progress), teacher_copy(loaded).model)
            self._timed("heal_data", t)
            return healing
        if o.healing.data.source == CALIBRATION_TEXT:
            from .data.guard import check_not_eval_data

            check_not_eval_data(o.data.source)  # never heal on evaluation data
            heal_ids = ids if ids is not None else load_calibration(o.data, loaded, progress=o.progress)
        else:
            heal_ids = healing_data(o.healing, loaded)
        self._timed("heal_data", t)
        t = time.perf_counter()
        teacher = None
        if o.healing.needs_teacher:
            teacher = (prepare_teacher(o.healing, loaded, heal_ids, plan.layer_map.kept) if o.healing.teacher_cache
                       else teacher_copy(loaded).model)
        self._timed("heal_teacher", t)
        return _Healing(heal_ids, teacher)

    def apply(self, loaded: LoadedModel, plan: Plan, ids, evidence: Evidence) -> Applied:
        o = self.opts
        # pairs go beside the output (same disk, never a RAM-backed /tmp) unless told otherwise
        if o.repair.pairs_dir:
            base = Path(o.repair.pairs_dir).expanduser()
        else:
            base = Path(o.output.path).expanduser().resolve().parent if o.output.path else Path.cwd()
        base.mkdir(parents=True, exist_ok=True)
        train_ids = ids
        if plan.repair == "replacement" and o.repair.spec.trainable:  # other repairs fit on the calibration
            from .methods.streamline import training_text

            # the replacement's own text, written by / read for the original before any surgery
            t = time.perf_counter()
            train_ids = training_text(o.repair, loaded, ids, progress=o.progress)
            self._timed("train_data", t)
        work = Path(tempfile.mkdtemp(prefix=f".layerfold-{plan.method}-{os.getpid()}-", dir=base))
        try:
            applied = apply_plan(plan, loaded, train_ids, o, evidence=evidence, work_dir=work,
                                 checkpoints=o.healing.checkpoints("replacement"))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for k, v in applied.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v
        return applied

    def heal(self, loaded: LoadedModel, healing: _Healing | None, applied: Applied) -> dict | None:
        """Healing (or FoldGPT's cure): a short training of the changed model toward the original."""
        if healing is None:
            return None
        o = self.opts
        t = time.perf_counter()
        if self.cures:
            from .methods.foldgpt import run_cure

            with tempfile.TemporaryDirectory() as tmp:
                log = Path(tmp) / "training_log.jsonl"
                cure = run_cure(loaded.model, healing.teacher, loaded.arch, healing.ids, o.foldgpt.cure,
                                kept=applied.layer_map.kept, log_file=str(log), progress=o.progress,
                                checkpoints=o.healing.checkpoints())
                applied.files["training_log.jsonl"] = log.read_text(encoding="utf-8") if log.exists() else ""
            healing.teacher = None
            self._timed("cure", t)
            return {"cure": {k: v for k, v in cure.items() if k != "history"}}
        from .healing import global_batch, heal
        from .train import steps_for_tokens

        eval_fn, eval_every = None, 0
        if self.heldout is not None:  # the held-out fit along the way: before healing, then ~4 times
            start = self.heldout_fit(loaded.model)
            self.heal_curve.append({"tokens": 0, "heldout": start})
            eval_fn = self.heldout_fit
            steps = steps_for_tokens(o.healing.tokens, global_batch(o.healing), o.healing.accumulation, healing.ids.shape[1])
            eval_every = max(1, steps // 4)
        result = heal(loaded, None, o.healing, ids=healing.ids, prepared_teacher=healing.teacher,
                      layer_map=applied.layer_map.kept, eval_fn=eval_fn, eval_every=eval_every)
        self.heal_curve += [{"tokens": r["tokens"], "loss": r.get("loss"), "heldout": r.get("eval")}
                            for r in result.train.history if "tokens" in r]
        self._timed("heal", t)
        return {"heal": result.summary()}

    def evaluate_after(self, loaded: LoadedModel, plan: Plan, before):
        kw = self._eval_kwargs()
        if kw is None:
            return None
        from .eval import evaluate

        t = time.perf_counter()
        after = evaluate(loaded.model, loaded.tokenizer, name=str(self._output(loaded, plan)), reference=before,
                         progress=self.opts.progress, **kw)
        after.heldout = self.heldout_fit(loaded.model)
        if self.original is not None:
            from .eval.before_after import alternating_speed, fill_costs

            speed = alternating_speed(self.original, loaded.model, rounds=self.opts.evaluation.speed_rounds,
                                      progress=self.opts.progress)
            fill_costs(before.cost if before is not None else None, after.cost, speed)
            self.original = None
            _free_memory()
        self._timed("eval_after", t)
        return after

    # save -------------------------------------------------------------------------------

    def _output(self, loaded: LoadedModel, plan: Plan) -> Path:
        o = self.opts
        name = plan.method
        if self.method.share:
            name = f"foldgpt-g{o.foldgpt.group_size}" if not o.foldgpt.groups else "foldgpt"
        return Path(o.output.path or default_output_name(loaded.source, name, plan.layers_before - plan.layers_after))

    def save(self, loaded, plan: Plan, evidence: Evidence, applied: Applied, healed, before, after) -> CompressResult:
        o = self.opts
        out = self._output(loaded, plan)
        heal_summary = (healed or {}).get("heal")
        cure = (healed or {}).get("cure")
        params_after = count_parameters(loaded.model)
        what = self._what_was_done(plan, evidence, applied, heal_summary)
        if o.output.reproducible:
            what = records.without_measurements(what)
        summary = self._summary(plan, applied, heal_summary)
        if after is not None:
            summary += "\n\n" + records.evaluation_table(before, after, o.evaluation.limit)
        recipe_yaml = recipes.to_yaml(o)
        layer_map = applied.layer_map.to_list()
        mergekit = self._mergekit(loaded, applied.layer_map, plan, heal_summary is not None or cure is not None)
        outputs = _checked_outputs(mergekit=MERGEKIT_FILE if mergekit else None)
        env = records.environment(o)
        card = model_card(base_model=loaded.base_model, command=o.command(), recipe=what, layer_map=layer_map,
                          params_before=plan.params_before, params_after=params_after,
                          layers_before=plan.layers_before, summary=summary, recipe_yaml=recipe_yaml, outputs=outputs,
                          environment=env)
        record = {
            "layerfold_version": records.version(),
            **env,
            "base_model": loaded.base_model,
            "source": loaded.source,
            "command": o.command(),
            "recipe": what,
            "layer_map": layer_map,
            "layers_before": plan.layers_before,
            "params_before": plan.params_before,
            "params_after": params_after,
            "scores": evidence.scores.to_dict() if evidence.scores is not None and not o.selection.scores else None,
            "evaluation": {"before": before.summary(), "after": after.summary()} if after else None,
            "heal": heal_summary,
            "heal_curve": self.heal_curve or None,
            "plan": plan.to_dict(),
            "memory_plan": self.memory.to_dict(),
            "options": recipes.schema.to_dict(recipes.absolute_paths(o)),
            "peak_rss_mib": records.peak_rss_mib(),
            "seconds": self.seconds,
        }
        if self.auto is not None:
            record["auto"] = self.auto.to_dict()
        if self.method.share:
            record.update(params_after_removal=applied.params_after_removal, params_stored=params_after)
        if evidence.gates is not None:
            g = evidence.gates
            record["gates"] = g.to_dict() | {"rounds": [{k: v for k, v in x.items() if k != "log"} for x in g.rounds]}
        if cure is not None or self.method.cure:
            record["cure"] = cure
        files = dict(applied.files)
        if evidence.gates is not None and evidence.gates.rounds:
            files["gate_log.jsonl"] = "".join(json.dumps({"round": i + 1, **rec}) + "\n"
                                              for i, rnd in enumerate(evidence.gates.rounds) for rec in rnd["log"])
        if not files.get("training_log.jsonl", True):
            files.pop("training_log.jsonl")
        kept = record  # what the folder keeps
        if o.output.reproducible:  # the same inputs, the same bytes: nothing a clock measured
            kept = records.without_measurements(record)
            files = {name: _without_measured_lines(text) if name.endswith(".jsonl") else text
                     for name, text in files.items()}
        files["layerfold.json"] = json.dumps(kept, indent=2, default=str) + "\n"
        files[recipes.RECIPE_FILE] = recipe_yaml
        written = {}

        def finish(tmp: Path) -> None:
            """The evaluation results and the report join the folder before it is renamed into place."""
            if after is not None and after.cost is not None:
                after.cost.bytes_on_disk = folder_bytes(tmp)
            written["report"] = _write_report(tmp, kept, before, after) if o.evaluation.report else None

        if mergekit:
            files[MERGEKIT_FILE] = mergekit
        t = time.perf_counter()
        if plan.groups and any(len(g) > 1 for g in plan.groups):
            from .export.shared import save_shared_folder

            out = save_shared_folder(loaded, out, card=card, extra_files=files, force=o.output.force, finish=finish)
        else:
            out = save_model_folder(loaded, out, card=card, extra_files=files, force=o.output.force, finish=finish)
        self._timed("save", t)
        extra = {}
        if o.gguf.enabled:
            extra["gguf"] = self.save_gguf(loaded, out, card_text=lambda g: model_card(
                base_model=loaded.base_model, command=o.command(), recipe=what, layer_map=layer_map,
                params_before=plan.params_before, params_after=params_after, layers_before=plan.layers_before,
                summary=summary, recipe_yaml=recipe_yaml, outputs=outputs + _checked_outputs(gguf=g)[1:],
                environment=env),
                layer_map=layer_map, source=loaded.source)
        report = out / written["report"].name if written.get("report") else None
        if self.method.share:
            extra |= {"groups": plan.groups, "gates": evidence.gates.gates if evidence.gates else None,
                     "gate_check": evidence.gates.check if evidence.gates else None,
                     "params_after_removal": record["params_after_removal"], "cure": record.get("cure")}
        if applied.linear is not None:
            extra["linear"] = applied.linear.to_dict()
        if self.auto is not None:
            extra.update(auto=record["auto"], auto_text=self.auto.describe())
        return CompressResult(
            output=out, method=plan.method, removed=plan.removed, layer_map=layer_map,
            layers_before=plan.layers_before, layers_after=plan.layers_after, params_before=plan.params_before,
            params_after=params_after, bytes_on_disk=folder_bytes(out), seconds=self.seconds,
            scores=evidence.scores, streamline=applied.streamline, eval_before=before, eval_after=after,
            report=report, heal=heal_summary, extra=extra, plan=plan,
        )

    def _mergekit(self, loaded: LoadedModel, layer_map: LayerMap, plan: Plan, healed: bool) -> str | None:
        """``mergekit.yaml`` for a pure layer removal (None for replacements and sharing)."""
        from .export.mergekit import dtype_name, is_pure_removal, mergekit_yaml

        if not is_pure_removal(layer_map, plan.groups):
            return None
        source, note = str(loaded.source), None
        if loaded.local_dir is not None and Path(source).expanduser().is_dir():
            source = str(Path(source).expanduser().resolve())
        elif source.startswith("embedded:") or source.lower().endswith(".gguf"):
            note = ("mergekit reads Hugging Face folders, not GGUF: write one with `layerfold export "
                    f"{'' if source.startswith('embedded:') else source + ' '}-o ORIGINAL --dtype fp32` and put its path "
                    "in `model:`")
        return mergekit_yaml(source, layer_map, dtype_name(next(loaded.model.parameters()).dtype), healed=healed,
                             note=note)

    def save_gguf(self, loaded: LoadedModel, folder: Path, *, card_text, layer_map, source):
        """The GGUF file beside the finished folder (shared weights written out per layer); the
        folder's card then lists it with its check."""
        from .export.unfold import unfold

        t = time.perf_counter()
        unfold(loaded)
        plan = _gguf_plan(self.opts.gguf, loaded)
        r = _write_gguf(self.opts.gguf, loaded, plan, source=source, layer_map=layer_map, force=self.opts.output.force,
                        progress=self.opts.progress)
        (folder / "README.md").write_text(card_text(r), encoding="utf-8")
        record_path = folder / "layerfold.json"
        record = json.loads(record_path.read_text(encoding="utf-8"))
        record["gguf"] = _gguf_record(r)
        if self.opts.output.reproducible:
            record = records.without_measurements(record)
        record_path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        self._timed("gguf", t)
        return r

    def _what_was_done(self, plan: Plan, evidence: Evidence, applied: Applied, heal_summary) -> dict:
        """``layerfold.json``'s ``recipe``: what was done, in the shape earlier outputs use."""
        o = self.opts
        what = {
            "method": plan.method,
            "selection": plan.selection,
            "repair": plan.repair,
            "remove": plan.layers_before - plan.layers_after,
            "sparsity": o.selection.sparsity,
            "removed_layers": plan.removed,
            "calibration": asdict(o.data) if self.selection.needs != "nothing" or self.repair.needs_text else None,
            "dtype": o.model.dtype,
            "heal": o.healing.recipe() if heal_summary else None,
        }
        if applied.streamline is not None:
            what["streamline"] = records.streamline_record(o.repair, applied.streamline)
        if applied.linear is not None:
            what["linear"] = applied.linear.to_dict()
        if applied.merge is not None:
            what["merge"] = applied.merge
        if evidence.search is not None:
            what["search"] = evidence.search
        if self.method.share:
            what.update(groups=plan.groups, share_init=o.foldgpt.share_init, gates=asdict(o.foldgpt.gates),
                        cure=asdict(o.foldgpt.cure) if self.cures else None)
        return what

    def _summary(self, plan: Plan, applied: Applied, heal_summary) -> str:
        if self.method.share:
            return records.foldgpt_summary(plan, self.opts.foldgpt.cure.steps if self.cures else 0)
        if applied.streamline is not None:
            text = records.streamline_summary(self.opts.repair, applied.streamline, plan.layers_before)
            return text + (" Then " + records.heal_sentence(heal_summary) if heal_summary else "")
        repaired = ""
        if applied.linear is not None:
            runs = applied.linear.runs
            repaired = (f" with ReplaceMe's linear repair ({applied.linear.options['objective']}): "
                        + ", ".join(f"layers {r['removed'][0]}..{r['removed'][1]} folded into layer {r['into']} "
                                    f"(fit error {r['removal_error']:.3f} -> {r['fit_error']:.3f})" for r in runs)
                        + ("; " + ", ".join(f"layers {a}..{b} unrepaired (no layer before them)"
                                            for a, b in applied.linear.unrepaired) if applied.linear.unrepaired else ""))
        if applied.merge is not None:
            repaired = " merged into the layers before them (LaCo's merge): " + ", ".join(
                f"layers {m['merged'][0]}..{m['merged'][-1]} into layer {m['into']}" for m in applied.merge["merged"])
        return (f"Removed {len(plan.removed)} of {plan.layers_before} decoder layers by `{plan.method}`"
                f" (selection {plan.selection}){repaired}; "
                + (records.heal_sentence(heal_summary) if heal_summary else "no retraining."))


def _without_measured_lines(text: str) -> str:
    """A JSON-lines log without its measured entries (``report.record.MEASURED``)."""
    return "".join(json.dumps(records.without_measurements(json.loads(line))) + "\n"
                   for line in text.splitlines() if line.strip())


def _write_report(out: Path, record: dict, eval_before, eval_after) -> Path | None:
    """Evaluation results and the HTML report, added to the model folder (still under its
    temporary name) once its weights, configs and tokenizer are written; a report that cannot
    be written is a warning, never a lost model.
    """
    import sys

    from .report.html import write_report

    try:
        if eval_before is not None:
            eval_before.save(out / "eval_before.json")
        if eval_after is not None:
            eval_after.save(out / "eval_after.json")
        return write_report(out, record, eval_before, eval_after)
    except (OSError, ImportError) as e:
        print(f"layerfold: warning: report not written: {e}", file=sys.stderr)
        return None


# -- heal, export, evaluate ----------------------------------------------------------------


@dataclass
class HealModelResult:
    output: Path
    heal: dict
    params: int
    seconds: dict[str, float]
    memory: dict | None = None  # --dry-run: train.memory.healing_needs


def heal_memory(opts: HealModelOptions) -> dict:
    """``layerfold heal --dry-run``: what healing would need in memory, from the shapes of the
    student and the teacher (their configs; no weight is read)."""
    from .healing import is_tied
    from .models.loading import model_skeleton, resolve_device, resolve_dtype
    from .train.memory import Shapes, healing_needs

    m = opts.model
    student = model_skeleton(m.model, dtype=m.dtype, device=m.device, trust_remote_code=m.trust_remote_code)
    teacher = None
    if opts.healing.needs_teacher:
        teacher = Shapes.of(*_skeleton_parts(model_skeleton(opts.teacher, dtype=m.dtype, device=m.device,
                                                            trust_remote_code=m.trust_remote_code)))
    dtype = resolve_dtype(m.dtype, resolve_device(m.device))
    return healing_needs(Shapes.of(*_skeleton_parts(student)), teacher, opts.healing,
                         seq_len=opts.healing.data.seq_len, dtype=dtype, tied=is_tied(student.model))


def _skeleton_parts(loaded: LoadedModel):
    return loaded.model, loaded.arch


def heal_model(opts: HealModelOptions) -> HealModelResult:
    """Load a compressed model and its teacher, heal, and save a new model folder."""
    from .healing import heal, healing_data, prepare_teacher

    validation.check(opts)
    if opts.no_teacher:
        opts = replace(opts, healing=replace_heal_losses_without_teacher(opts.healing))
    if opts.model.model is None:
        raise LayerfoldError("give the compressed model folder to heal")
    if opts.output.dry_run:  # the shapes only (configs): what each plan would need in memory
        return HealModelResult(Path(opts.output.path or "."), {}, 0, {}, memory=heal_memory(opts))
    out = Path(opts.output.path or f"{Path(opts.model.model.rstrip('/')).name}-healed")
    check_output_dir(out, opts.output.force, protect=Path(opts.model.model) if Path(opts.model.model).is_dir() else None)
    student_dir = locate_model(opts.model.model)[4]  # a path that is not a model fails now, not after the teacher's work
    previous = _previous_record(student_dir)
    # the student's own layer map: the mse loss compares its last layers with the ones they came from
    layer_map = LayerMap.from_list(previous["layer_map"], previous.get("layers_before")) \
        if previous.get("layer_map") else None
    seconds: dict[str, float] = {}
    teacher = ids = prepared = None
    procs = processes()  # under `accelerate launch`: data-parallel healing (train/parallel.py)
    if procs.parallel and procs.device is not None and procs.device.type != "cpu" and opts.model.placement is None:
        opts = replace(opts, model=replace(opts.model, device=str(procs.device)))  # one GPU per process
    if opts.healing.needs_teacher:
        # the teacher first: its outputs are cached on disk, and then it leaves memory before
        # the student arrives, so the two never need room together (big models, device maps)
        t = time.perf_counter()
        teacher = _load(replace(opts.model, model=opts.teacher))  # the student's loading options
        seconds["load teacher"] = time.perf_counter() - t
        t = time.perf_counter()
        with procs.main_first():  # the main process writes the text and the teacher cache, the others read them
            ids = healing_data(opts.healing, teacher)
            prepared = prepare_teacher(opts.healing, teacher, ids, layer_map.kept if layer_map else None)
        seconds["teacher outputs"] = time.perf_counter() - t
    t = time.perf_counter()
    student = _load(opts.model)
    seconds["load"] = time.perf_counter() - t
    if teacher is not None and teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise LayerfoldError("the teacher and the student use different tokenizers")
    teacher_base = teacher.base_model if teacher is not None else None
    if opts.healing.teacher_cache:
        teacher = None
        _free_memory()
    n_layers = len(decoder_layers(student.model, student.arch))
    t = time.perf_counter()
    if ids is None:  # no teacher: the student reads (or writes) the text
        with procs.main_first():
            ids = healing_data(opts.healing, student)
    result = heal(student, teacher, opts.healing, ids=ids, prepared_teacher=prepared,
                  layer_map=layer_map.kept if layer_map else None)
    layer_map = layer_map or LayerMap.identity(n_layers)
    seconds["heal"] = time.perf_counter() - t
    summary = result.summary()
    params = count_parameters(student.model)
    recipe = dict(previous.get("recipe") or {"method": "healed"})
    recipe["heal"] = opts.healing.recipe()
    base = previous.get("base_model") or teacher_base or student.base_model
    recipe_yaml = recipes.to_yaml(opts)
    card = model_card(
        base_model=base, command=opts.command(), recipe=recipe, layer_map=layer_map.to_list(),
        params_before=previous.get("params_before") or params, params_after=params,
        layers_before=layer_map.layers_before, summary=f"{student.source} {records.heal_sentence(summary)}",
        recipe_yaml=recipe_yaml, environment=records.environment(opts),
    )
    record = dict(previous, layerfold_version=records.version(), **records.environment(opts), base_model=base,
                  source=student.source, command=opts.command(), recipe=recipe, layer_map=layer_map.to_list(),
                  heal=summary, params_after=params, options=recipes.schema.to_dict(recipes.absolute_paths(opts)))
    if opts.output.reproducible:
        record = records.without_measurements(record)
    if not procs.main:  # the weights are the same in every process: the main one saves them
        procs.wait()
        return HealModelResult(out, summary, params, seconds)
    t = time.perf_counter()
    files = {"layerfold.json": json.dumps(record, indent=2, default=str) + "\n", recipes.RECIPE_FILE: recipe_yaml}
    from .export.shared import save_shared_folder  # a shared model stays shared (a standard one: standard)

    out = save_shared_folder(student, out, card=card, force=opts.output.force, extra_files=files)
    seconds["save"] = time.perf_counter() - t
    procs.wait()
    return HealModelResult(out, summary, params, seconds)


def _previous_record(folder: Path | None) -> dict:
    """The ``layerfold.json`` of a model layerfold made (its layer map, base model, recipe)."""
    if folder is not None and (folder / "layerfold.json").is_file():
        return json.loads((folder / "layerfold.json").read_text())
    return {}


def _free_memory() -> None:
    """Hand the memory of dropped models back (to the OS on CPU, to the allocator's pool on GPU)."""
    import gc

    import torch

    from .models.lazy import return_freed_memory

    gc.collect()
    return_freed_memory()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def replace_heal_losses_without_teacher(h):
    return replace(h, ce=h.ce or 1.0, kl=0.0, mse=0.0)


def export(opts: ExportOptions, loaded: LoadedModel | None = None) -> dict:
    """Write a finished model as a standard folder (``-o``: shared tensors materialised) and/or
    as a GGUF file for llama.cpp (``--gguf``), read back and checked."""
    from .export.unfold import unfold

    validation.check(opts, loaded)
    out_dir = Path(opts.output.path) if opts.output.path else None
    if out_dir is None and not opts.gguf.enabled:
        raise LayerfoldError("export needs an output: -o OUT (a standard model folder) and/or --gguf OUT.gguf")
    if not opts.unfold:
        raise LayerfoldError("shared tensors are always materialised on export (--unfold)")
    opts.gguf.validate()
    if out_dir is not None:
        check_output_dir(out_dir, opts.output.force)
    if opts.gguf.enabled:
        from .export.gguf import check_gguf_path

        check_gguf_path(opts.gguf.path, opts.output.force)
    loaded = loaded or _load(opts.model)
    previous = _previous_record(loaded.local_dir)
    plan = _gguf_plan(opts.gguf, loaded, previous.get("source"))  # before any writing: what llama.cpp cannot express is refused
    stored = count_parameters(loaded.model)
    n = unfold(loaded)
    n_layers = len(decoder_layers(loaded.model, loaded.arch))
    layer_map = previous.get("layer_map") or list(range(n_layers))  # unfolding keeps every layer where it is
    source = previous.get("source") or loaded.source
    result = {"output": None, "unshared_tensors": n, "params_stored_before": stored,
              "params_after": count_parameters(loaded.model), "bytes_on_disk": 0, "gguf": None}
    gguf = None
    if opts.gguf.enabled:
        gguf = _write_gguf(opts.gguf, loaded, plan, source=source, layer_map=layer_map, force=opts.output.force,
                           progress=opts.progress)
        result["gguf"] = gguf
    if out_dir is not None:
        command = recipes.schema.command_line(opts, ExportOptions(), ["layerfold", "export"])
        summary = (f"Unfolded: {n} shared weight tensors written out per layer, for tools that cannot express sharing."
                   if n else "A standard model folder.")
        card = model_card(
            base_model=previous.get("base_model") or loaded.base_model, command=command,
            recipe={"method": "unfold", "unshared_tensors": n, "from": previous.get("recipe")}, layer_map=layer_map,
            params_before=stored, params_after=count_parameters(loaded.model),
            layers_before=previous.get("layers_before") or n_layers, summary=summary,
            recipe_yaml=recipes.to_yaml(opts), outputs=_checked_outputs(gguf=gguf),
        )
        files = {recipes.RECIPE_FILE: recipes.to_yaml(opts)}
        if previous:
            files["layerfold.json"] = json.dumps(dict(previous, unfolded=n, params_after=count_parameters(loaded.model)),
                                                 indent=2, default=str) + "\n"
        out = save_model_folder(loaded, out_dir, card=card, force=opts.output.force, extra_files=files)
        result.update(output=out, bytes_on_disk=folder_bytes(out))
    return result


def _gguf_plan(gguf_opts, loaded: LoadedModel, source: str | None = None):
    """What the GGUF file will say (None without --gguf); refuses what llama.cpp cannot express
    (the architecture, its settings, the tokenizer)."""
    if not gguf_opts.enabled:
        return None
    from .export.gguf import check_llama_cpp, gguf_tokenizer

    plan = check_llama_cpp(loaded.model.config)
    gguf_tokenizer(loaded, source if source is not None else loaded.source)
    return plan


def _write_gguf(gguf_opts, loaded: LoadedModel, plan, *, source, layer_map, force: bool, progress: bool):
    """Write the GGUF file, then read it back with transformers and compare logits (``check``)."""
    from .export.gguf import check_with_transformers, write_gguf
    from .models.lazy import materialize

    materialize(loaded.model, loaded.arch)
    r = write_gguf(loaded, gguf_opts.path, gguf_opts.outtype, plan=plan, source=source, layer_map=layer_map,
                   force=force, progress=progress)
    if not gguf_opts.check:
        r.check = {"tool": "none", "passed": None, "error": "skipped (--no-gguf-check)"}
    else:
        try:
            r.check = check_with_transformers(loaded, r.path, r.outtype, tokens=min(16, plan.context_length))
        except Exception as e:  # the file is written; a reader that fails is reported, not fatal
            first = (str(e).strip().splitlines() or [""])[0]
            r.check = {"tool": "transformers (from_pretrained gguf_file=)", "passed": None,
                       "error": f"{type(e).__name__}: {first}"}
    return r


def _gguf_record(r) -> dict:
    return {"file": str(r.path), "outtype": r.outtype, "arch": r.arch, "tensors": r.tensors, "bytes": r.bytes,
            "tokenizer": r.tokenizer, "notes": r.notes, "check": r.check}


def _checked_outputs(*, gguf=None, mergekit: str | None = None) -> list[str]:
    """The model card's list of outputs and what each was checked with."""
    lines = ["this folder: saved with transformers' `save_pretrained`; layerfold's tests reload folders like it "
             "with stock `AutoModelForCausalLM.from_pretrained` and compare logits"]
    if gguf is not None:
        c = gguf.check
        if c is None:
            how = (f"not read back here (transformers cannot read {gguf.arch} GGUF files); "
                   "layerfold's GGUF writer is checked for this family with llama.cpp in benchmarks/interop.md")
        elif c.get("passed") is None:
            how = f"not read back: {c['error']}" if c["tool"] == "none" else f"reading it back with {c['tool']} failed: {c['error']}"
        else:
            how = (f"read back with {c['tool']}: max |logit difference| {c['max_abs_logit_diff']:.3g} on "
                   f"{c['tokens']} tokens, top-1 agreement {c['top1_agreement']:.0%}"
                   + ("" if c["passed"] else " (MORE THAN EXPECTED FOR " + gguf.outtype + ")"))
        if c is not None:
            how += ("; llama.cpp itself was not run on this file (benchmarks/interop.md runs layerfold's GGUF files "
                    "of every family in llama.cpp through llama-cpp-python)")
        lines.append(f"`{gguf.path.name}` ({gguf.outtype}, llama.cpp architecture `{gguf.arch}`, tokenizer "
                     f"{gguf.tokenizer}): {how}")
        lines += [f"`{gguf.path.name}`: note: {n}" for n in gguf.notes]
    if mergekit:
        lines.append(f"`{mergekit}`: mergekit passthrough slices of the original that rebuild this model's layers "
                     "before healing; layerfold's tests (and benchmarks/interop.md) compare mergekit's output with "
                     "layerfold's bitwise")
    return lines


def evaluate_model(opts: EvaluateOptions):
    """``layerfold eval``: the model's result, and its reference's (evaluated the same way, or
    read from its JSON result) when one is given: (reference or None, result)."""
    from .eval import EvalResult, evaluate

    validation.check(opts)
    kw = dict(tasks=list(opts.tasks), ppl=list(opts.ppl), limit=opts.limit, batch_size=opts.batch_size,
              data_dir=opts.data_dir, ppl_window=opts.ppl_window, ppl_stride=opts.ppl_stride,
              ppl_limit=opts.ppl_limit, speed=opts.speed, progress=opts.progress)
    reference = None
    if opts.reference:
        if opts.reference.endswith(".json") and os.path.isfile(opts.reference):
            reference = EvalResult.load(opts.reference)
        else:
            source = None if opts.reference == "embedded" else opts.reference
            reference = evaluate(_load(replace(opts.model, model=source)), **kw)
            if opts.reference_json:
                reference.save(opts.reference_json)
    loaded = _load(opts.model)
    result = evaluate(loaded, reference=reference, **kw)
    if opts.lm_eval:
        from .eval.lm_eval_bridge import run_lm_eval

        result.settings["lm_eval"] = run_lm_eval(loaded, list(opts.lm_eval), limit=opts.limit,
                                                 batch_size=opts.batch_size, data_dir=opts.data_dir)
    return reference, result

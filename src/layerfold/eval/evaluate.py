"""``evaluate``: accuracy, perplexity, stability and cost of one model, in one call."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LayerfoldError
from .cost import measure_cost
from .perplexity import perplexity, read_documents
from .result import EvalResult, TaskResult, language_modeling_result, multiple_choice_result
from .scoring import score_examples
from .tasks import LANGUAGE_MODELING, Task, load_task, resolve_task_path, task_name
from .tasks import data_dir as find_data_dir

DEFAULT_PPL_WINDOW = 512


@dataclass
class EvalOptions:
    """What ``compress`` measures before and after, for the report in the output folder.

    By default what needs no data set: KL to the original, top-1 agreement and perplexity on
    ``heldout_rows`` held-out rows (``eval.heldout``), the cost figures with speed timed in
    alternation (``eval.before_after``), and perplexity on the first ``ppl_limit`` LAMBADA
    documents when the shared data folder is found; tasks only when asked for.
    """

    tasks: list[str] = field(default_factory=list, metadata={
        "help": "tasks (piqa, winogrande, ... or .jsonl paths) to measure before and after "
                "(default: none; only perplexity on a slice of LAMBADA if the data folder is found)"})
    limit: int | None = field(default=None, metadata={"help": "first N examples of each task (default: all)"})
    ppl: list[str] | None = field(default=None, metadata={
        "help": "perplexity texts (default: lambada_openai if found; '' for none)"})
    ppl_limit: int = field(default=20, metadata={"help": "documents of each perplexity text", "flag": "--eval-ppl-docs"})
    data_dir: str | None = field(default=None, metadata={
        "help": "folder holding tasks/*.jsonl (default: $LAYERFOLD_DATA, else ../shared/data if present)",
        "flag": "--data-dir", "path": True})
    enabled: bool = field(default=True, metadata={"help": "measure nothing before and after", "flag": "--no-eval"})
    report: bool = field(default=True, metadata={"help": "do not write report.html and figures/", "flag": "--no-report"})
    batch_size: int = field(default=8, metadata={"help": "examples per forward pass (results do not depend on it)"})
    heldout_rows: int = field(default=8, metadata={
        "help": "held-out rows of calibration-style text (self-written with seed 2, or the rows after the calibration "
                "rows of a file): KL to the original, top-1 agreement and perplexity, no data set needed; 0: none"})
    heldout_every: int = field(default=0, metadata={
        "help": "while healing, fit the held-out rows every N optimizer steps (the learning curve in "
                "layerfold.json's heal_curve); 0: about four times a run (every steps // 4)"})
    speed_rounds: int = field(default=7, metadata={
        "help": "rounds of alternating speed runs, original then compressed (median and range of the ratio); "
                "keeps a copy of the original in memory until then; 0: no speed measurement"})

    def validate(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise LayerfoldError(f"--eval-limit must be at least 1 (got {self.limit})")
        if self.batch_size < 1:
            raise LayerfoldError(f"--eval-batch-size must be at least 1 (got {self.batch_size})")
        if self.heldout_rows < 0 or self.speed_rounds < 0 or self.heldout_every < 0:
            raise LayerfoldError("--eval-heldout-rows, --eval-heldout-every and --eval-speed-rounds must be 0 or more")

    def evaluate_kwargs(self) -> dict | None:
        """Arguments for :func:`evaluate`, or None when nothing is to be measured."""
        if not self.enabled:
            return None
        ppl = self.ppl
        if ppl is None:
            ppl = []
            root = find_data_dir(self.data_dir)
            if root is not None:
                try:
                    resolve_task_path("lambada_openai", root)
                    ppl = ["lambada_openai"]
                except LayerfoldError:
                    pass
        return dict(tasks=list(self.tasks), ppl=list(ppl), limit=self.limit, ppl_limit=self.ppl_limit,
                    data_dir=self.data_dir, batch_size=self.batch_size, speed=False)  # speed: alternating, later


def _as_model(model, tokenizer):
    """(model, tokenizer, name, path on disk) from a LoadedModel, a module, or something to load."""
    from ..models.loading import LoadedModel, load_model

    if model is None or isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    if isinstance(model, LoadedModel):
        path = model.local_dir
        if path is None and str(model.source).lower().endswith(".gguf"):
            path = Path(model.source)
        if path is None and model.source.startswith("embedded:"):
            from ..models.loading import embedded_model_path

            path = embedded_model_path()
        return model.model, tokenizer or model.tokenizer, model.source, path
    if tokenizer is None:
        raise LayerfoldError("evaluate(model, tokenizer): a tokenizer is needed with a bare model")
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    return model, tokenizer, name, None


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None, None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="ex", leave=False)
    return bar, bar.update


def evaluate_task(model, tokenizer, task: Task, *, batch_size: int = 8, add_bos: bool = False,
                  progress: bool = False) -> TaskResult:
    """Score one task; metrics as lm-evaluation-harness defines them."""
    t0 = time.perf_counter()
    bar, update = _progress(len(task.examples), task.name, progress)
    scored, stats = score_examples(model, tokenizer, [ex.requests for ex in task.examples],
                                   batch_size=batch_size, add_bos=add_bos, progress=update)
    if bar:
        bar.close()
    kw = {"stats": vars(stats), "seconds": time.perf_counter() - t0, "path": task.path}
    if task.kind == LANGUAGE_MODELING:
        rows = [{"ll": s[0].loglik, "greedy": s[0].greedy, "tokens": s[0].tokens} for s in scored]
        return language_modeling_result(task.name, rows, **kw)
    rows = [{"ll": [s.loglik for s in ss], "chars": ex.choice_chars, "gold": ex.gold}
            for ss, ex in zip(scored, task.examples)]
    return multiple_choice_result(task.name, rows, **kw)


def default_ppl_window(model) -> int:
    """``DEFAULT_PPL_WINDOW``, shortened to the model's positions when it was trained for fewer."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(DEFAULT_PPL_WINDOW, positions) if isinstance(positions, int) and positions > 1 else DEFAULT_PPL_WINDOW


def evaluate(
    model=None,
    tokenizer=None,
    *,
    tasks: Sequence[str | os.PathLike | Task] = (),
    ppl: Sequence[str | os.PathLike] = (),
    limit: int | None = None,
    batch_size: int = 8,
    reference: EvalResult | str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    ppl_window: int | None = None,
    ppl_stride: int | None = None,
    ppl_limit: int | None = None,
    ppl_max_tokens: int | None = None,
    cost: bool = True,
    speed: bool = True,
    speed_tokens: tuple[int, int] = (256, 32),
    add_bos: bool = False,
    progress: bool = False,
    name: str | None = None,
) -> EvalResult:
    """Evaluate a model on multiple-choice / LAMBADA-style tasks and perplexity texts.

    ``model``: a ``LoadedModel``, a Hugging Face causal LM (then pass ``tokenizer``), or a
    source to load (folder, hub id, .gguf, None for the embedded model).
    ``tasks``: task names (``piqa`` -> ``<data>/tasks/piqa.jsonl``), paths, or ``Task`` objects.
    ``ppl``: .txt/.jsonl files or task names whose text is scored with a fixed window
    (``ppl_window``; by default ``DEFAULT_PPL_WINDOW`` tokens, or the model's positions if fewer).
    ``limit``: first N examples of each task (and documents of each perplexity text unless
    ``ppl_limit`` is given). ``reference``: an ``EvalResult`` (or its JSON file) of the
    original model on the same tasks and limit; fills ``stability`` per task.
    ``cost``/``speed``: parameters and sizes / also prefill and decode tokens per second
    (``speed_tokens``: tokens of the prefill and of the decode measurement).
    """
    t0 = time.perf_counter()
    if batch_size < 1:
        raise LayerfoldError(f"batch size must be at least 1 (got {batch_size})")
    if limit is not None and limit < 1:
        raise LayerfoldError(f"limit must be at least 1 (got {limit})")
    # read every input before the slow work, so a typo fails at once
    loaded_tasks = [t if isinstance(t, Task) else load_task(resolve_task_path(str(t), data_dir), limit)
                    for t in tasks]
    ppl_docs = []
    for p in ppl:
        path = resolve_task_path(str(p), data_dir)
        ppl_docs.append((task_name(path), str(path), read_documents(path, ppl_limit or limit)))
    if isinstance(reference, (str, os.PathLike)):
        reference = EvalResult.load(reference)

    was_training = None
    model_obj, tok, model_name, disk_path = _as_model(model, tokenizer)
    was_training = model_obj.training
    model_obj.eval()
    try:
        result = EvalResult(model=name or model_name)
        if ppl_window is None:
            ppl_window = default_ppl_window(model_obj)
        result.settings = {"limit": limit, "batch_size": batch_size, "ppl_window": ppl_window,
                           "ppl_stride": ppl_stride or ppl_window, "add_bos": add_bos,
                           "dtype": str(next(model_obj.parameters()).dtype).replace("torch.", "")}
        for task in loaded_tasks:
            result.tasks[task.name] = evaluate_task(model_obj, tok, task, batch_size=batch_size,
                                                    add_bos=add_bos, progress=progress)
        for pname, path, docs in ppl_docs:
            r = perplexity(model_obj, tok, docs, window=ppl_window, stride=ppl_stride,
                           batch_size=max(1, batch_size // 2), max_tokens=ppl_max_tokens, name=pname)
            r.path = path
            result.perplexity[pname] = r
        if cost:
            result.cost = measure_cost(model_obj, path=disk_path, speed=speed, prefill_tokens=speed_tokens[0],
                                       decode_tokens=speed_tokens[1])
        if reference is not None:
            result.add_stability(reference)
    finally:
        if was_training:
            model_obj.train()
    result.seconds = time.perf_counter() - t0
    return result

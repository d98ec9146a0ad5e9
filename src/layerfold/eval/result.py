"""Evaluation results: metrics plus the per-example scores that stability needs, as JSON."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LayerfoldError
from .cost import Cost
from .perplexity import PerplexityResult
from .stability import agreement, effective_examples, stability
from .tasks import LANGUAGE_MODELING, MULTIPLE_CHOICE

FORMAT = "layerfold-eval/1"


@dataclass
class TaskResult:
    """One task. ``examples`` hold the raw scores:

    multiple choice: ``{"ll": [per choice], "chars": [per choice], "gold": int}``;
    language modelling: ``{"ll": float, "greedy": bool, "tokens": int}``.
    """

    name: str
    kind: str
    metrics: dict[str, float]
    examples: list[dict]
    stats: dict = field(default_factory=dict)
    seconds: float = 0.0
    path: str = ""

    @property
    def n(self) -> int:
        return len(self.examples)

    # per-example views used by the metrics and by stability
    def scores(self, norm: bool = False) -> list[list[float]]:
        if norm:
            return [[l / max(c, 1) for l, c in zip(e["ll"], e["chars"])] for e in self.examples]
        return [list(e["ll"]) for e in self.examples]

    def correct(self, norm: bool = False) -> list[bool]:
        return [int(np.argmax(s)) == e["gold"] for s, e in zip(self.scores(norm), self.examples)]


def multiple_choice_result(name: str, examples: list[dict], **kw) -> TaskResult:
    r = TaskResult(name, MULTIPLE_CHOICE, {}, examples, **kw)
    r.metrics = {"acc": float(np.mean(r.correct())), "acc_norm": float(np.mean(r.correct(norm=True)))}
    return r


def language_modeling_result(name: str, examples: list[dict], **kw) -> TaskResult:
    """lm-evaluation-harness's LAMBADA metrics: greedy accuracy of the last word, and
    perplexity = exp(-mean log-likelihood of the last word over documents)."""
    r = TaskResult(name, LANGUAGE_MODELING, {}, examples, **kw)
    lls = np.array([e["ll"] for e in examples])
    r.metrics = {"acc": float(np.mean([e["greedy"] for e in examples])), "perplexity": float(math.exp(-lls.mean()))}
    return r


@dataclass
class EvalResult:
    model: str
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    perplexity: dict[str, PerplexityResult] = field(default_factory=dict)
    cost: Cost | None = None
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    reference: str | None = None  # the model whose answers stability compares against
    heldout: dict | None = None  # eval.heldout.HeldoutFit.to_dict(): KL, top-1, perplexities vs the original

    def add_stability(self, reference: EvalResult) -> None:
        """Fill ``stability`` (and ``stability_norm``) of every multiple-choice task both results have."""
        for name, task in self.tasks.items():
            ref = reference.tasks.get(name)
            if task.kind != MULTIPLE_CHOICE or ref is None:
                continue
            if ref.n != task.n or any(a["gold"] != b["gold"] for a, b in zip(ref.examples, task.examples)):
                raise LayerfoldError(
                    f"task {name}: the reference was evaluated on other examples ({ref.n} vs {task.n}); "
                    "use the same --limit"
                )
            task.metrics["stability"] = stability(ref.scores(), ref.correct(), task.correct())
            task.metrics["stability_norm"] = stability(ref.scores(True), ref.correct(True), task.correct(True))
            task.metrics["stability_examples"] = effective_examples(ref.scores())
            task.metrics["agreement"] = agreement(ref.correct(), task.correct())
        self.reference = reference.model

    def summary(self) -> dict[str, float]:
        """Flat ``{"piqa/acc": 0.63, "ppl/wiki": 21.4, "cost/parameters": ...}``."""
        out: dict[str, float] = {}
        for name, t in self.tasks.items():
            for k, v in t.metrics.items():
                out[f"{name}/{k}"] = v
        for name, p in self.perplexity.items():
            out[f"ppl/{name}"] = p.perplexity
        if self.heldout:
            for k in ("kl", "top1", "ppl"):
                out[f"heldout/{k}"] = self.heldout[k]
        if self.cost:
            for k in ("parameters", "weight_bytes", "bytes_on_disk", "peak_memory_bytes", "prefill_tokens_per_s",
                      "decode_tokens_per_s"):
                v = getattr(self.cost, k)
                if v is not None:
                    out[f"cost/{k}"] = v
        return out

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "model": self.model,
            "reference": self.reference,
            "settings": self.settings,
            "seconds": self.seconds,
            "summary": self.summary(),
            "tasks": {k: asdict(v) for k, v in self.tasks.items()},
            "perplexity": {k: asdict(v) for k, v in self.perplexity.items()},
            "cost": asdict(self.cost) if self.cost else None,
            "heldout": self.heldout,
        }

    @classmethod
    def from_dict(cls, d: dict) -> EvalResult:
        if d.get("format") != FORMAT:
            raise LayerfoldError(f"not a layerfold evaluation result (format {d.get('format')!r})")
        return cls(
            model=d["model"],
            tasks={k: TaskResult(**v) for k, v in d.get("tasks", {}).items()},
            perplexity={k: PerplexityResult(**v) for k, v in d.get("perplexity", {}).items()},
            cost=Cost(**d["cost"]) if d.get("cost") else None,
            settings=d.get("settings", {}),
            seconds=d.get("seconds", 0.0),
            reference=d.get("reference"),
            heldout=d.get("heldout"),
        )

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        write_text_atomically(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalResult:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise LayerfoldError(f"{path}: {e.strerror}") from None
        except json.JSONDecodeError:
            raise LayerfoldError(f"{path}: not JSON") from None
        return cls.from_dict(d)


def write_text_atomically(path: Path, text: str) -> None:
    """Write a file under a temporary name and rename it into place: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

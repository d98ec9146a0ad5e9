"""Benchmark tasks read from JSON lines, in the layout of ``../shared/data/tasks``.

Three layouts, told apart by their keys:

- multiple choice ``{"query", "choices", "gold"}`` (PIQA, ARC, BoolQ): every choice is
  scored as a continuation of the same context;
- partial scoring ``{"context_options", "continuation", "gold"}`` (WinoGrande): the same
  continuation is scored after each context;
- language modelling ``{"context", "continuation"}`` (LAMBADA): the continuation's
  log-likelihood and whether greedy decoding would produce it.

How a query becomes a context follows lm-evaluation-harness's prompts where the data allow
(``TASK_FORMATS``); a task not listed there uses the query as it is.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LayerfoldError

MULTIPLE_CHOICE = "multiple_choice"
LANGUAGE_MODELING = "language_modeling"


@dataclass(frozen=True)
class TaskFormat:
    """How a query becomes the context, and what separates the context from a choice."""

    template: str = "{query}"
    delimiter: str = " "


#: lm-evaluation-harness prompts ("Question: ...\nAnswer:" then " " + choice), rebuilt from
#: the fields of the shared data; PIQA's query already ends in a newline.
TASK_FORMATS: dict[str, TaskFormat] = {
    "piqa": TaskFormat("{query}Answer:"),
    "arc_easy": TaskFormat("{query}\nAnswer:"),
    "arc_challenge": TaskFormat("{query}\nAnswer:"),
    "boolq": TaskFormat("{query}\nAnswer:"),
}


@dataclass
class Example:
    """One scored item: ``requests`` are (context, continuation) pairs, one per choice."""

    requests: list[tuple[str, str]]
    gold: int | None = None  # None for language modelling
    #: characters of each choice, the divisor of acc_norm (lm-evaluation-harness: len(choice))
    choice_chars: list[int] = field(default_factory=list)


@dataclass
class Task:
    name: str
    kind: str  # MULTIPLE_CHOICE or LANGUAGE_MODELING
    examples: list[Example]
    path: str = ""


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The shared data folder: ``explicit``, else ``$LAYERFOLD_DATA``, else ``../shared/data``."""
    for candidate in (explicit, os.environ.get("LAYERFOLD_DATA"), Path.cwd().parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    if explicit:
        raise LayerfoldError(f"--data-dir {explicit}: no such folder")
    return None


def resolve_task_path(name_or_path: str, data: str | os.PathLike | None = None) -> Path:
    """A path as given, or a bare name like ``piqa`` looked up as ``<data>/tasks/piqa.jsonl``."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    root = data_dir(data)
    if root is not None and os.sep not in name_or_path and "/" not in name_or_path:
        for candidate in (root / "tasks" / f"{name_or_path}.jsonl", root / f"{name_or_path}.jsonl",
                          root / "tasks" / name_or_path, root / name_or_path):
            if candidate.is_file():
                return candidate
    where = f" (looked in {root})" if root else " (no data folder: pass --data-dir or set LAYERFOLD_DATA)"
    raise LayerfoldError(f"task {name_or_path!r}: no such file{where}")


def task_name(path: Path) -> str:
    name = path.name
    for suffix in (".jsonl", ".json"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _read_rows(path: Path, limit: int | None) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LayerfoldError(f"{path}:{lineno}: not JSON ({e.msg})") from None
                if limit is not None and len(rows) >= limit:
                    break
    except OSError as e:
        raise LayerfoldError(f"{path}: {e.strerror}") from None
    if not rows:
        raise LayerfoldError(f"{path}: no examples")
    return rows


def load_task(path: str | os.PathLike, limit: int | None = None, fmt: TaskFormat | None = None,
              name: str | None = None) -> Task:
    """Read a task file; ``limit`` keeps its first N examples."""
    path = Path(path)
    name = name or task_name(path)
    fmt = fmt or TASK_FORMATS.get(name, TaskFormat())
    rows = _read_rows(path, limit)
    first = rows[0]
    examples: list[Example] = []
    try:
        if "choices" in first and "query" in first:
            kind = MULTIPLE_CHOICE
            for r in rows:
                ctx = fmt.template.format(query=r["query"])
                choices = [str(c) for c in r["choices"]]
                examples.append(Example([(ctx, fmt.delimiter + c) for c in choices], int(r["gold"]),
                                        [len(c) for c in choices]))
        elif "context_options" in first:
            kind = MULTIPLE_CHOICE
            for r in rows:
                cont = fmt.delimiter + r["continuation"]
                examples.append(Example([(c, cont) for c in r["context_options"]], int(r["gold"]),
                                        [len(r["continuation"])] * len(r["context_options"])))
        elif "context" in first and "continuation" in first:
            kind = LANGUAGE_MODELING
            for r in rows:
                examples.append(Example([(r["context"], fmt.delimiter + r["continuation"])]))
        else:
            raise LayerfoldError(
                f"{path}: unknown task layout (keys {sorted(first)}); expected query/choices/gold, "
                "context_options/continuation/gold or context/continuation"
            )
    except (KeyError, TypeError, ValueError) as e:
        raise LayerfoldError(f"{path}: malformed example ({type(e).__name__}: {e})") from None
    for i, ex in enumerate(examples):
        if ex.gold is not None and not 0 <= ex.gold < len(ex.requests):
            raise LayerfoldError(f"{path}: example {i} has gold {ex.gold} but {len(ex.requests)} choices")
    return Task(name, kind, examples, str(path))

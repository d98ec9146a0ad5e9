"""Refuse to train on evaluation data.

A healed model that has seen the benchmark's own questions reports an accuracy that means
nothing. Before healing reads a file, it is compared with every evaluation task file we know
of: by resolved path, by content hash, and line by line (a shuffled or truncated copy of a
task file is caught too).

Where evaluation files are looked for: ``$LAYERFOLD_EVAL_DATA`` (folders separated by
``os.pathsep``), then ``../shared/data/tasks`` beside the working directory and beside this
source tree's repository.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

from ..errors import LayerfoldError

#: a file sharing more than this fraction of its non-empty lines with one task file is refused
MAX_SHARED_LINES = 0.02
MIN_LINE_CHARS = 20  # short lines ("yes", "}", blank-ish) say nothing about where text came from


def eval_data_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("LAYERFOLD_EVAL_DATA", "").split(os.pathsep) if p]
    repo = Path(__file__).resolve().parents[3]  # src/layerfold/data/guard.py -> repository root
    dirs += [Path.cwd().parent / "shared" / "data" / "tasks", repo.parent / "shared" / "data" / "tasks"]
    seen, out = set(), []
    for d in dirs:
        d = d.expanduser().resolve()
        if d.is_dir() and d not in seen:
            seen.add(d)
            out.append(d)
    return out


def _eval_files() -> list[Path]:
    return sorted({p.resolve() for d in eval_data_dirs() for p in d.iterdir()
                   if p.is_file() and p.suffix.lower() in (".jsonl", ".json", ".txt", ".csv", ".tsv")})


def _line_hashes(path: Path) -> set[bytes]:
    """Hashes of each long line and, for JSON lines, of each long string value in it (so the
    text of a task pasted into a .txt file is recognised too)."""
    import json

    out = set()
    with path.open("rb") as f:
        for line in f:
            line = line.strip()
            if len(line) < MIN_LINE_CHARS:
                continue
            out.add(hashlib.sha1(line).digest())
            if line.startswith(b"{"):
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                for v in _strings(row):
                    v = v.strip().encode()
                    if len(v) >= MIN_LINE_CHARS:
                        out.add(hashlib.sha1(v).digest())
    return out


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


@lru_cache(maxsize=None)
def _fingerprint(path: str, size: int, mtime_ns: int) -> tuple[str, frozenset]:
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest(), frozenset(_line_hashes(p))


def _fp(path: Path):
    st = path.stat()
    return _fingerprint(str(path), st.st_size, st.st_mtime_ns)


def check_not_eval_data(source: str, what: str = "healing") -> None:
    """Raise ``LayerfoldError`` when ``source`` (a local file) is, or copies, an evaluation file."""
    if source == "self" or source.startswith("hf:"):
        return
    path = Path(source).expanduser()
    if not path.is_file():
        return  # reading it will report the problem
    path = path.resolve()
    digest, lines = _fp(path)
    for task in _eval_files():
        t_digest, t_lines = _fp(task)
        if path == task or digest == t_digest:
            raise LayerfoldError(f"{source} is the evaluation file {task.name}; {what} must never train on evaluation data")
        if lines and len(lines & t_lines) > MAX_SHARED_LINES * len(lines):
            shared = len(lines & t_lines)
            raise LayerfoldError(
                f"{source} shares {shared} of its {len(lines)} lines with the evaluation file {task.name}; "
                f"{what} must never train on evaluation data"
            )

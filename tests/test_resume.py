"""Killed with SIGKILL, restarted with ``--resume``: the same bytes as a run never killed.

Each run is a forked child of the test process (imports already done: a run of the tiny model
takes about a second). Wrappers around the stages' work units mark where the run is
(a calibration batch written, a batch of training pairs stored, a gate step, a training step
of the replacement, the healing or the cure, a checkpoint file written but not yet renamed
into place, a file of the output folder saved); the child SIGKILLs itself at one chosen mark.

An uninterrupted run first lists every mark in order; kill points are drawn from that list
with a seeded generator, one from each stratum of it (so they spread across the stages),
and a chain of runs, each killed at the next point and restarted with the same command,
ends in a run that finishes. Its folder is compared with the uninterrupted run's, every file
byte for byte (``--reproducible``: the folder holds no timings, so nothing is excluded).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import pytest
import torch

from layerfold.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 19  # the draw of kill points


def _name(path) -> str:
    """A file's name without the writing process's temporary suffix."""
    return Path(path).name.split(".tmp-")[0]


def _marks():
    """(object, attribute, mark of a call) of every work unit a kill can follow."""
    import safetensors.torch
    from transformers import modeling_utils

    from layerfold.data import calibration
    from layerfold.data.pairs import PairStore
    from layerfold.importance import gates
    from layerfold.train import loop

    def step(objective, rows, step, config, *a, **k):
        return ("step", config.desc, step + 1)

    return [
        (calibration, "_save_batch", lambda path, ids: ("calibration batch", Path(path).name)),
        (PairStore, "write", lambda self, first, *a, **k: ("pairs", first)),
        (gates, "_gate_step", lambda step, **k: ("gate step", step + 1)),
        (loop, "_step", step),
        (torch, "save", lambda obj, f, *a, **k: ("torch.save", _name(f),
                                                 obj.get("step") if isinstance(obj, dict) else None)),
        (safetensors.torch, "save_file", lambda tensors, f, *a, **k: ("save_file", _name(f))),
        (modeling_utils, "safe_save_file", lambda tensors, f, *a, **k: ("save_file", _name(f))),
    ]


def _instrumented(kill_at, seen):
    """Patch every work unit: record its mark after it ran; SIGKILL the process at ``kill_at``."""
    stack = ExitStack()
    for owner, name, mark_of in _marks():
        if not hasattr(owner, name):
            continue
        real = getattr(owner, name)

        def wrapper(*a, _real=real, _mark_of=mark_of, **k):
            out = _real(*a, **k)
            mark = _mark_of(*a, **k)
            seen(mark)
            if mark == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        stack.enter_context(mock.patch.object(owner, name, wrapper))
    return stack


def run_child(argv: list[str], cache: Path, trace: Path, kill_at=None) -> int | str:
    """Run ``layerfold ARGV`` in a forked child, its marks written to ``trace`` one line each as
    they happen; its exit code, or "killed"."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 97
        try:
            os.environ["LAYERFOLD_CACHE"] = str(cache)
            with trace.open("w", buffering=1) as f:  # line by line: what a killed child saw stays
                with _instrumented(tuple(kill_at) if kill_at else None, lambda m: f.write(repr(m) + "\n")):
                    code = main(["-q", *argv])
        except BaseException:  # noqa: BLE001 - a child must never return into pytest
            code = 98
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return "killed"
    return os.WEXITSTATUS(status)


def stage_of(mark: tuple) -> tuple:
    """The stage a mark belongs to: its kind, and for training steps and checkpoint files which one."""
    return mark[:2] if mark[0] in ("step", "torch.save") else mark[:1]


def kill_points(marks: list[tuple], n: int, seed: int) -> list[tuple]:
    """``n`` marks in run order: one from every stage (a random one of it), the rest drawn from
    the stages at random; a mark seen twice (a stage done again) is not a well-defined point
    and is never drawn."""
    unique = [m for m in marks if marks.count(m) == 1]
    stages: dict[tuple, list[tuple]] = {}
    for m in unique:
        stages.setdefault(stage_of(m), []).append(m)
    rng = random.Random(seed)
    chosen = rng.sample(sorted(stages), min(n, len(stages)))
    chosen += [rng.choice(sorted(stages)) for _ in range(n - len(chosen))]
    points: set[tuple] = set()
    for stage in chosen:
        left = [m for m in stages[stage] if m not in points] or [m for m in unique if m not in points]
        points.add(rng.choice(left))
    return sorted(points, key=unique.index)


def read_trace(path: Path) -> list[tuple]:
    return [eval(line) for line in path.read_text().splitlines()]  # noqa: S307 - the reprs run_child wrote


def resumes_at(point: tuple, every: int) -> tuple | None:
    """The first mark of the killed stage that a restart must do: the step after the last
    checkpoint (``every`` steps; a kill follows a step's work and comes before its
    checkpoint, or inside the checkpoint's writing), the batch of pairs whose rows were not
    yet marked done; None where the next run does the stage again or skips it."""
    kind = point[0]
    if kind == "step":
        return (kind, point[1], every * ((point[2] - 1) // every) + 1)
    if kind == "gate step":
        return (kind, every * ((point[1] - 1) // every) + 1)
    if kind == "pairs":
        return point
    return None


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _kill_and_resume(argv, tmp_path: Path, n_kills: int, must_see: set[str]):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    argv = [*argv, "--reproducible", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2", "--resume",
            "-o", str(out)]
    assert run_child(argv, tmp_path / "cache-a", tmp_path / "trace-0") == 0
    marks = read_trace(tmp_path / "trace-0")
    assert must_see <= {m[0] for m in marks}, {m[0] for m in marks}
    reference = folder_bytes(out)
    out.rename(tmp_path / "reference")
    shutil.rmtree(ckpt)

    points = kill_points(marks, n_kills, SEED)
    assert {stage_of(m) for m in marks if marks.count(m) == 1} <= {stage_of(p) for p in points}, points
    for i, point in enumerate(points, 1):
        assert run_child(argv, tmp_path / "cache-b", tmp_path / f"trace-{i}", kill_at=point) == "killed", point
        assert read_trace(tmp_path / f"trace-{i}")[-1] == point
        assert not out.exists()  # nothing half-written where the model goes
    assert run_child(argv, tmp_path / "cache-b", tmp_path / f"trace-{len(points) + 1}") == 0
    for i, point in enumerate(points, 1):  # each restart continued where the killed run had left its work
        expected = resumes_at(point, every=2)
        if expected is not None:
            after = [m for m in read_trace(tmp_path / f"trace-{i + 1}") if stage_of(m) == stage_of(expected)]
            assert after and after[0] == expected, (point, after[:3])
    resumed = folder_bytes(out)
    assert sorted(resumed) == sorted(reference)
    assert [name for name in reference if reference[name] != resumed[name]] == []
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # stale work swept
    return points


@pytest.mark.parametrize("loss", ["cosine", "lm"])
def test_streamline_and_healing_killed_eight_times(tiny_model_dir, tmp_path, loss):
    """Self-written calibration text, training pairs (a pair loss; lm, the default, trains in
    place without them), the replacement's training, the teacher cache and the healing, the final save."""
    argv = ["compress", tiny_model_dir("llama"), "--method", "streamline", "--remove", "2", "--calib", "self",
            "--calib-samples", "8", "--seq-len", "16", "--batch-size", "2",
            "--train-tokens", "128", "--train-data", "calib", "--loss", loss, "--pair-dtype", "fp32",
            "--heal-tokens", "256", "--heal-seq-len", "16", "--heal-batch-size", "2", "--no-eval"]
    expected = {"calibration batch", "step", "torch.save", "save_file"} | ({"pairs"} if loss == "cosine" else set())
    points = _kill_and_resume(argv, tmp_path, 8, expected)
    assert {p[1] for p in points if p[0] == "step"} == {f"training replacement ({loss})", "healing"}, points


def test_foldgpt_killed_five_times(tiny_model_dir, text_file, tmp_path):
    """Gate training, the cure, the final save."""
    argv = ["compress", tiny_model_dir("llama"), "--method", "foldgpt", "--remove", "2", "--group-size", "2",
            "--calib", text_file, "--calib-samples", "8", "--seq-len", "16", "--gate-steps", "8",
            "--cure-steps", "6", "--cure-samples", "8", "--no-eval"]
    points = _kill_and_resume(argv, tmp_path, 5, {"gate step", "step", "torch.save", "save_file"})
    assert {p[0] for p in points} == {"gate step", "step", "torch.save", "save_file"}, points


def test_kill_points_cover_every_stage_and_repeat():
    marks = ([("a", i) for i in range(10)] + [("b", 0), ("b", 0)] + [("step", "heal", i) for i in range(10)]
             + [("step", "cure", i) for i in range(3)])
    points = kill_points(marks, 5, 1)
    assert points == kill_points(marks, 5, 1) and ("b", 0) not in points
    order = [marks.index(p) for p in points]
    assert order == sorted(order) and len(set(order)) == 5
    assert {stage_of(p) for p in points} == {("a",), ("step", "heal"), ("step", "cure")}
    assert kill_points(marks, 5, 2) != points  # the seed draws the points

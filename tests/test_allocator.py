"""train.allocator: glibc's thresholds fixed at the start of training, so freed activations leave memory.

Each case runs in a fresh Python process: the thresholds are process-wide and last for good."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layerfold.train import allocator
from layerfold.train.allocator import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD

SRC = str(Path(__file__).resolve().parents[1] / "src")
glibc = pytest.mark.skipif(allocator._libc() is None, reason="glibc on Linux only")

# a training-like pattern: one big block freed (glibc then raises its mmap threshold to its size),
# many blocks of 1 MiB (below the raised threshold: from the heap), one small block kept above
# them, the many freed; then the resident memory above the start, in MiB
PATTERN = r"""
import json, os, sys, torch
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
if sys.argv[1] == "fixed":
    from layerfold.train.allocator import return_freed_memory
    set_ = return_freed_memory()
else:
    set_ = {}
start = rss()
big = torch.ones(4 * 2**20)  # 16 MiB
del big
many = [torch.ones(2**18) for _ in range(200)]  # 200 x 1 MiB, touched
keep = torch.ones(2**14)  # 64 KiB, after them
held = rss() - start
del many
after_free = rss() - start
if sys.argv[1] == "late":  # what a stage before training left in the heap
    from layerfold.train.allocator import return_freed_memory
    set_ = return_freed_memory()
print(json.dumps({"set": {str(k): v for k, v in set_.items()}, "held": held, "after_free": after_free,
                  "after_call": rss() - start}))
"""


def _run(code: str, *args: str, env: dict | None = None) -> dict:
    env = dict(os.environ if env is None else env, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}


@glibc
def test_freed_blocks_leave_memory_only_with_the_thresholds_fixed():
    plain = _run(PATTERN, "plain", env=_clean_env())
    fixed = _run(PATTERN, "fixed", env=_clean_env())
    assert fixed["set"] == {str(M_MMAP_THRESHOLD): True, str(M_TRIM_THRESHOLD): True}
    assert plain["held"] > 150 and fixed["held"] > 150  # the 200 MiB were resident in both
    assert plain["after_free"] > 150  # glibc's own behaviour: kept in its heap below the 64 KiB block
    assert fixed["after_free"] < 30  # each block was its own mapping, returned on free


@glibc
def test_what_the_heap_kept_before_training_is_given_back():
    late = _run(PATTERN, "late", env=_clean_env())
    assert late["after_free"] > 150 and late["after_call"] < 30


# after the thresholds are fixed, blocks above them are still cut from the heap's free chunks
# (what the stages before training left), and stay resident when freed until a trim
REUSE = r"""
import json, os, torch
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
big = torch.ones(4 * 2**20); del big
many = [torch.ones(2**18) for _ in range(200)]
keep = torch.ones(2**14)
del many
from layerfold.train.allocator import return_freed_memory, trim
return_freed_memory()
start = rss()
again = [torch.ones(2**18) for _ in range(200)]
held = rss() - start
del again
after_free = rss() - start
trim()
print(json.dumps({"held": held, "after_free": after_free, "after_trim": rss() - start}))
"""


@glibc
def test_blocks_cut_from_the_heap_during_training_leave_on_trim():
    out = _run(REUSE, env=_clean_env())
    assert out["held"] > 150
    assert out["after_free"] > 150  # freed inside the heap: resident although above the threshold
    assert out["after_trim"] < 30


def test_every_micro_batch_and_step_trims(monkeypatch):
    from layerfold.train import TrainConfig, fit, loop

    calls = []
    monkeypatch.setattr(loop, "trim", lambda: calls.append("trim"))
    w = torch.nn.Linear(2, 1)

    def objective(rows, autocast):
        calls.append("forward")
        return w(torch.ones(len(rows), 2)).pow(2).mean()

    fit(w, objective, TrainConfig(steps=2, batch_size=1, grad_accum=3), rows=6, trainable=None)
    assert calls == (["forward", "trim"] * 3 + ["trim"]) * 2


@glibc
def test_a_threshold_the_user_set_is_left_alone():
    code = ("import json; from layerfold.train.allocator import return_freed_memory as r; "
            "a = r(); print(json.dumps({str(k): v for k, v in a.items()}))")
    out = _run(code, env=dict(_clean_env(), MALLOC_MMAP_THRESHOLD_="1048576"))
    assert out == {str(M_MMAP_THRESHOLD): False, str(M_TRIM_THRESHOLD): True}


def test_not_glibc_does_nothing(monkeypatch):
    monkeypatch.setattr(allocator, "_DONE", None)
    monkeypatch.setattr(allocator, "_libc", lambda: None)
    assert allocator.return_freed_memory() == {}


def test_every_training_sets_it(monkeypatch):
    from layerfold.train import TrainConfig, fit, loop

    calls = []
    monkeypatch.setattr(loop, "return_freed_memory", lambda: calls.append(1))
    w = torch.nn.Linear(2, 1)
    fit(w, lambda rows, autocast: w(torch.ones(len(rows), 2)).pow(2).mean(), TrainConfig(steps=1, batch_size=2),
        rows=4, trainable=None)
    assert calls == [1]

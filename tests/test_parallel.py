"""Data-parallel healing under `accelerate launch`: 2 CPU processes over gloo on a tiny model.

The 2-process run with 2 rows per process must give the weights of a 1-process run with 4 rows
per micro-batch (the same global batch, the same rows in the same order), a killed 2-process
run resumed from its checkpoint the same weights again, and the teacher cache must be written
once, by the main process, for both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from layerfold.models.loading import load_model
from layerfold.train.parallel import Processes

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8  # optimizer steps of every run (4 rows of 32 tokens each)
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def pruned_dir(tiny_model_dir, tmp_path_factory):
    from layerfold.models.surgery import remove_layers

    loaded = load_model(tiny_model_dir("llama"), dtype="fp32", device="cpu")
    remove_layers(loaded.model, loaded.arch, [2, 3])
    folder = tmp_path_factory.mktemp("pruned")
    loaded.model.save_pretrained(folder, safe_serialization=True)
    loaded.tokenizer.save_pretrained(folder)
    return str(folder)


def _env(cache: Path) -> dict:
    env = dict(os.environ, LAYERFOLD_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONPATH=SRC,
               ACCELERATE_CONFIG_FILE=os.devnull)
    env.pop("WORLD_SIZE", None)
    return env


def _heal_args(pruned, teacher, text, out, batch, extra=()):
    return ["-m", "layerfold", "-q", "heal", pruned, "--teacher", teacher, "--heal-data", text,
            "--heal-seq-len", "32", "--heal-tokens", str(4 * 32 * STEPS), "--heal-batch-size", str(batch),
            "--lora-rank", "4", "--heal-lr", "3e-3",
            "--dtype", "fp32", "--device", "cpu", "-o", str(out), *extra]


def _launch_cmd(args, processes=2, port=29500):
    # --multi_gpu is accelerate's multi-process launcher (torchrun); with no GPU layerfold joins
    # the processes over gloo on the CPU
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port + os.getpid() % 100), *args]


def _launch(args, env, processes=2):
    return subprocess.run(_launch_cmd(args, processes), env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_equal_one_with_the_same_global_batch_and_resume(tiny_model_dir, pruned_dir, text_file, tmp_path):
    teacher = tiny_model_dir("llama")
    cache = tmp_path / "cache"
    env = _env(cache)
    one = subprocess.run([sys.executable, *_heal_args(pruned_dir, teacher, text_file, tmp_path / "one", 4)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    shutil.rmtree(cache)  # the 2-process run builds the cache itself

    two = _launch(_heal_args(pruned_dir, teacher, text_file, tmp_path / "two", 2), env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("saved to") == 1  # the main process reports and saves
    caches = [p for p in (cache / "teacher").iterdir()]
    assert len(caches) == 1 and (caches[0] / "meta.json").is_file(), caches  # written once, no leftovers

    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    original = _weights(Path(pruned_dir))
    moved = 0
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4), (k, (w1[k] - w2[k]).abs().max())
        moved += not torch.equal(w1[k], original[k])
    assert moved > 10  # healing changed the weights (merged LoRA updates)

    # resume: a 2-process run killed after a checkpoint, resumed, ends where the uninterrupted one did
    ck = tmp_path / "ck"
    extra = ["--checkpoint-dir", str(ck), "--checkpoint-every", "1"]
    step = _kill_after_a_checkpoint(_heal_args(pruned_dir, teacher, text_file, tmp_path / "killed", 2, extra), env, ck)
    assert 1 <= step < STEPS
    resumed = _launch(_heal_args(pruned_dir, teacher, text_file, tmp_path / "resumed", 2, [*extra, "--resume"]), env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    wr = _weights(tmp_path / "resumed")
    for k in w2:
        assert torch.allclose(w2[k], wr[k], atol=1e-6), k


def _kill_after_a_checkpoint(args, env, ck: Path) -> int:
    """Launch, wait for a checkpoint before the last step, kill the launcher and its workers;
    the step of the checkpoint left."""
    import signal
    import time

    p = subprocess.Popen(_launch_cmd(args, 2, 29700), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    path = ck / "checkpoint.pt"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None and not path.is_file():
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    return torch.load(path, weights_only=True)["step"]


def test_rows_split_into_equal_consecutive_parts():
    rows = [7, 3, 9, 1]
    assert Processes(2, 0).share(rows) + Processes(2, 1).share(rows) == rows
    assert Processes(2, 1).share(rows) == [9, 1]
    assert Processes().share(rows) == rows


def test_fsdp_is_refused_in_one_line(tiny_model_dir, tmp_path):
    env = dict(_env(tmp_path / "cache"), WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", ACCELERATE_USE_FSDP="true")
    r = subprocess.run([sys.executable, "-m", "layerfold", "heal", tiny_model_dir("llama"), "--teacher",
                        tiny_model_dir("llama"), "--heal-tokens", "64", "-o", str(tmp_path / "out")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]  # one line
    assert "FSDP healing is not supported" in r.stderr and "--device-map auto" in r.stderr
    assert not (tmp_path / "out").exists()

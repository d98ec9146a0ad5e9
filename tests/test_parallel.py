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

from conftest import saved_weights
from layerfold.models.loading import load_model
from layerfold.train.parallel import Processes

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8  # optimizer steps of every run (4 rows of 32 tokens each)
SRC = str(Path(__file__).resolve().parents[1] / "src")


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


# --multi_gpu is accelerate's multi-process launcher (torchrun); with no GPU layerfold joins
# the processes over gloo on the CPU. --use_fsdp: the same launcher, with ACCELERATE_USE_FSDP set
DDP = ("--multi_gpu",)
FSDP = ("--use_fsdp",)
# accelerate's loading on the main process only: layerfold shards the layers itself, so it is a
# no-op here (a one-line note), and must not change the weights
FSDP_RAM_EFFICIENT = (*FSDP, "--fsdp_cpu_ram_efficient_loading", "true", "--fsdp_sync_module_states", "true")


def _launch_cmd(args, processes=2, port=29500, launcher=DDP):
    return [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port + os.getpid() % 100), *args]


def _launch(args, env, processes=2, launcher=DDP):
    return subprocess.run(_launch_cmd(args, processes, launcher=launcher), env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, pruned_dir, text_file, tmp_path_factory):
    """The weights of a 1-process healing with 4 rows per micro-batch."""
    folder = tmp_path_factory.mktemp("one")
    one = subprocess.run([sys.executable, *_heal_args(pruned_dir, tiny_model_dir("llama"), text_file, folder / "out", 4)],
                         env=_env(folder / "cache"), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    return saved_weights(folder / "out")


def _equal(w1, w2, original, atol=1e-5, rtol=1e-4) -> None:
    assert w1.keys() == w2.keys()
    moved = 0
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=atol, rtol=rtol), (k, (w1[k] - w2[k]).abs().max())
        moved += not torch.equal(w1[k], original[k])
    assert moved > 10  # healing changed the weights (merged LoRA updates)


def _saved_once_cache_once(run, cache: Path) -> None:
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("saved to") == 1  # the main process reports and saves
    caches = [p for p in (cache / "teacher").iterdir()]
    assert len(caches) == 1 and (caches[0] / "meta.json").is_file(), caches  # written once, no leftovers


def _killed_and_resumed(launcher, pruned_dir, teacher, text_file, tmp_path, env, at_least: int = 1,
                        resume_launcher=None) -> dict:
    """A 2-process run killed after a checkpoint (of step ``at_least`` or later), then resumed
    (with ``resume_launcher``'s options if given): its weights."""
    ck = tmp_path / "ck"
    extra = ["--checkpoint-dir", str(ck), "--checkpoint-every", "1"]
    step = _kill_after_a_checkpoint(_heal_args(pruned_dir, teacher, text_file, tmp_path / "killed", 2, extra), env, ck,
                                    launcher, at_least)
    assert at_least <= step < STEPS
    resumed = _launch(_heal_args(pruned_dir, teacher, text_file, tmp_path / "resumed", 2, [*extra, "--resume"]), env,
                      launcher=resume_launcher or launcher)
    _saved_once_cache_once(resumed, tmp_path / "cache")
    if resume_launcher == FSDP_RAM_EFFICIENT:  # said once, by the main process
        assert resumed.stderr.count("--fsdp_cpu_ram_efficient_loading has no effect") == 1, resumed.stderr[-2000:]
    return saved_weights(tmp_path / "resumed")


def test_two_processes_equal_one_with_the_same_global_batch_and_resume(one_process, tiny_model_dir, pruned_dir,
                                                                        text_file, tmp_path):
    teacher = tiny_model_dir("llama")
    env = _env(tmp_path / "cache")
    two = _launch(_heal_args(pruned_dir, teacher, text_file, tmp_path / "two", 2), env)
    _saved_once_cache_once(two, tmp_path / "cache")
    w2 = saved_weights(tmp_path / "two")
    _equal(one_process, w2, saved_weights(Path(pruned_dir)))
    # resume: the killed and resumed run ends where the uninterrupted one did
    wr = _killed_and_resumed(DDP, pruned_dir, teacher, text_file, tmp_path, env)
    for k in w2:
        assert torch.allclose(w2[k], wr[k], atol=1e-6), k


def test_fsdp_equals_one_process_with_the_same_global_batch_and_resume(one_process, tiny_model_dir, pruned_dir,
                                                                        text_file, tmp_path):
    """The decoder layers sharded over the 2 processes while they train (train/sharding.py),
    killed after a checkpoint and resumed (the checkpoint holds whole tensors, each process
    takes its shards back): the weights of the 1-process run. One run, not two, keeps it short;
    killed halfway, a wrong shard, moment or gradient average moves the weights by far more than
    1e-5 (the AdamW moments zeroed on resuming at step 5: 1.4e-3; observed difference 5.4e-7).
    The resumed half runs with accelerate's --fsdp_cpu_ram_efficient_loading: its frozen
    weights come from loading, so a process left with empty or wrong ones would show."""
    wr = _killed_and_resumed(FSDP, pruned_dir, tiny_model_dir("llama"), text_file, tmp_path, _env(tmp_path / "cache"),
                             at_least=STEPS // 2, resume_launcher=FSDP_RAM_EFFICIENT)
    _equal(one_process, wr, saved_weights(Path(pruned_dir)), rtol=0)


def _kill_after_a_checkpoint(args, env, ck: Path, launcher=DDP, at_least: int = 1) -> int:
    """Launch, wait for a checkpoint of step ``at_least`` or later before the last step, kill the
    launcher and its workers; the step of the checkpoint left."""
    import signal
    import time

    import psutil

    p = subprocess.Popen(_launch_cmd(args, 2, 29700, launcher), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    path = ck / "checkpoint.pt"
    deadline = time.time() + 600
    def step() -> int:  # a checkpoint is renamed into place whole: no half-written file is read
        return torch.load(path, weights_only=True)["step"] if path.is_file() else 0

    while time.time() < deadline and p.poll() is None and step() < at_least:
        time.sleep(0.02)
    # torch's launcher starts each worker in a session of its own: killing the launcher's group
    # alone leaves the workers training on (and writing checkpoints) to the end
    workers = psutil.Process(p.pid).children(recursive=True)
    for w in workers:
        w.kill()
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    psutil.wait_procs(workers, timeout=30)
    return step()


def test_rows_split_into_equal_consecutive_parts():
    rows = [7, 3, 9, 1]
    assert Processes(2, 0).share(rows) + Processes(2, 1).share(rows) == rows
    assert Processes(2, 1).share(rows) == [9, 1]
    assert Processes().share(rows) == rows


def test_fsdp_with_a_device_map_is_refused_in_one_line(tiny_model_dir, tmp_path):
    env = dict(_env(tmp_path / "cache"), WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", ACCELERATE_USE_FSDP="true")
    r = subprocess.run([sys.executable, "-m", "layerfold", "heal", tiny_model_dir("llama"), "--teacher",
                        tiny_model_dir("llama"), "--heal-tokens", "64", "-o", str(tmp_path / "out"),
                        "--device-map", "auto"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]  # one line
    assert "FSDP" in r.stderr and "--device-map" in r.stderr
    assert not (tmp_path / "out").exists()


def test_fsdp_parameter_offload_is_refused_before_joining(monkeypatch):
    from layerfold.errors import LayerfoldError
    from layerfold.train import parallel

    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(parallel, "_CURRENT", None)
    with pytest.raises(LayerfoldError, match="offload"):
        parallel.processes()  # before the process group: nothing waits for the other process
    assert parallel._CURRENT is None


def test_an_ignored_fsdp_setting_is_named(monkeypatch):
    from layerfold.train import parallel

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert parallel.ignored_fsdp_settings_note() == ""  # DDP: accelerate's FSDP settings do not apply at all
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert "--fsdp_cpu_ram_efficient_loading has no effect" in parallel.ignored_fsdp_settings_note()
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    assert parallel.ignored_fsdp_settings_note() == ""


def test_unshard_gives_back_the_plain_module(tiny_model_dir):
    """In one process (a group of 1): sharding a decoder layer and taking FSDP off again leaves
    the module as it was (its class, no hook, plain parameters of the same names and values),
    and it computes what it computed before."""
    import torch.distributed as dist

    from layerfold.train import sharding
    from layerfold.train.capture import model_layers

    model = load_model(tiny_model_dir("llama"), dtype="fp32", device="cpu").model
    layers = model_layers(model)
    ids = torch.arange(2, 18).view(1, -1)
    before_out = model(input_ids=ids).logits
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cls = type(layers[0])
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        done = sharding.shard(layers)
        assert type(layers[0]) is not cls and all(sharding.is_sharded(p) for p in layers[0].parameters())
        sharded_out = model(input_ids=ids).logits
        sharding.unshard(done)
    finally:
        dist.destroy_process_group()
    assert type(layers[0]) is cls
    assert not any(layers[0]._forward_pre_hooks) and not any(layers[0]._forward_hooks)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for n, p in after.items():
        assert type(p) is torch.nn.Parameter and torch.equal(p.detach(), before[n]), n
    assert torch.allclose(sharded_out, before_out, atol=1e-6)
    assert torch.equal(model(input_ids=ids).logits, before_out)

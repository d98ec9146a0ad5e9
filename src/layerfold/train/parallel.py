"""Data-parallel training across the processes of ``accelerate launch`` (or ``torchrun``).

``accelerate launch --multi_gpu --num_processes N -m layerfold heal ...`` starts N copies of
the command; accelerate's ``PartialState`` reads the launcher's environment (``WORLD_SIZE``,
``RANK``, ...) and joins them in one process group (NCCL on GPUs, gloo on CPUs). Then:

- every process holds the whole model (data parallelism: DDP's arithmetic) and trains on its
  share of each global micro-batch: the global batch is ``batch_size x processes`` rows, the
  rows a one-process run with that batch would read, split in equal consecutive parts;
- after the micro-batches of a step, the trainable gradients are averaged over the processes
  in one all-reduce (DDP averages per backward; averaging the accumulated sum once is the
  same number with less traffic), so every process takes the same optimizer step from the
  same gradient and the weights stay equal everywhere, without broadcasting them;
- the main process writes the shared files (the teacher cache and the self-written text
  first, while the others wait and then read them; checkpoints, logs and the output folder),
  the others only train.

With equal-length rows and losses averaged over positions (healing's), the result equals a
one-process run with ``batch_size x processes`` rows per micro-batch, up to float rounding of
the sums (tests/test_parallel.py).

``accelerate launch --use_fsdp`` (its ``ACCELERATE_USE_FSDP``) asks for FSDP: the same, except
that each process holds only a shard of every decoder layer while it trains (:mod:`.sharding`);
of accelerate's FSDP settings ``--fsdp_reshard_after_forward false`` (or ``SHARD_GRAD_OP``,
``NO_RESHARD``) is honoured, the wrapping (each decoder layer) and the engine (FSDP2) are
layerfold's.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch

from ..errors import LayerfoldError


def launched_processes() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


@dataclass
class Processes:
    """This process's place among the launched ones."""

    count: int = 1
    index: int = 0
    device: torch.device | None = None  # the device the launcher gives this process (a GPU per process)
    sharded: bool = False  # FSDP: the decoder layers are sharded over the processes while they train
    reshard_after_forward: bool = True  # FSDP: a layer frees its gathered weights after its forward

    @property
    def main(self) -> bool:
        return self.index == 0

    @property
    def parallel(self) -> bool:
        return self.count > 1

    def share(self, rows: list[int]) -> list[int]:
        """This process's part of a global micro-batch (consecutive, equal parts)."""
        if len(rows) % self.count:
            raise LayerfoldError(f"a batch of {len(rows)} rows does not split over {self.count} processes")
        part = len(rows) // self.count
        return rows[self.index * part : (self.index + 1) * part]

    def wait(self) -> None:
        if self.parallel:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """The main process runs the block first (it writes the shared caches); the others run it
        after (and find the caches written)."""
        if not self.main:
            self.wait()
        try:
            yield
        finally:
            if self.main:
                self.wait()

    def average(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the processes (one flat all-reduce)."""
        if not self.parallel or not tensors:
            return
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat /= self.count
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n

    def mean(self, values: list[float]) -> list[float]:
        """Numbers (loss terms) averaged over the processes."""
        if not self.parallel or not values:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return (t / self.count).tolist()


_CURRENT: Processes | None = None


def processes() -> Processes:
    """The launched processes, joined in a process group on first use; one process without a launcher."""
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    if launched_processes() <= 1:
        _CURRENT = Processes()
        return _CURRENT
    if fsdp_requested() and _env_flag("FSDP_OFFLOAD_PARAMS", False):
        raise LayerfoldError("FSDP with parameter offload (--fsdp_offload_params true) is not supported by layerfold's "
                             "FSDP healing: turn it off, or heal in one process with --device-map auto (layers in CPU RAM "
                             "and on disk)")
    from accelerate import PartialState

    # cpu=True without GPUs: accelerate joins CPU processes over gloo (MULTI_CPU)
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes <= 1:
        _CURRENT = Processes()
        return _CURRENT
    _CURRENT = Processes(state.num_processes, state.process_index, torch.device(state.device), fsdp_requested(),
                         _env_flag("FSDP_RESHARD_AFTER_FORWARD", True))
    note = ignored_fsdp_settings_note()
    if note and _CURRENT.main:
        print(f"layerfold: note: {note}", file=sys.stderr)
    return _CURRENT


def ignored_fsdp_settings_note() -> str:
    """What layerfold's FSDP does not do of what the launcher asked, in one line ('' if nothing).

    ``--fsdp_cpu_ram_efficient_loading true`` is accelerate's loading on the main process
    only: the others build the model empty, and ``Accelerator.prepare`` shards it and sends
    the main process's weights. layerfold shards the layers itself (:mod:`.sharding`), after
    every process has loaded the whole model, so the setting saves nothing here (the weights
    are still right: tests/test_parallel.py); saying so beats a silent no-op."""
    if fsdp_requested() and _env_flag("FSDP_CPU_RAM_EFFICIENT_LOADING", False):
        return ("--fsdp_cpu_ram_efficient_loading has no effect on layerfold's FSDP: every process loads the whole "
                "model before its layers are sharded (README, FSDP)")
    return ""


def fsdp_requested() -> bool:
    """Whether the launcher asks for FSDP (``accelerate launch --use_fsdp``, or a config file
    with ``distributed_type: FSDP``)."""
    return _env_flag("ACCELERATE_USE_FSDP", False)


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "full_shard", "hybrid_shard"):
        return True
    if value in ("0", "false", "no", "shard_grad_op", "no_reshard", "hybrid_shard_zero2"):
        return False
    return default

"""Training pairs (block input, block output) stored on disk, not in RAM.

LLM-Streamline trains its replacement on (h[l*], h[l*+k]) for every calibration token. That
is tokens x hidden x 2 tensors, which the official code keeps in RAM (its users ran out of
memory past 1 TB). Here each pair array is one flat file, written and read through short-lived
numpy memory maps over just the rows in hand, so resident memory stays at one batch whatever
the number of tokens. bf16 (the default, fp32's range) and fp16 are stored as 16-bit words;
fp32 is the exact option.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import LayerfoldError

STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_NUMPY = {"bf16": np.int16, "fp16": np.float16, "fp32": np.float32}  # bf16 kept as raw bits


class PairStore:
    """``samples`` sequences of ``seq_len`` tokens: inputs ``x``, targets ``y`` and token ids.

    ``write(first, x, y, ids)`` stores rows ``first .. first+len(x)-1``; ``read(rows)`` returns
    float32 tensors for any list of rows. The folder can be reopened with ``PairStore.open``.
    """

    def __init__(self, folder: Path, samples: int, seq_len: int, hidden: int, dtype: str = "bf16"):
        if dtype not in STORAGE_DTYPES:
            raise LayerfoldError(f"unknown pair storage dtype {dtype!r}; choose from {', '.join(STORAGE_DTYPES)}")
        self.folder = Path(folder)
        self.samples, self.seq_len, self.hidden, self.dtype = samples, seq_len, hidden, dtype
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {"samples": samples, "seq_len": seq_len, "hidden": hidden, "dtype": dtype}
        (self.folder / "pairs.json").write_text(json.dumps(meta))
        for name in ("x", "y"):
            self._allocate(name, np.dtype(_NUMPY[dtype]).itemsize * hidden)
        self._allocate("ids", 8)

    @classmethod
    def reopen(cls, folder: Path, samples: int, seq_len: int, hidden: int, dtype: str = "bf16", *, key: dict,
               resume: bool = True) -> PairStore:
        """The store in ``folder`` when it was made for the same pairs (``key``: what determines
        them) and ``resume``; else a new one. A killed collection continues at
        ``rows_done()``."""
        meta = {"samples": samples, "seq_len": seq_len, "hidden": hidden, "dtype": dtype, "key": key}
        folder = Path(folder)
        try:
            same = resume and json.loads((folder / "pairs.json").read_text()) == meta
        except (OSError, ValueError):
            same = False
        if same:
            return cls.open(folder)
        if folder.exists():
            shutil.rmtree(folder)
        store = cls(folder, samples, seq_len, hidden, dtype)
        (folder / "pairs.json").write_text(json.dumps(meta))
        return store

    def rows_done(self) -> int:
        """Rows written by an earlier collection into this store (0 for a new one)."""
        try:
            return int(json.loads((self.folder / "done.json").read_text())["rows"])
        except (OSError, ValueError, KeyError):
            return 0

    def mark_done(self, rows: int) -> None:
        """Rows ``0 .. rows-1`` are written (their pages already handed to the file system)."""
        tmp = self.folder / f"done.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps({"rows": rows}))
        os.replace(tmp, self.folder / "done.json")

    @classmethod
    def open(cls, folder: Path) -> PairStore:
        meta = json.loads((Path(folder) / "pairs.json").read_text())
        store = cls.__new__(cls)
        store.folder = Path(folder)
        store.samples, store.seq_len = meta["samples"], meta["seq_len"]
        store.hidden, store.dtype = meta["hidden"], meta["dtype"]
        return store

    @property
    def tokens(self) -> int:
        return self.samples * self.seq_len

    def nbytes(self) -> int:
        return sum((self.folder / f"{n}.bin").stat().st_size for n in ("x", "y", "ids"))

    def _allocate(self, name: str, bytes_per_token: int) -> None:
        with open(self.folder / f"{name}.bin", "wb") as f:
            f.truncate(self.samples * self.seq_len * bytes_per_token)  # sparse until written

    def _map(self, name: str, first: int, count: int, mode: str) -> np.memmap:
        if name == "ids":
            dtype, width = np.dtype(np.int64), ()
        else:
            dtype, width = np.dtype(_NUMPY[self.dtype]), (self.hidden,)
        row_bytes = self.seq_len * int(np.prod(width, dtype=np.int64)) * dtype.itemsize
        return np.memmap(
            self.folder / f"{name}.bin", dtype=dtype, mode=mode,
            offset=first * row_bytes, shape=(count, self.seq_len, *width),
        )

    def _to_numpy(self, t: torch.Tensor) -> np.ndarray:
        t = t.detach().to("cpu", STORAGE_DTYPES[self.dtype]).contiguous()
        if self.dtype == "bf16":
            return t.view(torch.int16).numpy()
        if self.dtype == "fp16" and not torch.isfinite(t).all():
            raise LayerfoldError("hidden states overflow fp16; store the pairs as bf16 or fp32 (--pair-dtype)")
        return t.numpy()

    def _from_numpy(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(a))  # copy out of the map, so it can be closed
        if self.dtype == "bf16":
            t = t.view(torch.bfloat16)
        return t.float()

    def write(self, first: int, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> None:
        count = x.shape[0]
        if first + count > self.samples:
            raise ValueError(f"rows {first}..{first + count - 1} beyond {self.samples} samples")
        for name, value in (("x", self._to_numpy(x)), ("y", self._to_numpy(y)), ("ids", ids.cpu().numpy())):
            m = self._map(name, first, count, "r+")
            m[:] = value
            m.flush()
            del m  # unmaps: written pages leave this process

    def read(self, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """float32 inputs and targets ``[len(rows), seq_len, hidden]`` and ids ``[len(rows), seq_len]``."""
        rows = list(rows)
        out = []
        for name in ("x", "y", "ids"):
            parts = []
            for first, count in _runs(rows):
                m = self._map(name, first, count, "r")
                parts.append(self._from_numpy(m) if name != "ids" else torch.from_numpy(np.array(m)))
                del m
            out.append(torch.cat(parts))
        return out[0], out[1], out[2]


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Group row indices into (first, count) runs of consecutive rows, in the given order."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][0] + runs[-1][1] == r:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((r, 1))
    return runs

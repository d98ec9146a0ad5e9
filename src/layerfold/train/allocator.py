"""Keep the C allocator from holding on to memory that training has freed (glibc, Linux).

Training allocates and frees the same few-megabyte activation tensors on every micro-batch.
glibc's malloc serves a block of at least its *mmap threshold* (128 KiB at start) with a fresh
mapping that ``free`` returns to the system at once, and smaller blocks from its heap. But the
threshold is dynamic: each time a mapped block is freed, glibc raises the threshold to that
block's size (up to 32 MiB on 64-bit), so after the first backward pass nearly every tensor
comes from the heap. Freed heap memory goes back to the system only from the top of the heap
(above the *trim threshold*, also raised as the mmap threshold rises), and one live block
above a freed region keeps the whole region resident. In benchmarks/perf.md LoRA healing of
the embedded model peaked at 4.9 GB resident; with the thresholds fixed, at about half that.

Fixing both thresholds at 128 KiB (``mallopt``, which also switches off the dynamic
adjustment) keeps activations in their own mappings, returned on ``free``; the peak then
follows the live tensors. It is the same as starting the process with
``MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072``, except for what the stages
before training (loading, importance scores, the teacher cache) left in the heap: each
training also starts with ``malloc_trim(0)``, which gives back every free page of the heap, not
only its top. A threshold already given by those variables is the user's choice and is left alone. On other C libraries (macOS, Windows, musl)
nothing is done. CUDA memory is torch's own caching allocator and is not affected.

The fixed thresholds decide only where the heap *grows*: a block that a free chunk of the heap
can hold is still cut from that chunk, whatever its size. What the stages before training
left (the heap spans ~400 MiB at the start of the main job's healing, most of it free) is
then refilled by the first micro-batch's activations, and once they are freed it stays
resident (it is not the heap's top), ~300 MiB above the live tensors for the rest of the
training (benchmarks/perf.md). So the loop also calls :func:`trim` after every micro-batch's
backward pass and after every optimizer step: a walk over the free chunks that gives their
pages back (milliseconds; the pages are faulted in again by the next micro-batch, as fresh
mappings would be).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value, held fixed

# parameter: the environment variable glibc reads for it at start
_PARAMETERS = {M_MMAP_THRESHOLD: "MALLOC_MMAP_THRESHOLD_", M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_"}

_DONE: dict[int, bool] | None = None


@functools.lru_cache(maxsize=1)
def _libc():
    """glibc, or None (another C library or operating system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # glibc only (musl has mallopt but no dynamic thresholds)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def trim() -> None:
    """Give every free page of the C heap back to the system (``malloc_trim(0)``; glibc only)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def return_freed_memory() -> dict[int, bool]:
    """Give the heap's free pages back to the system and fix glibc's mmap and trim thresholds at
    128 KiB for the rest of the process (see the module docstring), after a full garbage
    collection; returns {mallopt parameter:
    whether it was set}. Called at the start of every training (``train.fit``); the thresholds
    are set once, the trim is done on every call (it takes milliseconds)."""
    global _DONE
    # garbage in reference cycles from the stages before (the importance pass, the teacher cache)
    # holds freed tensors until the collector's next full pass, which may not come during
    # training: 186 MiB of the heap in the main job (benchmarks/perf.md); collect it first
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    if _DONE is not None:
        return _DONE
    if libc is None:
        log.debug("not glibc on Linux: the allocator's thresholds are left as they are")
        _DONE = {}
        return _DONE
    done = {}
    for parameter, env in _PARAMETERS.items():
        if os.environ.get(env):
            log.debug("%s is set: the allocator keeps the threshold it gives", env)
            done[parameter] = False
            continue
        done[parameter] = libc.mallopt(parameter, THRESHOLD_BYTES) == 1  # mallopt returns 1 on success
        if not done[parameter]:
            log.debug("mallopt(%d, %d) failed", parameter, THRESHOLD_BYTES)
    _DONE = done
    return _DONE

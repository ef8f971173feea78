"""Keep freed host memory for reuse instead of handing it back to the OS (glibc malloc).

XLA:CPU allocates each step's temporaries as one buffer (6.4 GB at the train-step benchmark's mid
shape) and frees it when the step ends. glibc serves an allocation that large with ``mmap`` and
returns it with ``munmap``, so every step page-faults the whole buffer in again: 1.66 M minor faults
and 8-17 s of kernel time per step there, half of the step. With one malloc arena, no ``mmap`` and
no trimming, the freed buffer stays in the heap and the next step reuses it (0 faults; the step went
from 14-21 s to 9.8 s). MaxText gets the same effect by preloading tcmalloc. The cost: the process
keeps its peak heap until it exits.

:func:`keep_freed_memory` must run before jax starts its threads (in the entry point, before
``import jax``); ``PARGO_JAX_MALLOC=default`` leaves glibc as it is. Elsewhere (no glibc) it does nothing.
"""

from __future__ import annotations

import ctypes
import os

# <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to one arena, no ``mmap`` and no trimming; True if it was set."""
    if os.environ.get("PARGO_JAX_MALLOC", "keep") != "keep":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(option, value) == 1 for option, value in
               ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))  # fmt: skip

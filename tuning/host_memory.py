"""Training on a CPU: blocks of LARGE_BLOCK_BYTES and more get a mapping of their own, so freeing one returns it.

There the tensors live in the process's heap. glibc maps a block of 128 KiB or more on its own at first, but each
such block freed raises that threshold to its size (up to 32 MiB), so from the first step on a step's activations,
a few MiB each, come from the heap; freed between blocks still alive, their pages stay with the process. On the
real-vocabulary bench that was 200-300 MiB of the peak RSS, and it varied from run to run. Fixing the threshold
stops the raising. It costs time, since each mapping takes page faults when it is first written: the
real-vocabulary bench ran 11-21 % slower for its 190-250 MiB lower peak, and at 1 MiB the small-vocabulary bench
ran 25-40 % slower (at 4 MiB it does not). A threshold the user set stands. Not on a GPU, whose tensors are not in
this heap.
"""

from __future__ import annotations

import ctypes
import os

LARGE_BLOCK_BYTES = 4 * 2**20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


def is_glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not a GNU libc (macOS, Windows, musl)
        return False


def user_set_threshold() -> bool:
    """The user chose glibc's threshold already, through its environment variable or tunable: theirs stands."""
    return "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "")


def map_large_blocks_apart(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Have glibc map every block of `threshold` bytes or more on its own from now on; whether it was done (not
    where the C library is not glibc or the user set the threshold)."""
    if not is_glibc() or user_set_threshold():
        return False
    return ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold) == 1

"""Keeping freed CPU memory between steps (glibc's ``mallopt``).

A group holds every member's activations at once (the teacher is known only after every
forward), so each step allocates and frees several hundred MB in blocks of a few MB. glibc's
malloc returns the top of its heap to the operating system whenever more than its trim threshold
(about twice the largest block it has mmapped, 16 MB for CIFAR ResNets at batch 128) lies free
there, and the next step page-faults the same memory back in: 10-40k minor page faults per step
for 2 x ResNet-32 and 4 x ResNet-20 groups, 2-7 % of the step on the CPU (README, step time).
:func:`keep_freed_memory` asks glibc to keep what it frees, which is what PyTorch's CUDA caching
allocator does on a GPU; the group calls it at its first CPU training step (``keep_cpu_memory=True``,
the default).
"""

import ctypes
import functools
import os
import platform

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3

#: What :func:`keep_freed_memory` sets: never trim the heap below 2 GiB of free top, grow it by
#: 64 MiB at a time, and serve every block up to glibc's largest mmap threshold (32 MiB) from the heap.
SETTINGS = {M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 64 * 2**20, M_MMAP_THRESHOLD: 32 * 2**20}

# the environment variables that set the same (a user's own choice is left alone)
ENVIRONMENT = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


@functools.cache
def keep_freed_memory() -> str:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    Process-wide and for the rest of the process (glibc has no way back to its adaptive
    thresholds): resident memory stays at the training step's peak, as with PyTorch's CUDA
    caching allocator. Called once; later calls return the first answer.

    Returns:
        str: ``"kept"`` when the settings took effect; otherwise why nothing was changed:
        ``"not glibc"`` (macOS, Windows, musl), ``"preloaded allocator"`` (``LD_PRELOAD`` names
        jemalloc, tcmalloc or mimalloc, which do not trim this way), ``"environment"`` (a
        ``MALLOC_*_`` variable or ``GLIBC_TUNABLES`` is set: the user's settings stand) or
        ``"refused"`` (``mallopt`` returned an error).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "preloaded allocator"
    if any(name in os.environ for name in ENVIRONMENT):
        return "environment"
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in SETTINGS.items())
    return "kept" if ok else "refused"

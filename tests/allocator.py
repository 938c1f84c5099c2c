"""glibc's malloc in the test processes. By default it hands every large block (above its mmap threshold, 128 KiB
rising to 32 MiB) back to the system when it is freed, and the next tensor of that size faults its pages in again:
the tiny models' activations are such blocks, allocated and freed in every layer. The test processes and the
processes they start (ComfyUI servers, scripts) keep freed memory in their heap instead. Measured on a 2-core VM: the
text-to-image graph test faulted 1.75 million pages in (7 GB), 0.38 million now, 14.0 s -> 12.0 s; the full suite
8:18 -> 7:45. The tests that measure resident memory start their processes with glibc's defaults
(``measuring_env``), as users run."""

import ctypes
import os
import platform

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"  # the settings below are glibc's
INT_MAX = 2**31 - 1  # mallopt takes a C int
KEEP_FREED_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(INT_MAX)}
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h


def keep_freed_memory() -> None:
    """For this process (mallopt) and those it starts (glibc reads the environment when a process starts)."""
    if not GLIBC:
        return
    os.environ.update(KEEP_FREED_MEMORY)
    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, INT_MAX)


def measuring_env() -> dict[str, str]:
    """The environment for a process whose resident memory a test measures: glibc's own malloc settings."""
    return {name: value for name, value in os.environ.items() if name not in KEEP_FREED_MEMORY}

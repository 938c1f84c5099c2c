"""tests/allocator.py: the test processes, and those they start, reuse a freed large block without faulting its pages
in again; the processes whose memory a test measures keep glibc's defaults and give it back."""

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import allocator

pytestmark = pytest.mark.skipif(not allocator.GLIBC, reason="glibc's malloc settings")

BLOCK = 64 << 20  # above glibc's largest mmap threshold (32 MiB): by default a block of its own, unmapped on free
PAGES = BLOCK // 4096
REPO = Path(__file__).resolve().parents[1]


def faults_of_a_fresh_block(size: int = BLOCK) -> int:
    """Page faults while a block of `size` bytes is filled, the second time one is allocated (the first was freed)."""
    import resource  # Unix only

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    for _ in range(2):
        block = libc.malloc(size)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ctypes.memset(block, 1, size)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        libc.free(ctypes.c_void_p(block))
    return faults


def faults_in_a_child(env: dict[str, str]) -> int:
    command = [sys.executable, "-m", "tests.test_allocator"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_this_process_reuses_a_freed_block():
    assert faults_of_a_fresh_block() < PAGES // 10


def test_the_processes_the_tests_start_reuse_a_freed_block():
    assert faults_in_a_child(dict(os.environ)) < PAGES // 10


def test_a_process_whose_memory_is_measured_faults_a_fresh_block_in_as_users_processes_do():
    assert faults_in_a_child(allocator.measuring_env()) >= PAGES * 9 // 10


if __name__ == "__main__":  # the child of the two tests above
    print(faults_of_a_fresh_block())

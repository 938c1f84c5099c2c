"""tests/allocator.py: the test processes, and those they start, reuse a freed large block without faulting its pages
in again; the processes whose memory a test measures keep glibc's defaults and give it back."""

import os
import platform
import subprocess
import sys

import pytest

from tests import allocator

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings"
)

BLOCK = 64 << 20  # above glibc's largest mmap threshold (32 MiB): by default a block of its own, unmapped on free
PAGES = BLOCK // 4096
FAULTS_OF_A_FRESH_BLOCK = """
import ctypes, resource

def faults_of_a_fresh_block(size):
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    for warm in (True, False):
        block = libc.malloc(size)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ctypes.memset(block, 1, size)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        libc.free(ctypes.c_void_p(block))
    return faults
"""


def faults_in_a_child(env: dict[str, str]) -> int:
    script = FAULTS_OF_A_FRESH_BLOCK + f"print(faults_of_a_fresh_block({BLOCK}))"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_this_process_reuses_a_freed_block():
    namespace = {}
    exec(FAULTS_OF_A_FRESH_BLOCK, namespace)
    assert namespace["faults_of_a_fresh_block"](BLOCK) < PAGES // 10


def test_the_processes_the_tests_start_reuse_a_freed_block():
    assert faults_in_a_child(dict(os.environ)) < PAGES // 10


def test_a_process_whose_memory_is_measured_faults_a_fresh_block_in_as_users_processes_do():
    assert faults_in_a_child(allocator.measuring_env()) >= PAGES * 9 // 10

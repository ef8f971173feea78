"""``host_memory.keep_freed_memory``: a freed large buffer is reused without page faults (glibc)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = """
import ctypes, resource
from pargo_jax.host_memory import keep_freed_memory
kept = keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
def faults_of_one_cycle():  # as XLA:CPU's per-step temporaries: malloc, write every page, free
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buf = libc.malloc(256 << 20)  # 256 MiB: glibc would mmap it and munmap it on free
    ctypes.memset(buf, 1, 256 << 20)
    libc.free(ctypes.c_void_p(buf))
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_cycle()
print(kept, faults_of_one_cycle())
"""


def _run(malloc: str) -> tuple[str, int]:
    env = {**os.environ, "PARGO_JAX_MALLOC": malloc}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    kept, faults = out.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_buffers_are_reused_without_page_faults():
    kept, faults = _run("keep")
    assert kept == "True" and faults < 1000  # the second 256 MiB buffer reuses the first one's pages
    kept, faults = _run("default")  # glibc as it is: every cycle faults all 65536 pages in again
    assert kept == "False" and faults > 60000

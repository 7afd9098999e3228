"""plait.host_memory: with freed blocks kept, a step that frees and re-allocates its buffers faults nothing in."""

import json
import platform
import subprocess
import sys

import pytest

from plait.host_memory import configure_host_allocator

# A "step": 48 buffers of 2 MiB (above glibc's starting mmap threshold, below 32 MiB) written, then all freed, as
# a training step's activations are by the end of its backward. The faults of the steps after the first count.
_STEPS = """
import json, resource, sys, torch
from plait.host_memory import configure_host_allocator
changed = configure_host_allocator(sys.argv[1])
def step():
    bufs = [torch.empty(2**19) for _ in range(48)]
    for b in bufs:
        b.fill_(1.0)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(json.dumps({"changed": changed, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _STEPS, mode], check=True, capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_kept_blocks_are_reused_without_page_faults():
    default, kept = _faults("default"), _faults("keep_freed")
    assert not default["changed"] and kept["changed"]
    pages = 4 * 48 * 2 * 2**20 // 4096  # every buffer of the four steps, had each page been faulted in again
    assert default["faults"] > pages // 8, default  # glibc's defaults hand (some of) the freed heap back to the kernel
    assert kept["faults"] < pages // 50, kept


def test_unknown_mode_is_a_value_error():
    with pytest.raises(ValueError, match="host_allocator: expected one of"):
        configure_host_allocator("jemalloc")

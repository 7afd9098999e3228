"""plait.host_memory: with freed blocks kept, blocks up to 32 MiB come from the heap, stay there once freed, and a
step that frees and re-allocates its buffers faults nothing in once the heap has grown to the step's peak."""

import json
import platform
import subprocess
import sys

import pytest

from plait.host_memory import configure_host_allocator

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")

_PRELUDE = """
import json, resource, sys, torch
from plait.host_memory import configure_host_allocator
changed = configure_host_allocator(sys.argv[1])
def heap_range():
    for line in open("/proc/self/maps"):
        if "[heap]" in line:
            lo, hi = line.split()[0].split("-")
            return int(lo, 16), int(hi, 16)
    return 0, 0
"""

# A 24 MiB block: glibc's default maps it on its own (its threshold starts at 128 KiB and only rises when a mapped
# block is freed); with the threshold fixed at 32 MiB it is cut from the heap, which keeps its size after the free.
_ONE_BLOCK = _PRELUDE + """
block = torch.empty(24 * 2**18)
lo, hi = heap_range()
in_heap = lo <= block.data_ptr() < hi
del block
lo_after, hi_after = heap_range()
print(json.dumps({"changed": changed, "in_heap": in_heap, "heap_kept": (lo_after, hi_after) == (lo, hi)}))
"""

# "Steps" of 48 buffers of 2 MiB, written and then all freed, as a training step's activations are by the end of
# its backward. The heap may grow during the first steps (small allocations landing between the large ones); the
# faults of the last steps are what a long run pays per step.
_STEPS = _PRELUDE + """
def step():
    bufs = [torch.empty(2**19) for _ in range(48)]
    for b in bufs:
        b.fill_(1.0)
faults = []
for _ in range(24):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"changed": changed, "faults": faults}))
"""


def _run(script: str, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", script, mode], check=True, capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_blocks_up_to_32_mib_come_from_the_heap_and_stay_there():
    default, kept = _run(_ONE_BLOCK, "default"), _run(_ONE_BLOCK, "keep_freed")
    assert not default["changed"] and kept["changed"]
    assert not default["in_heap"], default
    assert kept["in_heap"] and kept["heap_kept"], kept


@glibc_only
def test_steps_after_the_first_fault_nothing_in():
    kept = _run(_STEPS, "keep_freed")
    assert kept["changed"]
    buffer_pages = 2 * 2**20 // 4096
    # every buffer of the last 8 steps re-faulted would be 8 * 48 * 512 pages (glibc's defaults can do that: trimming
    # the freed top of the heap); allow less than two buffers' worth for the kernel's own bookkeeping
    assert sum(kept["faults"][-8:]) < 2 * buffer_pages, kept["faults"]


def test_unknown_mode_is_a_value_error():
    with pytest.raises(ValueError, match="host_allocator: expected one of"):
        configure_host_allocator("jemalloc")


@glibc_only
def test_heap_in_use_follows_live_tensors():
    from plait.host_memory import heap_in_use_bytes

    if heap_in_use_bytes() is None:
        pytest.skip("glibc before 2.33 has no mallinfo2")
    import torch

    before = heap_in_use_bytes()
    block = torch.ones(16 * 2**18)  # 16 MiB
    held = heap_in_use_bytes()
    del block
    after = heap_in_use_bytes()
    assert held - before >= 16 * 2**20 and held - after >= 16 * 2**20, (before, held, after)

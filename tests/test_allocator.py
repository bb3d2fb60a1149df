"""metalab.app.allocator: after reuse_freed_memory, a large tensor allocated again and again (as each
meta-iteration's activations are) soon takes no new page faults (the kernel's own count, in a
fresh process), where glibc's defaults fault in every page every time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROGRAM = """
import resource, torch
from metalab.app.allocator import reuse_freed_memory
applied = reuse_freed_memory()
faults = []
for attempt in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB, every page touched
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del x
print(applied, *faults[5:])  # past the first few, which place the block
"""


def later_allocation_faults(system: bool) -> tuple[bool, list[int]]:
    env = {**os.environ, "METALAB_SYSTEM_MALLOC": "1" if system else "0"}
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, check=True).stdout
    applied, *faults = out.split()
    return applied == "True", [int(f) for f in faults]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_freed_memory_is_reused_without_page_faults():
    applied, faults = later_allocation_faults(system=False)
    assert applied and max(faults) < 1000, faults
    applied, faults = later_allocation_faults(system=True)
    assert not applied and min(faults) > 10000, faults  # 64 MiB / 4 KiB pages = 16384

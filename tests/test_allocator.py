"""The streamed replay's allocator settings: freed blocks go back to the kernel, even below a live one.

Each case runs in a fresh interpreter (mallopt settings are process-wide): it allocates a 24 MB
tensor and frees it (glibc then raises its mmap threshold), allocates a 16 MB block, then a small
tensor that outlives it, and frees the 16 MB block. Under glibc's defaults the block came from the
heap, below the small tensor, so it stays resident; with :func:`return_freed_memory` it had its own
mapping and is returned. The control case shows the measurement sees the difference.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from moeprune.profile.allocator import return_freed_memory

SCRIPT = r"""
import json, sys
import torch
from moeprune.profile.allocator import return_freed_memory

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

applied = return_freed_memory() if sys.argv[1] == "fixed" else None
big = torch.ones(24 << 20, dtype=torch.uint8); del big
before = rss()
block = torch.ones(16 << 20, dtype=torch.uint8)
pin = torch.ones(1024, dtype=torch.uint8)
del block
print(json.dumps({"applied": applied, "retained": rss() - before}))
"""

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's (elsewhere a no-op)")


def _retained(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_freed_blocks_go_back_to_the_kernel():
    fixed = _retained("fixed")
    assert fixed["applied"] is True
    assert fixed["retained"] < 2 << 20, fixed


@glibc
def test_without_the_settings_the_block_stays_resident():
    default = _retained("default")
    assert default["retained"] > 12 << 20, default


@glibc
def test_it_can_be_called_again():
    assert return_freed_memory() is True
    assert return_freed_memory() is True

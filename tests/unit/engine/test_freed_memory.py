"""keep_freed_memory: large temporaries come from memory glibc keeps, not fresh mmaps."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys

import pytest

# Allocates and frees a 16 MiB tensor; reports glibc's mallinfo2 counters at each point.
SCRIPT = """
import ctypes, json, sys, torch
from llm_service.engine.cpu_tuning import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory()
block = torch.empty(4 * 2**20)
held = libc.mallinfo2()
del block
freed = libc.mallinfo2()
print(json.dumps({"mmapped_while_held": held.hblkhd, "free_in_heap_after": freed.fordblks}))
"""
MIB = 2**20


def _run(mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                            timeout=120, check=True)
    return json.loads(result.stdout)


def _has_mallinfo2() -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return hasattr(libc, "mallopt") and hasattr(libc, "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc 2.33 or later")
def test_large_blocks_stay_in_the_heap_for_reuse():
    default, kept = _run("default"), _run("keep")
    # By default a fresh 16 MiB block is its own mmap, unmapped (its pages lost) when freed.
    assert default["mmapped_while_held"] >= 16 * MIB
    # Kept: it comes from the heap and stays there, free for the next step's temporaries.
    assert kept["mmapped_while_held"] < 16 * MIB
    assert kept["free_in_heap_after"] >= 16 * MIB

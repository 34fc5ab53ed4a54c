"""A receiving server keeps the memory of freed messages for the next round's.

A pushed update is read in place, in the chunk messages gRPC handed over (edgefed/wire/framing.py), and
those stay alive until the round is aggregated. By default glibc gives freed memory back to the OS as
soon as a little of it sits free at the top of a heap (a trim threshold it moves with the sizes it has
seen), so each round's chunks come from fresh pages and the thread that copies messages out of gRPC
takes a page fault on every 4 KiB of every update: on loopback, with 67 MB updates, about a quarter of
the receiving process's CPU, in the rounds where it happened (it depends on what the allocator had seen).
`keep_freed_messages` fixes both thresholds, so that messages come from the heap and up to
`KEPT_FREE_BYTES` of freed ones stay mapped for reuse.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt's parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): larger messages are mapped.
MMAP_THRESHOLD_MAX = 32 << 20
KEPT_FREE_BYTES = 256 << 20


def keep_freed_messages(message_bytes: int) -> bool:
    """Serve allocations up to `message_bytes` from the heap and keep up to KEPT_FREE_BYTES of freed heap
    mapped. Process-wide, meant for a server's process; False where the C library is not glibc (its
    allocator is left as it is)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    mmap_threshold = min(message_bytes + 1, MMAP_THRESHOLD_MAX)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, KEPT_FREE_BYTES)
    )

"""A receiving server's process reuses the memory of freed messages (edgefed/wire/memory.py)."""

import platform
import subprocess
import sys

import pytest

# Three rounds of a 64 MiB update held in 1 MiB messages, then freed; prints the page faults each round
# took after the first.
ROUNDS = """
import resource, sys
from edgefed.wire.memory import keep_freed_messages
if sys.argv[1] == "keep":
    assert keep_freed_messages((1 << 20) + (64 << 10))
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    messages = [bytes([n % 251]) * (1 << 20) for n in range(64)]
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del messages
print(max(faults[1:]))
"""


def faults_after_the_first_round(mode: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, timeout=60, check=True
    )
    return int(result.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="sets glibc's allocator")
def test_a_servers_next_round_reuses_the_freed_messages_pages():
    pages = (64 << 20) // 4096
    assert faults_after_the_first_round("default") > pages // 2  # glibc gave them back: what it fixes
    assert faults_after_the_first_round("keep") < pages // 20

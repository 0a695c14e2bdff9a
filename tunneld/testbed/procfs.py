"""What /proc says about a process: its CPU time, resident memory and children (a tunneld's forked workers).

Plain reads with bounded waits, for benchmarks that charge CPU to the processes carrying a data path and for
tests that check what tunneld reports about its workers against the kernel's own accounting.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _fields_after_comm(stat: str) -> list[str]:
    # comm (field 2) may contain spaces and parentheses; everything after the last ')' is space-separated,
    # starting with field 3 (state).
    return stat[stat.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (``/proc/PID/stat`` fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = _fields_after_comm(f.read())
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLK_TCK


def children_of(pids: list[int], expected: int = 0, timeout: float = 10) -> list[int]:
    """The live processes whose parent is one of ``pids`` (tunneld's workers), from /proc; waits (bounded) for
    ``expected`` of them, as the interface comes up just before the workers are forked."""
    deadline = time.monotonic() + timeout
    while True:
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            if int(_fields_after_comm(text)[1]) in pids:  # field 4, ppid
                out.append(int(stat.parent.name))
        if len(out) >= expected or time.monotonic() > deadline:
            return out
        time.sleep(0.05)


def rss_bytes(pid: int) -> int:
    """The process's resident set now (``VmRSS``), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ProcessLookupError(f"no VmRSS for pid {pid}")

"""``make test``: the whole suite as two pytest runs, and one verdict.

1. Everything not marked ``serial``, in parallel (pytest-xdist, ``--jobs`` processes): the tests wait on
   processes and namespaces far more than they compute, and each one's namespaces, devices and control sockets
   are its own (tunneld.testbed names them by pid).
2. The ``serial`` tests, alone: they measure time, and a busy neighbour would be part of what they measure.

Each run prints its own report and slowest tests (``--durations``); the last line adds them up in pytest's own
words ("N passed, M skipped ... in S s"), for a reader and for CI. The exit status is the first failing run's
(pytest's codes); a run that selects nothing (5, e.g. with ``-k``) is not a failure.

    python -m tests.suite [--jobs N] [PYTEST ARGS...]
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time

NOTHING_SELECTED = 5  # pytest.ExitCode.NO_TESTS_COLLECTED
OUTCOME = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|warnings?)\b")
DURATIONS = "--durations=25"


def run(argv: list[str]) -> tuple[int, dict[str, int]]:
    """Run one pytest, its output passed through; (exit status, outcome counts from its summary line)."""
    print("+", shlex.join(argv), flush=True)
    summary = ""
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            if OUTCOME.search(line) and re.search(r" in [\d.]+s", line):
                summary = line
    counts: dict[str, int] = {}
    for number, word in OUTCOME.findall(summary):
        word = {"error": "errors", "warning": "warnings"}.get(word, word)
        counts[word] = counts.get(word, 0) + int(number)
    return proc.returncode, counts


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.suite", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="4", help="parallel pytest workers for the first run (default 4)")
    ours, rest = parser.parse_known_args(args)
    pytest = [sys.executable, "-m", "pytest", DURATIONS, *rest]
    start = time.monotonic()
    status = 0
    totals: dict[str, int] = {}
    # worksteal: an idle worker takes tests queued for a busy one (a container booting holds its worker minutes).
    parallel = [*pytest, "-n", ours.jobs, "--dist", "worksteal", "-m", "not serial"]
    for argv in (parallel, [*pytest, "-m", "serial"]):
        code, counts = run(argv)
        for word, n in counts.items():
            totals[word] = totals.get(word, 0) + n
        if code not in (0, NOTHING_SELECTED) and status == 0:
            status = code
    order = ("failed", "passed", "skipped", "xfailed", "xpassed", "errors", "warnings")
    words = ", ".join(f"{totals[w]} {w}" for w in order if totals.get(w)) or "no tests ran"
    print(f"==== make test: {words} in {time.monotonic() - start:.2f}s (parallel, then serial) ====", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

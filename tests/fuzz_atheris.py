"""Coverage-guided fuzzing with atheris (libFuzzer) over the targets of tests/fuzz_targets.py.

    python -m tests.fuzz_atheris TARGET [libFuzzer flags, e.g. -max_total_time=60 -runs=100000]

TARGET: decap (every codec; the first byte picks one), split, plan, vnet. ``make fuzz`` runs each for a while.
An assertion or exception stops the run and libFuzzer writes the input to crash-*; replay it by passing the
file instead of flags.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["tunneld"]):
    from tests import fuzz_targets as F

CODECS = list({**F.CODECS, **F.plugin_codecs()}.values())
PAIRS = {l2: F.offload_pair(l2) for l2 in (False, True)}


def decap(data: bytes) -> None:
    if data:
        F.decap(CODECS[data[0] % len(CODECS)], data[1:])


def split(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    l2 = fdp.ConsumeBool()
    gso_type, gso_size = fdp.ConsumeIntInRange(0, 255), fdp.ConsumeIntInRange(0, 0xFFFF)
    segmenter, _, p = PAIRS[l2]
    F.split(segmenter, fdp.ConsumeBytes(fdp.remaining_bytes()), gso_type, gso_size, prefix_len=p, l2=l2)


def plan(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    l2 = fdp.ConsumeBool()
    rowlen = fdp.ConsumeIntInRange(0, 2000)
    _, coalescer, p = PAIRS[l2]
    batch = fdp.ConsumeBytes(fdp.remaining_bytes())
    if batch:
        F.plan(coalescer, batch, rowlen, prefix_len=p)


def vnet(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    start, offset = fdp.ConsumeIntInRange(0, 0xFFFF), fdp.ConsumeIntInRange(0, 0xFFFF)
    frame = fdp.ConsumeBytes(fdp.remaining_bytes())
    F.vnet_finish(frame, start % (len(frame) + 8), offset % 40)


TARGETS = {"decap": decap, "split": split, "plan": plan, "vnet": vnet}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz_atheris {{{','.join(TARGETS)}}} [libFuzzer flags]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

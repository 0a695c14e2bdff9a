"""What several test modules share that is not testbed tooling: the checkout's path and assertion helpers.

Test modules import helpers from here, from ``tests.frames`` (scapy) or from ``tunneld.testbed``, never from
each other (tests/test_layout.py holds that).
"""

from __future__ import annotations

from pathlib import Path

from tunneld.testbed import OVERLAY_V4, OVERLAY_V6, Host, transfer

REPO = Path(__file__).resolve().parent.parent

# The overlay addresses with their prefixes, as --address takes them.
A4, B4 = (f"{a}/24" for a in OVERLAY_V4)
A6, B6 = (f"{a}/64" for a in OVERLAY_V6)


TRANSFER_BYTES = 1 << 20  # a correctness transfer: hundreds of full-size segments, GSO super-frames among them


def assert_transfers(a: Host, b: Host, nbytes: int = TRANSFER_BYTES, v6: bool = False) -> None:
    """``nbytes`` over TCP from A to B, then from B to A, arrive intact (sha256 at both ends)."""
    dst_b, dst_a = (OVERLAY_V6[1], OVERLAY_V6[0]) if v6 else (OVERLAY_V4[1], OVERLAY_V4[0])
    sent, received = transfer(a, b, dst_b, nbytes)
    assert sent == received and sent.startswith(f"{nbytes} ")
    sent, received = transfer(b, a, dst_a, nbytes)
    assert sent == received and sent.startswith(f"{nbytes} ")

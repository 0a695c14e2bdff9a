"""The receiving side's sliding replay window (RFC 6479's idea; wireguard-go ``replay/replay.go``).

What flows through: the counter of a transport message whose AEAD tag has ALREADY verified. Checking before the
tag would let a forger move the window; so ``accept`` is called only after decryption succeeded.

What must stay true (the same answers as wireguard-go's filter, whose window is 8128 counters):
- a counter at or past ``limit`` (REJECT_AFTER_MESSAGES) is refused;
- the greatest counter accepted so far is ``last``; a counter more than WINDOW_SIZE below ``last`` is refused;
- every counter in [last - WINDOW_SIZE, last] is accepted at most once; a counter above ``last`` is accepted and
  slides the window up.

The window is a Python int used as a bit set: bit ``i`` says ``last - i`` was seen.
"""

from __future__ import annotations

from tunneld.encap.wireguard.constants import REJECT_AFTER_MESSAGES

BLOCK_BITS = 64  # wireguard-go keeps 128 words of 64 bits and one word is always being reused:
RING_BLOCKS = 128
WINDOW_SIZE = (RING_BLOCKS - 1) * BLOCK_BITS  # 8128
_MASK = (1 << (WINDOW_SIZE + 1)) - 1  # bits for last - WINDOW_SIZE .. last


class ReplayWindow:
    __slots__ = ("last", "_seen")

    def __init__(self) -> None:
        self.last = 0
        self._seen = 0

    def accept(self, counter: int, limit: int = REJECT_AFTER_MESSAGES) -> bool:
        """True, and remember it, when ``counter`` is new and inside the window; False otherwise."""
        if counter >= limit:
            return False
        if counter > self.last:
            jump = counter - self.last
            # a jump past the window forgets everything (and never shifts by 2^60 bits)
            self._seen = ((self._seen << jump) | 1) & _MASK if jump <= WINDOW_SIZE else 1
            self.last = counter
            return True
        back = self.last - counter
        if back > WINDOW_SIZE:
            return False
        bit = 1 << back
        if self._seen & bit:
            return False
        self._seen |= bit
        return True

    def __repr__(self) -> str:
        return f"<ReplayWindow last={self.last}>"

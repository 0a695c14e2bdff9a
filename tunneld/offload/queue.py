"""Keeping the device's queue short: which super-frame to drop when a standing queue has built up.

Why tunneld needs this (measured, Linux 6.18): the TAP's transmit ring is the tunnel's bottleneck queue, and
nothing keeps it short. tun tail-drops when its ring (``txqueuelen`` entries) is full and never stops the
interface's queue, so the qdisc above it never holds a packet (``tc qdisc`` changes nothing there; this kernel
has no fq_codel anyway); tun orphans every skb it queues, so the sender's TCP Small Queues do not count what
waits in the ring either; and an entry is a TCP super-frame of up to 64 KiB. With nothing dropped the inner TCP's
window grows until it fills the ring: one stream left ~1.4 MB standing there (inner srtt 26 ms, ping 18 ms
behind it on a busy 2-core machine). A short ring (txqueuelen 4) cut the ping to 7 ms but took 30 % of the
throughput: a tail drop hits whatever arrives, bursts included.

The engine knows when its device queue stands: a wake-up that stops on its byte budget while the device is still
readable left packets behind. ``StandingQueue`` is CoDel's control law (RFC 8289) with that signal in place of
the sojourn time, which tun does not give us: once the queue has stood without ever draining for ``interval``
(and over at least ``MIN_WAKEUPS`` wake-ups: one long pause of the process is not a queue), one super-frame is
dropped, and further ones at ``interval / sqrt(count)`` while it keeps standing, until a
wake-up finds the device empty. Only super-frames are dropped: they come from bulk senders (a TCP stream, a UDP
sender with GSO) whose window built the queue, and to TCP a dropped super-frame is a single loss event (SACK
repairs it in one round trip, CUBIC backs off by 30 %). Sparse packets — pings, ACKs, DNS — are never dropped
here: they are what a short queue is for.

Pure: the caller passes the time (seconds, monotonic) and says what it saw; nothing here reads a clock.
"""

from __future__ import annotations

from math import sqrt

# How long the queue may stand before the first drop, and the base of the drop spacing after it. CoDel's default
# (100 ms) is sized for Internet round trips; the inner TCP's round trip over a tunnel on one segment is ~1 ms,
# and a drop must leave it time to react (one round trip) before the next. 5 ms: the shortest that kept one
# stream's throughput in same-run A/B tests (see README, Performance).
INTERVAL = 0.005
# Re-entering the drop state soon after leaving it resumes near the last drop rate (RFC 8289 §5.6), so that a
# queue that keeps coming back is met at once rather than after another full interval.
RECENT = 16 * INTERVAL
MIN_WAKEUPS = 4


class StandingQueue:
    """Whether to drop the next super-frame, given when the device queue was last seen empty."""

    __slots__ = ("interval", "since", "wakeups", "dropping", "count", "next_drop", "last_count", "left")

    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self.since: float | None = None  # when the queue started standing (None: it is not standing)
        self.wakeups = 0  # wake-ups that ended with the queue standing, since it last drained
        self.dropping = False
        self.count = 0  # drops in this drop state
        self.next_drop = 0.0
        self.last_count = 0  # count when the last drop state ended
        self.left = -RECENT  # when the last drop state ended

    def empty(self, now: float) -> None:
        """A wake-up found the device empty: whatever stood has drained."""
        if self.dropping:
            self.dropping = False
            self.last_count = self.count
            self.left = now
        self.since = None
        self.wakeups = 0

    def standing(self, now: float) -> None:
        """A wake-up ended with packets still waiting in the device."""
        if self.since is None:
            self.since = now
        self.wakeups += 1

    def drop(self, now: float) -> bool:
        """Whether the super-frame in hand at ``now`` is to be dropped."""
        since = self.since
        if since is None or now - since < self.interval or self.wakeups < MIN_WAKEUPS:
            return False
        if not self.dropping:
            self.dropping = True
            # back soon after the last drop state: start near its rate, not from one
            self.count = self.last_count - 2 if now - self.left < RECENT and self.last_count > 2 else 1
            self.next_drop = now + self.interval / sqrt(self.count)
            return True
        if now < self.next_drop:
            return False
        self.count += 1
        self.next_drop = now + self.interval / sqrt(self.count)
        return True

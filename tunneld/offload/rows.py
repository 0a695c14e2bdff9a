"""Rows: encapsulated packets of one length laid back to back, the unit the underlay moves in one call.

Two small bookkeepers, pure (no sockets, no counters), that the engine drives:

``Pending`` (outbound): plain packets of one flow, one size and one peer wait here and leave together in one send
(UDP_SEGMENT, or sendmmsg for raw IP), so a stream of small frames costs a ~100-byte copy per packet rather
than a system call. The engine offers each packet with ``add``; False means it does not continue the run
(another flow, another size, or the room is full), and the engine sends what waits (``rows``, then
``clear``) before it offers the packet again. Order is kept: a run leaves before anything that follows it.

``Gatherer`` (inbound): where the kernel did not coalesce (no UDP GRO on the way in, e.g. a kernel VXLAN peer),
reads are single datagrams. Consecutive ones of one length are laid back to back in the receive buffer, as a
UDP_GRO read would lay them, so that the same verdict and coalescing plan applies: ``add`` says whether the
datagram just read at ``fill`` joins the rows gathered so far (equal length; a shorter one joins and closes
them, as the short last datagram of a GRO read: the bytes gathered, or 0); ``start`` begins a new gathering;
``take`` hands them over.
"""

from __future__ import annotations

GATHER_MIN = 64  # shorter datagrams are not gathered: no run of segments is made of them


class Pending:
    """Packets of one flow and size, back to back in ``buffer``; ``capacity`` bytes at most."""

    __slots__ = ("buffer", "view", "capacity", "length", "size", "flow", "dest", "count")

    def __init__(self, capacity: int) -> None:
        self.buffer = bytearray(capacity)
        self.view = memoryview(self.buffer)
        self.capacity = capacity
        self.length = self.size = self.count = 0
        self.flow = -1
        self.dest = None

    def add(self, packet: memoryview, flow: int, dest: object = None) -> bool:
        """Queue ``packet`` for ``dest`` (the peer's destination: one send has one) behind the others if it
        continues their run; False (nothing queued) if it does not."""
        count = self.count
        size = len(packet)
        if count and (size != self.size or flow != self.flow or dest is not self.dest):
            return False
        length = self.length
        end = length + size
        if end > self.capacity:
            return False
        self.buffer[length:end] = packet
        self.length = end
        self.count = count + 1
        if not count:
            self.size = size
            self.flow = flow
            self.dest = dest
        return True

    def rows(self) -> memoryview:
        """What waits: ``count`` packets of ``size`` bytes back to back."""
        return self.view[: self.length]

    def clear(self) -> None:
        self.length = self.count = 0


class Gatherer:
    """Single datagrams of one length gathered at the start of the receive buffer: ``fill`` bytes of rows of
    ``row`` bytes (the last may be shorter, and then the gathering is ``closed``)."""

    __slots__ = ("fill", "row", "closed")

    def __init__(self) -> None:
        self.fill = self.row = 0
        self.closed = False

    def add(self, n: int) -> int:
        """The single datagram of ``n`` bytes (at least GATHER_MIN) just read at ``fill``: the bytes gathered now
        if it joins the rows gathered, 0 if it does not."""
        if self.fill and not self.closed and n <= self.row:
            self.fill += n
            self.closed = n < self.row
            return self.fill
        return 0

    def start(self, n: int) -> None:
        """The datagram of ``n`` bytes at the start of the buffer begins a new gathering."""
        self.fill = self.row = n
        self.closed = False

    def take(self) -> tuple[int, int]:
        """(bytes, row length) of what was gathered; the gathering is then empty."""
        fill, self.fill = self.fill, 0
        return fill, self.row

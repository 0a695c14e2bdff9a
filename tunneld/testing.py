"""In-memory stand-ins for the kernel's doors, so the engine can be tested without root.

``FakeDevice`` and ``FakeLink`` behave like the non-blocking fds they replace: reads raise BlockingIOError
when empty, and what is written or sent is recorded. Plugin authors use them to drive their encapsulator
through a real ``Engine``.
"""

from __future__ import annotations

import errno
from collections import deque


class FakeDevice:
    """A TUN/TAP device: ``inject`` frames the kernel would hand us, read ``written`` for what we delivered."""

    def __init__(self) -> None:
        self.pending: deque[bytes] = deque()
        self.written: list[bytes] = []
        self.fail_writes = False

    def inject(self, *frames: bytes) -> None:
        self.pending.extend(frames)

    def fileno(self) -> int:
        return -1

    def read_into(self, buf: memoryview) -> int:
        if not self.pending:
            raise BlockingIOError(errno.EAGAIN, "no frame")
        frame = self.pending.popleft()
        buf[: len(frame)] = frame
        return len(frame)

    def write(self, frame: memoryview) -> int:
        if self.fail_writes:
            raise OSError(errno.EIO, "device is down")
        self.written.append(bytes(frame))
        return len(frame)


class FakeLink:
    """An underlay socket talking to ``peer``: ``deliver`` datagrams, read ``sent`` as (packet, flow) pairs."""

    def __init__(self, peer: str = "192.0.2.2") -> None:
        self.peer = peer
        self.pending: deque[tuple[bytes, str] | OSError] = deque()
        self.sent: list[tuple[bytes, int]] = []
        self.send_error: int | None = None  # errno to raise on send, e.g. errno.EMSGSIZE

    def deliver(self, packet: bytes, source: str | None = None) -> None:
        self.pending.append((packet, source or self.peer))

    def deliver_error(self, err: int) -> None:
        """Queue a socket error, as a pending ICMP error surfaces on the next receive."""
        self.pending.append(OSError(err, "queued socket error"))

    def fileno(self) -> int:
        return -1

    def recv_into(self, buf: memoryview) -> tuple[int, str]:
        if not self.pending:
            raise BlockingIOError(errno.EAGAIN, "no datagram")
        item = self.pending.popleft()
        if isinstance(item, OSError):
            raise item
        packet, source = item
        buf[: len(packet)] = packet
        return len(packet), source

    def send(self, packet: memoryview, flow: int) -> None:
        if self.send_error is not None:
            raise OSError(self.send_error, "send failed")
        self.sent.append((bytes(packet), flow))


class FakeVnetDevice(FakeDevice):
    """A TAP opened with IFF_VNET_HDR: ``inject`` takes ``virtio_net_hdr`` + frame, ``written`` holds the same."""

    def writev(self, buffers) -> int:
        if self.fail_writes:
            raise OSError(errno.EIO, "device is down")
        data = b"".join(bytes(memoryview(b)) for b in buffers)
        self.written.append(data)
        return len(data)


class FakeGsoLink(FakeLink):
    """An underlay socket with UDP_SEGMENT/UDP_GRO: ``sent`` holds every datagram the kernel would put on the
    wire (a segmented send is cut as the kernel cuts it), ``sends`` counts the system calls."""

    def __init__(self, peer: str = "192.0.2.2") -> None:
        super().__init__(peer)
        self.sends = 0
        self.gro: deque[int] = deque()  # the segment size reported for each delivered datagram (0: none)

    def enable_gro(self) -> bool:
        return True

    def deliver_gro(self, datagrams: list[bytes], source: str | None = None) -> None:
        """Queue one coalesced read: equal-size datagrams back to back, the last may be shorter."""
        self.deliver(b"".join(datagrams), source)
        self.gro.append(len(datagrams[0]) if len(datagrams) > 1 else 0)

    def recv_gro_into(self, buf: memoryview) -> tuple[int, str, int]:
        n, source = self.recv_into(buf)
        return n, source, self.gro.popleft() if self.gro else 0

    def send(self, packet: memoryview, flow: int) -> None:
        super().send(packet, flow)
        self.sends += 1

    def send_segments(self, packets: memoryview, size: int, flow: int) -> None:
        if self.send_error is not None:
            raise OSError(self.send_error, "send failed")
        data = bytes(packets)
        self.sends += 1
        self.sent.extend((data[i : i + size], flow) for i in range(0, len(data), size))

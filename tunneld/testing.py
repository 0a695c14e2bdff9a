"""In-memory stand-ins for the kernel's doors, so the engine can be tested without root.

``FakeDevice`` and ``FakeLink`` behave like the non-blocking fds they replace: reads raise BlockingIOError
when empty, and what is written or sent is recorded. Plugin authors use them to drive their encapsulator
through a real ``Engine``, and the conformance suite at the end of this module does so for them.
"""

from __future__ import annotations

import errno
import random
import re
import struct
from collections import deque
from typing import Any, Callable, Mapping

from tunneld.config import TunnelConfig
from tunneld.encap.base import DeviceKind, Drop, Encapsulator
from tunneld.encap.checksum import internet_checksum
from tunneld.engine import HEADROOM, Engine
from tunneld.plugins import _check as _check_shape


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

    spreads_flows = True  # set False to stand for a link without ports (raw IP)

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
        self.fail_after: int | None = None  # datagrams a send_segments() call lets out before failing
        self.sends = 0
        self.gro: deque[int] = deque()  # the segment size reported for each delivered datagram (0: none)

    def enable_gro(self, max_packet: int = 65535) -> bool:
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
        rows = [(data[i : i + size], flow) for i in range(0, len(data), size)]
        if self.fail_after is not None and self.fail_after < len(rows):
            # like a second sendmsg of one send_segments() refused (ENOBUFS) after the first went out
            self.sent.extend(rows[: self.fail_after])
            err = OSError(errno.ENOBUFS, "no buffer space")
            err.sent = self.fail_after
            raise err
        self.sent.extend(rows)


# -- the conformance suite for encapsulators ------------------------------------------------------------------
#
# A plugin author runs it against their class, in their own test suite:
#
#     from tunneld.testing import EncapsulatorConformance
#
#     class TestMyMode(EncapsulatorConformance):
#         encapsulator = MyMode
#         options = {"session": "7"}      # what --opt would pass; optional
#
# pytest collects each ``test_*`` method below. ``check_encapsulator(cls, options)`` runs the same checks in one
# call for those who use another runner. Everything here is stdlib: frames are made with struct, not scapy.

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
SENTINEL = 0xA5  # fills the headroom and the tail so a stray write shows


class ConformanceError(AssertionError):
    """The encapsulator breaks the contract in ``tunneld.encap.base``; the message says where."""


def random_ip_packet(rng: random.Random, max_payload: int = 1400) -> bytes:
    """A well-formed IPv4 or IPv6 packet (lengths and IPv4 header checksum right) with random contents."""
    payload = rng.randbytes(rng.randint(0, max_payload))
    proto = rng.choice((1, 6, 17, 58, 253))
    if rng.random() < 0.5:
        header = _IPV4.pack(0x45, 0, 20 + len(payload), rng.getrandbits(16), 0x4000, 64, proto, 0,
                            rng.randbytes(4), rng.randbytes(4))
        header = header[:10] + internet_checksum(header).to_bytes(2, "big") + header[12:]
        return header + payload
    return _IPV6.pack(6 << 28 | rng.getrandbits(20), len(payload), proto, 64, rng.randbytes(16),
                      rng.randbytes(16)) + payload


def random_ethernet_frame(rng: random.Random, max_payload: int = 1400) -> bytes:
    """An Ethernet frame between unicast MACs: IPv4, IPv6 or an experimental EtherType with random bytes."""
    dst = bytes([rng.getrandbits(8) & 0xFE | 0x02]) + rng.randbytes(5)
    src = bytes([rng.getrandbits(8) & 0xFE | 0x02]) + rng.randbytes(5)
    kind = rng.random()
    if kind < 0.7:
        packet = random_ip_packet(rng, max_payload)
        ethertype = 0x0800 if packet[0] >> 4 == 4 else 0x86DD
    else:
        packet, ethertype = rng.randbytes(rng.randint(0, max_payload)), 0x88B5
    return dst + src + ethertype.to_bytes(2, "big") + packet


def random_frames(device: DeviceKind, count: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    make = random_ethernet_frame if device is DeviceKind.TAP else random_ip_packet
    return [make(rng) for _ in range(count)]


def build(cls: type[Encapsulator], options: Mapping[str, Any] | None = None) -> Encapsulator:
    """The codec as the daemon builds it: core settings plus ``options`` as ``TunnelConfig.extra``."""
    return cls.from_options(TunnelConfig(peer="192.0.2.1", mode=cls.name, extra=dict(options or {})).options())


def check_declaration(cls: type[Encapsulator], options: Mapping[str, Any] | None = None) -> None:
    """The class attributes the registry, the CLI and the engine rely on."""
    problem = _check_shape(getattr(cls, "name", "?"), cls)
    if problem:
        raise ConformanceError(f"{cls.__name__} {problem}")
    if not isinstance(cls.name, str) or not _NAME.match(cls.name):
        raise ConformanceError(f"name {cls.name!r}: use lower-case letters, digits, '-' and '_' (it is a --mode value)")
    if not isinstance(cls.description, str) or not cls.description.strip() or "\n" in cls.description:
        raise ConformanceError(f"{cls.name}: description must be one non-empty line (shown by --list-modes)")
    if cls.transport.kind not in ("udp", "ip"):
        raise ConformanceError(f"{cls.name}: transport kind {cls.transport.kind!r} is neither 'udp' nor 'ip'")
    top = 65535 if cls.transport.kind == "udp" else 255
    low = 1 if cls.transport.kind == "udp" else 0
    if not low <= cls.transport.number <= top:
        raise ConformanceError(f"{cls.name}: {cls.transport} is out of range ({low}-{top})")
    if not isinstance(cls.header_room, int) or not 0 <= cls.header_room <= HEADROOM:
        raise ConformanceError(f"{cls.name}: header_room {cls.header_room!r} must be an int in 0..{HEADROOM}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in cls.options.items()):
        raise ConformanceError(f"{cls.name}: options must map option names to one-line help strings")
    undeclared = set(options or {}) - set(cls.options)
    if undeclared:
        raise ConformanceError(f"{cls.name}: options {sorted(undeclared)} are not declared in {cls.__name__}.options")
    codec = build(cls, options)
    if not isinstance(codec, cls):
        raise ConformanceError(f"{cls.name}: from_options returned {type(codec).__name__}, not a {cls.__name__}")
    if not isinstance(codec.header_len, int) or not 0 <= codec.header_len <= cls.header_room:
        raise ConformanceError(f"{cls.name}: header_len {codec.header_len!r} must be an int in 0..header_room "
                               f"({cls.header_room})")
    if codec.overhead(False) < codec.outer_overhead(False) or codec.outer_overhead(False) < 20:
        raise ConformanceError(f"{cls.name}: overhead arithmetic is inconsistent")


def _encap_checked(codec: Encapsulator, frame: bytes) -> bytes:
    """Encapsulate one frame in a buffer laid out like the engine's, and check the codec kept to its space."""
    tail = 16
    buf = bytearray([SENTINEL]) * HEADROOM + bytearray(frame) + bytearray([SENTINEL]) * tail
    end = HEADROOM + len(frame)
    try:
        start = codec.encap(buf, HEADROOM, end)
    except Exception as e:
        raise ConformanceError(f"{codec.name}: encap raised {type(e).__name__}: {e} on a {len(frame)}-byte frame") from e
    if isinstance(start, Drop):
        raise ConformanceError(f"{codec.name}: encap dropped a well-formed {len(frame)}-byte frame ({start.value})")
    if not isinstance(start, int) or not HEADROOM - codec.header_len <= start <= HEADROOM:
        raise ConformanceError(f"{codec.name}: encap returned start {start!r}; with header_len {codec.header_len} it "
                               f"must be in {HEADROOM - codec.header_len}..{HEADROOM}")
    if len(buf) != HEADROOM + len(frame) + tail:
        raise ConformanceError(f"{codec.name}: encap resized the buffer")
    if any(b != SENTINEL for b in buf[:start]) or any(b != SENTINEL for b in buf[end:]):
        raise ConformanceError(f"{codec.name}: encap wrote outside [start, end) of the buffer")
    if bytes(buf[HEADROOM:end]) != frame:
        raise ConformanceError(f"{codec.name}: encap changed the frame itself; headers go in front of it")
    return bytes(buf[start:end])


def _decap_checked(codec: Encapsulator, packet: bytes) -> int | Drop:
    try:
        verdict = codec.decap(memoryview(packet))
    except Exception as e:
        raise ConformanceError(
            f"{codec.name}: decap raised {type(e).__name__}: {e} on {len(packet)} bytes {packet[:32].hex()}..."
        ) from e
    if isinstance(verdict, Drop):
        return verdict
    if isinstance(verdict, bool) or not isinstance(verdict, int) or not 0 <= verdict <= len(packet):
        raise ConformanceError(f"{codec.name}: decap returned {verdict!r} for {len(packet)} bytes: "
                               "neither a Drop nor an offset into the packet")
    return verdict


def check_round_trip(cls: type[Encapsulator], options: Mapping[str, Any] | None = None, *, count: int = 300,
                     seed: int = 0) -> None:
    """Random well-formed frames survive encap by one instance and decap by another (the peer) unchanged."""
    sender, receiver = build(cls, options), build(cls, options)
    for i, frame in enumerate(random_frames(cls.device, count, seed)):
        wire = _encap_checked(sender, frame)
        verdict = _decap_checked(receiver, wire)
        if isinstance(verdict, Drop):
            raise ConformanceError(f"{cls.name}: frame {i} ({len(frame)} bytes) was dropped on decap: {verdict.value}")
        if wire[verdict:] != frame:
            raise ConformanceError(f"{cls.name}: frame {i} came back different after encap and decap")


def check_malformed(cls: type[Encapsulator], options: Mapping[str, Any] | None = None, *, count: int = 2000,
                    seed: int = 0) -> None:
    """Garbage, truncations and bit flips of valid packets: decap never raises; always a Drop or an offset."""
    rng = random.Random(seed)
    sender, receiver = build(cls, options), build(cls, options)
    valid = [_encap_checked(sender, frame) for frame in random_frames(cls.device, 20, seed + 1)]
    for n in range(64):
        _decap_checked(receiver, bytes(n))
        _decap_checked(receiver, b"\xff" * n)
    for wire in valid:
        for n in range(min(len(wire), receiver.header_len + 64)):
            _decap_checked(receiver, wire[:n])
    for _ in range(count):
        choice = rng.random()
        if choice < 0.3:
            data = rng.randbytes(rng.randint(0, 1600))
        else:
            data = bytearray(rng.choice(valid))
            for _ in range(rng.randint(1, 4)):
                position = rng.randrange(min(len(data), receiver.header_len + 60))
                data[position] ^= 1 << rng.randrange(8)
            if choice > 0.8:
                data = data[: rng.randrange(len(data) + 1)]
            data = bytes(data)
        _decap_checked(receiver, data)


def check_through_engine(cls: type[Encapsulator], options: Mapping[str, Any] | None = None, *, count: int = 100,
                         seed: int = 0) -> None:
    """Two real engines over fakes, one per end: frames injected at one device come out of the other."""
    a_addr, b_addr = "192.0.2.1", "192.0.2.2"
    a = Engine(FakeDevice(), FakeLink(b_addr), build(cls, options), max_frame=9000)
    b = Engine(FakeDevice(), FakeLink(a_addr), build(cls, options), max_frame=9000)
    for sender, receiver, source, offset in ((a, b, a_addr, 0), (b, a, b_addr, 1)):
        frames = random_frames(cls.device, count, seed + offset)
        sender.device.inject(*frames)
        for _ in range(count):  # each wake-up moves at most a batch; bounded either way
            if not sender.device.pending:
                break
            sender.on_device_readable()
        for packet, _flow in sender.link.sent:
            receiver.link.deliver(packet, source=source)
        sender.link.sent.clear()
        for _ in range(count):
            if not receiver.link.pending:
                break
            receiver.on_link_readable()
        if sender.stats.drops or receiver.stats.drops:
            raise ConformanceError(f"{cls.name}: the engines dropped well-formed frames: "
                                   f"{dict(sender.stats.drops)} / {dict(receiver.stats.drops)}")
        if receiver.device.written != frames:
            raise ConformanceError(f"{cls.name}: {len(receiver.device.written)} of {len(frames)} frames arrived, "
                                   "or not unchanged and in order")


CHECKS: tuple[Callable[..., None], ...] = (check_declaration, check_round_trip, check_malformed, check_through_engine)


def check_encapsulator(cls: type[Encapsulator], options: Mapping[str, Any] | None = None) -> None:
    """Every conformance check; raises ConformanceError naming the first broken rule."""
    for check in CHECKS:
        check(cls, options)


class EncapsulatorConformance:
    """Subclass as ``TestSomething`` and set ``encapsulator`` (and ``options``); pytest runs each check."""

    encapsulator: type[Encapsulator]
    options: Mapping[str, Any] = {}

    def test_declaration(self) -> None:
        check_declaration(self.encapsulator, self.options)

    def test_round_trip(self) -> None:
        check_round_trip(self.encapsulator, self.options)

    def test_malformed_input_never_raises(self) -> None:
        check_malformed(self.encapsulator, self.options)

    def test_through_engine(self) -> None:
        check_through_engine(self.encapsulator, self.options)

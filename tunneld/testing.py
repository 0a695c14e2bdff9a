"""In-memory stand-ins for the kernel's doors, so the engine can be tested without root.

``FakeDevice`` stands for a TUN/TAP fd: it answers the system calls the device ports make (``sys_readv``,
``sys_write``, ``sys_writev``: tunneld/io/port.py), so the real ports (vnet header, segmentation,
coalescing) run in tests; reads raise BlockingIOError when empty, and what is written is recorded.
``FakeLink``/``FakeGsoLink`` behave like the underlay link: what is sent is recorded, datagrams are delivered
one by one or as coalesced (UDP_GRO) reads. ``FakeClock`` is the time an engine (``Engine(clock=...)``) and its
codec's sessions see: a test moves it, and minutes of keepalives and deadlines pass in milliseconds. Plugin
authors use them to drive their encapsulator through a real ``Engine``, and the conformance suite at the end of
this module does so for them, on both paths.
"""

from __future__ import annotations

import errno
import math
import random
import re
import socket
import struct
from collections import Counter, deque
from typing import Any, Callable, Mapping

from tunneld.config.schema import TunnelConfig
from tunneld.encap.base import DeviceKind, Drop, Encapsulator, session_of
from tunneld.encap.checksum import internet_checksum
from tunneld.encap.session import HELD, Session
from tunneld.datapath.engine import HEADROOM, Engine, offload_supported
from tunneld.offload.vnet import HDR, NO_OFFLOAD, VNET_HDR_LEN
from tunneld.encap.plugins import _check as _check_shape


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

    # the Device interface

    def read_into(self, buf: memoryview) -> int:
        if not self.pending:
            raise BlockingIOError(errno.EAGAIN, "no frame")
        frame = self.pending.popleft()
        buf[: len(frame)] = frame
        return len(frame)

    def write(self, frame: memoryview) -> int:
        return self.writev((frame,))

    def writev(self, buffers) -> int:
        if self.fail_writes:
            raise OSError(errno.EIO, "device is down")
        data = b"".join(bytes(memoryview(b)) for b in buffers)
        self.written.append(data)
        return len(data)

    # the system calls a device port makes on the fd: through the methods above, so that a test may replace
    # one of those on an instance (a read that fails as a deleted interface's does) and the port sees it

    def sys_readv(self, fd: int, buffers) -> int:
        return self.read_into(buffers[0])

    def sys_write(self, fd: int, frame) -> int:
        return self.write(frame)

    def sys_writev(self, fd: int, buffers) -> int:
        return self.writev(buffers)


class FakeLink:
    """An underlay socket talking to ``peer``: ``deliver`` datagrams, read ``sent`` as (packet, flow) pairs and
    ``sent_to`` as the peer address each went to (several peers: ``destination`` is the address itself).

    It is a whole ``LinkPort`` (tunneld/datapath/engine.py), as the real links are: rows are sent one datagram
    at a time and received one at a time (``FakeGsoLink`` cuts and coalesces as the kernel would)."""

    spreads_flows = True  # set False to stand for a link without ports (raw IP)
    df = True  # outer packets leave with "don't fragment"
    buffered = False  # nothing taken from the kernel is held back between reads
    kernel_drops = 0  # set to stand for the kernel's SO_RXQ_OVFL count
    path_mtu_answer = 0  # what path_mtu() says (0: the kernel knows no path MTU)

    def __init__(self, peer: str = "192.0.2.2", port: int = 4789) -> None:
        self.peer = peer
        self.port = port  # the tunnel's own: datagrams come from it unless ``deliver`` says otherwise
        self.pending: deque[tuple[bytes, str] | OSError] = deque()
        self.sent: list[tuple[bytes, int]] = []
        self.sent_to: list[str] = []
        self.send_error: int | None = None  # errno to raise on send, e.g. errno.EMSGSIZE
        self.receive_buffer = 0

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.peer else socket.AF_INET

    def size_receive_buffer(self, size: int) -> None:
        self.receive_buffer = size

    def path_mtu(self, address: str) -> int:
        return self.path_mtu_answer

    def enable_gro(self, max_packet: int = 65535) -> bool:
        return False

    def recv_gro_into(self, buf: memoryview) -> tuple[int, str, int]:
        return self.recv_one(buf)

    def recv_gro_from(self, buf: memoryview) -> tuple[int, str, int, int]:
        n, source, port = self.recv_from(buf)
        return n, source, port, 0

    def send_segments(self, packets: memoryview, size: int, flow: int, dest: str | None = None) -> None:
        for i in range(0, len(packets), size):
            self.send(packets[i : i + size], flow, dest)

    def deliver(self, packet: bytes, source: str | None = None, port: int = 0) -> None:
        """Queue a datagram from ``source`` (default: the peer) and ``port`` (0: the tunnel's own)."""
        self.pending.append((packet, source or self.peer, port))

    def deliver_error(self, err: int) -> None:
        """Queue a socket error, as a pending ICMP error surfaces on the next receive."""
        self.pending.append(OSError(err, "queued socket error"))

    def fileno(self) -> int:
        return -1

    def recv_into(self, buf: memoryview) -> tuple[int, str]:
        n, source, _port = self.recv_from(buf)
        return n, source

    def recv_from(self, buf: memoryview) -> tuple[int, str, int]:
        if not self.pending:
            raise BlockingIOError(errno.EAGAIN, "no datagram")
        item = self.pending.popleft()
        if isinstance(item, OSError):
            raise item
        packet, source, port = item
        buf[: len(packet)] = packet
        return len(packet), source, port or self.port

    def recv_one(self, buf: memoryview) -> tuple[int, str, int]:
        n, source = self.recv_into(buf)
        return n, source, 0

    def destination(self, address: str, port: int | None = None) -> str:
        """As the real links: one IP version for all peers (ValueError, one line, for the other). ``sent_to``
        names a peer by its address alone while it is at the tunnel's port, ``ADDRESS:PORT`` otherwise."""
        if (":" in address) != (":" in self.peer):
            raise ValueError(f"peer {address} is not of the same IP version as the underlay socket")
        return address if port is None or port == self.port else f"{address}:{port}"

    def set_peer(self, peer: str) -> None:
        self.peer = peer

    def send(self, packet: memoryview, flow: int, dest: str | None = None) -> None:
        if self.send_error is not None:
            raise OSError(self.send_error, "send failed")
        self.sent.append((bytes(packet), flow))
        self.sent_to.append(dest or self.peer)


class FakeClock:
    """The engine's clock in a test: ``Engine(..., clock=FakeClock())``; ``now`` moves only when told to."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class FakeVnetDevice(FakeDevice):
    """A TAP opened with IFF_VNET_HDR: ``inject`` takes ``virtio_net_hdr`` + frame, ``written`` holds the same."""


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

    def recv_gro_from(self, buf: memoryview) -> tuple[int, str, int, int]:
        n, source, port = self.recv_from(buf)
        return n, source, port, self.gro.popleft() if self.gro else 0

    def send(self, packet: memoryview, flow: int, dest: str | None = None) -> None:
        super().send(packet, flow, dest)
        self.sends += 1

    def send_segments(self, packets: memoryview, size: int, flow: int, dest: str | None = None) -> None:
        if self.send_error is not None:
            raise OSError(self.send_error, "send failed")
        data = bytes(packets)
        self.sends += 1
        rows = [(data[i : i + size], flow) for i in range(0, len(data), size)]
        if self.fail_after is not None and self.fail_after < len(rows):
            # like a second sendmsg of one send_segments() refused (ENOBUFS) after the first went out
            self.sent.extend(rows[: self.fail_after])
            self.sent_to.extend([dest or self.peer] * self.fail_after)
            err = OSError(errno.ENOBUFS, "no buffer space")
            err.sent = self.fail_after
            raise err
        self.sent.extend(rows)
        self.sent_to.extend([dest or self.peer] * len(rows))


# -- the conformance suite for encapsulators ------------------------------------------------------------------
#
# A plugin author runs it against their class, in their own test suite:
#
#     from tunneld.testing import EncapsulatorConformance
#
#     class TestMyMode(EncapsulatorConformance):
#         encapsulator = MyMode
#         options = {"session": "7"}      # what --opt would pass; optional
#         ends = {END_A: {"self": END_A}, END_B: {"self": END_B}}   # options that differ per end; optional
#
# pytest collects each ``test_*`` method below. ``check_encapsulator(cls, options)`` runs the same checks in one
# call for those who use another runner. Everything here is stdlib: frames are made with struct, not scapy.
#
# The kit plays two ends, END_A and END_B (each the other's one peer, whose id is its address), and goes through
# the per-peer session contract (tunneld/encap/session.py) for every codec: a stateless one's sessions are its
# one HeaderSession over ``encap``/``decap``, so the header-only contract is checked through the same doors.
# Time is a FakeClock: sessions see ``now``, and the engines' timers run when the test moves it.

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
SENTINEL = 0xA5  # fills the headroom and the tail so a stray write shows
END_A, END_B = "192.0.2.1", "192.0.2.2"  # the two ends the kit plays; each is the other's one peer
EPOCH = 1_000_000.0  # the fake clock's start: sessions must not assume time starts at 0


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


Ends = Mapping[str, Mapping[str, Any]]


def build(cls: type[Encapsulator], options: Mapping[str, Any] | None = None, *, end: str = END_A,
          ends: Ends | None = None) -> Encapsulator:
    """The codec as the daemon at ``end`` builds it: core settings plus ``options``, and what ``ends`` says for
    that end (a keyed codec's own identity), as ``TunnelConfig.extra``."""
    extra = {**(options or {}), **((ends or {}).get(end) or {})}
    other = END_B if end == END_A else END_A
    return cls.from_options(TunnelConfig(peer=other, mode=cls.name, extra=extra).options())


def pair(cls: type[Encapsulator], options: Mapping[str, Any] | None = None,
         ends: Ends | None = None) -> tuple[Encapsulator, Session, Encapsulator, Session]:
    """Both ends' codecs and the session each keeps for the other: (codec at A, A's session for B, codec at B,
    B's session for A)."""
    a, b = build(cls, options, end=END_A, ends=ends), build(cls, options, end=END_B, ends=ends)
    return a, session_of(a, END_B), b, session_of(b, END_A)


def check_declaration(cls: type[Encapsulator], options: Mapping[str, Any] | None = None, *,
                      ends: Ends | None = None) -> None:
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
    given = set(options or {}).union(*(ends or {}).values())
    undeclared = given - set(cls.options)
    if undeclared:
        raise ConformanceError(f"{cls.name}: options {sorted(undeclared)} are not declared in {cls.__name__}.options")
    codec = build(cls, options, ends=ends)
    if not isinstance(codec, cls):
        raise ConformanceError(f"{cls.name}: from_options returned {type(codec).__name__}, not a {cls.__name__}")
    if not isinstance(codec.header_len, int) or not 0 <= codec.header_len <= cls.header_room:
        raise ConformanceError(f"{cls.name}: header_len {codec.header_len!r} must be an int in 0..header_room "
                               f"({cls.header_room})")
    if codec.overhead(False) < codec.outer_overhead(False) or codec.outer_overhead(False) < 20:
        raise ConformanceError(f"{cls.name}: overhead arithmetic is inconsistent")
    if not isinstance(codec.trailer_len, int) or not 0 <= codec.trailer_len <= codec.tail_room:
        raise ConformanceError(f"{cls.name}: trailer_len {codec.trailer_len!r} must be an int in 0..tail_room "
                               f"({codec.tail_room})")
    if not isinstance(codec.align, int) or codec.align < 1:
        raise ConformanceError(f"{cls.name}: align {codec.align!r} must be a positive int")
    if codec.keyed and not codec.stateful:
        raise ConformanceError(f"{cls.name}: keyed, but keeps no sessions of its own: peer_key would never be asked")
    for peer in (END_A, END_B):
        if not isinstance(session_of(codec, peer), Session):
            raise ConformanceError(f"{cls.name}: session({peer!r}) is not a tunneld.encap.session.Session")
    if codec.stateful and session_of(codec, END_A) is session_of(codec, END_B):
        raise ConformanceError(f"{cls.name}: a stateful codec handed two peers one session; each keeps its own")


def _seal_checked(codec: Encapsulator, session: Session, frame: bytes, now: float = EPOCH) -> bytes | None:
    """Seal one frame in a buffer laid out like the engine's (``header_room`` free in front, ``tail_room`` behind),
    and check the session kept to its space: the sealed packet, or None when the session held the frame
    (HELD: it will hand it over through ``poll``). A stateless codec (the header-only contract) must also leave
    the frame itself as it was."""
    tail = codec.tail_room + codec.align + 16
    buf = bytearray([SENTINEL]) * HEADROOM + bytearray(frame) + bytearray([SENTINEL]) * tail
    end = HEADROOM + len(frame)
    try:
        sealed = session.seal(buf, HEADROOM, end, now)
    except Exception as e:
        raise ConformanceError(f"{codec.name}: encap raised {type(e).__name__}: {e} on a {len(frame)}-byte frame "
                               "(through its session's seal)") from e
    if sealed is HELD:
        return None
    if isinstance(sealed, Drop):
        raise ConformanceError(f"{codec.name}: encap dropped a well-formed {len(frame)}-byte frame ({sealed.value})")
    if (not isinstance(sealed, tuple) or len(sealed) != 2 or not all(type(x) is int for x in sealed)):
        raise ConformanceError(f"{codec.name}: seal returned {sealed!r}: neither (start, end), a Drop nor HELD")
    start, stop = sealed
    last = end + codec.trailer_len + codec.align - 1
    if not HEADROOM - codec.header_len <= start <= HEADROOM:
        raise ConformanceError(f"{codec.name}: encap returned start {start!r}; with header_len {codec.header_len} it "
                               f"must be in {HEADROOM - codec.header_len}..{HEADROOM}")
    if not start < stop <= last:
        raise ConformanceError(f"{codec.name}: seal returned end {stop} for a frame ending at {end}; with trailer_len "
                               f"{codec.trailer_len} and align {codec.align} it must be in {start + 1}..{last}")
    if len(buf) != HEADROOM + len(frame) + tail:
        raise ConformanceError(f"{codec.name}: encap resized the buffer")
    if any(b != SENTINEL for b in buf[:start]) or any(b != SENTINEL for b in buf[max(stop, end):]):
        raise ConformanceError(f"{codec.name}: encap wrote outside [start, end) of the buffer it returned")
    if not codec.stateful and bytes(buf[HEADROOM:end]) != frame:
        raise ConformanceError(f"{codec.name}: encap changed the frame itself; headers go in front of it")
    return bytes(buf[start:stop])


def _decap_checked(codec: Encapsulator, packet: bytes) -> int | Drop:
    """``decap`` as the header-only contract states it (stateless codecs): an offset or a Drop, never raised."""
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


def _open_checked(codec: Encapsulator, session: Session, packet: bytes, now: float = EPOCH,
                  sender: str = END_A) -> tuple[int, int] | Drop | object:
    """What the engine would make of one datagram from ``sender`` arriving for ``session``: a keyed codec's
    ``peer_key`` first (a Drop, the sender's id, or another peer's: ``unknown_peer`` here), then the session's
    ``open``. Nothing may raise; the verdict is ``(offset, length)`` inside the packet, a Drop or HELD."""
    view = memoryview(packet)
    if codec.keyed:
        try:
            named = codec.peer_key(view)
        except Exception as e:
            raise ConformanceError(f"{codec.name}: peer_key raised {type(e).__name__}: {e} on {len(packet)} bytes "
                                   f"{packet[:32].hex()}...") from e
        if isinstance(named, Drop):
            return named
        if named != sender:
            return Drop.UNKNOWN_PEER
    try:
        verdict = session.open(view, now)
    except Exception as e:
        raise ConformanceError(
            f"{codec.name}: decap raised {type(e).__name__}: {e} on {len(packet)} bytes {packet[:32].hex()}... "
            "(through its session's open)") from e
    if verdict is HELD or isinstance(verdict, Drop):
        return verdict
    if (not isinstance(verdict, tuple) or len(verdict) != 2 or not all(type(x) is int for x in verdict)
            or not (0 <= verdict[0] and 0 <= verdict[1] and verdict[0] + verdict[1] <= len(packet))):
        raise ConformanceError(f"{codec.name}: decap returned {verdict!r} for {len(packet)} bytes: "
                               "neither a Drop nor an offset into the packet (nor HELD, through its session's open)")
    return verdict


def _inner_version(device: DeviceKind, frame: bytes) -> int:
    if device is DeviceKind.TAP:
        return 6 if frame[12:14] == b"\x86\xdd" else 4
    return frame[0] >> 4 if frame else 0


def _exchange_own(a: tuple[Encapsulator, Session], b: tuple[Encapsulator, Session], now: float,
                  rounds: int = 8) -> list[bytes]:
    """The sessions' own packets due at ``now`` (handshakes, keepalives), each handed to the other end, until
    neither has more (at most ``rounds`` times): the frames this let out (a session's held frames)."""
    out: list[bytes] = []
    for _ in range(rounds):
        moved = False
        for (codec, session, sender), (rcodec, rsession) in (((*a, END_A), b), ((*b, END_B), a)):
            for packet in session.poll(now):
                moved = True
                verdict = _open_checked(rcodec, rsession, packet, now, sender)
                if isinstance(verdict, Drop):
                    raise ConformanceError(f"{codec.name}: the peer's session dropped a packet of the codec's own "
                                           f"({len(packet)} bytes): {verdict.value}")
                if verdict is not HELD:
                    out.append(packet[verdict[0] : verdict[0] + verdict[1]])
        if not moved:
            return out
    raise ConformanceError(f"{a[0].name}: the sessions still had packets of their own after {rounds} exchanges "
                           "at one instant (a deadline that stays in the past?)")


def check_round_trip(cls: type[Encapsulator], options: Mapping[str, Any] | None = None, *, count: int = 300,
                     seed: int = 0, ends: Ends | None = None) -> None:
    """Random well-formed frames sealed by one end's session for the other come out of the other end's session
    for it unchanged, header and trailer within the room declared; a declared constant header (the offload path
    lays it before every row) is what is laid before each. What the sessions send of their own at the same
    instant (a handshake) is exchanged; frames a session held must come out that way, in order."""
    sender, to_b, receiver, from_a = pair(cls, options, ends)
    now = EPOCH
    held: list[bytes] = []  # frames a session held, in order, and those that came out through its own packets
    out = _exchange_own((sender, to_b), (receiver, from_a), now)
    for i, frame in enumerate(random_frames(cls.device, count, seed)):
        version = _inner_version(cls.device, frame)
        declared = sender.constant_header(version) if version in (4, 6) and not sender.stateful else None
        at_limit = sender.pads_within_limit and i % 2 == 1
        if sender.pads_within_limit:  # every other frame is exactly the limit: no padding may pass it
            to_b.set_frame_limit(len(frame) if at_limit else 65535)
        wire = _seal_checked(sender, to_b, frame, now)
        if wire is None:
            held.append(frame)
            out += _exchange_own((sender, to_b), (receiver, from_a), now)
            continue
        if at_limit and len(wire) > sender.header_len + len(frame) + sender.trailer_len:
            raise ConformanceError(f"{cls.name}: frame {i} of exactly the frame limit ({len(frame)} bytes) was sealed "
                                   f"to {len(wire)} bytes: pads_within_limit allows header_len + trailer_len "
                                   f"({sender.header_len + sender.trailer_len}) around it, no padding")
        if declared is not None and wire[: len(wire) - len(frame)] != declared:
            raise ConformanceError(f"{cls.name}: frame {i} ({len(frame)} bytes) got the header "
                                   f"{wire[: len(wire) - len(frame)].hex()}, not the declared "
                                   f"constant_header({version}) {bytes(declared).hex()}")
        verdict = _open_checked(receiver, from_a, wire, now)
        if isinstance(verdict, Drop):
            raise ConformanceError(f"{cls.name}: frame {i} ({len(frame)} bytes) was dropped on decap: {verdict.value}")
        if verdict is HELD or wire[verdict[0] : verdict[0] + verdict[1]] != frame:
            raise ConformanceError(f"{cls.name}: frame {i} came back different after encap and decap")
        now += 0.001
    if out != held:
        raise ConformanceError(f"{cls.name}: {len(held)} frames were held by the session and {len(out)} came out "
                               "through its own packets, or not unchanged and in order")


def _mutations(rng: random.Random, valid: list[bytes], reach: int, count: int) -> list[bytes]:
    """Garbage, and bit flips (some truncated) of valid packets within ``reach`` bytes of their start."""
    out = []
    for _ in range(count):
        choice = rng.random()
        if choice < 0.3:
            out.append(rng.randbytes(rng.randint(0, 1600)))
            continue
        data = bytearray(rng.choice(valid))
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(min(len(data), reach))
            data[position] ^= 1 << rng.randrange(8)
        if choice > 0.8:
            data = data[: rng.randrange(len(data) + 1)]
        out.append(bytes(data))
    return out


def check_malformed(cls: type[Encapsulator], options: Mapping[str, Any] | None = None, *, count: int = 2000,
                    seed: int = 0, ends: Ends | None = None) -> None:
    """Garbage, truncations and bit flips of valid packets: nothing raises (``decap``, a keyed codec's
    ``peer_key``, the session's ``open``); always a Drop, HELD or a place in the packet. A session that
    authenticates (``authenticates``: its accepted datagrams may move the peer's endpoint) accepts no altered
    datagram, is not moved by any it refused (the valid ones are all accepted after), and accepts none twice
    (a replay from anywhere would otherwise move the peer)."""
    rng = random.Random(seed)
    sender, to_b, receiver, from_a = pair(cls, options, ends)
    _exchange_own((sender, to_b), (receiver, from_a), EPOCH)
    valid = [w for w in (_seal_checked(sender, to_b, f) for f in random_frames(cls.device, 20, seed + 1)) if w]
    valid += to_b.poll(EPOCH + 3600)  # an own packet too, if the session has one due by then
    stateless = not receiver.stateful
    authenticates = from_a.authenticates
    if stateless:
        for n in range(64):
            _decap_checked(receiver, bytes(n))
            _decap_checked(receiver, b"\xff" * n)
    for n in range(64):
        for data in (bytes(n), b"\xff" * n):
            verdict = _open_checked(receiver, from_a, data)
            if authenticates and not isinstance(verdict, Drop):
                raise ConformanceError(f"{cls.name}: an authenticating session accepted {n} bytes of {data[:1].hex()}")
    reach = receiver.header_len + 60
    altered = [wire[:n] for wire in valid for n in range(min(len(wire), reach))]
    for data in altered + _mutations(rng, valid, reach, count):
        if stateless:
            _decap_checked(receiver, data)
        if authenticates and data in valid:
            continue  # flips that undid each other: a valid datagram, kept for the checks below
        verdict = _open_checked(receiver, from_a, data)
        if authenticates and not isinstance(verdict, Drop):
            raise ConformanceError(f"{cls.name}: an authenticating session accepted an altered datagram "
                                   f"({len(data)} bytes {data[:32].hex()}...)")
    if authenticates:
        for i, wire in enumerate(valid):  # none of that moved the session: each is accepted, in order
            verdict = _open_checked(receiver, from_a, wire, EPOCH + 3600)
            if isinstance(verdict, Drop):
                raise ConformanceError(f"{cls.name}: an authenticating session refused valid datagram {i} after the "
                                       f"altered ones ({verdict.value}): what it refused moved its state")
        for i, wire in enumerate(valid):  # and none twice
            if not isinstance(_open_checked(receiver, from_a, wire, EPOCH + 3600), Drop):
                raise ConformanceError(f"{cls.name}: an authenticating session accepted valid datagram {i} replayed")


def paths(cls: type[Encapsulator], options: Mapping[str, Any] | None = None, *,
          ends: Ends | None = None) -> tuple[bool, ...]:
    """The data paths ``cls`` takes: batches of one (offload False), and offloads where it declares a constant
    header (and keeps no per-peer sessions)."""
    return (False, True) if offload_supported(build(cls, options, ends=ends)) else (False,)


def engine_pair(cls: type[Encapsulator], options: Mapping[str, Any] | None, offload: bool,
                make: Callable[..., Engine] = Engine, *, ends: Ends | None = None,
                clock: Callable[[], float] | None = None) -> tuple[Engine, Engine]:
    """Two engines over fakes, one per end (END_A and END_B, each the other's peer), on the path ``offload``
    says, on ``clock`` (a new FakeClock at EPOCH when None: nothing in the kit depends on the real time)."""
    device, link = (FakeVnetDevice, FakeGsoLink) if offload else (FakeDevice, FakeLink)
    clock = clock or FakeClock(EPOCH)
    return tuple(make(device(), link(peer), build(cls, options, end=end, ends=ends), max_frame=9000, offload=offload,
                      clock=clock)
                 for end, peer in ((END_A, END_B), (END_B, END_A)))


def _drain(callback: Callable[[], None], pending: deque, rounds: int) -> None:
    for _ in range(rounds):  # each wake-up moves at most a batch; bounded either way
        if not pending:
            break
        callback()


def _frames_out(written: list[bytes], offload: bool) -> list[bytes]:
    """The frames a receiving engine wrote to its device, each plain one behind NO_OFFLOAD on the offload path."""
    if not offload:
        return written
    if any(w[:VNET_HDR_LEN] != NO_OFFLOAD for w in written):
        return written  # a super-frame: no comparison frame by frame makes sense; the caller's check fails
    return [w[VNET_HDR_LEN:] for w in written]


def _carry(sender: Engine, receiver: Engine, source: str, rounds: int) -> None:
    """What ``sender`` put on its link, delivered to ``receiver``'s from ``source``, and received."""
    for packet, _flow in sender.link.sent:
        receiver.link.deliver(packet, source=source)
    sender.link.sent.clear()
    _drain(receiver.on_link_readable, receiver.link.pending, rounds)


def check_through_engine(cls: type[Encapsulator], options: Mapping[str, Any] | None = None, *, count: int = 100,
                         seed: int = 0, ends: Ends | None = None) -> None:
    """Two real engines over fakes, one per end, on each path the codec takes: frames injected at one device
    come out of the other (the codec's own packets, if any, go along and are dropped by neither); then the same
    under bulk load, with a refusing variant (check_verdicts_under_load)."""
    for offload in paths(cls, options, ends=ends):
        a, b = engine_pair(cls, options, offload, ends=ends)
        for e in (a, b):
            e.run_timers()  # as attach() does: what sessions have due from the start leaves
        for sender, receiver, source, offset in ((a, b, END_A, 0), (b, a, END_B, 1)):
            frames = random_frames(cls.device, count, seed + offset)
            sender.device.inject(*[NO_OFFLOAD + f for f in frames] if offload else frames)
            _drain(sender.on_device_readable, sender.device.pending, count)
            for _ in range(4):  # the answers a handshake needs, and the frames held meanwhile
                _carry(sender, receiver, source, 4 * count)
                _carry(receiver, sender, END_B if source == END_A else END_A, 4 * count)
            path = "offload" if offload else "plain"
            if sender.stats.drops or receiver.stats.drops:
                raise ConformanceError(f"{cls.name} ({path} path): the engines dropped well-formed frames: "
                                       f"{dict(sender.stats.drops)} / {dict(receiver.stats.drops)}")
            if _frames_out(receiver.device.written, offload) != frames:
                raise ConformanceError(f"{cls.name} ({path} path): {len(receiver.device.written)} of {len(frames)} "
                                       "frames arrived, or not unchanged and in order")
    check_verdicts_under_load(cls, options, seed=seed, ends=ends)


def check_own_packets(cls: type[Encapsulator], options: Mapping[str, Any] | None = None, *, minutes: float = 5,
                      seed: int = 0, ends: Ends | None = None) -> None:
    """Own packets and timers: two engines on one FakeClock, run through ``minutes`` of traffic then silence in
    milliseconds, the clock moved from event to event (the next frame, or an engine's ``next_deadline``) and
    ``run_timers`` called when an engine's timer is due, as the loop's timer would. What must hold:
    - an engine's timer is never later than a session's deadline, and after ``run_timers`` no session of it has
      anything left due (a deadline that stays in the past would wake the loop without end);
    - a session's ``poll`` hands nothing out before its deadline;
    - every packet of the codec's own is counted (``codec_packets``: link datagrams = data sent + own), and
      the other end drops none; every frame arrives, in order.
    """
    clock = FakeClock(EPOCH)
    a, b = engine_pair(cls, options, False, ends=ends, clock=clock)
    rng = random.Random(seed)
    end_at = EPOCH + minutes * 60
    busy_until = EPOCH + minutes * 30  # frames for the first half, then silence
    frames = random_frames(cls.device, 400, seed)
    sent_frames: dict[int, list[bytes]] = {0: [], 1: []}
    datagrams = [0, 0]
    engines = (a, b)
    sources = (END_A, END_B)
    next_frame = EPOCH + rng.uniform(0.1, 3)

    def run_timers(e: Engine, now: float) -> None:
        e.run_timers()
        late = [p for p in e.peers.all if p.session.deadline() <= now]
        if late:
            raise ConformanceError(f"{cls.name}: after run_timers at {now - EPOCH:.3f} s a session's deadline "
                                   f"is still due ({late[0].session.deadline() - EPOCH:.3f} s)")

    for e in engines:
        run_timers(e, EPOCH)
    steps = 0
    while True:
        steps += 1
        if steps > 100_000:
            raise ConformanceError(f"{cls.name}: more than 100000 timer and traffic events in {minutes} minutes")
        now = min(a.next_deadline(), b.next_deadline(), next_frame if next_frame < busy_until else math.inf, end_at)
        if now >= end_at:
            break
        if now < clock.now:
            raise ConformanceError(f"{cls.name}: an engine's timer is set in the past ({clock.now - now:.3f} s)")
        clock.now = now
        for i, e in enumerate(engines):
            for peer in e.peers.all:
                early = peer.session.deadline() > now
                if early and peer.session.poll(now):
                    raise ConformanceError(f"{cls.name}: poll handed out a packet before the session's deadline")
            if e.next_deadline() <= now:
                run_timers(e, now)
        if now == next_frame:
            i = rng.randrange(2)
            frame = frames[(len(sent_frames[0]) + len(sent_frames[1])) % len(frames)]
            sent_frames[i].append(frame)
            engines[i].device.inject(frame)
            _drain(engines[i].on_device_readable, engines[i].device.pending, 4)
            next_frame = now + rng.uniform(0.05, 3)
        for i, e in enumerate(engines):  # what left, delivered; and what that makes the other answer, in turn
            datagrams[i] += len(e.link.sent)
            _carry(e, engines[1 - i], sources[i], 64)
        for i, e in enumerate(engines):
            datagrams[i] += len(e.link.sent)
            _carry(e, engines[1 - i], sources[i], 64)
        for e in engines:
            soonest = min((p.session.deadline() for p in e.peers.all), default=math.inf)
            if e.next_deadline() > soonest:
                raise ConformanceError(f"{cls.name}: the engine's timer ({e.next_deadline() - EPOCH:.3f} s) is later "
                                       f"than a session's deadline ({soonest - EPOCH:.3f} s): a packet would be late")
    for i, e in enumerate(engines):
        other = engines[1 - i]
        if e.stats.drops:
            raise ConformanceError(f"{cls.name}: an engine dropped packets while timers ran: {dict(e.stats.drops)}")
        if datagrams[i] != e.stats.tx_packets + e.stats.codec_packets:
            raise ConformanceError(f"{cls.name}: {datagrams[i]} datagrams left an engine, which counted "
                                   f"{e.stats.tx_packets} frames and {e.stats.codec_packets} packets of its own")
        if other.device.written != sent_frames[i]:
            raise ConformanceError(f"{cls.name}: {len(other.device.written)} of {len(sent_frames[i])} frames "
                                   "arrived while timers ran, or not unchanged and in order")


# -- bulk load: TCP-like and UDP-like streams, as segments and as GRO reads -----------------------------------

_TCP = struct.Struct("!HHIIBBHHH")
_UDP = struct.Struct("!HHHH")
_MACS = bytes.fromhex("020000000002" "020000000001")


def _l4_checksum(src: bytes, dst: bytes, proto: int, segment: bytes) -> int:
    return internet_checksum(src + dst + struct.pack("!BBH", 0, proto, len(segment)) + segment)


def stream(device: DeviceKind, proto: int, payload: int, count: int, seed: int = 0) -> list[bytes]:
    """``count`` in-order segments of one TCP flow (``proto`` 6, ACK only) or datagrams of one UDP flow (17),
    ``payload`` bytes each, checksums right: what a kernel hands a tunnel from a bulk transfer, the stuff that
    GRO coalesces and TSO/USO cuts."""
    rng = random.Random(seed)
    src, dst = bytes([10, 1, 0, 1]), bytes([10, 1, 0, 2])
    out = []
    for i in range(count):
        data = rng.randbytes(payload)
        if proto == 6:
            l4 = _TCP.pack(40000, 5201, 1000 + i * payload, 1, 5 << 4, 0x10, 512, 0, 0) + data
            csum_at = 16
        else:
            l4 = _UDP.pack(40000, 5201, 8 + len(data), 0) + data
            csum_at = 6
        csum = _l4_checksum(src, dst, proto, l4) or 0xFFFF
        l4 = l4[:csum_at] + csum.to_bytes(2, "big") + l4[csum_at + 2 :]
        ip = _IPV4.pack(0x45, 0, 20 + len(l4), i & 0xFFFF, 0x4000, 64, proto, 0, src, dst)
        ip = ip[:10] + internet_checksum(ip).to_bytes(2, "big") + ip[12:]
        packet = ip + l4
        out.append(_MACS + b"\x08\x00" + packet if device is DeviceKind.TAP else packet)
    return out


def _gro_reads(datagrams: list[bytes]) -> list[list[bytes]]:
    """Consecutive datagrams grouped as UDP_GRO would: one length (at most 64), a shorter one ends a group."""
    reads: list[list[bytes]] = []
    for d in datagrams:
        last = reads[-1] if reads else None
        if last and len(last) < 64 and len(d) <= len(last[0]) and len(last[-1]) == len(last[0]):
            last.append(d)
        else:
            reads.append([d])
    return reads


def _segments_written(written: list[bytes], offload: bool) -> int:
    """How many datagrams' worth of frames the device got: a GSO super-frame stands for its segments."""
    if not offload:
        return len(written)
    total = 0
    for w in written:
        _flags, gso_type, hdr_len, gso_size, csum_start, _ = HDR.unpack_from(w)
        if gso_type == 0:
            total += 1
            continue
        # the L4 header's own length, not the kernel's hdr_len (NOTES: never trust it)
        l4 = w[VNET_HDR_LEN + csum_start :]
        headers = csum_start + ((l4[12] >> 4) * 4 if gso_type != 5 else 8)
        total += -(-(len(w) - VNET_HDR_LEN - headers) // gso_size)
    return total


REFUSE_ABOVE = 1000  # the refusing variant's limit on inner frames, in bytes


def _refused(packet: memoryview, at: int, length: int, limit: int) -> bool:
    """The refusing variant's rule for an inner frame at ``packet[at:at+length]``: over ``limit`` bytes, or (to
    break runs in the middle) a last byte below 8, about one in 32 of random payloads."""
    return length > limit or (length > 0 and packet[at + length - 1] < 8)


class RefusingSession(Session):
    """A stateful codec's session as a plugin author might extend it: its ``open`` also refuses some frames."""

    __slots__ = ("_inner", "_limit")

    def __init__(self, inner: Session, limit: int) -> None:
        self._inner = inner
        self._limit = limit

    @property
    def authenticates(self) -> bool:  # type: ignore[override]
        return self._inner.authenticates

    def seal(self, buf: bytearray, start: int, end: int, now: float):
        return self._inner.seal(buf, start, end, now)

    def open(self, packet: memoryview, now: float):
        verdict = self._inner.open(packet, now)
        if verdict.__class__ is tuple and _refused(packet, verdict[0], verdict[1], self._limit):
            return Drop.LENGTH_MISMATCH
        return verdict

    def poll(self, now: float) -> list[bytes]:
        return self._inner.poll(now)

    def deadline(self) -> float:
        return self._inner.deadline()


def refusing(cls: type[Encapsulator], limit: int = REFUSE_ABOVE, options: Mapping[str, Any] | None = None, *,
             ends: Ends | None = None) -> type[Encapsulator]:
    """``cls`` (built with ``options``) as a plugin author might extend it: it also refuses inner frames over
    ``limit`` bytes, and, to break runs in the middle, those whose last byte is below 8 (about one in 32 of
    random payloads). A stateless codec's ``decap`` refuses them: whatever fast verdict ``cls`` declared must
    give way to it. A stateful codec's sessions' ``open`` does: the engine's per-peer path must honour it."""
    stateful = build(cls, options, ends=ends).stateful

    if stateful:
        class Refusing(cls):  # type: ignore[valid-type, misc]
            def session(self, peer_id: str) -> Session:
                return RefusingSession(super().session(peer_id), limit)
    else:
        class Refusing(cls):  # type: ignore[valid-type, misc, no-redef]
            def decap(self, packet: memoryview) -> int | Drop:
                verdict = super().decap(packet)
                if verdict.__class__ is not Drop and _refused(packet, verdict, len(packet) - verdict, limit):
                    return Drop.LENGTH_MISMATCH
                return verdict

    Refusing.__name__ = Refusing.__qualname__ = f"Refusing{cls.__name__}"
    return Refusing


def check_verdicts_under_load(cls: type[Encapsulator], options: Mapping[str, Any] | None = None, *,
                              make: Callable[..., Engine] = Engine, seed: int = 0, ends: Ends | None = None) -> None:
    """Every datagram received gets the codec's verdict, on every path, under bulk TCP-like and UDP-like load:
    what a receiving engine delivers and drops (by reason) is exactly what the codec says of each datagram on
    the wire (a reference session at the receiving end, fed the same datagrams in the same order: for a
    stateless codec, ``decap``), whether the datagrams arrive one by one, gathered, or as coalesced (GRO) reads
    that the engine writes as super-frames. Checked for ``cls`` and for ``refusing(cls)``, which refuses some of
    them: an engine that lets a coalesced run past the codec, or a datagram past a peer's session, fails here.
    ``make`` builds the engines (the kit's own tests hand it a broken one to see this fail)."""
    for codec_cls in (cls, refusing(cls, options=options, ends=ends)):
        _check_load(codec_cls, options, make, seed, ends)


def _check_load(cls: type[Encapsulator], options: Mapping[str, Any] | None, make: Callable[..., Engine],
                seed: int, ends: Ends | None) -> None:
    loads = [(6, 1400, 40), (6, 600, 40), (17, 1200, 30), (17, 300, 30), (6, 1000, 7), (6, 980, 5)]
    for offload in paths(cls, options, ends=ends):
        path = "offload" if offload else "plain"
        sender, receiver = engine_pair(cls, options, offload, make, ends=ends)
        reference = build(cls, options, end=END_B, ends=ends)  # judges every datagram on the wire, in the same order
        judge = session_of(reference, END_A)
        want: Counter = Counter()
        accepted = accepted_bytes = 0
        for k, (proto, payload, count) in enumerate(loads):
            frames = stream(cls.device, proto, payload, count, seed + k)
            frames.append(stream(cls.device, proto, payload // 3, 1, seed + k)[0])  # a shorter last one
            sender.device.inject(*[NO_OFFLOAD + f for f in frames] if offload else frames)
            _drain(sender.on_device_readable, sender.device.pending, 4 * len(frames))
            wire = [p for p, _ in sender.link.sent]
            sender.link.sent.clear()
            for packet in wire:
                verdict = _open_checked(reference, judge, packet)
                if isinstance(verdict, Drop):
                    want[verdict] += 1
                elif verdict is not HELD:  # the codec's own packets are neither delivered nor dropped
                    accepted += 1
                    accepted_bytes += verdict[1]
            if offload and k % 2 == 0:  # coalesced by the kernel: GRO reads
                for read in _gro_reads(wire):
                    receiver.link.deliver_gro(read, source=END_A)
            else:  # one by one (a peer without GRO on the way): the engine gathers them
                for packet in wire:
                    receiver.link.deliver(packet, source=END_A)
            _drain(receiver.on_link_readable, receiver.link.pending, 4 * len(wire) + 4)
        got = receiver.stats
        written = _segments_written(receiver.device.written, offload)
        if dict(got.drops) != dict(want) or got.rx_packets != accepted or got.rx_bytes != accepted_bytes \
                or written != accepted:
            raise ConformanceError(
                f"{cls.name} ({cls.__name__}, {path} path): the codec accepted {accepted} datagrams ({accepted_bytes} inner bytes) "
                f"and refused {dict((r.value, n) for r, n in want.items())}; the engine delivered {got.rx_packets} "
                f"({got.rx_bytes} bytes, {written} datagrams' worth written) and dropped "
                f"{dict((r.value, n) for r, n in got.drops.items())}: a verdict was not honoured")


CHECKS: tuple[Callable[..., None], ...] = (check_declaration, check_round_trip, check_malformed, check_through_engine,
                                           check_own_packets)


def check_encapsulator(cls: type[Encapsulator], options: Mapping[str, Any] | None = None, *,
                       ends: Ends | None = None) -> None:
    """Every conformance check; raises ConformanceError naming the first broken rule."""
    for check in CHECKS:
        check(cls, options, ends=ends)


class EncapsulatorConformance:
    """Subclass as ``TestSomething`` and set ``encapsulator`` (and ``options``, and ``ends`` for options that
    differ between the two ends, by END_A/END_B); pytest runs each check."""

    encapsulator: type[Encapsulator]
    options: Mapping[str, Any] = {}
    ends: Ends = {}

    def test_declaration(self) -> None:
        check_declaration(self.encapsulator, self.options, ends=self.ends)

    def test_round_trip(self) -> None:
        check_round_trip(self.encapsulator, self.options, ends=self.ends)

    def test_malformed_input_never_raises(self) -> None:
        check_malformed(self.encapsulator, self.options, ends=self.ends)

    def test_through_engine(self) -> None:
        check_through_engine(self.encapsulator, self.options, ends=self.ends)

    def test_own_packets_and_timers(self) -> None:
        check_own_packets(self.encapsulator, self.options, ends=self.ends)

"""A keyed codec for tests only: every part of the session contract (tunneld/encap/session.py) in one mode.

Not a security protocol (one shared secret, no handshake, no encryption, counters that restart with the
process): it exists so that the engine's stateful path, the conformance kit and two real tunnelds can be
proven against a codec that keeps per-peer state, writes a trailer, sends packets of its own on a timer,
names the peer from the packet, and authenticates what it accepts (so that the engine may roam).

Wire format, the UDP payload (default port 4793)::

     0                   1                   2                   3
    |     Type      |                   Reserved (0)                |
    |                                                               |
    |              Sender identity (16 bytes: its underlay          |
    |              address, IPv4 as ::ffff:a.b.c.d)                 |
    |                                                               |
    |                     Counter (64 bits)                         |
    |                                                               |
    |                     Inner IP packet (DATA only) ...           |
    |                                                               |
    |              Tag (16 bytes): keyed BLAKE2s-128 over           |
    |              everything before it                             |

Type: 0x01 DATA (an inner packet follows), 0x02 KEEPALIVE (nothing follows but the tag).

The sender's identity is the ``self`` option: this end's underlay address as its peers configure it (config
has no key field yet, so a peer's id is its configured address). The receiving codec names the peer from it
(``peer_key``), not from the datagram's source: that is what lets a peer's endpoint move.

Per peer (``KeyedSession``): the counter sent next, and the highest counter accepted. Sealing writes the header
in front of the frame and the tag behind it. Opening checks, in order, so that no unauthenticated datagram
changes anything: the header's shape (``truncated``, ``bad_flags``, ``reserved_bits``), the identity is this
session's peer (``unknown_peer``), the length suits the type (``runt_frame``: DATA without a packet;
``length_mismatch``: KEEPALIVE with one), the tag (``bad_checksum``, compared with ``hmac.compare_digest``),
then the counter must be above every one accepted before (``sequence``: replays and reordered packets go).
A keepalive is accepted as ``HELD``: no frame, no drop. ``poll`` sends one when nothing was sent to the peer
for ``keepalive`` seconds (the first at once); ``deadline`` says when.

Sans-IO: time comes in as ``now``; nothing here reads a clock, a socket or a logger, and the secret is never
part of a message.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import struct
from typing import Any, ClassVar, Hashable, Mapping

from tunneld.encap.base import DeviceKind, Drop, Encapsulator, Option, Transport, declare
from tunneld.encap.session import HELD, Session

PORT = 4793
TYPE_DATA = 0x01
TYPE_KEEPALIVE = 0x02

TYPE_OFFSET = 0
RESERVED_OFFSET = 1  # 3 bytes
IDENTITY_OFFSET = 4  # 16 bytes
IDENTITY_LEN = 16
COUNTER_OFFSET = 20  # 8 bytes
HEADER_LEN = 28
TAG_LEN = 16
COUNTER_MAX = (1 << 64) - 1
SECRET_MAX = 32  # BLAKE2s takes keys of up to 32 bytes
KEEPALIVE_MAX = 3600.0

_HEADER = struct.Struct("!B3x16sQ")
_COUNTER = struct.Struct("!Q")
_RESERVED = b"\0\0\0"


def identity_bytes(address: str) -> bytes:
    """An underlay address as the header carries it (16 bytes; IPv4 mapped into IPv6). ValueError if not one."""
    ip = ipaddress.ip_address(address)
    return (ipaddress.IPv6Address(f"::ffff:{ip}") if ip.version == 4 else ip).packed


def _keepalive(value: Any) -> float:
    """Seconds, from a config number or a command-line string: positive and at most an hour."""
    if isinstance(value, bool):
        raise ValueError(f"keepalive: expected seconds, got {value!r}")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"keepalive: expected seconds, got {value!r}") from None
    if not 0 < seconds <= KEEPALIVE_MAX:
        raise ValueError(f"keepalive: must be above 0 and at most {KEEPALIVE_MAX:.0f} seconds, got {value!r}")
    return seconds


class Keyed(Encapsulator):
    name: ClassVar[str] = "keyed"
    description: ClassVar[str] = ("IP packets (TUN) in UDP with per-peer counters and a BLAKE2s tag "
                                  "(test codec: sessions, trailers, keepalives, roaming)")
    device: ClassVar[DeviceKind] = DeviceKind.TUN
    transport: ClassVar[Transport] = Transport("udp", PORT)
    header_room: ClassVar[int] = HEADER_LEN
    tail_room: ClassVar[int] = TAG_LEN
    keyed: ClassVar[bool] = True
    spreads: ClassVar[bool] = False  # a counter and its replay check are one process's
    options: ClassVar[Mapping[str, Option]] = declare(
        Option("self", str, "this end's underlay address as its peers name it (sent in every packet)"),
        Option("secret", str, "shared secret for the BLAKE2s tag, 1-32 bytes; both ends must agree"),
        Option("keepalive", None, "seconds without sending to a peer before a keepalive goes to it", default=1.0),
    )

    def __init__(self, identity: str, secret: str, keepalive: float = 1.0) -> None:
        try:
            self.identity = identity_bytes(identity)
        except ValueError:
            raise ValueError(f"self: {identity!r} is not an IPv4 or IPv6 address") from None
        key = secret.encode()
        if not 1 <= len(key) <= SECRET_MAX:
            raise ValueError(f"secret: must be 1-{SECRET_MAX} bytes long")  # (the secret itself is never shown)
        self.address = str(ipaddress.ip_address(identity))
        self.keepalive = _keepalive(keepalive)
        self._mac = hashlib.blake2s(key=key, digest_size=TAG_LEN)  # copied per packet: the key is set up once
        self._ids: dict[bytes, str] = {}  # identity bytes -> the peer id a session was made for

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "Keyed":
        values = {name: options.get(name) for name in cls.options}
        for name in ("self", "secret"):
            if values[name] is None:
                raise ValueError(f"{name}: required")
            values[name] = cls.options[name].check(values[name])
        keepalive = values["keepalive"]
        return cls(values["self"], values["secret"], 1.0 if keepalive is None else keepalive)

    @property
    def header_len(self) -> int:
        return HEADER_LEN

    def describe(self) -> str:
        return f"self {self.address}, keepalive {self.keepalive:g}s"

    def session(self, peer_id: str) -> "KeyedSession":
        try:
            self._ids[identity_bytes(peer_id)] = peer_id
        except ValueError:
            pass  # not an address: no packet can name it (its session stays silent but harmless)
        return KeyedSession(self, peer_id)

    def peer_key(self, packet: memoryview) -> Hashable | Drop:
        if len(packet) < HEADER_LEN:
            return Drop.TRUNCATED
        if packet[TYPE_OFFSET] not in (TYPE_DATA, TYPE_KEEPALIVE):
            return Drop.BAD_FLAGS
        peer_id = self._ids.get(bytes(packet[IDENTITY_OFFSET : IDENTITY_OFFSET + IDENTITY_LEN]))
        return Drop.UNKNOWN_PEER if peer_id is None else peer_id

    # Session-only: there is no one-peer view to seal or open with (the engine and the kit use sessions). The
    # contract keeps encap/decap abstract, so they are here, refusing to be used.
    def encap(self, buf: bytearray, start: int, end: int) -> int | Drop:
        raise NotImplementedError("keyed: seals through session(peer_id)")

    def decap(self, packet: memoryview) -> int | Drop:
        raise NotImplementedError("keyed: opens through session(peer_id)")

    def tag(self, data: memoryview | bytes) -> bytes:
        mac = self._mac.copy()
        mac.update(data)
        return mac.digest()


class KeyedSession(Session):
    """One peer's state: the counter sent next, the highest accepted, when something was last sent to it."""

    __slots__ = ("_codec", "peer_id", "_peer", "tx_counter", "rx_counter", "last_sent")
    authenticates = True

    def __init__(self, codec: Keyed, peer_id: str) -> None:
        self._codec = codec
        self.peer_id = peer_id
        try:
            self._peer = identity_bytes(peer_id)
        except ValueError:
            self._peer = b""
        self.tx_counter = 0
        self.rx_counter: int | None = None  # none accepted yet
        self.last_sent = -math.inf  # the first keepalive is due at once

    def _header(self, buf: bytearray, at: int, kind: int) -> None:
        _HEADER.pack_into(buf, at, kind, self._codec.identity, self.tx_counter)
        self.tx_counter += 1  # 2**64 packets: no wrap to care about

    def seal(self, buf: bytearray, start: int, end: int, now: float):
        if end <= start:
            return Drop.RUNT_FRAME
        start -= HEADER_LEN
        self._header(buf, start, TYPE_DATA)
        buf[end : end + TAG_LEN] = self._codec.tag(memoryview(buf)[start:end])
        self.last_sent = now
        return start, end + TAG_LEN

    def open(self, packet: memoryview, now: float):
        n = len(packet)
        if n < HEADER_LEN + TAG_LEN:
            return Drop.TRUNCATED
        kind = packet[TYPE_OFFSET]
        if kind not in (TYPE_DATA, TYPE_KEEPALIVE):
            return Drop.BAD_FLAGS
        if packet[RESERVED_OFFSET : RESERVED_OFFSET + 3] != _RESERVED:
            return Drop.RESERVED_BITS
        if packet[IDENTITY_OFFSET : IDENTITY_OFFSET + IDENTITY_LEN] != self._peer:
            return Drop.UNKNOWN_PEER
        carried = n - HEADER_LEN - TAG_LEN
        if kind == TYPE_DATA and carried == 0:
            return Drop.RUNT_FRAME
        if kind == TYPE_KEEPALIVE and carried:
            return Drop.LENGTH_MISMATCH
        if not hmac.compare_digest(self._codec.tag(packet[: n - TAG_LEN]), packet[n - TAG_LEN :]):
            return Drop.BAD_CHECKSUM
        (counter,) = _COUNTER.unpack_from(packet, COUNTER_OFFSET)
        if self.rx_counter is not None and counter <= self.rx_counter:
            return Drop.SEQUENCE
        self.rx_counter = counter
        return HELD if kind == TYPE_KEEPALIVE else (HEADER_LEN, carried)

    def poll(self, now: float) -> list[bytes]:
        if now < self.deadline():
            return []
        packet = bytearray(HEADER_LEN + TAG_LEN)
        self._header(packet, 0, TYPE_KEEPALIVE)
        packet[HEADER_LEN:] = self._codec.tag(memoryview(packet)[:HEADER_LEN])
        self.last_sent = now
        return [bytes(packet)]

    def deadline(self) -> float:
        return self.last_sent + self._codec.keepalive

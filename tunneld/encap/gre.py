"""GRE (RFC 2784) with the key and sequence number extensions (RFC 2890): IP packets (``gre``, TUN) or
Ethernet frames (``gretap``, TAP, protocol type 0x6558 "transparent Ethernet bridging") directly over IP,
protocol 47.

Wire format, after the outer IP header::

     0                   1                   2                   3
    |C|R|K|S|s|Recur|  Reserved0  | Ver |         Protocol Type         |
    |      Checksum (optional)      |       Reserved1 (optional)    |   if C
    |                         Key (optional)                        |   if K
    |                 Sequence Number (optional)                    |   if S

The optional words appear in that order, each only when its bit is set; so the header is 4, 8, 12 or 16 bytes.

Outbound:
- ``gre`` picks the protocol type from the inner packet's version nibble (4 → 0x0800, 6 → 0x86DD); a TUN
  packet of any other version cannot be described and is dropped (``bad_protocol``).
- C: the checksum is the one's complement of the one's complement sum of the GRE header (checksum field zero)
  and the payload (RFC 2784 §2.5). K: the configured key. S: a counter that starts at 0 and wraps modulo
  2**32 (RFC 2890 §2.2), advanced once per encapsulated frame; each peer has its own (``GreSession``).

Inbound, checked in this order so that a damaged packet is counted as damaged rather than as something else:
1. version 0 (``bad_version``); R, s and the top recursion bit clear (RFC 2784 §2.3: "bits 1-5" other than K and
   S, which RFC 2890 gave meaning) else ``bad_flags``; reserved bits 6-12 are ignored, as RFC 2784 says.
2. The C, K and S bits exactly as configured: both ends must agree, as with Linux's ikey/okey, icsum/ocsum and
   iseq/oseq. A missing, unexpected (or, in step 5, different) key is ``key_mismatch``: it names another
   tunnel. A C or S bit we did not agree on is ``bad_flags``.
3. Long enough for that header (``truncated``); 4. the checksum verifies (``bad_checksum``).
5. Protocol type one this mode carries (``bad_protocol``); the key (``key_mismatch``).
6. The inner packet: ``gre`` needs an IP header of the version the protocol type names (``bad_protocol``),
   complete (``runt_frame``), whose length field accounts for exactly the bytes carried (``length_mismatch``:
   the outer IP length already trimmed any link padding, so nothing may be left over or missing). ``gretap``
   needs an Ethernet header (``runt_frame``); Ethernet frames may carry padding, so their contents are the
   receiving kernel's business.
7. Last, the sequence number, so that no invalid packet moves the receive window.

Sequence policy (RFC 2890 §2.2, without the optional reorder buffer): a packet whose number is ahead of the last
accepted one by less than 2**31 (serial arithmetic, so the wrap from 2**32-1 to 0 is "ahead") is in order and
accepted, gaps and all (lost packets are not waited for). One that is equal to or behind the last accepted one
is late or duplicate: silently discarded and counted as ``sequence``. Two exceptions keep a restarted peer from
being shut out (its counter starts again at 0, which looks "behind" us for up to 2**31 packets):
- a number more than ``REORDER_WINDOW`` behind cannot be a late packet (that many packets would have had to
  overtake it), so it is taken as the peer's new count and accepted;
- ``RESYNC_AFTER`` late packets in a row that are consecutive among themselves are a new count too.
The first packet after start-up is accepted whatever its number (RFC 2890 would start from 2**32-1, which
shuts out a peer that has been running for over 2**31 packets).

Per peer (tunneld/encap/session.py): with ``seq`` the send counter and the receive window are a peer's state,
kept in its ``GreSession``, so any number of peers each count and are judged on their own: one peer's late or
restarted sequence never disturbs another's. A peer added later starts afresh, as a new session. The codec's
own ``encap``/``decap`` use one session of the codec's (the one-peer view, for callers without a peer table).

Offloads (``constant_header``): without checksum and sequence number the header is constant per inner
protocol (``gre``: IPv4 and IPv6 differ by their protocol type; ``gretap``: one for all); with either, each
packet's header differs and the engine moves packets one by one. ``decap_batch`` judges a whole batch of
equal datagrams at once where the header bytes decide (and, for ``gre``, an IPv4 header without options
whose length accounts for the row), and asks ``decap`` for every row otherwise.
"""

from __future__ import annotations

import struct
from typing import ClassVar, Mapping

from tunneld.encap.base import (
    ETHERNET_HEADER_LEN,
    IPV4_HEADER_LEN,
    IPV6_HEADER_LEN,
    DeviceKind,
    Drop,
    Encapsulator,
    Option,
    Transport,
    declare,
    rows_agree,
)
from tunneld.encap.checksum import internet_checksum
from tunneld.encap.session import Session

IPPROTO_GRE = 47

# First 16 bits: flags and version.
FLAG_C = 0x8000  # checksum present
FLAG_R = 0x4000  # routing present (RFC 1701; RFC 2784 receivers discard)
FLAG_K = 0x2000  # key present (RFC 2890)
FLAG_S = 0x1000  # sequence number present (RFC 2890)
FLAG_STRICT_ROUTE = 0x0800  # strict source route (RFC 1701; discarded)
RECURSION_MASK = 0x0700  # RFC 1701 recursion control; its top bit is RFC 2784's bit 5, the rest are ignored
VERSION_MASK = 0x0007
OPTION_FLAGS = FLAG_C | FLAG_K | FLAG_S
# RFC 2784 §2.3: discard when any of bits 1-5 is set, K and S excepted (RFC 2890).
DISCARD_FLAGS = FLAG_R | FLAG_STRICT_ROUTE | 0x0400

PROTO_IPV4 = 0x0800
PROTO_IPV6 = 0x86DD
PROTO_TEB = 0x6558  # transparent Ethernet bridging

FLAGS_OFFSET = 0
PROTOCOL_OFFSET = 2
BASE_HEADER_LEN = 4
CHECKSUM_OFFSET = 4  # if C; followed by 2 reserved bytes
OPTION_LEN = 4  # each of checksum+reserved1, key, sequence number

KEY_MAX = SEQ_MASK = (1 << 32) - 1
SEQ_HALF = 1 << 31
REORDER_WINDOW = 1 << 16
RESYNC_AFTER = 16

# Inner IP headers.
IP_VERSION_OFFSET = 0  # high nibble
IPV4_TOTAL_LENGTH_OFFSET = 2
IPV6_PAYLOAD_LENGTH_OFFSET = 4

_FLAGS_PROTO = struct.Struct("!HH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


def _key(value: int | None) -> int | None:
    """The constructor's own check (callers that skip ``from_options``): the declaration's rule."""
    return None if value is None else OPTIONS["key"].parse(value)


OPTIONS = declare(
    Option("key", int, "RFC 2890 key: sent in every packet, required on every packet received",
           low=0, high=KEY_MAX, label="GRE key"),
    Option("seq", bool, "RFC 2890 sequence numbers: sent, and required in order on receipt (late/duplicate dropped)",
           default=False),
    Option("csum", bool, "RFC 2784 checksum over GRE header and payload: computed on send, required and verified "
           "on receipt", default=False),
)


class _GreBase(Encapsulator):
    spreads: ClassVar[bool] = False  # a sequence window is one process's (raw IP runs one worker anyway)
    transport: ClassVar[Transport] = Transport("ip", IPPROTO_GRE)
    header_room: ClassVar[int] = BASE_HEADER_LEN + 3 * OPTION_LEN
    options: ClassVar[Mapping[str, Option]] = OPTIONS

    def __init__(self, key: int | None = None, seq: bool = False, csum: bool = False, *, tx_seq: int = 0) -> None:
        self.key = _key(key)
        self.seq = seq
        self.csum = csum
        flags = (FLAG_C if csum else 0) | (FLAG_K if self.key is not None else 0) | (FLAG_S if seq else 0)
        self._flags = flags
        offset = BASE_HEADER_LEN + (OPTION_LEN if csum else 0)
        self._key_offset = offset if self.key is not None else -1
        offset += OPTION_LEN if self.key is not None else 0
        self._seq_offset = offset if seq else -1
        self._len = offset + (OPTION_LEN if seq else 0)
        self._key_bytes = _U32.pack(self.key) if self.key is not None else b""
        self._own = GreSession(self, tx_seq)  # the one-peer view of ``encap``/``decap``

    @property
    def header_len(self) -> int:
        return self._len

    @property
    def stateful(self) -> bool:
        return self.seq  # sequence numbers are each peer's; without them the codec keeps nothing per peer

    def session(self, peer_id: str) -> Session:
        return GreSession(self) if self.seq else super().session(peer_id)

    # The one-peer view's counters (what ``encap`` sends next, what ``decap`` last accepted).
    @property
    def tx_seq(self) -> int:
        return self._own.tx_seq

    @property
    def rx_seq(self) -> int | None:
        return self._own.rx_seq

    @rx_seq.setter
    def rx_seq(self, value: int | None) -> None:
        self._own.rx_seq = value

    def describe(self) -> str:
        parts = [f"key {self.key}"] if self.key is not None else []
        parts += ["seq"] * self.seq + ["csum"] * self.csum
        return ", ".join(parts)

    def _constant(self, header: bytes) -> bytes | None:
        return None if self.seq or self.csum else header  # a counter or a checksum differs per packet

    def _static_header(self, protocol: int) -> bytes:
        """Flags, protocol type, zero checksum and reserved1 (if C), key (if K); the sequence goes in per packet."""
        return _FLAGS_PROTO.pack(self._flags, protocol) + b"\0" * (OPTION_LEN * self.csum) + self._key_bytes

    # -- outbound --------------------------------------------------------------------------------------------

    def _finish(self, buf: bytearray, start: int, end: int, header: bytes, session: "GreSession") -> int:
        start -= self._len
        buf[start : start + len(header)] = header
        if self.seq:
            _U32.pack_into(buf, start + self._seq_offset, session.tx_seq)
            session.tx_seq = (session.tx_seq + 1) & SEQ_MASK
        if self.csum:
            _U16.pack_into(buf, start + CHECKSUM_OFFSET, internet_checksum(memoryview(buf)[start:end]))
        return start

    def encap(self, buf: bytearray, start: int, end: int) -> int | Drop:
        return self._encap(buf, start, end, self._own)

    def decap(self, packet: memoryview) -> int | Drop:
        inner = self._judge(packet)
        if inner.__class__ is Drop or not self.seq:
            return inner
        late = self._own.sequence(packet, self._seq_offset)
        return inner if late is None else late

    # -- inbound ---------------------------------------------------------------------------------------------

    def _check_header(self, packet: memoryview) -> int | Drop:
        """Steps 1-5 of the module docstring; returns the protocol type, or why the packet is dropped."""
        if len(packet) < BASE_HEADER_LEN:
            return Drop.TRUNCATED
        flags, protocol = _FLAGS_PROTO.unpack_from(packet, FLAGS_OFFSET)
        if flags & VERSION_MASK:
            return Drop.BAD_VERSION
        if flags & DISCARD_FLAGS:
            return Drop.BAD_FLAGS
        options = flags & OPTION_FLAGS
        if options != self._flags:
            return Drop.KEY_MISMATCH if (options ^ self._flags) & FLAG_K else Drop.BAD_FLAGS
        if len(packet) < self._len:
            return Drop.TRUNCATED
        if self.csum and internet_checksum(packet) != 0:
            # The sum over a packet that carries its own correct checksum is 0xFFFF, whose complement is 0.
            return Drop.BAD_CHECKSUM
        return protocol

    def _check_key(self, packet: memoryview) -> bool:
        return self._key_offset < 0 or packet[self._key_offset : self._key_offset + OPTION_LEN] == self._key_bytes

class Gre(_GreBase):
    name: ClassVar[str] = "gre"
    description: ClassVar[str] = "IPv4/IPv6 packets (TUN) in GRE over IP, RFC 2784/2890 (Linux 'type gre'/'ip6gre')"
    device: ClassVar[DeviceKind] = DeviceKind.TUN

    def __init__(self, key: int | None = None, seq: bool = False, csum: bool = False, *, tx_seq: int = 0) -> None:
        super().__init__(key, seq, csum, tx_seq=tx_seq)
        self._header4 = self._static_header(PROTO_IPV4)
        self._header6 = self._static_header(PROTO_IPV6)

    def _encap(self, buf: bytearray, start: int, end: int, session: "GreSession") -> int | Drop:
        if end <= start:
            return Drop.RUNT_FRAME
        version = buf[start + IP_VERSION_OFFSET] >> 4
        if version == 4:
            return self._finish(buf, start, end, self._header4, session)
        if version == 6:
            return self._finish(buf, start, end, self._header6, session)
        return Drop.BAD_PROTOCOL

    def constant_header(self, ip_version: int) -> bytes | None:
        return self._constant(self._header4 if ip_version == 4 else self._header6)

    def decap_batch(self, packets: memoryview, size: int) -> list[int | Drop]:
        count = -(-len(packets) // size) if size else 0
        inner = self._len
        carried = size - inner
        if (count > 1 and carried >= IPV4_HEADER_LEN and not self.seq and not self.csum
                and rows_agree(packets, size, 0, self._header4 + b"\x45", count - 1)
                and rows_agree(packets, size, inner + IPV4_TOTAL_LENGTH_OFFSET, _U16.pack(carried), count - 1)):
            # All but the last: the header, an IPv4 header without options, a length that fits the row.
            return [inner] * (count - 1) + [self.decap(packets[(count - 1) * size :])]
        return super().decap_batch(packets, size)

    def _judge(self, packet: memoryview) -> int | Drop:
        """Steps 1-6: the inner packet's offset, or why the datagram is dropped; the sequence is the session's."""
        protocol = self._check_header(packet)
        if protocol.__class__ is Drop:
            return protocol
        if protocol == PROTO_IPV4:
            version, header_len = 4, IPV4_HEADER_LEN
        elif protocol == PROTO_IPV6:
            version, header_len = 6, IPV6_HEADER_LEN
        else:
            return Drop.BAD_PROTOCOL
        if not self._check_key(packet):
            return Drop.KEY_MISMATCH
        inner = self._len
        carried = len(packet) - inner
        if carried < 1:
            return Drop.RUNT_FRAME
        if packet[inner + IP_VERSION_OFFSET] >> 4 != version:
            return Drop.BAD_PROTOCOL
        if carried < header_len:
            return Drop.RUNT_FRAME
        if version == 4:
            ihl = (packet[inner + IP_VERSION_OFFSET] & 0x0F) * 4
            (claimed,) = _U16.unpack_from(packet, inner + IPV4_TOTAL_LENGTH_OFFSET)
            if ihl < IPV4_HEADER_LEN or claimed < ihl or claimed != carried:
                return Drop.LENGTH_MISMATCH
        else:
            (payload,) = _U16.unpack_from(packet, inner + IPV6_PAYLOAD_LENGTH_OFFSET)
            if IPV6_HEADER_LEN + payload != carried:
                return Drop.LENGTH_MISMATCH
        return inner


class GreTap(_GreBase):
    name: ClassVar[str] = "gretap"
    description: ClassVar[str] = "Ethernet frames (TAP) in GRE over IP, protocol 0x6558 (Linux 'type gretap')"
    device: ClassVar[DeviceKind] = DeviceKind.TAP

    def __init__(self, key: int | None = None, seq: bool = False, csum: bool = False, *, tx_seq: int = 0) -> None:
        super().__init__(key, seq, csum, tx_seq=tx_seq)
        self._header = self._static_header(PROTO_TEB)

    def _encap(self, buf: bytearray, start: int, end: int, session: "GreSession") -> int:
        return self._finish(buf, start, end, self._header, session)

    def constant_header(self, ip_version: int) -> bytes | None:
        return self._constant(self._header)

    def decap_batch(self, packets: memoryview, size: int) -> list[int | Drop]:
        n = len(packets)
        count = -(-n // size) if size else 0
        shortest = self._len + ETHERNET_HEADER_LEN
        if (count > 1 and not self.seq and not self.csum and size >= shortest and n - (count - 1) * size >= shortest
                and rows_agree(packets, size, 0, self._header, count)):
            return [self._len] * count
        return super().decap_batch(packets, size)

    def _judge(self, packet: memoryview) -> int | Drop:
        protocol = self._check_header(packet)
        if protocol.__class__ is Drop:
            return protocol
        if protocol != PROTO_TEB:
            return Drop.BAD_PROTOCOL
        if not self._check_key(packet):
            return Drop.KEY_MISMATCH
        if len(packet) - self._len < ETHERNET_HEADER_LEN:
            return Drop.RUNT_FRAME
        return self._len


class GreSession(Session):
    """One peer's RFC 2890 state: the number its next packet carries, and the receive window (the last number
    accepted, and the run of late packets that may be a restarted count: the module docstring's policy)."""

    __slots__ = ("_codec", "tx_seq", "rx_seq", "_late_run", "_late_next")

    def __init__(self, codec: _GreBase, tx_seq: int = 0) -> None:
        self._codec = codec
        self.tx_seq = tx_seq & SEQ_MASK
        self.rx_seq: int | None = None  # None until the first packet
        self._late_run = 0  # consecutive late packets that are consecutive among themselves
        self._late_next = -1

    def seal(self, buf: bytearray, start: int, end: int, now: float):
        start = self._codec._encap(buf, start, end, self)
        return start if start.__class__ is Drop else (start, end)

    def open(self, packet: memoryview, now: float):
        codec = self._codec
        inner = codec._judge(packet)  # every check before the window, so that no invalid packet moves it
        if inner.__class__ is Drop:
            return inner
        late = self.sequence(packet, codec._seq_offset)
        return late if late is not None else (inner, len(packet) - inner)

    def sequence(self, packet: memoryview, offset: int) -> Drop | None:
        """Step 7: the RFC 2890 receive window; moved when the packet is accepted (None), else ``sequence``."""
        (number,) = _U32.unpack_from(packet, offset)
        last = self.rx_seq
        if last is not None and not 0 < (number - last) & SEQ_MASK < SEQ_HALF:
            behind = (last - number) & SEQ_MASK  # 0 for a duplicate
            if behind <= REORDER_WINDOW:
                self._late_run = self._late_run + 1 if number == self._late_next else 1
                self._late_next = (number + 1) & SEQ_MASK
                if self._late_run < RESYNC_AFTER:
                    return Drop.SEQUENCE
            # else: too far behind to be late; the peer's counter started again
        self.rx_seq = number
        self._late_run = 0
        return None

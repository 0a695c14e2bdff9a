"""Path MTU, as the kernel's VXLAN does it: ICMP errors written back into the overlay, and their rate limit.

When an inner packet will not fit the path towards its peer (``too_big`` in the engine), the tunnel is the
router on that path whose next hop is too small: like the kernel's tunnels (``iptunnel_pmtud_build_icmp``,
net/ipv4/ip_tunnel_core.c) we answer the inner sender, written back into the device, with

- ICMP "destination unreachable, fragmentation needed" (RFC 792, RFC 1191: type 3 code 4, the next-hop MTU
  in the second 16-bit half of the rest of the header) for IPv4 packets with DF set,
- ICMPv6 "packet too big" (RFC 4443 §3.2: type 2 code 0, a 32-bit MTU) for IPv6 packets,

carrying the largest inner IP packet the tunnel can take (path MTU − overhead). The error pretends to come
from the packet's destination (source and destination addresses swapped, as the kernel's tunnels do), and in
TAP modes it is an Ethernet frame with the MACs swapped, so that the sender's neighbour entry for its gateway
or peer takes it.

``reply()`` also builds "destination unreachable" (IPv4 type 3 code 0, ICMPv6 type 1 code 0) for L3 packets
no peer's routes hold (``no_route``).

No reply is built (None) where RFC 1122 §3.2.2 and RFC 4443 §2.4(e) forbid one, or where it cannot help: a
packet that is itself an ICMP error, a non-first IPv4 fragment, an IPv4 packet without DF (too big: the
tunnel does not fragment inner packets; the packet is dropped and counted), a source that is unspecified,
multicast, broadcast or loopback, a frame that is not plain Ethernet + IP (VLAN tags: not parsed), or one too
short to hold its IP header.

The quote is the start of the offending packet: up to 576 bytes of IPv4 datagram in all (RFC 1812 §4.3.2.3)
and up to the IPv6 minimum MTU (RFC 4443 §2.4(c)). For an offloaded super-frame the header still describes
the whole super-frame; the sender's stack matches the error by addresses and ports, which are right.

``RateLimit`` is the kernel's global ICMP budget (``icmp_msgs_per_sec`` 1000, ``icmp_msgs_burst`` 50): a
token bucket shared by all peers, so a flood of too-big packets costs at most that many replies a second.

Pure: bytes in, bytes out; the clock is the caller's. Checksums by tunneld/encap/checksum.py.
"""

from __future__ import annotations

import enum
import struct

from tunneld.encap.checksum import internet_checksum
from tunneld.offload.layout import (ETH_HLEN, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_OFFSET, IPV4_ADDRS_OFFSET,
                                    IPV4_DF, IPV4_FRAG_OFFSET, IPV4_HLEN, IPV4_PROTO_OFFSET, IPV6_ADDRS_OFFSET,
                                    IPV6_HLEN, IPV6_NEXT_OFFSET, pack_ipv4)

ICMP_HEADER_LEN = 8
IPV4_MIN_MTU = 68  # RFC 791: every IPv4 link carries this
IPV6_MIN_MTU = 1280  # RFC 8200
IPV4_QUOTE_TOTAL = 576  # RFC 1812 §4.3.2.3: the whole error datagram within 576 bytes
PROTO_ICMP = 1
PROTO_ICMPV6 = 58
IPV4_FRAG_OFFSET_MASK = 0x1FFF
IPV4_SRC_OFFSET, IPV4_DST_OFFSET = IPV4_ADDRS_OFFSET, IPV4_ADDRS_OFFSET + 4
IPV6_SRC_OFFSET, IPV6_DST_OFFSET = IPV6_ADDRS_OFFSET, IPV6_ADDRS_OFFSET + 16
TTL = 64
TOS_INTERNETCONTROL = 0xC0  # IPTOS_PREC_INTERNETCONTROL, as the kernel's ICMP
ICMPV4_ERROR_TYPES = frozenset((3, 4, 5, 11, 12))  # unreachable, source quench, redirect, time exceeded, parameter
ICMPV6_INFO_MIN = 128  # ICMPv6 types below this are errors

_IPV6 = struct.Struct("!IHBB16s16s")
_ICMP = struct.Struct("!BBHHH")  # type, code, checksum, then 32 bits: unused + next-hop MTU (IPv4)
_ICMPV6 = struct.Struct("!BBHI")  # type, code, checksum, MTU (packet too big) or unused


class Icmp(str, enum.Enum):
    """What was written back; the value is the ``type`` label of ``tunneld_icmp_sent_total``."""

    FRAG_NEEDED = "frag_needed"  # IPv4 type 3 code 4
    PACKET_TOO_BIG = "packet_too_big"  # ICMPv6 type 2
    UNREACHABLE = "unreachable"  # IPv4 type 3 code 0 / ICMPv6 type 1 code 0: no peer's routes hold it


def _bad_v4_source(src: bytes) -> bool:
    return src[0] == 0 or src[0] == 127 or src[0] >= 224  # unspecified/this network, loopback, multicast, class E


def _bad_v6_source(src: bytes) -> bool:
    return src == bytes(16) or src[0] == 0xFF or src == bytes(15) + b"\x01"  # unspecified, multicast, loopback


def _v4(packet: memoryview, too_big: bool, mtu: int) -> tuple[Icmp, bytes] | None:
    n = len(packet)
    if n < IPV4_HLEN or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if ihl < IPV4_HLEN or n < ihl:
        return None
    frag = int.from_bytes(packet[IPV4_FRAG_OFFSET : IPV4_FRAG_OFFSET + 2], "big")
    if frag & IPV4_FRAG_OFFSET_MASK or (too_big and not frag & IPV4_DF):
        return None
    src = bytes(packet[IPV4_SRC_OFFSET : IPV4_SRC_OFFSET + 4])
    dst = bytes(packet[IPV4_DST_OFFSET : IPV4_DST_OFFSET + 4])
    if _bad_v4_source(src) or src == b"\xff\xff\xff\xff":
        return None
    if packet[IPV4_PROTO_OFFSET] == PROTO_ICMP and (n <= ihl or packet[ihl] in ICMPV4_ERROR_TYPES):
        return None
    quote = bytes(packet[: min(n, IPV4_QUOTE_TOTAL - IPV4_HLEN - ICMP_HEADER_LEN)])
    if too_big:
        kind, code, rest = Icmp.FRAG_NEEDED, 4, min(max(mtu, IPV4_MIN_MTU), 0xFFFF)
    else:
        kind, code, rest = Icmp.UNREACHABLE, 0, 0
    icmp = bytearray(_ICMP.pack(3, code, 0, 0, rest) + quote)
    struct.pack_into("!H", icmp, 2, internet_checksum(icmp))
    total = IPV4_HLEN + len(icmp)
    header = bytearray(IPV4_HLEN)
    pack_ipv4(header, 0, total=total, ttl=TTL, proto=PROTO_ICMP, src=dst, dst=src, tos=TOS_INTERNETCONTROL)
    return kind, bytes(header + icmp)


def _v6(packet: memoryview, too_big: bool, mtu: int) -> tuple[Icmp, bytes] | None:
    n = len(packet)
    if n < IPV6_HLEN or packet[0] >> 4 != 6:
        return None
    src = bytes(packet[IPV6_SRC_OFFSET : IPV6_SRC_OFFSET + 16])
    dst = bytes(packet[IPV6_DST_OFFSET : IPV6_DST_OFFSET + 16])
    if _bad_v6_source(src):
        return None
    if packet[IPV6_NEXT_OFFSET] == PROTO_ICMPV6 and (
            n <= IPV6_HLEN or packet[IPV6_HLEN] < ICMPV6_INFO_MIN):
        return None
    quote = bytes(packet[: min(n, IPV6_MIN_MTU - IPV6_HLEN - ICMP_HEADER_LEN)])
    if too_big:  # below the IPv6 minimum no link is allowed to be: the sender must not go lower (RFC 8201 §4)
        kind, icmp = Icmp.PACKET_TOO_BIG, bytearray(_ICMPV6.pack(2, 0, 0, max(mtu, IPV6_MIN_MTU)) + quote)
    else:
        kind, icmp = Icmp.UNREACHABLE, bytearray(_ICMPV6.pack(1, 0, 0, 0) + quote)
    length = len(icmp)
    # The checksum covers the pseudo-header (RFC 8200 §8.1): source, destination, upper-layer length, next header.
    pseudo = dst + src + length.to_bytes(4, "big") + bytes(3) + bytes((PROTO_ICMPV6,))
    struct.pack_into("!H", icmp, 2, internet_checksum(pseudo + icmp))
    header = _IPV6.pack(0x60000000, length, PROTO_ICMPV6, TTL, dst, src)
    return kind, header + bytes(icmp)


def reply(frame: memoryview | bytes, *, l2: bool, too_big: bool, mtu: int = 0) -> tuple[Icmp, bytes] | None:
    """The ICMP error answering ``frame`` as the device handed it (an Ethernet frame if ``l2``, else an IP
    packet), as the device should take it back: "too big" with ``mtu`` (the largest inner IP packet the tunnel
    carries) if ``too_big``, else "destination unreachable". (kind, bytes), or None where no error may or need be
    sent (see the module's docstring)."""
    frame = memoryview(frame)
    if not l2:
        version = frame[0] >> 4 if len(frame) else 0
        if version == 4:
            return _v4(frame, too_big, mtu)
        return _v6(frame, too_big, mtu) if version == 6 else None
    if len(frame) < ETH_HLEN or frame[6] & 0x01:
        return None  # too short, or a multicast source MAC
    ethertype = int.from_bytes(frame[ETHERTYPE_OFFSET:ETH_HLEN], "big")
    packet = frame[ETH_HLEN:]
    if ethertype == ETHERTYPE_IPV4:
        built = _v4(packet, too_big, mtu)
    elif ethertype == ETHERTYPE_IPV6:
        built = _v6(packet, too_big, mtu)
    else:
        return None
    if built is None:
        return None
    kind, ip = built
    return kind, bytes(frame[6:12]) + bytes(frame[0:6]) + bytes(frame[ETHERTYPE_OFFSET:ETH_HLEN]) + ip


# The kernel's defaults: net.ipv4.icmp_msgs_per_sec and net.ipv4.icmp_msgs_burst (shared by IPv6 too).
ICMP_RATE = 1000.0
ICMP_BURST = 50


class RateLimit:
    """A token bucket: ``allow(now)`` takes a token if there is one. ``rate`` tokens a second up to ``burst``."""

    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate: float = ICMP_RATE, burst: int = ICMP_BURST) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = None  # first call: a full bucket

    def allow(self, now: float) -> bool:
        if self.last is not None:
            elapsed = now - self.last
            if elapsed > 0:  # a clock that steps back gives nothing (and takes nothing)
                self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def give_back(self) -> None:
        """Return the token ``allow`` just took, for an error that turned out not to be sent."""
        self.tokens = min(self.burst, self.tokens + 1.0)

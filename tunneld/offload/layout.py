"""Where the headers of a frame carrying IPv4/IPv6 and TCP/UDP are, parsed once per frame: an Ethernet frame
(TAP, ``parse``) or a bare IP packet (TUN, ``parse_ip``). Offsets are from the start of the frame."""

from __future__ import annotations

import struct
from typing import NamedTuple

from tunneld.encap.checksum import internet_checksum

ETHERTYPE_OFFSET = 12
ETH_HLEN = 14
VLAN_HLEN = 4
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_VLAN = 0x8100
ETHERTYPE_QINQ = 0x88A8

IPV4_HLEN = 20  # without options
IPV4_DF = 0x4000  # "don't fragment", in the flags and fragment offset word
IPV4_TOTLEN_OFFSET = 2
IPV4_ID_OFFSET = 4
IPV4_FRAG_OFFSET = 6
IPV4_PROTO_OFFSET = 9
IPV4_CSUM_OFFSET = 10
IPV4_ADDRS_OFFSET = 12  # source and destination, 8 bytes
IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")  # an option-less header: as ``pack_ipv4`` writes it
assert IPV4_HEADER.size == IPV4_HLEN
IPV6_HLEN = 40
IPV6_PLEN_OFFSET = 4
IPV6_NEXT_OFFSET = 6
IPV6_ADDRS_OFFSET = 8  # source and destination, 32 bytes
IPV6_HOP_BY_HOP = 0  # extension headers (next-header values), RFC 8200 §4
IPV6_ROUTING = 43
IPV6_FRAGMENT = 44
IPV6_DEST_OPTS = 60

PROTO_TCP = 6
PROTO_UDP = 17

TCP_SEQ_OFFSET = 4
TCP_ACK_OFFSET = 8
TCP_DOFF_OFFSET = 12
TCP_FLAGS_OFFSET = 13
TCP_CSUM_OFFSET = 16
UDP_LEN_OFFSET = 4
UDP_CSUM_OFFSET = 6
UDP_HLEN = 8

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_URG = 0x20
TCP_ECE = 0x40
TCP_CWR = 0x80


class Layout(NamedTuple):
    l3: int  # offset of the IP header
    v6: bool
    proto: int  # PROTO_TCP or PROTO_UDP
    l4: int  # offset of the TCP/UDP header
    hlen: int  # offset of the payload: all headers
    pseudo: int  # the pseudo-header's addresses + protocol, summed modulo 0xFFFF (big-endian words), no length


def parse(frame, proto_wanted: int | None = None) -> Layout | str:
    """The layout of an Ethernet/IP/TCP-or-UDP frame (a TAP frame), or a short reason why it is not one we
    handle.

    Handled: one or two VLAN tags (802.1Q, 802.1ad); IPv4 with or without options, not a fragment; IPv6 with
    hop-by-hop, destination options or a spent routing header before TCP or UDP, not a fragment."""
    if len(frame) < ETH_HLEN + 20:
        return "short"
    ethertype = frame[ETHERTYPE_OFFSET] << 8 | frame[ETHERTYPE_OFFSET + 1]
    l3 = ETH_HLEN
    at = ETHERTYPE_OFFSET
    for _ in range(2):  # a customer tag, or a service tag then a customer tag (QinQ)
        if ethertype not in (ETHERTYPE_VLAN, ETHERTYPE_QINQ):
            break
        at += VLAN_HLEN
        ethertype = frame[at] << 8 | frame[at + 1]
        l3 += VLAN_HLEN
    if ethertype == ETHERTYPE_IPV4:
        return _parse_ip(frame, l3, 4, proto_wanted)
    if ethertype == ETHERTYPE_IPV6:
        return _parse_ip(frame, l3, 6, proto_wanted)
    return "not_ip"


def parse_ip(frame, proto_wanted: int | None = None) -> Layout | str:
    """The layout of an IP/TCP-or-UDP packet with no link header (a TUN frame): as ``parse``, the IP version
    taken from the packet's first nibble."""
    if len(frame) < 20:
        return "short"
    return _parse_ip(frame, 0, frame[0] >> 4, proto_wanted)


def _parse_ip(frame, l3: int, version: int, proto_wanted: int | None) -> Layout | str:
    n = len(frame)
    if version == 4:
        if frame[l3] >> 4 != 4:
            return "bad_ip_version"
        ihl = (frame[l3] & 0x0F) * 4
        if ihl < 20 or n < l3 + ihl:
            return "bad_ihl"
        if (frame[l3 + IPV4_FRAG_OFFSET] & 0x3F) | frame[l3 + IPV4_FRAG_OFFSET + 1]:
            return "fragment"
        proto = frame[l3 + IPV4_PROTO_OFFSET]
        l4 = l3 + ihl
        v6 = False
        pseudo = int.from_bytes(frame[l3 + IPV4_ADDRS_OFFSET : l3 + IPV4_ADDRS_OFFSET + 8], "big") % 0xFFFF
    elif version == 6:
        if n < l3 + IPV6_HLEN or frame[l3] >> 4 != 6:
            return "bad_ip_version"
        proto = frame[l3 + IPV6_NEXT_OFFSET]
        l4 = l3 + IPV6_HLEN
        v6 = True
        # Extension headers a TCP or UDP sender may carry: each is next header, length in 8-byte units past the
        # first 8, and each step moves l4 on by at least 8 bytes, so the walk ends within the frame.
        while proto in (IPV6_HOP_BY_HOP, IPV6_DEST_OPTS, IPV6_ROUTING):
            if n < l4 + 8:
                return "short"
            if proto == IPV6_ROUTING and frame[l4 + 3]:
                return "routing"  # segments left: the pseudo-header's destination is another address
            proto, l4 = frame[l4], l4 + (frame[l4 + 1] + 1) * 8
        if proto == IPV6_FRAGMENT:
            return "fragment"
        pseudo = int.from_bytes(frame[l3 + IPV6_ADDRS_OFFSET : l3 + IPV6_HLEN], "big") % 0xFFFF
    else:
        return "not_ip"
    if proto_wanted is not None and proto != proto_wanted:
        return "other_protocol"
    if proto == PROTO_TCP:
        if n < l4 + 20:
            return "short"
        hlen = l4 + (frame[l4 + TCP_DOFF_OFFSET] >> 4) * 4
        if hlen < l4 + 20 or hlen > n:
            return "bad_tcp_header"
    elif proto == PROTO_UDP:
        hlen = l4 + UDP_HLEN
        if hlen > n:
            return "short"
    else:
        return "other_protocol"
    return Layout(l3, v6, proto, l4, hlen, (pseudo + proto) % 0xFFFF)


def pack_ipv4(buf, at: int, *, total: int, ttl: int, proto: int, src: bytes, dst: bytes, tos: int = 0,
              ident: int = 0, frag: int = 0) -> None:
    """Write an option-less IPv4 header into ``buf[at : at + 20]``, its checksum filled in."""
    IPV4_HEADER.pack_into(buf, at, 0x45, tos, total, ident, frag, ttl, proto, 0, src, dst)
    buf[at + IPV4_CSUM_OFFSET : at + IPV4_CSUM_OFFSET + 2] = internet_checksum(
        memoryview(buf)[at : at + IPV4_HLEN]).to_bytes(2, "big")

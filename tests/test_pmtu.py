"""The ICMP errors tunneld writes back into the overlay (tunneld/datapath/pmtu.py), read by scapy's dissector: type,
code, MTU, checksums, addresses swapped, the quote; and the packets that must get no error at all."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoRequest, ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Ether

from tunneld.encap.checksum import internet_checksum
from tunneld.datapath.pmtu import IPV6_MIN_MTU, Icmp, RateLimit, reply

SENDER_MAC, GATEWAY_MAC = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


def v4(size: int = 1400, **ip) -> IP:
    ip.setdefault("flags", "DF")
    return IP(src="192.168.100.1", dst="192.168.100.2", **ip) / TCP(sport=40000, dport=5201) / (b"x" * size)


def v6(size: int = 1400) -> IPv6:
    return IPv6(src="fd00::1", dst="fd00::2") / TCP(sport=40000, dport=5201) / (b"x" * size)


def check_v4_checksums(ip: IP) -> None:
    raw = bytes(ip)
    again = IP(raw)
    del again.chksum
    del again[ICMP].chksum
    rebuilt = IP(bytes(again))
    assert rebuilt.chksum == ip.chksum and rebuilt[ICMP].chksum == ip[ICMP].chksum


def device_frame(inner, l2: bool) -> bytes:
    """What the device hands over: the packet, or (TAP) the frame its sender addressed to its gateway."""
    return bytes(Ether(src=SENDER_MAC, dst=GATEWAY_MAC) / inner) if l2 else bytes(inner)


@pytest.mark.parametrize("l2", [False, True])
def test_frag_needed_for_ipv4_with_df(l2):
    inner = v4()
    kind, out = reply(device_frame(inner, l2), l2=l2, too_big=True, mtu=1350)
    assert kind is Icmp.FRAG_NEEDED
    if l2:
        eth = Ether(out)
        assert (eth.src, eth.dst, eth.type) == (GATEWAY_MAC, SENDER_MAC, 0x0800)
        ip = eth[IP]
    else:
        ip = IP(out)
    assert (ip.src, ip.dst, ip.proto, ip.len) == ("192.168.100.2", "192.168.100.1", 1, len(bytes(ip)))
    assert (ip[ICMP].type, ip[ICMP].code, ip[ICMP].nexthopmtu) == (3, 4, 1350)
    check_v4_checksums(ip)
    assert len(bytes(ip)) <= 576
    quoted = ip[IPerror]
    assert (quoted.src, quoted.dst, quoted.len) == ("192.168.100.1", "192.168.100.2", len(inner))
    assert bytes(ip)[28:] == bytes(inner)[: 576 - 28]


@pytest.mark.parametrize("l2", [False, True])
def test_packet_too_big_for_ipv6(l2):
    inner = v6()
    kind, out = reply(device_frame(inner, l2), l2=l2, too_big=True, mtu=1330)
    assert kind is Icmp.PACKET_TOO_BIG
    ip = Ether(out)[IPv6] if l2 else IPv6(out)
    assert (ip.src, ip.dst, ip.nh, ip.plen) == ("fd00::2", "fd00::1", 58, len(bytes(ip)) - 40)
    ptb = ip[ICMPv6PacketTooBig]
    assert (ptb.type, ptb.code, ptb.mtu) == (2, 0, 1330)
    got = ptb.cksum
    del ptb.cksum
    assert IPv6(bytes(ip))[ICMPv6PacketTooBig].cksum == got  # scapy recomputes with the pseudo-header
    assert len(bytes(ip)) <= IPV6_MIN_MTU
    assert bytes(out)[-(IPV6_MIN_MTU - 48):] == bytes(inner)[: IPV6_MIN_MTU - 48]


def test_mtus_are_clamped_to_each_version_minimum():
    assert IP(reply(bytes(v4()), l2=False, too_big=True, mtu=40)[1])[ICMP].nexthopmtu == 68
    assert IPv6(reply(bytes(v6()), l2=False, too_big=True, mtu=1000)[1])[ICMPv6PacketTooBig].mtu == IPV6_MIN_MTU


def test_short_packets_are_quoted_whole():
    inner = IP(src="10.0.0.1", dst="10.0.0.2", flags="DF") / UDP(sport=1, dport=2) / b"hi"
    ip = IP(reply(bytes(inner), l2=False, too_big=True, mtu=1000)[1])
    assert bytes(ip)[28:] == bytes(inner)


def test_unreachable_for_no_route():
    kind, out = reply(bytes(v4(flags=0)), l2=False, too_big=False)
    ip = IP(out)
    assert kind is Icmp.UNREACHABLE and (ip[ICMP].type, ip[ICMP].code) == (3, 0)
    check_v4_checksums(ip)
    kind, out = reply(bytes(v6()), l2=False, too_big=False)
    un = IPv6(out)[ICMPv6DestUnreach]
    assert kind is Icmp.UNREACHABLE and (un.type, un.code) == (1, 0)


@pytest.mark.parametrize("packet", [
    IP(src="192.168.100.1", dst="192.168.100.2") / TCP() / (b"x" * 1400),  # no DF: not ours to answer
    IP(src="192.168.100.1", dst="192.168.100.2", flags="DF", frag=100) / (b"x" * 1400),  # a non-first fragment
    IP(src="0.0.0.0", dst="192.168.100.2", flags="DF") / (b"x" * 1400),
    IP(src="224.0.0.5", dst="192.168.100.2", flags="DF") / (b"x" * 1400),
    IP(src="127.0.0.1", dst="192.168.100.2", flags="DF") / (b"x" * 1400),
    IP(src="255.255.255.255", dst="192.168.100.2", flags="DF") / (b"x" * 1400),
    IP(src="192.168.100.1", dst="192.168.100.2", flags="DF") / ICMP(type=3, code=4) / (b"x" * 1400),  # an error
    IPv6(src="::", dst="fd00::2") / (b"x" * 1400),
    IPv6(src="ff02::1", dst="fd00::2") / (b"x" * 1400),
    IPv6(src="fd00::1", dst="fd00::2") / ICMPv6PacketTooBig() / (b"x" * 1400),
], ids=["no-df", "fragment", "unspecified", "multicast", "loopback", "broadcast", "icmp-error", "v6-unspecified",
        "v6-multicast", "v6-icmp-error"])
def test_no_error_where_none_may_be_sent(packet):
    assert reply(bytes(packet), l2=False, too_big=True, mtu=1350) is None


def test_icmp_queries_are_answered():
    echo = IP(src="192.168.100.1", dst="192.168.100.2", flags="DF") / ICMP(type=8) / (b"x" * 1400)
    assert reply(bytes(echo), l2=False, too_big=True, mtu=1350)[0] is Icmp.FRAG_NEEDED
    echo6 = IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest() / (b"x" * 1400)
    assert reply(bytes(echo6), l2=False, too_big=True, mtu=1350)[0] is Icmp.PACKET_TOO_BIG


@pytest.mark.parametrize("frame", [
    b"", b"\x45", bytes(20), b"\x45" + bytes(10),  # empty, short, version 0, a truncated header
    b"\x46" + bytes(20),  # IHL 6 but 21 bytes
    b"\x60" + bytes(20),  # a truncated IPv6 header
])
def test_malformed_packets_get_no_error(frame):
    assert reply(frame, l2=False, too_big=True, mtu=1350) is None


def test_frames_we_do_not_parse_get_no_error():
    eth = Ether(src=SENDER_MAC, dst=GATEWAY_MAC)
    assert reply(bytes(eth / (b"\x00" * 100)), l2=True, too_big=True, mtu=1350) is None  # not IP
    vlan = bytes(eth)[:12] + b"\x81\x00\x00\x05" + bytes(v4())
    assert reply(vlan, l2=True, too_big=True, mtu=1350) is None
    multicast_source = bytes(Ether(src="01:00:5e:00:00:01", dst=GATEWAY_MAC) / v4())
    assert reply(multicast_source, l2=True, too_big=True, mtu=1350) is None
    assert reply(bytes(eth)[:10], l2=True, too_big=True, mtu=1350) is None


def test_rate_limit_is_a_token_bucket():
    limit = RateLimit(rate=10, burst=3)
    assert [limit.allow(0.0) for _ in range(5)] == [True, True, True, False, False]
    assert limit.allow(0.05) is False  # half a token
    assert limit.allow(0.1) is True  # one token after 100 ms at 10/s
    assert limit.allow(100.0) and limit.allow(100.0) and limit.allow(100.0) and not limit.allow(100.0)  # burst cap
    assert not limit.allow(50.0)  # a clock stepping back gives nothing
    limit.give_back()
    assert limit.allow(50.0) and not limit.allow(50.0)  # the token given back, and only that one


SEEDS = [bytes(p) for p in (v4(), v6(), v4(size=10), v6(size=10))]


def damaged(seed: bytes, l2: bool, writes: list[tuple[int, int]], cut: int) -> bytes:
    """A real packet (behind an Ethernet header for TAP) with a few bytes overwritten and its tail cut."""
    frame = bytearray(device_frame(IP(seed) if seed[0] >> 4 == 4 else IPv6(seed), l2))
    for at, value in writes:
        if at < len(frame):
            frame[at] = value
    return bytes(frame[:cut])


@settings(max_examples=400, derandomize=True, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.tuples(st.sampled_from(SEEDS), st.just(None))),
       st.lists(st.tuples(st.integers(0, 60), st.integers(0, 255)), max_size=3), st.integers(0, 1600),
       st.booleans(), st.booleans(), st.integers(0, 0xFFFF))
def test_reply_never_raises_and_what_it_builds_is_well_formed(source, writes, cut, l2, too_big, mtu):
    frame = source if isinstance(source, bytes) else damaged(source[0], l2, writes, cut)
    built = reply(frame, l2=l2, too_big=too_big, mtu=mtu)
    if built is None:
        return
    kind, out = built
    ip = out[14:] if l2 else out
    if ip[0] >> 4 == 4:
        assert kind in (Icmp.FRAG_NEEDED, Icmp.UNREACHABLE) and len(ip) <= 576
        assert internet_checksum(ip[:20]) == 0 and internet_checksum(ip[20:]) == 0
        assert int.from_bytes(ip[2:4], "big") == len(ip)
    else:
        assert ip[0] >> 4 == 6 and kind in (Icmp.PACKET_TOO_BIG, Icmp.UNREACHABLE) and len(ip) <= IPV6_MIN_MTU
        pseudo = ip[8:40] + (len(ip) - 40).to_bytes(4, "big") + bytes(3) + b"\x3a"
        assert internet_checksum(pseudo + ip[40:]) == 0

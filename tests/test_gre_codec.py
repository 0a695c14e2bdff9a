"""GRE codecs against golden vectors built by scapy, an implementation nobody here wrote.

Every combination of the C, K and S options, both inner families (gre) and Ethernet (gretap), both directions;
then malformed inputs, each dropped with its reason, and the RFC 2890 sequence window.
"""

from __future__ import annotations

import itertools

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, ICMPv6EchoRequest
from scapy.layers.l2 import GRE, Ether

from tunneld.encap.base import Drop
from tunneld.encap.checksum import internet_checksum
from tunneld.encap.gre import KEY_MAX, REORDER_WINDOW, RESYNC_AFTER, Gre, GreTap
from tunneld.datapath.engine import HEADROOM

INNER_IP = {
    "ipv4-icmp": IP(src="192.168.1.1", dst="192.168.1.2") / ICMP(id=7, seq=1) / (b"ping" * 10),
    "ipv4-tcp-odd": IP(src="192.168.1.1", dst="192.168.1.2") / TCP(sport=40000, dport=80, flags="PA") / (b"x" * 1001),
    "ipv6-icmp": IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest(id=7, seq=1, data=b"ping" * 10),
    "ipv6-udp-odd": IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=5000, dport=53) / (b"q" * 333),
}
INNER_ETHER = {
    "ether-ipv4": Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / INNER_IP["ipv4-icmp"],
    "ether-ipv6": Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / INNER_IP["ipv6-udp-odd"],
    "ether-min": Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff", type=0x88B5),
}
PROTO = {4: 0x0800, 6: 0x86DD}

# (csum, key, seq): all eight combinations of the option bits, with keys at the edges of their range.
OPTION_SETS = [
    (csum, key, seq)
    for csum, key, seq in itertools.product((False, True), (None, 0, 0xDEADBEEF, KEY_MAX), (False, True))
    if key != 0 or (csum and seq)  # key 0 once is enough: it must still set K
]


def scapy_gre(inner, protocol: int, *, csum: bool, key: int | None, seq: int | None) -> bytes:
    """What scapy puts on the wire after the outer IP header; scapy computes the checksum itself."""
    header = GRE(
        proto=protocol,
        chksum_present=int(csum),
        key_present=int(key is not None),
        key=key,
        seqnum_present=int(seq is not None),
        sequence_number=seq,
    )
    return bytes(header / inner)


def encap(codec, inner: bytes) -> bytes | Drop:
    buf = bytearray(HEADROOM + len(inner))
    buf[HEADROOM:] = inner
    start = codec.encap(buf, HEADROOM, len(buf))
    if isinstance(start, Drop):
        return start
    assert HEADROOM - start == codec.header_len <= codec.header_room
    return bytes(buf[start:])


def gre_cases():
    for (csum, key, seq), name in itertools.product(OPTION_SETS, INNER_IP):
        yield pytest.param(Gre, name, csum, key, seq, id=f"gre-{name}-c{int(csum)}-k{key}-s{int(seq)}")
    for (csum, key, seq), name in itertools.product(OPTION_SETS, INNER_ETHER):
        yield pytest.param(GreTap, name, csum, key, seq, id=f"gretap-{name}-c{int(csum)}-k{key}-s{int(seq)}")


def inner_and_protocol(cls, name):
    if cls is Gre:
        inner = INNER_IP[name]
        return inner, PROTO[inner.version]
    return INNER_ETHER[name], 0x6558


@pytest.mark.parametrize("cls,name,csum,key,seq", list(gre_cases()))
def test_encap_matches_scapy(cls, name, csum, key, seq):
    inner, protocol = inner_and_protocol(cls, name)
    codec = cls(key=key, seq=seq, csum=csum)
    for number in range(3):  # sequence numbers 0, 1, 2: the first datagram carries 0 (RFC 2890 §2.2)
        wire = encap(codec, bytes(inner))
        assert wire == scapy_gre(inner, protocol, csum=csum, key=key, seq=number if seq else None)


@pytest.mark.parametrize("cls,name,csum,key,seq", list(gre_cases()))
def test_decap_of_scapy_packet(cls, name, csum, key, seq):
    inner, protocol = inner_and_protocol(cls, name)
    codec = cls(key=key, seq=seq, csum=csum)
    for number in (5, 6, 100):  # the first is accepted whatever it is; later ones must move forward
        wire = scapy_gre(inner, protocol, csum=csum, key=key, seq=number if seq else None)
        offset = codec.decap(memoryview(wire))
        assert not isinstance(offset, Drop), offset
        assert wire[offset:] == bytes(inner)
        assert bytes(GRE(wire).payload) == wire[offset:]  # scapy agrees where the inner packet starts


def test_sequence_wraps_from_the_top_of_the_range():
    codec = Gre(seq=True, tx_seq=KEY_MAX - 1)
    inner = INNER_IP["ipv4-icmp"]
    numbers = [GRE(encap(codec, bytes(inner))).sequence_number for _ in range(4)]
    assert numbers == [KEY_MAX - 1, KEY_MAX, 0, 1]


def test_checksum_matches_scapy_for_odd_and_even_lengths():
    for size in range(0, 40):
        data = bytes(range(7, 7 + size))
        from scapy.utils import checksum

        assert internet_checksum(data) == checksum(data), size


def test_unknown_inner_version_is_not_sent():
    codec = Gre()
    for first in (0x00, 0x50, 0xF0):
        assert encap(codec, bytes([first]) + bytes(39)) is Drop.BAD_PROTOCOL
    assert codec.encap(bytearray(HEADROOM), HEADROOM, HEADROOM) is Drop.RUNT_FRAME


@pytest.mark.parametrize("cls,overhead", [(Gre, 0), (GreTap, 14)])
def test_overhead_is_outer_ip_plus_gre_header(cls, overhead):
    for csum, key, seq in OPTION_SETS:
        codec = cls(key=key, seq=seq, csum=csum)
        gre_len = len(scapy_gre(b"", 0x0800, csum=csum, key=key, seq=0 if seq else None))
        assert codec.header_len == gre_len
        assert codec.overhead(underlay_ipv6=False) == 20 + gre_len + overhead
        assert codec.overhead(underlay_ipv6=True) == 40 + gre_len + overhead


def test_from_options_parses_strings_and_flags():
    codec = Gre.from_options({"key": "0x10", "seq": "yes", "csum": True, "vni": 1, "port": None})
    assert (codec.key, codec.seq, codec.csum) == (16, True, True)
    for bad in ({"key": "-1"}, {"key": str(KEY_MAX + 1)}, {"key": "abc"}, {"seq": "maybe"}):
        with pytest.raises(ValueError):
            Gre.from_options(bad)


# -- malformed ---------------------------------------------------------------------------------------------

V4 = INNER_IP["ipv4-icmp"]
V6 = INNER_IP["ipv6-icmp"]


def _raw(flags: int, proto: int, rest: bytes) -> bytes:
    return flags.to_bytes(2, "big") + proto.to_bytes(2, "big") + rest


def _set(wire: bytes, offset: int, value: int) -> bytes:
    b = bytearray(wire)
    b[offset] = value
    return bytes(b)


PLAIN = scapy_gre(V4, 0x0800, csum=False, key=None, seq=None)
FULL = scapy_gre(V4, 0x0800, csum=True, key=42, seq=9)  # what Gre(key=42, seq=True, csum=True) accepts
V4_BYTES = bytes(V4)

MALFORMED = [
    # (name, codec options, wire, reason)
    ("empty", {}, b"", Drop.TRUNCATED),
    ("3 bytes", {}, PLAIN[:3], Drop.TRUNCATED),
    ("version 1 (PPTP enhanced GRE)", {}, _set(PLAIN, 1, 0x01), Drop.BAD_VERSION),
    ("version 7", {}, _set(PLAIN, 1, 0x07), Drop.BAD_VERSION),
    ("routing present", {}, bytes(GRE(routing_present=1, proto=0x0800) / V4), Drop.BAD_FLAGS),
    ("strict source route", {}, bytes(GRE(strict_route_source=1, proto=0x0800) / V4), Drop.BAD_FLAGS),
    ("recursion 4 (bit 5)", {}, bytes(GRE(recursion_control=4, proto=0x0800) / V4), Drop.BAD_FLAGS),
    ("unexpected checksum", {}, scapy_gre(V4, 0x0800, csum=True, key=None, seq=None), Drop.BAD_FLAGS),
    ("unexpected sequence", {}, scapy_gre(V4, 0x0800, csum=False, key=None, seq=1), Drop.BAD_FLAGS),
    ("unexpected key", {}, scapy_gre(V4, 0x0800, csum=False, key=1, seq=None), Drop.KEY_MISMATCH),
    ("missing key", {"key": 42}, PLAIN, Drop.KEY_MISMATCH),
    ("other key", {"key": 42}, scapy_gre(V4, 0x0800, csum=False, key=43, seq=None), Drop.KEY_MISMATCH),
    ("missing checksum", {"csum": True}, PLAIN, Drop.BAD_FLAGS),
    ("missing sequence", {"seq": True}, PLAIN, Drop.BAD_FLAGS),
    ("options but no room for them", {"key": 42, "seq": True, "csum": True}, FULL[:15], Drop.TRUNCATED),
    ("bad checksum", {"key": 42, "seq": True, "csum": True}, _set(FULL, 4, FULL[4] ^ 0x01), Drop.BAD_CHECKSUM),
    ("payload bit flipped under checksum", {"key": 42, "seq": True, "csum": True},
     _set(FULL, len(FULL) - 1, FULL[-1] ^ 0x80), Drop.BAD_CHECKSUM),
    ("protocol ARP", {}, _raw(0, 0x0806, V4_BYTES), Drop.BAD_PROTOCOL),
    ("protocol TEB to gre", {}, _raw(0, 0x6558, V4_BYTES), Drop.BAD_PROTOCOL),
    ("IPv6 packet labelled IPv4", {}, _raw(0, 0x0800, bytes(V6)), Drop.BAD_PROTOCOL),
    ("IPv4 packet labelled IPv6", {}, _raw(0, 0x86DD, V4_BYTES), Drop.BAD_PROTOCOL),
    ("header only", {}, _raw(0, 0x0800, b""), Drop.RUNT_FRAME),
    ("19-byte IPv4", {}, _raw(0, 0x0800, V4_BYTES[:19]), Drop.RUNT_FRAME),
    ("39-byte IPv6", {}, _raw(0, 0x86DD, bytes(V6)[:39]), Drop.RUNT_FRAME),
    ("IPv4 cut short", {}, _raw(0, 0x0800, V4_BYTES[:-1]), Drop.LENGTH_MISMATCH),
    ("IPv4 with trailing bytes", {}, _raw(0, 0x0800, V4_BYTES + b"\0"), Drop.LENGTH_MISMATCH),
    ("IPv4 IHL 4", {}, _raw(0, 0x0800, bytes([0x44]) + V4_BYTES[1:]), Drop.LENGTH_MISMATCH),
    ("IPv4 IHL beyond total length", {}, _raw(0, 0x0800, bytes([0x4F]) + bytes(IP() / ICMP())[1:]),
     Drop.LENGTH_MISMATCH),
    ("IPv6 cut short", {}, _raw(0, 0x86DD, bytes(V6)[:-1]), Drop.LENGTH_MISMATCH),
    ("IPv6 with trailing bytes", {}, _raw(0, 0x86DD, bytes(V6) + b"\0\0"), Drop.LENGTH_MISMATCH),
]


@pytest.mark.parametrize("name,options,wire,reason", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_is_dropped_with_reason(name, options, wire, reason):
    assert Gre(**options).decap(memoryview(wire)) is reason


def test_reserved_bits_6_to_12_are_ignored():
    # RFC 2784 §2.3: bits 6-12 are sent as zero and ignored on receipt; the low recursion bits fall there.
    for flags in (0x0008, 0x0080, 0x0100, 0x0200, 0x03F8):
        wire = _raw(flags, 0x0800, V4_BYTES)
        assert Gre().decap(memoryview(wire)) == 4, hex(flags)


GRETAP_MALFORMED = [
    ("protocol IPv4 to gretap", {}, scapy_gre(V4, 0x0800, csum=False, key=None, seq=None), Drop.BAD_PROTOCOL),
    ("13-byte frame", {}, _raw(0, 0x6558, bytes(13)), Drop.RUNT_FRAME),
    ("other key", {"key": 1}, scapy_gre(INNER_ETHER["ether-min"], 0x6558, csum=False, key=2, seq=None),
     Drop.KEY_MISMATCH),
    ("bad checksum", {"csum": True},
     _set(scapy_gre(INNER_ETHER["ether-min"], 0x6558, csum=True, key=None, seq=None), 20, 0xAA), Drop.BAD_CHECKSUM),
]


@pytest.mark.parametrize("name,options,wire,reason", GRETAP_MALFORMED, ids=[m[0] for m in GRETAP_MALFORMED])
def test_gretap_malformed_is_dropped_with_reason(name, options, wire, reason):
    assert GreTap(**options).decap(memoryview(wire)) is reason


@pytest.mark.parametrize("options", [dict(), dict(key=5, seq=True, csum=True)])
def test_every_truncation_is_classified_never_raises(options):
    for cls, inner in ((Gre, V4), (GreTap, INNER_ETHER["ether-ipv4"])):
        wire = encap(cls(**options), bytes(inner))
        header_len = cls(**options).header_len
        for n in range(len(wire)):
            verdict = cls(**options).decap(memoryview(wire[:n]))
            if cls is Gre or n < header_len + 14:
                assert isinstance(verdict, Drop), (cls.name, n)
            else:
                # An Ethernet frame has no length of its own to betray a cut, and a checksum cannot always tell
                # either: cutting off whole IP/ICMP packets that carry valid checksums removes a sum of 0xFFFF.
                assert verdict == header_len or isinstance(verdict, Drop), (cls.name, n)
        assert cls(**options).decap(memoryview(wire)) == cls(**options).header_len


# -- RFC 2890 sequence window ------------------------------------------------------------------------------


def seq_verdicts(numbers, first_last=None):
    codec = Gre(seq=True)
    codec.rx_seq = first_last
    out = []
    for n in numbers:
        verdict = codec.decap(memoryview(scapy_gre(V4, 0x0800, csum=False, key=None, seq=n)))
        out.append("ok" if verdict == 8 else verdict.value)
    return out


def test_in_order_with_gaps_is_accepted_late_and_duplicates_dropped():
    assert seq_verdicts([0, 1, 3, 2, 3, 4, 10, 9]) == ["ok", "ok", "ok", "sequence", "sequence", "ok", "ok",
                                                       "sequence"]


def test_first_packet_is_accepted_whatever_its_number():
    assert seq_verdicts([3_000_000_000, 3_000_000_001]) == ["ok", "ok"]


def test_wrap_around_is_in_order_by_serial_arithmetic():
    assert seq_verdicts([KEY_MAX - 1, KEY_MAX, 0, 1, KEY_MAX]) == ["ok", "ok", "ok", "ok", "sequence"]


def test_half_the_space_ahead_is_the_limit():
    # 2**31 - 1 ahead is in order; exactly 2**31 ahead is "behind" by 2**31, too far to be late: a restart.
    assert seq_verdicts([0, (1 << 31) - 1]) == ["ok", "ok"]
    assert seq_verdicts([10, 10 + (1 << 31)]) == ["ok", "ok"]


def test_restarted_peer_far_behind_is_followed():
    assert seq_verdicts([0, 1, 2], first_last=REORDER_WINDOW + 5) == ["ok", "ok", "ok"]


def test_restarted_peer_near_behind_is_followed_after_a_run():
    verdicts = seq_verdicts(range(RESYNC_AFTER + 2), first_last=1000)
    assert verdicts == ["sequence"] * (RESYNC_AFTER - 1) + ["ok"] * 3


def test_invalid_packets_do_not_move_the_window():
    codec = Gre(seq=True, csum=True)
    good = scapy_gre(V4, 0x0800, csum=True, key=None, seq=5)
    damaged = _set(scapy_gre(V4, 0x0800, csum=True, key=None, seq=1000), 30, 0)
    assert codec.decap(memoryview(damaged)) is Drop.BAD_CHECKSUM
    assert codec.decap(memoryview(good)) == 12
    assert codec.rx_seq == 5


def test_a_new_peer_is_judged_by_its_own_numbers():
    codec = Gre(seq=True)
    wire = lambda n: memoryview(scapy_gre(V4, 0x0800, csum=False, key=None, seq=n))  # noqa: E731
    old, new = codec.session("192.0.2.2"), codec.session("192.0.2.3")
    assert [old.open(wire(n), 0.0) for n in (5000, 5001, 5002)] == [(8, len(V4))] * 3
    assert old.open(wire(0), 0.0) is Drop.SEQUENCE  # same peer: 0 is long past
    assert [new.open(wire(n), 0.0) for n in (0, 1, 2)] == [(8, len(V4))] * 3  # another peer counts from its own 0
    assert old.open(wire(1), 0.0) is Drop.SEQUENCE and old.rx_seq == 5002  # and the first is not disturbed


def test_each_peer_sends_its_own_sequence():
    codec = Gre(seq=True, key=7)
    a, b = codec.session("192.0.2.2"), codec.session("192.0.2.3")
    inner = bytes(V4)
    buf = bytearray(64 + len(inner))

    def seal(session) -> int:
        buf[64:] = inner
        start, end = session.seal(buf, 64, len(buf), 0.0)
        assert (start, end) == (64 - 12, len(buf))
        return int.from_bytes(buf[start + 8 : start + 12], "big")

    assert [seal(a), seal(a), seal(b), seal(a), seal(b)] == [0, 1, 0, 2, 1]
    assert codec.session("192.0.2.4") is not codec.session("192.0.2.4")  # a session per peer, never shared

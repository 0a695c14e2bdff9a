"""Segmentation and coalescing against golden vectors built by scapy (never by the code under test)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrRouting
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from tests.frames import MACS, VNI, ether, expected_tcp, ip, payload, tcp_super
from tunneld.encap.vxlan import build_header
from tunneld.offload.coalesce import Coalescer, SuperFrame
from tunneld.offload.segment import Segmenter
from tunneld.offload.vnet import (
    F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, HDR, NO_OFFLOAD, VNET_HDR_LEN, finish_checksum,
)

PREFIX = build_header(VNI)


def split(frame: bytes, gso_type: int, gso: int):
    seg = Segmenter(PREFIX)
    r = seg.split(memoryview(bytearray(frame)), gso_type, gso)
    assert not isinstance(r, str), r
    buf = bytes(r.buffer)
    rows = [buf[i : i + r.rowlen] for i in range(0, len(buf), r.rowlen)]
    assert len(rows) == r.count
    assert r.inner_bytes == sum(len(x) - len(PREFIX) for x in rows)
    return rows


@pytest.mark.parametrize(
    "size, gso, kw",
    [
        (1398 * 46 + 100, 1398, {}),  # last segment short
        (1398 * 10, 1398, {}),  # all equal
        (5001, 999, {}),  # odd segment size, odd total
        (4000, 1000, {"v6": True}),
        (3333, 1111, {"v6": True, "flags": "FPA"}),  # FIN and PSH only on the last
        (3000, 700, {"flags": "CA"}),  # CWR only on the first
        (2000, 600, {"options": []}),  # no TCP options
        (2500, 800, {"vlan": True}),
        (2500, 800, {"vlan": "qinq"}),
        (4000, 1000, {"v6": True, "ext": True}),  # hop-by-hop and destination options before TCP
        (64000, 1448, {"seq": 0xFFFFF000}),  # sequence numbers wrap
        (3000, 1000, {"ip_id": 0xFFFF}),  # IP ID wraps
        (88 * 300 + 7, 88, {}),  # Linux's smallest MSS: 301 segments from one super-frame
    ],
)
def test_tcp_segmentation_matches_scapy(size, gso, kw):
    data = payload(size, seed=size)
    frame = tcp_super(data, **kw)
    gso_type = GSO_TCPV6 if kw.get("v6") else GSO_TCPV4
    assert split(frame, gso_type, gso) == expected_tcp(data, gso, **kw)


@pytest.mark.parametrize("udp", [False, True])
def test_a_super_frame_shorter_than_one_segment_is_one_row_with_its_own_lengths(udp):
    # gso_size may exceed what a row's 16-bit length fields can say when the frame is one shorter segment (the
    # kernel's own stacks do not send those, a bridged VM or a packet socket may): the row takes the frame's
    # lengths. The shared header once took gso_size's and raised OverflowError out of the wake-up.
    data = payload(100)
    if udp:
        frame = bytes(ether() / ip(False, id=9) / UDP(sport=1, dport=2) / data)
        want = [bytes(VXLAN(flags=8, vni=VNI) / ether() / ip(False, id=9) / UDP(sport=1, dport=2) / data)]
    else:
        frame, want = tcp_super(data), expected_tcp(data, 65535)
    assert split(frame, GSO_UDP_L4 if udp else GSO_TCPV4, 65535) == want


@pytest.mark.parametrize("v6", [False, True])
def test_udp_segmentation_matches_scapy(v6):
    data = payload(3001)
    frame = bytes(ether() / ip(v6, id=9) / UDP(sport=1, dport=2) / data)
    rows = split(frame, GSO_UDP_L4, 1000)
    want = [
        bytes(VXLAN(flags=8, vni=VNI) / ether() / ip(v6, id=9 + i) / UDP(sport=1, dport=2) / data[i * 1000 : (i + 1) * 1000])
        for i in range(4)
    ]
    assert rows == want


def test_segmenter_refuses_what_it_cannot_cut():
    seg = Segmenter(PREFIX)
    arp = bytes(Ether(**MACS, type=0x0806) / (b"\0" * 60))
    assert isinstance(seg.split(memoryview(bytearray(arp)), GSO_TCPV4, 1000), str)
    frame = tcp_super(payload(100))
    assert seg.split(memoryview(bytearray(frame)), 9, 1000) == "gso_type"
    udp = bytes(ether() / ip() / UDP() / payload(3000))
    assert isinstance(seg.split(memoryview(bytearray(udp)), GSO_TCPV4, 1000), str)
    # a routing header with segments left: the checksum's destination would be another address
    routed = bytes(ether() / ip(True) / IPv6ExtHdrRouting(addresses=["fd00::9"], segleft=1) / TCP() / payload(3000))
    assert seg.split(memoryview(bytearray(routed)), GSO_TCPV6, 1000) == "routing"
    fragment = bytes(ether() / ip(True) / IPv6ExtHdrFragment() / TCP() / payload(3000))
    assert seg.split(memoryview(bytearray(fragment)), GSO_TCPV6, 1000) == "fragment"


@pytest.mark.parametrize("proto", ["tcp", "udp", "udp6"])
@pytest.mark.parametrize("size", [0, 1, 101, 1000])
def test_finish_checksum_matches_scapy(proto, size):
    data = payload(size, seed=size)
    v6 = proto == "udp6"
    l4 = TCP(sport=1, dport=2, flags="PA") if proto == "tcp" else UDP(sport=1, dport=2)
    pkt = ether() / ip(v6, id=1) / l4 / data
    want = bytes(pkt)
    # What the kernel hands over with NEEDS_CSUM: the field holds the folded pseudo-header sum.
    start = 34 if not v6 else 54
    offset = 16 if proto == "tcp" else 6
    partial = bytearray(want)
    l4len = len(want) - start
    srcdst = partial[26:34] if not v6 else partial[22:54]
    s = (int.from_bytes(srcdst, "big") + (6 if proto == "tcp" else 17) + l4len) % 0xFFFF
    partial[start + offset : start + offset + 2] = struct.pack("!H", s or 0xFFFF)
    assert finish_checksum(memoryview(partial), start, offset)
    assert bytes(partial) == want


# -- coalescing ----------------------------------------------------------------------------------------------


def gro_batch(datagrams: list[bytes]) -> tuple[np.ndarray, int, int]:
    """The buffer one UDP_GRO recvmsg would return: equal-size datagrams back to back, the last may be short."""
    rowlen = len(datagrams[0])
    assert all(len(d) == rowlen for d in datagrams[:-1]) and len(datagrams[-1]) <= rowlen
    data = b"".join(datagrams)
    rx = np.zeros(len(data) + rowlen, np.uint8)
    rx[: len(data)] = np.frombuffer(data, np.uint8)
    return rx, len(data), rowlen


def written(plan, rx) -> list[tuple[bytes, bytes]]:
    """(virtio_net_hdr, frame) for every write the plan asks for."""
    out = []
    for item in plan:
        if isinstance(item, SuperFrame):
            blob = b"".join(bytes(memoryview(x)) for x in item.iov)
            out.append((blob[:VNET_HDR_LEN], blob[VNET_HDR_LEN:]))
        else:
            s, e = item
            out.append((NO_OFFLOAD, rx[s + len(PREFIX) : e].tobytes()))
    return out


def segments(data: bytes, gso: int, **kw) -> list[bytes]:
    return expected_tcp(data, gso, **kw)


def kernel_view(vnet: bytes, frame: bytes) -> list[bytes]:
    """What the kernel does with a GSO write: re-segment it. We use our scapy oracle for that."""
    flags, gso_type, hdr_len, gso_size, cs, co = HDR.unpack(vnet)
    return [f[len(PREFIX):] for f in expected_from_super(frame, gso_type, gso_size)]


def expected_from_super(frame: bytes, gso_type: int, gso: int) -> list[bytes]:
    pkt = Ether(frame)
    v6 = gso_type == GSO_TCPV6
    ipl = pkt[IPv6] if v6 else pkt[IP]
    t = pkt[TCP]
    return expected_tcp(bytes(t.payload), gso, v6=v6, flags=t.flags.value, options=t.options, seq=t.seq,
                        ip_id=0 if v6 else ipl.id)


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("size, gso", [(1398 * 20, 1398), (1398 * 20 + 77, 1398), (999 * 7, 999)])
def test_in_order_segments_coalesce_into_one_superframe(v6, size, gso):
    data = payload(size)
    segs = segments(data, gso, v6=v6)
    rx, n, rowlen = gro_batch(segs)
    plan = Coalescer(PREFIX).plan(rx, n, rowlen)
    assert len(plan) == 1 and isinstance(plan[0], SuperFrame)
    assert plan[0].segments == len(segs)
    assert plan[0].inner_bytes == sum(len(s) - 8 for s in segs)
    (vnet, frame), = written(plan, rx)
    flags, gso_type, hdr_len, gso_size, cs, co = HDR.unpack(vnet)
    assert (flags, gso_type, gso_size, co) == (F_NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4, gso, 16)
    assert cs == (54 if v6 else 34) and hdr_len == cs + 32
    # The super-frame, with its checksum completed, is what scapy builds for the whole stream...
    whole = bytearray(frame)
    assert finish_checksum(memoryview(whole), cs, co)
    assert bytes(whole) == tcp_super(data, v6=v6)
    # ...and the kernel's segmentation of it gives back exactly the datagrams that arrived.
    assert [bytes(VXLAN(flags=8, vni=VNI)) + f for f in kernel_view(vnet, frame)] == segs


@pytest.mark.parametrize("kw, l4", [({"v6": True, "ext": True}, 14 + 40 + 16), ({"vlan": "qinq"}, 14 + 8 + 20)],
                         ids=["ipv6-extension-headers", "qinq"])
def test_segments_behind_extension_headers_or_two_tags_coalesce_too(kw, l4):
    data = payload(1000 * 6 + 55)
    segs = segments(data, 1000, **kw)
    rx, n, rowlen = gro_batch(segs)
    plan = Coalescer(PREFIX).plan(rx, n, rowlen)
    assert len(plan) == 1 and isinstance(plan[0], SuperFrame) and plan[0].segments == 7
    (vnet, frame), = written(plan, rx)
    flags, gso_type, hdr_len, gso_size, cs, co = HDR.unpack(vnet)
    assert (cs, gso_size) == (l4, 1000)
    whole = bytearray(frame)
    assert finish_checksum(memoryview(whole), cs, co)
    assert bytes(whole) == tcp_super(data, **kw)  # IPv6 payload length counts the extension headers


def test_out_of_order_mixed_flows_and_bad_checksums_are_not_merged():
    data = payload(1000 * 8)
    segs = segments(data, 1000, flags="A")
    other = segments(payload(3000, seed=9), 1000, flags="A", seq=5)
    other = [bytes(Ether(s[8:])) for s in other]
    # another flow: different source port
    other = [bytes(VXLAN(flags=8, vni=VNI) / Ether(o)) for o in other]
    other = [o[:8] + o[8:].replace(struct.pack("!H", 40000), struct.pack("!H", 40001), 1) for o in other]
    corrupt = bytearray(segs[6])
    corrupt[-1] ^= 0xFF
    batch = [segs[0], segs[1], segs[2], segs[4], segs[3], other[0], segs[5], bytes(corrupt), segs[7]]
    rx, n, rowlen = gro_batch(batch)
    plan = Coalescer(PREFIX).plan(rx, n, rowlen)
    kinds = [x.segments if isinstance(x, SuperFrame) else 1 for x in plan]
    assert kinds == [3, 1, 1, 1, 1, 1, 1]  # 0-2 merged; 4 and 3 swapped; other flow; 5; corrupt; 7
    frames = [f for _, f in written(plan, rx)]
    assert frames[1:] == [b[8:] for b in batch[3:]]


@pytest.mark.parametrize("candidates_min", [0, 10**6])
def test_heads_of_runs_are_found_alike_row_by_row_and_in_one_numpy_pass(monkeypatch, candidates_min):
    # plan() picks the rows that could head a run in one NumPy pass for a long read and row by row for a short one
    # (CANDIDATES_MIN): both ways must plan alike, here over 16 rows mixing runs, a corrupt row and a non-IP one.
    import tunneld.offload.coalesce as coalesce

    monkeypatch.setattr(coalesce, "CANDIDATES_MIN", candidates_min)
    segs = segments(payload(1000 * 10), 1000, flags="A")
    other = segments(payload(3000, seed=9), 1000, flags="A", seq=5)  # elsewhere in the sequence space
    corrupt = bytearray(segs[7])
    corrupt[-1] ^= 0xFF
    arp_like = segs[9][:20] + b"\x08\x06" + segs[9][22:]  # EtherType ARP: no run starts or continues here
    batch = segs[:4] + other[:2] + segs[4:7] + [bytes(corrupt)] + [segs[8]] + [arp_like] + [other[2]] + segs[:3]
    rx, n, rowlen = gro_batch(batch)
    plan = Coalescer(PREFIX).plan(rx, n, rowlen)
    kinds = [x.segments if isinstance(x, SuperFrame) else 1 for x in plan]
    assert kinds == [4, 2, 3, 1, 1, 1, 1, 3]
    assert sum(kinds) == len(batch) == 16


@pytest.mark.parametrize("candidates_min", [0, 10**6])
def test_vlan_tagged_ipv6_behind_its_own_prefix_runs_alike_both_ways(monkeypatch, candidates_min):
    # A codec whose IPv6 header differs from its IPv4 one (GRE names the protocol): tagged IPv6 rows were never
    # candidates in the NumPy pass (it checked them against the IPv4 prefix), though _head accepts them.
    import tunneld.offload.coalesce as coalesce

    monkeypatch.setattr(coalesce, "CANDIDATES_MIN", candidates_min)
    p4, p6 = b"\0\0\x08\0", b"\0\0\x86\xdd"
    segs = Segmenter(p4, prefix6=p6).split(memoryview(tcp_super(payload(4000), v6=True, vlan=True)), GSO_TCPV6, 1000)
    buf = bytes(segs.buffer)
    rows = [buf[i : i + segs.rowlen] for i in range(0, len(buf), segs.rowlen)]
    arp = rows[0][: len(p4) + 16] + b"\x08\x06" + rows[0][len(p4) + 18 :]  # behind the tag: heads nothing
    rx, n, rowlen = gro_batch(rows[:2] + [arp] + rows[2:])
    plan = Coalescer(p4, prefix6=p6).plan(rx, n, rowlen)
    assert [x.segments if isinstance(x, SuperFrame) else 1 for x in plan] == [2, 1, 2]


def test_psh_ends_a_run_and_syn_fin_never_merge():
    data = payload(1000 * 6)
    segs = segments(data[:3000], 1000, flags="PA") + segments(data[3000:], 1000, flags="FA", seq=4000)
    rx, n, rowlen = gro_batch(segs)
    plan = Coalescer(PREFIX).plan(rx, n, rowlen)
    kinds = [x.segments if isinstance(x, SuperFrame) else 1 for x in plan]
    assert kinds == [3, 2, 1]  # PSH on the third closes the run; FIN only on the very last
    vnet, frame = written(plan, rx)[0]
    assert Ether(frame)[TCP].flags == "PA"


@pytest.mark.parametrize("flags", ["AE", "AC", "AU", "AR", "A" + "N", ""])
def test_a_row_with_any_flag_but_ack_and_psh_ends_the_run_before_it(flags):
    # One masked comparison of the header bytes checks the flags too (coalesce._run): each flag it must refuse,
    # in a row whose checksum and sequence number are right.
    data = payload(1000 * 5)
    segs = segments(data[:2000], 1000, flags="A") + segments(data[2000:3000], 1000, flags=flags, seq=3000, ip_id=79) \
        + segments(data[3000:], 1000, flags="A", seq=4000, ip_id=80)
    rx, n, rowlen = gro_batch(segs)
    plan = Coalescer(PREFIX).plan(rx, n, rowlen)
    kinds = [x.segments if isinstance(x, SuperFrame) else 1 for x in plan]
    assert kinds == [2, 1, 2]
    assert [f for _, f in written(plan, rx)][1] == segs[2][8:]


def test_bad_vxlan_header_is_left_to_the_codec():
    segs = segments(payload(3000), 1000)
    bad = bytearray(segs[1])
    bad[4] ^= 1  # another VNI
    rx, n, rowlen = gro_batch([segs[0], bytes(bad), segs[2]])
    plan = Coalescer(PREFIX).plan(rx, n, rowlen)
    assert plan == [(0, rowlen), (rowlen, 2 * rowlen), (2 * rowlen, n)]


@pytest.mark.parametrize("v6", [False, True])
def test_udp_datagrams_of_one_flow_become_one_uso_superframe(v6):
    data = payload(300 * 9 + 50)
    chunks = [data[i : i + 300] for i in range(0, len(data), 300)]
    dgs = [bytes(VXLAN(flags=8, vni=VNI) / ether() / ip(v6, id=40 + i) / UDP(sport=7, dport=9) / c)
           for i, c in enumerate(chunks)]
    other = bytes(VXLAN(flags=8, vni=VNI) / ether() / ip(v6, id=1) / UDP(sport=8, dport=9) / chunks[0])
    rx, n, rowlen = gro_batch(dgs[:4] + [other] + dgs[4:])
    plan = Coalescer(PREFIX).plan(rx, n, rowlen)
    kinds = [x.segments if isinstance(x, SuperFrame) else 1 for x in plan]
    assert kinds == [4, 1, 6]
    (vnet, frame), _, (vnet2, frame2) = written(plan, rx)
    flags, gso_type, hdr_len, gso_size, cs, co = HDR.unpack(vnet2)
    assert (flags, gso_type, gso_size, co) == (F_NEEDS_CSUM, GSO_UDP_L4, 300, 6)
    whole = bytearray(frame2)
    assert finish_checksum(memoryview(whole), cs, co)
    # the super-frame is the datagram scapy builds for the same payload; the kernel cuts it back (USO)
    want = bytes(ether() / ip(v6, id=44) / UDP(sport=7, dport=9) / data[1200:])
    assert bytes(whole) == want


def test_udp_runs_stay_single_where_the_kernel_lacks_uso():
    dgs = [bytes(VXLAN(flags=8, vni=VNI) / ether() / ip(id=i) / UDP(sport=7, dport=9) / payload(300, i)) for i in range(3)]
    rx, n, rowlen = gro_batch(dgs)
    assert Coalescer(PREFIX, uso=False).plan(rx, n, rowlen) == [(0, rowlen), (rowlen, 2 * rowlen), (2 * rowlen, n)]


def test_padded_datagrams_without_udp_checksum_are_not_merged():
    # 10-byte UDP payloads in 60-byte Ethernet frames (padded, as hardware VTEPs send short frames), checksum 0:
    # merging them would deliver the padding as payload.
    dgs = []
    for i in range(4):
        inner = bytes(ether() / ip(id=i) / UDP(sport=7, dport=9, chksum=0) / payload(10, i))
        dgs.append(bytes(VXLAN(flags=8, vni=VNI)) + inner + b"\xee" * (60 - len(inner)))
    rx, n, rowlen = gro_batch(dgs)
    plan = Coalescer(PREFIX).plan(rx, n, rowlen)
    assert not any(isinstance(x, SuperFrame) for x in plan) and len(plan) == 4


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_a_head_with_a_damaged_ipv4_header_is_not_repaired_by_merging(proto):
    if proto == "udp":
        dgs = [bytes(VXLAN(flags=8, vni=VNI) / ether() / ip(id=i) / UDP(sport=7, dport=9, chksum=0) / payload(300, i))
               for i in range(4)]
    else:
        dgs = segments(payload(1000 * 4), 1000, flags="A")
    rx, n, rowlen = gro_batch(dgs)
    assert len(Coalescer(PREFIX).plan(rx, n, rowlen)) == 1  # undamaged: one run
    damaged = [bytearray(d) for d in dgs]
    for d in damaged:  # every row alike, so only the head's own IPv4 checksum can tell
        d[len(PREFIX) + 14 + 19] ^= 0x01  # last byte of the destination address
    rx, n, rowlen = gro_batch([bytes(d) for d in damaged])
    plan = Coalescer(PREFIX).plan(rx, n, rowlen)
    assert not any(isinstance(x, SuperFrame) for x in plan)  # (SuperFrame is a NamedTuple: test its class)

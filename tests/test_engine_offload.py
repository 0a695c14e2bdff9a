"""The offload engine over fakes: counters count wire datagrams and inner bytes whatever the batching, frames
it cannot cut are counted, and the wire bytes are what scapy builds."""

from __future__ import annotations

import errno

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import GRE, Ether
from scapy.layers.vxlan import VXLAN

from tests.frames import expected_tcp, payload, tcp_super
from tunneld.encap.base import Drop
from tunneld.encap.gre import Gre
from tunneld.encap.vxlan import Vxlan
from tunneld.datapath.engine import make_engine
from tunneld.offload.vnet import F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, HDR, NO_OFFLOAD, finish_checksum
from tunneld.testing import FakeGsoLink, FakeVnetDevice

PEER = "192.0.2.2"
VNI = 7  # tests.frames' golden vectors use VNI 7


def make(max_frame: int = 1464):
    dev, link = FakeVnetDevice(), FakeGsoLink(PEER)
    return make_engine(dev, link, Vxlan(VNI), max_frame=max_frame, offload=True), dev, link


def small(sport: int, size: int = 64) -> bytes:
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="10.1.0.1", dst="10.1.0.2")
                 / UDP(sport=sport, dport=53) / payload(size, seed=sport))


def test_superframe_leaves_as_segments_in_one_send_and_counts_per_segment():
    eng, dev, link = make()
    data = payload(1398 * 30 + 11)
    dev.inject(HDR.pack(F_NEEDS_CSUM, GSO_TCPV4, 66, 1398, 34, 16) + tcp_super(data))
    eng.on_device_readable()
    want = expected_tcp(data, 1398)
    assert [p for p, _ in link.sent] == want
    assert link.sends == 1
    assert eng.stats.tx_packets == len(want) == 31
    assert eng.stats.tx_bytes == sum(len(w) - 8 for w in want)


def test_plain_frames_of_one_flow_share_a_send_and_keep_their_order():
    eng, dev, link = make()
    frames = [small(1000)] * 5 + [small(2000)] + [small(1000, size=70)] * 2
    dev.inject(*[NO_OFFLOAD + f for f in frames])
    eng.on_device_readable()
    assert [p[8:] for p, _ in link.sent] == frames
    assert link.sends == 3  # five equal frames, one other flow, two of another size
    assert (eng.stats.tx_packets, eng.stats.tx_bytes) == (8, sum(map(len, frames)))


def test_partial_checksum_is_finished_before_sending():
    eng, dev, link = make()
    good = bytes(Ether() / IP(src="10.1.0.1", dst="10.1.0.2") / TCP(flags="A") / b"hello")
    partial = bytearray(good)
    partial[50:52] = b"\x12\x34"  # whatever the kernel left: we recompute from the pseudo-header sum
    s = (int.from_bytes(good[26:34], "big") + 6 + len(good) - 34) % 0xFFFF
    partial[50:52] = s.to_bytes(2, "big")
    dev.inject(HDR.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, 34, 16) + bytes(partial))
    eng.on_device_readable()
    assert link.sent[0][0][8:] == good


def test_frames_the_offload_path_cannot_cut_are_counted():
    eng, dev, link = make()
    arp = bytes(Ether(type=0x0806) / (b"\0" * 3000))
    dev.inject(HDR.pack(0, GSO_TCPV4, 0, 1000, 14, 16) + arp, HDR.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, 9000, 16) + arp[:60])
    eng.on_device_readable()
    assert link.sent == []
    assert eng.stats.drops[Drop.OFFLOAD_UNSUPPORTED] == 2


def test_a_small_frame_the_segmenter_cannot_parse_falls_back_to_the_plain_path():
    eng, dev, link = make()
    arp = bytes(Ether(src="02:00:00:00:00:01", type=0x0806) / (b"\1" * 100))
    dev.inject(HDR.pack(0, GSO_TCPV4, 0, 1000, 14, 16) + arp)  # flagged GSO, but one packet's worth
    eng.on_device_readable()
    assert [p for p, _ in link.sent] == [bytes(VXLAN(flags=8, vni=VNI) / Ether(arp))]
    assert eng.stats.offload_fallbacks == 1 and eng.stats.tx_packets == 1 and not eng.stats.drops


def test_a_tun_packet_gre_cannot_carry_is_counted_not_raised():
    dev, link = FakeVnetDevice(), FakeGsoLink(PEER)
    eng = make_engine(dev, link, Gre(), max_frame=1476, offload=True)
    v4 = bytes(IP(src="10.1.0.1", dst="10.1.0.2") / UDP() / b"ok")
    dev.inject(NO_OFFLOAD + b"\x10" + bytes(40), NO_OFFLOAD + v4)  # IP version 1, then a good one
    eng.on_device_readable()
    assert eng.stats.drops == {Drop.BAD_PROTOCOL: 1}
    assert [p for p, _ in link.sent] == [bytes(GRE(proto=0x0800)) + v4]


def test_send_error_counts_every_segment():
    eng, dev, link = make()
    link.send_error = errno.ENOBUFS
    dev.inject(HDR.pack(F_NEEDS_CSUM, GSO_TCPV4, 66, 1000, 34, 16) + tcp_super(payload(5000)))
    eng.on_device_readable()
    assert eng.stats.drops[Drop.SOCKET_ERROR] == 5 and eng.stats.tx_packets == 0


def test_gro_read_is_coalesced_and_counted_per_datagram():
    eng, dev, link = make()
    data = payload(1398 * 10 + 5)
    segs = expected_tcp(data, 1398)
    link.deliver_gro(segs)
    link.deliver_gro([b"\x08\0\0\0\0\0\x09\0" + small(5)])  # another VNI: dropped by the codec
    link.deliver_gro([segs[0]], source="192.0.2.99")
    eng.on_link_readable()
    assert len(dev.written) == 1
    vnet, frame = dev.written[0][:10], bytearray(dev.written[0][10:])
    flags, gso_type, _, gso_size, csum_start, csum_offset = HDR.unpack(vnet)
    assert (flags, gso_type, gso_size) == (F_NEEDS_CSUM, GSO_TCPV4, 1398)
    assert finish_checksum(memoryview(frame), csum_start, csum_offset)
    assert bytes(frame) == tcp_super(data)
    assert eng.stats.rx_packets == 11
    assert eng.stats.rx_bytes == sum(len(s) - 8 for s in segs)
    assert eng.stats.drops[Drop.VNI_MISMATCH] == 1 and eng.stats.drops[Drop.UNKNOWN_PEER] == 1


def test_single_datagrams_are_written_behind_an_empty_vnet_header():
    eng, dev, link = make()
    frames = [small(1), small(2)]
    link.deliver_gro([b"\x08\0\0\0\0\0\x07\0" + f for f in frames])
    eng.on_link_readable()
    assert dev.written == [NO_OFFLOAD + f for f in frames]
    assert (eng.stats.rx_packets, eng.stats.rx_bytes) == (2, sum(map(len, frames)))


def test_single_datagrams_of_one_length_are_gathered_and_coalesced_in_order():
    """A peer whose datagrams arrive one per read (the kernel's VXLAN, no GRO on the way): gathered by length."""
    eng, dev, link = make()
    data = payload(1398 * 6 + 100)
    segs = expected_tcp(data, 1398)
    other = b"\x08\0\0\0\0\0\x07\0" + small(9)
    for s in segs[:3]:
        link.deliver(s)
    link.deliver(other)  # another length: the first three leave first, then this one
    for s in segs[3:]:
        link.deliver(s)  # ends with a short one: still part of the run
    eng.on_link_readable()
    kinds = [HDR.unpack(w[:10])[1] for w in dev.written]
    assert kinds == [GSO_TCPV4, GSO_NONE, GSO_TCPV4]
    assert dev.written[1] == NO_OFFLOAD + other[8:]
    frames = []
    for w in (dev.written[0], dev.written[2]):
        flags, _, _, gso_size, cs, co = HDR.unpack(w[:10])
        frame = bytearray(w[10:])
        assert finish_checksum(memoryview(frame), cs, co)
        frames.append(bytes(Ether(bytes(frame))[TCP].payload))
    assert b"".join(frames) == data
    assert eng.stats.rx_packets == len(segs) + 1
    assert eng.stats.rx_bytes == sum(len(s) - 8 for s in segs) + len(other) - 8


def test_garbage_of_any_length_gathered_or_coalesced_never_raises():
    import random

    rng = random.Random(5)
    eng, dev, link = make()
    for _ in range(300):
        size = rng.choice([0, 1, 7, 8, 9, 20, 30, 63, 64, 65, 100, 1500])
        count = rng.choice([1, 2, 5])
        dgs = [bytes([8, 0, 0, 0, 0, 0, 7, 0])[: size] + rng.randbytes(max(0, size - 8)) for _ in range(count)]
        if rng.random() < 0.5:
            link.deliver_gro(dgs)
        else:
            for d in dgs:
                link.deliver(d)
        eng.on_link_readable()
    assert eng.stats.dropped > 0
    assert sum(eng.stats.rx_batches) == 300


def test_a_wakeup_yields_after_its_byte_budget_not_only_its_read_count():
    from tunneld.datapath.engine import WAKEUP_BYTES

    eng, dev, link = make()
    data = payload(1398 * 20)  # small enough that the 3 left over fit one more wake-up's budget
    superframe = HDR.pack(F_NEEDS_CSUM, GSO_TCPV4, 66, 1398, 34, 16) + tcp_super(data)
    per_wakeup = -(-WAKEUP_BYTES // len(superframe))  # reads until the budget is reached
    assert per_wakeup < eng.batch  # otherwise the read count, not the budget, would be tested
    dev.inject(*[superframe] * (per_wakeup + 3))
    eng.on_device_readable()
    assert link.sends == per_wakeup
    assert len(dev.pending) == 3  # left for the next wake-up; nothing lost
    eng.on_device_readable()
    assert link.sends == per_wakeup + 3


def test_a_send_that_fails_halfway_counts_what_left_and_drops_the_rest():
    eng, dev, link = make()
    data = payload(1398 * 30 + 11)
    dev.inject(HDR.pack(F_NEEDS_CSUM, GSO_TCPV4, 66, 1398, 34, 16) + tcp_super(data))
    link.fail_after = 10
    eng.on_device_readable()
    assert len(link.sent) == 10
    assert eng.stats.tx_packets == 10
    assert eng.stats.tx_bytes == sum(len(p) - 8 for p, _ in link.sent)
    assert eng.stats.drops[Drop.SOCKET_ERROR] == 21


def test_pending_plain_frames_that_fail_halfway_count_what_left():
    eng, dev, link = make()
    frames = [small(1000)] * 6
    dev.inject(*[NO_OFFLOAD + f for f in frames])
    link.fail_after = 4
    eng.on_device_readable()
    assert [p[8:] for p, _ in link.sent] == frames[:4]
    assert (eng.stats.tx_packets, eng.stats.tx_bytes) == (4, 4 * len(frames[0]))
    assert eng.stats.drops[Drop.SOCKET_ERROR] == 2

"""The offload path over raw IP (GRE on a TUN device): segmentation and coalescing of bare IP packets behind a
GRE header that names the inner protocol, against scapy's GRE; sendmmsg/recvmmsg; the raw link's runs."""

from __future__ import annotations

import random
import socket

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import GRE

from tunneld.encap.gre import Gre, GreTap
from tunneld.encap.vxlan import Vxlan
from tunneld.encap.base import constant_headers as constant_prefixes
from tunneld.datapath.engine import offload_supported
from tunneld.io.mmsg import MessageReceiver, MessageSender
from tunneld.io.raw import RawLink
from tunneld.io.udp import KernelDrops
from tunneld.offload.coalesce import Coalescer, SuperFrame
from tunneld.offload.segment import Segmenter
from tunneld.offload.vnet import F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, HDR, VNET_HDR_LEN, finish_checksum

KEY = 0xDEADBEEF
OPTS = [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]


def gre_header(v6: bool) -> bytes:
    return bytes(GRE(key_present=1, key=KEY, proto=0x86DD if v6 else 0x0800))


def ip(v6: bool, ip_id: int = 77):
    if v6:
        return IPv6(src="fd00::1", dst="fd00::2")
    return IP(src="10.1.0.1", dst="10.1.0.2", flags="DF", id=ip_id)


def tcp(seq: int, flags) -> TCP:
    return TCP(sport=40000, dport=5201, seq=seq, ack=9, flags=flags, window=500, options=OPTS)


def super_packet(data: bytes, v6: bool, flags="PA", seq=1000) -> bytes:
    return bytes(ip(v6) / tcp(seq, flags) / data)


def wire_segments(data: bytes, gso: int, v6: bool, flags="PA", seq=1000) -> list[bytes]:
    """What the kernel's GSO would send, each behind the GRE header, built packet by packet by scapy."""
    chunks = [data[i : i + gso] for i in range(0, len(data), gso)]
    out = []
    for i, chunk in enumerate(chunks):
        f = TCP(flags=flags).flags.value & (~0x09 if i < len(chunks) - 1 else 0xFF)
        inner = ip(v6, 77 + i) / tcp((seq + i * gso) & 0xFFFFFFFF, f) / chunk
        out.append(bytes(GRE(key_present=1, key=KEY, proto=0x86DD if v6 else 0x0800) / inner))
    return out


def segmenter() -> Segmenter:
    return Segmenter(gre_header(False), prefix6=gre_header(True), l2=False)


def coalescer() -> Coalescer:
    return Coalescer(gre_header(False), prefix6=gre_header(True), l2=False)


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("size, gso", [(1424 * 30 + 11, 1424), (999 * 4, 999), (5001, 1000)])
def test_tun_superframe_is_cut_into_gre_packets_as_scapy_builds_them(v6, size, gso):
    data = random.Random(size).randbytes(size)
    r = segmenter().split(memoryview(bytearray(super_packet(data, v6))), GSO_TCPV6 if v6 else GSO_TCPV4, gso)
    assert not isinstance(r, str), r
    buf = bytes(r.buffer)
    rows = [buf[i : i + r.rowlen] for i in range(0, len(buf), r.rowlen)]
    assert rows == wire_segments(data, gso, v6)
    assert r.count == len(rows) and r.inner_bytes == sum(len(x) - 8 for x in rows)


def test_tun_udp_superframe_is_cut_behind_the_ipv4_gre_header():
    data = random.Random(3).randbytes(2500)
    frame = bytes(ip(False, 5) / UDP(sport=1, dport=2) / data)
    r = segmenter().split(memoryview(bytearray(frame)), GSO_UDP_L4, 1000)
    buf = bytes(r.buffer)
    want = [bytes(GRE(key_present=1, key=KEY, proto=0x0800) / ip(False, 5 + i) / UDP(sport=1, dport=2)
                  / data[i * 1000 : (i + 1) * 1000]) for i in range(3)]
    assert [buf[i : i + r.rowlen] for i in range(0, len(buf), r.rowlen)] == want


def test_a_tun_segmenter_refuses_an_ethernet_frame_and_other_versions():
    seg = segmenter()
    assert seg.split(memoryview(bytearray(b"\x20" + bytes(100))), GSO_TCPV4, 50) == "not_ip"
    assert seg.split(memoryview(bytearray(bytes(10))), GSO_TCPV4, 50) == "short"


def batch(packets: list[bytes]) -> tuple[np.ndarray, int, int]:
    rowlen = len(packets[0])
    data = b"".join(packets)
    rx = np.zeros(len(data) + rowlen, np.uint8)
    rx[: len(data)] = np.frombuffer(data, np.uint8)
    return rx, len(data), rowlen


@pytest.mark.parametrize("v6", [False, True])
def test_gre_packets_of_one_flow_coalesce_into_one_tun_superframe(v6):
    data = random.Random(9).randbytes(1424 * 12 + 300)
    rx, n, rowlen = batch(wire_segments(data, 1424, v6))
    plan = coalescer().plan(rx, n, rowlen)
    assert len(plan) == 1 and isinstance(plan[0], SuperFrame) and plan[0].segments == 13
    blob = b"".join(bytes(memoryview(x)) for x in plan[0].iov)
    flags, gso_type, hdr_len, gso_size, cs, co = HDR.unpack(blob[:VNET_HDR_LEN])
    assert (flags, gso_type, gso_size, cs, co) == (F_NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4, 1424, 40 if v6 else 20, 16)
    whole = bytearray(blob[VNET_HDR_LEN:])
    assert finish_checksum(memoryview(whole), cs, co)
    assert bytes(whole) == super_packet(data, v6)  # no Ethernet header: a TUN write


def test_an_ipv6_packet_behind_an_ipv4_protocol_type_is_not_merged():
    data = random.Random(2).randbytes(1000 * 4)
    segs = wire_segments(data, 1000, v6=True)
    segs[2] = gre_header(False) + segs[2][8:]  # the GRE header says IPv4, the packet is IPv6
    rx, n, rowlen = batch(segs)
    plan = coalescer().plan(rx, n, rowlen)
    assert [type(x) for x in plan] == [SuperFrame, tuple, tuple]  # rows 0-1 merged; 2 alone; 3 no run to join
    assert plan[0].segments == 2 and plan[1] == (2 * rowlen, 3 * rowlen)


def test_constant_prefixes_follow_the_codec_options_and_leave_its_state_alone():
    p4, p6 = constant_prefixes(Gre(key=KEY))
    assert (p4, p6) == (gre_header(False), gre_header(True))
    assert constant_prefixes(GreTap())[0] == constant_prefixes(GreTap())[1] == bytes(GRE(proto=0x6558))
    assert constant_prefixes(Vxlan(7))[0] == constant_prefixes(Vxlan(7))[1]
    seq = Gre(seq=True)
    assert constant_prefixes(seq) is None and not offload_supported(seq)  # a counter differs per packet
    assert not offload_supported(Gre(csum=True))  # a checksum differs per packet
    buf = bytearray(64) + bytes(super_packet(b"x", False))
    start = seq.encap(buf, 64, len(buf))
    assert GRE(bytes(buf[start:])).sequence_number == 0  # the probes did not advance the real codec


class LengthInHeader(Vxlan):
    """A codec whose header carries the frame's length: not constant, whatever two equal-length probes say."""

    def encap(self, buf, start, end):
        at = super().encap(buf, start, end)
        buf[at + 7] = (end - start) & 0xFF  # VXLAN's last reserved byte
        return at


def test_a_header_that_depends_on_the_length_keeps_the_plain_path():
    assert constant_prefixes(LengthInHeader(7)) is None and not offload_supported(LengthInHeader(7))


# -- sendmmsg / recvmmsg over loopback UDP (the calls are the same for any socket) ---------------------------


def test_sendmmsg_sends_each_row_and_recvmmsg_returns_them_with_their_source():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        tx.bind(("127.0.0.1", 0))
        sender = MessageSender(tx.fileno(), capacity=4)  # fewer than the rows: the send takes several calls
        port = rx.getsockname()[1]
        sender.set_destination(b"\x02\x00" + port.to_bytes(2, "big") + socket.inet_aton("127.0.0.1") + bytes(8))
        rows = bytearray(random.Random(1).randbytes(10 * 300 + 77))
        assert sender.send(memoryview(rows), 300) == 11
        receiver = MessageReceiver(rx.fileno(), slots=8, slot_size=2048)
        got = []
        for _ in range(2):  # 8 slots, then the other 3
            n = receiver.receive()
            for i in range(n):
                got.append(receiver.slots[i, : receiver.lengths[i]].tobytes())
                assert receiver.names[i, 4:8].tobytes() == socket.inet_aton("127.0.0.1")
                assert int.from_bytes(receiver.names[i, 2:4].tobytes(), "big") == tx.getsockname()[1]
        assert got == [bytes(rows[i : i + 300]) for i in range(0, len(rows), 300)]
        with pytest.raises(BlockingIOError):
            receiver.receive()
    finally:
        rx.close()
        tx.close()


def test_a_refused_sendmmsg_raises_with_what_left():
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sender = MessageSender(tx.fileno())
        sender.set_destination(b"\x02\x00\x00\x09" + socket.inet_aton("127.0.0.1") + bytes(8))
        with pytest.raises(OSError) as e:
            sender.send(memoryview(bytearray(70000 * 2)), 70000)  # larger than any datagram
        assert e.value.sent == 0
    finally:
        tx.close()


# -- the raw link's runs out of one recvmmsg -------------------------------------------------------------------


class FakeReceiver:
    """Stands in for MessageReceiver: packets as a raw IPv4 socket returns them (outer header included)."""

    def __init__(self, packets: list[tuple[str, bytes]]) -> None:
        self.slots = np.zeros((len(packets), 2048), np.uint8)
        self.names = np.zeros((len(packets), 28), np.uint8)
        self.lengths = np.zeros(len(packets), np.uint32)
        for i, (source, payload, *options) in enumerate(packets):
            whole = bytes(IP(src=source, dst="10.0.0.1", proto=47, options=options[0] if options else []) / payload)
            self.slots[i, : len(whole)] = np.frombuffer(whole, np.uint8)
            self.lengths[i] = len(whole)
            self.names[i, 4:8] = np.frombuffer(socket.inet_aton(source), np.uint8)
        self.calls = 0

        self.cut: list[bool] = [False] * len(packets)  # which ones "arrived longer than their slot"

    def first_length(self) -> int:
        return int(self.lengths[0])

    def first_truncated(self) -> bool:
        return self.cut[0]

    def any_truncated(self, count: int) -> bool:
        return any(self.cut[:count])

    def truncated(self, count: int) -> list[bool]:
        return self.cut[:count]

    def overflow(self, i: int) -> None:
        return None  # the socket dropped nothing

    capacity = 64

    def receive(self) -> int:
        self.calls += 1
        if self.calls > 1:
            raise BlockingIOError
        return len(self.lengths)


def raw_link_with(packets) -> RawLink:
    link = RawLink.__new__(RawLink)  # no socket: only the run building is under test
    link.family, link.peer, link.df = socket.AF_INET, "10.0.0.2", True
    link._sources, link._sockaddrs = {}, {}
    link._sender = None
    link._drops = KernelDrops()
    link.size_receive_buffer = lambda size: None  # no socket to size
    link._receive_with(FakeReceiver(packets))
    return link


def test_raw_link_hands_out_runs_of_one_length_like_a_gro_read():
    peer, stranger = "10.0.0.2", "10.0.0.9"
    full, short = [bytes([i]) * 100 for i in range(3)], b"s" * 40
    link = raw_link_with([(peer, full[0]), (peer, full[1]), (peer, full[2]), (peer, short), (stranger, full[0]),
                          (peer, b"z" * 60), (peer, b"y" * 100)])
    buf = memoryview(bytearray(1 << 16))
    assert link.recv_gro_into(buf) == (340, peer, 100)  # three full and the shorter last one
    assert bytes(buf[:340]) == b"".join(full) + short
    assert link.recv_gro_into(buf) == (100, stranger, 0)
    assert link.recv_gro_into(buf) == (60, peer, 0)  # alone: the next one is longer
    assert bytes(buf[:60]) == b"z" * 60
    assert link.recv_gro_into(buf) == (100, peer, 0)
    with pytest.raises(BlockingIOError):
        link.recv_gro_into(buf)


def test_a_packet_behind_ipv4_options_is_handed_on_from_its_own_offset_and_ends_runs():
    # Each packet's payload starts behind its own IPv4 header (IHL); a different offset ends a run as a
    # different length does.
    peer = "10.0.0.2"
    rows = [bytes([i]) * 100 for i in range(4)]
    link = raw_link_with([(peer, rows[0]), (peer, rows[1]), (peer, rows[2], b"\x01\x01\x01\x00"), (peer, rows[3])])
    buf = memoryview(bytearray(1 << 16))
    assert link.recv_gro_into(buf) == (200, peer, 100) and bytes(buf[:200]) == rows[0] + rows[1]
    assert link.recv_gro_into(buf) == (100, peer, 0) and bytes(buf[:100]) == rows[2]
    assert link.recv_gro_into(buf) == (100, peer, 0) and bytes(buf[:100]) == rows[3]


def test_raw_link_lone_packets_from_the_peer_and_from_strangers():
    link = raw_link_with([("10.0.0.2", b"a" * 70)])
    buf = memoryview(bytearray(1 << 16))
    assert link.recv_gro_into(buf) == (70, "10.0.0.2", 0) and bytes(buf[:70]) == b"a" * 70
    link = raw_link_with([("10.0.0.7", b"b" * 70)])
    assert link.recv_gro_into(buf) == (70, "10.0.0.7", 0) and bytes(buf[:70]) == b"b" * 70


def test_a_peer_change_judges_the_packets_already_taken_by_the_new_peer():
    link = raw_link_with([("10.0.0.2", b"1" * 80), ("10.0.0.2", b"2" * 90), ("10.0.0.3", b"3" * 100)])
    buf = memoryview(bytearray(1 << 16))
    assert link.recv_gro_into(buf) == (80, "10.0.0.2", 0)
    link.set_peer("10.0.0.3")  # a reload between two wake-ups, packets from both still in the slots
    assert link.recv_gro_into(buf) == (90, "10.0.0.2", 0) and bytes(buf[:90]) == b"2" * 90  # now a stranger
    assert link.recv_gro_into(buf) == (100, "10.0.0.3", 0) and bytes(buf[:100]) == b"3" * 100


class StubLoop:
    def __init__(self) -> None:
        self.soon: list = []

    def call_soon(self, fn) -> None:
        self.soon.append(fn)


def test_packets_left_in_the_slots_when_a_wakeup_ends_are_come_back_for():
    """Taken from the kernel by recvmmsg, they are invisible to the poll: the engine must not wait for it."""
    from tunneld.datapath.engine import Engine
    from tunneld.testing import FakeVnetDevice

    inner = [bytes(IP(src="10.1.0.1", dst="10.1.0.2") / UDP() / (b"x" * n)) for n in range(10, 15)]
    link = raw_link_with([("10.0.0.2", bytes(GRE(proto=0x0800)) + p) for p in inner])
    link.enable_gro = lambda max_packet: None  # the fake receiver is in place already
    dev = FakeVnetDevice()
    eng = Engine(dev, link, Gre(), max_frame=1476, offload=True, batch=2)  # five packets of five lengths: five reads
    eng._loop = loop = StubLoop()
    eng.on_link_readable()
    assert len(dev.written) == 2 and loop.soon == [eng.on_link_readable]
    loop.soon.clear()
    eng.on_link_readable()
    eng.on_link_readable()  # the last one, then nothing left: no call back
    assert [w[10:] for w in dev.written] == inner and loop.soon == [eng.on_link_readable]
    assert eng.stats.rx_packets == 5


@pytest.mark.parametrize("capacity, calls", [(64, 1), (3, 2)])
def test_a_short_batch_spares_the_call_that_would_find_nothing(capacity, calls):
    link = raw_link_with([("10.0.0.2", bytes(50))] * 3)
    link._receiver.capacity = capacity  # 3 packets: a short batch of 64 slots, a full one of 3
    buf = memoryview(bytearray(1 << 16))
    assert link.recv_gro_into(buf) == (150, "10.0.0.2", 50)
    with pytest.raises(BlockingIOError):
        link.recv_gro_into(buf)
    assert link._receiver.calls == calls  # a full batch may have left more behind: only then look again


@pytest.mark.parametrize("count", [1, 3])
def test_a_packet_longer_than_its_slot_is_handed_on_empty(count):
    link = raw_link_with([("10.0.0.2", bytes(100))] * count)
    link._receiver.cut[count - 1] = True
    buf = memoryview(bytearray(1 << 16))
    if count == 3:
        assert link.recv_gro_into(buf) == (200, "10.0.0.2", 100)
    assert link.recv_gro_into(buf) == (0, "10.0.0.2", 0)  # the GRE codec counts an empty packet as truncated


def test_recvmmsg_reports_a_datagram_longer_than_its_slot():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        receiver = MessageReceiver(rx.fileno(), slots=4, slot_size=128)
        for size in (100, 300):
            tx.sendto(bytes(size), rx.getsockname())
        assert receiver.receive() == 2
        assert receiver.lengths[:2].tolist() == [100, 128] and receiver.truncated(2) == [False, True]
        assert not receiver.first_truncated() and receiver.any_truncated(2)
    finally:
        rx.close()
        tx.close()


def test_after_a_lone_packet_sparse_traffic_is_read_singly_until_a_burst():
    link = raw_link_with([("10.0.0.2", b"a" * 70)])
    buf = memoryview(bytearray(1 << 16))
    assert link.recv_gro_into(buf) == (70, "10.0.0.2", 0)  # recvmmsg brought one packet
    with pytest.raises(BlockingIOError):
        link.recv_gro_into(buf)  # (the queue was drained: no call)
    singles = [(60, "10.0.0.2"), (61, "10.0.0.2"), (62, "10.0.0.2")]
    plain_calls = []

    def recv_into(b):
        plain_calls.append(1)
        if not singles:
            raise BlockingIOError
        return singles.pop(0)

    link.recv_into = recv_into
    assert link.recv_gro_into(buf) == (60, "10.0.0.2", 0)  # next wake-up: one plain read...
    assert link.recv_gro_into(buf) == (61, "10.0.0.2", 0)  # ...a second in the same wake-up: a burst
    link._receiver.__init__([("10.0.0.2", bytes(100))] * 4)  # what the next recvmmsg will find
    assert link.recv_gro_into(buf) == (400, "10.0.0.2", 100)  # batched again
    assert len(plain_calls) == 2


def test_raw_link_runs_stop_at_the_callers_buffer():
    link = raw_link_with([("10.0.0.2", bytes(100))] * 5)
    buf = memoryview(bytearray(250))
    assert link.recv_gro_into(buf) == (200, "10.0.0.2", 100)
    assert link.recv_gro_into(buf) == (200, "10.0.0.2", 100)
    assert link.recv_gro_into(buf) == (100, "10.0.0.2", 0)

"""The batched path's parts alone: Pending and Gatherer (pure bookkeeping), the device ports over fake system
calls, and the codecs' batch verdicts against their own ``decap``."""

from __future__ import annotations

import random

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from tunneld.encap.base import DeviceKind, Drop, rows_agree
from tunneld.encap.gre import Gre, GreTap
from tunneld.encap.vxlan import Vxlan, build_header
from tunneld.io.port import Fallback, FramePort, VnetPort
from tunneld.offload.rows import Gatherer, Pending
from tunneld.offload.segment import Segments
from tunneld.offload.vnet import F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, HDR, NO_OFFLOAD, VNET_HDR_LEN
from tunneld.testing import FakeDevice, FakeVnetDevice, stream

VXLAN7 = build_header(7)


def segments(count: int, size: int = 1398) -> list[bytes]:
    """VXLAN datagrams (VNI 7) carrying in-order segments of one TCP flow, checksums right."""
    return [VXLAN7 + f for f in stream(DeviceKind.TAP, 6, size, count)]


def tcp_payload(frame: bytes) -> bytes:
    return bytes(IP(frame[14:])[TCP].payload)

# -- Pending ---------------------------------------------------------------------------------------------------


def test_pending_keeps_one_run_of_one_flow_and_size():
    p = Pending(1000)
    assert p.add(memoryview(b"a" * 100), 7) and p.add(memoryview(b"b" * 100), 7)
    assert not p.add(memoryview(b"c" * 100), 8)  # another flow
    assert not p.add(memoryview(b"c" * 99), 7)  # another size
    assert (p.count, p.size, p.flow) == (2, 100, 7) and bytes(p.rows()) == b"a" * 100 + b"b" * 100
    p.clear()
    assert p.count == 0 and len(p.rows()) == 0
    assert p.add(memoryview(b"c" * 99), 8) and (p.size, p.flow) == (99, 8)


def test_pending_refuses_what_would_overflow_its_room():
    p = Pending(250)
    assert p.add(memoryview(bytes(100)), 1) and p.add(memoryview(bytes(100)), 1)
    assert not p.add(memoryview(bytes(100)), 1) and p.count == 2  # the caller sends the two, then queues it


# -- Gatherer --------------------------------------------------------------------------------------------------


def test_gatherer_lays_equal_datagrams_back_to_back_and_a_shorter_one_closes_them():
    g = Gatherer()
    assert g.add(100) == 0  # nothing gathered yet: the caller starts a gathering
    g.start(100)
    assert g.add(100) == 200 and g.add(100) == 300
    assert g.add(101) == 0  # longer: not part of these rows
    assert g.add(60) == 360  # shorter: the last row...
    assert g.add(60) == 0  # ...after which nothing joins
    assert g.take() == (360, 100) and g.fill == 0


# -- device ports over fake system calls -------------------------------------------------------------------------


def test_the_frame_port_is_the_system_calls_themselves():
    dev = FakeDevice()
    port = FramePort(dev)
    area = memoryview(bytearray(2000))
    dev.inject(b"frame")
    assert port.read((area,)) == 5 and bytes(area[:5]) == b"frame"
    with pytest.raises(BlockingIOError):
        port.read((area,))
    port.write(memoryview(b"out"))
    assert dev.written == [b"out"]


def test_the_vnet_port_hands_over_plain_frames_segments_fallbacks_and_drops():
    dev = FakeVnetDevice()
    port = VnetPort(dev, Vxlan(7), max_frame=1464)
    area = memoryview(bytearray(1 << 17))
    superframe = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="10.1.0.1", dst="10.1.0.2")
                       / TCP(sport=1, dport=2, flags="A") / (b"s" * (1398 * 5)))
    arp = bytes(60)
    dev.inject(NO_OFFLOAD + b"x" * 80,
               HDR.pack(F_NEEDS_CSUM, GSO_TCPV4, 54, 1398, 34, 16) + superframe,
               HDR.pack(0, GSO_TCPV4, 0, 1000, 14, 16) + arp,  # flagged GSO, one packet's worth, not TCP
               HDR.pack(0, GSO_TCPV4, 0, 1000, 14, 16) + bytes(3000),  # the same, too big for one packet
               HDR.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, 9000, 16) + arp)  # a checksum offset past the frame
    assert port.read((area,)) == 80 and bytes(area[VNET_HDR_LEN : VNET_HDR_LEN + 80]) == b"x" * 80
    segs = port.read((area,))
    assert segs.__class__ is Segments and segs.count == 5 and segs.frame_len == len(superframe)
    rows = [bytes(segs.buffer[i * segs.rowlen : (i + 1) * segs.rowlen]) for i in range(5)]
    assert all(r.startswith(VXLAN7) for r in rows)  # the declared header in front of every row
    assert b"".join(tcp_payload(r[8:]) for r in rows) == b"s" * (1398 * 5)
    fallback = port.read((area,))
    assert fallback.__class__ is Fallback and fallback == 60
    assert port.read((area,)) is Drop.OFFLOAD_UNSUPPORTED
    assert port.read((area,)) is Drop.OFFLOAD_UNSUPPORTED


def rows_of(datagrams: list[bytes]) -> tuple[np.ndarray, memoryview, int]:
    rx = np.zeros(3 * 65536, np.uint8)
    blob = b"".join(datagrams)
    rx[: len(blob)] = np.frombuffer(blob, np.uint8)
    return rx, memoryview(rx), len(blob)


def test_a_refused_row_breaks_the_run_and_only_accepted_rows_reach_the_device():
    from collections import Counter

    dev = FakeVnetDevice()
    port = VnetPort(dev, Vxlan(7), max_frame=1464)
    segs = segments(8)
    rx, view, n = rows_of(segs)
    verdicts = [8, 8, 8, Drop.VNI_MISMATCH, 8, 8, 8, 8]
    drops: Counter = Counter()
    moved, nbytes, _ = port.write_rows(rx, view, n, len(segs[0]), verdicts, drops)
    assert drops == {Drop.VNI_MISMATCH: 1}
    assert moved == 7 and nbytes == sum(len(s) - 8 for i, s in enumerate(segs) if i != 3)
    kinds = [HDR.unpack_from(w)[1] for w in dev.written]
    assert kinds == [GSO_TCPV4, GSO_TCPV4]  # rows 0-2, then rows 4-7: never one run across the refused row
    payloads = b"".join(tcp_payload(w[VNET_HDR_LEN:]) for w in dev.written)
    assert payloads == b"".join(tcp_payload(s[8:]) for i, s in enumerate(segs) if i != 3)


def test_a_row_accepted_at_another_offset_is_written_alone_from_there():
    from collections import Counter

    dev = FakeVnetDevice()
    port = VnetPort(dev, Vxlan(7), max_frame=1464)
    segs = segments(3)
    rx, view, n = rows_of(segs)
    moved, _, _ = port.write_rows(rx, view, n, len(segs[0]), [8, 10, 8], Counter())
    assert moved == 3 and dev.written == [NO_OFFLOAD + s[8:] for s in segs[:1]] + [NO_OFFLOAD + segs[1][10:]] + \
        [NO_OFFLOAD + segs[2][8:]]


# -- batch verdicts agree with decap ------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", [Vxlan(7), GreTap(key=5), Gre(key=5), Gre()])
def test_batch_verdicts_are_decaps_verdicts_for_good_and_damaged_rows(codec):
    rng = random.Random(3)
    frames = stream(codec.device, 6, 1398, 6)
    buf = bytearray(64 + 2000)
    rows = []
    for f in frames:
        buf[64 : 64 + len(f)] = f
        start = codec.encap(buf, 64, 64 + len(f))
        rows.append(bytes(buf[start : 64 + len(f)]))
    size = len(rows[0])
    for trial in range(60):
        batch = [bytearray(r) for r in rows]
        if trial:
            for _ in range(rng.randint(1, 3)):
                row = rng.choice(batch)
                row[rng.randrange(min(len(row), 40))] ^= 1 << rng.randrange(8)
        packets = memoryview(b"".join(batch))
        want = [codec.decap(packets[i : i + size]) for i in range(0, len(packets), size)]
        assert codec.decap_batch(packets, size) == want


def test_rows_agree_compares_every_row_at_one_offset():
    packets = memoryview(b"AB__" * 3 + b"AX__")
    assert rows_agree(packets, 4, 0, b"AB", 3) and not rows_agree(packets, 4, 0, b"AB", 4)

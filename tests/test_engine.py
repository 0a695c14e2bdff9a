"""The engine over in-memory fakes: no root, no kernel, every path through both callbacks."""

from __future__ import annotations

import errno

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from tunneld.encap.base import Drop
from tunneld.encap.vxlan import Vxlan
from tunneld.datapath.engine import Engine
from tunneld.testing import FakeDevice, FakeLink

PEER = "192.0.2.2"


def frame(sport: int = 1000, size: int = 100) -> bytes:
    pkt = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="10.1.0.1", dst="10.1.0.2") / UDP(sport=sport, dport=53)
    return bytes(pkt / (b"p" * max(0, size - len(pkt))))


def make(batch: int = 32, max_frame: int = 1472, clock=lambda: 1234.5):
    dev, link = FakeDevice(), FakeLink(PEER)
    return Engine(dev, link, Vxlan(5), max_frame=max_frame, batch=batch, clock=clock), dev, link


def test_outbound_frames_are_encapsulated_and_counted():
    eng, dev, link = make()
    frames = [frame(sport=1000 + i) for i in range(5)]
    dev.inject(*frames)
    eng.on_device_readable()
    assert [p for p, _ in link.sent] == [bytes(VXLAN(flags=8, vni=5) / Ether(f)) for f in frames]
    assert (eng.stats.tx_packets, eng.stats.tx_bytes) == (5, sum(map(len, frames)))
    assert eng.stats.tx_batches[5] == 1


def test_same_flow_same_source_port_choice_and_flows_spread():
    eng, dev, link = make()
    dev.inject(frame(sport=1), frame(sport=1), *[frame(sport=s) for s in range(2, 40)])
    eng.on_device_readable()
    eng.on_device_readable()
    flows = [f for _, f in link.sent]
    assert flows[0] == flows[1]
    assert len({f % 8 for f in flows}) > 4  # 39 flows land on more than half of an 8-socket pool


def test_a_link_without_ports_is_not_handed_flow_hashes():
    dev, link = FakeDevice(), FakeLink(PEER)
    link.spreads_flows = False  # as raw IP (GRE): the hash would cost ~0.8 us per packet for nothing
    eng = Engine(dev, link, Vxlan(5), max_frame=1472)
    dev.inject(*[frame(sport=s) for s in range(1, 9)])
    eng.on_device_readable()
    assert len(link.sent) == 8 and {f for _, f in link.sent} == {0}


def test_one_wakeup_handles_at_most_a_batch():
    eng, dev, link = make(batch=4)
    dev.inject(*[frame() for _ in range(10)])
    eng.on_device_readable()
    assert len(link.sent) == 4
    assert len(dev.pending) == 6


def test_oversized_frame_is_dropped_not_fragmented():
    eng, dev, link = make(max_frame=200)
    dev.inject(frame(size=201), frame(size=200))
    eng.on_device_readable()
    assert len(link.sent) == 1
    assert eng.stats.drops == {Drop.TOO_BIG: 1}


@pytest.mark.parametrize("err,reason", [(errno.EMSGSIZE, Drop.TOO_BIG), (errno.EHOSTUNREACH, Drop.SOCKET_ERROR),
                                        (errno.ENOBUFS, Drop.SOCKET_ERROR)])
def test_send_errors_are_counted(err, reason):
    eng, dev, link = make()
    link.send_error = err
    dev.inject(frame(), frame())
    eng.on_device_readable()
    assert eng.stats.drops == {reason: 2}
    assert eng.stats.tx_packets == 0


def test_inbound_valid_datagram_is_delivered():
    eng, dev, link = make()
    inner = frame()
    link.deliver(bytes(VXLAN(flags=8, vni=5) / Ether(inner)))
    eng.on_link_readable()
    assert dev.written == [inner]
    assert (eng.stats.rx_packets, eng.stats.rx_bytes) == (1, len(inner))
    assert eng.stats.peer_last_rx == 1234.5


def test_inbound_from_stranger_is_dropped():
    eng, dev, link = make()
    link.deliver(bytes(VXLAN(flags=8, vni=5) / Ether(frame())), source="192.0.2.99")
    eng.on_link_readable()
    assert dev.written == []
    assert eng.stats.drops == {Drop.UNKNOWN_PEER: 1}
    assert eng.stats.peer_last_rx == 0.0


def test_mixed_garbage_never_raises_and_good_packets_still_flow():
    eng, dev, link = make()
    good = bytes(VXLAN(flags=8, vni=5) / Ether(frame()))
    link.deliver(b"")
    link.deliver(b"\x08")
    link.deliver(good)
    link.deliver(bytes(VXLAN(flags=8, vni=6) / Ether(frame())))
    link.deliver_error(errno.ECONNREFUSED)
    link.deliver(good)
    eng.on_link_readable()
    assert len(dev.written) == 2
    assert eng.stats.drops == {Drop.TRUNCATED: 2, Drop.VNI_MISMATCH: 1, Drop.SOCKET_ERROR: 1}


def test_device_write_failure_is_counted():
    eng, dev, link = make()
    dev.fail_writes = True
    link.deliver(bytes(VXLAN(flags=8, vni=5) / Ether(frame())))
    eng.on_link_readable()
    assert eng.stats.drops == {Drop.DEVICE_WRITE_ERROR: 1}
    assert eng.stats.rx_packets == 0


def test_peer_change_takes_effect_on_next_wakeup():
    eng, dev, link = make()
    pkt = bytes(VXLAN(flags=8, vni=5) / Ether(frame()))
    link.peer = "192.0.2.3"
    link.deliver(pkt, source="192.0.2.3")
    link.deliver(pkt, source=PEER)
    eng.on_link_readable()
    assert len(dev.written) == 1
    assert eng.stats.drops == {Drop.UNKNOWN_PEER: 1}


def test_wakeups_are_histogrammed_by_reads_dropped_frames_included():
    # The same meaning as the offload engine's: how much one wake-up read, whatever became of it.
    eng, dev, link = make(max_frame=200)
    dev.inject(frame(size=300), frame(size=300), frame(size=300))
    eng.on_device_readable()
    assert eng.stats.tx_batches[3] == 1 and eng.stats.drops == {Drop.TOO_BIG: 3}
    eng.on_link_readable()  # nothing to read
    assert eng.stats.rx_batches[0] == 1


class NumberedVxlan(Vxlan):
    """A header-only plugin with an instance attribute named ``session`` (the ipudp example's session number)."""

    def __init__(self, vni: int = 1) -> None:
        super().__init__(vni)
        self.session = 7


def test_a_codec_attribute_named_session_does_not_hide_the_session_method():
    dev, link = FakeDevice(), FakeLink()
    engine = Engine(dev, link, NumberedVxlan(vni=5), max_frame=1472)  # TypeError: 'int' object is not callable
    dev.inject(frame())
    engine.on_device_readable()
    assert len(link.sent) == 1 and engine.peers.all[0].session is not None

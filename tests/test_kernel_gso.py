"""The kernel-segmentation path without root: what the egress device is handed (checked field by field with
scapy and struct, never with the code under test), how the engine counts it, and every way back to the old path."""

from __future__ import annotations

import socket
import struct

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from tests.frames import expected_tcp, payload, tcp_super
from tunneld.encap.base import Drop
from tunneld.encap.gre import Gre
from tunneld.encap.vxlan import Vxlan
from tunneld.datapath.engine import make_engine
from tunneld.io import egress as eg
from tunneld.offload.vnet import F_NEEDS_CSUM, GSO_TCPV4, HDR
from tunneld.datapath.peers import PeerSpec
from tunneld.testing import FakeDevice, FakeGsoLink, FakeVnetDevice

PEER, LOCAL = "192.0.2.2", "192.0.2.1"
VNI = 7
PORTS = [40001, 40002, 40003]
TAP_MAC = bytes.fromhex("02aabbccddee")
GSO = 1398


class FakeEgressDevice(FakeDevice):
    name = "tunneld0-gso"

    def close(self) -> None:
        self.closed = True


def make_egress(ttl=64):
    dev = FakeEgressDevice()
    header = Vxlan(VNI).constant_header(4)
    return eg.EgressTap(dev, mac=TAP_MAC, header=header, source_ports=PORTS, port=4789, local=LOCAL, ttl=ttl), dev


def make_engine_with(egress, peers=None):
    dev, link = FakeVnetDevice(), FakeGsoLink(PEER)
    eng = make_engine(dev, link, Vxlan(VNI), max_frame=1464, offload=True, egress=egress, peers=peers)
    return eng, dev, link


def super_frame(data: bytes) -> bytes:
    return HDR.pack(F_NEEDS_CSUM, GSO_TCPV4, 66, GSO, 34, 16) + tcp_super(data)


def test_what_the_egress_device_is_handed():
    egress, dev = make_egress(ttl=64)
    inner = tcp_super(payload(GSO * 20 + 5))
    assert egress.send(memoryview(inner), GSO_TCPV4, GSO, 34, 16, 66, 4, (PEER, 4789))
    (written,) = dev.written
    (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, _nb, _hash, _report, _pad, outer_th,
     inner_nh) = struct.unpack("<BBHHHHHIHHHH", written[:24])
    outer = 14 + 20 + 8 + 8
    assert flags == 1 | 8  # NEEDS_CSUM | VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM
    assert gso_type == GSO_TCPV4 | 0x20  # VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4
    assert (hdr_len, gso_size, csum_start, csum_offset) == (outer + 66, GSO, outer + 34, 16)
    assert (outer_th, inner_nh) == (34, outer + 14)
    frame = Ether(written[24:])
    assert frame.dst == "02:aa:bb:cc:dd:ee"  # the egress device's own MAC: the kernel takes it as for itself
    ip = frame[IP]
    assert (ip.src, ip.dst, ip.ttl, ip.proto, ip.flags.DF) == (LOCAL, PEER, 65, 17, True)  # forwarding takes one
    assert ip.len == len(written) - 24 - 14
    recomputed = IP(bytes(ip)[:20])
    del recomputed.chksum
    assert IP(bytes(recomputed)).chksum == ip.chksum
    udp = frame[UDP]
    assert (udp.sport, udp.dport, udp.len) == (PORTS[4 % 3], 4789, ip.len - 20)
    # CHECKSUM_PARTIAL: the folded pseudo-header sum, which the kernel completes per segment
    pseudo = sum(struct.unpack("!4H", socket.inet_aton(LOCAL) + socket.inet_aton(PEER))) + 17 + udp.len
    while pseudo >> 16:
        pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
    assert udp.chksum == pseudo
    assert frame[VXLAN].vni == VNI and frame[VXLAN].flags == 0x08
    assert written[24 + outer :] == inner


def test_the_engine_hands_a_super_frame_whole_and_counts_its_datagrams():
    egress, edev = make_egress()
    eng, dev, link = make_engine_with(egress)
    data = payload(GSO * 30 + 11)
    dev.inject(super_frame(data))
    eng.on_device_readable()
    assert link.sent == [] and len(edev.written) == 1  # nothing cut here
    assert edev.written[0][24 + 50 :] == tcp_super(data)
    want = expected_tcp(data, GSO)  # what the old path counts for the same frame
    assert (eng.stats.tx_packets, eng.stats.tx_bytes) == (len(want), sum(len(w) - 8 for w in want))
    assert eng.stats.kernel_gso_frames == 1 and egress.frames == 1


def test_packets_waiting_leave_before_the_super_frame():
    egress, edev = make_egress()
    eng, dev, link = make_engine_with(egress)
    order = []
    link.send_segments = lambda packets, size, flow, dest=None: order.append(("link", len(packets)))
    edev.writev = lambda buffers: order.append(("egress", sum(len(memoryview(b)) for b in buffers)))
    plain = tcp_super(b"x" * 100)  # a plain frame of the flow: it waits in Pending for others
    data = payload(GSO * 3)
    dev.inject(HDR.pack(0, 0, 0, 0, 0, 0) + plain, super_frame(data))
    eng.on_device_readable()
    assert order == [("link", 8 + len(plain)), ("egress", 24 + 50 + len(tcp_super(data)))]
    assert eng.stats.tx_packets == 1 + 3


class Refusing:
    def __init__(self) -> None:
        self.calls = 0

    def send(self, *args) -> bool:
        self.calls += 1
        return False


def test_a_super_frame_the_egress_refuses_is_cut_as_before():
    refusing = Refusing()
    eng, dev, link = make_engine_with(refusing)
    data = payload(GSO * 30 + 11)
    dev.inject(super_frame(data))
    eng.on_device_readable()
    assert refusing.calls == 1
    assert [p for p, _ in link.sent] == expected_tcp(data, GSO)
    assert eng.stats.kernel_gso_frames == 0 and eng.stats.tx_packets == 31


def test_a_flooded_super_frame_takes_the_old_path_to_every_peer():
    egress, edev = make_egress()
    eng, dev, link = make_engine_with(egress, peers=[PeerSpec(PEER), PeerSpec("192.0.2.3")])
    dev.inject(super_frame(payload(GSO * 3)))  # its destination MAC is in no FDB: flooded
    eng.on_device_readable()
    assert edev.written == []
    assert sorted(set(link.sent_to)) == [PEER, "192.0.2.3"] and len(link.sent) == 6


def test_segments_beyond_the_underlay_are_not_handed_over():
    egress, edev = make_egress()
    dev, link = FakeVnetDevice(), FakeGsoLink(PEER)
    eng = make_engine(dev, link, Vxlan(VNI), max_frame=1000, offload=True, egress=egress)
    dev.inject(super_frame(payload(GSO * 3)))
    eng.on_device_readable()
    assert edev.written == [] and eng.stats.drops[Drop.TOO_BIG] == 3  # the old path's verdict


def test_an_outer_packet_beyond_the_ipv4_length_field_is_refused():
    egress, dev = make_egress()
    inner = tcp_super(payload(65535 - 20 - 32 - 8))
    assert not egress.send(memoryview(inner), GSO_TCPV4, GSO, 34, 16, 66, 0, (PEER, 4789))
    assert dev.written == []


def test_the_kernel_refusing_a_write_is_a_refusal_not_an_error():
    egress, dev = make_egress()
    dev.writev = lambda buffers: (_ for _ in ()).throw(OSError(22, "Invalid argument"))
    assert not egress.send(memoryview(tcp_super(payload(5000))), GSO_TCPV4, GSO, 34, 16, 66, 0, (PEER, 4789))
    assert egress.frames == 0


class Link:
    def __init__(self, family=socket.AF_INET) -> None:
        self.family, self.port, self.local = family, 4789, None

    def source_ports(self):
        return PORTS


def test_choose_says_why_it_keeps_the_old_path(monkeypatch):
    opened = []
    monkeypatch.setattr(eg, "open_egress", lambda *a, **k: opened.append(1) or "EGRESS")
    kw = dict(dev="t0", link=Link(), underlay_dev=None, offload=True)
    assert eg.choose("off", codec=Vxlan(1), **kw) == (None, "off (--kernel-gso off)")
    assert eg.choose("auto", codec=Vxlan(1), **{**kw, "offload": False}) == (None, "off (offloads are off)")
    egress, why = eg.choose("auto", codec=Gre(), **kw)
    assert egress is None and "has no constant header over UDP" in why
    assert opened == []
    with pytest.raises(eg.Unsupported, match="offloads are off"):
        eg.choose("on", codec=Vxlan(1), **{**kw, "offload": False})
    monkeypatch.setattr(eg, "underlay_hazard", lambda dev: "underlay device v0 passes super-packets")
    assert eg.choose("auto", codec=Vxlan(1), **kw) == (None, "off (underlay device v0 passes super-packets)")
    assert opened == []
    # on: the operator's word against the guess
    monkeypatch.setattr(eg, "open_egress", lambda *a, **k: opened.append(1) or type("E", (), {"name": "t0-gso", "ttl": 65})())
    egress, why = eg.choose("on", codec=Vxlan(1), **kw)
    assert opened == [1] and why.endswith("although the underlay device v0 passes super-packets")


def test_the_kernel_refusing_the_flags_falls_back(monkeypatch):
    def refuse(*a, **k):
        raise eg.Unsupported("the kernel refuses GSO over UDP tunnels on a TAP (Linux 6.17+): Invalid argument")

    monkeypatch.setattr(eg, "open_egress", refuse)
    monkeypatch.setattr(eg, "underlay_hazard", lambda dev: None)  # an underlay that behaves like a wire
    egress, why = eg.choose("auto", codec=Vxlan(1), dev="t0", link=Link(), underlay_dev="v0", offload=True)
    assert egress is None and why.startswith("off (the kernel refuses GSO over UDP tunnels")
    with pytest.raises(eg.Unsupported):
        eg.choose("on", codec=Vxlan(1), dev="t0", link=Link(), underlay_dev=None, offload=True)


def test_ipv6_underlay_is_not_handled_yet(monkeypatch):
    with pytest.raises(eg.Unsupported, match="IPv6 underlay"):
        eg.open_egress("t0", header=b"", link=Link(socket.AF_INET6))
    # said before any guess about the underlay device is made
    monkeypatch.setattr(eg, "underlay_hazard", lambda dev: "not asked")
    egress, why = eg.choose("auto", codec=Vxlan(1), dev="t0", link=Link(socket.AF_INET6), underlay_dev="v0",
                            offload=True)
    assert egress is None and why == "off (IPv6 underlay: not handled by the kernel path yet)"


def test_egress_names_fit_an_interface_name():
    assert eg.egress_name("tunneld0") == "tunneld0-gso"
    assert eg.egress_name("a-very-long-nam") == "a-very-long-gso"
    assert len(eg.egress_name("x" * 15)) == 15


def test_with_df_unset_the_outer_packets_may_be_fragmented_as_the_sockets_are():
    dev = FakeEgressDevice()
    egress = eg.EgressTap(dev, mac=TAP_MAC, header=Vxlan(VNI).constant_header(4), source_ports=PORTS, port=4789,
                          local=LOCAL, df=False)
    assert egress.send(memoryview(tcp_super(payload(GSO * 4))), GSO_TCPV4, GSO, 34, 16, 66, 0, (PEER, 4789))
    assert not Ether(dev.written[0][24:])[IP].flags.DF


def test_a_path_mtu_the_kernel_learnt_sends_super_frames_back_to_the_old_path_and_their_sender_is_told():
    # Forwarding does not heed a cached path MTU and a write into the egress never fails for it: the engine
    # asks the kernel (the link's path_mtu) now and then while super-frames flow, and keeps to what it says.
    egress, edev = make_egress()
    dev, link = FakeVnetDevice(), FakeGsoLink(PEER)
    asked = []
    link.path_mtu = lambda address: asked.append(address) or 1400  # a router said 1400 towards the peer
    eng = make_engine(dev, link, Vxlan(VNI), max_frame=1464, offload=True, egress=egress)
    eng._clock = lambda: 1000.0  # a stopped clock, as tests/test_pmtu_engine.py sets it
    data = payload(GSO * 3)
    dev.inject(super_frame(data))
    eng.on_device_readable()
    assert asked == [PEER]  # asked once, not per frame
    assert edev.written == [] and eng.stats.kernel_gso_frames == 0
    assert eng.stats.drops[Drop.TOO_BIG] == 3 and eng.stats.pmtu_changes == 1
    assert sum(eng.stats.icmp_sent) == 1  # the inner sender learns 1400 - 50 - 14
    dev.inject(super_frame(data))
    eng.on_device_readable()
    assert asked == [PEER]  # within PMTU_RECHECK: the learnt limit holds without asking again


def test_with_no_underlay_device_to_look_at_auto_keeps_the_old_path(monkeypatch):
    # A registry's daemon starts with no peer, so no route names the underlay device: over a veth the kernel
    # path would hand the far end whole super-packets, so auto must not guess (the registry test caught it).
    opened = []
    monkeypatch.setattr(eg, "open_egress", lambda *a, **k: opened.append(1) or "EGRESS")
    egress, why = eg.choose("auto", codec=Vxlan(1), dev="t0", link=Link(), underlay_dev=None, offload=True)
    assert egress is None and opened == [] and "underlay device is not known" in why

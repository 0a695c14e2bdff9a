"""Path MTU in the engine, over fakes: a send that fails for a smaller path teaches the peer its limit, the
inner sender gets ICMP with what the tunnel carries (as scapy reads it), later frames above the limit are
answered without a send, a limit that grew back is noticed, the ICMP budget holds, super-frames and several
peers alike; and the kernel's drop count becomes ``kernel_rcvbuf``."""

from __future__ import annotations

import errno

from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Ether

from tests.frames import MACS, payload, tcp_super
from tunneld.encap.base import Drop
from tunneld.encap.gre import Gre
from tunneld.encap.vxlan import Vxlan
from tunneld.datapath.engine import PMTU_RECHECK, make_engine
from tunneld.offload.vnet import F_NEEDS_CSUM, GSO_TCPV4, HDR
from tunneld.datapath.peers import PeerSpec
from tunneld.datapath.pmtu import ICMP_BURST, Icmp
from tunneld.datapath.stats import ICMP_KINDS
from tunneld.testing import FakeDevice, FakeGsoLink, FakeLink, FakeVnetDevice

PEER, OTHER = "192.0.2.2", "192.0.2.3"
UDP_IP = 28  # what the underlay adds in front of a VXLAN packet: outer IPv4 and UDP


class PathLink(FakeGsoLink):
    """The kernel's view of the paths: a send above the path MTU towards its destination fails (EMSGSIZE; EINVAL
    for a UDP_SEGMENT send), and ``path_mtu`` answers what a connected socket's IP_MTU would."""

    def __init__(self, peer: str = PEER, outer: int = UDP_IP) -> None:
        super().__init__(peer)
        self.outer = outer
        self.mtus: dict[str, int] = {}
        self.asked = 0

    def path_mtu(self, address: str) -> int:
        self.asked += 1
        return self.mtus.get(address, 1500)

    def _fits(self, size: int, dest) -> bool:
        return size + self.outer <= self.mtus.get(dest or self.peer, 1500)

    def send(self, packet, flow, dest=None):
        if not self._fits(len(packet), dest):
            raise OSError(errno.EMSGSIZE, "Message too long")
        super().send(packet, flow, dest)

    def send_segments(self, packets, size, flow, dest=None):
        if not self._fits(size, dest):
            error = OSError(errno.EINVAL, "Invalid argument")
            error.sent = 0
            raise error
        super().send_segments(packets, size, flow, dest)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tcp_frame(size: int, v6: bool = False) -> bytes:
    ip = IPv6(src="fd00::1", dst="fd00::2") if v6 else IP(src="10.1.0.1", dst="10.1.0.2", flags="DF")
    pkt = Ether(**MACS) / ip / TCP(sport=40000, dport=5201, flags="A")
    return bytes(pkt / payload(size - len(pkt)))


def vxlan(peers=None, offload=False):
    clock = Clock()
    dev, link = (FakeVnetDevice() if offload else FakeDevice()), PathLink()
    eng = make_engine(dev, link, Vxlan(7), max_frame=1464, offload=offload, peers=peers)
    eng._clock = clock
    return eng, dev, link, clock


def sent_icmp(eng, kind: Icmp) -> int:
    return eng.stats.icmp_sent[ICMP_KINDS.index(kind)]


def test_a_smaller_path_is_learnt_from_the_failed_send_and_the_sender_told_what_fits():
    eng, dev, link, clock = vxlan()
    link.mtus[PEER] = 1400
    dev.inject(tcp_frame(1464))
    eng.on_device_readable()
    peer = eng.peers.get(PEER)
    assert (peer.pmtu, peer.max_frame, eng.segment_limit(peer)) == (1400, 1364, 1364)
    assert eng.stats.drops == {Drop.TOO_BIG: 1} and eng.stats.pmtu_changes == 1
    (reply,) = dev.written
    eth = Ether(reply)
    assert (eth.dst, eth.src) == (MACS["src"], MACS["dst"])
    assert (eth[IP].src, eth[IP].dst) == ("10.1.0.2", "10.1.0.1")
    assert (eth[ICMP].type, eth[ICMP].code, eth[ICMP].nexthopmtu) == (3, 4, 1350)  # 1400 - 50, as the kernel's
    assert sent_icmp(eng, Icmp.FRAG_NEEDED) == 1

    # Now known: a frame above it is answered without a send or a question; one that fits leaves.
    dev.inject(tcp_frame(1464), tcp_frame(1364))
    eng.on_device_readable()
    assert link.asked == 1 and len(link.sent) == 1 and len(link.sent[0][0]) == 1364 + 8
    assert eng.stats.drops[Drop.TOO_BIG] == 2 and sent_icmp(eng, Icmp.FRAG_NEEDED) == 2


def test_a_path_that_grew_back_is_noticed_by_the_next_frame_above_the_limit():
    eng, dev, link, clock = vxlan()
    link.mtus[PEER] = 1400
    dev.inject(tcp_frame(1464))
    eng.on_device_readable()
    link.mtus[PEER] = 1500  # the kernel's learnt MTU expired
    clock.now += PMTU_RECHECK / 2
    dev.inject(tcp_frame(1464))
    eng.on_device_readable()
    assert link.asked == 1 and len(dev.written) == 2  # not asked again so soon: still answered
    clock.now += PMTU_RECHECK
    dev.inject(tcp_frame(1464))
    eng.on_device_readable()
    assert link.asked == 2 and eng.peers.get(PEER).max_frame == 1464
    assert len(dev.written) == 2  # the path carries it again: no ICMP, the next one leaves
    dev.inject(tcp_frame(1464))
    eng.on_device_readable()
    assert len(link.sent) == 1 and eng.stats.drops[Drop.TOO_BIG] == 3


def test_icmp_is_rate_limited_and_the_rest_counted():
    eng, dev, link, clock = vxlan()
    link.mtus[PEER] = 1400
    for _ in range(4):
        dev.inject(*[tcp_frame(1464)] * 30)
        eng.on_device_readable()
    assert sent_icmp(eng, Icmp.FRAG_NEEDED) == ICMP_BURST and len(dev.written) == ICMP_BURST
    assert eng.stats.icmp_limited == 120 - ICMP_BURST and eng.stats.drops[Drop.TOO_BIG] == 120
    clock.now += 0.0105  # 10.5 ms at the kernel's 1000/s: 10 more
    dev.inject(*[tcp_frame(1464)] * 30)
    eng.on_device_readable()
    assert sent_icmp(eng, Icmp.FRAG_NEEDED) == ICMP_BURST + 10


def test_ipv6_inner_packets_get_packet_too_big():
    eng, dev, link, clock = vxlan()
    link.mtus[PEER] = 1450
    dev.inject(tcp_frame(1464, v6=True))
    eng.on_device_readable()
    ptb = Ether(dev.written[0])[ICMPv6PacketTooBig]
    assert ptb.mtu == 1400 and sent_icmp(eng, Icmp.PACKET_TOO_BIG) == 1


def test_gre_tun_writes_back_an_ip_packet():
    dev, link = FakeDevice(), PathLink(outer=20)
    link.spreads_flows = False
    eng = make_engine(dev, link, Gre(), max_frame=1476, offload=False)
    link.mtus[PEER] = 1400
    dev.inject(bytes(IP(src="10.1.0.1", dst="10.1.0.2", flags="DF") / TCP() / payload(1400)))
    eng.on_device_readable()
    ip = IP(dev.written[0])
    assert (ip.dst, ip[ICMP].type, ip[ICMP].code, ip[ICMP].nexthopmtu) == ("10.1.0.1", 3, 4, 1400 - 24)


def test_superframes_are_cut_to_the_peer_limit_or_answered():
    eng, dev, link, clock = vxlan(offload=True)
    link.mtus[PEER] = 1400
    superframe = HDR.pack(F_NEEDS_CSUM, GSO_TCPV4, 66, 1398, 34, 16) + tcp_super(payload(1398 * 10))
    dev.inject(superframe)
    eng.on_device_readable()
    assert eng.stats.drops == {Drop.TOO_BIG: 10} and not link.sent
    assert eng.segment_limit(eng.peers.get(PEER)) == 1364
    vnet, reply = dev.written[0][:10], dev.written[0][10:]
    assert Ether(reply)[ICMP].nexthopmtu == 1350 and Ether(reply)[IP].dst == "10.1.0.1"
    # Known now: compared before any send; a super-frame cut to what fits leaves.
    dev.inject(superframe, HDR.pack(F_NEEDS_CSUM, GSO_TCPV4, 66, 1298, 34, 16) + tcp_super(payload(1298 * 10)))
    eng.on_device_readable()
    assert eng.stats.drops == {Drop.TOO_BIG: 20} and len(link.sent) == 10 and link.asked == 1


def test_each_peer_keeps_its_own_path():
    specs = [PeerSpec(PEER, macs=("02:00:00:00:00:02",)), PeerSpec(OTHER, macs=("02:00:00:00:00:03",))]
    eng, dev, link, clock = vxlan(peers=specs)
    link.mtus[OTHER] = 1400
    to_other = Ether(src=MACS["src"], dst="02:00:00:00:00:03") / IP(tcp_frame(1464)[14:])
    dev.inject(tcp_frame(1464), bytes(to_other))
    eng.on_device_readable()
    assert link.sent_to == [PEER]
    assert eng.peers.get(OTHER).max_frame == 1364 and eng.peers.get(PEER).max_frame > 1464
    assert eng.peers.get(OTHER).stats.dropped == 1 and eng.stats.drops == {Drop.TOO_BIG: 1}
    # A flooded frame reaches the peers it fits, and answers for the one it does not.
    flood = Ether(src=MACS["src"], dst="ff:ff:ff:ff:ff:ff") / IP(tcp_frame(1464)[14:])
    dev.inject(bytes(flood))
    eng.on_device_readable()
    assert link.sent_to == [PEER, PEER] and eng.stats.drops == {Drop.TOO_BIG: 2}
    assert sent_icmp(eng, Icmp.FRAG_NEEDED) == 2


def test_no_icmp_without_df_the_frame_still_counted():
    eng, dev, link, clock = vxlan()
    link.mtus[PEER] = 1400
    pkt = Ether(**MACS) / IP(src="10.1.0.1", dst="10.1.0.2") / TCP()
    dev.inject(bytes(pkt / payload(1464 - len(pkt))))
    eng.on_device_readable()
    assert eng.stats.drops == {Drop.TOO_BIG: 1} and not dev.written and eng.peers.get(PEER).pmtu == 1400
    # Frames that may get no answer do not spend the budget of those that may.
    dev.inject(*[bytes(pkt / payload(1464 - len(pkt)))] * (ICMP_BURST + 10), tcp_frame(1464))
    while dev.pending:
        eng.on_device_readable()
    assert len(dev.written) == 1 and eng.stats.icmp_limited == 0


class CountingLink(FakeLink):
    """A link whose socket reports the kernel's running drop count, as SO_RXQ_OVFL does."""

    kernel_drops = 0


def test_the_kernels_drops_are_counted_once_per_increment():
    dev, link = FakeDevice(), CountingLink(PEER)
    eng = make_engine(dev, link, Vxlan(7), max_frame=1464, offload=False)
    eng.on_link_readable()
    assert Drop.KERNEL_RCVBUF not in eng.stats.drops
    link.kernel_drops = 25
    eng.on_link_readable()
    eng.on_link_readable()
    assert eng.stats.drops[Drop.KERNEL_RCVBUF] == 25
    link.kernel_drops = 40
    eng.on_link_readable()
    assert eng.stats.drops[Drop.KERNEL_RCVBUF] == 40


def test_no_route_is_answered_with_destination_unreachable():
    dev, link = FakeDevice(), PathLink(outer=20)
    link.spreads_flows = False
    peers = [PeerSpec(PEER, routes=("10.2.0.0/16",)), PeerSpec(OTHER, routes=("10.3.0.0/16",))]
    eng = make_engine(dev, link, Gre(), max_frame=1476, offload=False, peers=peers)
    dev.inject(bytes(IP(src="10.1.0.1", dst="10.9.0.1") / TCP() / b"x"), bytes(IP(src="10.1.0.1", dst="10.2.0.1") / TCP()))
    eng.on_device_readable()
    assert eng.stats.drops == {Drop.NO_ROUTE: 1} and link.sent_to == [PEER]
    ip = IP(dev.written[0])
    assert (ip.src, ip.dst, ip[ICMP].type, ip[ICMP].code) == ("10.9.0.1", "10.1.0.1", 3, 0)
    assert sent_icmp(eng, Icmp.UNREACHABLE) == 1

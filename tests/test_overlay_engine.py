"""The engine with several peers, over fakes: the FDB and flooding (L2), longest-prefix match and the inbound
source check (L3), super-frames and GRO reads to and from one peer among several."""

from __future__ import annotations

import pytest

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import GRE, Ether
from scapy.layers.vxlan import VXLAN

from tests.frames import expected_tcp, payload, tcp_super
from tunneld.encap.base import Drop
from tunneld.encap.gre import Gre
from tunneld.encap.vxlan import Vxlan
from tunneld.datapath.engine import Engine, make_engine
from tunneld.offload.vnet import F_NEEDS_CSUM, GSO_TCPV4, HDR, NO_OFFLOAD
from tunneld.datapath.peers import PeerSpec
from tunneld.testing import FakeDevice, FakeGsoLink, FakeLink, FakeVnetDevice

A, B, C = "192.0.2.2", "192.0.2.3", "192.0.2.4"
VNI = 7
HOST_B = "02:00:00:00:00:0b"  # a host behind peer B
LOCAL = "02:00:00:00:00:01"


def vxlan_engine(peers=(A, B, C), **kw):
    dev, link = FakeDevice(), FakeLink(A)
    eng = Engine(dev, link, Vxlan(VNI), max_frame=1450, peers=[PeerSpec(p) for p in peers], clock=lambda: 100.0,
                 **kw)
    return eng, dev, link


def ether(src: str, dst: str, size: int = 100) -> bytes:
    f = Ether(src=src, dst=dst) / IP(src="10.1.0.1", dst="10.1.0.2") / UDP(sport=1, dport=2)
    return bytes(f / (b"x" * (size - len(f))))


def from_peer(link: FakeLink, source: str, frame: bytes) -> None:
    link.deliver(bytes(VXLAN(flags=8, vni=VNI) / Ether(frame)), source)


def test_broadcast_and_unknown_unicast_go_to_every_peer():
    eng, dev, link = vxlan_engine()
    dev.inject(ether(LOCAL, "ff:ff:ff:ff:ff:ff"), ether(LOCAL, "02:00:00:00:00:99"))
    eng.on_device_readable()
    assert link.sent_to == [A, B, C, A, B, C]
    assert eng.stats.flooded == 2 and eng.stats.tx_packets == 6
    assert all(eng.stats.peers[p].tx_packets == 2 for p in (A, B, C))


def test_unicast_to_a_learnt_mac_goes_to_its_peer_alone():
    eng, dev, link = vxlan_engine()
    from_peer(link, B, ether(HOST_B, LOCAL))
    eng.on_link_readable()
    assert len(dev.written) == 1 and eng.stats.fdb_learnt == 1
    assert eng.stats.peers[B].rx_packets == 1 and eng.stats.peers[B].last_rx == 100.0
    dev.inject(ether(LOCAL, HOST_B), ether(LOCAL, HOST_B))
    eng.on_device_readable()
    assert link.sent_to == [B, B] and eng.stats.flooded == 0
    assert (eng.stats.peers[A].tx_packets, eng.stats.peers[B].tx_packets) == (0, 2)


def test_a_mac_that_moves_follows_its_new_peer():
    eng, dev, link = vxlan_engine()
    from_peer(link, B, ether(HOST_B, LOCAL))
    from_peer(link, C, ether(HOST_B, LOCAL))
    eng.on_link_readable()
    dev.inject(ether(LOCAL, HOST_B))
    eng.on_device_readable()
    assert link.sent_to == [C] and eng.stats.fdb_moved == 1


def test_static_macs_are_used_and_not_moved_by_learning():
    dev, link = FakeDevice(), FakeLink(A)
    eng = Engine(dev, link, Vxlan(VNI), max_frame=1450, peers=[PeerSpec(A), PeerSpec(B, macs=(HOST_B,))])
    from_peer(link, A, ether(HOST_B, LOCAL))  # a forged source from another peer
    eng.on_link_readable()
    dev.inject(ether(LOCAL, HOST_B))
    eng.on_device_readable()
    assert link.sent_to == [B] and eng.stats.fdb_moved == 0


def test_datagrams_from_strangers_are_unknown_peer():
    eng, dev, link = vxlan_engine()
    from_peer(link, "192.0.2.99", ether(HOST_B, LOCAL))
    eng.on_link_readable()
    assert dev.written == [] and eng.stats.drops[Drop.UNKNOWN_PEER] == 1 and len(eng.peers.fdb) == 0


def test_a_full_fdb_refuses_new_macs_and_their_frames_flood():
    eng, dev, link = vxlan_engine(fdb_max=1)
    from_peer(link, B, ether(HOST_B, LOCAL))
    from_peer(link, C, ether("02:00:00:00:00:0c", LOCAL))
    eng.on_link_readable()
    assert len(dev.written) == 2 and eng.stats.fdb_refused == 1
    dev.inject(ether(LOCAL, "02:00:00:00:00:0c"))
    eng.on_device_readable()
    assert link.sent_to == [A, B, C]


def test_with_one_peer_the_fdb_learns_and_everything_goes_to_it():
    eng, dev, link = vxlan_engine(peers=(A,))
    assert eng.peers.only is not None
    from_peer(link, A, ether(HOST_B, LOCAL))
    eng.on_link_readable()
    dev.inject(ether(LOCAL, "ff:ff:ff:ff:ff:ff"), ether(LOCAL, HOST_B))
    eng.on_device_readable()
    assert link.sent_to == [A, A] and eng.stats.fdb_learnt == 1 and eng.stats.flooded == 0
    assert eng.stats.peers[A].tx_packets == 2 and eng.stats.peers[A].rx_packets == 1


# -- L3 (GRE): routes ----------------------------------------------------------------------------------------

HUB_ROUTES = {A: ("10.2.0.0/16",), B: ("10.3.0.0/16", "fd03::/64"), C: ("10.4.0.0/16",)}


def gre_engine(**kw):
    dev, link = FakeDevice(), FakeLink(A)
    link.spreads_flows = False
    eng = Engine(dev, link, Gre(), max_frame=1476,
                 peers=[PeerSpec(p, routes=r) for p, r in HUB_ROUTES.items()], **kw)
    return eng, dev, link


def ip(src: str, dst: str) -> bytes:
    return bytes(IP(src=src, dst=dst) / UDP(sport=1, dport=2) / b"hello")


def test_outbound_by_longest_prefix_and_no_route():
    eng, dev, link = gre_engine()
    dev.inject(ip("10.1.0.1", "10.3.0.5"), ip("10.1.0.1", "10.4.9.9"), ip("10.1.0.1", "10.9.0.1"))
    eng.on_device_readable()
    assert link.sent_to == [B, C]
    assert eng.stats.drops[Drop.NO_ROUTE] == 1 and eng.stats.tx_packets == 2


def test_a_spoke_forging_another_spokes_source_is_dropped():
    eng, dev, link = gre_engine()
    link.deliver(bytes(GRE(proto=0x0800)) + ip("10.3.0.5", "10.1.0.1"), B)  # its own: accepted
    link.deliver(bytes(GRE(proto=0x0800)) + ip("10.4.0.5", "10.1.0.1"), B)  # C's: forged
    eng.on_link_readable()
    assert dev.written == [ip("10.3.0.5", "10.1.0.1")]
    assert eng.stats.drops[Drop.SOURCE_NOT_ALLOWED] == 1 and eng.stats.peers[B].dropped == 1


def test_one_gre_peer_without_routes_carries_everything():
    dev, link = FakeDevice(), FakeLink(A)
    eng = Engine(dev, link, Gre(), max_frame=1476)  # the link's peer, routes 0.0.0.0/0 and ::/0
    assert eng.peers.only is not None and eng.peers.routes_of(eng.peers.only) == ["0.0.0.0/0", "::/0"]
    link.deliver(bytes(GRE(proto=0x0800)) + ip("172.16.0.1", "10.1.0.1"), A)
    eng.on_link_readable()
    dev.inject(ip("10.1.0.1", "8.8.8.8"))
    eng.on_device_readable()
    assert len(dev.written) == 1 and link.sent_to == [A]


# -- offloads: super-frames and GRO reads among several peers -----------------------------------------------

def offload_engine():
    dev, link = FakeVnetDevice(), FakeGsoLink(A)
    eng = make_engine(dev, link, Vxlan(VNI), max_frame=1464, offload=True, peers=[PeerSpec(p) for p in (A, B, C)])
    return eng, dev, link


def test_a_superframe_goes_to_its_one_peer_or_floods():
    eng, dev, link = offload_engine()
    data = payload(1398 * 10)
    superframe = HDR.pack(F_NEEDS_CSUM, GSO_TCPV4, 66, 1398, 34, 16) + tcp_super(data)
    dev.inject(superframe)  # its destination MAC (tests.frames) is not learnt yet: every peer gets the rows
    eng.on_device_readable()
    want = expected_tcp(data, 1398)
    assert link.sent_to == [A] * len(want) + [B] * len(want) + [C] * len(want)
    assert eng.stats.flooded == len(want)  # frames on the wire, each flooded, as the plain path counts them
    assert [p for p, _ in link.sent] == want * 3
    link.sent.clear(), link.sent_to.clear()
    from_peer(link, C, ether("02:00:00:00:00:02", LOCAL))  # tests.frames' destination lives behind C
    eng.on_link_readable()
    dev.inject(superframe)
    eng.on_device_readable()
    assert link.sent_to == [C] * len(want) and [p for p, _ in link.sent] == want


def test_pending_packets_for_different_peers_leave_in_different_sends():
    eng, dev, link = offload_engine()
    from_peer(link, B, ether(HOST_B, LOCAL))
    from_peer(link, C, ether("02:00:00:00:00:0c", LOCAL))
    eng.on_link_readable()
    sends = link.sends
    frames = [ether(LOCAL, HOST_B), ether(LOCAL, HOST_B), ether(LOCAL, "02:00:00:00:00:0c")]
    dev.inject(*[NO_OFFLOAD + f for f in frames])
    eng.on_device_readable()
    assert link.sent_to == [B, B, C] and link.sends - sends == 2


def test_rows_of_one_gro_read_learn_their_source_once():
    eng, dev, link = offload_engine()
    frames = [ether(HOST_B, LOCAL, size=600) for _ in range(4)]
    link.deliver_gro([bytes(VXLAN(flags=8, vni=VNI) / Ether(f)) for f in frames], B)
    eng.on_link_readable()
    assert eng.peers.fdb.lookup(bytes.fromhex(HOST_B.replace(":", ""))).address == B
    assert eng.stats.peers[B].rx_packets == 4 and eng.stats.fdb_learnt == 1


def test_rows_of_one_gro_read_with_several_sources_learn_each():
    eng, dev, link = offload_engine()
    macs = ["02:00:00:00:00:0b", "02:00:00:00:00:0c", "02:00:00:00:00:0d"]
    link.deliver_gro([bytes(VXLAN(flags=8, vni=VNI) / Ether(ether(m, LOCAL, size=600))) for m in macs], C)
    eng.on_link_readable()
    assert [eng.peers.fdb.lookup(bytes.fromhex(m.replace(":", ""))).address for m in macs] == [C, C, C]


def test_rows_from_a_stranger_are_unknown_peer_and_teach_nothing():
    eng, dev, link = offload_engine()
    link.deliver_gro([bytes(VXLAN(flags=8, vni=VNI) / Ether(ether(HOST_B, LOCAL, size=600)))] * 3, "192.0.2.99")
    eng.on_link_readable()
    assert eng.stats.drops[Drop.UNKNOWN_PEER] == 3 and len(eng.peers.fdb) == 0 and dev.written == []


# -- metrics ---------------------------------------------------------------------------------------------------

def scrape(eng) -> dict:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from tunneld.observe.metrics import TunnelCollector

    registry = CollectorRegistry()
    registry.register(TunnelCollector(eng, dev="td0", mtu=1450, vni=VNI))
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}, text


def test_metrics_have_a_series_per_peer_and_the_fdb_counters():
    eng, dev, link = vxlan_engine()
    from_peer(link, B, ether(HOST_B, LOCAL))
    eng.on_link_readable()
    dev.inject(ether(LOCAL, "ff:ff:ff:ff:ff:ff"), ether(LOCAL, HOST_B))
    eng.on_device_readable()
    got, text = scrape(eng)
    tx = {dict(lbl)["peer"]: v for (name, lbl), v in got.items() if name == "tunneld_tx_packets_total"}
    assert tx == {A: 1, B: 2, C: 1}
    assert got[("tunneld_rx_packets_total", (("mode", "vxlan"), ("peer", B)))] == 1
    assert got[("tunneld_fdb_entries", (("mode", "vxlan"),))] == 1
    assert got[("tunneld_fdb_learnt_total", (("mode", "vxlan"),))] == 1
    assert got[("tunneld_flooded_packets_total", (("mode", "vxlan"),))] == 1
    assert got[("tunneld_fdb_refused_total", (("mode", "vxlan"),))] == 0
    assert got[("tunneld_fdb_moved_total", (("mode", "vxlan"),))] == 0
    help_line = next(line for line in text.splitlines() if line.startswith("# HELP tunneld_dropped_packets_total"))
    assert all(reason.value in help_line for reason in Drop)  # derived from the one declaration


def test_with_one_peer_the_series_keep_their_labels():
    eng, dev, link = vxlan_engine(peers=(A,))
    dev.inject(ether(LOCAL, HOST_B))
    eng.on_device_readable()
    got, _ = scrape(eng)
    assert got[("tunneld_tx_packets_total", (("mode", "vxlan"), ("peer", A)))] == 1
    assert got[("tunneld_dropped_packets_total", (("mode", "vxlan"), ("peer", A), ("reason", "no_route")))] == 0


def test_a_send_that_fails_is_not_counted_as_sent_to_its_peer():
    import errno

    eng, dev, link = vxlan_engine()
    from_peer(link, B, ether(HOST_B, LOCAL))
    eng.on_link_readable()
    link.send_error = errno.ENOBUFS
    dev.inject(ether(LOCAL, HOST_B))
    eng.on_device_readable()
    assert eng.stats.drops[Drop.SOCKET_ERROR] == 1 and eng.stats.tx_packets == 0
    assert (eng.stats.peers[B].tx_packets, eng.stats.peers[B].tx_bytes, eng.stats.peers[B].dropped) == (0, 0, 1)


@pytest.mark.parametrize("middle_was", [None, B])
def test_a_gro_read_whose_first_and_last_rows_agree_still_learns_a_different_source_between_them(middle_was):
    """Before: first and last rows with one source MAC were taken for the whole read: a MAC between them was not
    learnt, and one that had moved here from another peer kept pointing at the old peer (a wrong entry)."""
    eng, dev, link = offload_engine()
    other = "02:00:00:00:00:0e"
    if middle_was:
        from_peer(link, middle_was, ether(other, LOCAL))
        eng.on_link_readable()
    macs = [HOST_B, HOST_B, other, HOST_B]
    link.deliver_gro([bytes(VXLAN(flags=8, vni=VNI) / Ether(ether(m, LOCAL, size=600))) for m in macs], C)
    eng.on_link_readable()
    assert eng.peers.fdb.lookup(bytes.fromhex(other.replace(":", ""))).address == C
    assert eng.peers.fdb.lookup(bytes.fromhex(HOST_B.replace(":", ""))).address == C
    assert eng.stats.fdb_moved == (1 if middle_was else 0)


def merged_reports(eng) -> list[bool]:
    """What each ``write_rows`` call of the engine's port answered as ``merged``, in order."""
    seen = []
    write_rows = eng.port.write_rows

    def spy(*args):
        result = write_rows(*args)
        seen.append(result[2])
        return result

    eng.port.write_rows = spy
    return seen


def test_a_gro_read_written_as_one_superframe_learns_its_one_source():
    """The coalescer merged every row (their Ethernet headers equal the first's), so the source is learnt from the
    first row without a look at the others; rows it could not merge (the test above) are each looked at."""
    eng, dev, link = offload_engine()
    merged = merged_reports(eng)
    rows = expected_tcp(payload(1398 * 6), 1398, flags="A")  # one flow, from tests.frames' MACS["src"]
    link.deliver_gro(rows, C)
    eng.on_link_readable()
    assert len(dev.written) == 1 and HDR.unpack_from(dev.written[0])[1] == GSO_TCPV4
    assert merged == [True]
    assert eng.peers.fdb.lookup(bytes.fromhex("020000000001")).address == C
    assert eng.stats.fdb_learnt == 1 and eng.stats.peers[C].rx_packets == 6


def test_after_rows_that_were_not_merged_the_port_says_so():
    eng, dev, link = offload_engine()
    merged = merged_reports(eng)
    link.deliver_gro(expected_tcp(payload(1398 * 3), 1398, flags="A"), C)
    eng.on_link_readable()
    assert merged == [True]
    macs = [HOST_B, HOST_B, "02:00:00:00:00:0e", HOST_B]
    link.deliver_gro([bytes(VXLAN(flags=8, vni=VNI) / Ether(ether(m, LOCAL, size=600))) for m in macs], C)
    eng.on_link_readable()
    assert merged == [True, False]
    assert eng.peers.fdb.lookup(bytes.fromhex("02000000000e")).address == C


@pytest.mark.parametrize("codec", ["vxlan", "gretap --seq"])
def test_a_flood_to_many_peers_spends_the_wakeups_budget_per_copy_and_leaves_the_rest_for_later(codec):
    """Head-end replication to a thousand peers is a thousand sends a frame. Counted as one read, 64 such frames
    held a worker's loop for seconds (its control channel unanswered, the parent logging it stalled)."""
    from tunneld.datapath.engine import WAKEUP_BYTES
    from tunneld.encap.gre import GreTap

    peers = [f"10.240.{i >> 8}.{i & 255}" for i in range(1, 1001)]
    dev, link = FakeDevice(), FakeLink(peers[0])
    proto = Vxlan(VNI) if codec == "vxlan" else GreTap(seq=True)
    eng = Engine(dev, link, proto, max_frame=1450, peers=[PeerSpec(p) for p in peers], clock=lambda: 100.0)
    frame = ether(LOCAL, "ff:ff:ff:ff:ff:ff", size=200)
    per_wakeup = -(-WAKEUP_BYTES // (len(frame) * len(peers)))  # frames until the copies reach the budget
    assert per_wakeup < eng.batch  # otherwise the read count, not the budget, would be tested
    dev.inject(*[frame] * 5)
    eng.on_device_readable()
    assert len(link.sent_to) == per_wakeup * len(peers) and len(dev.pending) == 5 - per_wakeup
    for _ in range(5):  # one wake-up takes at least one frame
        eng.on_device_readable()
    assert len(link.sent_to) == 5 * len(peers) and eng.stats.flooded == 5  # nothing lost, only later

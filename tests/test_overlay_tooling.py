"""The pure parts of issue 12's testbed and bench row, without root: the address plans keep every packet inside
the namespaces, the 100-peer configuration is what the row claims, and the readings of an exposition and of
the two rows are right."""

from __future__ import annotations

import ipaddress
import tomllib

from bench.run import closing_notes
from bench.systems import MACS_PER_ABSENT_PEER, MANY_FDB_MAX, MANY_PEERS, absent_peers, many_peers_config
from tunneld.testbed import UNDERLAY_V4, UNOWNED_V4
from tunneld.testbed.prom import samples, total
from tunneld.testbed.segment import MAX_HOSTS, host_overlay, host_underlay

EXPOSITION = """\
# HELP tunneld_dropped_packets_total Packets discarded, by reason.
# TYPE tunneld_dropped_packets_total counter
tunneld_dropped_packets_total{mode="gre",peer="10.231.1.2",reason="source_not_allowed"} 3.0
tunneld_dropped_packets_total{mode="gre",peer="10.231.1.4",reason="source_not_allowed"} 50.0
tunneld_dropped_packets_total{mode="gre",peer="10.231.1.4",reason="no_route"} 7.0
tunneld_dropped_packets_created{mode="gre",peer="10.231.1.4",reason="no_route"} 1.7e9
tunneld_fdb_entries 1024.0
"""


def test_samples_and_totals_read_labels_and_values():
    assert samples(EXPOSITION, "tunneld_fdb_entries") == [({}, 1024.0)]
    assert total(EXPOSITION, "tunneld_dropped_packets_total", reason="source_not_allowed") == 53.0
    assert total(EXPOSITION, "tunneld_dropped_packets_total", peer="10.231.1.4") == 57.0
    assert total(EXPOSITION, "tunneld_dropped_packets") == 0  # a prefix of a name is not the name
    assert samples(EXPOSITION, "tunneld_flooded_packets_total") == []


def test_the_absent_peers_stay_on_the_testbeds_own_subnet_and_belong_to_no_host():
    net = ipaddress.ip_network(f"{UNDERLAY_V4[0]}/24", strict=False)
    peers = absent_peers()
    assert len(peers) == len(set(peers)) == MANY_PEERS - 1
    assert all(ipaddress.ip_address(p) in net for p in peers)
    assert not set(peers) & set(UNDERLAY_V4)
    segment_hosts = {host_underlay(i) for i in range(MAX_HOSTS)}
    assert not set(UNOWNED_V4) & segment_hosts
    assert {host_overlay(i) for i in range(MAX_HOSTS)}.isdisjoint(segment_hosts)


def test_the_100_peer_configuration_has_the_real_peer_first_and_a_nearly_full_fdb():
    config = tomllib.loads(many_peers_config("vxlan", UNDERLAY_V4[1], "192.168.231.1/24"))
    assert config["tunnel"] == {"mode": "vxlan", "address": ["192.168.231.1/24"]}
    peers = config["peer"]
    assert len(peers) == MANY_PEERS and peers[0]["address"] == UNDERLAY_V4[1]
    macs = [m for p in peers for m in p.get("macs", [])]
    assert len(macs) == len(set(macs)) == (MANY_PEERS - 1) * MACS_PER_ABSENT_PEER
    assert 0.9 * MANY_FDB_MAX < len(macs) < MANY_FDB_MAX  # room for the real peer's learnt MACs
    assert all(int(m.split(":")[0], 16) & 0x03 == 0x02 for m in macs)  # locally administered unicast


def test_closing_notes_compare_the_two_rows_of_one_run():
    rows = [{"system": "tunneld-vxlan", "status": "ok", "tcp_gbps": 0.5, "flood_us_per_frame": 20.0},
            {"system": "tunneld-vxlan-100peers", "status": "ok", "tcp_gbps": 0.45, "flood_us_per_frame": 900.0}]
    notes = closing_notes(rows)
    assert len(notes) == 2
    assert "0.90×" in notes[0]
    assert "900.0 µs CPU to 100 peers" in notes[1] and "20.0 µs to one" in notes[1]
    rows[1]["status"] = "skipped"
    assert closing_notes(rows) == []

"""Flow hashing (outer source port entropy) and the encapsulator registry."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether

from tunneld.encap import plugins
from tunneld.encap.flow import _ip_hash, ethernet_flow_hash, ip_flow_hash
from tunneld.encap.vxlan import Vxlan

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def h(pkt) -> int:
    return ethernet_flow_hash(memoryview(bytes(pkt)))


def test_same_five_tuple_same_hash_whatever_the_payload():
    a = ETH / IP(src="10.0.0.1", dst="10.0.0.2", id=1) / TCP(sport=1, dport=2, seq=5) / b"a"
    b = ETH / IP(src="10.0.0.1", dst="10.0.0.2", id=9, ttl=3) / TCP(sport=1, dport=2, seq=99, flags="PA") / (b"b" * 900)
    assert h(a) == h(b)


@pytest.mark.parametrize(
    "other",
    [
        ETH / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=3),
        ETH / IP(src="10.0.0.1", dst="10.0.0.3") / TCP(sport=1, dport=2),
        ETH / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2),
    ],
)
def test_different_flows_differ(other):
    assert h(ETH / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=2)) != h(other)


def test_ipv6_ports_count_and_tun_packets_hash_without_ethernet():
    p1 = IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=1, dport=2)
    p2 = IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=1, dport=3)
    assert h(ETH / p1) != h(ETH / p2)
    assert ip_flow_hash(memoryview(bytes(p1))) != ip_flow_hash(memoryview(bytes(p2)))
    assert ip_flow_hash(memoryview(b"\x00" * 3)) == 0


def test_non_first_fragments_hash_with_the_first():
    first = ETH / IP(src="10.0.0.1", dst="10.0.0.2", flags="MF", frag=0, proto=17) / UDP(sport=7, dport=8) / (b"x" * 64)
    later = ETH / IP(src="10.0.0.1", dst="10.0.0.2", frag=100, proto=17) / (b"y" * 64)
    # the later fragment carries no ports: it must not read payload bytes as ports
    assert h(later) == h(ETH / IP(src="10.0.0.1", dst="10.0.0.2", frag=3, proto=17) / (b"z" * 64))
    assert h(first) != 0


def test_non_ip_and_truncated_frames_hash_by_mac():
    assert h(ETH / ARP()) == h(ETH / ARP(pdst="1.2.3.4"))
    assert isinstance(ethernet_flow_hash(memoryview(bytes(ETH)[:14] + b"\x45")), int)  # IPv4 ethertype, 1 byte
    assert isinstance(h(ETH / ICMP()), int)


@settings(max_examples=500, deadline=None)
@given(body=st.binary(min_size=24, max_size=80), proto=st.sampled_from([1, 6, 17, 47, 132, 136]),
       frag=st.sampled_from([b"\x00\x00", b"\x40\x00", b"\x20\x00", b"\x00\x07"]))
def test_the_one_call_hash_of_ipv4_without_options_is_the_piecewise_one(body, proto, frag):
    # ethernet_flow_hash and ip_flow_hash hash IPv4 without options in one crc32 call: a flow must keep the
    # value the general path gives it (the same function picks the egress device's source port).
    packet = bytearray(b"\x45" + body)
    packet[6:8] = frag
    packet[9] = proto
    frame = bytes(ETH)[:12] + b"\x08\x00" + bytes(packet)
    assert ethernet_flow_hash(memoryview(frame)) == _ip_hash(memoryview(frame), 14)
    assert ip_flow_hash(memoryview(bytes(packet))) == _ip_hash(memoryview(bytes(packet)), 0)


# -- registry -------------------------------------------------------------------------------------------


class NotACodec:
    pass


def fake_entry_points(monkeypatch, eps):
    monkeypatch.setattr(plugins, "entry_points", lambda group: [e for e in eps if e.group == group])


def test_vxlan_is_registered():
    modes, broken = plugins.discover()
    assert modes["vxlan"] is Vxlan


def test_broken_plugins_are_named_and_skipped(monkeypatch):
    eps = [
        EntryPoint("vxlan", "tunneld.encap.vxlan:Vxlan", plugins.GROUP),
        EntryPoint("ghost", "no_such_module_anywhere:Codec", plugins.GROUP),
        EntryPoint("shape", f"{__name__}:NotACodec", plugins.GROUP),
        EntryPoint("alias", "tunneld.encap.vxlan:Vxlan", plugins.GROUP),  # name mismatch
    ]
    fake_entry_points(monkeypatch, eps)
    modes, broken = plugins.discover()
    assert list(modes) == ["vxlan"]
    problems = {b.name: b.problem for b in broken}
    assert problems["ghost"].startswith("failed to import: ModuleNotFoundError")
    assert "not a subclass" in problems["shape"]
    assert "registered as 'alias'" in problems["alias"]

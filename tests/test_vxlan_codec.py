"""VXLAN codec against golden vectors built by scapy, an implementation nobody here wrote."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import ARP, Ether
from scapy.layers.vxlan import VXLAN

from tunneld.encap.base import Drop
from tunneld.encap.vxlan import HEADER_LEN, VNI_MAX, Vxlan, build_header
from tunneld.datapath.engine import HEADROOM

INNER_FRAMES = {
    "icmp": Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="192.168.1.1", dst="192.168.1.2") / ICMP(),
    "tcp": Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    / IP(src="192.168.1.1", dst="192.168.1.2")
    / TCP(sport=40000, dport=80, flags="PA")
    / (b"x" * 1000),
    "arp": Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff") / ARP(pdst="192.168.1.2"),
    "runt-min": Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=0x88B5),
}

# (VNI, inner frame): each checked both ways against scapy's own VXLAN layer.
GOLDEN = [(vni, name) for vni in (0, 1, 42, 4096, 0xABCDEF, VNI_MAX) for name in INNER_FRAMES]


def scapy_wire(vni: int, inner) -> bytes:
    return bytes(VXLAN(flags=0x08, vni=vni) / inner)


@pytest.mark.parametrize("vni,name", GOLDEN)
def test_encap_matches_scapy(vni, name):
    inner = bytes(INNER_FRAMES[name])
    buf = bytearray(HEADROOM + len(inner))
    buf[HEADROOM:] = inner
    start = Vxlan(vni).encap(buf, HEADROOM, len(buf))
    assert start == HEADROOM - HEADER_LEN
    assert bytes(buf[start:]) == scapy_wire(vni, INNER_FRAMES[name])


@pytest.mark.parametrize("vni,name", GOLDEN)
def test_decap_of_scapy_packet(vni, name):
    wire = scapy_wire(vni, INNER_FRAMES[name])
    offset = Vxlan(vni).decap(memoryview(wire))
    assert offset == HEADER_LEN
    assert wire[offset:] == bytes(INNER_FRAMES[name])
    # scapy reads back what we would have decapsulated
    assert bytes(VXLAN(wire).payload) == wire[offset:]


def test_header_is_rfc7348_layout():
    # flags byte 0x08, three reserved zero bytes, 24-bit VNI, one reserved zero byte
    assert build_header(0x123456) == bytes([0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0])


@pytest.mark.parametrize("vni", [-1, VNI_MAX + 1])
def test_vni_out_of_range(vni):
    with pytest.raises(ValueError):
        Vxlan(vni)


def _valid(vni: int = 7) -> bytearray:
    return bytearray(scapy_wire(vni, INNER_FRAMES["icmp"]))


def _with(offset: int, value: int) -> bytes:
    b = _valid()
    b[offset] = value
    return bytes(b)


MALFORMED = [
    ("empty", b"", Drop.TRUNCATED),
    ("7 bytes", bytes(_valid()[:7]), Drop.TRUNCATED),
    ("I flag clear", bytes(VXLAN(flags=0x00, vni=7) / INNER_FRAMES["icmp"]), Drop.BAD_FLAGS),
    ("unknown flag 0x80", bytes(VXLAN(flags=0x88, vni=7) / INNER_FRAMES["icmp"]), Drop.BAD_FLAGS),
    # VXLAN-GPE sets the P bit (0x04) and means something else by the reserved fields
    ("GPE P bit", bytes(VXLAN(flags=0x0C, vni=7) / INNER_FRAMES["icmp"]), Drop.BAD_FLAGS),
    ("reserved1 byte 1", _with(1, 0x01), Drop.RESERVED_BITS),
    ("reserved1 byte 3", _with(3, 0x80), Drop.RESERVED_BITS),
    ("reserved2", _with(7, 0x01), Drop.RESERVED_BITS),
    ("other VNI", scapy_wire(8, INNER_FRAMES["icmp"]), Drop.VNI_MISMATCH),
    ("header only", scapy_wire(7, b""), Drop.RUNT_FRAME),
    ("13-byte frame", bytes(_valid()[: HEADER_LEN + 13]), Drop.RUNT_FRAME),
]


@pytest.mark.parametrize("name,wire,reason", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_is_dropped_with_reason(name, wire, reason):
    assert Vxlan(7).decap(memoryview(wire)) is reason


def test_every_truncation_of_a_valid_packet_is_classified():
    wire = _valid()
    codec = Vxlan(7)
    for n in range(len(wire) + 1):
        verdict = codec.decap(memoryview(bytes(wire[:n])))
        if n < HEADER_LEN:
            assert verdict is Drop.TRUNCATED
        elif n < HEADER_LEN + 14:
            assert verdict is Drop.RUNT_FRAME
        else:
            assert verdict == HEADER_LEN

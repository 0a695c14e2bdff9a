"""Frames built by scapy for the offload tests: TCP super-frames as the kernel hands them over with TSO, and
what its GSO would put on the wire for them. Shared by the segmentation tests and the engine's offload tests;
built by an implementation nobody here wrote, never by the code under test.
"""

from __future__ import annotations

import random

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
from scapy.layers.vxlan import VXLAN

VNI = 7
MACS = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
OPTS = [("NOP", None), ("NOP", None), ("Timestamp", (12345, 67890))]


def payload(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def ether(v6: bool = False, vlan: bool | str = False):
    e = Ether(**MACS)
    if vlan == "qinq":
        return e / Dot1AD(vlan=100) / Dot1Q(vlan=5)
    return e / Dot1Q(vlan=5) if vlan else e


def ip(v6: bool = False, ext: bool = False, **kw):
    if v6:
        v6hdr = IPv6(src="fd00::1", dst="fd00::2", **{k: v for k, v in kw.items() if k != "id"})
        return v6hdr / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() if ext else v6hdr
    return IP(src="10.1.0.1", dst="10.1.0.2", flags="DF", **kw)


def tcp_super(data: bytes, *, v6=False, vlan=False, flags="PA", options=OPTS, seq=1000, ip_id=77, ext=False):
    pkt = ether(v6, vlan) / ip(v6, ext, id=ip_id) / TCP(sport=40000, dport=5201, seq=seq, ack=555, flags=flags,
                                                      window=500, options=options) / data
    return bytes(pkt)


def expected_tcp(data: bytes, gso: int, *, v6=False, vlan=False, flags="PA", options=OPTS, seq=1000, ip_id=77,
                 ext=False):
    """What the kernel's GSO would put on the wire, built segment by segment by scapy."""
    chunks = [data[i : i + gso] for i in range(0, len(data), gso)]
    out = []
    for i, chunk in enumerate(chunks):
        f = TCP(flags=flags).flags.value
        if i < len(chunks) - 1:
            f &= ~0x09  # FIN, PSH only on the last
        if i > 0:
            f &= ~0x80  # CWR only on the first
        seg = ether(v6, vlan) / ip(v6, ext, id=(ip_id + i) & 0xFFFF) / TCP(
            sport=40000, dport=5201, seq=(seq + i * gso) & 0xFFFFFFFF, ack=555, flags=f, window=500,
            options=options) / chunk
        out.append(bytes(VXLAN(flags=8, vni=VNI) / Ether(bytes(seg))))
    return out

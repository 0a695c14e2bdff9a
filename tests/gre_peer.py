"""A GRE peer made of scapy and a raw socket: the far end of tunneld, written by nobody here.

Run inside the peer's namespace: ``python -m tests.gre_peer TUNNELD_UNDERLAY KEY MY_OVERLAY TUNNELD_OVERLAY
MY_OVERLAY6 TUNNELD_OVERLAY6``. It sends echo requests inside GRE with checksum, key and sequence number (built
by scapy) to tunneld, parses every GRE packet tunneld sends back with scapy, then sends packets tunneld must
drop (wrong key, damaged checksum, replayed sequence number). It prints one JSON report; the test judges it.
"""

from __future__ import annotations

import json
import socket
import sys
import time

from scapy.layers.inet import ICMP, IP, IPOption
from scapy.packet import Raw
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import GRE

IPPROTO_GRE = 47
ECHO_ID = 0x4242


def gre(inner, key: int, seq: int, *, csum: bool = True) -> bytes:
    return bytes(GRE(chksum_present=int(csum), key_present=1, key=key, seqnum_present=1, sequence_number=seq) / inner)


def checksum_ok(gre_bytes: bytes) -> bool:
    """Does the packet's checksum equal the one scapy computes for the same header and payload?"""
    parsed = GRE(gre_bytes)
    sent = parsed.chksum
    parsed.chksum = None
    return GRE(bytes(parsed)).chksum == sent


def main(tunneld: str, key: int, me: str, them: str, me6: str, them6: str) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_GRE)
    s.settimeout(0.2)
    seen: list[dict] = []
    replies: dict[str, list[int]] = {"ipv4": [], "ipv6": []}

    def drain(until: float, enough=lambda: False) -> None:
        while time.monotonic() < until and not enough():
            try:
                data, (src, _) = s.recvfrom(65535)
            except socket.timeout:
                continue
            outer = IP(data)  # an IPv4 raw socket hands up the outer header too
            if src != tunneld or GRE not in outer:
                continue
            g = outer[GRE]
            record = {
                "c": g.chksum_present, "k": g.key_present, "s": g.seqnum_present, "r": g.routing_present,
                "version": g.version, "key": g.key, "seq": g.sequence_number, "proto": g.proto,
                "csum_ok": checksum_ok(bytes(g)),
            }
            seen.append(record)
            inner = g.payload
            if isinstance(inner, IP) and ICMP in inner and inner[ICMP].type == 0 and inner[ICMP].id == ECHO_ID:
                replies["ipv4"].append(inner[ICMP].seq)
            if isinstance(inner, IPv6) and ICMPv6EchoReply in inner and inner[ICMPv6EchoReply].id == ECHO_ID:
                replies["ipv6"].append(inner[ICMPv6EchoReply].seq)

    seq = 0
    for i in range(3):
        s.sendto(gre(IP(src=me, dst=them) / ICMP(id=ECHO_ID, seq=i) / b"scapy-v4", key, seq), (tunneld, 0))
        seq += 1
        s.sendto(gre(IPv6(src=me6, dst=them6) / ICMPv6EchoRequest(id=ECHO_ID, seq=i, data=b"scapy-v6"), key, seq),
                 (tunneld, 0))
        seq += 1
    # Wait (bounded) for all six replies; a loaded machine may take a moment.
    drain(time.monotonic() + 5, lambda: len(replies["ipv4"]) >= 3 and len(replies["ipv6"]) >= 3)
    # One more, its outer IPv4 header carrying options (IHL 6: NOP NOP NOP EOL), sent with a header we build:
    # tunneld's raw link must strip 24 bytes of outer header, not 20.
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as hdrincl:
        inner = IP(src=me, dst=them) / ICMP(id=ECHO_ID, seq=3) / b"outer-options"
        outer = IP(dst=tunneld, proto=IPPROTO_GRE,
                   options=[IPOption(b"\x01\x01\x01\x00")]) / Raw(gre(inner, key, seq))
        hdrincl.sendto(bytes(outer), (tunneld, 0))
    seq += 1
    drain(time.monotonic() + 5, lambda: len(replies["ipv4"]) >= 4)
    good = {k: sorted(v) for k, v in replies.items()}
    # Each of these must be dropped by tunneld: no echo reply may come back for sequence 100-102.
    s.sendto(gre(IP(src=me, dst=them) / ICMP(id=ECHO_ID, seq=100), key + 1, seq), (tunneld, 0))
    damaged = bytearray(gre(IP(src=me, dst=them) / ICMP(id=ECHO_ID, seq=101), key, seq + 1))
    damaged[-1] ^= 0xFF
    s.sendto(bytes(damaged), (tunneld, 0))
    s.sendto(gre(IP(src=me, dst=them) / ICMP(id=ECHO_ID, seq=102), key, 0), (tunneld, 0))  # replayed number 0
    drain(time.monotonic() + 1.0)
    print(json.dumps({"replies": good, "all_replies": {k: sorted(v) for k, v in replies.items()}, "seen": seen}))


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]), a[2], a[3], a[4], a[5])

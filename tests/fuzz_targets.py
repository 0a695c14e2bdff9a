"""Fuzz targets: one thin adapter per piece of code that parses what the network or the kernel hands us, each
checking its properties with plain ``assert``. Driven by hypothesis in tests/test_fuzz.py (a short,
derandomized run in ``make test``) and by atheris in tests/fuzz_atheris.py (``make fuzz``, coverage-guided).

Only the adapters know the APIs under test (``Encapsulator.decap``, ``Coalescer.plan``, ``Segmenter.split``,
``vnet.finish_checksum``): if those are renamed, these functions are all that must follow.

Properties:
- decap: no exception; the answer is a ``Drop`` or an offset within the packet.
- split: no exception; a ``str`` reason or segments whose payloads, in order, are exactly the frame's
  payload, each segment with a valid L4 checksum.
- plan: no exception; its items cover the input rows exactly once, in order (a plain datagram is one row, a
  super-frame ``segments`` consecutive rows), and a super-frame carries exactly its rows' payload bytes.
- finish_checksum: no exception; False exactly when the offsets do not fit; otherwise the stored checksum
  completes the pseudo-header sum that was in the field.
"""

from __future__ import annotations

import numpy as np

from tunneld.encap.base import Drop, Encapsulator
from tunneld.encap.gre import Gre, GreTap
from tunneld.encap.vxlan import Vxlan, build_header
from tunneld.offload import layout as L
from tunneld.offload.coalesce import Coalescer, SuperFrame
from tunneld.offload.segment import Segmenter
from tunneld.offload.vnet import GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, finish_checksum

# Every codec, with every option that changes what decap accepts.
CODECS: dict[str, Encapsulator] = {
    "vxlan": Vxlan(7),
    "gre": Gre(), "gre-key": Gre(key=0x01020304), "gre-seq": Gre(seq=True), "gre-csum": Gre(csum=True),
    "gre-all": Gre(key=5, seq=True, csum=True),
    "gretap": GreTap(), "gretap-key": GreTap(key=9), "gretap-seq": GreTap(seq=True), "gretap-csum": GreTap(csum=True),
    "gretap-all": GreTap(key=0xFFFFFFFF, seq=True, csum=True),
}


def plugin_codecs() -> dict[str, Encapsulator]:
    """The example plugin's codec (tests/plugins/tunneld-ipudp), when it can be imported from the tree."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent / "plugins" / "tunneld-ipudp"
    if str(root) not in sys.path:
        sys.path.append(str(root))
    try:
        from tunneld_ipudp import IpUdp
    except ImportError:
        return {}
    return {"ipudp": IpUdp(3)}


def ones_sum(data: bytes) -> int:
    """RFC 1071 one's-complement sum, word by word: an implementation independent of the code under test."""
    if len(data) & 1:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


# -- the adapters ---------------------------------------------------------------------------------------------

def decap(codec: Encapsulator, packet: bytes) -> None:
    verdict = codec.decap(memoryview(bytearray(packet)))
    assert isinstance(verdict, Drop) or (isinstance(verdict, int) and 0 <= verdict <= len(packet)), verdict


def split(segmenter: Segmenter, frame: bytes, gso_type: int, gso_size: int, *, prefix_len: int, l2: bool) -> list:
    """The rows ``split`` cut from ``frame`` (prefix included), after checking them; [] for a refusal."""
    segs = segmenter.split(memoryview(bytearray(frame)), gso_type, gso_size)
    if isinstance(segs, str):
        return []
    want = L.PROTO_UDP if gso_type & 0x7F == GSO_UDP_L4 else L.PROTO_TCP
    lay = (L.parse if l2 else L.parse_ip)(frame, want)
    assert not isinstance(lay, str), lay
    buf = bytes(segs.buffer)
    rows = [buf[i : i + segs.rowlen] for i in range(0, len(buf), segs.rowlen)]
    assert len(rows) == segs.count
    assert b"".join(r[prefix_len + lay.hlen :] for r in rows) == frame[lay.hlen :]  # every payload byte, in order
    assert segs.inner_bytes == len(buf) - prefix_len * segs.count
    for row in rows:
        inner = row[prefix_len:]
        l4 = inner[lay.l4 :]
        if lay.v6:
            pseudo = inner[lay.l3 + 8 : lay.l3 + 40]
        else:
            pseudo = inner[lay.l3 + 12 : lay.l3 + 20]
        pseudo += bytes([0, lay.proto]) + len(l4).to_bytes(2, "big")
        assert ones_sum(pseudo + l4) == 0xFFFF, "a segment's L4 checksum does not verify"
    return rows


def plan(coalescer: Coalescer, batch: bytes, rowlen: int, *, prefix_len: int) -> list:
    """``plan`` over ``batch`` seen as rows of ``rowlen`` bytes, after checking that it accounts for every row."""
    n = len(batch)
    rx = np.zeros(n + max(rowlen, 1), np.uint8)
    rx[:n] = np.frombuffer(batch, np.uint8)
    items = coalescer.plan(rx, n, rowlen)
    if rowlen <= 0 or rowlen >= n:
        expected = [(0, n)]
    else:
        expected = [(s, min(n, s + rowlen)) for s in range(0, n, rowlen)]
    row = 0
    for item in items:
        if isinstance(item, SuperFrame):
            assert item.segments >= 2
            covered = expected[row : row + item.segments]
            assert len(covered) == item.segments, "a super-frame past the last row"
            vnet, hdr, *payload = item.iov
            hl = prefix_len + len(hdr)
            carried = b"".join(bytes(np.asarray(p, np.uint8).tobytes()) for p in payload)
            assert carried == b"".join(batch[s + hl : e] for s, e in covered), "super-frame payload != its rows'"
            assert item.inner_bytes == sum(e - s - prefix_len for s, e in covered)
            row += item.segments
        else:
            assert tuple(item) == expected[row], (item, expected[row])
            row += 1
    assert row == len(expected), "rows left out of the plan"
    return items


def vnet_finish(frame: bytes, csum_start: int, csum_offset: int) -> None:
    buf = bytearray(frame)
    at = csum_start + csum_offset
    fits = 0 <= csum_start < len(buf) and at + 2 <= len(buf)
    if csum_start < 0 or csum_offset < 0:
        return  # offsets come from a u16 field: never negative
    partial = int.from_bytes(buf[at : at + 2], "big") if fits else 0
    ok = finish_checksum(memoryview(buf), csum_start, csum_offset)
    assert ok == fits
    if ok:
        assert buf[:at] == frame[:at] and buf[at + 2 :] == frame[at + 2 :]  # only the field is written
        stored = int.from_bytes(buf[at : at + 2], "big")
        rest = bytes(buf[csum_start:at]) + b"\0\0" + bytes(buf[at + 2 :])
        if (at - csum_start) & 1 == 0:  # the field on a word boundary of the checksummed data, as in TCP/UDP
            total = ones_sum(rest)
            total = (total + partial) % 0xFFFF
            assert (total + stored) % 0xFFFF == 0


# -- building well-formed super-frames, to start from valid input rather than noise ----------------------------

def tcp_or_udp_frame(*, v6: bool, udp: bool, l2: bool, payload: bytes, seq: int = 1000, flags: int = L.TCP_ACK,
                     ip_id: int = 1) -> bytes:
    """An Ethernet (or bare) IPv4/IPv6 + TCP/UDP frame holding ``payload``; checksums left to the segmenter."""
    l4 = (b"\x30\x39\x00\x50" + (8 + len(payload)).to_bytes(2, "big") + b"\0\0") if udp else (
        b"\x30\x39\x00\x50" + seq.to_bytes(4, "big") + b"\0\0\0\1" + bytes([0x50, flags]) + b"\xff\xff\0\0\0\0")
    proto = 17 if udp else 6
    if v6:
        ip = (b"\x60\0\0\0" + (len(l4) + len(payload)).to_bytes(2, "big") + bytes([proto, 64])
              + bytes.fromhex("fd000000000000000000000000000001") + bytes.fromhex("fd000000000000000000000000000002"))
    else:
        ip = (b"\x45\0" + (20 + len(l4) + len(payload)).to_bytes(2, "big") + ip_id.to_bytes(2, "big")
              + b"\x40\0\x40" + bytes([proto]) + b"\0\0" + bytes([10, 1, 0, 1, 10, 1, 0, 2]))
    eth = (b"\x02\0\0\0\0\2\x02\0\0\0\0\1" + (b"\x86\xdd" if v6 else b"\x08\x00")) if l2 else b""
    return eth + ip + l4 + payload


def gso_type_of(*, v6: bool, udp: bool) -> int:
    return GSO_UDP_L4 if udp else (GSO_TCPV6 if v6 else GSO_TCPV4)


# The constant headers the offload path puts in front of every row: VXLAN for TAP frames; GRE (no options)
# for TUN packets, whose header names the inner protocol.
VXLAN_PREFIX = build_header(7)
GRE_PREFIX4, GRE_PREFIX6 = b"\0\0\x08\x00", b"\0\0\x86\xdd"


def offload_pair(l2: bool, uso: bool = True) -> tuple[Segmenter, Coalescer, int]:
    """A segmenter and a coalescer as the engine builds them, and the prefix length."""
    if l2:
        return Segmenter(VXLAN_PREFIX), Coalescer(VXLAN_PREFIX, uso=uso), len(VXLAN_PREFIX)
    return (Segmenter(GRE_PREFIX4, prefix6=GRE_PREFIX6, l2=False),
            Coalescer(GRE_PREFIX4, uso=uso, prefix6=GRE_PREFIX6, l2=False), len(GRE_PREFIX4))

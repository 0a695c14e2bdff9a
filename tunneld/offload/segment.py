"""Cutting a TCP or UDP super-frame into wire-size segments, each behind an encapsulation prefix.

The output is one buffer of ``nseg`` rows of ``rowlen`` bytes (the last row may be shorter), exactly what a
``sendmsg`` with UDP_SEGMENT = ``rowlen`` sends as ``nseg`` datagrams (or a ``sendmmsg`` as ``nseg`` IP
packets). Each row is ``prefix | [Ethernet] | IP | TCP/UDP | gso_size payload bytes`` (Ethernet for TAP
frames, none for TUN) and every per-segment field is computed for all rows at once with NumPy (see the package
docstring for the checksum arithmetic).

What each segment gets, as the kernel's own GSO does (tcp_gso_segment, __udp_gso_segment, inet_gso_segment):
- IPv4: total length, ID = first ID + i, header checksum; IPv6: payload length (extension headers included);
- TCP: sequence number + i * gso_size; FIN and PSH only on the last segment, CWR only on the first; checksum;
- UDP: length, checksum (a computed 0 is sent as 0xFFFF).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from tunneld.offload import layout as L
from tunneld.offload.vnet import GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4

# Linux lets TCP go down to an MSS of 88 (TCP_MIN_MSS, e.g. after MSS clamping): a 64 KiB super-frame is then
# ~745 segments, and one we refused would be retransmitted and refused again, stalling the connection. The link
# splits what one send can't carry.
MAX_SEGMENTS = 1024
_ROW_EXTRA = 256  # room per row for prefix + headers in the output buffer

_U8 = np.uint8
_U32 = np.uint32
_U64 = np.uint64


class Segments(NamedTuple):
    buffer: memoryview  # the rows, back to back
    rowlen: int  # bytes per full row: the UDP_SEGMENT size
    count: int  # rows
    inner_bytes: int  # sum of the inner frames' lengths (without prefix), for the byte counters
    frame_len: int = 0  # the super-frame's length as read: what it weighs against a wake-up's byte budget


def _be16_into(rows: np.ndarray, col: int, values: np.ndarray) -> None:
    rows[:, col : col + 2] = values.astype(">u2").view(_U8).reshape(-1, 2)


def _fold_le(total: np.ndarray) -> np.ndarray:
    """Little-endian word sums (mod 0xFFFF) → the big-endian 16-bit checksum, as ``~fold(sum)``."""
    be = (total % 0xFFFF) * 256 % 0xFFFF  # byte-swap, modulo 0xFFFF
    return np.where(be == 0, 0, 0xFFFF - be)  # a folded sum of 0xFFFF (≡ 0) complements to 0


def _sum_le(rows: np.ndarray, start: int, end: int) -> np.ndarray:
    """Per-row one's-complement sum (as a plain integer sum of little-endian words) of ``rows[:, start:end]``,
    with an odd trailing byte padded by a zero. ``start`` must be even relative to the checksummed data.
    A uint32 accumulator is enough (32767 words of at most 0xFFFF) and faster than uint64."""
    if (end - start) & 1:
        end -= 1
        return rows[:, start:end].view("<u2").sum(axis=1, dtype=_U32) + rows[:, end]
    return rows[:, start:end].view("<u2").sum(axis=1, dtype=_U32)


class Segmenter:
    """Holds the output buffer (reused for every frame) and the encapsulation prefix of every row.

    ``l2``: frames are Ethernet frames (TAP) or bare IP packets (TUN). ``prefix6``: the prefix for IPv6 frames
    where it differs from the IPv4 one (GRE names the inner protocol in its header); the same length."""

    def __init__(self, prefix: bytes, max_frame: int = 65535, *, prefix6: bytes | None = None, l2: bool = True) -> None:
        self.prefix = np.frombuffer(bytes(prefix), _U8)
        self.prefix6 = self.prefix if prefix6 is None else np.frombuffer(bytes(prefix6), _U8)
        if len(self.prefix6) != len(self.prefix):
            raise ValueError("the IPv4 and IPv6 prefixes must have the same length")
        self._parse = L.parse if l2 else L.parse_ip
        self._out = np.zeros(max_frame + MAX_SEGMENTS * _ROW_EXTRA, _U8)

    def split(self, frame: memoryview, gso_type: int, gso_size: int) -> Segments | str:
        """Segments of ``frame``, or a short reason why this frame is not one we can cut."""
        gso_type &= 0x7F  # the ECN bit changes nothing here: CWR is handled as the kernel does
        want = L.PROTO_UDP if gso_type == GSO_UDP_L4 else L.PROTO_TCP
        if gso_type not in (GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4):
            return "gso_type"
        lay = self._parse(frame, want)
        if lay.__class__ is str:
            return lay
        if (gso_type == GSO_TCPV6) != lay.v6 and gso_type != GSO_UDP_L4:
            return "gso_type"
        l3, l4, hlen = lay.l3, lay.l4, lay.hlen
        payload = len(frame) - hlen
        if gso_size <= 0 or payload <= 0:
            return "no_payload"
        p = len(self.prefix)
        nfull, last = divmod(payload, gso_size)
        nseg = nfull + (last > 0)
        rowlen = p + hlen + gso_size
        if nseg > MAX_SEGMENTS or nseg * rowlen > len(self._out) or (p + l3) & 1:
            return "too_many_segments"
        f = np.frombuffer(frame, _U8)
        rows = self._out[: nseg * rowlen].reshape(nseg, rowlen)
        body = p + hlen
        rows[:, :p] = self.prefix6 if lay.v6 else self.prefix
        rows[:, p:body] = f[:hlen]
        rows[:nfull, body:] = f[hlen : hlen + nfull * gso_size].reshape(nfull, gso_size)
        if last:
            rows[nfull, body : body + last] = f[hlen + nfull * gso_size :]
            rows[nfull, body + last :] = 0  # so the padded tail adds nothing to the checksum
        seg_payload = np.full(nseg, gso_size, _U64)
        if last:
            seg_payload[-1] = last
        l4len = seg_payload + (hlen - l4)
        ip, tp = p + l3, p + l4
        if lay.v6:
            _be16_into(rows, ip + L.IPV6_PLEN_OFFSET, l4len + (l4 - l3 - L.IPV6_HLEN))  # + extension headers
        else:
            ihl = l4 - l3
            _be16_into(rows, ip + L.IPV4_TOTLEN_OFFSET, l4len + ihl)
            first_id = frame[l3 + L.IPV4_ID_OFFSET] << 8 | frame[l3 + L.IPV4_ID_OFFSET + 1]
            _be16_into(rows, ip + L.IPV4_ID_OFFSET, (np.arange(first_id, first_id + nseg, dtype=_U64)) & 0xFFFF)
            rows[:, ip + L.IPV4_CSUM_OFFSET : ip + L.IPV4_CSUM_OFFSET + 2] = 0
            _be16_into(rows, ip + L.IPV4_CSUM_OFFSET, _fold_le(_sum_le(rows, ip, tp)))
        if lay.proto == L.PROTO_TCP:
            seq0 = int.from_bytes(frame[l4 + L.TCP_SEQ_OFFSET : l4 + L.TCP_SEQ_OFFSET + 4], "big")
            seqs = (np.arange(nseg, dtype=_U64) * gso_size + seq0) & 0xFFFFFFFF
            rows[:, tp + L.TCP_SEQ_OFFSET : tp + L.TCP_SEQ_OFFSET + 4] = seqs.astype(">u4").view(_U8).reshape(-1, 4)
            flags = frame[l4 + L.TCP_FLAGS_OFFSET]
            fcol = tp + L.TCP_FLAGS_OFFSET
            rows[:-1, fcol] = flags & ~(L.TCP_FIN | L.TCP_PSH) & 0xFF
            rows[1:, fcol] &= ~L.TCP_CWR & 0xFF
            ccol = tp + L.TCP_CSUM_OFFSET
        else:
            _be16_into(rows, tp + L.UDP_LEN_OFFSET, l4len)
            ccol = tp + L.UDP_CSUM_OFFSET
        rows[:, ccol : ccol + 2] = 0
        # Everything from the L4 header to the row's end; a short last row is zero-padded, which adds nothing.
        total = _sum_le(rows, tp, rowlen) + (l4len + lay.pseudo) * 256  # the pseudo-header, byte-swapped
        csum = _fold_le(total)
        if lay.proto == L.PROTO_UDP:
            csum[csum == 0] = 0xFFFF
        _be16_into(rows, ccol, csum)
        size = (nseg - 1) * rowlen + body + (last or gso_size)
        inner = nseg * hlen + payload
        return Segments(memoryview(self._out)[:size], rowlen, nseg, inner, len(frame))

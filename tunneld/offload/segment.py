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


class Segments(NamedTuple):
    buffer: memoryview  # the rows, back to back
    rowlen: int  # bytes per full row: the UDP_SEGMENT size
    count: int  # rows
    inner_bytes: int  # sum of the inner frames' lengths (without prefix), for the byte counters
    frame_len: int = 0  # the super-frame's length as read: what it weighs against a wake-up's byte budget


# Lookup tables, built once (~1 MB), that turn per-row arithmetic into one gather each.
def _be16(values: np.ndarray) -> np.ndarray:
    """Each value's two big-endian bytes, one row per value."""
    return values.astype(">u2").view(_U8).reshape(-1, 2)


def _checksum_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A one's-complement sum modulo 0xFFFF -> the checksum's two bytes, ~fold(sum) (a sum of 0, a folded 0xFFFF,
    complements to 0): from a sum of big-endian words; from one of little-endian words (the byte-swapped sum:
    x 256 modulo 0xFFFF), for TCP; and the same for UDP, where a computed 0 is sent as 0xFFFF (0: no checksum)."""
    sums = np.arange(0xFFFF, dtype=_U32)
    checksum = np.where(sums == 0, 0, 0xFFFF - sums).astype(_U32)
    swapped = sums * 256 % 0xFFFF
    return _be16(checksum), _be16(checksum[swapped]), _be16(np.where(checksum == 0, 0xFFFF, checksum)[swapped])


_IDS = np.arange((1 << 16) + MAX_SEGMENTS, dtype=_U32) & 0xFFFF  # IPv4 IDs from any first one, wrapping
_BE16 = _be16(np.arange(1 << 16, dtype=_U32))  # a 16-bit value's bytes
_CSUM_BE, _CSUM_LE, _UDP_CSUM_LE = _checksum_tables()


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
        self._steps_size = 0
        self._steps = np.zeros(MAX_SEGMENTS, _U32)

    def _seq_steps(self, gso_size: int) -> np.ndarray:
        """Each segment's sequence number offset, i * gso_size (uint32, wrapping), kept while the size holds."""
        if gso_size != self._steps_size:
            self._steps = np.arange(MAX_SEGMENTS, dtype=_U32) * np.uint32(gso_size)
            self._steps_size = gso_size
        return self._steps

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
        last_payload = last or gso_size
        full = min(gso_size, payload)  # a full row's payload: gso_size, unless the frame is one shorter segment
        # The headers every row starts from: the super-frame's, with what all rows share already written (full
        # lengths, checksums zero, the middle rows' TCP flags); one broadcast lays them on every row. What differs
        # per row is then written in a few NumPy calls (IDs, sequence numbers, checksums) and the first and last
        # rows' own fields as scalars: each NumPy call costs microseconds whatever its size.
        hdr = bytearray(frame[:hlen])
        l4len = hlen - l4 + full  # a full row's TCP/UDP length (within 16 bits: the frame's own is)
        last_l4len = hlen - l4 + last_payload
        ip, tp = p + l3, p + l4
        if lay.v6:
            lencol, lenbase = l3 + L.IPV6_PLEN_OFFSET, l4 - l3 - L.IPV6_HLEN  # + extension headers
        else:
            lencol, lenbase = l3 + L.IPV4_TOTLEN_OFFSET, l4 - l3
            first_id = int.from_bytes(hdr[l3 + L.IPV4_ID_OFFSET : l3 + L.IPV4_ID_OFFSET + 2], "big")
            hdr[l3 + L.IPV4_ID_OFFSET : l3 + L.IPV4_ID_OFFSET + 2] = b"\0\0"
            hdr[l3 + L.IPV4_CSUM_OFFSET : l3 + L.IPV4_CSUM_OFFSET + 2] = b"\0\0"
        hdr[lencol : lencol + 2] = (l4len + lenbase).to_bytes(2, "big")
        if lay.proto == L.PROTO_TCP:
            flags = frame[l4 + L.TCP_FLAGS_OFFSET]
            hdr[l4 + L.TCP_FLAGS_OFFSET] = flags & ~(L.TCP_FIN | L.TCP_PSH | L.TCP_CWR) & 0xFF
            ccol = L.TCP_CSUM_OFFSET
        else:
            hdr[l4 + L.UDP_LEN_OFFSET : l4 + L.UDP_LEN_OFFSET + 2] = l4len.to_bytes(2, "big")
            ccol = L.UDP_CSUM_OFFSET
        hdr[l4 + ccol : l4 + ccol + 2] = b"\0\0"
        f = np.frombuffer(frame, _U8)
        rows = self._out[: nseg * rowlen].reshape(nseg, rowlen)
        body = p + hlen
        rows[:, :p] = self.prefix6 if lay.v6 else self.prefix
        rows[:, p:body] = np.frombuffer(hdr, _U8)
        rows[:nfull, body:] = f[hlen : hlen + nfull * gso_size].reshape(nfull, gso_size)
        if last:
            rows[nfull, body : body + last] = f[hlen + nfull * gso_size :]
            rows[nfull, body + last :] = 0  # so the padded tail adds nothing to the checksum
            at = p + lencol
            rows[-1, at], rows[-1, at + 1] = divmod(last_l4len + lenbase, 256)
            if lay.proto == L.PROTO_UDP:
                at = tp + L.UDP_LEN_OFFSET
                rows[-1, at], rows[-1, at + 1] = divmod(last_l4len, 256)
        if not lay.v6:
            # The IPv4 headers differ only in the ID (first + i) and the last row's length: every checksum follows
            # from one sum (big-endian words, modulo 0xFFFF) of the shared header plus the row's ID.
            ids = _IDS[first_id : first_id + nseg]
            rows[:, ip + L.IPV4_ID_OFFSET : ip + L.IPV4_ID_OFFSET + 2] = _BE16[ids]
            shared = int.from_bytes(hdr[l3:l4], "big") % 0xFFFF
            sums = ids + shared
            sums %= 0xFFFF
            col = ip + L.IPV4_CSUM_OFFSET
            rows[:, col : col + 2] = _CSUM_BE[sums]
            if last:
                rows[-1, col : col + 2] = _CSUM_BE[(int(sums[-1]) + last_payload - full) % 0xFFFF]
        if lay.proto == L.PROTO_TCP:
            seq0 = int.from_bytes(frame[l4 + L.TCP_SEQ_OFFSET : l4 + L.TCP_SEQ_OFFSET + 4], "big")
            seqs = self._seq_steps(gso_size)[:nseg] + np.uint32(seq0)  # uint32: wraps as sequence numbers do
            rows[:, tp + L.TCP_SEQ_OFFSET : tp + L.TCP_SEQ_OFFSET + 4] = seqs.astype(">u4").view(_U8).reshape(-1, 4)
            fcol = tp + L.TCP_FLAGS_OFFSET
            if nseg > 1:
                rows[0, fcol] = flags & ~(L.TCP_FIN | L.TCP_PSH) & 0xFF  # CWR on the first only
                rows[-1, fcol] = flags & ~L.TCP_CWR & 0xFF  # FIN and PSH on the last only
            else:
                rows[0, fcol] = flags
        # Everything from the L4 header to the row's end (a short last row is zero-padded, which adds nothing),
        # plus the pseudo-header, all as little-endian words: the table turns each sum into the checksum's bytes.
        sums = _sum_le(rows, tp, rowlen)
        sums += (l4len + lay.pseudo) * 256  # the pseudo-header, byte-swapped; the sum stays below 2**32
        if last:
            sums[-1] -= (full - last_payload) * 256
        sums %= 0xFFFF
        rows[:, tp + ccol : tp + ccol + 2] = (_UDP_CSUM_LE if lay.proto == L.PROTO_UDP else _CSUM_LE)[sums]
        size = (nseg - 1) * rowlen + body + (last or gso_size)
        inner = nseg * hlen + payload
        return Segments(memoryview(self._out)[:size], rowlen, nseg, inner, len(frame))

"""Coalescing a batch of received encapsulated packets (one UDP_GRO read of VXLAN datagrams, or a run of GRE
packets from one recvmmsg) back into TCP super-frames.

A batch is ``count`` packets of ``rowlen`` bytes back to back, the last possibly shorter. Seen as the rows of
a matrix, every check runs over all rows at once. Starting from a head row that is a TCP segment, the run
grows over the following rows while each row:
- has the expected encapsulation header (VXLAN: flags, reserved bits, VNI; GRE: flags, protocol, key);
- has the head's (Ethernet,) IP and TCP headers byte for byte, except the fields that differ between segments
  of one flow (IPv4 length, ID and checksum; TCP sequence number, checksum and PSH);
- carries ACK (PSH allowed; nothing else: no SYN, FIN, RST, URG, ECE, CWR) and a non-empty payload whose
  length agrees with the IP length field;
- continues the sequence space exactly where the previous row ended;
- has a valid TCP checksum (we hand the kernel the run with NEEDS_CSUM, so it will not look again);
and it stops after a PSH, at the 64 KiB IP limit, or at the batch's end. Only the last row may be shorter.

Datagrams of one UDP flow run the same way (equal headers but for the IPv4 ID and checksums, valid or
absent IPv4 checksums) and leave as one USO super-frame (GSO UDP_L4), which the kernel cuts apart again.

A run of two or more becomes one ``SuperFrame``: a virtio_net_hdr (GSO TCPV4/TCPV6, gso_size = the segment
payload, NEEDS_CSUM with the pseudo-header sum in the checksum field, as a local TCP stack leaves it), the
head's headers with the new lengths, and the payloads. Every other row is left to the caller as a single
datagram (its codec validates it and it is written as it came).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from tunneld.encap.checksum import internet_checksum
from tunneld.offload import layout as L
from tunneld.offload.segment import _sum_le
from tunneld.offload.vnet import (
    F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, HDR, TCP_CSUM_OFFSET, UDP_CSUM_OFFSET,
)

_U8 = np.uint8
_U64 = np.uint64
IP_MAX = 65535
MIN_PACKET = 20 + L.UDP_HLEN  # the shortest IP packet that could be part of a run
CANDIDATES_MIN = 12  # rows left behind one that heads no run, from which a NumPy pass picks the heads (plan)


class SuperFrame(NamedTuple):
    iov: list  # buffers to write with one writev: virtio_net_hdr, headers, payloads
    segments: int  # how many datagrams it stands for
    inner_bytes: int  # their inner frames' bytes, for the counters


def _be16(b, at: int, v: int) -> None:
    b[at] = v >> 8
    b[at + 1] = v & 0xFF


class Coalescer:
    """``l2``: the rows carry Ethernet frames (TAP) or bare IP packets (TUN). ``prefix6``: the encapsulation
    header expected in front of IPv6 packets where it differs from ``prefix`` (GRE names the inner protocol)."""

    def __init__(self, prefix: bytes, uso: bool = True, *, prefix6: bytes | None = None, l2: bool = True) -> None:
        self.uso = uso  # the kernel takes GSO UDP_L4 writes (Linux 6.2+, where TUNSETOFFLOAD accepts USO)
        self.prefix = np.frombuffer(bytes(prefix), _U8)
        self.prefix6 = self.prefix if prefix6 is None else np.frombuffer(bytes(prefix6), _U8)
        self._prefix_bytes = bytes(prefix)
        self._prefix6_bytes = bytes(self.prefix6)
        if len(self._prefix6_bytes) != len(self._prefix_bytes):
            raise ValueError("the IPv4 and IPv6 prefixes must have the same length")
        self.p = len(prefix)
        self.l2 = l2
        self._parse = L.parse if l2 else L.parse_ip
        self._min_frame = (L.ETH_HLEN if l2 else 0) + MIN_PACKET
        self._steps = np.arange(1 << 11, dtype=np.uint32)  # more than the rows of a 64 KiB read
        self._varying_cache: dict[tuple[int, int, bool], np.ndarray] = {}
        self._fixed_cache: dict[tuple[int, int, bool, int], np.ndarray] = {}

    def plan(self, rx: np.ndarray, n: int, rowlen: int) -> list:
        """What to write for the ``n`` bytes at the start of ``rx`` (a uint8 array with at least ``rowlen``
        spare bytes after ``n``): a list of ``(start, end)`` single datagrams and ``SuperFrame``s, in order."""
        if rowlen <= 0 or rowlen >= n:
            return [(0, n)]
        nrows = -(-n // rowlen)
        if rowlen < self.p + self._min_frame:  # too short to hold the headers we look at: every row alone
            return [(i * rowlen, min(n, (i + 1) * rowlen)) for i in range(nrows)]
        tail = n - (nrows - 1) * rowlen
        rx[n : nrows * rowlen] = 0  # pad the short last row: zeros add nothing to sums
        rows = rx[: nrows * rowlen].reshape(nrows, rowlen)
        mv = memoryview(rx)  # plain ints when indexed (NumPy's uint8 would overflow on << 8)
        # The common case, one run over the whole read, costs one parse and one _run: rows that match the head's
        # header bytes (the encapsulation header included) need no other look.
        first = self._head(mv, 0, rowlen)
        out: list = []
        k = 1
        if first is not None:
            run, lay = first
            k = run(rows, lay, tail)
            if k == nrows:
                return [self._superframe(rows, lay, tail)]
            if k > 1:  # a run that ended early (a PSH, the 64 KiB limit, another flow): the rest is planned below
                out.append(self._superframe(rows[:k], lay, rowlen))
        candidate = None
        i = 0
        while True:
            if k == 1:
                out.append((i * rowlen, i * rowlen + (rowlen if i < nrows - 1 else tail)))
                # A row that heads no run: where CANDIDATES_MIN or more are left behind it, one NumPy pass tells
                # which of them could (it costs ~55 us whatever the count, a row's parse ~5: mostly what is left is
                # a few ACKs, or a run).
                if candidate is None and nrows - i > CANDIDATES_MIN:
                    candidate = self._candidates(rows)
            i += k
            if i >= nrows:
                return out
            k = 1
            if i < nrows - 1 and (candidate is None or candidate[i]):
                head = self._head(mv, i * rowlen, rowlen)
                if head is not None:
                    run, lay = head
                    k = run(rows[i:], lay, tail)
                    if k > 1:
                        out.append(self._superframe(rows[i : i + k], lay, tail if i + k == nrows else rowlen))

    def _candidates(self, rows: np.ndarray) -> np.ndarray:
        """Which rows could head a run: one look at the encapsulation header, EtherType (or IP version) and
        protocol of every row, so that a batch of other datagrams costs no Python parsing per row."""
        p = self.p
        udp = L.PROTO_UDP if self.uso else L.PROTO_TCP
        good4 = (rows[:, :p] == self.prefix).all(axis=1)
        good6 = good4 if self.prefix6 is self.prefix else (rows[:, :p] == self.prefix6).all(axis=1)
        l3 = p + (L.ETH_HLEN if self.l2 else 0)
        proto4 = rows[:, l3 + L.IPV4_PROTO_OFFSET]
        proto6 = rows[:, l3 + L.IPV6_NEXT_OFFSET]
        if self.l2:
            et_hi, et_lo = rows[:, p + L.ETHERTYPE_OFFSET], rows[:, p + L.ETHERTYPE_OFFSET + 1]
            v4 = (et_hi == 0x08) & (et_lo == 0x00)
            v6 = (et_hi == 0x86) & (et_lo == 0xDD)
            # _head parses what is behind the tags, and checks the prefix for its IP version
            vlan = (good4 | good6) & (((et_hi == 0x81) & (et_lo == 0x00)) | ((et_hi == 0x88) & (et_lo == 0xA8)))
        else:
            version = rows[:, l3] >> 4
            v4, v6, vlan = version == 4, version == 6, False
        l4_known = good4 & v4 & ((proto4 == L.PROTO_TCP) | (proto4 == udp))
        l4_known |= good6 & v6 & ((proto6 == L.PROTO_TCP) | (proto6 == udp) | (proto6 == L.IPV6_HOP_BY_HOP)
                                  | (proto6 == L.IPV6_DEST_OPTS) | (proto6 == L.IPV6_ROUTING))
        return l4_known | vlan

    def _head(self, mv: memoryview, start: int, end: int):
        """(run function, layout) when the row at ``start`` can head a run, else None."""
        p = self.p
        lay = self._parse(mv[start + p : start + end])
        if lay.__class__ is str:
            return None
        if mv[start : start + p] != (self._prefix6_bytes if lay.v6 else self._prefix_bytes):
            return None
        if lay.proto == L.PROTO_TCP:
            return self._run, lay
        return (self._run_udp, lay) if self.uso else None

    def _head_consistent(self, head: np.ndarray, lay: L.Layout, rowlen: int) -> bool:
        """Whether a full head row says of itself what its row length says: IP length (and UDP length) equal to
        the bytes it occupies, and, for IPv4, a valid header checksum.

        Runs are checked against the head, and the merged super-frame gets fresh lengths and a fresh IPv4
        checksum, so without this a head padded behind its IP packet (short Ethernet frames are) would have its
        padding delivered as payload, and a head with a damaged IPv4 header would be repaired and delivered."""
        p = self.p
        l3, l4 = p + lay.l3, p + lay.l4
        if lay.v6:
            base, at = l3 + L.IPV6_HLEN, l3 + L.IPV6_PLEN_OFFSET  # extension headers count as payload
        else:
            base, at = l3, l3 + L.IPV4_TOTLEN_OFFSET
            if int.from_bytes(head[l3:l4].tobytes(), "big") % 0xFFFF:  # a valid header sums to 0xFFFF
                return False
        if (int(head[at]) << 8 | int(head[at + 1])) != rowlen - base:
            return False
        if lay.proto == L.PROTO_UDP:
            at = l4 + L.UDP_LEN_OFFSET
            return (int(head[at]) << 8 | int(head[at + 1])) == rowlen - l4
        return True

    def _run(self, rows: np.ndarray, lay: L.Layout, tail: int) -> int:
        """How many rows, from the head ``rows[0]``, form one in-order run of one TCP flow.

        Every row but the last is full, like the head, so its IP length field must equal the head's and is
        compared with the other header bytes; only a short last row needs its own length check."""
        p = self.p
        m, rowlen = rows.shape
        l3, l4, hl = p + lay.l3, p + lay.l4, p + lay.hlen
        plen = rowlen - hl  # payload of a full row
        if plen <= 0 or hl >= tail:
            return 1
        head = rows[0]
        fcol = l4 + L.TCP_FLAGS_OFFSET
        if head[fcol] != L.TCP_ACK or not self._head_consistent(head, lay, rowlen):
            return 1
        # Each NumPy call costs a few microseconds whatever its size (a read is ~44 rows), so the checks are
        # folded into as few as they can be. Header bytes: every row's equal the head's where the mask keeps
        # them (not the varying fields); the head's flags are ACK and the mask leaves PSH out of them, so a
        # row that carries anything but ACK, or ACK and PSH, differs here too.
        differ = rows[:, :hl] ^ head[:hl]
        differ &= self._fixed(l3, l4, lay.v6, hl)
        if lay.v6:
            iplen_base, iplen_at = l3 + L.IPV6_HLEN, l3 + L.IPV6_PLEN_OFFSET
        else:
            iplen_base, iplen_at = l3, l3 + L.IPV4_TOTLEN_OFFSET
        if tail < rowlen:
            last = rows[-1]
            differ[-1, iplen_at] = (int(last[iplen_at]) << 8 | int(last[iplen_at + 1])) != tail - iplen_base
            differ[-1, iplen_at + 1] = 0
        seq = rows[:, l4 + L.TCP_SEQ_OFFSET : l4 + L.TCP_SEQ_OFFSET + 4].view(">u4")[:, 0]
        # The TCP checksums: a row's sum with its pseudo-header terms (< 2**26, and the sum < 2**31: no wrap).
        total = _sum_le(rows, l4, rowlen)
        total += (rowlen - l4 + lay.pseudo) * 256
        if tail < rowlen:
            total[-1] -= (rowlen - tail) * 256
        ok = total % 0xFFFF == 0
        ok &= seq - seq[0] == self._steps[:m] * plen  # uint32: wraps like sequence numbers
        ok &= ~differ.any(axis=1)  # the encapsulation header is among the bytes compared with the (valid) head's
        k = m if ok.all() else int(ok.argmin())
        if k == 0:
            return 1
        psh = rows[:k, fcol] & L.TCP_PSH
        first = int(psh.argmax())
        if psh[first]:
            k = first + 1
        k = min(k, (IP_MAX - (hl - iplen_base)) // plen)  # the IP length field's limit
        return max(k, 1)

    def _run_udp(self, rows: np.ndarray, lay: L.Layout, tail: int) -> int:
        """How many rows, from the head, are datagrams of one UDP flow with equal headers (but for the IPv4
        ID and the checksums) and valid checksums: the kernel cuts them apart again (USO) on the way in."""
        p = self.p
        m, rowlen = rows.shape
        l3, l4, hl = p + lay.l3, p + lay.l4, p + lay.hlen
        plen = rowlen - hl
        if plen <= 0 or hl >= tail:
            return 1
        head = rows[0]
        if not self._head_consistent(head, lay, rowlen):
            return 1
        differ = rows[:, :hl] != head[:hl]
        ccol = l4 + L.UDP_CSUM_OFFSET
        varying = [ccol, ccol + 1] + ([] if lay.v6 else [l3 + o for o in (4, 5, 10, 11)])
        differ[:, varying] = False
        iplen_base, iplen_at = (l3 + L.IPV6_HLEN, l3 + L.IPV6_PLEN_OFFSET) if lay.v6 else (l3, l3 + L.IPV4_TOTLEN_OFFSET)
        if tail < rowlen:
            last = rows[-1]
            ulen_at = l4 + L.UDP_LEN_OFFSET
            differ[-1, iplen_at : iplen_at + 2] = (int(last[iplen_at]) << 8 | int(last[iplen_at + 1])) != tail - iplen_base
            differ[-1, ulen_at : ulen_at + 2] = (int(last[ulen_at]) << 8 | int(last[ulen_at + 1])) != tail - l4
        ok = ~differ.any(axis=1)  # the encapsulation header is among the bytes compared with the (valid) head's
        sums = _sum_le(rows, l4, rowlen) % 0xFFFF
        total = sums + (rowlen - l4 + lay.pseudo) * 256
        if tail < rowlen:
            total[-1] = sums[-1] + (tail - l4 + lay.pseudo) * 256
        no_csum = (rows[:, ccol] == 0) & (rows[:, ccol + 1] == 0)  # IPv4 may send none; IPv6 may not
        ok &= (total % 0xFFFF == 0) | (no_csum if not lay.v6 else False)
        k = m if ok.all() else int(ok.argmin())
        return max(1, min(k, (IP_MAX - (hl - iplen_base)) // plen))

    def _varying(self, l3: int, l4: int, v6: bool) -> np.ndarray:
        """Header columns that differ between segments of one flow (cached per layout)."""
        key = (l3, l4, v6)
        cols = self._varying_cache.get(key)
        if cols is None:
            tcp = [l4 + L.TCP_SEQ_OFFSET + j for j in range(4)]
            tcp += [l4 + L.TCP_CSUM_OFFSET, l4 + L.TCP_CSUM_OFFSET + 1, l4 + L.TCP_FLAGS_OFFSET]
            ip = [] if v6 else [l3 + o for o in (4, 5, 10, 11)]  # IPv4 ID and header checksum
            cols = self._varying_cache[key] = np.array(tcp + ip)
        return cols

    def _fixed(self, l3: int, l4: int, v6: bool, hl: int) -> np.ndarray:
        """The mask of what must not differ from the head in a TCP run's ``hl`` header bytes: every bit but the
        varying fields' and, in the flags, PSH's (cached per layout)."""
        key = (l3, l4, v6, hl)
        mask = self._fixed_cache.get(key)
        if mask is None:
            mask = np.full(hl, 0xFF, _U8)
            mask[self._varying(l3, l4, v6)] = 0
            mask[l4 + L.TCP_FLAGS_OFFSET] = 0xFF ^ L.TCP_PSH
            self._fixed_cache[key] = mask
        return mask

    def _superframe(self, rows: np.ndarray, lay: L.Layout, last_len: int) -> SuperFrame:
        p = self.p
        k, rowlen = rows.shape
        hl = p + lay.hlen
        plen = rowlen - hl
        last_plen = last_len - hl
        payload = plen * (k - 1) + last_plen
        hdr = bytearray(rows[0, p:hl].tobytes())
        l3, l4 = lay.l3, lay.l4
        if lay.v6:
            _be16(hdr, l3 + L.IPV6_PLEN_OFFSET, lay.hlen - (l3 + L.IPV6_HLEN) + payload)
        else:
            _be16(hdr, l3 + L.IPV4_TOTLEN_OFFSET, lay.hlen - l3 + payload)
            _be16(hdr, l3 + L.IPV4_CSUM_OFFSET, 0)
            _be16(hdr, l3 + L.IPV4_CSUM_OFFSET, internet_checksum(hdr[l3:l4]))
        # CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum (not complemented), the kernel adds the rest.
        s = (lay.pseudo + lay.hlen - l4 + payload) % 0xFFFF
        if lay.proto == L.PROTO_TCP:
            hdr[l4 + L.TCP_FLAGS_OFFSET] |= int(rows[-1, p + l4 + L.TCP_FLAGS_OFFSET]) & L.TCP_PSH
            _be16(hdr, l4 + L.TCP_CSUM_OFFSET, s or 0xFFFF)
            gso_type, csum_offset = (GSO_TCPV6 if lay.v6 else GSO_TCPV4), TCP_CSUM_OFFSET
        else:
            _be16(hdr, l4 + L.UDP_LEN_OFFSET, lay.hlen - l4 + payload)
            _be16(hdr, l4 + L.UDP_CSUM_OFFSET, s or 0xFFFF)
            gso_type, csum_offset = GSO_UDP_L4, UDP_CSUM_OFFSET
        vnet = HDR.pack(F_NEEDS_CSUM, gso_type, lay.hlen, plen, l4, csum_offset)
        if last_plen == plen:
            iov = [vnet, hdr, np.ascontiguousarray(rows[:, hl:])]
        else:
            iov = [vnet, hdr, np.ascontiguousarray(rows[:-1, hl:]), rows[-1, hl:last_len]]
        return SuperFrame(iov, k, k * lay.hlen + payload)

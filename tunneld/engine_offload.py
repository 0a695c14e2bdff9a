"""The data path with kernel offloads: super-frames in and out of the device, many packets per system call on
the underlay (UDP GSO/GRO for VXLAN; sendmmsg/recvmmsg for raw IP, which has neither: tunneld/io/raw.py).

Same wiring and rules as engine.py (which stays the plain path, used with --no-offload); what changes:

Outbound, on each wake-up of the device fd, up to ``batch`` reads:
  1. read ``virtio_net_hdr`` + frame into the buffer so that the frame starts at ``HEADROOM``;
  2. a plain frame (gso_type NONE) gets its checksum finished if the kernel left it partial (NEEDS_CSUM)
     and its header in the headroom; frames of one flow and size wait and leave together in one send;
  3. a super-frame is cut by the Segmenter into encapsulated packets (headers, checksums, encapsulation) laid
     back to back, sent with one sendmsg carrying UDP_SEGMENT (or one sendmmsg).

Inbound, on each wake-up of the socket, up to ``batch`` reads:
  1. one read returns up to 64 packets of one size back to back (UDP_GRO, or a run out of a recvmmsg);
  2. the Coalescer finds runs of in-order segments of one TCP flow (or datagrams of one UDP flow, where the
     kernel has USO): each run is written as one super-frame with a GSO virtio_net_hdr; every other packet
     is decapsulated by the codec (which drops bad ones by reason) and written alone behind an empty
     virtio_net_hdr.

Counters stay per packet on the wire: tx/rx packets and bytes count datagrams and their inner frames, as the
plain path does, whatever was batched. ``tx_batches``/``rx_batches`` count system-call reads per wake-up.
A super-frame the segmenter cannot cut (headers it does not parse) takes the plain path where it fits one
packet, counted in ``offload_fallbacks``; a larger one has no way out and is dropped, counted as
``offload_unsupported`` (never silently).
"""

from __future__ import annotations

import copy
import errno

import numpy as np

from tunneld.encap.base import DeviceKind, Drop
from tunneld.engine import HEADROOM, MAX_PACKET, Engine
from tunneld.io.device import TUN_F_USO4
from tunneld.offload.coalesce import Coalescer
from tunneld.offload.segment import Segmenter
from tunneld.offload.vnet import F_NEEDS_CSUM, GSO_NONE, HDR, NO_OFFLOAD, VNET_HDR_LEN, finish_checksum

RX_AREA = 1 << 16  # a UDP_GRO read is at most 64 KiB
GATHER_MIN = 64  # shorter datagrams are not gathered: no run of segments is made of them
# A UDP_SEGMENT send whose segments exceed the path MTU fails with EINVAL (udp_send_skb), not EMSGSIZE.
TOO_BIG_ERRNOS = (errno.EMSGSIZE, errno.EINVAL)
# Bytes one wake-up may take in before it yields to the loop. A count of reads alone is no bound once a read
# can be a 64 KiB super-frame: 32 of them are ~3 ms of Python during which the other direction (a ping reply,
# an ACK) waits. Measured with one TCP stream plus ping on this 2-core machine: with only the 32-read bound,
# ping p50/p90 ~4/7.5 ms; with this budget ~3/5 ms, at the same ~3.3 Gbit/s.
WAKEUP_BYTES = 256 << 10
# Reads per wake-up. Small frames wait in ``pend`` and leave together at the wake-up's end, so this bounds how
# many share one send: 64 rather than the plain path's 32 took UDP with 64-byte payloads from ~90 to ~125 kpps
# (3 alternating rounds in one testbed; 128 gained nothing more). Super-frames stay bounded by WAKEUP_BYTES.
OFFLOAD_BATCH = 64


def _probe(codec, first: int) -> bytes | None:
    """The header ``codec.encap`` writes in front of a frame starting with byte ``first``, if it is the same for
    frames that differ everywhere else, length included; None if it is not (a checksum, a counter, a length) or
    the codec refuses."""
    try:
        codec = copy.deepcopy(codec)  # encap may advance state (GRE sequence numbers): probe a copy
    except Exception:  # a plugin holding what cannot be copied: it keeps the plain path
        return None
    prefixes = set()
    for step, size in ((1, 60), (3, 60), (5, 201)):
        buf = bytearray(HEADROOM) + bytes([first]) + bytes(i * step & 0xFF for i in range(1, size))
        start = codec.encap(buf, HEADROOM, len(buf))
        if start.__class__ is Drop:
            return None
        prefixes.add(bytes(buf[start:HEADROOM]))
    return prefixes.pop() if len(prefixes) == 1 else None


def constant_prefixes(codec) -> tuple[bytes, bytes] | None:
    """The header ``codec.encap`` lays before an IPv4 and before an IPv6 frame, when it depends on nothing
    else: the segmenter lays it before every row, the coalescer expects it there. Equal for Ethernet codecs
    (VXLAN, gretap); GRE over TUN names the inner protocol in its header. None: not constant."""
    if codec.device is DeviceKind.TAP:
        prefix = _probe(codec, 0x00)
        return None if prefix is None else (prefix, prefix)
    prefix4, prefix6 = _probe(codec, 0x45), _probe(codec, 0x60)
    if prefix4 is None or prefix6 is None or len(prefix4) != len(prefix6):
        return None
    return prefix4, prefix6


def offload_supported(codec) -> bool:
    """Whether this engine can carry ``codec``: a UDP transport (GSO/GRO) or raw IP (sendmmsg/recvmmsg), and a
    header that does not depend on the frame (it is laid before every row). GRE with checksums or sequence
    numbers has neither and takes the plain path."""
    return codec.transport.kind in ("udp", "ip") and constant_prefixes(codec) is not None


class OffloadEngine(Engine):
    def __init__(self, device, link, codec, **kw) -> None:
        kw.setdefault("batch", OFFLOAD_BATCH)
        super().__init__(device, link, codec, **kw)
        prefix, prefix6 = constant_prefixes(codec)
        l2 = codec.device is DeviceKind.TAP
        self._prefix_len = len(prefix)
        self._segmenter = Segmenter(prefix, prefix6=prefix6, l2=l2)
        # UDP runs are written as USO super-frames only where the kernel showed it knows them (TUNSETOFFLOAD).
        uso = bool(getattr(device, "offloads", TUN_F_USO4) & TUN_F_USO4)
        self._coalescer = Coalescer(prefix, uso=uso, prefix6=prefix6, l2=l2)
        # Gathered datagrams (up to RX_AREA), then room for one more read of up to RX_AREA, then for padding.
        self._rx = np.zeros(3 * RX_AREA + 2048, np.uint8)
        self._rxview = memoryview(self._rx)
        # Plain packets waiting for one UDP_SEGMENT send: a wake-up reads until WAKEUP_BYTES, so they are at most
        # that plus one last frame with its header (send_segments splits them into the kernel's per-call limits).
        self._pend = bytearray(WAKEUP_BYTES + HEADROOM + MAX_PACKET)
        self._pend_view = memoryview(self._pend)
        # Where the kernel cannot coalesce, reads are single datagrams and are gathered (below). The largest packet
        # the peer should send us sizes raw IP's receive slots.
        link.enable_gro(max_packet=self.max_frame + codec.header_len)

    def on_device_readable(self) -> None:
        stats = self.stats
        drops = stats.drops
        buf, view = self._txbuf, self._txview
        vnet_at = HEADROOM - VNET_HDR_LEN
        read_area = view[vnet_at : HEADROOM + MAX_PACKET]
        read_into = self.device.read_into
        send_segments = self.link.send_segments
        split = self._segmenter.split
        encap = self.codec.encap
        flow_hash = self._flow_hash
        max_frame = self.max_frame
        unpack = HDR.unpack_from
        # Plain frames of one flow and one size (a UDP stream, a run of ACKs) wait in ``pend`` and leave
        # with one send (UDP_SEGMENT, or sendmmsg): the per-packet cost becomes a ~100-byte copy, not a system call.
        pend, pend_view = self._pend, self._pend_view
        pend_len = pend_size = pend_count = 0
        pend_flow = -1
        reads = moved = nbytes = 0
        taken = 0
        for _ in range(self.batch):
            if taken >= WAKEUP_BYTES:
                break
            try:
                n = read_into(read_area)
            except BlockingIOError:
                break
            except OSError as e:
                drops[Drop.DEVICE_READ_ERROR] += 1
                self._device_failed(e)
                break
            reads += 1
            taken += n
            end = vnet_at + n
            flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = unpack(buf, vnet_at)
            frame = view[HEADROOM:end]
            fallback = False
            if gso_type != GSO_NONE:
                if pend_count:
                    moved += self._flush(pend_view[:pend_len], pend_size, pend_flow, pend_count)
                    pend_len = pend_count = 0
                segs = split(frame, gso_type, gso_size)
                if segs.__class__ is not str:
                    if segs.rowlen - self._prefix_len > max_frame:
                        drops[Drop.TOO_BIG] += segs.count
                        continue
                    try:
                        send_segments(segs.buffer, segs.rowlen, flow_hash(frame))
                    except OSError as e:
                        sent = getattr(e, "sent", 0)  # full rows that left before the failing call
                        drops[Drop.TOO_BIG if e.errno in TOO_BIG_ERRNOS else Drop.SOCKET_ERROR] += segs.count - sent
                        moved += sent
                        nbytes += sent * (segs.rowlen - self._prefix_len)
                        continue
                    moved += segs.count
                    nbytes += segs.inner_bytes
                    continue
                if end - HEADROOM > max_frame:  # a super-frame we cannot cut has no other way out
                    drops[Drop.OFFLOAD_UNSUPPORTED] += 1
                    continue
                fallback = True  # it fits one packet: the plain path below takes it (counted once queued)
            if flags & F_NEEDS_CSUM and not finish_checksum(frame, csum_start, csum_offset):
                drops[Drop.OFFLOAD_UNSUPPORTED] += 1
                continue
            if end - HEADROOM > max_frame:
                drops[Drop.TOO_BIG] += 1
                continue
            start = encap(buf, HEADROOM, end)
            if start.__class__ is Drop:  # a frame the codec cannot carry (GRE: neither IPv4 nor IPv6)
                drops[start] += 1
                continue
            size = end - start
            flow = flow_hash(frame)
            if pend_count and (size != pend_size or flow != pend_flow):
                moved += self._flush(pend_view[:pend_len], pend_size, pend_flow, pend_count)
                pend_len = pend_count = 0
            pend[pend_len : pend_len + size] = buf[start:end]
            pend_len += size
            pend_size, pend_flow = size, flow
            pend_count += 1
            nbytes += end - HEADROOM
            if fallback:
                stats.offload_fallbacks += 1
        if pend_count:
            moved += self._flush(pend_view[:pend_len], pend_size, pend_flow, pend_count)
        stats.tx_packets += moved
        stats.tx_bytes += nbytes
        stats.tx_batches[reads] += 1

    def _flush(self, packets: memoryview, size: int, flow: int, count: int) -> int:
        """Send the pending plain packets (all ``size`` bytes); returns how many left."""
        try:
            self.link.send_segments(packets, size, flow)
        except OSError as e:
            sent = getattr(e, "sent", 0)
            self.stats.drops[Drop.TOO_BIG if e.errno in TOO_BIG_ERRNOS else Drop.SOCKET_ERROR] += count - sent
            # their bytes were counted when queued; take back those of the packets that did not cross
            self.stats.tx_bytes -= (count - sent) * (size - self._prefix_len)
            return sent
        return count

    def on_link_readable(self) -> None:
        """Drain the socket. Datagrams the kernel did not coalesce (no UDP GRO on the way in, e.g. a kernel
        VXLAN peer over a device without GRO) are gathered here instead: consecutive reads of one length are
        laid back to back, as a UDP_GRO read would be, and go through the same plan."""
        stats = self.stats
        drops = stats.drops
        rx, view = self._rx, self._rxview
        recv = self.link.recv_gro_into
        peer = self.link.peer
        deliver = self._deliver
        reads = moved = nbytes = 0
        fill = row = 0  # gathered single datagrams: rx[:fill], all ``row`` bytes long but maybe the last
        closed = False  # a shorter datagram ended the gathering
        taken = 0
        for _ in range(self.batch):
            if taken >= WAKEUP_BYTES:
                break
            if fill > RX_AREA:
                m, b = deliver(0, fill, row)
                moved, nbytes, fill = moved + m, nbytes + b, 0
            try:
                n, source, size = recv(view[fill : fill + RX_AREA])
            except BlockingIOError:
                break
            except OSError:
                drops[Drop.SOCKET_ERROR] += 1
                continue
            reads += 1
            taken += n
            if source != peer:
                drops[Drop.UNKNOWN_PEER] += -(-n // size) if size else 1
                continue
            single = not size or n <= size
            if single and n < GATHER_MIN:
                single = False  # too short to be part of a run: delivered alone, right away (the codec judges it)
                size = n
            if single and fill and not closed and n <= row:
                fill += n  # gathered behind the others
                closed = n < row
                continue
            if fill:
                # Deliver what was gathered first (order!), keeping the new read out of reach of the padding
                # the plan writes after the gathered rows; then the new read starts at 0.
                saved = rx[fill : fill + n].copy()
                m, b = deliver(0, fill, row)
                moved, nbytes = moved + m, nbytes + b
                rx[:n] = saved
            if single:
                fill, row, closed = n, n, False
                continue
            m, b = deliver(0, n, size)
            moved, nbytes, fill = moved + m, nbytes + b, 0
        if fill:
            m, b = deliver(0, fill, row)
            moved, nbytes = moved + m, nbytes + b
        if moved:
            stats.peer_last_rx = self._clock()
        stats.rx_packets += moved
        stats.rx_bytes += nbytes
        stats.rx_batches[reads] += 1
        if self._loop is not None and getattr(self.link, "buffered", False):
            # The wake-up's budget ran out with packets the link took from the kernel in hand (raw IP's recvmmsg):
            # no poll would report them, so come back for them on the next turn of the loop.
            self._loop.call_soon(self.on_link_readable)

    def _deliver(self, offset: int, n: int, size: int) -> tuple[int, int]:
        """Write the ``n`` bytes of datagrams of ``size`` at ``rx[offset:]`` to the device: (frames, bytes)."""
        drops = self.stats.drops
        view = self._rxview
        writev = self.device.writev
        decap = self.codec.decap
        moved = nbytes = 0
        plan = self._coalescer.plan(self._rx[offset:], n, size) if 0 < size < n else ((0, n),)
        for item in plan:
            if item.__class__ is tuple:
                start, stop = item
                packet = view[offset + start : offset + stop]
                verdict = decap(packet)
                if verdict.__class__ is Drop:
                    drops[verdict] += 1
                    continue
                try:
                    writev((NO_OFFLOAD, packet[verdict:]))
                except OSError:
                    drops[Drop.DEVICE_WRITE_ERROR] += 1
                    continue
                moved += 1
                nbytes += stop - start - verdict
            else:
                try:
                    writev(item.iov)
                except OSError:
                    drops[Drop.DEVICE_WRITE_ERROR] += item.segments
                    continue
                moved += item.segments
                nbytes += item.inner_bytes
        return moved, nbytes

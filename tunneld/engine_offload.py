"""The data path with kernel offloads: super-frames in and out of the device, UDP GSO/GRO on the underlay.

Same wiring and rules as engine.py (which stays the plain path, used with --no-offload); what changes:

Outbound, on each wake-up of the device fd, up to ``batch`` reads:
  1. read ``virtio_net_hdr`` + frame into the buffer so that the frame starts at ``HEADROOM``;
  2. a plain frame (gso_type NONE) gets its checksum finished if the kernel left it partial (NEEDS_CSUM),
     then takes the plain path: header in the headroom, one sendto;
  3. a super-frame is cut by the Segmenter into VXLAN datagrams (headers, checksums, encapsulation) laid
     back to back, sent with one or two sendmsg carrying UDP_SEGMENT.

Inbound, on each wake-up of the socket, up to ``batch`` reads:
  1. one recvmsg returns up to 64 coalesced datagrams (UDP_GRO) and their size;
  2. the Coalescer finds runs of in-order segments of one TCP flow: each run is written as one super-frame
     with a GSO virtio_net_hdr; every other datagram is decapsulated by the codec (which drops bad ones by
     reason) and written alone behind an empty virtio_net_hdr.

Counters stay per packet on the wire: tx/rx packets and bytes count datagrams and their inner frames, as the
plain path does, whatever was batched. ``tx_batches``/``rx_batches`` count system-call reads per wake-up.
A frame the offload path cannot handle is dropped and counted as ``offload_unsupported`` (never silently).
"""

from __future__ import annotations

import errno

import numpy as np

from tunneld.encap.base import Drop
from tunneld.engine import HEADROOM, MAX_PACKET, Engine
from tunneld.offload.coalesce import Coalescer
from tunneld.offload.segment import Segmenter
from tunneld.offload.vnet import F_NEEDS_CSUM, GSO_NONE, HDR, NO_OFFLOAD, VNET_HDR_LEN, finish_checksum

RX_AREA = 1 << 16  # a UDP_GRO read is at most 64 KiB


def constant_prefix(codec) -> bytes:
    """The header ``codec.encap`` writes, which for VXLAN is the same for every frame."""
    scratch = bytearray(HEADROOM)
    start = codec.encap(scratch, HEADROOM, HEADROOM)
    return bytes(scratch[start:HEADROOM])


class OffloadEngine(Engine):
    def __init__(self, device, link, codec, **kw) -> None:
        super().__init__(device, link, codec, **kw)
        prefix = constant_prefix(codec)
        self._prefix_len = len(prefix)
        self._segmenter = Segmenter(prefix)
        self._coalescer = Coalescer(prefix)
        self._rx = np.zeros(2 * RX_AREA, np.uint8)  # the second half pads a GRO read's short last row
        self._rxview = memoryview(self._rx)
        self.gro = link.enable_gro()

    def on_device_readable(self) -> None:
        stats = self.stats
        drops = stats.drops
        buf, view = self._txbuf, self._txview
        vnet_at = HEADROOM - VNET_HDR_LEN
        read_area = view[vnet_at : HEADROOM + MAX_PACKET]
        read_into = self.device.read_into
        send = self.link.send
        send_segments = self.link.send_segments
        split = self._segmenter.split
        encap = self.codec.encap
        flow_hash = self._flow_hash
        max_frame = self.max_frame
        unpack = HDR.unpack_from
        reads = moved = nbytes = 0
        for _ in range(self.batch):
            try:
                n = read_into(read_area)
            except BlockingIOError:
                break
            except OSError:
                drops[Drop.DEVICE_READ_ERROR] += 1
                break
            reads += 1
            end = vnet_at + n
            flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = unpack(buf, vnet_at)
            frame = view[HEADROOM:end]
            try:
                if gso_type == GSO_NONE:
                    if flags & F_NEEDS_CSUM and not finish_checksum(frame, csum_start, csum_offset):
                        drops[Drop.OFFLOAD_UNSUPPORTED] += 1
                        continue
                    if end - HEADROOM > max_frame:
                        drops[Drop.TOO_BIG] += 1
                        continue
                    start = encap(buf, HEADROOM, end)
                    send(view[start:end], flow_hash(frame))
                    moved += 1
                    nbytes += end - HEADROOM
                    continue
                segs = split(frame, gso_type, gso_size)
                if segs.__class__ is str:
                    drops[Drop.OFFLOAD_UNSUPPORTED] += 1
                    continue
                if segs.rowlen - self._prefix_len > max_frame:
                    drops[Drop.TOO_BIG] += segs.count
                    continue
                send_segments(segs.buffer, segs.rowlen, flow_hash(frame))
                moved += segs.count
                nbytes += segs.inner_bytes
            except OSError as e:
                drops[Drop.TOO_BIG if e.errno == errno.EMSGSIZE else Drop.SOCKET_ERROR] += 1
        stats.tx_packets += moved
        stats.tx_bytes += nbytes
        stats.tx_batches[reads] += 1

    def on_link_readable(self) -> None:
        stats = self.stats
        drops = stats.drops
        rx, view = self._rx, self._rxview
        area = view[:RX_AREA]
        recv = self.link.recv_gro_into
        writev = self.device.writev
        decap = self.codec.decap
        plan = self._coalescer.plan
        peer = self.link.peer
        reads = moved = nbytes = 0
        for _ in range(self.batch):
            try:
                n, source, size = recv(area)
            except BlockingIOError:
                break
            except OSError:
                drops[Drop.SOCKET_ERROR] += 1
                continue
            reads += 1
            if source != peer:
                drops[Drop.UNKNOWN_PEER] += -(-n // size) if size else 1
                continue
            for item in plan(rx, n, size):
                if item.__class__ is tuple:
                    start, stop = item
                    packet = view[start:stop]
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
        if moved:
            stats.peer_last_rx = self._clock()
        stats.rx_packets += moved
        stats.rx_bytes += nbytes
        stats.rx_batches[reads] += 1

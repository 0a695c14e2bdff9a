"""The device side of the data path: ports that read and write frames of a TUN/TAP device.

The engine (tunneld/datapath/engine.py) reads frames into its buffer behind headroom and writes frames and rows; it
never looks at a virtio_net_hdr. Two ports answer it:

``FramePort`` (offloads off, batches of one): one read is one frame; one write is one frame.

``VnetPort`` (IFF_VNET_HDR + TUNSETOFFLOAD): the 10-byte ``virtio_net_hdr`` is read into the headroom, in
front of the frame, and dealt with here:
  - a plain frame whose checksum the kernel left partial (NEEDS_CSUM) gets it finished; the engine then
    sees a plain frame;
  - a super-frame, where the kernel segments them for us (``egress``, an io/egress.py EgressTap), is left
    whole: ``Super(n)``, carrying its vnet fields (``gso``); the engine hands it to the egress device for one
    peer, or asks ``cut(super)`` for the rows below when it cannot (flooded, or the egress refuses that one);
  - otherwise a super-frame (gso_type TCPV4/TCPV6/UDP_L4) is cut by the Segmenter into rows that each carry the codec's
    constant header (declared by the codec, ``Encapsulator.constant_header``): the engine sends them as one
    row buffer. One the segmenter cannot cut but that fits one packet is handed on as a plain frame marked
    ``Fallback`` (counted by the engine); a larger one has no way out (``Drop.OFFLOAD_UNSUPPORTED``);
  - rows received (a UDP_GRO read, a run out of recvmmsg, datagrams gathered by the engine) come with the
    codec's verdict on each: ``write_rows`` writes the rows the codec accepted, consecutive accepted rows
    coalesced by the Coalescer into super-frames where they are in-order segments of one flow, and counts
    each refused row by its reason. A refused row breaks a run: nothing reaches the device unjudged. It says
    whether every row went out as one super-frame (``merged``), which the engine's MAC learning uses.

The system calls are taken from the device object when it offers them (``sys_readv``, ``sys_write``,
``sys_writev``, as tunneld.testing's fake devices do), so tests run this very code; a real ``Device`` has
only its fd and the os functions are used.
"""

from __future__ import annotations

import os
from functools import partial

from tunneld.encap.base import DeviceKind, Drop, Encapsulator, constant_headers
from tunneld.io.device import TUN_F_USO4
from tunneld.offload.coalesce import Coalescer
from tunneld.offload.layout import TCP_DOFF_OFFSET, UDP_HLEN
from tunneld.offload.segment import Segmenter
from tunneld.offload.vnet import (F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_UDP_L4, HDR, NO_OFFLOAD, VNET_HDR_LEN,
                                  finish_checksum)


class Fallback(int):
    """A super-frame the segmenter could not cut, handed on as one plain frame of this length."""

    __slots__ = ()


class Super(int):
    """A super-frame left whole for the kernel to segment, of this length. ``gso``: its vnet fields and the
    length of its headers (gso_type, gso_size, csum_start, csum_offset, header length); ``area``: the read's
    buffer, where ``cut`` finds it."""

    gso: tuple[int, int, int, int, int]
    area: memoryview


class FramePort:
    """Frames without a vnet header: ``read((area,))`` returns the frame's length (an int), ``write(frame)``
    writes one frame. Both are the system calls themselves, bound to the fd: no Python frame per packet."""

    vnet_len = 0  # bytes the port reads in front of a frame (into the engine's headroom)
    header_len = 0  # the codec's constant header in front of every row (none: this port takes no rows)

    def __init__(self, device) -> None:
        fd = device.fileno()
        self.read = partial(getattr(device, "sys_readv", os.readv), fd)
        self.write = partial(getattr(device, "sys_write", os.write), fd)


class VnetPort:
    """Frames behind a virtio_net_hdr: super-frames cut on the way out, rows coalesced on the way in."""

    vnet_len = VNET_HDR_LEN

    def __init__(self, device, codec: Encapsulator, max_frame: int, egress=None,
                 headers: tuple[bytes, bytes] | None = None) -> None:
        # ``headers``: what lies in front of each row instead of the codec's constant header (a stateful codec's
        # rows have none: each session seals its own)
        headers = constant_headers(codec) if headers is None else headers
        if headers is None:
            raise ValueError(f"{codec.name}: no constant header declared; offloads need one")
        header4, header6 = headers
        l2 = codec.device is DeviceKind.TAP
        self.header_len = len(header4)
        self._split = Segmenter(header4, prefix6=header6, l2=l2).split
        # UDP runs are written as USO super-frames only where the kernel showed it knows them (TUNSETOFFLOAD).
        uso = bool(getattr(device, "offloads", TUN_F_USO4) & TUN_F_USO4)
        self._plan = Coalescer(header4, uso=uso, prefix6=header6, l2=l2).plan
        self._max_frame = max_frame
        self._fd = device.fileno()
        self._readv = getattr(device, "sys_readv", os.readv)
        self._writev = getattr(device, "sys_writev", os.writev)
        self.egress = egress

    def read(self, areas: tuple[memoryview]):
        """One read into ``areas[0]`` (vnet header, then the frame): the plain frame's length (int, or
        Fallback), the ``Segments`` of a super-frame, or a ``Drop``. Raises BlockingIOError when there is none."""
        n = self._readv(self._fd, areas) - VNET_HDR_LEN
        area = areas[0]
        flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = HDR.unpack_from(area)
        if gso_type != GSO_NONE:
            if self.egress is not None and flags & F_NEEDS_CSUM and csum_start + 20 <= n:
                # Headers up to the end of the L4 one (hdr_len is not to be trusted): TCP says its length.
                l4 = VNET_HDR_LEN + csum_start
                hlen = csum_start + (UDP_HLEN if gso_type & ~GSO_ECN == GSO_UDP_L4
                                     else (area[l4 + TCP_DOFF_OFFSET] >> 4) * 4)
                whole = Super(n)
                whole.gso = (gso_type, gso_size, csum_start, csum_offset, hlen)
                whole.area = area
                return whole
            return self._cut(area, n, flags, gso_type, gso_size, csum_start, csum_offset)
        if flags & F_NEEDS_CSUM and not finish_checksum(area[VNET_HDR_LEN : VNET_HDR_LEN + n], csum_start,
                                                        csum_offset):
            return Drop.OFFLOAD_UNSUPPORTED
        return n

    def cut(self, whole: Super):
        """A ``Super`` of the last read, cut as ``read`` cuts without an egress: Segments, Fallback or Drop."""
        return self._cut(whole.area, whole, F_NEEDS_CSUM, *whole.gso[:4])

    def _cut(self, area: memoryview, n: int, flags: int, gso_type: int, gso_size: int, csum_start: int,
             csum_offset: int):
        frame = area[VNET_HDR_LEN : VNET_HDR_LEN + n]
        segs = self._split(frame, gso_type, gso_size)
        if segs.__class__ is not str:
            return segs
        if n > self._max_frame:  # a super-frame we cannot cut has no other way out
            return Drop.OFFLOAD_UNSUPPORTED
        if flags & F_NEEDS_CSUM and not finish_checksum(frame, csum_start, csum_offset):
            return Drop.OFFLOAD_UNSUPPORTED
        return Fallback(n)  # it fits one packet: the plain path takes it

    def write(self, frame: memoryview) -> int:
        """One plain frame, behind an empty vnet header."""
        return self._writev(self._fd, (NO_OFFLOAD, frame))

    def write_rows(self, rx, view: memoryview, n: int, size: int, verdicts: list, drops) -> tuple[int, int, bool]:
        """Write the ``n`` bytes of rows of ``size`` at the start of ``rx`` (a uint8 array; ``view`` is its
        memoryview) as the codec judged them (``verdicts``, one per row): (frames written, their inner bytes,
        merged). Refused rows are counted in ``drops`` by reason.

        ``merged``: every row was planned as one super-frame (whether its write succeeded says the count). The
        coalescer merges only rows whose headers equal the head's, the Ethernet header among them, so they all
        came from one source MAC: the engine learns it once rather than reading every row's (12 us of NumPy for
        a 44-row read)."""
        p = self.header_len
        count = len(verdicts)
        if verdicts.count(p) == count:  # the usual case: every row accepted, the header where we expect it
            return self._write_run(rx, view, 0, n, size, drops)
        return (*self._write_judged(rx, view, n, size, verdicts, drops), False)

    def _write_judged(self, rx, view: memoryview, n: int, size: int, verdicts: list, drops) -> tuple[int, int]:
        """``write_rows`` where the codec refused rows or found a header elsewhere: runs between them."""
        p = self.header_len
        count = len(verdicts)
        moved = nbytes = 0
        i = 0
        while i < count:
            verdict = verdicts[i]
            if verdict.__class__ is Drop:
                drops[verdict] += 1
                i += 1
                continue
            j = i + 1
            if verdict == p:
                while j < count and verdicts[j] == p:
                    j += 1
            start, stop = i * size, min(n, j * size)
            if j - i > 1:
                m, b, _ = self._write_run(rx, view, start, stop - start, size, drops)
                moved, nbytes = moved + m, nbytes + b
            else:  # accepted alone (or at an offset of its own): written as the codec said
                try:
                    self._writev(self._fd, (NO_OFFLOAD, view[start + verdict : stop]))
                    moved, nbytes = moved + 1, nbytes + stop - start - verdict
                except OSError:
                    drops[Drop.DEVICE_WRITE_ERROR] += 1
            i = j
        return moved, nbytes

    def _write_run(self, rx, view: memoryview, at: int, n: int, size: int, drops) -> tuple[int, int, bool]:
        """Accepted rows ``rx[at:at + n]``: coalesced where they form runs, the others written alone; (frames,
        inner bytes, whether the plan was one super-frame)."""
        p = self.header_len
        writev, fd = self._writev, self._fd
        moved = nbytes = 0
        plan = self._plan(rx[at:], n, size)
        for item in plan:
            if item.__class__ is tuple:
                start, stop = item
                try:
                    writev(fd, (NO_OFFLOAD, view[at + start + p : at + stop]))
                except OSError:
                    drops[Drop.DEVICE_WRITE_ERROR] += 1
                    continue
                moved += 1
                nbytes += stop - start - p
            else:
                try:
                    writev(fd, item.iov)
                except OSError:
                    drops[Drop.DEVICE_WRITE_ERROR] += item.segments
                    continue
                moved += item.segments
                nbytes += item.inner_bytes
        return moved, nbytes, len(plan) == 1 and plan[0].__class__ is not tuple

"""The data path: one device, one underlay link, one encapsulator.

Outbound flow (device → peer), on each wake-up of the device fd:
  1. read up to ``batch`` frames, each into the same buffer behind ``HEADROOM`` spare bytes;
  2. drop frames that could not cross the underlay without fragmenting (VTEPs never fragment);
  3. the encapsulator writes its header into the headroom, in front of the frame: no copy;
  4. send the packet from the source port the inner flow hashes to.

Inbound flow (peer → device), on each wake-up of the socket:
  1. receive up to ``batch`` datagrams, each into the same buffer;
  2. drop those not from the configured peer, then let the codec validate (drop by reason);
  3. write the inner frame, a slice of the receive buffer, to the device.

What must stay true:
- nothing that arrives can raise out of a callback: every failure is a counted drop;
- no allocation per packet beyond what the socket/os calls themselves make;
- a wake-up handles at most ``batch`` packets, so neither direction can starve the other.
"""

from __future__ import annotations

import asyncio
import errno
import time
from typing import Callable, Protocol

from tunneld.encap.base import DeviceKind, Drop, Encapsulator
from tunneld.encap.flow import ethernet_flow_hash, ip_flow_hash
from tunneld.stats import Stats

HEADROOM = 64  # enough for any encapsulation header this design expects (VXLAN 8, GRE ≤ 16)
MAX_PACKET = 65535  # the largest frame a device read or a datagram can hold
DEFAULT_BATCH = 32  # at most this many packets per wake-up (libuv reads 32 datagrams per wake-up too)


def _no_flow(frame: memoryview) -> int:
    return 0


class DevicePort(Protocol):
    def fileno(self) -> int: ...
    def read_into(self, buf: memoryview) -> int: ...
    def write(self, frame: memoryview) -> int: ...


class LinkPort(Protocol):
    peer: str
    spreads_flows: bool  # whether send() uses its flow argument (UDP source ports); raw IP has none to spread


    def fileno(self) -> int: ...
    def recv_into(self, buf: memoryview) -> tuple[int, str]: ...
    def send(self, packet: memoryview, flow: int) -> None: ...


class Engine:
    def __init__(
        self,
        device: DevicePort,
        link: LinkPort,
        codec: Encapsulator,
        *,
        max_frame: int,
        batch: int = DEFAULT_BATCH,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if codec.header_len > HEADROOM:
            raise ValueError(f"{codec.name}: header of {codec.header_len} bytes exceeds the {HEADROOM}-byte headroom")
        self.device = device
        self.link = link
        self.codec = codec
        self.max_frame = max_frame  # the largest inner frame whose encapsulation fits the underlay MTU
        self.batch = batch
        self.stats = Stats(batch)
        self._clock = clock
        if not getattr(link, "spreads_flows", True):
            self._flow_hash = _no_flow  # the ~0.8 us hash would be thrown away for every packet
        else:
            self._flow_hash = ethernet_flow_hash if codec.device is DeviceKind.TAP else ip_flow_hash
        self._txbuf = bytearray(HEADROOM + MAX_PACKET)
        self._txview = memoryview(self._txbuf)
        self._rxbuf = bytearray(MAX_PACKET)
        self._rxview = memoryview(self._rxbuf)
        self._loop: asyncio.AbstractEventLoop | None = None
        # Called once when the device is gone for good (deleted with `ip link del`): the fd then only fails.
        self.on_device_gone: Callable[[], None] | None = None

    # -- wiring ----------------------------------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.device.fileno(), self.on_device_readable)
        loop.add_reader(self.link.fileno(), self.on_link_readable)

    def detach(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.device.fileno())
            self._loop.remove_reader(self.link.fileno())
            self._loop = None

    def _device_failed(self, e: OSError) -> None:
        """A device read failed: EBADFD means the interface was deleted under us, and no read will work again."""
        if e.errno == errno.EBADFD and self.on_device_gone is not None:
            self.detach()
            self.on_device_gone()

    # -- outbound --------------------------------------------------------------------------------------------

    def on_device_readable(self) -> None:
        stats = self.stats
        drops = stats.drops
        buf, view = self._txbuf, self._txview
        frame_area = view[HEADROOM:]
        read_into = self.device.read_into
        send = self.link.send
        encap = self.codec.encap
        flow_hash = self._flow_hash
        max_frame = self.max_frame
        reads = moved = nbytes = 0
        for _ in range(self.batch):
            try:
                n = read_into(frame_area)
            except BlockingIOError:
                break
            except OSError as e:
                drops[Drop.DEVICE_READ_ERROR] += 1
                self._device_failed(e)
                break
            reads += 1
            if n > max_frame:
                drops[Drop.TOO_BIG] += 1
                continue
            end = HEADROOM + n
            start = encap(buf, HEADROOM, end)
            if start.__class__ is Drop:  # a frame the codec cannot carry (GRE: neither IPv4 nor IPv6)
                drops[start] += 1
                continue
            try:
                send(view[start:end], flow_hash(view[HEADROOM:end]))
            except OSError as e:
                drops[Drop.TOO_BIG if e.errno == errno.EMSGSIZE else Drop.SOCKET_ERROR] += 1
                continue
            moved += 1
            nbytes += n
        stats.tx_packets += moved
        stats.tx_bytes += nbytes
        stats.tx_batches[reads] += 1

    # -- inbound ---------------------------------------------------------------------------------------------

    def on_link_readable(self) -> None:
        stats = self.stats
        drops = stats.drops
        view = self._rxview
        recv_into = self.link.recv_into
        write = self.device.write
        decap = self.codec.decap
        peer = self.link.peer
        reads = moved = nbytes = 0
        for _ in range(self.batch):
            try:
                n, source = recv_into(view)
            except BlockingIOError:
                break
            except OSError:
                # A queued ICMP error or similar: not fatal, and the next datagram may be fine.
                drops[Drop.SOCKET_ERROR] += 1
                continue
            reads += 1
            if source != peer:
                drops[Drop.UNKNOWN_PEER] += 1
                continue
            packet = view[:n]
            verdict = decap(packet)
            if verdict.__class__ is Drop:
                drops[verdict] += 1
                continue
            try:
                write(packet[verdict:])
            except OSError:
                drops[Drop.DEVICE_WRITE_ERROR] += 1
                continue
            moved += 1
            nbytes += n - verdict
        if moved:
            stats.peer_last_rx = self._clock()
        stats.rx_packets += moved
        stats.rx_bytes += nbytes
        stats.rx_batches[reads] += 1

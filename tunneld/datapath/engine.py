"""The data path: one device port, one underlay link, one encapsulator, a table of peers.

Two ways through, chosen by what the codec declares (tunneld/encap/base.py, tunneld/encap/session.py):
- a stateless codec (VXLAN, GRE without sequence numbers, header-only plugins) lays the same header in front
  of every frame for every peer: the flows below, batched, where ``encap``/``decap_batch`` (and the codec's
  constant header, for the offload rows) serve all peers at once;
- a stateful codec keeps a session per peer (``Peer.session``): each frame is sealed by its peer's session and
  each datagram opened by the session of the peer it names (``_sealed_device_readable``,
  ``_opened_link_readable``), one by one; the codec's own packets (a keepalive, a handshake) leave when a
  session's ``deadline`` comes (``run_timers``, on one loop timer); a session that authenticates its packets
  may move its peer's endpoint to where an accepted datagram came from (roaming).
  With offloads, a stateful codec that declares ``rows`` (WireGuard) batches too: a super-frame is cut
  into rows with nothing in front, its peer's session seals them all into ``_sealed`` (``seal_rows``: counters
  in row order) and they leave in one send (``_seal_superframe``); inbound, the codec's ``open_rows`` judges a
  read's datagrams and writes each accepted frame into ``_plain`` right behind the one before, and the wake-up's
  frames are written together, a flow's coalesced (``_opened_rows_readable``, ``_write_opened``). A datagram
  ``open_rows`` does not take (a handshake) goes the one-by-one way, and weighs ``codec.cost`` against the
  wake-up's budget.
Both deliver single datagrams through one method (``_deliver_one``): the verdict (a session's ``open``), the
source check, the device write, the MAC learnt, the counters.

The engine moves batches; the ports hide how. With offloads (``make_engine(..., offload=True)``) the device
port (tunneld/io/port.py ``VnetPort``) reads super-frames and cuts them into rows, and the link sends rows
with one UDP_SEGMENT sendmsg or one sendmmsg and receives them with UDP_GRO or recvmmsg; without, the same
loops run with batches of one (``FramePort``, one datagram per call). The loops never see a vnet header,
GSO type or UDP_SEGMENT; all they know of batching is whether a packet may wait for others (``Pending``) and
whether single datagrams are gathered (``Gatherer``): with batches of one, neither.

Outbound flow (device → peer), on each wake-up of the device fd:
  1. read up to ``batch`` frames (and at most WAKEUP_BYTES), each into the same buffer behind ``HEADROOM``;
  2. a super-frame comes back from the port already cut into rows carrying the codec's declared constant
     header: the rows leave in one send, after whatever plain packets were waiting. Where the kernel cuts
     them (an egress device, io/egress.py), the port leaves it whole (``Super``) and it is written there
     once for its one peer; one the egress cannot take (flooded, too long) is cut into rows;
  3. a plain frame that could not cross the underlay without fragmenting is dropped (VTEPs never fragment);
     the encapsulator writes its header into the headroom, in front of the frame: no copy;
  4. the packet leaves now (batches of one), or waits in ``Pending`` with others of its flow and size and
     leaves with them in one send at the end of the wake-up, or when the next packet does not continue them.

Inbound flow (peer → device), on each wake-up of the socket:
  1. receive up to ``batch`` reads (and at most WAKEUP_BYTES): a datagram, or rows (datagrams of one length
     back to back from one source: a UDP_GRO read or a run out of recvmmsg);
  2. the source address picks the peer (none: ``unknown_peer``); single datagrams of one length from one peer
     are gathered into rows (``Gatherer``) where the device port takes rows;
  3. the codec judges EVERY datagram: ``decap`` for a single one, ``decap_batch`` for rows; in L3 modes with
     routes narrower than everything, the inner source must lie in the sending peer's routes
     (``source_not_allowed``). The device port writes what was accepted (rows coalesced into super-frames
     where they can be) and refused ones are counted by reason: a codec's refusal holds on every path;
  4. L2 modes learn each accepted frame's source MAC against its peer (the FDB, fdb.py).

Counters stay per packet on the wire: tx/rx packets and bytes count datagrams and their inner frames, however
they were batched. ``tx_batches``/``rx_batches`` count reads per wake-up.

What must stay true:
- nothing that arrives can raise out of a callback: every failure is a counted drop;
- no allocation per packet beyond what the system calls themselves make;
- a wake-up handles at most ``batch`` reads and about WAKEUP_BYTES, so neither direction starves the other.

Peers (tunneld/datapath/peers.py ``PeerTable``): outbound, L2 modes look the destination MAC up in the FDB (a miss, a
broadcast or a multicast goes to every peer: head-end replication, counted ``flooded``), L3 modes the
destination IP in the routes (longest-prefix match; none: ``no_route``). A super-frame is looked up once for
all its rows. ``Pending`` keeps one peer's packets per send. Each send names its peer's destination, built
once by the link (``destination``). With one peer that wins every look-up (``PeerTable.only``: L2, or L3
with routes covering everything) no look-up is made and its counters are added once per wake-up: the
one-peer path costs what it did before many peers.

Path MTU, as the kernel's VXLAN does it (tunneld/datapath/pmtu.py). Every frame meets two limits: the engine's
``max_frame`` (the underlay MTU at start-up minus the overhead, which the device's MTU was set from) and its
peer's ``max_frame`` (peers.py), what the path towards that peer carries as the kernel last reported it
(``segment_limit(peer)`` is the smaller; super-frames compare their segments with it). A frame above it is
dropped (``too_big``) and, as a router would, the tunnel writes an ICMP "fragmentation needed" (IPv4 with DF)
or "packet too big" (IPv6) with that limit back into the device, to the frame's sender (rate-limited: the
kernel's global budget, ``pmtu.RateLimit``). Where the per-peer limit comes from:
  - the links send with "don't fragment" (``--df set``): once the kernel has learnt a smaller path MTU (a
    router's ICMP updates its route cache even for our unconnected sockets: ``__udp4_lib_err`` and ``raw_err``
    call ``ipv4_sk_update_pmtu``), the next datagram that does not fit fails at once with EMSGSIZE (EINVAL for
    a UDP_SEGMENT send). Only then does the engine ask the link for the path MTU towards that peer
    (``link.path_mtu``: IP_MTU of a connected probe socket, the route cache's answer), stores it on the peer
    and answers the frame with the ICMP. Nothing is asked while packets fit: no system call on the hot path,
    no timer. IP_RECVERR and the error queue were the other way; they would also make every ICMP error (a
    peer's "port unreachable") fail the next send of an unconnected socket (``sk_err``), which io/udp.py
    avoids by design.
  - a learnt limit is asked again when a frame above it arrives at least PMTU_RECHECK seconds after the last
    question: when the kernel's learnt MTU expires (net.ipv4.route.mtu_expires, 600 s) and the inner senders'
    own limits expire too, their larger frames find the path grown back and cross again.
With ``--df unset`` the kernel fragments outer packets instead (the path's routers too, for IPv4), no send
fails, and only the engine's own limit is left. L3 frames that no peer's routes hold (``no_route``) are answered
with "destination unreachable" from the same builder, within the same budget.
"""

from __future__ import annotations

import asyncio
import errno
import math
import socket
import time
from typing import Callable, Protocol, Sequence

import numpy as np

from tunneld.encap.base import DeviceKind, Drop, Encapsulator, constant_headers, session_of
from tunneld.encap.flow import ethernet_flow_hash, ip_flow_hash
from tunneld.encap.session import HELD, Answer
from tunneld.io.port import Fallback, FramePort, Super, VnetPort
from tunneld.offload.layout import ETH_HLEN
from tunneld.offload.rows import GATHER_MIN, Gatherer, Pending
from tunneld.offload.segment import MAX_SEGMENTS, Segments
from tunneld.datapath.peers import Peer, PeerSpec, PeerTable
from tunneld.datapath.pmtu import RateLimit, reply
from tunneld.datapath.fdb import DEFAULT_AGEING, DEFAULT_MAX_ENTRIES
from tunneld.datapath.stats import ICMP_KINDS, MAX_BATCH, Stats

HEADROOM = 64  # enough for any encapsulation header this design expects (VXLAN 8, GRE ≤ 16) and a vnet header
MAX_PACKET = 65535  # the largest frame a device read or a datagram can hold
DEFAULT_BATCH = 32  # reads per wake-up with batches of one (libuv reads 32 datagrams per wake-up too)
# Reads per wake-up with offloads. Small frames wait in ``Pending`` and leave together at the wake-up's end,
# so this bounds how many share one send: 64 rather than 32 took UDP with 64-byte payloads from ~90 to ~125
# kpps (3 alternating rounds in one testbed; 128 gained nothing more). Super-frames stay bounded by
# WAKEUP_BYTES.
OFFLOAD_BATCH = 64
RX_AREA = 1 << 16  # a UDP_GRO read is at most 64 KiB
# A UDP_SEGMENT send whose segments exceed the path MTU fails with EINVAL (udp_send_skb), not EMSGSIZE.
TOO_BIG_ERRNOS = (errno.EMSGSIZE, errno.EINVAL)
_LE64 = np.dtype("<u8")  # a row's source MAC and ethertype read as one word (_learn_rows)
# Bytes one wake-up may take in before it yields to the loop. A count of reads alone is no bound once a read
# can be a 64 KiB super-frame: 32 of them are ~3 ms of Python during which the other direction (a ping reply,
# an ACK) waits. Measured with one TCP stream plus ping on this 2-core machine: with only the 32-read bound,
# ping p50/p90 ~4/7.5 ms; with 256 KiB ~3/5 ms, at the same ~3.3 Gbit/s. 64 KiB (one super-frame, or one
# UDP_GRO read) took ping under load from 16.8 to 12.7 ms p50 on a busy machine (3 alternating runs each,
# ranges 10.3-23 and 10.5-15.9) at no cost in throughput (0.40 and 0.52 Gbit/s, same noise): a wake-up's
# work is amortised by its system calls and NumPy calls per super-frame, not by taking several per wake-up.
WAKEUP_BYTES = 64 << 10
# FLOOD_COUNTS: a flooded frame spends the budget once per copy it sends, not once for the read. Head-end
# replication to a thousand peers is a thousand system calls a frame; counted as one read, 64 such frames in
# one wake-up kept a worker off its control channel for seconds on a loaded machine (its parent logged it
# as stalled). Now the loop gets a turn after about WAKEUP_BYTES of copies.
# The underlay socket's receive buffer, in the kernel's accounting. While the loop serves the device (a wake-up
# of up to WAKEUP_BYTES) and then reads the socket (another WAKEUP_BYTES), the peer keeps sending; the kernel
# charges each datagram its buffer's true size, about twice the payload of an MTU-size datagram that was not
# coalesced. 4 MiB (which the kernel doubles for its overhead) holds ~32 wake-ups of arrivals at that rate,
# room for the other workers or processes sharing the CPUs to run for a few milliseconds in between (sized
# when the budget was 256 KiB: 8 of those). Beyond it the kernel drops, and says so (``kernel_rcvbuf``).
RECEIVE_BUFFER = 4 << 20
# Seconds before a peer's learnt path MTU is asked again, when a frame above it arrives: a system call pair per
# peer and second at most, and only while frames are too big for it.
PMTU_RECHECK = 1.0
# The soonest the sessions' timer fires again (seconds): a session whose deadline stays in the past after
# ``poll`` (a bug in it) costs a wake-up per grain, not a spinning loop.
TIMER_GRAIN = 0.005
# How often a stateful codec's engine looks at the interface's MTU (``ip link set DEV mtu N``, wg-quick's): a
# session that pads keeps within it (WireGuard, as wireguard-go follows its TUN's MTU).
DEVICE_MTU_INTERVAL = 1.0


def _no_flow(frame: memoryview) -> int:
    return 0


class DevicePort(Protocol):
    vnet_len: int

    def read(self, areas: tuple[memoryview]): ...  # into areas[0]: int | Fallback | Segments | Drop
    def write(self, frame: memoryview) -> int: ...


class LinkPort(Protocol):
    """What the engine asks of the underlay link: the real links (io/udp.py ``UdpLink``, io/raw.py ``RawLink``)
    and the fakes (tunneld/testing.py) all implement every member; the engine probes for none."""

    peer: str  # the default destination (the one peer's address)
    family: int  # socket.AF_INET or AF_INET6: one IP version for all peers
    df: bool  # whether outer packets leave with "don't fragment" (then the kernel's path MTU matters)
    spreads_flows: bool  # whether send() uses its flow argument (UDP source ports); raw IP has none to spread
    buffered: bool  # datagrams taken from the kernel and not yet handed out (raw IP's recvmmsg)
    kernel_drops: int  # datagrams the kernel dropped on the socket so far (SO_RXQ_OVFL)

    def fileno(self) -> int: ...
    def set_peer(self, peer: str) -> None: ...
    def size_receive_buffer(self, size: int) -> None: ...
    def path_mtu(self, address: str) -> int: ...  # the kernel's path MTU towards address (0: none known)
    def recv_one(self, buf: memoryview) -> tuple[int, str, int]: ...  # one datagram: (n, source, 0)
    def recv_from(self, buf: memoryview) -> tuple[int, str, int]: ...  # one datagram: (n, source, its port)
    # what send takes for a peer (checks the family; port None: the tunnel's)
    def destination(self, address: str, port: int | None = None) -> object: ...
    def send(self, packet: memoryview, flow: int, dest: object = None) -> None: ...  # one datagram, now
    # rows, where the engine batches (offloads): see io/udp.py and io/raw.py
    def enable_gro(self, max_packet: int = 65535) -> object: ...
    def recv_gro_into(self, buf: memoryview) -> tuple[int, str, int]: ...  # (n, source, row size or 0)
    def recv_gro_from(self, buf: memoryview) -> tuple[int, str, int, int]: ...  # (n, source, its port, size or 0)
    def send_segments(self, packets: memoryview, size: int, flow: int, dest: object = None) -> None: ...  # OSError.sent


def offload_supported(codec: Encapsulator) -> bool:
    """Whether the engine can move ``codec``'s packets in batches (offloads): a UDP transport (GSO/GRO) or
    raw IP (sendmmsg/recvmmsg), a stateless codec and a constant header declared for both IP versions. GRE
    with checksums or sequence numbers declares none and moves packets one by one. A stateful codec over UDP
    that declares ``rows`` (WireGuard) takes it too: its sessions seal the rows (tunneld/encap/session.py)."""
    if codec.stateful:
        return codec.transport.kind == "udp" and codec.rows
    return (codec.transport.kind in ("udp", "ip") and not codec.trailer_len
            and constant_headers(codec) is not None)


def _batch_ports(device, link: LinkPort, codec: Encapsulator, max_frame: int, offload: bool, egress=None):
    """The one place where offloads make a difference: the device port, whether packets wait to be batched
    (Pending) and single datagrams are gathered (Gatherer), and how the link receives."""
    if not offload:
        return FramePort(device), None, None, link.recv_one
    if codec.stateful:
        # Rows for sessions to seal: the segmenter lays no header in front (each session writes its own), and the
        # engine writes what the sessions opened, packed, through the coalescer. No egress: the kernel cannot seal.
        port = VnetPort(device, codec, max_frame, headers=(b"", b""))
        link.enable_gro(max_packet=max_frame + codec.header_len + codec.trailer_len)
        return port, None, None, link.recv_gro_into
    port = VnetPort(device, codec, max_frame, egress)  # (refuses a codec without a constant header)
    # Where the kernel cannot coalesce, reads are single datagrams and are gathered. The largest packet the peer
    # should send us sizes raw IP's receive slots.
    link.enable_gro(max_packet=max_frame + codec.header_len)
    # A wake-up reads until WAKEUP_BYTES, so what waits is at most that plus one last frame and its header.
    pending = Pending(WAKEUP_BYTES + HEADROOM + MAX_PACKET)
    return port, pending, Gatherer(), link.recv_gro_into


class Engine:
    port: DevicePort
    _pending: Pending | None
    _gather: Gatherer | None

    def __init__(
        self,
        device,
        link: LinkPort,
        codec: Encapsulator,
        *,
        max_frame: int,
        offload: bool = False,
        batch: int | None = None,
        clock: Callable[[], float] = time.time,
        peers: Sequence[PeerSpec] | None = None,
        fdb_max: int = DEFAULT_MAX_ENTRIES,
        fdb_ageing: float = DEFAULT_AGEING,
        egress=None,
    ) -> None:
        if codec.header_len > HEADROOM:
            raise ValueError(f"{codec.name}: header of {codec.header_len} bytes exceeds the {HEADROOM}-byte headroom")
        self.device = device
        self.link = link
        self.codec = codec
        self.max_frame = max_frame  # the largest inner frame whose encapsulation fits the underlay MTU
        # Path MTU (see the module's docstring): what the underlay adds around a frame, the ICMP budget.
        self._outer_overhead = codec.outer_overhead(link.family == socket.AF_INET6)
        self._icmp_limit = RateLimit()
        # With DF unset the kernel fragments what the path cannot carry: no limit learnt per peer.
        self._path_mtu = link.path_mtu if link.df else None
        # The kernel's drops on the underlay socket (SO_RXQ_OVFL), as the link has seen them so far: added to
        # ``kernel_rcvbuf`` once per wake-up.
        self._kernel_drops = 0
        link.size_receive_buffer(RECEIVE_BUFFER)
        self.batch = batch or (OFFLOAD_BATCH if offload else DEFAULT_BATCH)
        if not 1 <= self.batch <= MAX_BATCH:  # the per-wake-up histograms have a slot per read count up to it
            raise ValueError(f"batch {self.batch} is outside 1..{MAX_BATCH}")
        self.stats = Stats()
        self._clock = clock
        self.l2 = codec.device is DeviceKind.TAP
        # Stateful codecs: a session per peer, packets one by one, the codec's own packets on a timer.
        self._sessions = codec.stateful
        if self._sessions and offload and not codec.rows:
            raise ValueError(f"{codec.name}: keeps per-peer sessions; its packets move one by one (no offloads)")
        # Sessions that seal and open rows (offloads): super-frames sealed into ``_sealed``, opened frames packed
        # into ``_plain`` and written together (``_write_opened``).
        self._rows = self._sessions and offload
        if self._rows:
            self._sealed = memoryview(bytearray(MAX_PACKET + MAX_SEGMENTS * (HEADROOM + codec.header_len
                                                                            + codec.trailer_len)))
            self._plain = np.zeros(3 * RX_AREA + 2048, np.uint8)
            self._plainview = memoryview(self._plain)
            self._opened: list[tuple[int, int]] = []  # (offset, length) in ``_plain`` of frames to write
        self._keyed = codec.keyed
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self.device_mtu = 0  # the interface's MTU as last looked at (0: not known; stateful codecs only)
        self._mtu_timer: asyncio.TimerHandle | None = None
        self.peers = PeerTable(l2=self.l2, stats=self.stats, destination=link.destination,
                               session=self._new_session, fdb_max=fdb_max, fdb_ageing=fdb_ageing)
        for spec in peers if peers is not None else (PeerSpec(link.peer),):
            self.peers.upsert(spec, clock())
        if not link.spreads_flows:
            self._flow_hash = _no_flow  # the ~0.8 us hash would be thrown away for every packet
        else:
            self._flow_hash = ethernet_flow_hash if codec.device is DeviceKind.TAP else ip_flow_hash
        self.port, self._pending, self._gather, self._recv = _batch_ports(device, link, codec, max_frame, offload,
                                                                          egress)
        self._header_len = self.port.header_len
        self._txbuf = bytearray(HEADROOM + MAX_PACKET)
        self._txview = memoryview(self._txbuf)
        # What a device read fills, as the one-buffer tuple readv takes (built once, not per read).
        self._read_areas = (self._txview[HEADROOM - self.port.vnet_len : HEADROOM + MAX_PACKET],)
        # Gathered datagrams (up to RX_AREA), then room for one more read of up to RX_AREA, then for padding.
        self._rx = np.zeros(3 * RX_AREA + 2048, np.uint8)
        self._rxview = memoryview(self._rx)
        self._rx_area = self._rxview[:RX_AREA]
        self._loop: asyncio.AbstractEventLoop | None = None
        # Called once when the device is gone for good (deleted with `ip link del`): the fd then only fails.
        self.on_device_gone: Callable[[], None] | None = None

    # -- wiring ----------------------------------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.device.fileno(), self.on_device_readable)
        loop.add_reader(self.link.fileno(), self.on_link_readable)
        if self._sessions:
            self.run_timers()  # sessions may have something due from the start (a persistent keepalive)
            if self.codec.pads_within_limit and callable(getattr(self.device, "mtu", None)):
                self._follow_device_mtu()  # only a session that pads cares (1 ioctl a second)

    def detach(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.device.fileno())
            self._loop.remove_reader(self.link.fileno())
            self._loop = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = math.inf  # nothing is armed now (attach arms it again)
        if self._mtu_timer is not None:
            self._mtu_timer.cancel()
            self._mtu_timer = None

    def _device_failed(self, e: OSError) -> None:
        """A device read failed: EBADFD means the interface was deleted under us, and no read will work again."""
        if e.errno == errno.EBADFD and self.on_device_gone is not None:
            self.detach()
            self.on_device_gone()

    # -- sessions: the codec's own packets and its timers -------------------------------------------------------

    def _new_session(self, peer_id: str):
        """The codec's session for a new peer, told the largest frame it will be given (a new peer's path is not
        learnt yet: the engine's own limit); ``_learn_path`` and ``check_device_mtu`` tell it when that changes."""
        session = session_of(self.codec, peer_id)
        session.set_frame_limit(self._frame_limit(None))
        return session

    def _frame_limit(self, peer: Peer | None) -> int:
        """The largest frame ``peer``'s session will be given: what its path carries (``segment_limit``), and no
        more than the interface's MTU, when known (a TAP's excludes its Ethernet header)."""
        limit = self.segment_limit(peer)
        if self.device_mtu:
            limit = min(limit, self.device_mtu + (ETH_HLEN if self.l2 else 0))
        return limit

    def check_device_mtu(self) -> None:
        """Look at the interface's MTU (the device's ``mtu()``); when it changed, every session is told its new
        frame limit. The loop calls it every DEVICE_MTU_INTERVAL; tests call it after changing the MTU."""
        try:
            mtu = self.device.mtu()
        except OSError:
            return  # the interface is going away: the device read says so
        if mtu != self.device_mtu:
            self.device_mtu = mtu
            for peer in self.peers.all:
                peer.session.set_frame_limit(self._frame_limit(peer))

    def _follow_device_mtu(self) -> None:
        self.check_device_mtu()
        if self._loop is not None:
            self._mtu_timer = self._loop.call_later(DEVICE_MTU_INTERVAL, self._follow_device_mtu)

    def next_deadline(self) -> float:
        """When the engine's timer next fires for the sessions (``math.inf``: not armed)."""
        return self._timer_at

    def run_timers(self) -> None:
        """Send what every session has due now, and arm the one timer for the earliest next deadline. The loop's
        timer calls it; tests call it after moving their clock."""
        now = self._clock()
        for peer in self.peers.all:
            if peer.session.deadline() <= now:
                self._send_own(peer, now)
        self._arm(min((p.session.deadline() for p in self.peers.all), default=math.inf), now)

    def _after_session(self, peer: Peer, now: float) -> None:
        """``peer``'s session was just used: what it has due now leaves, and a sooner deadline arms the timer."""
        session = peer.session
        deadline = session.deadline()
        if deadline <= now:
            self._send_own(peer, now)
            deadline = session.deadline()
        if deadline < self._timer_at:
            self._arm(deadline, now)

    def _send_own(self, peer: Peer, now: float) -> None:
        """The session's own packets due at ``now`` (a keepalive, a handshake), to the peer's endpoint as they are."""
        stats = self.stats
        for packet in peer.session.poll(now):
            try:
                self.link.send(memoryview(packet), 0, peer.dest)
            except OSError:
                stats.drops[Drop.SOCKET_ERROR] += 1
                peer.stats.dropped += 1
                continue
            stats.codec_packets += 1

    def _arm(self, deadline: float, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline != math.inf and self._loop is not None:
            # Not sooner than TIMER_GRAIN: a session whose deadline stays in the past must not spin the loop.
            self._timer = self._loop.call_later(max(TIMER_GRAIN, deadline - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self.run_timers()

    # -- sessions: one packet at a time, each through its peer's session ----------------------------------------

    def _sealed_device_readable(self) -> None:
        """Outbound for a stateful codec: each frame read is sealed by its peer's session (a flooded frame by
        every peer's, from a copy: a session may rewrite the frame in place) and sent alone."""
        stats = self.stats
        drops = stats.drops
        view = self._txview
        areas = self._read_areas
        read = self.port.read
        only = self.peers.only
        now = self._clock()
        reads = moved = nbytes = taken = 0
        for _ in range(self.batch):
            if taken >= WAKEUP_BYTES:
                break
            try:
                n = read(areas)
            except BlockingIOError:
                break
            except OSError as e:
                drops[Drop.DEVICE_READ_ERROR] += 1
                self._device_failed(e)
                break
            reads += 1
            if n.__class__ is not int:
                if n.__class__ is Segments:  # a super-frame cut into rows: sealed by its peer's session at once
                    flow = self._flow_hash(view[HEADROOM : HEADROOM + n.frame_len])
                    m, b, weight = self._seal_superframe(n, flow, only, now)
                    moved, nbytes, taken = moved + m, nbytes + b, taken + weight
                    continue
                if n.__class__ is Drop:  # a vnet header or partial checksum the port could not complete
                    drops[n] += 1
                    continue
                stats.offload_fallbacks += 1  # Fallback: one packet's worth, the plain way below
            taken += n
            frame = view[HEADROOM : HEADROOM + n]
            flow = self._flow_hash(frame)
            peer = only if only is not None else self._choose(n)
            if peer.__class__ is Peer:
                targets = (peer,)
            elif peer is None:  # broadcast, multicast, unknown unicast: every peer's session seals a copy
                stats.flooded += 1
                targets = self.peers.all
            else:  # no_route
                drops[peer] += 1
                self._write_icmp(frame, too_big=False)
                continue
            original = bytes(frame) if len(targets) > 1 else None
            taken += (len(targets) - 1) * n  # FLOOD_COUNTS
            for i, target in enumerate(targets):
                if i:
                    self._txbuf[HEADROOM : HEADROOM + n] = original
                if n > self.segment_limit(target):
                    self._too_big(frame, n, target)
                    target.stats.dropped += 1
                    continue
                if self._seal_send(target, n, flow, now):
                    moved += 1
                    nbytes += n
        stats.tx_packets += moved
        stats.tx_bytes += nbytes
        stats.tx_batches[reads] += 1

    def _seal_superframe(self, segs: Segments, flow: int, only: Peer | None, now: float) -> tuple[int, int, int]:
        """The rows a super-frame was cut into, sealed by its peer's session (each flooded copy by every peer's:
        ``seal_rows`` leaves the rows as they are) and sent as one row buffer: (packets, inner bytes) that left,
        and what it weighs against the wake-up's budget."""
        stats = self.stats
        count = segs.count
        targets = self._superframe_targets(segs, only)
        if not targets:
            return 0, 0, segs.frame_len
        frame = self._txview[HEADROOM : HEADROOM + segs.frame_len]
        segment = segs.rowlen  # the largest inner frame a row carries (no header in front of the rows)
        moved = nbytes = 0
        for peer in targets:
            ps = peer.stats
            if segment > self.segment_limit(peer):
                self._too_big(frame, segment, peer, count=count)
                ps.dropped += count
                continue
            sealed = peer.session.seal_rows(segs.buffer, segs.rowlen, count, self._sealed, now)
            if sealed.__class__ is not tuple:
                if sealed is not HELD:  # HELD: the session took them one by one (no keys yet): poll sends them
                    stats.drops[sealed] += count
                    ps.dropped += count
                self._after_session(peer, now)
                continue
            stride, end = sealed
            failed, too_big = self._send_rows(self._sealed[:end], stride, count, flow, peer.dest)
            if too_big:
                self._too_big(frame, segment, peer, count=failed, failed=True)
            sent = count - failed
            inner = sent * segs.rowlen if failed else segs.inner_bytes
            moved, nbytes = moved + sent, nbytes + inner
            ps.tx_packets += sent
            ps.tx_bytes += inner
            ps.dropped += failed
            self._after_session(peer, now)
        return moved, nbytes, len(targets) * segs.frame_len  # FLOOD_COUNTS

    def _seal_send(self, peer: Peer, n: int, flow: int, now: float) -> bool:
        """Seal the frame at HEADROOM (``n`` bytes) with ``peer``'s session and send it: whether it left."""
        ps = peer.stats
        sealed = peer.session.seal(self._txbuf, HEADROOM, HEADROOM + n, now)
        if sealed.__class__ is not tuple:
            if sealed is not HELD:  # HELD: the session keeps it (no keys yet) and sends it through poll
                self.stats.drops[sealed] += 1
                ps.dropped += 1
            self._after_session(peer, now)
            return False
        start, end = sealed
        try:
            self.link.send(self._txview[start:end], flow, peer.dest)
        except OSError as e:
            if e.errno == errno.EMSGSIZE:
                self._too_big(self._txview[HEADROOM : HEADROOM + n], n, peer, failed=True)
            else:
                self.stats.drops[Drop.SOCKET_ERROR] += 1
            ps.dropped += 1
            return False
        ps.tx_packets += 1
        ps.tx_bytes += n
        self._after_session(peer, now)
        return True

    def _opened_link_readable(self) -> None:
        """Inbound for a stateful codec: each datagram goes to the session of the peer it names (keyed codecs:
        ``peer_key``; others: the source address's peer), then the one delivery path."""
        stats = self.stats
        drops = stats.drops
        view = self._rxview
        area = self._rx_area
        recv = self.link.recv_from  # the source's port too: a WireGuard peer is answered where it sent from
        keyed = self._keyed
        identify, cost = self.codec.identify, self.codec.cost
        deliver_one = self._deliver_one
        now = self._clock()
        reads = moved = nbytes = taken = 0
        for _ in range(self.batch):
            if taken >= WAKEUP_BYTES:
                break
            try:
                n, source, port = recv(area)
            except BlockingIOError:
                break
            except OSError:
                drops[Drop.SOCKET_ERROR] += 1
                continue
            reads += 1
            taken += n
            packet = view[:n]
            if keyed:
                peer_id = identify(packet, source, now, port)
                taken += cost(packet, peer_id) - n  # a handshake weighs more than its bytes
                if peer_id.__class__ is Drop:
                    drops[peer_id] += 1
                    continue
                if peer_id.__class__ is Answer:
                    self._answer(peer_id, source, port)
                    continue
                peer = self.peers.by_id.get(peer_id)
            else:
                peer = self.peers.by_endpoint.get(source)
            if peer is None:
                drops[Drop.UNKNOWN_PEER] += 1
                continue
            b = deliver_one(packet, peer, now, source, port)
            if b >= 0:
                moved += 1
                nbytes += b
        if moved:
            stats.peer_last_rx = now
        stats.rx_packets += moved
        stats.rx_bytes += nbytes
        stats.rx_batches[reads] += 1
        self._note_kernel_drops()

    def _opened_rows_readable(self) -> None:
        """Inbound for sessions that open rows (offloads): each read (a UDP_GRO read's datagrams, or one) goes to
        the codec's ``open_rows``, which writes the accepted frames into ``_plain`` packed one behind the other;
        they are written to the device together (``_write_opened``: a flow's frames coalesced into one
        super-frame) at the end of the wake-up, or before anything that must come after them. A datagram
        ``open_rows`` does not take (a handshake) goes the one-at-a-time way (``identify``, ``_deliver_one``),
        and weighs what the codec says (``cost``: a handshake much more than its bytes) against the budget."""
        stats = self.stats
        drops = stats.drops
        view = self._rxview
        area = self._rx_area
        recv = self.link.recv_gro_from  # the source's port too: a WireGuard peer is answered where it sent from
        codec = self.codec
        open_rows, identify, cost = codec.open_rows, codec.identify, codec.cost
        plain = self._plainview
        opened = self._opened
        by_id = self.peers.by_id
        check_source = self.peers.fdb is None and self.peers.only is None
        now = self._clock()
        touched: dict[Peer, tuple[str, int]] = {}  # peers that authenticated something: roamed, answers sent
        reads = moved = nbytes = taken = at = 0
        last_id = last_peer = None
        for _ in range(self.batch):
            if taken >= WAKEUP_BYTES:
                break
            if at > RX_AREA:  # room for the next read's frames
                m, b = self._write_opened()
                moved, nbytes, at = moved + m, nbytes + b, 0
            try:
                n, source, port, size = recv(area)
            except BlockingIOError:
                break
            except OSError:
                drops[Drop.SOCKET_ERROR] += 1
                continue
            reads += 1
            taken += n
            packet = view[:n]
            size = size or n
            i = 0
            while i < n:
                verdicts, at = open_rows(packet[i:], size, source, now, plain, at, port)
                i += len(verdicts) * size
                for verdict in verdicts:
                    if verdict.__class__ is not tuple:
                        drops[verdict] += 1
                        continue
                    peer_id, offset, length = verdict
                    if peer_id is not last_id:
                        last_id, last_peer = peer_id, by_id.get(peer_id)
                    peer = last_peer
                    if peer is None:
                        drops[Drop.UNKNOWN_PEER] += 1
                        continue
                    touched[peer] = (source, port)
                    if not length:  # a keepalive: authenticated, nothing to write
                        continue
                    ps = peer.stats
                    if check_source and not self._source_allowed(plain, offset, peer):
                        drops[Drop.SOURCE_NOT_ALLOWED] += 1
                        ps.dropped += 1
                        continue
                    opened.append((offset, length))
                    ps.rx_packets += 1
                    ps.rx_bytes += length
                    ps.last_rx = now
                if i >= n:
                    break
                # A datagram the fast path does not take: after what waits (order), alone.
                if opened:
                    m, b = self._write_opened()
                    moved, nbytes = moved + m, nbytes + b
                at = 0
                row = packet[i : min(n, i + size)]
                i += size
                peer_id = identify(row, source, now, port)
                taken += cost(row, peer_id) - len(row)
                if peer_id.__class__ is Drop:
                    drops[peer_id] += 1
                    continue
                if peer_id.__class__ is Answer:
                    self._answer(peer_id, source, port)
                    continue
                peer = by_id.get(peer_id)
                if peer is None:
                    drops[Drop.UNKNOWN_PEER] += 1
                    continue
                b = self._deliver_one(row, peer, now, source, port)
                if b >= 0:
                    moved += 1
                    nbytes += b
        if opened:
            m, b = self._write_opened()
            moved, nbytes = moved + m, nbytes + b
        for peer, (source, port) in touched.items():
            self._roam(peer, source, port)  # authenticated rows only: a forged one never got a verdict with a peer
            self._after_session(peer, now)
        if moved:
            stats.peer_last_rx = now
        stats.rx_packets += moved
        stats.rx_bytes += nbytes
        stats.rx_batches[reads] += 1
        self._note_kernel_drops()

    def _write_opened(self) -> tuple[int, int]:
        """Write the frames waiting in ``_plain`` (``_opened``), and forget them: frames of one length lying one
        behind the other (a shorter one may end them) go to the port as rows, which coalesces a flow's into
        one super-frame; the others alone. (frames, bytes) written; a failed write is counted by the port."""
        opened = self._opened
        plain, view = self._plain, self._plainview
        drops = self.stats.drops
        port = self.port
        moved = nbytes = 0
        count = len(opened)
        i = 0
        while i < count:
            start, size = opened[i]
            end = start + size
            j = i + 1
            while j < count and opened[j][0] == end and opened[j][1] == size:
                end += size
                j += 1
            if j < count and opened[j][0] == end and opened[j][1] < size:  # a shorter last row
                end += opened[j][1]
                j += 1
            if j - i == 1:
                try:
                    port.write(view[start:end])
                except OSError:
                    drops[Drop.DEVICE_WRITE_ERROR] += 1
                else:
                    moved, nbytes = moved + 1, nbytes + size
            else:
                # The coalescer pads the last row with zeros up to ``size``: over the next frames, if any.
                saved = plain[end : end + size].copy() if j < count else None
                m, b, _ = port.write_rows(plain[start:], view[start:], end - start, size, [0] * (j - i), drops)
                if saved is not None:
                    plain[end : end + size] = saved
                moved, nbytes = moved + m, nbytes + b
            i = j
        opened.clear()
        return moved, nbytes

    def _answer(self, answer: Answer, source: str, port: int) -> None:
        """A keyed codec's reply to a datagram that names no peer (a cookie reply): back to its source."""
        stats = self.stats
        if answer.drop is not None:
            stats.drops[answer.drop] += 1
        try:
            dest = self.link.destination(source, port or None)  # back to the port it came from
        except ValueError:
            return
        for packet in answer.packets:
            try:
                self.link.send(memoryview(packet), 0, dest)
            except OSError:
                stats.drops[Drop.SOCKET_ERROR] += 1
                continue
            stats.codec_packets += 1

    def _note_kernel_drops(self) -> None:
        """The kernel's drops on the underlay socket since the last wake-up, added to ``kernel_rcvbuf``."""
        kernel = self.link.kernel_drops
        if kernel != self._kernel_drops:
            self.stats.drops[Drop.KERNEL_RCVBUF] += kernel - self._kernel_drops
            self._kernel_drops = kernel

    # -- outbound --------------------------------------------------------------------------------------------

    def on_device_readable(self) -> None:
        if self._sessions:
            return self._sealed_device_readable()
        stats = self.stats
        drops = stats.drops
        buf, view = self._txbuf, self._txview
        areas = self._read_areas
        vnet_len = self.port.vnet_len
        read = self.port.read
        encap = self.codec.encap
        flow_hash = self._flow_hash
        pending = self._pending
        # Batches of one: the packet leaves now. Otherwise it joins those waiting (False: it does not continue
        # their run, which then leaves first).
        send = self.link.send if pending is None else pending.add
        # One peer that wins every look-up: no look-up, its counters added once per wake-up. Otherwise each
        # frame picks its peer (FDB or routes) and counts there.
        only = self.peers.only
        dest = only.dest if only is not None else None
        # The one peer's limit as well as ours; with several, each frame meets its peer's below.
        max_frame = self.segment_limit(only)
        choose = self._choose
        reads = moved = nbytes = taken = fallbacks = 0
        for _ in range(self.batch):
            if taken >= WAKEUP_BYTES:
                break
            try:
                n = read(areas)
            except BlockingIOError:
                break
            except OSError as e:
                drops[Drop.DEVICE_READ_ERROR] += 1
                self._device_failed(e)
                break
            reads += 1
            if n.__class__ is not int:
                if n.__class__ is Super:
                    if pending.count:  # what waits leaves first: the same flow's packets keep their order
                        moved -= self._flush()
                    sent = self._send_kernel(n, only)
                    if sent is not None:
                        taken += n + vnet_len
                        moved, nbytes = moved + sent[0], nbytes + sent[1]
                        continue
                    n = self.port.cut(n)  # cut here after all: Segments, Fallback or Drop
                if n.__class__ is Segments:
                    taken += n.frame_len + vnet_len
                    m, b = self._send_superframe(n, flow_hash(view[HEADROOM : HEADROOM + n.frame_len]), only)
                    moved, nbytes = moved + m, nbytes + b
                    continue
                if n.__class__ is Drop:  # a vnet header or partial checksum the port could not complete
                    drops[n] += 1
                    continue
                # A super-frame the port could not cut, but one packet's worth: the plain path below takes it,
                # counted once queued (taken back on the rare ways out below, so the usual way checks nothing).
                fallbacks += 1
            taken += n + vnet_len
            if n > max_frame:
                self._too_big(view[HEADROOM : HEADROOM + n], n, only)
                fallbacks -= n.__class__ is Fallback
                max_frame = self.segment_limit(only)  # what it learnt holds for the rest of this wake-up
                continue
            end = HEADROOM + n
            start = encap(buf, HEADROOM, end)
            if start.__class__ is Drop:  # a frame the codec cannot carry (GRE: neither IPv4 nor IPv6)
                drops[start] += 1
                fallbacks -= n.__class__ is Fallback
                continue
            packet = view[start:end]
            flow = flow_hash(view[HEADROOM:end])
            if only is None:
                peer = choose(n)
                if peer.__class__ is not Peer:
                    if peer is None:  # broadcast, multicast, unknown unicast: every peer gets a copy
                        if pending is not None and pending.count:
                            moved -= self._flush()
                        m = self._flood(packet, flow, n)
                        moved, nbytes = moved + m, nbytes + m * n
                        taken += (m - 1) * n  # FLOOD_COUNTS: the copies spend the wake-up's budget too
                    else:  # no_route: the sender is told, as a router would (rate-limited with the rest)
                        drops[peer] += 1
                        fallbacks -= n.__class__ is Fallback
                        self._write_icmp(view[HEADROOM:end], too_big=False)
                    continue
                if n > peer.max_frame:
                    self._too_big(view[HEADROOM:end], n, peer)
                    peer.stats.dropped += 1
                    fallbacks -= n.__class__ is Fallback
                    continue
                dest = peer.dest
                ps = peer.stats
                ps.tx_packets += 1
                ps.tx_bytes += n
            try:
                if send(packet, flow, dest) is False:
                    moved -= self._flush()
                    pending.add(packet, flow, dest)
            except OSError as e:  # only a packet sent now fails here; waiting ones fail in _flush
                if e.errno == errno.EMSGSIZE:
                    self._too_big(view[HEADROOM:end], n, only or peer, failed=True)
                    max_frame = self.segment_limit(only)  # the limit it learnt holds for the rest of this wake-up
                else:
                    drops[Drop.SOCKET_ERROR] += 1
                fallbacks -= n.__class__ is Fallback
                if only is None:  # counted for its peer above: it did not leave
                    ps.tx_packets -= 1
                    ps.tx_bytes -= n
                    ps.dropped += 1
                continue
            moved += 1
            nbytes += n
        if pending is not None and pending.count:
            moved -= self._flush()
        stats.tx_packets += moved
        stats.tx_bytes += nbytes
        if only is not None:
            ps = only.stats
            ps.tx_packets += moved
            ps.tx_bytes += nbytes
        stats.tx_batches[reads] += 1
        if fallbacks:
            stats.offload_fallbacks += fallbacks

    def _choose(self, n: int):
        """The peer of the frame at HEADROOM (``n`` bytes) when there are several: a Peer, None (flood: L2
        broadcast, multicast or a MAC not in the FDB), or Drop.NO_ROUTE (L3, no prefix holds the destination)."""
        buf = self._txbuf
        if self.l2:
            entry = self.peers.fdb.table.get(bytes(buf[HEADROOM : HEADROOM + 6]))
            return None if entry is None else entry.peer
        version = buf[HEADROOM] >> 4
        if version == 4 and n >= 20:
            peer = self.peers.routes.lookup(int.from_bytes(buf[HEADROOM + 16 : HEADROOM + 20], "big"), 4)
        elif version == 6 and n >= 40:
            peer = self.peers.routes.lookup(int.from_bytes(buf[HEADROOM + 24 : HEADROOM + 40], "big"), 6)
        else:
            peer = None
        return Drop.NO_ROUTE if peer is None else peer

    def _flood(self, packet: memoryview, flow: int, n: int) -> int:
        """Head-end replication: one copy of ``packet`` (inner ``n`` bytes) to every peer, now; the copies
        that left."""
        self.stats.flooded += 1
        send = self.link.send
        frame = packet[len(packet) - n :]
        sent = 0
        for peer in self.peers.all:
            if n > peer.max_frame:
                self._too_big(frame, n, peer)
                peer.stats.dropped += 1
                continue
            try:
                send(packet, flow, peer.dest)
            except OSError as e:
                if e.errno == errno.EMSGSIZE:
                    self._too_big(frame, n, peer, failed=True)
                else:
                    self.stats.drops[Drop.SOCKET_ERROR] += 1
                peer.stats.dropped += 1
                continue
            ps = peer.stats
            ps.tx_packets += 1
            ps.tx_bytes += n
            sent += 1
        return sent

    def _send_rows(self, rows: memoryview, rowlen: int, count: int, flow: int, dest: object) -> tuple[int, bool]:
        """One row buffer to the link, as few system calls as it can: (how many rows did not leave, whether
        because they were too big for the path). The link's OSError says how many full rows left before the
        failing call. The rows that failed otherwise are counted here (``socket_error``); too big ones by the
        caller, which knows their frame (``_too_big``)."""
        try:
            self.link.send_segments(rows, rowlen, flow, dest)
        except OSError as e:
            failed = count - getattr(e, "sent", 0)
            if e.errno in TOO_BIG_ERRNOS:
                return failed, True
            self.stats.drops[Drop.SOCKET_ERROR] += failed
            return failed, False
        return 0, False

    def _flush(self) -> int:
        """Send the packets waiting in ``Pending`` (counted as moved when queued); returns how many did not
        leave, their bytes taken back."""
        pending = self._pending
        size = pending.size
        rows = pending.rows()
        failed, too_big = self._send_rows(rows, size, pending.count, pending.flow, pending.dest)
        if failed:
            only = self.peers.only
            peer = only if only is not None else next((p for p in self.peers.all if p.dest is pending.dest), None)
            if too_big:  # the first that failed stands for them all: one ICMP, which the rate limit allows anyway
                at = (pending.count - failed) * size
                frame = rows[at + self._header_len : at + size]
                self._too_big(frame, len(frame), peer, count=failed, failed=True)
            inner = failed * (size - self._header_len)
            self.stats.tx_bytes -= inner
            if only is None and peer is not None:  # counted per packet when queued: taken back from that peer
                peer.stats.tx_packets -= failed
                peer.stats.tx_bytes -= inner
                peer.stats.dropped += failed
        pending.clear()
        return failed

    def segment_limit(self, peer: Peer | None) -> int:
        """The largest inner frame (a segment of a super-frame: its headers included) that may leave for
        ``peer``: the engine's own limit and its path's (None: the engine's only)."""
        return self.max_frame if peer is None else min(self.max_frame, peer.max_frame)

    def _too_big(self, frame: memoryview, size: int, peer: Peer | None, count: int = 1, failed: bool = False) -> None:
        """``count`` frames of ``size`` bytes (the first in ``frame``: for a super-frame, the whole of it; ``size``
        is then its segments') did not fit the path towards ``peer``: counted, and the sender told (ICMP, within
        the rate limit) the limit it must keep. ``failed``: the send failed, so the kernel knows a smaller path MTU
        than the peer holds: ask it (and otherwise, for a learnt limit, now and then: the path may have grown)."""
        stats = self.stats
        stats.drops[Drop.TOO_BIG] += count
        if peer is not None and self._path_mtu is not None:
            now = self._clock()
            if failed or (peer.pmtu and now - peer.pmtu_checked >= PMTU_RECHECK):
                self._learn_path(peer, now)
        limit = self.segment_limit(peer)
        if size <= limit:  # the path grew back (or the error was not the path's): the next frame will go
            return
        # the MTU the ICMP names is the inner IP packet's: a TAP frame's Ethernet header is not part of it
        self._write_icmp(frame, too_big=True, mtu=limit - (ETH_HLEN if self.l2 else 0))

    def _write_icmp(self, frame: memoryview, *, too_big: bool, mtu: int = 0) -> None:
        """Answer ``frame``'s sender with an ICMP error written into the device (pmtu.py), within the budget."""
        stats = self.stats
        if not self._icmp_limit.allow(self._clock()):
            stats.icmp_limited += 1
            return
        built = reply(frame, l2=self.l2, too_big=too_big, mtu=mtu)
        if built is None:  # no DF, an ICMP error, a fragment...: nothing may be said (pmtu.py)
            self._icmp_limit.give_back()  # nor should it cost those who may be answered
            return
        kind, packet = built
        try:
            self.port.write(memoryview(packet))
        except OSError:
            stats.drops[Drop.DEVICE_WRITE_ERROR] += 1
            return
        stats.icmp_sent[ICMP_KINDS.index(kind)] += 1

    def _learn_path(self, peer: Peer, now: float) -> None:
        """Ask the link what the kernel holds as the path MTU towards ``peer`` and keep it on the peer."""
        peer.pmtu_checked = now
        try:
            mtu = self._path_mtu(peer.address)
        except OSError:
            return
        if mtu and mtu != peer.pmtu:
            peer.pmtu = mtu
            peer.max_frame = mtu - self._outer_overhead
            self.stats.pmtu_changes += 1
            if self._sessions:
                peer.session.set_frame_limit(self._frame_limit(peer))  # a padding session pads within it

    def _superframe_targets(self, segs: Segments, only: Peer | None) -> tuple[Peer, ...]:
        """Whom a super-frame's rows go to: its one peer (looked up once for all its rows) or, flooded, every
        peer (each segment counted ``flooded``, as the help says); none for no route (counted, the sender told)."""
        if only is not None:
            return (only,)
        peer = self._choose(segs.frame_len)
        if peer.__class__ is Peer:
            return (peer,)
        if peer is None:
            self.stats.flooded += segs.count
            return self.peers.all
        self.stats.drops[peer] += segs.count
        self._write_icmp(self._txview[HEADROOM : HEADROOM + segs.frame_len], too_big=False)
        return ()

    def _send_superframe(self, segs: Segments, flow: int, only: Peer | None) -> tuple[int, int]:
        """Send the rows a super-frame was cut into, after what waits (order), to its one peer (looked up once
        for all its rows) or, flooded, to every peer: (packets, inner bytes) that left."""
        moved = -self._flush() if self._pending.count else 0
        segment = segs.rowlen - self._header_len  # the largest inner frame a row carries
        targets = self._superframe_targets(segs, only)
        if not targets:
            return moved, 0
        nbytes = 0
        frame = self._txview[HEADROOM : HEADROOM + segs.frame_len]
        for peer in targets:
            if segment > self.segment_limit(peer):
                self._too_big(frame, segment, peer, count=segs.count)
                if only is None:
                    peer.stats.dropped += segs.count
                continue
            failed, too_big = self._send_rows(segs.buffer, segs.rowlen, segs.count, flow, peer.dest)
            if too_big:
                self._too_big(frame, segment, peer, count=failed, failed=True)
            sent = segs.count - failed
            inner = sent * (segs.rowlen - self._header_len) if failed else segs.inner_bytes
            moved, nbytes = moved + sent, nbytes + inner
            if only is None:
                ps = peer.stats
                ps.tx_packets += sent
                ps.tx_bytes += inner
                ps.dropped += failed
        return moved, nbytes

    def _send_kernel(self, n: Super, only: Peer | None) -> tuple[int, int] | None:
        """Hand the super-frame at HEADROOM (``n`` bytes, its vnet fields in ``n.gso``) to the egress device,
        for the kernel to segment on its way to its one peer: (packets, inner bytes) it becomes, as the rows
        cut here would count; None when it must be cut here (flooded, no route, a segment over
        the limit: counted there; or the egress declined this one)."""
        gso = n.gso
        peer = only if only is not None else self._choose(n)
        if peer.__class__ is not Peer:
            return None
        gso_size, hlen = gso[1], gso[4]
        # Each segment must cross the underlay as one packet: the largest inner frame towards this peer (its path
        # MTU as learnt); one over it is cut here, where it is dropped as too_big and answered with ICMP. The
        # kernel's forwarding does not heed the path MTU it caches (ip_forward_use_pmtu is 0), and a write into
        # the egress device never fails for it, so no failed send would tell us: ask the kernel now and then
        # (PMTU_RECHECK, a connect and a getsockopt per peer, only while super-frames flow to it).
        if self._path_mtu is not None:
            now = self._clock()
            if now - peer.pmtu_checked >= PMTU_RECHECK:
                self._learn_path(peer, now)
        if hlen + gso_size > self.segment_limit(peer):
            return None
        frame = self._txview[HEADROOM : HEADROOM + n]
        try:
            if not self.port.egress.send(frame, *gso, self._flow_hash(frame), peer.dest):
                return None
        except OSError:
            return None  # cut here, the sends will say what the socket thinks of it
        self.stats.kernel_gso_frames += 1
        payload = n - hlen
        count = -(-payload // gso_size)
        inner = count * hlen + payload
        if only is None:
            ps = peer.stats
            ps.tx_packets += count
            ps.tx_bytes += inner
        return count, inner

    # -- inbound ---------------------------------------------------------------------------------------------

    def on_link_readable(self) -> None:
        if self._sessions:
            return self._opened_rows_readable() if self._rows else self._opened_link_readable()
        stats = self.stats
        drops = stats.drops
        rx, view = self._rx, self._rxview
        area = self._rx_area
        recv = self._recv
        deliver = self._deliver
        deliver_one = self._deliver_one
        gather = self._gather  # None with batches of one: every datagram is judged and written alone
        by_endpoint = self.peers.by_endpoint
        now = self._clock()
        gpeer = None  # the peer whose datagrams are gathered (a gathering holds one peer's only)
        reads = moved = nbytes = taken = 0
        into = area  # where the next read lands: behind the datagrams gathered so far, if any
        for _ in range(self.batch):
            if taken >= WAKEUP_BYTES:
                break
            try:
                n, source, size = recv(into)
            except BlockingIOError:
                break
            except OSError:
                # A queued ICMP error or similar: not fatal, and the next datagram may be fine.
                drops[Drop.SOCKET_ERROR] += 1
                continue
            reads += 1
            taken += n
            peer = by_endpoint.get(source)
            if peer is None:
                drops[Drop.UNKNOWN_PEER] += -(-n // size) if size else 1
                continue
            if gather is not None:
                single = not size or n <= size
                if single and n >= GATHER_MIN and peer is gpeer:
                    fill = gather.add(n)
                    if fill:  # gathered behind the others
                        if fill > RX_AREA:
                            m, b = deliver(*gather.take(), peer, now)
                            moved, nbytes, into = moved + m, nbytes + b, area
                        else:
                            into = view[fill : fill + RX_AREA]
                        continue
                if gather.fill:
                    # Deliver what was gathered first (order!), keeping the new read out of reach of the padding
                    # the plan writes after the gathered rows; then the new read starts at 0.
                    saved = rx[gather.fill : gather.fill + n].copy()
                    m, b = deliver(*gather.take(), gpeer, now)
                    moved, nbytes, into = moved + m, nbytes + b, area
                    rx[:n] = saved
                if not single:
                    m, b = deliver(n, size, peer, now)
                    moved, nbytes = moved + m, nbytes + b
                    continue
                if n >= GATHER_MIN:
                    gather.start(n)
                    gpeer = peer
                    into = view[n : n + RX_AREA]
                    continue
                # too short to be part of a run: judged and written alone, right away
            b = deliver_one(view[:n], peer, now, source)
            if b >= 0:
                moved += 1
                nbytes += b
        if gather is not None and gather.fill:
            m, b = deliver(*gather.take(), gpeer, now)
            moved, nbytes = moved + m, nbytes + b
        if moved:
            stats.peer_last_rx = now
        stats.rx_packets += moved
        stats.rx_bytes += nbytes
        stats.rx_batches[reads] += 1
        self._note_kernel_drops()
        if self._loop is not None and gather is not None and self.link.buffered:
            # The wake-up's budget ran out with packets the link took from the kernel in hand (raw IP's recvmmsg):
            # no poll would report them, so come back for them on the next turn of the loop.
            self._loop.call_soon(self.on_link_readable)

    def _source_allowed(self, packet: memoryview, at: int, peer: Peer) -> bool:
        """L3: whether the inner packet at ``packet[at:]`` comes from an address in ``peer``'s routes."""
        version = packet[at] >> 4 if len(packet) > at else 0
        if version == 4 and len(packet) >= at + 20:
            return self.peers.routes.lookup(int.from_bytes(packet[at + 12 : at + 16], "big"), 4) is peer
        if version == 6 and len(packet) >= at + 40:
            return self.peers.routes.lookup(int.from_bytes(packet[at + 8 : at + 24], "big"), 6) is peer
        return False

    def _deliver_one(self, packet: memoryview, peer: Peer, now: float, source: str, port: int = 0) -> int:
        """The one way a single datagram from ``peer`` reaches the device: its session's verdict (``open``), and
        in L3 with several peers whether the inner source is the peer's; then the write, the source MAC (L2)
        and the peer's counters; a session that authenticated it may move the peer to ``source`` and ``port``
        (roaming; port 0: not known, the peer keeps its own).
        Returns the inner bytes written, or -1 when nothing was (counted by reason, never raised)."""
        ps = peer.stats
        opened = peer.session.open(packet, now)
        if opened.__class__ is not tuple:
            if opened is HELD:  # the codec's own message: no frame, no drop; it may have something to send
                self._roam(peer, source, port)  # first: an answer (a handshake response) goes where the peer is now
                self._after_session(peer, now)
                return -1
            self.stats.drops[opened] += 1
            ps.dropped += 1
            return -1
        at, length = opened
        fdb = self.peers.fdb
        if fdb is None and self.peers.only is None and not self._source_allowed(packet, at, peer):
            self.stats.drops[Drop.SOURCE_NOT_ALLOWED] += 1
            ps.dropped += 1
            return -1
        try:
            self.port.write(packet[at : at + length])
        except OSError:
            self.stats.drops[Drop.DEVICE_WRITE_ERROR] += 1
            ps.dropped += 1
            return -1
        if fdb is not None:
            mac = bytes(packet[at + 6 : at + 12])
            entry = fdb.table.get(mac)
            if entry is not None and entry.peer is peer:
                entry.seen = now
            else:
                fdb.learn(mac, peer, now)
        ps.rx_packets += 1
        ps.rx_bytes += length
        ps.last_rx = now
        if self._sessions:
            self._roam(peer, source, port)
            self._after_session(peer, now)
        return length

    def _roam(self, peer: Peer, source: str, port: int) -> None:
        """A datagram from ``source`` and ``port`` (0: not known) was accepted by ``peer``'s session: if the
        session authenticates what it accepts, the peer is now there; if not, nothing moves (a spoofed source
        must never redirect a peer)."""
        if port == 0:
            port = peer.port
        if (source != peer.endpoint or port != peer.port) and peer.session.authenticates \
                and self.peers.move(peer, source, port):
            self.stats.endpoint_changes += 1

    def _deliver(self, n: int, size: int, peer: Peer, now: float) -> tuple[int, int]:
        """The codec's verdict on ``peer``'s datagrams of ``size`` in ``rx[:n]`` (and, L3, whether their inner
        sources are the peer's), then the device port writes what was accepted and, L2, their source MACs
        are learnt: (frames, inner bytes) written."""
        packets = self._rxview[:n]
        if size >= n:  # one datagram
            b = self._deliver_one(packets, peer, now, peer.endpoint)
            return (1, b) if b >= 0 else (0, 0)
        ps = peer.stats
        fdb = self.peers.fdb
        verdicts = self.codec.decap_batch(packets, size)
        if fdb is None and self.peers.only is None:
            for i, verdict in enumerate(verdicts):
                if verdict.__class__ is not Drop and not self._source_allowed(
                        packets[i * size : (i + 1) * size], verdict, peer):
                    verdicts[i] = Drop.SOURCE_NOT_ALLOWED
        m, b, merged = self.port.write_rows(self._rx, self._rxview, n, size, verdicts, self.stats.drops)
        if fdb is not None and m:
            self._learn_rows(n, size, verdicts, peer, now, merged)
        ps.dropped += len(verdicts) - m
        ps.rx_packets += m
        ps.rx_bytes += b
        if m:
            ps.last_rx = now
        return m, b

    def _learn_rows(self, n: int, size: int, verdicts: list, peer: Peer, now: float, merged: bool) -> None:
        """Learn the source MAC of every accepted row in ``rx[:n]``. A read's rows are not one inner flow: UDP
        GRO merges datagrams of one outer 4-tuple, whatever inner flows share the peer's source port (a port
        hash collision, or a peer that sends from one port), and the gatherer merges any consecutive datagrams
        of one length. Mostly they do carry one source: when the port wrote them all as one super-frame, the
        coalescer has already compared every row's Ethernet header with the first's; otherwise one NumPy pass
        checks it (every row accepted at the usual offset, every source MAC the first's). Then that MAC is
        learnt once; else each row's source is learnt (a MAC seen again in the same read only refreshes it).
        ``merged``: the port wrote every row as one super-frame (``VnetPort.write_rows``)."""
        fdb = self.peers.fdb
        p = self.port.header_len
        rx = self._rx
        if merged:  # one super-frame: every row carried the head's Ethernet header (io/port.py)
            fdb.learn(bytes(rx[p + 6 : p + 12]), peer, now)
            return
        count = len(verdicts)
        if verdicts.count(p) == count:
            # Each row's source MAC and ethertype as one little-endian word (rows are not aligned: numpy reads
            # them anyway); shifted left by 16, what is left is the MAC: one NumPy pass over the rows.
            words = np.ndarray((count,), _LE64, rx, p + 6, (size,)) << 16
            if (words == words[0]).all():
                fdb.learn(bytes(rx[p + 6 : p + 12]), peer, now)
                return
        for i, verdict in enumerate(verdicts):
            if verdict.__class__ is not Drop:
                at = i * size + verdict
                fdb.learn(bytes(rx[at + 6 : at + 12]), peer, now)


def make_engine(device, link: LinkPort, codec: Encapsulator, *, max_frame: int, offload: bool,
                peers: Sequence[PeerSpec] | None = None, fdb_max: int = DEFAULT_MAX_ENTRIES,
                fdb_ageing: float = DEFAULT_AGEING, egress=None) -> Engine:
    """The data path for an open device and link: with ``offload`` the device was opened with IFF_VNET_HDR
    (and ``offload_supported(codec)`` holds), else batches of one. ``peers``: the peer table's specs (None:
    the link's one peer). ``egress``: where the kernel segments super-frames for us (io/egress.py), or None."""
    return Engine(device, link, codec, max_frame=max_frame, offload=offload, peers=peers, fdb_max=fdb_max,
                  fdb_ageing=fdb_ageing, egress=egress)

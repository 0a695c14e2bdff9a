"""The UDP underlay: one socket that receives on the tunnel port, a small pool that sends.

Why a pool: RFC 7348 §5 asks for the outer source port to carry entropy from the inner flow, so that ECMP
routers and the receiver's RSS spread flows. A socket has one source port, so we keep a few unconnected
sockets bound to ephemeral ports and pick one by the inner flow hash. Receivers (the Linux driver included)
accept any source port, and nothing here expects the peer to reply to a particular one.

The sockets are never connected: an ICMP "port unreachable" from a peer that is down then cannot turn into
an error on the next call (ECONNREFUSED), and the peer can be changed at run time.

Path MTU (``df``, ``set_df``): by default the send sockets set "don't fragment" (IP_PMTUDISC_DO): a VTEP must
not fragment (RFC 7348 §4.3), so a datagram that does not fit the path MTU the kernel knows fails with EMSGSIZE,
and the engine asks ``path_mtu`` (``PathProbe``) for the new limit and tells the inner sender (engine.py).
``df=False`` (``--df unset``) is IP_PMTUDISC_DONT: never DF, the kernel fragments to the interface MTU and the
path's routers fragment further, for paths that drop ICMP. (IP_PMTUDISC_WANT would set DF while a datagram fits
the path MTU the kernel knows: on a path that drops ICMP it never learns, and the big datagrams vanish.) IPv6
routers never fragment: there IPV6_PMTUDISC_DONT lets this host fragment to the path MTU it learnt (a router's
"packet too big" still has to arrive), or to the interface MTU.

The kernel's drops: the receive socket sets SO_RXQ_OVFL, so every datagram read after the socket's first drop
carries the socket's running count of datagrams dropped for want of buffer space (``sk_drops``); ``KernelDrops``
turns it into increments, which the engine counts as ``kernel_rcvbuf``. The buffer is sized by the engine from
its wake-up budget (``size_receive_buffer``; engine.RECEIVE_BUFFER says why that size).
"""

from __future__ import annotations

import errno
import socket
import struct

from tunneld.io import LinkError, same_family_peer, underlay_family

IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DONT = getattr(socket, "IP_PMTUDISC_DONT", 0)
IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)
IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
IPV6_PMTUDISC_DONT = getattr(socket, "IPV6_PMTUDISC_DONT", 0)
IPV6_PMTUDISC_DO = getattr(socket, "IPV6_PMTUDISC_DO", 2)
IP_MTU = getattr(socket, "IP_MTU", 14)  # getsockopt, connected socket: the MTU of its route (path MTU learnt)
IPV6_MTU = getattr(socket, "IPV6_MTU", 24)
SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)  # cmsg (u32): the socket's running count of dropped datagrams
_OVFL = struct.Struct("=I")
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_MARK = getattr(socket, "SO_MARK", 36)

# UDP GSO/GRO (include/uapi/linux/udp.h); Python's socket module lacks the names.
SOL_UDP = 17
UDP_SEGMENT = 103  # send: cut one sendmsg into datagrams of this size (cmsg, u16)
UDP_GRO = 104  # receive: coalesce datagrams of one size; the size arrives in a cmsg (int)
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS was 64 before Linux 6.9; stay below it
GSO_MAX_BYTES = 65000  # one sendmsg's payload must fit an IP datagram's length field, headers included
_GSO_SIZE = struct.Struct("=H")
_GRO_SIZE = struct.Struct("=i")
CMSG_SPACE = socket.CMSG_SPACE(4) * 2  # UDP_GRO's segment size and SO_RXQ_OVFL's count
OVFL_SPACE = socket.CMSG_SPACE(4)  # SO_RXQ_OVFL's alone

SOCKET_BUFFER = 4 << 20
DEFAULT_SEND_SOCKETS = 8


def _grow_buffer(sock: socket.socket, force: int, plain: int, size: int) -> None:
    # The *FORCE variants ignore net.core.[rw]mem_max but need CAP_NET_ADMIN, which we have when running.
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


def set_df(sock: socket.socket, family: int, df: bool) -> None:
    """"Don't fragment" on ``sock``'s datagrams (IP_PMTUDISC_DO), or never (IP_PMTUDISC_DONT): see the module."""
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO if df else IPV6_PMTUDISC_DONT)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO if df else IP_PMTUDISC_DONT)


def count_drops(sock: socket.socket) -> None:
    """Have ``sock`` report its dropped datagrams with each one read (SO_RXQ_OVFL); where the kernel refuses,
    nothing is counted and nothing else changes."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
    except OSError:
        pass


class KernelDrops:
    """The socket's running drop count (a u32 the kernel may wrap) as a total of increments: ``total`` counts
    from the socket's creation, when the kernel's count was 0."""

    __slots__ = ("total", "_last")

    def __init__(self) -> None:
        self.total = 0
        self._last = 0

    def seen(self, count: int) -> None:
        self.total += (count - self._last) & 0xFFFFFFFF
        self._last = count

    def note(self, ancdata: list) -> None:
        """Take the count from a recvmsg's ancillary data, if it carries one."""
        for level, kind, data in ancdata:
            self.note_one(level, kind, data)

    def note_one(self, level: int, kind: int, data: bytes) -> None:
        """Take the count from one control message, if it is SO_RXQ_OVFL's."""
        if level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL and len(data) >= 4:
            self.seen(_OVFL.unpack_from(data)[0])


class PathProbe:
    """The path MTU the kernel holds towards an address: IP_MTU (IPV6_MTU) of a UDP socket connected to it,
    which the route cache answers, a router's "fragmentation needed" included. Connecting sends nothing; one
    socket is connected again for each question. Asked only when a send failed or a learnt limit is old
    (engine.py), never per packet."""

    def __init__(self, family: int, local: str | None) -> None:
        self.family = family
        self.local = local
        self._sock: socket.socket | None = None

    def path_mtu(self, address: str) -> int:
        if self._sock is None:
            self._sock = socket.socket(self.family, socket.SOCK_DGRAM)
            if self.local is not None:
                self._sock.bind((self.local, 0))
        self._sock.connect((address, 9))  # discard; the route does not depend on the port
        if self.family == socket.AF_INET6:
            return self._sock.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU)
        return self._sock.getsockopt(socket.IPPROTO_IP, IP_MTU)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class UdpLink:
    """Sends to any peer (``destination``) and receives from all over UDP; ``peer`` is the default destination
    (the first peer) and may be changed while running."""

    spreads_flows = True  # the inner flow picks the send socket, hence the outer source port
    buffered = False  # every datagram read is handed out at once (the kernel holds the rest)

    def __init__(
        self, peer: str, port: int, local: str | None = None, send_sockets: int = DEFAULT_SEND_SOCKETS,
        reuse_port: bool = False, df: bool = True,
    ) -> None:
        self.family, self.peer = underlay_family(peer, local)  # peer: where inbound datagrams must come from
        self.port = port
        self.mark = 0  # SO_MARK (set_mark)
        self.gro = False  # UDP_GRO asked for (enable_gro)
        self.local = local
        self._peer: tuple[str, int] = (self.peer, port)
        any_addr = "::" if self.family == socket.AF_INET6 else "0.0.0.0"
        self.df = df
        self._probe = PathProbe(self.family, local)
        self._drops = KernelDrops()
        self._rx = self._socket()
        if reuse_port:  # one receive socket per worker on the same port; see open_group()
            self._rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        _grow_buffer(self._rx, SO_RCVBUFFORCE, socket.SO_RCVBUF, SOCKET_BUFFER)  # until the engine sizes it
        count_drops(self._rx)
        self._bind(self._rx, local or any_addr, port)
        self._tx: list[socket.socket] = []
        if send_sockets == 0:
            # Send from the receive socket, hence from the listening port: a peer that replies to where a
            # datagram came from (WireGuard's endpoint is the source address AND port) then reaches us.
            set_df(self._rx, self.family, df)
            self._tx.append(self._rx)
            self.spreads_flows = False
        try:
            for _ in range(send_sockets if send_sockets == 0 else max(1, send_sockets)):
                s = self._socket()
                set_df(s, self.family, df)
                _grow_buffer(s, SO_SNDBUFFORCE, socket.SO_SNDBUF, SOCKET_BUFFER)
                # Nothing is read from these sockets; keep what strays there from piling up.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                self._bind(s, local or any_addr, 0)
                self._tx.append(s)
        except BaseException:
            self.close()
            raise
        self._ntx = len(self._tx)

    def _socket(self) -> socket.socket:
        try:
            s = socket.socket(self.family, socket.SOCK_DGRAM)
        except OSError as e:  # EAFNOSUPPORT: IPv6 disabled on this host, for one
            version = "IPv6" if self.family == socket.AF_INET6 else "IPv4"
            raise LinkError(f"cannot open an {version} UDP socket: {e.strerror}") from e
        s.setblocking(False)
        if self.family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        return s

    def _bind(self, sock: socket.socket, host: str, port: int) -> None:
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRINUSE:
                raise LinkError(
                    f"UDP port {port} on {host} is already in use (another tunneld, or a kernel vxlan device "
                    "with that dstport?); pick another with --port"
                ) from e
            if e.errno == errno.EADDRNOTAVAIL:
                raise LinkError(f"local address {host} is not configured on this host") from e
            if e.errno == errno.EACCES:
                raise LinkError(
                    f"binding UDP port {port} (below 1024) needs CAP_NET_BIND_SERVICE: use a port of 1024 or "
                    "more, run as root, or grant the capability",
                    missing_privilege=True,
                ) from e
            raise LinkError(f"cannot bind UDP {host}:{port}: {e.strerror}") from e

    def set_peer(self, peer: str) -> None:
        self.peer = same_family_peer(peer, self.family)
        self._peer = (self.peer, self.port)

    def fileno(self) -> int:
        return self._rx.fileno()

    def source_ports(self) -> list[int]:
        """The send sockets' ports, in the order ``flow % len`` picks them: what another way out (the kernel
        path, io/egress.py) must send from for the peer to see the same flows."""
        return [s.getsockname()[1] for s in self._tx]

    def recv_into(self, buf: memoryview) -> tuple[int, str]:
        """One datagram into ``buf``: (length, source address). Raises BlockingIOError when there is none."""
        n, source, _ = self.recv_one(buf)
        return n, source

    def recv_from(self, buf: memoryview) -> tuple[int, str, int]:
        """One datagram: (length, source address, source port), for the codecs whose peers answer from a port
        of their own (WireGuard)."""
        n, ancdata, _flags, addr = self._rx.recvmsg_into((buf,), OVFL_SPACE)
        if ancdata:  # only once the socket has dropped something
            self._drops.note(ancdata)
        return n, addr[0], addr[1]

    def recv_one(self, buf: memoryview) -> tuple[int, str, int]:
        """One datagram, answered as ``recv_gro_into`` answers (size 0: not rows): the engine's batch of one."""
        n, source, _port = self.recv_from(buf)
        return n, source, 0

    @property
    def kernel_drops(self) -> int:
        """Datagrams the kernel dropped before we could read them (receive buffer full), as far as reads told."""
        return self._drops.total

    def size_receive_buffer(self, size: int) -> None:
        """The receive socket's buffer, in bytes of the kernel's accounting (which charges each datagram its
        buffer's true size); beyond net.core.rmem_max where we may (SO_RCVBUFFORCE, CAP_NET_ADMIN)."""
        _grow_buffer(self._rx, SO_RCVBUFFORCE, socket.SO_RCVBUF, size)

    def path_mtu(self, address: str) -> int:
        """The path MTU the kernel holds towards ``address`` (``PathProbe``)."""
        return self._probe.path_mtu(address)

    def destination(self, address: str, port: int | None = None) -> tuple[str, int]:
        """What ``send`` takes to reach the peer at ``address`` and ``port`` (None: the tunnel's), built once per
        peer; ValueError (one line) for an address of the other IP version (one socket family for all peers)."""
        try:
            return (same_family_peer(address, self.family), self.port if port is None else port)
        except Exception as e:
            raise ValueError(str(e)) from None

    def set_mark(self, mark: int) -> None:
        """SO_MARK on what this link sends (WireGuard's ``fwmark``: policy routing keeps the tunnel's own
        datagrams out of the tunnel); 0: none. Needs CAP_NET_ADMIN; OSError when refused, nothing changed."""
        for sock in {self._rx, *self._tx}:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        self.mark = mark

    def rebind(self, port: int) -> int:
        """Listen (and, with ``send_sockets=0``, send) on ``port`` from now on, 0: one the kernel picks; the
        port bound. The new socket is bound before the old one closes: a port in use raises LinkError (one
        line) and nothing changes. Only for a link that sends from its receive socket (WireGuard's
        ``listen_port``): the caller takes the old descriptor off its event loop first, the new one on after."""
        if self._tx != [self._rx]:
            raise LinkError("this link sends from ports of its own: its listening port is fixed")
        new = self._socket()
        count_drops(new)
        set_df(new, self.family, self.df)
        if self.mark:
            new.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
        if self.gro:
            new.setsockopt(SOL_UDP, UDP_GRO, 1)  # the engine's reads are rows: so must the new socket's be
        self._bind(new, self.local or ("::" if self.family == socket.AF_INET6 else "0.0.0.0"), port)
        size = self._rx.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2  # the kernel reports it doubled
        _grow_buffer(new, SO_RCVBUFFORCE, socket.SO_RCVBUF, size)
        old, self._rx = self._rx, new
        self._tx = [new]
        self._drops = _carried(self._drops)
        self.port = new.getsockname()[1]
        self._peer = (self.peer, self.port)
        old.close()
        return self.port

    def send(self, packet: memoryview, flow: int, dest: tuple[str, int] | None = None) -> None:
        """Send one datagram to ``dest`` (``destination(peer)``; None: ``peer``) from the source port that
        ``flow`` selects."""
        self._tx[flow % self._ntx].sendto(packet, dest or self._peer)

    def enable_gro(self, max_packet: int = 65535) -> bool:
        """Ask the kernel to coalesce received datagrams (UDP_GRO); False where it cannot. (``max_packet``: see
        RawLink; a GRO read here lands in the caller's buffer.)"""
        try:
            self._rx.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError:
            return False
        self.gro = True  # a rebind's new socket asks again
        return True

    def recv_gro_into(self, buf: memoryview) -> tuple[int, str, int]:
        """One (possibly coalesced) read: (length, source address, datagram size; 0 when not coalesced)."""
        n, source, _port, size = self.recv_gro_from(buf)
        return n, source, size

    def recv_gro_from(self, buf: memoryview) -> tuple[int, str, int, int]:
        """``recv_gro_into`` with the source's port: (length, source address, its port, datagram size or 0), for
        the codecs whose peers answer from a port of their own (WireGuard)."""
        n, ancdata, _flags, addr = self._rx.recvmsg_into((buf,), CMSG_SPACE)
        size = 0
        for level, kind, data in ancdata:
            if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
                (size,) = _GRO_SIZE.unpack_from(data)
            else:
                self._drops.note_one(level, kind, data)
        return n, addr[0], addr[1], size

    def send_segments(self, packets: memoryview, size: int, flow: int, dest: tuple[str, int] | None = None) -> None:
        """Send ``packets``, datagrams of ``size`` bytes back to back (the last may be shorter), with as few
        UDP_SEGMENT sendmsg calls as the kernel's limits allow.

        When a call fails after earlier ones went out, the OSError raised carries ``sent``: how many datagrams
        did leave, so that the caller counts exactly what crossed."""
        sock = self._tx[flow % self._ntx]
        peer = dest or self._peer
        if len(packets) <= size:  # one datagram (a ping, an ACK): a plain send; the GSO path costs it ~5 us a hop
            sock.sendto(packets, peer)
            return
        per_call = min(GSO_MAX_SEGMENTS, max(1, GSO_MAX_BYTES // size)) * size
        cmsg = [(SOL_UDP, UDP_SEGMENT, _GSO_SIZE.pack(size))]
        start = 0
        try:
            for start in range(0, len(packets), per_call):
                sock.sendmsg((packets[start : start + per_call],), cmsg, 0, peer)
        except OSError as e:
            if not self.df and e.errno in (errno.EINVAL, errno.EMSGSIZE):
                # DF unset, yet a UDP_SEGMENT send is refused when its datagrams exceed the path MTU the kernel
                # learnt (IPv6: udp_v6_send_skb checks them against it); a single datagram it fragments.
                self._send_one_by_one(sock, packets, start, size, peer)
                return
            e.sent = start // size  # every call before the failing one carried whole datagrams
            raise

    def _send_one_by_one(self, sock: socket.socket, packets: memoryview, start: int, size: int, peer) -> None:
        at = start
        try:
            for at in range(start, len(packets), size):
                sock.sendto(packets[at : at + size], peer)
        except OSError as e:
            e.sent = at // size
            raise

    def close(self) -> None:
        for s in {self._rx, *self._tx}:
            s.close()
        self._probe.close()


def _carried(drops: KernelDrops) -> KernelDrops:
    """The drop count of a new socket (which starts at 0) on top of the old one's total."""
    new = KernelDrops()
    new.total = drops.total
    return new


def open_group(peer: str, port: int, local: str | None, count: int, df: bool = True) -> list[UdpLink]:
    """``count`` links whose receive sockets share ``port`` (SO_REUSEPORT): the kernel hands each datagram to
    one of them by the hash of its addresses and ports, so the peer's flows (whose outer source ports differ)
    spread over the workers.

    SO_REUSEPORT would also let us join a group that another process of the same user already bound, and
    share its traffic without a word. So the port is first bound once without it: a port in use fails here
    with the usual one-line error, as it does for a single worker."""
    UdpLink(peer, port, local, send_sockets=1).close()
    links: list[UdpLink] = []
    try:
        for _ in range(count):
            links.append(UdpLink(peer, port, local, reuse_port=True, df=df))
    except BaseException:
        for link in links:
            link.close()
        raise
    return links

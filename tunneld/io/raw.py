"""The raw IP underlay: encapsulations that ride directly on IP (GRE: protocol 47), no UDP.

One ``socket(AF_INET[6], SOCK_RAW, protocol)`` sends and receives. The kernel builds the outer IP header on
send (no IP_HDRINCL), so only the encapsulated packet is handed over, exactly as with UDP.

How Linux delivers protocol 47 here (net/ipv4/ip_input.c ``ip_protocol_deliver_rcu``, and its IPv6 twin): every
raw socket bound to the protocol gets a clone of each packet for it (``raw_local_deliver``) *before* the
protocol's own handler runs. With no GRE driver loaded (the CI kernel has none) there is no handler; because a
raw socket took the packet, the kernel does not answer "protocol unreachable" either. With ip_gre loaded, the
kernel's own GRE handling runs as well and we still get our copy. Until a raw socket is open, the kernel does
answer the peer with ICMP protocol unreachable; that error surfaces on the peer's socket as one failed receive,
which the engine counts (``socket_error``) and moves past.

The receive side differs between families:
- IPv4 raw sockets deliver the outer IPv4 header too. Rather than copy the packet down by IHL*4 bytes, the
  receive scatters: the first 20 bytes (an IPv4 header without options, the normal case) land in a small side
  buffer, the GRE packet lands at the start of the caller's buffer. Only a header that carries options (rare
  and suspect on a tunnel underlay) costs a move of the packet by the option bytes.
- IPv6 raw sockets deliver the payload only (RFC 3542 §3), so the packet is already where it should be.
The engine's interface therefore stays that of the UDP link: ``recv_one(buf) -> (n, source, 0)`` with the
encapsulated packet in ``buf[:n]``.

Like the UDP link the socket is never connected: the peer can change at run time, and the engine sees (and
counts) packets from strangers. Path MTU and the kernel's drops as in io/udp.py: sends set "don't fragment"
unless ``df=False`` (an encapsulated packet that does not fit the path fails with EMSGSIZE; the engine asks
``path_mtu`` and answers the inner sender), and SO_RXQ_OVFL's count rides on the reads (recvmsg's ancillary
data, or recvmmsg's per packet).
"""

from __future__ import annotations

import errno
import socket
import struct

import numpy as np

from tunneld.io import LinkError, same_family_peer, underlay_family
from tunneld.io.udp import (
    OVFL_SPACE,
    SO_RCVBUFFORCE,
    SO_SNDBUFFORCE,
    SOCKET_BUFFER,
    KernelDrops,
    PathProbe,
    _grow_buffer,
    count_drops,
    set_df,
)
from tunneld.io.mmsg import MessageReceiver, MessageSender

IPV4_HEADER_LEN = 20  # without options
IPV4_IHL_OFFSET = 0  # low nibble of the first byte, in 32-bit words
IPV4_MAX_HEADER_LEN = 60
# Where the address sits in the struct sockaddr_in / sockaddr_in6 that recvmmsg fills in, and its length.
_NAME_ADDR = {socket.AF_INET: (4, 4), socket.AF_INET6: (8, 16)}


def _sockaddr(family: int, address: str) -> bytes:
    """struct sockaddr_in / sockaddr_in6 with port 0 (raw IP has none), in this host's layout."""
    packed = socket.inet_pton(family, address)
    if family == socket.AF_INET:
        return struct.pack("=H2s4s8x", family, b"\0\0", packed)
    return struct.pack("=H2sI16sI", family, b"\0\0", 0, packed, 0)


class RawLink:
    """Sends to any peer (``destination``) and receives from all over raw IP with protocol ``protocol``;
    ``peer`` is the default destination and may change."""

    spreads_flows = False  # no ports: the engine need not hash inner flows for us
    NAME_SLOT = MessageReceiver.NAME_SIZE  # bytes per packet's source address in the receiver's names

    def __init__(self, peer: str, protocol: int, local: str | None = None, df: bool = True) -> None:
        self.family, self.peer = underlay_family(peer, local)
        self.protocol = protocol
        self.local = local
        self._peer: tuple[str, int] = (self.peer, 0)
        self.df = df
        self._probe = PathProbe(self.family, local)
        self._drops = KernelDrops()
        self._count = self._next = 0  # nothing held until enable_gro() gives the receiver slots (``buffered``)
        try:
            self._sock = socket.socket(self.family, socket.SOCK_RAW, protocol)
        except PermissionError as e:
            raise LinkError(
                f"opening a raw IP socket (protocol {protocol}) needs CAP_NET_RAW: run as root or grant the "
                "capability (systemd: AmbientCapabilities=CAP_NET_RAW)",
                missing_privilege=True,
            ) from e
        except OSError as e:
            raise LinkError(f"cannot open a raw IP socket for protocol {protocol}: {e.strerror}") from e
        try:
            self._sock.setblocking(False)
            _grow_buffer(self._sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, SOCKET_BUFFER)
            _grow_buffer(self._sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, SOCKET_BUFFER)
            set_df(self._sock, self.family, df)
            count_drops(self._sock)
            if local is not None:
                try:
                    self._sock.bind((local, 0))
                except OSError as e:
                    if e.errno == errno.EADDRNOTAVAIL:
                        raise LinkError(f"local address {local} is not configured on this host") from e
                    raise LinkError(f"cannot bind raw socket to {local}: {e.strerror}") from e
        except BaseException:
            self._sock.close()
            raise
        self._outer = bytearray(IPV4_HEADER_LEN)  # where the IPv4 receive scatters the outer header
        self._scatter: list = [self._outer, None]
        self.recv_one = self._recv_ipv4 if self.family == socket.AF_INET else self._recv_ipv6
        self._sender: MessageSender | None = None
        self._receiver: MessageReceiver | None = None
        self._sockaddrs: dict[tuple[str, int], bytes] = {}  # destination → its struct sockaddr, for sendmmsg
        self._sources: dict[bytes, str] = {}  # packed source address → text, for the peers seen (bounded)

    def set_peer(self, peer: str) -> None:
        self.peer = same_family_peer(peer, self.family)
        self._peer = self.destination(self.peer)
        if self._sender is not None:
            self._sender.set_destination(self._sockaddrs[self._peer])

    def destination(self, address: str, port: int | None = None) -> tuple[str, int]:
        """What ``send`` takes to reach the peer at ``address``, built once per peer (with its sockaddr for
        sendmmsg); ValueError (one line) for an address of the other IP version. (Raw IP has no ports: ``port``
        is the link protocol's, and ignored.)"""
        try:
            dest = (same_family_peer(address, self.family), 0)
        except Exception as e:
            raise ValueError(str(e)) from None
        if dest not in self._sockaddrs:
            if len(self._sockaddrs) > 4096:  # removed peers' entries: start afresh rather than grow
                self._sockaddrs.clear()
            self._sockaddrs[dest] = _sockaddr(self.family, dest[0])
        return dest

    def _source(self, packed: bytes) -> str:
        """The text form of a packet's source address, as ``recvfrom`` would give it (cached: one per peer)."""
        text = self._sources.get(packed)
        if text is None:
            if len(self._sources) >= 1024:  # strangers must not grow it without bound
                self._sources.clear()
            text = self._sources[packed] = socket.inet_ntop(self.family, packed)
        return text

    # -- many packets per system call (the offload engine) --------------------------------------------------
    # Raw IP has no GSO or GRO. What the UDP link does with one UDP_SEGMENT sendmsg, this link does with one
    # sendmmsg of the same rows; what a UDP_GRO read returns (datagrams of one length back to back), this link
    # builds from one recvmmsg of up to 64 packets: each call of recv_gro_into hands out the next run of packets
    # from the peer that have one length (plus a shorter last one), copied back to back into the caller's
    # buffer. One difference remains: packets taken from the kernel but not yet handed out are invisible to the
    # event loop's poll, so the engine looks at ``buffered`` before it yields (engine.py).

    def enable_gro(self, max_packet: int = 65535) -> None:
        """Send and receive many packets per call. ``max_packet``: the largest encapsulated packet the peer should
        send (our MTU's); each receive slot holds it plus an outer IPv4 header with options, and a longer one
        arrives truncated and is handed on empty, for the codec to count as truncated. Slots sized for 64 KiB
        would cost ~2 MB of resident memory for nothing at the usual MTU."""
        self._sender = MessageSender(self._sock.fileno())
        self.set_peer(self.peer)
        slot = min(1 << 16, -(-(max_packet + IPV4_MAX_HEADER_LEN) // 1024) * 1024)
        self._receive_with(MessageReceiver(self._sock.fileno(), slot_size=slot))

    def _receive_with(self, receiver: MessageReceiver) -> None:
        self._receiver = receiver
        self._slot_size = receiver.slots.shape[1]
        self._slots_flat = memoryview(receiver.slots.reshape(-1))
        self._names_flat = memoryview(receiver.names.reshape(-1))
        self._count = self._next = 0  # packets in the receiver's slots, and the first not yet handed out
        self._drained = False  # the last recvmmsg emptied the socket's queue
        self._sparse = False  # the last recvmmsg brought one packet: read singly until a burst shows
        self._plain_reads = 0  # packets read singly in this wake-up

    def send_segments(self, buffer: memoryview, rowlen: int, flow: int, dest: tuple[str, int] | None = None) -> None:
        """Send ``buffer`` as packets of ``rowlen`` bytes (the last may be shorter) to ``dest`` (None: ``peer``),
        as few calls as the kernel allows. On failure the OSError's ``sent`` says how many packets left before it."""
        dest = dest or self._peer
        if len(buffer) <= rowlen:  # one packet (a ping, an ACK): sendto costs less than a ctypes sendmmsg
            self._sock.sendto(buffer, dest)
            return
        sockaddr = self._sockaddrs.get(dest) or self._sockaddrs[self.destination(dest[0])]
        self._sender.send(buffer, rowlen, sockaddr)

    def _refill(self) -> None:
        """One recvmmsg; then, per packet, where its payload starts (behind the IPv4 header), how long it is and
        who sent it (packed). Plain lists: the run building below indexes them one by one."""
        receiver = self._receiver
        count = receiver.receive()  # BlockingIOError when nothing waits
        drops = receiver.overflow(count - 1)  # the last packet's count is the latest
        if drops is not None:
            self._drops.seen(drops)
        at, size = _NAME_ADDR[self.family]
        if count == 1:  # sparse traffic (a ping, an ACK): no NumPy calls, which cost more than all the rest here
            skip = (self._slots_flat[IPV4_IHL_OFFSET] & 0x0F) * 4 if self.family == socket.AF_INET else 0
            truncated = receiver.first_truncated()
            self._len = [0 if truncated else max(receiver.first_length() - skip, 0)]
            self._skip = [skip]
            self._src = [bytes(self._names_flat[at : at + size])]
            self._count, self._next = 1, 0
            self._drained = receiver.capacity > 1
            self._sparse = True
            return
        lengths = receiver.lengths[:count].tolist()
        if self.family == socket.AF_INET:
            skip = [(b & 0x0F) * 4 for b in receiver.slots[:count, IPV4_IHL_OFFSET].tolist()]
            self._len = [max(n - s, 0) for n, s in zip(lengths, skip)]
        else:
            skip = [0] * count
            self._len = lengths
        if receiver.any_truncated(count):  # longer than a slot: handed on empty (the codec counts it truncated)
            self._len = [0 if t else n for n, t in zip(self._len, receiver.truncated(count))]
        names = receiver.names[:count, at : at + size].tobytes()
        self._src = [names[i : i + size] for i in range(0, count * size, size)]
        self._skip = skip
        self._count, self._next = count, 0
        self._drained = count < receiver.capacity

    def recv_gro_from(self, buf: memoryview) -> tuple[int, str, int, int]:
        """``recv_gro_into`` with a port of 0: raw IP has none (the link protocol's ``recv_gro_from``)."""
        n, source, size = self.recv_gro_into(buf)
        return n, source, 0, size

    def recv_gro_into(self, buf: memoryview) -> tuple[int, str, int]:
        """The next run of packets from one source (the engine decides whom it knows): ``(bytes, source, packet
        size)`` with the packets back to
        back in ``buf``, all ``size`` bytes but the last, which may be shorter; size 0 for a single packet.
        Raises BlockingIOError when nothing is waiting."""
        if self._next >= self._count:
            if self._drained:
                # The last recvmmsg found fewer packets than it had room for: the queue was empty then, so
                # another call now would almost surely fail. Report "nothing" without the system call; the
                # loop's level-triggered poll wakes us again for anything that arrived since.
                self._drained = False
                raise BlockingIOError
            if self._sparse:
                # The last recvmmsg brought a lone packet: traffic is sparse (pings, ACKs, a quiet session), where
                # the plain recvmsg costs less than the ctypes call (measured: ~0.06 ms less RTT at 100 pings/s).
                # A second packet within one wake-up means a burst: back to recvmmsg.
                try:
                    n, source = self.recv_into(buf)
                except BlockingIOError:
                    self._plain_reads = 0
                    raise
                self._plain_reads += 1
                if self._plain_reads > 1:
                    self._sparse = False
                    self._plain_reads = 0
                return n, source, 0
            self._refill()
        i = self._next
        lens, skip, src = self._len, self._skip, self._src
        source = src[i]
        row, off = lens[i], skip[i]
        room = len(buf) // row if row else 1
        j = i + 1
        count = self._count
        while j < count and j - i < room and src[j] == source and lens[j] == row and skip[j] == off:
            j += 1
        k = j - i
        if k == 1:  # a single packet (a ping, an ACK): a memoryview copy, no NumPy call
            at = i * self._slot_size + off
            buf[:row] = self._slots_flat[at : at + row]
        else:
            out = np.frombuffer(buf, np.uint8)
            out[: k * row].reshape(k, row)[:] = self._receiver.slots[i:j, off : off + row]
        n = k * row
        if j < count and src[j] == source and 0 < lens[j] < row and n + lens[j] <= len(buf):
            tail = lens[j]  # a shorter last packet ends the run, as in a UDP_GRO read
            at = j * self._slot_size + skip[j]
            buf[n : n + tail] = self._slots_flat[at : at + tail]
            n += tail
            j += 1
        self._next = j
        return n, self._source(source), (row if j - i > 1 else 0)

    @property
    def buffered(self) -> bool:
        """Whether packets taken from the kernel wait to be handed out (the socket's poll cannot tell)."""
        return self._next < self._count

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv_from(self, buf: memoryview) -> tuple[int, str, int]:
        """One packet's payload: (length, source, 0): raw IP has no ports (the link protocol's ``recv_from``)."""
        return self.recv_one(buf)

    def recv_into(self, buf: memoryview) -> tuple[int, str]:
        """One packet's payload into ``buf``: (length, source). Raises BlockingIOError when there is none."""
        n, source, _ = self.recv_one(buf)
        return n, source

    def _recv_ipv4(self, buf: memoryview) -> tuple[int, str, int]:
        """One packet's payload into ``buf``: (length, source, 0), as ``recv_gro_into`` answers for a single
        packet. Raises BlockingIOError when there is none."""
        scatter = self._scatter
        scatter[1] = buf
        n, ancdata, _, addr = self._sock.recvmsg_into(scatter, OVFL_SPACE)
        if ancdata:  # only once the socket has dropped something
            self._drops.note(ancdata)
        header_len = (self._outer[IPV4_IHL_OFFSET] & 0x0F) * 4
        n -= IPV4_HEADER_LEN
        if header_len > IPV4_HEADER_LEN:
            # IPv4 options spilled into buf: move the payload down over them (memoryview copies overlap safely).
            options = header_len - IPV4_HEADER_LEN
            n = max(0, n - options)
            buf[:n] = buf[options : options + n]
        return max(0, n), addr[0], 0

    def _recv_ipv6(self, buf: memoryview) -> tuple[int, str, int]:
        n, ancdata, _, addr = self._sock.recvmsg_into((buf,), OVFL_SPACE)
        if ancdata:
            self._drops.note(ancdata)
        return n, addr[0], 0

    @property
    def kernel_drops(self) -> int:
        """Packets the kernel dropped before we could read them (receive buffer full), as far as reads told."""
        return self._drops.total

    def size_receive_buffer(self, size: int) -> None:
        """The socket's receive buffer (see UdpLink.size_receive_buffer)."""
        _grow_buffer(self._sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, size)

    def path_mtu(self, address: str) -> int:
        """The path MTU the kernel holds towards ``address`` (io/udp.py ``PathProbe``)."""
        return self._probe.path_mtu(address)

    def send(self, packet: memoryview, flow: int, dest: tuple[str, int] | None = None) -> None:
        """Send one packet to ``dest`` (None: ``peer``). ``flow`` is unused (``spreads_flows``): raw IP has no
        ports."""
        self._sock.sendto(packet, dest or self._peer)

    def close(self) -> None:
        self._sock.close()
        self._probe.close()

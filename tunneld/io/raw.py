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
The engine's interface therefore stays that of the UDP link: ``recv_into(buf) -> (n, source)`` with the
encapsulated packet in ``buf[:n]``.

Like the UDP link the socket is never connected: the peer can change at run time, and the engine sees (and
counts) packets from strangers. Sends set "don't fragment": an encapsulated packet that does not fit the path
fails with EMSGSIZE and is counted as too big.
"""

from __future__ import annotations

import errno
import socket

from tunneld.io import LinkError, same_family_peer, underlay_family
from tunneld.io.udp import (
    IP_MTU_DISCOVER,
    IP_PMTUDISC_DO,
    IPV6_MTU_DISCOVER,
    IPV6_PMTUDISC_DO,
    SO_RCVBUFFORCE,
    SO_SNDBUFFORCE,
    SOCKET_BUFFER,
    _grow_buffer,
)

IPV4_HEADER_LEN = 20  # without options
IPV4_IHL_OFFSET = 0  # low nibble of the first byte, in 32-bit words


class RawLink:
    """Sends to and receives from one peer over raw IP with protocol ``protocol``. ``peer`` may change."""

    def __init__(self, peer: str, protocol: int, local: str | None = None) -> None:
        self.family, self.peer = underlay_family(peer, local)
        self.protocol = protocol
        self.local = local
        self._peer: tuple[str, int] = (self.peer, 0)
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
            if self.family == socket.AF_INET6:
                self._sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
            else:
                self._sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
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
        self.recv_into = self._recv_ipv4 if self.family == socket.AF_INET else self._recv_ipv6

    def set_peer(self, peer: str) -> None:
        self.peer = same_family_peer(peer, self.family)
        self._peer = (self.peer, 0)

    def fileno(self) -> int:
        return self._sock.fileno()

    def _recv_ipv4(self, buf: memoryview) -> tuple[int, str]:
        """One packet's payload into ``buf``: (length, source). Raises BlockingIOError when there is none."""
        scatter = self._scatter
        scatter[1] = buf
        n, _, _, addr = self._sock.recvmsg_into(scatter)
        header_len = (self._outer[IPV4_IHL_OFFSET] & 0x0F) * 4
        n -= IPV4_HEADER_LEN
        if header_len > IPV4_HEADER_LEN:
            # IPv4 options spilled into buf: move the payload down over them (memoryview copies overlap safely).
            options = header_len - IPV4_HEADER_LEN
            n = max(0, n - options)
            buf[:n] = buf[options : options + n]
        return max(0, n), addr[0]

    def _recv_ipv6(self, buf: memoryview) -> tuple[int, str]:
        n, addr = self._sock.recvfrom_into(buf)
        return n, addr[0]

    def send(self, packet: memoryview, flow: int) -> None:
        """Send one packet to the peer. ``flow`` is unused: raw IP has no ports to spread flows over."""
        self._sock.sendto(packet, self._peer)

    def close(self) -> None:
        self._sock.close()

"""The contract every encapsulator (built-in or plugin) fulfils.

An encapsulator is a sans-IO codec: it sees bytes, never sockets, clocks or loggers.

Outbound, the engine reads an inner frame into ``buf[start:end]`` with at least ``header_room`` bytes of
headroom in front of it; ``encap`` writes the encapsulation header in place, directly in front of the frame,
and returns the new start. The payload is never copied.

Inbound, ``decap`` looks at one datagram as the transport delivered it (for UDP: the UDP payload; for raw IP:
whatever the link layer hands up after stripping the outer IP header) and returns either the offset at which
the inner frame starts, or a ``Drop`` naming why the datagram must be discarded. It never raises on input.

The fast path (kernel offloads) is declared, never guessed:
- ``constant_header(ip_version)`` is the header ``encap`` lays in front of EVERY frame of that inner IP version
  (TAP codecs: of every frame), whatever its contents and length; or None when there is none (a checksum, a
  sequence number, a length in the header). With a constant header the engine may cut a super-frame into
  packets that all carry it, and expect it in front of rows the kernel coalesced; without one, packets move
  one by one. The conformance kit (tunneld.testing) checks the declaration against ``encap``.
- ``decap_batch(packets, size)`` is the verdict on datagrams laid back to back (each ``size`` bytes, the
  last maybe shorter), as a UDP_GRO read or a run out of recvmmsg delivers them: one verdict per datagram, in
  order. The default asks ``decap`` for each; a codec may answer faster but never differently. The engine
  asks it for every row it received, coalesced or not, so a codec's refusal always holds.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping


class DeviceKind(enum.Enum):
    """Which kind of kernel device feeds the encapsulator: layer-3 packets (TUN) or Ethernet frames (TAP)."""

    TUN = "tun"
    TAP = "tap"


@dataclass(frozen=True)
class Transport:
    """How the encapsulated packets travel: over UDP to a port, or directly over IP with a protocol number."""

    kind: str  # "udp" or "ip"
    number: int  # default UDP port, or IP protocol number

    def __str__(self) -> str:
        return f"udp/{self.number}" if self.kind == "udp" else f"ip proto {self.number}"


class Drop(str, enum.Enum):
    """Why a packet was discarded. The value is the ``reason`` label exported in metrics."""

    # inbound, from the underlay
    UNKNOWN_PEER = "unknown_peer"  # datagram from an address that is not the configured peer
    TRUNCATED = "truncated"  # shorter than the encapsulation header
    BAD_FLAGS = "bad_flags"  # a required flag missing, or an unknown flag set
    RESERVED_BITS = "reserved_bits"  # reserved fields not zero
    VNI_MISMATCH = "vni_mismatch"  # another VXLAN network
    RUNT_FRAME = "runt_frame"  # the inner frame is too short to be a frame at all
    DEVICE_WRITE_ERROR = "device_write_error"  # the kernel refused the inner frame
    # outbound, from the device
    DEVICE_READ_ERROR = "device_read_error"  # reading the device failed (not merely "nothing to read")
    TOO_BIG = "too_big"  # the encapsulated packet would not fit the underlay MTU; VTEPs don't fragment
    SOCKET_ERROR = "socket_error"  # the underlay socket refused the datagram (unreachable, no buffer, ...)
    OFFLOAD_UNSUPPORTED = "offload_unsupported"  # a super-frame or partial checksum we cannot complete
    # GRE (RFC 2784, RFC 2890); some apply to any codec that validates the same things
    BAD_VERSION = "bad_version"  # the encapsulation's version field is not one we speak (GRE: not 0)
    BAD_PROTOCOL = "bad_protocol"  # protocol type not carried by this mode, or the inner packet is not of it
    KEY_MISMATCH = "key_mismatch"  # GRE key absent, unexpected, or another tunnel's
    BAD_CHECKSUM = "bad_checksum"  # the encapsulation's checksum does not verify
    SEQUENCE = "sequence"  # an old or duplicate sequence number (RFC 2890 in-order delivery)
    LENGTH_MISMATCH = "length_mismatch"  # the inner IP header's length disagrees with the bytes carried


# IPv4 and IPv6 header sizes without options, for MTU arithmetic.
IPV4_HEADER_LEN = 20
IPV6_HEADER_LEN = 40
UDP_HEADER_LEN = 8
ETHERNET_HEADER_LEN = 14


def rows_agree(packets: memoryview, size: int, at: int, expect: bytes, rows: int) -> bool:
    """Whether the first ``rows`` datagrams of ``packets`` (``size`` bytes each) all hold ``expect`` at offset
    ``at``. Byte j of every row is the strided slice ``packets[at + j :: size]``: one C-level comparison per
    byte of ``expect``, none per row; what ``decap_batch`` overrides use to judge a whole batch at once."""
    stop = rows * size
    for j in range(len(expect)):  # a loop, not all(genexpr): no generator frame per byte
        if packets[at + j : stop : size] != expect[j : j + 1] * rows:
            return False
    return True


class Encapsulator(abc.ABC):
    """Base class of every mode. Subclasses set the class attributes and implement ``encap``/``decap``."""

    name: ClassVar[str]  # the --mode value
    description: ClassVar[str]  # one line, shown by --list-modes
    device: ClassVar[DeviceKind]
    transport: ClassVar[Transport]
    header_room: ClassVar[int]  # the most bytes ``encap`` may write in front of a frame
    # Options this mode reads from ``TunnelConfig.extra`` (``--opt NAME=VALUE``; GRE's --key/--seq/--csum land
    # there too), each with a one-line help shown by --list-modes. Values arrive as given: strings from --opt,
    # typed values from the built-in flags; ``from_options`` parses and checks them. The daemon refuses an option
    # that the chosen mode does not declare, so a typo is an error rather than silently ignored.
    options: ClassVar[Mapping[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A declaration holds for the code it was written with. A subclass that rewrites ``encap`` (or
        # ``decap``) but not the declaration beside it (``constant_header``, ``decap_batch``) gets the safe
        # defaults back: no fast path, and a verdict that asks its own ``decap`` for every datagram. (A VXLAN
        # plugin refusing some frames must not be overruled by VXLAN's vectorised verdict.)
        super().__init_subclass__(**kwargs)
        if "encap" in cls.__dict__ and "constant_header" not in cls.__dict__:
            cls.constant_header = Encapsulator.constant_header  # type: ignore[method-assign]
        if "decap" in cls.__dict__ and "decap_batch" not in cls.__dict__:
            cls.decap_batch = Encapsulator.decap_batch  # type: ignore[method-assign]

    @classmethod
    @abc.abstractmethod
    def from_options(cls, options: Mapping[str, Any]) -> "Encapsulator":
        """Build the codec from the tunnel's options; raise ValueError (one line for the operator) when invalid.

        ``options`` holds the core settings (``vni``, ``port``) and every entry of ``TunnelConfig.extra``.
        """

    def describe(self) -> str:
        """This instance's settings for the start-up log line, e.g. ``key 42, seq``; empty when none."""
        return ""

    def peer_changed(self) -> None:
        """The peer was changed while running (reload): forget what was learnt from the old one.

        Stateless codecs have nothing to forget; GRE forgets the peer's last sequence number."""

    @property
    @abc.abstractmethod
    def header_len(self) -> int:
        """Bytes this instance adds in front of each inner frame (may depend on its options)."""

    def outer_overhead(self, underlay_ipv6: bool) -> int:
        """Bytes the underlay adds around a whole inner frame: outer IP, transport and this header."""
        ip = IPV6_HEADER_LEN if underlay_ipv6 else IPV4_HEADER_LEN
        transport = UDP_HEADER_LEN if self.transport.kind == "udp" else 0
        return ip + transport + self.header_len

    def overhead(self, underlay_ipv6: bool) -> int:
        """Bytes between the underlay MTU and the MTU the device can be given (``ip link``'s view).

        A TAP device's MTU excludes its Ethernet header, which the tunnel carries too (VXLAN: 50 over IPv4).
        """
        link = ETHERNET_HEADER_LEN if self.device is DeviceKind.TAP else 0
        return self.outer_overhead(underlay_ipv6) + link

    @abc.abstractmethod
    def encap(self, buf: bytearray, start: int, end: int) -> int | Drop:
        """Write the header in front of ``buf[start:end]``; return the start of the encapsulated packet.

        A codec that cannot carry a frame (GRE: a TUN packet that is neither IPv4 nor IPv6) returns a ``Drop``.
        """

    @abc.abstractmethod
    def decap(self, packet: memoryview) -> int | Drop:
        """Validate one received packet; return the offset of the inner frame, or why it is dropped."""

    def constant_header(self, ip_version: int) -> bytes | None:
        """The header ``encap`` lays in front of every frame of inner IP version ``ip_version`` (4 or 6; a TAP
        codec answers the same for both), or None: no fast path, packets move one by one. A codec that states
        one must keep to it for every frame: offloaded packets are built from this declaration, not by
        ``encap``."""
        return None

    def decap_batch(self, packets: memoryview, size: int) -> list[int | Drop]:
        """``decap``'s verdict on each datagram of ``packets`` (``size`` bytes each, the last maybe shorter)."""
        decap = self.decap
        return [decap(packets[i : i + size]) for i in range(0, len(packets), size)]


def constant_headers(codec: Encapsulator) -> tuple[bytes, bytes] | None:
    """The headers ``codec`` declares in front of every IPv4 and every IPv6 frame, when it declares both and
    they are ``header_len`` bytes long (the offload path lays one before every row and expects it there);
    None: the codec moves packets one by one."""
    h4, h6 = codec.constant_header(4), codec.constant_header(6)
    if h4 is None or h6 is None or not len(h4) == len(h6) == codec.header_len:
        return None
    return bytes(h4), bytes(h6)

"""VXLAN (RFC 7348): Ethernet frames in UDP.

Wire format, the 8 bytes after the UDP header::

    0                   1                   2                   3
    |R|R|R|R|I|R|R|R|            Reserved                           |
    |                VXLAN Network Identifier (VNI) |   Reserved    |

Rules this codec keeps (RFC 7348 §5, and what the Linux driver enforces):
- outbound: flags 0x08 (I bit only), every reserved bit zero, the configured VNI;
- inbound: the I bit must be set and every other flag and reserved field zero (Linux drops packets with
  unknown bits set, so do we), the VNI must be ours, and an inner Ethernet header must follow.

Because the header depends only on the VNI, it is built once; ``encap`` copies 8 bytes into the headroom,
and it is the constant header of the offload path (``constant_header``). A batch of datagrams is judged at
once (``decap_batch``): a datagram is valid exactly when its first 8 bytes are that header and an Ethernet
header follows, so 8 strided comparisons decide a whole UDP_GRO read; any other batch is judged one by one.
"""

from __future__ import annotations

import struct
from typing import ClassVar, Mapping

from tunneld.encap.base import ETHERNET_HEADER_LEN, DeviceKind, Drop, Encapsulator, Option, Transport, declare, rows_agree

IANA_PORT = 4789
HEADER_LEN = 8

FLAGS_OFFSET = 0
RESERVED1_OFFSET = 1  # 3 bytes
VNI_OFFSET = 4  # 3 bytes
RESERVED2_OFFSET = 7  # 1 byte

FLAG_I = 0x08  # "VNI present"; the only flag VXLAN defines
VNI_MAX = (1 << 24) - 1

# The whole header as one 64-bit word: flags byte, 24 reserved bits, 24-bit VNI, 8 reserved bits.
_WORD = struct.Struct("!Q")
_FLAGS_SHIFT = 56
_VNI_SHIFT = 8
_VNI_MASK = VNI_MAX << _VNI_SHIFT
_EVERYTHING_BUT_VNI = ((1 << 64) - 1) ^ _VNI_MASK


def build_header(vni: int) -> bytes:
    """The 8-byte VXLAN header for ``vni``."""
    if not 0 <= vni <= VNI_MAX:
        raise ValueError(f"VNI must be between 0 and {VNI_MAX}, got {vni}")
    return _WORD.pack(FLAG_I << _FLAGS_SHIFT | vni << _VNI_SHIFT)


class Vxlan(Encapsulator):
    name: ClassVar[str] = "vxlan"
    description: ClassVar[str] = "Ethernet frames (TAP) in VXLAN over UDP, RFC 7348 (Linux 'type vxlan')"
    device: ClassVar[DeviceKind] = DeviceKind.TAP
    transport: ClassVar[Transport] = Transport("udp", IANA_PORT)
    header_room: ClassVar[int] = HEADER_LEN
    options: ClassVar[Mapping[str, Option]] = declare(
        Option("vni", int, "VXLAN network identifier; both ends must agree", default=1, low=0, high=VNI_MAX,
               label="VNI"),
    )

    def __init__(self, vni: int = 1) -> None:
        self.vni = vni
        self._header = build_header(vni)
        # What a valid header looks like with the VNI masked out, and the VNI bits we expect.
        self._expect_word = FLAG_I << _FLAGS_SHIFT
        self._expect_vni = vni << _VNI_SHIFT

    def describe(self) -> str:
        return f"vni {self.vni}"

    @property
    def header_len(self) -> int:
        return HEADER_LEN

    def encap(self, buf: bytearray, start: int, end: int) -> int:
        start -= HEADER_LEN
        buf[start : start + HEADER_LEN] = self._header
        return start

    def constant_header(self, ip_version: int) -> bytes:
        return self._header

    def decap_batch(self, packets: memoryview, size: int) -> list[int | Drop]:
        n = len(packets)
        count = -(-n // size) if size else 0
        shortest = HEADER_LEN + ETHERNET_HEADER_LEN
        if count > 1 and n - (count - 1) * size >= shortest and size >= shortest \
                and rows_agree(packets, size, 0, self._header, count):
            return [HEADER_LEN] * count
        return super().decap_batch(packets, size)

    def decap(self, packet: memoryview) -> int | Drop:
        if len(packet) < HEADER_LEN:
            return Drop.TRUNCATED
        (word,) = _WORD.unpack_from(packet)
        rest = word & _EVERYTHING_BUT_VNI
        if rest != self._expect_word:
            if not (word >> _FLAGS_SHIFT) & FLAG_I or (word >> _FLAGS_SHIFT) & ~FLAG_I:
                return Drop.BAD_FLAGS
            return Drop.RESERVED_BITS
        if word & _VNI_MASK != self._expect_vni:
            return Drop.VNI_MISMATCH
        if len(packet) < HEADER_LEN + ETHERNET_HEADER_LEN:
            return Drop.RUNT_FRAME
        return HEADER_LEN

"""IP in UDP: a TUN packet behind a 4-byte header, magic "IU" then a 16-bit session number.

    0                   1                   2                   3
    |      'I'      |      'U'      |        Session Number         |

The session (``--session N``, ``--opt session=N`` or ``session = N`` in a config file; default 0) must match at
both ends; anything else is dropped. It is declared once, as an ``Option``: tunneld derives the flag, the
config key and the --list-modes line from it, checks the value, and the inherited ``from_options`` passes it
to the constructor.
"""

from __future__ import annotations

import struct
from typing import ClassVar, Mapping

from tunneld.encap.base import DeviceKind, Drop, Encapsulator, Option, Transport, declare

MAGIC = b"IU"
MAGIC_OFFSET = 0
SESSION_OFFSET = 2
HEADER_LEN = 4
MIN_IP_HEADER = 20  # an IPv4 header without options; IPv6's is longer
_HEADER = struct.Struct("!2sH")


class IpUdp(Encapsulator):
    name: ClassVar[str] = "ipudp"
    description: ClassVar[str] = "IP packets (TUN) in UDP behind a 4-byte session header (third-party example)"
    device: ClassVar[DeviceKind] = DeviceKind.TUN
    transport: ClassVar[Transport] = Transport("udp", 4790)
    header_room: ClassVar[int] = HEADER_LEN
    options: ClassVar[Mapping[str, Option]] = declare(
        Option("session", int, "session number, must match at both ends", default=0, low=0, high=0xFFFF),
    )

    def __init__(self, session: int = 0) -> None:
        if not 0 <= session <= 0xFFFF:
            raise ValueError(f"session must be between 0 and 65535, got {session}")
        self.session = session
        self._header = _HEADER.pack(MAGIC, session)

    @property
    def header_len(self) -> int:
        return HEADER_LEN

    def describe(self) -> str:
        return f"session {self.session}"

    def encap(self, buf: bytearray, start: int, end: int) -> int:
        start -= HEADER_LEN
        buf[start : start + HEADER_LEN] = self._header
        return start

    def constant_header(self, ip_version: int) -> bytes:
        return self._header  # the same 4 bytes before every packet: the engine may offload

    def decap(self, packet: memoryview) -> int | Drop:
        if len(packet) < HEADER_LEN:
            return Drop.TRUNCATED
        if packet[MAGIC_OFFSET : MAGIC_OFFSET + 2] != MAGIC:
            return Drop.BAD_FLAGS
        if packet[SESSION_OFFSET : SESSION_OFFSET + 2] != self._header[SESSION_OFFSET:]:
            return Drop.KEY_MISMATCH
        if len(packet) < HEADER_LEN + MIN_IP_HEADER:
            return Drop.RUNT_FRAME
        return HEADER_LEN

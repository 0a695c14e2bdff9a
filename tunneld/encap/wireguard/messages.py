"""WireGuard's four messages on the wire: types, lengths and every field's offset, as the whitepaper (section 5.4) and
wireguard-go's ``device/noise-protocol.go`` lay them out. All integers are little-endian.

  handshake initiation (148 bytes)       handshake response (92 bytes)
    0  type = 1, reserved zero (3)         0  type = 2, reserved zero (3)
    4  sender index                         4  sender index
    8  unencrypted ephemeral (32)           8  receiver index
   40  encrypted static (32 + 16)          12  unencrypted ephemeral (32)
   88  encrypted timestamp (12 + 16)       44  encrypted nothing (0 + 16)
  116  mac1 (16)                           60  mac1 (16)
  132  mac2 (16)                           76  mac2 (16)

  cookie reply (64 bytes)                transport data (16 + n + 16 bytes)
    0  type = 3, reserved zero (3)         0  type = 4, reserved zero (3)
    4  receiver index                       4  receiver index
    8  nonce (24)                          8  counter (64 bits)
   32  encrypted cookie (16 + 16)          16  encrypted packet, padded to 16, + tag (16)

The first four bytes are read as one little-endian word, as wireguard-go reads them: a message whose reserved bytes
are not zero is not of any type (so it is dropped as a bad type).

What must stay true: this module only names and packs; it authenticates nothing. A length check here is the first
thing done to any datagram, before any table lookup or crypto.
"""

from __future__ import annotations

import struct

from tunneld.encap.wireguard.primitives import AEAD_TAG_LEN, KEY_LEN, MAC_LEN, TIMESTAMP_LEN, XAEAD_NONCE_LEN

MESSAGE_INITIATION_TYPE = 1
MESSAGE_RESPONSE_TYPE = 2
MESSAGE_COOKIE_REPLY_TYPE = 3
MESSAGE_TRANSPORT_TYPE = 4

TYPE_OFFSET = 0  # the type byte and three reserved zero bytes, read as one little-endian 32-bit word
HEADER = struct.Struct("<I")

# handshake initiation
INITIATION_SENDER_OFFSET = 4
INITIATION_EPHEMERAL_OFFSET = 8
INITIATION_STATIC_OFFSET = INITIATION_EPHEMERAL_OFFSET + KEY_LEN  # 40
INITIATION_STATIC_LEN = KEY_LEN + AEAD_TAG_LEN  # 48
INITIATION_TIMESTAMP_OFFSET = INITIATION_STATIC_OFFSET + INITIATION_STATIC_LEN  # 88
INITIATION_TIMESTAMP_LEN = TIMESTAMP_LEN + AEAD_TAG_LEN  # 28
INITIATION_MAC1_OFFSET = INITIATION_TIMESTAMP_OFFSET + INITIATION_TIMESTAMP_LEN  # 116
INITIATION_MAC2_OFFSET = INITIATION_MAC1_OFFSET + MAC_LEN  # 132
MESSAGE_INITIATION_SIZE = INITIATION_MAC2_OFFSET + MAC_LEN  # 148

# handshake response
RESPONSE_SENDER_OFFSET = 4
RESPONSE_RECEIVER_OFFSET = 8
RESPONSE_EPHEMERAL_OFFSET = 12
RESPONSE_EMPTY_OFFSET = RESPONSE_EPHEMERAL_OFFSET + KEY_LEN  # 44
RESPONSE_EMPTY_LEN = AEAD_TAG_LEN  # 16
RESPONSE_MAC1_OFFSET = RESPONSE_EMPTY_OFFSET + RESPONSE_EMPTY_LEN  # 60
RESPONSE_MAC2_OFFSET = RESPONSE_MAC1_OFFSET + MAC_LEN  # 76
MESSAGE_RESPONSE_SIZE = RESPONSE_MAC2_OFFSET + MAC_LEN  # 92

# cookie reply
COOKIE_RECEIVER_OFFSET = 4
COOKIE_NONCE_OFFSET = 8
COOKIE_COOKIE_OFFSET = COOKIE_NONCE_OFFSET + XAEAD_NONCE_LEN  # 32
COOKIE_COOKIE_LEN = MAC_LEN + AEAD_TAG_LEN  # 32
MESSAGE_COOKIE_REPLY_SIZE = COOKIE_COOKIE_OFFSET + COOKIE_COOKIE_LEN  # 64

# transport data
TRANSPORT_RECEIVER_OFFSET = 4
TRANSPORT_COUNTER_OFFSET = 8
TRANSPORT_CONTENT_OFFSET = 16
MESSAGE_TRANSPORT_HEADER_SIZE = TRANSPORT_CONTENT_OFFSET  # 16
MESSAGE_TRANSPORT_MIN_SIZE = MESSAGE_TRANSPORT_HEADER_SIZE + AEAD_TAG_LEN  # 32: a keepalive
PADDING_MULTIPLE = 16  # plaintexts are padded with zeros to a multiple of this (bounded by the MTU)

TRANSPORT_HEADER = struct.Struct("<IIQ")  # type word, receiver index, counter
INDEX = struct.Struct("<I")

# The exact size of each handshake message, by type; transport data is at least MESSAGE_TRANSPORT_MIN_SIZE.
HANDSHAKE_SIZES = {
    MESSAGE_INITIATION_TYPE: MESSAGE_INITIATION_SIZE,
    MESSAGE_RESPONSE_TYPE: MESSAGE_RESPONSE_SIZE,
    MESSAGE_COOKIE_REPLY_TYPE: MESSAGE_COOKIE_REPLY_SIZE,
}
# Where mac1 and mac2 sit in the two messages that carry them.
MAC1_OFFSET = {MESSAGE_INITIATION_TYPE: INITIATION_MAC1_OFFSET, MESSAGE_RESPONSE_TYPE: RESPONSE_MAC1_OFFSET}
MAC2_OFFSET = {MESSAGE_INITIATION_TYPE: INITIATION_MAC2_OFFSET, MESSAGE_RESPONSE_TYPE: RESPONSE_MAC2_OFFSET}


def message_type(datagram: bytes | memoryview) -> int:
    """The message type word, or 0 when the datagram is shorter than it (0 is no message type)."""
    if len(datagram) < HEADER.size:
        return 0
    return HEADER.unpack_from(datagram, TYPE_OFFSET)[0]


def padded_length(length: int, mtu: int | None = None) -> int:
    """The plaintext length after padding ``length`` bytes to PADDING_MULTIPLE, never past ``mtu`` (as
    wireguard-go's ``calculatePaddingSize``); a keepalive (0) stays 0."""
    padded = -(-length // PADDING_MULTIPLE) * PADDING_MULTIPLE
    if mtu is not None and padded > mtu:
        padded = max(mtu, length)
    return padded

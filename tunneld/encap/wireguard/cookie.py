"""mac1, mac2 and cookie replies (whitepaper 5.3 and 5.4.4; wireguard-go ``device/cookie.go``).

Two sides:
- ``CookieChecker`` is the device's, for messages sent TO us: mac1 = MAC(HASH(LABEL_MAC1 || our public key),
  msg up to mac1) is checked on every handshake message; under load mac2 = MAC(cookie, msg up to mac2) must also
  verify, where cookie = MAC(R, source address) and R is a random secret replaced every COOKIE_SECRET_MAX_AGE;
  without it the sender gets a cookie reply: XAEAD(HASH(LABEL_COOKIE || our public key), nonce, cookie,
  the mac1 it sent).
- ``CookieGenerator`` is a peer's, for messages we send TO that peer: it writes mac1 (keyed by the peer's
  public key) and, for COOKIE_REFRESH_TIME after the peer sent us a cookie, mac2; it opens that peer's cookie
  replies, which must authenticate against the last mac1 we sent.

What must stay true: every comparison of a MAC is constant-time (hmac.compare_digest); the secret R and the
cookies never leave these objects (their ``repr`` hides them); time is passed in.
"""

from __future__ import annotations

import hmac
import socket

from tunneld.encap.wireguard.constants import COOKIE_REFRESH_TIME, COOKIE_SECRET_MAX_AGE
from tunneld.encap.wireguard.messages import (
    COOKIE_COOKIE_LEN,
    COOKIE_COOKIE_OFFSET,
    COOKIE_NONCE_OFFSET,
    COOKIE_RECEIVER_OFFSET,
    INDEX,
    MAC1_OFFSET,
    MAC2_OFFSET,
    MESSAGE_COOKIE_REPLY_SIZE,
    MESSAGE_COOKIE_REPLY_TYPE,
)
from tunneld.encap.wireguard.primitives import (
    HASH,
    KEY_LEN,
    LABEL_COOKIE,
    LABEL_MAC1,
    MAC,
    MAC_LEN,
    XAEAD,
    XAEAD_NONCE_LEN,
    XAEAD_OPEN,
    CryptoError,
)


def address_bytes(address) -> bytes:
    """The source address a cookie is bound to: the IP's bytes and the port (big-endian). Only its maker reads
    it, so the encoding is ours."""
    host, port = address[0], address[1]
    # inet_pton, not ipaddress.ip_address: under a handshake flood this runs for every initiation, and in a
    # profile of the engine answering one the ipaddress parser was a third of the time (two calls a datagram);
    # inet_pton costs a sixth of one
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            packed = socket.inet_pton(family, host)
            break
        except (OSError, TypeError, ValueError):
            continue
    else:  # not a numeric address (a scoped one, a caller's own naming): still one cookie per source, never a raise
        packed = str(host).encode("utf-8", "replace")
    return packed + (int(port) & 0xFFFF).to_bytes(2, "big")


class CookieChecker:
    __slots__ = ("_mac1_key", "_cookie_key", "_secret", "_secret_set", "_random", "_last")

    def __init__(self, public_key: bytes | None, random) -> None:
        self._random = random
        self._secret = b""
        self._secret_set: float | None = None
        # The cookie made last, as (the secret it was made with, source, cookie): check_mac2 then create_reply
        # make the same one for every datagram a flood sends from one source. Replaced, never grown.
        self._last: tuple = (None, None, b"")
        self.set_public_key(public_key)

    def set_public_key(self, public_key: bytes | None) -> None:
        if public_key is None:
            self._mac1_key = self._cookie_key = None
        else:
            self._mac1_key = HASH(LABEL_MAC1 + public_key)
            self._cookie_key = HASH(LABEL_COOKIE + public_key)

    def check_mac1(self, msg: bytes | memoryview, message_type: int) -> bool:
        if self._mac1_key is None:  # no private key yet: nothing can be for us
            return False
        offset = MAC1_OFFSET[message_type]
        expected = MAC(self._mac1_key, msg[:offset])
        return hmac.compare_digest(expected, bytes(msg[offset:offset + MAC_LEN]))

    def check_mac2(self, msg: bytes | memoryview, message_type: int, source, now: float) -> bool:
        if self._secret_set is None or now - self._secret_set > COOKIE_SECRET_MAX_AGE:
            return False  # the secret any cookie was made with is gone
        cookie = self._cookie(source)
        offset = MAC2_OFFSET[message_type]
        expected = MAC(cookie, msg[:offset])
        return hmac.compare_digest(expected, bytes(msg[offset:offset + MAC_LEN]))

    def _cookie(self, source) -> bytes:
        """MAC(R, source address): the cookie a source gets, under the current secret."""
        secret, seen, cookie = self._last
        if secret is not self._secret or seen != source:
            cookie = MAC(self._secret, address_bytes(source))
            self._last = (self._secret, source, cookie)
        return cookie

    def create_reply(self, msg: bytes | memoryview, message_type: int, sender_index: int, source,
                     now: float) -> bytes:
        """A cookie reply to ``msg`` (whose mac1 has verified), addressed to its sender's index."""
        if self._secret_set is None or now - self._secret_set > COOKIE_SECRET_MAX_AGE:
            self._secret = self._random(KEY_LEN)
            self._secret_set = now
        cookie = self._cookie(source)
        mac1_offset = MAC1_OFFSET[message_type]
        mac1 = bytes(msg[mac1_offset:mac1_offset + MAC_LEN])
        nonce = self._random(XAEAD_NONCE_LEN)
        reply = bytearray(MESSAGE_COOKIE_REPLY_SIZE)
        INDEX.pack_into(reply, 0, MESSAGE_COOKIE_REPLY_TYPE)
        INDEX.pack_into(reply, COOKIE_RECEIVER_OFFSET, sender_index)
        reply[COOKIE_NONCE_OFFSET:COOKIE_NONCE_OFFSET + XAEAD_NONCE_LEN] = nonce
        reply[COOKIE_COOKIE_OFFSET:COOKIE_COOKIE_OFFSET + COOKIE_COOKIE_LEN] = XAEAD(self._cookie_key, nonce, cookie,
                                                                                     mac1)
        return bytes(reply)

    def __repr__(self) -> str:
        return "<CookieChecker hidden>"


class CookieGenerator:
    __slots__ = ("_mac1_key", "_cookie_key", "_cookie", "_cookie_set", "_last_mac1")

    def __init__(self, peer_public_key: bytes) -> None:
        self._mac1_key = HASH(LABEL_MAC1 + peer_public_key)
        self._cookie_key = HASH(LABEL_COOKIE + peer_public_key)
        self._cookie = b""
        self._cookie_set: float | None = None
        self._last_mac1: bytes | None = None

    def add_macs(self, msg: bytearray, message_type: int, now: float) -> None:
        mac1_offset = MAC1_OFFSET[message_type]
        mac2_offset = MAC2_OFFSET[message_type]
        mac1 = MAC(self._mac1_key, bytes(msg[:mac1_offset]))
        msg[mac1_offset:mac1_offset + MAC_LEN] = mac1
        self._last_mac1 = mac1
        if self._cookie_set is not None and now - self._cookie_set <= COOKIE_REFRESH_TIME:
            msg[mac2_offset:mac2_offset + MAC_LEN] = MAC(self._cookie, bytes(msg[:mac2_offset]))
        else:
            msg[mac2_offset:mac2_offset + MAC_LEN] = bytes(MAC_LEN)

    def consume_reply(self, reply: bytes | memoryview, now: float) -> bool:
        """Store the cookie of a reply to our last handshake message; False (nothing stored) when it is not one."""
        if self._last_mac1 is None:
            return False
        nonce = bytes(reply[COOKIE_NONCE_OFFSET:COOKIE_NONCE_OFFSET + XAEAD_NONCE_LEN])
        sealed = bytes(reply[COOKIE_COOKIE_OFFSET:COOKIE_COOKIE_OFFSET + COOKIE_COOKIE_LEN])
        try:
            cookie = XAEAD_OPEN(self._cookie_key, nonce, sealed, self._last_mac1)
        except CryptoError:
            return False
        self._cookie, self._cookie_set = cookie, now
        return True

    @property
    def has_cookie(self) -> bool:
        return self._cookie_set is not None

    def __repr__(self) -> str:
        return "<CookieGenerator hidden>"

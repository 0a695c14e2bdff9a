"""What ``Device.open`` hands back for one datagram: a small tagged result the caller acts on (boringtun's
``TunnResult``). The caller does all I/O; the protocol core only says what to do.

  Deliver(peer, buffer, offset, length, send)  an authenticated inner packet: write buffer[offset:offset+length]
                                               to the tunnel (after the caller's allowed-IPs source check); then
                                               send ``send`` (queued packets the new session released) to
                                               ``peer.endpoint``. ``buffer`` is the caller's ``out`` or else the
                                               device's own, overwritten by the next ``open``: use it first.
  Reply(datagrams, address, peer, dropped)     send these datagrams to ``address``: a handshake response, the
                                               keepalive that confirms a session, a cookie reply. ``dropped`` is
                                               set when the datagram itself was refused (COOKIE_REQUIRED) and must
                                               be counted so.
  Consumed(peer)                               authenticated, nothing to deliver or send (a keepalive, a cookie).
  Drop(reason)                                 refused; count it by ``reason``. Nothing is ever sent back for a
                                               drop (silence towards an unknown key, a bad MAC, a forgery).

The ``Reason`` values are metric labels; the ones shared with tunneld.encap.base.Drop carry the same text.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Reason(str, enum.Enum):
    TRUNCATED = "truncated"  # shorter than its message type's size (or than a transport header + tag)
    LENGTH_MISMATCH = "length_mismatch"  # a handshake message longer than its size; an inner IP length past the data
    BAD_TYPE = "bad_type"  # no WireGuard message type (or reserved bytes not zero)
    BAD_MAC = "bad_mac"  # mac1 does not verify (or the device has no private key yet): dropped silently
    COOKIE_REQUIRED = "cookie_required"  # under load without a valid mac2: answered with a cookie reply only
    RATE_LIMITED = "rate_limited"  # handshake flood: per source address under load, or a peer's initiations < 20 ms apart
    DECRYPTION_FAILED = "decryption_failed"  # an AEAD tag (handshake or transport) or X25519 refused
    UNKNOWN_PEER = "unknown_peer"  # an initiation from a static key we do not know: no answer at all
    REPLAYED = "replayed"  # a transport counter seen or left behind by the window; an initiation not newer
    NO_SESSION = "no_session"  # a receiver index we did not hand out, or whose keys are gone
    EXPIRED_KEYS = "expired_keys"  # a session older than REJECT_AFTER_TIME
    BAD_PROTOCOL = "bad_protocol"  # the decrypted packet is neither IPv4 nor IPv6


# What a peer's handshakes came to, counted on the core's Peer (``Peer.handshakes``, plain ints) where each happens;
# the keys are metric labels (tunneld_wireguard_handshakes_total{result}) and the values their help. Only what the
# core can state for a known peer: a cookie reply we send answers a datagram whose sender is not known yet (it is
# the COOKIE_REQUIRED drop), and a refused initiation is a drop by reason before any peer is known.
HANDSHAKE_RESULTS = {
    "initiated": "initiations sent to the peer (retries included)",
    "completed_as_initiator": "responses to our initiation consumed: a session we initiated is up",
    "answered": "initiations from the peer answered with a response",
    "completed_as_responder": "the peer's first transport message on a session we answered: confirmed",
    "timed_out": "handshakes given up after the retries (about 90 s without a response); waiting packets dropped",
    "cookie_received": "cookie replies from the peer accepted (it is under load: our next initiation carries mac2)",
}


@dataclass(slots=True)
class Deliver:
    peer: Any
    buffer: bytearray | memoryview
    offset: int
    length: int
    send: tuple[bytes, ...] = ()

    @property
    def packet(self) -> memoryview:
        return memoryview(self.buffer)[self.offset:self.offset + self.length]

    def __repr__(self) -> str:  # the plaintext is the user's traffic: not for a log line either
        return f"Deliver(peer={self.peer!r}, offset={self.offset}, length={self.length}, send={len(self.send)})"


@dataclass(slots=True)
class Reply:
    datagrams: tuple[bytes, ...]
    address: Any
    peer: Any = None
    dropped: Reason | None = None


@dataclass(slots=True)
class Consumed:
    peer: Any


@dataclass(slots=True, frozen=True)
class Drop:
    reason: Reason

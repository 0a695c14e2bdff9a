"""``--mode wireguard``: the WireGuard core (this package's ``Device`` and ``Peer``) behind the engine's
per-peer session contract (tunneld/encap/session.py).

Who is who: the engine's peer id for a WireGuard peer is its public key in base64 (``PeerSpec.key``), and
``session(peer_id)`` adds that key to the codec's one ``Device``. The private key, and each peer's preshared
key and persistent keepalive, come in as the codec's options (read from 0600 files by the configuration,
tunneld/config/wireguard.py; never given as text here, never shown by ``describe``).

Inbound, one datagram at a time:
  1. ``identify(packet, source, now)`` runs ``Device.open`` on it, since only the core can say whose it is (an
     initiation names its sender only inside its encrypted static key). The verdict is kept on the codec
     (``_opened``) for step 2, and the peer's id returned. A verdict with no peer behind it is a Drop, or an
     ``Answer`` (a cookie reply to the datagram's source, under load) the engine sends to the source.
  2. the engine then asks that peer's session to ``open`` the same datagram: the session hands back the kept
     verdict. Deliver: the plaintext is copied over the datagram behind its 16-byte header (the core
     decrypts into a buffer of its own: cryptography's ``decrypt_into`` refuses overlapping buffers) and
     ``(16, length)`` returned; packets the new session released, handshake responses, confirming keepalives
     are queued and ``open`` says HELD for messages without a frame; ``deadline`` is then now, so the engine
     polls them at once, after it moved the peer to the source (roaming: only authenticated messages get here).
Outbound: ``seal`` gives the frame to ``Peer.seal``, which pads it to 16 but never past the frame limit the engine
gives (``set_frame_limit``: the largest frame the path carries, what the device MTU was set from), so that padding
costs no MTU: a frame of exactly the limit is sealed to limit + 32 and fits the underlay (as wireguard-go's). One transport datagram comes back when a session is up:
it is written over the frame's place in the engine's buffer (header in the headroom, padding and tag in the
tail room) and ``(start, end)`` returned. Anything else (an initiation instead, or staged packets released with
it) is queued for ``poll`` and the frame is HELD.
Rows (the offload path, tunneld/encap/session.py "Rows"): ``seal_rows`` seals a super-frame's segments with
consecutive counters into the engine's row buffer, one transport message every ``stride`` bytes (equal rows pad
to equal lengths, so they leave as one UDP_SEGMENT send; ``Peer.seal_rows``). Without a usable session they go
to ``Peer.seal`` one by one, as ``seal`` does. ``open_rows`` runs the core's transport fast path
(``Device.open_transport_rows``) on a read's datagrams, up to the first that is not a transport message, which
the engine then takes one at a time through ``identify`` and ``open`` (weighed by ``cost`` against its budget).

Timers: ``deadline`` is the core's next timer (``Peer.next_deadline``); ``poll`` fires them (``Peer.tick``).

Time: the engine's clock is wall time (``time.time``), so the core's TAI64N needs no offset (``wall_offset``
stays 0 unless the owner's clock is another).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Hashable, Mapping

from tunneld.encap.base import DeviceKind, Drop, Encapsulator, Option, Transport, declare
from tunneld.encap.session import HELD, Answer, Session
from tunneld.encap.wireguard.device import Device  # the core, kept as ``wg`` (``device`` is the DeviceKind)
from tunneld.encap.wireguard.messages import MESSAGE_TRANSPORT_HEADER_SIZE, MESSAGE_TRANSPORT_TYPE, PADDING_MULTIPLE
from tunneld.encap.wireguard.peer import Peer
from tunneld.encap.wireguard.primitives import AEAD_TAG_LEN, key_from_base64, key_to_base64
from tunneld.encap.wireguard.results import Deliver, Reply

PORT = 51820
KEY_LEN = 32
HEADER_LEN = MESSAGE_TRANSPORT_HEADER_SIZE  # type, receiver index, counter
# Room behind a frame: padding to 16, then the Poly1305 tag. Only the tag counts in the overhead: padding never
# takes a frame past the path's frame limit (``set_frame_limit``), as wireguard-go never pads past the device MTU.
TAIL_LEN = PADDING_MULTIPLE - 1 + AEAD_TAG_LEN
KEEPALIVE_MAX = 65535
# What one handshake message weighs against a wake-up's byte budget (the engine's WAKEUP_BYTES, 64 KiB), when
# the core did a handshake's work on it (a valid mac1: X25519s, ~150 us) rather than a transport message's
# (~3 us per 1.4 KB row): a wake-up then judges at most four of them, however small they are on the wire.
HANDSHAKE_COST = 16 << 10

# The core's reasons are the engine's drop reasons of the same name (tunneld.encap.base.Drop).
_DROP = {}


def _drop(reason) -> Drop:
    drop = _DROP.get(reason)
    if drop is None:
        drop = _DROP[reason] = Drop(reason.value)
    return drop


def _key(value: Any, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray)) and len(value) == KEY_LEN:
        return bytes(value)
    # never quote the value: it may be a key
    raise ValueError(f"{what}: give a key file (mode 0600) through the configuration, not a value")


class WireGuard(Encapsulator):
    name: ClassVar[str] = "wireguard"
    description: ClassVar[str] = ("IP packets (TUN) in WireGuard over UDP: Noise_IKpsk2 handshakes, "
                                  "ChaCha20-Poly1305 (interoperates with wireguard-go)")
    device: ClassVar[DeviceKind] = DeviceKind.TUN
    transport: ClassVar[Transport] = Transport("udp", PORT)
    header_room: ClassVar[int] = HEADER_LEN
    tail_room: ClassVar[int] = TAIL_LEN
    align: ClassVar[int] = PADDING_MULTIPLE
    pads_within_limit: ClassVar[bool] = True
    keyed: ClassVar[bool] = True
    rows: ClassVar[bool] = True
    spreads: ClassVar[bool] = False  # keys, counters and replay windows are one process's
    options: ClassVar[Mapping[str, Option]] = declare(
        Option("private_key", str, "file holding this end's private key as `wg genkey` writes it (mode 0600)"),
        Option("wg_peers", None, "per-peer preshared key and persistent keepalive, from the [[peer]] tables"),
    )

    def __init__(self, private_key: bytes | None = None, peers: Mapping[str, tuple[bytes | None, int]] | None = None,
                 *, wall_offset: float = 0.0) -> None:
        self.wg = Device(private_key, wall_offset=wall_offset)
        self._peer_options = dict(peers or {})
        self._opened: tuple[memoryview, Any] | None = None  # (the datagram identified last, the core's verdict)
        self._sessions: dict[Peer, WireGuardSession] = {}  # the core's peer -> its session (open_rows's answers)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "WireGuard":
        private_key = options.get("private_key")
        if private_key is not None:
            private_key = _key(private_key, "private_key")
        peers = options.get("wg_peers") or {}
        if not isinstance(peers, Mapping):
            raise ValueError("wg_peers: given by [[peer]] tables, not as a value")
        checked = {}
        for public, given in peers.items():
            if not isinstance(public, str) or not isinstance(given, tuple) or len(given) != 2:
                raise ValueError("wg_peers: given by [[peer]] tables, not as a value")
            psk, keepalive = given
            try:
                key_from_base64(public)
            except ValueError:
                raise ValueError("wg_peers: a public key is not 44 characters of base64") from None
            if isinstance(keepalive, bool) or not isinstance(keepalive, int) or not 0 <= keepalive <= KEEPALIVE_MAX:
                raise ValueError(f"persistent_keepalive: 0-{KEEPALIVE_MAX} seconds")
            checked[public] = (None if psk is None else _key(psk, "preshared_key"), keepalive)
        return cls(private_key, checked)

    @property
    def header_len(self) -> int:
        return HEADER_LEN

    @property
    def trailer_len(self) -> int:
        return AEAD_TAG_LEN  # the padding stays within the frame limit (``pads_within_limit``)

    def describe(self) -> str:
        public = self.wg.public_key
        return f"public key {key_to_base64(public)}" if public is not None else "no private key yet"

    def session(self, peer_id: str) -> "WireGuardSession":
        try:
            public = key_from_base64(peer_id)
        except ValueError:
            raise ValueError("wireguard: a peer's id is its public key (44 characters of base64)") from None
        psk, keepalive = self._peer_options.get(peer_id, (None, 0))
        # The core sends to ``endpoint``; the engine sends to the peer's own endpoint whatever the core names, so
        # the core gets a placeholder that only says "there is somewhere to send to" (initiations need one).
        peer = self.wg.add_peer(public, preshared_key=psk, endpoint=peer_id, persistent_keepalive=keepalive)
        session = self._sessions[peer] = WireGuardSession(self, peer, peer_id)
        return session

    def identify(self, packet: memoryview, source: str, now: float, port: int = 0) -> Hashable | Drop | Answer:
        """Run the core on the datagram from ``source`` and ``port`` (a cookie is bound to both, as the
        whitepaper's); keep its verdict for the session's ``open`` (see the docstring)."""
        result = self.wg.open(packet, (source, port), now)
        self._opened = None
        if result.__class__ is Reply and result.peer is None:  # a cookie reply, the only answer under load
            return Answer(result.datagrams, None if result.dropped is None else _drop(result.dropped))
        peer = getattr(result, "peer", None)
        if peer is None:
            return _drop(result.reason)
        self._opened = (packet, result)
        return key_to_base64(peer.public_key)

    def open_rows(self, packets: memoryview, size: int, source: str, now: float, out: memoryview,
                  at: int, port: int = 0) -> tuple[list, int]:
        """The transport messages among ``packets`` (datagrams of ``size``, the last maybe shorter, from
        ``source``), up to the first one that is not: a verdict for each, ``(peer_id, offset, length)`` of its
        inner frame in ``out`` (length 0: a keepalive, authenticated) or a Drop; and where ``out`` is filled
        to. What a session wants to send in answer waits in it for ``poll`` (its ``deadline`` says now)."""
        verdicts, at, sends = self.wg.open_transport_rows(packets, size, (source, port), now, out, at)
        sessions = self._sessions
        for peer, datagrams in sends.items():
            session = sessions.get(peer)
            if session is not None and datagrams:
                session._due.extend(datagrams)
        last = last_id = None
        for i, verdict in enumerate(verdicts):
            if verdict.__class__ is tuple:
                peer = verdict[0]
                if peer is not last:
                    session = sessions.get(peer)
                    last, last_id = peer, None if session is None else session.peer_id
                verdicts[i] = (last_id, verdict[1], verdict[2]) if last_id is not None else Drop.UNKNOWN_PEER
            else:
                verdicts[i] = _drop(verdict)
        return verdicts, at

    def cost(self, packet: memoryview, verdict) -> int:
        """What a datagram the engine took one at a time weighs against the wake-up's byte budget (``verdict``:
        what ``identify`` said of it): a handshake message the core did public-key work on (past mac1, and past
        the cookie and rate checks under load) HANDSHAKE_COST; anything else its length, a cookie reply under
        load included (a MAC and an XChaCha20 seal, microseconds). The engine checks the budget between reads:
        one UDP_GRO read (at most 64 datagrams) is judged whole."""
        if not packet or packet[0] == MESSAGE_TRANSPORT_TYPE or verdict.__class__ is Answer or verdict in _CHEAP:
            return len(packet)
        return HANDSHAKE_COST

    def peer_key(self, packet: memoryview) -> Hashable | Drop:
        """Without the source and the time the core cannot judge a handshake: only a transport message's
        receiver index names its peer here (the engine asks ``identify``)."""
        return Drop.UNKNOWN_PEER

    def take_opened(self, packet: memoryview):
        """The verdict ``identify`` kept for this datagram, once; None if there is none."""
        kept, self._opened = self._opened, None
        if kept is None or kept[0] is not packet:  # the engine hands the session the very view it identified
            return None
        return kept[1]

    # Session-only, like every keyed codec: the contract keeps encap/decap abstract.
    def encap(self, buf: bytearray, start: int, end: int) -> int | Drop:
        raise NotImplementedError("wireguard: seals through session(peer_id)")

    def decap(self, packet: memoryview) -> int | Drop:
        raise NotImplementedError("wireguard: opens through session(peer_id)")


# Verdicts the core reaches before any public-key work: no handshake's cost.
_CHEAP = frozenset(Drop(reason) for reason in ("truncated", "length_mismatch", "bad_type", "bad_mac", "rate_limited"))


class WireGuardSession(Session):
    """One peer's WireGuard session (``Peer``) as the engine sees it, and the packets waiting for ``poll``."""

    __slots__ = ("_codec", "peer", "peer_id", "_due")
    authenticates = True

    def __init__(self, codec: WireGuard, peer: Peer, peer_id: str) -> None:
        self._codec = codec
        self.peer = peer
        self.peer_id = peer_id
        self._due: list[bytes] = []

    def seal(self, buf: bytearray, start: int, end: int, now: float):
        if end <= start:
            return Drop.RUNT_FRAME
        datagrams = self.peer.seal(memoryview(buf)[start:end], now)
        if len(datagrams) == 1 and datagrams[0][0] == MESSAGE_TRANSPORT_TYPE:
            datagram = datagrams[0]
            start -= HEADER_LEN
            buf[start : start + len(datagram)] = datagram
            return start, start + len(datagram)
        self._due.extend(datagrams)
        return HELD

    def seal_rows(self, rows: memoryview, rowlen: int, count: int, out: memoryview, now: float):
        peer = self.peer
        if not peer.can_seal_rows(count, now):  # staged behind a handshake, one by one, as ``seal`` does
            for i in range(count):
                self._due.extend(peer.seal(rows[i * rowlen : (i + 1) * rowlen], now))
            return HELD
        if rowlen <= 0 or len(rows) <= (count - 1) * rowlen:
            return Drop.RUNT_FRAME
        stride, end, own = peer.seal_rows(rows, rowlen, count, out, now)
        self._due.extend(own)
        return stride, end

    def open(self, packet: memoryview, now: float):
        result = self._codec.take_opened(packet)
        if result is None or getattr(result, "peer", None) is not self.peer:
            return Drop.UNKNOWN_PEER  # not a datagram the codec judged for this peer
        cls = result.__class__
        if cls is Deliver:
            self._due.extend(result.send)
            length = result.length
            packet[HEADER_LEN : HEADER_LEN + length] = result.packet
            return HEADER_LEN, length
        if cls is Reply:
            self._due.extend(result.datagrams)
        return HELD  # Reply or Consumed: a handshake, a keepalive, a cookie

    def poll(self, now: float) -> list[bytes]:
        due, self._due = self._due, []
        datagrams, _ = self.peer.tick(now)
        return due + datagrams

    def set_frame_limit(self, limit: int) -> None:
        self.peer.mtu = limit  # the core pads to 16 but never past it (messages.padded_length)

    def close(self) -> None:
        self._due.clear()
        if self._codec._sessions.get(self.peer) is self:  # not a newer session the same key was given since
            del self._codec._sessions[self.peer]
        self._codec.wg.remove_peer(self.peer.public_key)  # its keys are zeroed

    def deadline(self) -> float:
        if self._due:
            return -math.inf
        due = self.peer.next_deadline()
        return math.inf if due is None else due


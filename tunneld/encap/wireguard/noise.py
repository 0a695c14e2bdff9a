"""The Noise_IKpsk2 handshake as WireGuard runs it (whitepaper sections 5.4.2-5.4.5), one function per message.

What flows through: a peer's ``Handshake`` state and the device's static key go in; a handshake message (mac1 and
mac2 still zero: tunneld.encap.wireguard.cookie adds them) or a ``Keypair`` comes out. Each function is the
paper's steps in order, under the paper's names (C = chaining key, H = hash, kappa = a key, tau = a hash input).

What must stay true:
- A consume function changes the ``Handshake`` only once every step has succeeded: a forged or stale message
  leaves the state as it was (so it cannot cancel a handshake in progress).
- An initiation is accepted only when its TAI64N timestamp is greater than the greatest accepted from that peer
  (replay), and not sooner than HANDSHAKE_INITIATION_RATE after the last one (flood).
- Keys are dropped from a ``Handshake`` as soon as the transport keys are derived; nothing here prints a key.
"""

from __future__ import annotations

import enum

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tunneld.encap.wireguard.constants import HANDSHAKE_INITIATION_RATE
from tunneld.encap.wireguard.messages import (
    INDEX,
    INITIATION_EPHEMERAL_OFFSET,
    INITIATION_SENDER_OFFSET,
    INITIATION_STATIC_LEN,
    INITIATION_STATIC_OFFSET,
    INITIATION_TIMESTAMP_LEN,
    INITIATION_TIMESTAMP_OFFSET,
    MESSAGE_INITIATION_SIZE,
    MESSAGE_INITIATION_TYPE,
    MESSAGE_RESPONSE_SIZE,
    MESSAGE_RESPONSE_TYPE,
    RESPONSE_EMPTY_LEN,
    RESPONSE_EMPTY_OFFSET,
    RESPONSE_EPHEMERAL_OFFSET,
    RESPONSE_RECEIVER_OFFSET,
    RESPONSE_SENDER_OFFSET,
)
from tunneld.encap.wireguard.primitives import (
    AEAD,
    AEAD_OPEN,
    CONSTRUCTION,
    DH,
    DH_GENERATE,
    HASH,
    IDENTIFIER,
    KDF1,
    KDF2,
    KDF3,
    KEY_LEN,
    ZERO_KEY,
    CryptoError,
    StaticKey,
)
from tunneld.encap.wireguard.replay import ReplayWindow
from tunneld.encap.wireguard.results import Reason

# Ci = HASH(CONSTRUCTION); Hi = HASH(Ci || IDENTIFIER): the same for every handshake, so computed once.
INITIAL_CHAIN_KEY = HASH(CONSTRUCTION)
INITIAL_HASH = HASH(INITIAL_CHAIN_KEY + IDENTIFIER)


class State(enum.Enum):
    ZEROED = 0
    INITIATION_CREATED = 1  # we are the initiator and wait for a response
    INITIATION_CONSUMED = 2  # we are the responder, between reading an initiation and answering it


class Handshake:
    """One peer's handshake in progress (at most one at a time, as in wireguard-go)."""

    __slots__ = ("state", "hash", "chaining_key", "local_ephemeral", "remote_ephemeral", "local_index",
                 "remote_index", "latest_timestamp", "last_initiation_consumption")

    def __init__(self) -> None:
        self.state = State.ZEROED
        self.hash = b""
        self.chaining_key = b""
        self.local_ephemeral: X25519PrivateKey | None = None
        self.remote_ephemeral = b""
        self.local_index = 0
        self.remote_index = 0
        self.latest_timestamp = bytes(12)  # the greatest TAI64N accepted from this peer: kept across clears
        self.last_initiation_consumption: float | None = None

    def clear(self) -> None:
        """Forget the keys and the state; keep what guards against replays and floods."""
        self.state = State.ZEROED
        self.hash = self.chaining_key = self.remote_ephemeral = b""
        self.local_ephemeral = None
        self.local_index = self.remote_index = 0

    def __repr__(self) -> str:
        return f"<Handshake {self.state.name} local_index={self.local_index}>"


class Keypair:
    """The transport keys of one session and its counters. ``repr`` shows indices, never keys."""

    __slots__ = ("send", "receive", "send_counter", "replay", "created", "is_initiator", "local_index",
                 "remote_index")

    def __init__(self, send_key: bytes, receive_key: bytes, *, created: float, is_initiator: bool,
                 local_index: int, remote_index: int) -> None:
        self.send: ChaCha20Poly1305 | None = ChaCha20Poly1305(send_key)
        self.receive: ChaCha20Poly1305 | None = ChaCha20Poly1305(receive_key)
        self.send_counter = 0
        self.replay = ReplayWindow()
        self.created = created
        self.is_initiator = is_initiator
        self.local_index = local_index
        self.remote_index = remote_index

    def zero(self) -> None:
        """Drop the keys (the AEAD contexts hold the only copies; Python cannot overwrite OpenSSL's memory, but
        nothing keeps a reference after this)."""
        self.send = self.receive = None

    def __repr__(self) -> str:
        return (f"<Keypair local_index={self.local_index} remote_index={self.remote_index} "
                f"initiator={self.is_initiator} sent={self.send_counter}>")


class PeerKeys:
    """What the handshake needs to know of a peer: its static public key, the precomputed DH(S_priv, S_pub_peer)
    and the PSK (Q; all zeros when none). ``repr`` shows none of the secret ones."""

    __slots__ = ("public_key", "static_static", "preshared_key")

    def __init__(self, public_key: bytes, static_static: bytes | None, preshared_key: bytes = ZERO_KEY) -> None:
        self.public_key = public_key
        self.static_static = static_static  # None when the device has no key, or the peer's key is low-order
        self.preshared_key = preshared_key

    def __repr__(self) -> str:
        return "<PeerKeys hidden>"


def create_initiation(hs: Handshake, static: StaticKey, peer: PeerKeys, timestamp: bytes,
                      local_index: int) -> bytearray:
    """Initiator, message 1 (whitepaper 5.4.2). Leaves ``hs`` in INITIATION_CREATED."""
    if peer.static_static is None:
        raise CryptoError("no static-static secret with this peer")
    S_pub_r = peer.public_key
    C = INITIAL_CHAIN_KEY
    H = HASH(INITIAL_HASH + S_pub_r)
    E_priv_i, E_pub_i = DH_GENERATE()
    C = KDF1(C, E_pub_i)
    H = HASH(H + E_pub_i)
    C, kappa = KDF2(C, DH(E_priv_i, S_pub_r))
    static_enc = AEAD(kappa, 0, static.public, H)
    H = HASH(H + static_enc)
    C, kappa = KDF2(C, peer.static_static)
    timestamp_enc = AEAD(kappa, 0, timestamp, H)
    H = HASH(H + timestamp_enc)

    msg = bytearray(MESSAGE_INITIATION_SIZE)
    INDEX.pack_into(msg, 0, MESSAGE_INITIATION_TYPE)
    INDEX.pack_into(msg, INITIATION_SENDER_OFFSET, local_index)
    msg[INITIATION_EPHEMERAL_OFFSET:INITIATION_EPHEMERAL_OFFSET + KEY_LEN] = E_pub_i
    msg[INITIATION_STATIC_OFFSET:INITIATION_STATIC_OFFSET + INITIATION_STATIC_LEN] = static_enc
    msg[INITIATION_TIMESTAMP_OFFSET:INITIATION_TIMESTAMP_OFFSET + INITIATION_TIMESTAMP_LEN] = timestamp_enc

    hs.state = State.INITIATION_CREATED
    hs.hash, hs.chaining_key, hs.local_ephemeral = H, C, E_priv_i
    hs.remote_ephemeral = b""
    hs.local_index, hs.remote_index = local_index, 0
    return msg


class ConsumedInitiation:
    """What reading an initiation learnt, before the device has found the peer's ``Handshake`` to commit it to."""

    __slots__ = ("hash", "chaining_key", "remote_ephemeral", "remote_index", "timestamp", "peer_public")

    def __repr__(self) -> str:
        return f"<ConsumedInitiation remote_index={self.remote_index}>"


def consume_initiation_static(msg: bytes | memoryview, static: StaticKey) -> ConsumedInitiation | Reason:
    """Responder, message 1, up to the initiator's static key (whitepaper 5.4.2, read backwards): who is it?"""
    E_pub_i = bytes(msg[INITIATION_EPHEMERAL_OFFSET:INITIATION_EPHEMERAL_OFFSET + KEY_LEN])
    static_enc = bytes(msg[INITIATION_STATIC_OFFSET:INITIATION_STATIC_OFFSET + INITIATION_STATIC_LEN])
    C = INITIAL_CHAIN_KEY
    H = HASH(INITIAL_HASH + static.public)
    C = KDF1(C, E_pub_i)
    H = HASH(H + E_pub_i)
    try:
        C, kappa = KDF2(C, static.dh(E_pub_i))
        S_pub_i = AEAD_OPEN(kappa, 0, static_enc, H)
    except CryptoError:
        return Reason.DECRYPTION_FAILED
    H = HASH(H + static_enc)
    seen = ConsumedInitiation()
    seen.hash, seen.chaining_key, seen.remote_ephemeral = H, C, E_pub_i
    seen.remote_index = INDEX.unpack_from(msg, INITIATION_SENDER_OFFSET)[0]
    seen.peer_public = S_pub_i
    return seen


def consume_initiation_timestamp(msg: bytes | memoryview, seen: ConsumedInitiation, hs: Handshake, peer: PeerKeys,
                                 now: float) -> Reason | None:
    """Responder, message 1, the rest: the timestamp under the static-static key, the replay and flood checks;
    then commit to ``hs`` (INITIATION_CONSUMED). None on success, else why not (``hs`` untouched)."""
    if peer.static_static is None:
        return Reason.DECRYPTION_FAILED
    timestamp_enc = bytes(msg[INITIATION_TIMESTAMP_OFFSET:INITIATION_TIMESTAMP_OFFSET + INITIATION_TIMESTAMP_LEN])
    C, kappa = KDF2(seen.chaining_key, peer.static_static)
    try:
        timestamp = AEAD_OPEN(kappa, 0, timestamp_enc, seen.hash)
    except CryptoError:
        return Reason.DECRYPTION_FAILED
    H = HASH(seen.hash + timestamp_enc)
    # TAI64N is big-endian: byte order is time order. Not constant-time: the timestamp is no secret.
    if timestamp <= hs.latest_timestamp:
        return Reason.REPLAYED
    if hs.last_initiation_consumption is not None and now - hs.last_initiation_consumption <= HANDSHAKE_INITIATION_RATE:
        return Reason.RATE_LIMITED
    hs.state = State.INITIATION_CONSUMED
    hs.hash, hs.chaining_key = H, C
    hs.remote_ephemeral, hs.remote_index = seen.remote_ephemeral, seen.remote_index
    hs.local_ephemeral = None
    hs.latest_timestamp = timestamp
    hs.last_initiation_consumption = now
    return None


def create_response(hs: Handshake, peer: PeerKeys, local_index: int, now: float) -> tuple[bytearray, Keypair]:
    """Responder, message 2 (whitepaper 5.4.3), then the transport keys (5.4.5). Clears ``hs``."""
    assert hs.state is State.INITIATION_CONSUMED
    C, H = hs.chaining_key, hs.hash
    E_priv_r, E_pub_r = DH_GENERATE()
    C = KDF1(C, E_pub_r)
    H = HASH(H + E_pub_r)
    C = KDF1(C, DH(E_priv_r, hs.remote_ephemeral))
    C = KDF1(C, DH(E_priv_r, peer.public_key))
    C, tau, kappa = KDF3(C, peer.preshared_key)
    H = HASH(H + tau)
    empty_enc = AEAD(kappa, 0, b"", H)
    H = HASH(H + empty_enc)

    msg = bytearray(MESSAGE_RESPONSE_SIZE)
    INDEX.pack_into(msg, 0, MESSAGE_RESPONSE_TYPE)
    INDEX.pack_into(msg, RESPONSE_SENDER_OFFSET, local_index)
    INDEX.pack_into(msg, RESPONSE_RECEIVER_OFFSET, hs.remote_index)
    msg[RESPONSE_EPHEMERAL_OFFSET:RESPONSE_EPHEMERAL_OFFSET + KEY_LEN] = E_pub_r
    msg[RESPONSE_EMPTY_OFFSET:RESPONSE_EMPTY_OFFSET + RESPONSE_EMPTY_LEN] = empty_enc

    T_recv, T_send = KDF2(C, b"")  # (T_send_i = T_recv_r, T_recv_i = T_send_r)
    keypair = Keypair(T_send, T_recv, created=now, is_initiator=False, local_index=local_index,
                      remote_index=hs.remote_index)
    hs.clear()
    return msg, keypair


def consume_response(msg: bytes | memoryview, hs: Handshake, static: StaticKey, peer: PeerKeys,
                     now: float) -> Keypair | Reason:
    """Initiator, message 2 (whitepaper 5.4.3, read), then the transport keys. Clears ``hs`` on success only."""
    if hs.state is not State.INITIATION_CREATED or hs.local_ephemeral is None:
        return Reason.NO_SESSION
    E_pub_r = bytes(msg[RESPONSE_EPHEMERAL_OFFSET:RESPONSE_EPHEMERAL_OFFSET + KEY_LEN])
    empty_enc = bytes(msg[RESPONSE_EMPTY_OFFSET:RESPONSE_EMPTY_OFFSET + RESPONSE_EMPTY_LEN])
    C, H = hs.chaining_key, hs.hash
    C = KDF1(C, E_pub_r)
    H = HASH(H + E_pub_r)
    try:
        C = KDF1(C, DH(hs.local_ephemeral, E_pub_r))
        C = KDF1(C, static.dh(E_pub_r))
        C, tau, kappa = KDF3(C, peer.preshared_key)
        H = HASH(H + tau)
        AEAD_OPEN(kappa, 0, empty_enc, H)
    except CryptoError:
        return Reason.DECRYPTION_FAILED
    remote_index = INDEX.unpack_from(msg, RESPONSE_SENDER_OFFSET)[0]
    T_send, T_recv = KDF2(C, b"")
    keypair = Keypair(T_send, T_recv, created=now, is_initiator=True, local_index=hs.local_index,
                      remote_index=remote_index)
    hs.clear()
    return keypair


def static_static(static: StaticKey | None, public_key: bytes) -> bytes | None:
    """DH(S_priv, S_pub_peer), computed once per peer and key; None when there is no key or the result is zero."""
    if static is None:
        return None
    try:
        return static.dh(public_key)
    except CryptoError:
        return None

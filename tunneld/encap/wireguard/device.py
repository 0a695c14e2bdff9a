"""A WireGuard device, sans I/O: the static key pair, the peers by public key, the receiver-index table, the cookie
checker and the under-load state (wireguard-go ``device/device.go``, ``receive.go``; boringtun's ``Tunn``).

What flows through ``open(datagram, source, now)``, in this order for every datagram (first failure wins):
  1. length and type: a type word of 1-4 (reserved bytes zero) and exactly its size (transport: at least 32);
  2. handshake messages (initiation, response): mac1 must verify, else dropped silently (BAD_MAC). Under load,
     mac2 must verify too, else the only answer is a cookie reply (COOKIE_REQUIRED); then the per-source rate
     limit. Only then any X25519 work: an initiation is read up to the sender's static key; an unknown key gets
     no answer (UNKNOWN_PEER); a known one must carry a newer timestamp, and gets a response;
  3. cookie replies: only for an index we handed out in a handshake we sent, and only if they authenticate
     against the mac1 we sent;
  4. transport data: the receiver index must name a live session (NO_SESSION) younger than REJECT_AFTER_TIME
     (EXPIRED_KEYS); the tag must verify (DECRYPTION_FAILED) BEFORE the counter is offered to the replay window
     (REPLAYED); then the peer's endpoint becomes ``source`` (roaming only on authenticated packets) and the inner
     packet is decrypted into ``out`` (or the device's own buffer) and delivered trimmed to its IP length.
     Not in place: cryptography's decrypt_into refuses overlapping input and output, so ``out`` is another
     buffer, reused from packet to packet (one copy, the decryption's own, and no allocation).
The result is one of tunneld.encap.wireguard.results: Deliver, Reply, Consumed, Drop(reason). ``open`` never
raises on any input.

Time: ``now`` is the caller's monotonic clock in seconds. TAI64N timestamps need wall time: ``wall(now)`` is
``now + wall_offset`` (the caller passes ``time.time() - time.monotonic()`` at start), and every timestamp this
device sends is greater than the one before, so a restarted device (a later wall clock) is never taken for a
replay, nor two initiations in the same 16.8 ms.

Load: the device is under load for UNDER_LOAD_AFTER_TIME after more than ``handshake_load_limit`` handshake
messages with a valid mac1 arrived within one second, or while the owner says so (``force_under_load``).

Bounds: at most ``max_peers`` peers; the index table holds at most four entries per peer (a handshake and three
sessions); the rate limiter tracks at most RATE_LIMIT_TABLE_MAX sources.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Callable, Iterable

from cryptography.exceptions import InvalidTag

from tunneld.encap.wireguard.constants import (
    RATE_LIMIT_BURST,
    RATE_LIMIT_PACKETS_PER_SECOND,
    RATE_LIMIT_TABLE_MAX,
    REJECT_AFTER_TIME,
    UNDER_LOAD_AFTER_TIME,
)
from tunneld.encap.wireguard.cookie import CookieChecker
from tunneld.encap.wireguard.messages import (
    COOKIE_RECEIVER_OFFSET,
    HANDSHAKE_SIZES,
    INDEX,
    INITIATION_SENDER_OFFSET,
    MESSAGE_COOKIE_REPLY_TYPE,
    MESSAGE_INITIATION_TYPE,
    MESSAGE_TRANSPORT_HEADER_SIZE,
    MESSAGE_TRANSPORT_MIN_SIZE,
    MESSAGE_TRANSPORT_TYPE,
    RESPONSE_RECEIVER_OFFSET,
    RESPONSE_SENDER_OFFSET,
    TRANSPORT_HEADER,
    message_type,
)
from tunneld.encap.wireguard.noise import (
    Handshake,
    Keypair,
    State,
    consume_initiation_static,
    consume_initiation_timestamp,
    consume_response,
)
from tunneld.encap.wireguard.peer import Peer
from tunneld.encap.wireguard.primitives import AEAD_TAG_LEN, TAI64N, StaticKey, aead_nonce, key_to_base64
from tunneld.encap.wireguard.results import Consumed, Deliver, Drop, Reason, Reply

MAX_DATAGRAM = 65535
IPV4_TOTAL_LENGTH = struct.Struct("!H")  # at offset 2 of an IPv4 header
IPV4_TOTAL_LENGTH_OFFSET = 2
IPV6_PAYLOAD_LENGTH_OFFSET = 4
IPV6_HEADER_LEN = 40
IPV4_MIN_HEADER = 20

_DROPS = {reason: Drop(reason) for reason in Reason}  # results without state are shared, not allocated per packet


class Device:
    def __init__(self, private_key: bytes | StaticKey | None = None, *, wall_offset: float = 0.0,
                 random: Callable[[int], bytes] = os.urandom, handshake_load_limit: int = 64,
                 max_peers: int = 4096) -> None:
        self._random = random
        self.wall_offset = wall_offset
        self.handshake_load_limit = handshake_load_limit
        self.max_peers = max_peers
        self.static: StaticKey | None = None
        self.cookie_checker = CookieChecker(None, random)
        self.peers: dict[bytes, Peer] = {}
        self._indices: dict[int, tuple[Peer, Handshake | Keypair | None]] = {}
        self._last_timestamp = bytes(12)
        self.force_under_load = False
        self._under_load_until: float | None = None
        self._load_window_start: float | None = None
        self._load_count = 0
        self._limiter: dict[bytes, list[float]] = {}  # source IP -> [tokens, last refill]
        self._scratch = bytearray(MAX_DATAGRAM)
        if private_key is not None:
            self.set_private_key(private_key)

    def __repr__(self) -> str:
        key = key_to_base64(self.static.public) if self.static else "none"
        return f"<Device public={key} peers={len(self.peers)}>"

    # -- configuration ----------------------------------------------------------------------------------------

    @property
    def public_key(self) -> bytes | None:
        return self.static.public if self.static else None

    def set_private_key(self, private_key: bytes | StaticKey | None) -> None:
        """A new static key (or none): every session ends; a peer with our own new public key is removed (as
        wireguard-go does: we do not talk to ourselves)."""
        static = private_key if isinstance(private_key, StaticKey) or private_key is None else StaticKey(private_key)
        self.static = static
        self.cookie_checker.set_public_key(static.public if static else None)
        if static is not None and static.public in self.peers:
            self.remove_peer(static.public)
        for peer in self.peers.values():
            peer._rekey_static()

    def add_peer(self, public_key: bytes, *, preshared_key: bytes | None = None, endpoint=None,
                 persistent_keepalive: int = 0, mtu: int | None = None) -> Peer:
        public_key = bytes(public_key)
        if public_key in self.peers:
            return self.peers[public_key]
        if len(self.peers) >= self.max_peers:
            raise ValueError(f"too many peers (at most {self.max_peers})")
        if self.static is not None and public_key == self.static.public:
            raise ValueError("a peer cannot have the device's own public key")
        peer = Peer(self, public_key, preshared_key=preshared_key, endpoint=endpoint,
                    persistent_keepalive=persistent_keepalive, mtu=mtu)
        self.peers[public_key] = peer
        return peer

    def remove_peer(self, public_key: bytes) -> None:
        peer = self.peers.pop(bytes(public_key), None)
        if peer is not None:
            peer.zero_keys()

    # -- time and load ----------------------------------------------------------------------------------------

    def wall(self, now: float) -> float:
        return now + self.wall_offset

    def _timestamp(self, now: float) -> bytes:
        stamp = TAI64N(self.wall(now))
        if stamp <= self._last_timestamp:  # never repeat or go back: bump the last one by a nanosecond
            seconds, nanos = struct.unpack(">QI", self._last_timestamp)
            nanos += 1
            if nanos >= 1_000_000_000:
                seconds, nanos = seconds + 1, 0
            stamp = struct.pack(">QI", seconds, nanos)
        self._last_timestamp = stamp
        return stamp

    def under_load(self, now: float) -> bool:
        return self.force_under_load or (self._under_load_until is not None and now < self._under_load_until)

    def _count_handshake(self, now: float) -> None:
        if self._load_window_start is None or now - self._load_window_start >= 1.0:
            self._load_window_start, self._load_count = now, 0
        self._load_count += 1
        if self._load_count > self.handshake_load_limit:
            self._under_load_until = now + UNDER_LOAD_AFTER_TIME

    def _allow(self, source, now: float) -> bool:
        """wireguard-go's ratelimiter: a token bucket per source, RATE_LIMIT_PACKETS_PER_SECOND with a burst of
        RATE_LIMIT_BURST. A source is an IPv4 address, or an IPv6 /64 as the kernel's WireGuard counts it (one
        host is given a whole /64: per address, a flood from it would have 2^64 buckets). The table is bounded:
        when full, idle entries go; if none is idle, new sources wait."""
        ip = str(source[0])
        if ":" in ip:
            try:
                ip = socket.inet_pton(socket.AF_INET6, ip.split("%", 1)[0])[:8]
            except OSError:
                pass  # not an address the kernel gave: its text is its own bucket
        cost = 1.0 / RATE_LIMIT_PACKETS_PER_SECOND
        most = cost * RATE_LIMIT_BURST
        entry = self._limiter.get(ip)
        if entry is None:
            if len(self._limiter) >= RATE_LIMIT_TABLE_MAX:
                for key in [k for k, (_, last) in self._limiter.items() if now - last > 1.0]:
                    del self._limiter[key]
                if len(self._limiter) >= RATE_LIMIT_TABLE_MAX:
                    return False
            self._limiter[ip] = [most - cost, now]
            return True
        tokens = min(most, entry[0] + (now - entry[1]))
        entry[1] = now
        if tokens > cost:
            entry[0] = tokens - cost
            return True
        entry[0] = tokens
        return False

    # -- the index table --------------------------------------------------------------------------------------

    def _new_index(self, peer: Peer, holder: Handshake | Keypair | None) -> int:
        while True:
            index = int.from_bytes(self._random(4), "little")
            if index and index not in self._indices:  # 0 means "no index" in a Handshake
                self._indices[index] = (peer, holder)
                return index

    def _bind_index(self, index: int, holder: Handshake | Keypair) -> None:
        entry = self._indices.get(index)
        if entry is not None:
            self._indices[index] = (entry[0], holder)

    def _forget_index(self, index: int) -> None:
        if index:
            self._indices.pop(index, None)

    # -- timers -----------------------------------------------------------------------------------------------

    def tick(self, now: float) -> tuple[list[tuple[bytes, object]], float | None]:
        """Every peer's due timers: (datagram, address) pairs to send, and the earliest next deadline."""
        out: list[tuple[bytes, object]] = []
        deadline = None
        for peer in list(self.peers.values()):
            datagrams, due = peer.tick(now)
            out.extend((d, peer.endpoint) for d in datagrams)
            if due is not None and (deadline is None or due < deadline):
                deadline = due
        return out, deadline

    # -- inbound ----------------------------------------------------------------------------------------------

    def open(self, datagram: bytes | bytearray | memoryview, source, now: float,
             out: bytearray | memoryview | None = None) -> Deliver | Reply | Consumed | Drop:
        """The verdict on one datagram from ``source`` (see the module's docstring). Never raises on input."""
        length = len(datagram)
        kind = message_type(datagram)
        if kind == MESSAGE_TRANSPORT_TYPE:
            if length < MESSAGE_TRANSPORT_MIN_SIZE:
                return _DROPS[Reason.TRUNCATED]
            return self._open_transport(datagram, length, source, now, out)
        size = HANDSHAKE_SIZES.get(kind)
        if size is None:
            return _DROPS[Reason.TRUNCATED if length < 4 else Reason.BAD_TYPE]
        if length != size:
            return _DROPS[Reason.TRUNCATED if length < size else Reason.LENGTH_MISMATCH]
        if kind == MESSAGE_COOKIE_REPLY_TYPE:
            return self._open_cookie_reply(datagram, now)
        if not self.cookie_checker.check_mac1(datagram, kind):
            return _DROPS[Reason.BAD_MAC]
        self._count_handshake(now)
        if self.under_load(now):
            if not self.cookie_checker.check_mac2(datagram, kind, source, now):
                sender_offset = INITIATION_SENDER_OFFSET if kind == MESSAGE_INITIATION_TYPE else RESPONSE_SENDER_OFFSET
                sender = INDEX.unpack_from(datagram, sender_offset)[0]
                reply = self.cookie_checker.create_reply(datagram, kind, sender, source, now)
                return Reply((reply,), source, None, Reason.COOKIE_REQUIRED)
            if not self._allow(source, now):
                return _DROPS[Reason.RATE_LIMITED]
        if kind == MESSAGE_INITIATION_TYPE:
            return self._open_initiation(datagram, source, now)
        return self._open_response(datagram, source, now)

    def _open_initiation(self, msg, source, now: float) -> Reply | Drop:
        if self.static is None:
            return _DROPS[Reason.BAD_MAC]
        seen = consume_initiation_static(msg, self.static)
        if isinstance(seen, Reason):
            return _DROPS[seen]
        peer = self.peers.get(seen.peer_public)
        if peer is None:
            return _DROPS[Reason.UNKNOWN_PEER]
        refused = consume_initiation_timestamp(msg, seen, peer.handshake, peer.keys, now)
        if refused is not None:
            return _DROPS[refused]
        # a new initiation replaces any handshake of ours in flight: its index is no longer ours to answer
        self._forget_index(peer.handshake.local_index)
        peer.handshake.local_index = 0
        peer.rx_bytes += len(msg)
        response = peer._respond(source, now)
        if response is None:
            return _DROPS[Reason.DECRYPTION_FAILED]
        return Reply((response,), source, peer)

    def _open_response(self, msg, source, now: float) -> Reply | Consumed | Drop:
        if self.static is None:
            return _DROPS[Reason.BAD_MAC]
        receiver = INDEX.unpack_from(msg, RESPONSE_RECEIVER_OFFSET)[0]
        entry = self._indices.get(receiver)
        if entry is None or not isinstance(entry[1], Handshake) or entry[1].state is not State.INITIATION_CREATED:
            return _DROPS[Reason.NO_SESSION]
        peer, handshake = entry
        keypair = consume_response(msg, handshake, self.static, peer.keys, now)
        if isinstance(keypair, Reason):
            return _DROPS[keypair]
        sends = peer._received_response(keypair, source, now, len(msg))
        if sends:
            return Reply(tuple(sends), source, peer)
        return Consumed(peer)

    def _open_cookie_reply(self, msg, now: float) -> Consumed | Drop:
        receiver = INDEX.unpack_from(msg, COOKIE_RECEIVER_OFFSET)[0]
        entry = self._indices.get(receiver)
        if entry is None:
            return _DROPS[Reason.NO_SESSION]
        peer = entry[0]
        if not peer.cookie.consume_reply(msg, now):
            return _DROPS[Reason.DECRYPTION_FAILED]
        peer.handshakes["cookie_received"] += 1
        return Consumed(peer)

    def _open_transport(self, datagram, length: int, source, now: float, out) -> Deliver | Reply | Consumed | Drop:
        _, receiver, counter = TRANSPORT_HEADER.unpack_from(datagram, 0)
        entry = self._indices.get(receiver)
        if entry is None or not isinstance(entry[1], Keypair) or entry[1].receive is None:
            return _DROPS[Reason.NO_SESSION]
        peer, keypair = entry
        if now - keypair.created >= REJECT_AFTER_TIME:
            return _DROPS[Reason.EXPIRED_KEYS]
        plaintext_length = length - MESSAGE_TRANSPORT_HEADER_SIZE - AEAD_TAG_LEN
        buffer = self._scratch if out is None else out
        if len(buffer) < plaintext_length:
            return _DROPS[Reason.LENGTH_MISMATCH]
        view = memoryview(datagram)
        try:
            keypair.receive.decrypt_into(aead_nonce(counter), view[MESSAGE_TRANSPORT_HEADER_SIZE:length], None,
                                         memoryview(buffer)[:plaintext_length])
        except InvalidTag:
            return _DROPS[Reason.DECRYPTION_FAILED]
        if not keypair.replay.accept(counter):
            return _DROPS[Reason.REPLAYED]
        sends = peer._received_transport(keypair, source, now, length, plaintext_length)
        if plaintext_length == 0:
            if sends:
                return Reply(tuple(sends), source, peer)
            return Consumed(peer)
        inner = _inner_length(buffer, plaintext_length)
        if isinstance(inner, Reason):
            return _DROPS[inner]  # authenticated, so the peer is broken, not forged: still nothing delivered
        return Deliver(peer, buffer, 0, inner, tuple(sends))

    def open_transport_rows(self, packets: memoryview, size: int, source, now: float, out: memoryview,
                            at: int) -> tuple[list, int, dict]:
        """The fast path for transport messages back to back in ``packets`` (``size`` bytes each, the last maybe
        shorter: a UDP_GRO read, or one datagram), from ``source``, up to the first row that is not a transport
        message (``_open_transport``'s checks, in its order, for each). Each authenticated inner packet is
        decrypted into ``out`` at ``at``, and the next one's right behind it (where this one's padding was):
        accepted packets lie packed, as the coalescer takes them.

        Returns (verdicts, at, sends): a verdict per row handled, ``(peer, offset, length)`` (length 0: a
        keepalive) or a ``Reason``; where ``out`` is filled to; and per peer touched, what its session wants to
        send in answer. The peer's bookkeeping (``_received_transport``: endpoint, timers, bytes) is done once
        per run of one keypair's rows, with their bytes together: for one ``now`` each timer takes the value
        it would take for each row."""
        verdicts: list = []
        sends: dict = {}
        n = len(packets)  # a datagram shorter than a transport header is the one-at-a-time path's
        indices = self._indices
        unpack = TRANSPORT_HEADER.unpack_from
        nonce = aead_nonce
        limit = len(out)
        drops = Reason
        run_keypair = run_peer = None
        run_bytes = run_data = 0
        start = 0
        while start + MESSAGE_TRANSPORT_HEADER_SIZE <= n:
            end = start + size
            if end > n:
                end = n
            kind, receiver, counter = unpack(packets, start)
            if kind != MESSAGE_TRANSPORT_TYPE:  # (the reserved bytes are in the type word: zero)
                break  # a handshake, a cookie reply, junk: the caller's one-at-a-time path judges it
            length = end - start
            body = start + MESSAGE_TRANSPORT_HEADER_SIZE
            start = end
            if length < MESSAGE_TRANSPORT_MIN_SIZE:
                verdicts.append(drops.TRUNCATED)
                continue
            entry = indices.get(receiver)
            if entry is None or entry[1].__class__ is not Keypair or entry[1].receive is None:
                verdicts.append(drops.NO_SESSION)
                continue
            peer, keypair = entry
            if now - keypair.created >= REJECT_AFTER_TIME:
                verdicts.append(drops.EXPIRED_KEYS)
                continue
            plaintext_length = length - MESSAGE_TRANSPORT_MIN_SIZE
            if at + plaintext_length > limit:
                verdicts.append(drops.LENGTH_MISMATCH)
                continue
            try:
                keypair.receive.decrypt_into(nonce(counter), packets[body:end], None, out[at : at + plaintext_length])
            except InvalidTag:
                verdicts.append(drops.DECRYPTION_FAILED)
                continue
            if not keypair.replay.accept(counter):
                verdicts.append(drops.REPLAYED)
                continue
            if keypair is not run_keypair:
                if run_keypair is not None:
                    sends.setdefault(run_peer, []).extend(
                        run_peer._received_transport(run_keypair, source, now, run_bytes, run_data))
                run_keypair, run_peer, run_bytes, run_data = keypair, peer, 0, 0
            run_bytes += length
            run_data += plaintext_length
            if plaintext_length == 0:
                verdicts.append((peer, at, 0))
                continue
            # the inner packet's own length (the plaintext holds padding too): _inner_length, inlined
            version = out[at] >> 4
            if version == 4 and plaintext_length >= IPV4_MIN_HEADER:
                inner = out[at + 2] << 8 | out[at + 3]
                low = IPV4_MIN_HEADER
            elif version == 6 and plaintext_length >= IPV6_HEADER_LEN:
                inner = IPV6_HEADER_LEN + (out[at + 4] << 8 | out[at + 5])
                low = IPV6_HEADER_LEN
            else:
                verdicts.append(drops.BAD_PROTOCOL if version not in (4, 6) else drops.LENGTH_MISMATCH)
                continue
            if inner > plaintext_length or inner < low:
                verdicts.append(drops.LENGTH_MISMATCH)
                continue
            verdicts.append((peer, at, inner))
            at += inner
        if run_keypair is not None:
            sends.setdefault(run_peer, []).extend(
                run_peer._received_transport(run_keypair, source, now, run_bytes, run_data))
        return verdicts, at, sends

    # -- conveniences for the owner ---------------------------------------------------------------------------

    def peer(self, public_key: bytes) -> Peer | None:
        return self.peers.get(bytes(public_key))

    def sessions(self) -> Iterable[Peer]:
        return (p for p in self.peers.values() if p.has_session)


def _inner_length(buffer, plaintext_length: int) -> int | Reason:
    """The inner packet's own length, from its IP header (the plaintext also holds padding)."""
    version = buffer[0] >> 4
    if version == 4:
        if plaintext_length < IPV4_MIN_HEADER:
            return Reason.LENGTH_MISMATCH
        length = IPV4_TOTAL_LENGTH.unpack_from(buffer, IPV4_TOTAL_LENGTH_OFFSET)[0]
    elif version == 6:
        if plaintext_length < IPV6_HEADER_LEN:
            return Reason.LENGTH_MISMATCH
        length = IPV6_HEADER_LEN + IPV4_TOTAL_LENGTH.unpack_from(buffer, IPV6_PAYLOAD_LENGTH_OFFSET)[0]
    else:
        return Reason.BAD_PROTOCOL
    if length > plaintext_length or length < (IPV4_MIN_HEADER if version == 4 else IPV6_HEADER_LEN):
        return Reason.LENGTH_MISMATCH
    return length

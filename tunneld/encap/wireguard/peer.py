"""A WireGuard peer's session: its keypairs, its staged packets and its timers (wireguard-go ``device/peer.go``,
``send.go``, ``timers.go``, ``keypair.go``; boringtun's per-peer ``Tunn``).

What flows through:
  outbound  ``seal(inner, now)``: the inner IP packet is sealed with the current session's next counter and
            the datagram returned, to be sent to ``endpoint``. Without a usable session the packet is staged
            (at most QUEUE_STAGED_SIZE, oldest dropped first) and a handshake initiation is returned instead
            (at most one per REKEY_TIMEOUT).
  timers    ``tick(now)``: fires what is due (initiation retries, keepalives, new handshakes, key zeroing) and
            returns the datagrams to send and the next deadline. The owner calls it at that deadline or sooner.
  inbound   the device (tunneld.encap.wireguard.device) calls the ``_received_*`` methods once a message has
            authenticated.

Keypairs, as wireguard-go keeps them: ``current`` sends; ``previous`` still receives what was in flight; ``next``
is a responder's new session, which becomes ``current`` only when the initiator's first transport message arrives
(so the responder never sends first on a session the initiator may not have).

The timers, as deadlines on the caller's clock (None: not armed):
  retransmit_handshake_at  REKEY_TIMEOUT + jitter after an initiation; retried up to MAX_TIMER_HANDSHAKES times
  new_handshake_at         KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + jitter after data was sent with nothing heard back
  send_keepalive_at        KEEPALIVE_TIMEOUT after data was received with nothing sent back (passive keepalive)
  persistent_keepalive_at  persistent_keepalive after any authenticated packet either way
  zero_key_material_at     ZERO_KEY_MATERIAL_AFTER (540 s) after a session was derived

What must stay true: no datagram is sealed with a counter at or past REJECT_AFTER_MESSAGES or with a session
older than REJECT_AFTER_TIME; the endpoint changes only on an authenticated message; a peer's ``repr`` shows its
public key and nothing secret.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from tunneld.encap.wireguard.constants import (
    KEEPALIVE_TIMEOUT,
    MAX_TIMER_HANDSHAKES,
    QUEUE_STAGED_SIZE,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ON_RECEIVE_AFTER,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    ZERO_KEY_MATERIAL_AFTER,
)
from tunneld.encap.wireguard.cookie import CookieGenerator
from tunneld.encap.wireguard.messages import (
    MESSAGE_INITIATION_TYPE,
    MESSAGE_RESPONSE_TYPE,
    MESSAGE_TRANSPORT_HEADER_SIZE,
    MESSAGE_TRANSPORT_TYPE,
    PADDING_MULTIPLE,
    TRANSPORT_HEADER,
    padded_length,
)
from tunneld.encap.wireguard.noise import (
    Handshake,
    Keypair,
    PeerKeys,
    State,
    create_initiation,
    create_response,
    static_static,
)
from tunneld.encap.wireguard.primitives import AEAD_TAG_LEN, ZERO_KEY, CryptoError, aead_nonce, key_to_base64
from tunneld.encap.wireguard.results import HANDSHAKE_RESULTS

if TYPE_CHECKING:
    from tunneld.encap.wireguard.device import Device

_ZEROS = bytes(PADDING_MULTIPLE)  # padding: at most 15 bytes (padded_length never pads past the next multiple)
TIMERS = ("retransmit_handshake_at", "new_handshake_at", "send_keepalive_at", "persistent_keepalive_at",
          "zero_key_material_at")


class Peer:
    def __init__(self, device: "Device", public_key: bytes, *, preshared_key: bytes | None = None,
                 endpoint=None, persistent_keepalive: int = 0, mtu: int | None = None) -> None:
        self.device = device
        self.public_key = bytes(public_key)
        self.keys = PeerKeys(self.public_key, static_static(device.static, self.public_key),
                             bytes(preshared_key) if preshared_key else ZERO_KEY)
        self.endpoint = endpoint
        self.persistent_keepalive = persistent_keepalive  # seconds; 0 is off
        self.mtu = mtu  # padding never grows a packet past this (wireguard-go pads up to the device MTU)
        self.handshake = Handshake()
        self.cookie = CookieGenerator(self.public_key)
        self.current: Keypair | None = None
        self.previous: Keypair | None = None
        self.next: Keypair | None = None
        self.staged: collections.deque[bytes] = collections.deque()
        self._scratch = bytearray(0)  # seal_rows: one padded packet at a time
        # what `wg show` reports
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.last_handshake_wall: float | None = None  # wall-clock seconds of the latest completed handshake
        self.staged_dropped = 0
        self.handshakes = dict.fromkeys(HANDSHAKE_RESULTS, 0)  # by result (results.HANDSHAKE_RESULTS), for metrics
        # timers
        self.retransmit_handshake_at: float | None = None
        self.new_handshake_at: float | None = None
        self.send_keepalive_at: float | None = None
        self.persistent_keepalive_at: float | None = None
        self.zero_key_material_at: float | None = None
        self.need_another_keepalive = False
        self.handshake_attempts = 0
        self.last_sent_handshake: float | None = None
        self.sent_last_minute_handshake = False

    def __repr__(self) -> str:
        return f"<Peer {key_to_base64(self.public_key)} endpoint={self.endpoint}>"

    # -- configuration ----------------------------------------------------------------------------------------

    def set_preshared_key(self, preshared_key: bytes | None) -> None:
        self.keys.preshared_key = bytes(preshared_key) if preshared_key else ZERO_KEY

    @property
    def has_preshared_key(self) -> bool:
        return self.keys.preshared_key != ZERO_KEY

    def set_persistent_keepalive(self, seconds: int, now: float) -> list[bytes]:
        """Set the interval; like wireguard-go, turning it on sends a keepalive at once (if there is an endpoint)."""
        was = self.persistent_keepalive
        self.persistent_keepalive = seconds
        if seconds and not was and self.endpoint is not None:
            return self.keepalive(now)
        if not seconds:
            self.persistent_keepalive_at = None
        return []

    def _rekey_static(self) -> None:
        """The device's private key changed: a new static-static secret, and every session and handshake gone."""
        self.keys.static_static = static_static(self.device.static, self.public_key)
        self.zero_keys()

    # -- outbound ---------------------------------------------------------------------------------------------

    def seal(self, inner: bytes | memoryview, now: float) -> list[bytes]:
        """The datagrams to send to ``endpoint`` for one inner packet (see the module's docstring)."""
        keypair = self.current
        if not self.staged and self._usable(keypair, now):
            return self._send_with(keypair, [inner], now)
        self._stage(bytes(inner))
        return self._send_staged(now)

    def keepalive(self, now: float) -> list[bytes]:
        """An empty transport message (or, without a session, an initiation)."""
        if not self.staged:
            self._stage(b"")
        return self._send_staged(now)

    def _stage(self, packet: bytes) -> None:
        if len(self.staged) >= QUEUE_STAGED_SIZE:
            self.staged.popleft()
            self.staged_dropped += 1
        self.staged.append(packet)

    def _usable(self, keypair: Keypair | None, now: float) -> bool:
        return (keypair is not None and keypair.send is not None and keypair.send_counter < REJECT_AFTER_MESSAGES
                and now - keypair.created < REJECT_AFTER_TIME)

    def _send_staged(self, now: float) -> list[bytes]:
        if not self.staged:
            return []
        keypair = self.current
        if not self._usable(keypair, now):
            return self._send_handshake_initiation(now, retry=False)
        room = REJECT_AFTER_MESSAGES - keypair.send_counter
        batch = [self.staged.popleft() for _ in range(min(room, len(self.staged)))]
        return self._send_with(keypair, batch, now)

    def _send_with(self, keypair: Keypair, packets: list, now: float) -> list[bytes]:
        out = [self._encrypt(keypair, p) for p in packets]
        out.extend(self._keep_key_fresh_sending(keypair, now))
        self._timers_any_authenticated_packet_traversal(now)
        self._timers_any_authenticated_packet_sent()
        if any(len(p) for p in packets):
            self._timers_data_sent(now)
        return out

    def _encrypt(self, keypair: Keypair, inner: bytes | memoryview) -> bytes:
        counter = keypair.send_counter
        keypair.send_counter = counter + 1
        length = len(inner)
        padded = padded_length(length, self.mtu)
        if padded != length:
            plaintext = bytearray(padded)
            plaintext[:length] = inner
        else:
            plaintext = inner
        out = bytearray(MESSAGE_TRANSPORT_HEADER_SIZE + padded + AEAD_TAG_LEN)
        TRANSPORT_HEADER.pack_into(out, 0, MESSAGE_TRANSPORT_TYPE, keypair.remote_index, counter)
        keypair.send.encrypt_into(aead_nonce(counter), plaintext, None, memoryview(out)[MESSAGE_TRANSPORT_HEADER_SIZE:])
        self.tx_bytes += len(out)
        return bytes(out)

    def can_seal_rows(self, count: int, now: float) -> bool:
        """Whether ``count`` packets may be sealed at once on the current session (``seal_rows``): nothing is
        staged before them, the session is usable and its counters last for all of them."""
        keypair = self.current
        return (not self.staged and self._usable(keypair, now)
                and keypair.send_counter + count < REJECT_AFTER_MESSAGES)

    def seal_rows(self, rows, rowlen: int, count: int, out, now: float) -> tuple[int, int, list[bytes]]:
        """Seal ``count`` inner packets of ``rowlen`` bytes back to back in ``rows`` (the last may be shorter) into
        ``out``, one transport message every ``stride`` bytes, counters in row order: the rows are sent in that
        order. Equal packets pad to equal lengths, so only the last message may be shorter. The caller checked
        ``can_seal_rows``. Returns (stride, total bytes, datagrams of the session's own to send after them: a
        rekey's initiation).

        A packet whose length is not its padded length is first copied into a scratch row (zeros behind it):
        cryptography's ``encrypt_into`` refuses to write over its input, so there is a copy either way, and
        ``out`` is the engine's send buffer. The bookkeeping of ``_send_with`` is done once for the rows: every
        timer it touches takes the same value for each packet of one ``now``."""
        keypair = self.current
        full = padded_length(rowlen, self.mtu)
        stride = MESSAGE_TRANSPORT_HEADER_SIZE + full + AEAD_TAG_LEN
        scratch = self._scratch
        if len(scratch) < full:
            scratch = self._scratch = bytearray(full)
        counter = keypair.send_counter
        keypair.send_counter = counter + count
        encrypt_into, remote, pack = keypair.send.encrypt_into, keypair.remote_index, TRANSPORT_HEADER.pack_into
        scratch_view = memoryview(scratch)
        tail = len(rows) - (count - 1) * rowlen  # the last row's length (rowlen when it is whole)
        at = 0
        for i in range(count):
            start = i * rowlen
            if i < count - 1 or tail == rowlen:
                length, padded = rowlen, full
            else:
                length = tail
                padded = padded_length(length, self.mtu)
            if padded == length:
                plaintext = rows[start : start + length]
            else:
                scratch[:length] = rows[start : start + length]
                scratch[length:padded] = _ZEROS[: padded - length]
                plaintext = scratch_view[:padded]
            pack(out, at, MESSAGE_TRANSPORT_TYPE, remote, counter)
            body = at + MESSAGE_TRANSPORT_HEADER_SIZE
            encrypt_into(aead_nonce(counter), plaintext, None, out[body : body + padded + AEAD_TAG_LEN])
            counter += 1
            at += stride
        total = at - stride + MESSAGE_TRANSPORT_HEADER_SIZE + padded + AEAD_TAG_LEN
        self.tx_bytes += total
        own = self._keep_key_fresh_sending(keypair, now)
        self._timers_any_authenticated_packet_traversal(now)
        self._timers_any_authenticated_packet_sent()
        self._timers_data_sent(now)
        return stride, total, own

    def _keep_key_fresh_sending(self, keypair: Keypair, now: float) -> list[bytes]:
        if keypair.send_counter > REKEY_AFTER_MESSAGES or (
                keypair.is_initiator and now - keypair.created > REKEY_AFTER_TIME):
            return self._send_handshake_initiation(now, retry=False)
        return []

    def _send_handshake_initiation(self, now: float, retry: bool) -> list[bytes]:
        if not retry:
            self.handshake_attempts = 0
        if self.last_sent_handshake is not None and now - self.last_sent_handshake < REKEY_TIMEOUT:
            return []
        if self.endpoint is None or self.keys.static_static is None or self.device.static is None:
            return []  # nowhere to send it, or no key to make it with: the next seal or tick tries again
        self.last_sent_handshake = now
        self.device._forget_index(self.handshake.local_index)
        index = self.device._new_index(self, self.handshake)
        try:
            msg = create_initiation(self.handshake, self.device.static, self.keys, self.device._timestamp(now), index)
        except CryptoError:
            self.device._forget_index(index)
            return []
        self.cookie.add_macs(msg, MESSAGE_INITIATION_TYPE, now)
        self._timers_any_authenticated_packet_traversal(now)
        self._timers_any_authenticated_packet_sent()
        self._timers_handshake_initiated(now)
        self.tx_bytes += len(msg)
        self.handshakes["initiated"] += 1
        return [bytes(msg)]

    # -- inbound, called by the device once a message has authenticated -----------------------------------------

    def _respond(self, source, now: float) -> bytes | None:
        """We consumed an initiation: answer it and hold the new session as ``next`` until confirmed."""
        self.endpoint = source
        self._timers_any_authenticated_packet_traversal(now)
        self._timers_any_authenticated_packet_received()
        self.last_sent_handshake = now
        index = self.device._new_index(self, None)
        try:
            msg, keypair = create_response(self.handshake, self.keys, index, now)
        except CryptoError:
            self.device._forget_index(index)
            self.handshake.clear()
            return None
        self.device._bind_index(index, keypair)
        self.cookie.add_macs(msg, MESSAGE_RESPONSE_TYPE, now)
        self._begin_session(keypair)
        self._timers_session_derived(now)
        self._timers_any_authenticated_packet_traversal(now)
        self._timers_any_authenticated_packet_sent()
        self.tx_bytes += len(msg)
        self.handshakes["answered"] += 1
        return bytes(msg)

    def _received_response(self, keypair: Keypair, source, now: float, length: int) -> list[bytes]:
        """We consumed a response to our initiation: the session is ours to send on; confirm it at once."""
        self.endpoint = source
        self.rx_bytes += length
        self._timers_any_authenticated_packet_traversal(now)
        self._timers_any_authenticated_packet_received()
        self.device._bind_index(keypair.local_index, keypair)
        self._begin_session(keypair)
        self._timers_session_derived(now)
        self._timers_handshake_complete(now)
        self.handshakes["completed_as_initiator"] += 1
        return self.keepalive(now)

    def _received_transport(self, keypair: Keypair, source, now: float, length: int, plaintext_length: int) -> list[bytes]:
        """A transport message authenticated and passed the replay window; returns what to send in answer."""
        self.endpoint = source
        self.rx_bytes += length
        out = []
        if self._received_with_keypair(keypair):
            self._timers_handshake_complete(now)
            self.handshakes["completed_as_responder"] += 1
            out.extend(self._send_staged(now))
        out.extend(self._keep_key_fresh_receiving(now))
        self._timers_any_authenticated_packet_traversal(now)
        self._timers_any_authenticated_packet_received()
        if plaintext_length:
            self._timers_data_received(now)
        return out

    def _received_with_keypair(self, keypair: Keypair) -> bool:
        """The initiator's first message on our ``next`` session: it becomes ``current``."""
        if self.next is not keypair:
            return False
        self._drop_keypair(self.previous)
        self.previous, self.current, self.next = self.current, self.next, None
        return True

    def _keep_key_fresh_receiving(self, now: float) -> list[bytes]:
        if self.sent_last_minute_handshake:
            return []
        keypair = self.current
        if keypair is not None and keypair.is_initiator and now - keypair.created > REKEY_ON_RECEIVE_AFTER:
            self.sent_last_minute_handshake = True
            return self._send_handshake_initiation(now, retry=False)
        return []

    def _begin_session(self, keypair: Keypair) -> None:
        """wireguard-go's BeginSymmetricSession: where a new keypair goes, and which old one it pushes out."""
        if keypair.is_initiator:
            if self.next is not None:
                self._drop_keypair(self.previous)
                self.previous, self.next = self.next, None
            else:
                self._drop_keypair(self.previous)
                self.previous = self.current
            self.current = keypair
        else:
            self._drop_keypair(self.next)
            self._drop_keypair(self.previous)
            self.next, self.previous = keypair, None

    def _drop_keypair(self, keypair: Keypair | None) -> None:
        if keypair is not None:
            self.device._forget_index(keypair.local_index)
            keypair.zero()

    def zero_keys(self) -> None:
        """Every session and the handshake in progress, forgotten (key zeroing; a removed peer; a new device key)."""
        for keypair in (self.previous, self.current, self.next):
            self._drop_keypair(keypair)
        self.previous = self.current = self.next = None
        self.device._forget_index(self.handshake.local_index)
        self.handshake.clear()

    # -- timers -----------------------------------------------------------------------------------------------

    def _jitter(self) -> float:
        return int.from_bytes(self.device._random(4), "little") / 2**32 * REKEY_TIMEOUT_JITTER_MAX

    def _timers_data_sent(self, now: float) -> None:
        if self.new_handshake_at is None:
            self.new_handshake_at = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter()

    def _timers_data_received(self, now: float) -> None:
        if self.send_keepalive_at is None:
            self.send_keepalive_at = now + KEEPALIVE_TIMEOUT
        else:
            self.need_another_keepalive = True

    def _timers_any_authenticated_packet_sent(self) -> None:
        self.send_keepalive_at = None

    def _timers_any_authenticated_packet_received(self) -> None:
        self.new_handshake_at = None

    def _timers_handshake_initiated(self, now: float) -> None:
        self.retransmit_handshake_at = now + REKEY_TIMEOUT + self._jitter()

    def _timers_handshake_complete(self, now: float) -> None:
        self.retransmit_handshake_at = None
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False
        self.last_handshake_wall = self.device.wall(now)

    def _timers_session_derived(self, now: float) -> None:
        self.zero_key_material_at = now + ZERO_KEY_MATERIAL_AFTER

    def _timers_any_authenticated_packet_traversal(self, now: float) -> None:
        if self.persistent_keepalive:
            self.persistent_keepalive_at = now + self.persistent_keepalive

    def next_deadline(self) -> float | None:
        due = [t for t in (getattr(self, name) for name in TIMERS) if t is not None]
        return min(due) if due else None

    def tick(self, now: float) -> tuple[list[bytes], float | None]:
        """Fire every timer that is due at ``now``; the datagrams to send to ``endpoint``, and the next deadline."""
        out: list[bytes] = []
        if self.retransmit_handshake_at is not None and now >= self.retransmit_handshake_at:
            self.retransmit_handshake_at = None
            if self.handshake_attempts > MAX_TIMER_HANDSHAKES:  # give up: drop what waited for it
                self.handshakes["timed_out"] += 1
                self.send_keepalive_at = None
                self.staged.clear()
                if self.zero_key_material_at is None:
                    self.zero_key_material_at = now + ZERO_KEY_MATERIAL_AFTER
            else:
                self.handshake_attempts += 1
                out.extend(self._send_handshake_initiation(now, retry=True))
        if self.send_keepalive_at is not None and now >= self.send_keepalive_at:
            self.send_keepalive_at = None
            out.extend(self.keepalive(now))
            if self.need_another_keepalive:
                self.need_another_keepalive = False
                self.send_keepalive_at = now + KEEPALIVE_TIMEOUT
        if self.new_handshake_at is not None and now >= self.new_handshake_at:
            self.new_handshake_at = None
            out.extend(self._send_handshake_initiation(now, retry=False))
        if self.persistent_keepalive_at is not None and now >= self.persistent_keepalive_at:
            self.persistent_keepalive_at = None
            if self.persistent_keepalive:
                out.extend(self.keepalive(now))
        if self.zero_key_material_at is not None and now >= self.zero_key_material_at:
            self.zero_key_material_at = None
            self.zero_keys()
        return out, self.next_deadline()

    @property
    def has_session(self) -> bool:
        return self.current is not None and self.current.send is not None

    def handshake_in_progress(self) -> bool:
        return self.handshake.state is State.INITIATION_CREATED

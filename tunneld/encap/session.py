"""Per-peer sessions: the part of a codec that keeps state about one peer.

A codec (``Encapsulator``) is the mode: its options, its wire format, what it declares to the engine. A
``Session`` is what the codec keeps about ONE peer: sequence numbers (GRE's RFC 2890 window), and for keyed
codecs keys, counters, replay windows and timers. The engine holds one session per peer (``Peer.session``)
and asks ``codec.session(peer_id)`` for it when the peer is added; the session goes with the peer.

Sessions are sans-IO, like the codec (cloudflare/boringtun's ``Tunn`` is the model): bytes and the time come in
(``now``, from the engine's clock, which tests replace), verdicts and the codec's own packets go out. A session
never touches a socket, a clock or a logger.

  seal(buf, start, end, now)  outbound: the inner frame is ``buf[start:end]``, with at least the codec's
                              ``header_room`` bytes free in front and ``tail_room`` bytes free behind. The
                              session writes its header in front and any trailer behind, in place, and returns
                              ``(start, end)`` of the packet to send; or a ``Drop``; or ``HELD``: it keeps the
                              frame (a keyed codec without keys yet) and will hand packets over through
                              ``poll``.
  open(packet, now)           inbound: one datagram as the transport delivered it. ``(offset, length)`` of the
                              inner frame inside ``packet`` (a trailer or padding may follow it); or a
                              ``Drop`` (counted by reason, never raised); or ``HELD``: a message of the codec's
                              own (a handshake, a keepalive) that carries no frame, is not a drop, and may have
                              given the session something to send (see ``deadline``).
  poll(now)                   the codec's own packets due now, each to go to this peer's endpoint as it is.
  close()                     the peer was removed: drop its keys and state (the engine's peer table calls it).
  set_frame_limit(limit)      the largest inner frame the path to this peer carries now (the engine's
                              ``segment_limit``): told when the session is made and whenever it changes. A
                              session that pads (WireGuard, to 16) never pads past it, so padding costs no MTU.
  deadline()                  when ``poll`` next has something to say (``math.inf``: never). A session that
                              wants to answer at once (a handshake response) returns a time <= now; the
                              engine asks ``deadline`` after it used the session and keeps one timer at the
                              earliest deadline of all.

Rows (a declared capability of the codec, ``Encapsulator.rows``; the engine never probes for it): a codec whose
sessions can seal many frames at once says so, and the engine then takes the offload path for its codec (TUN super-frames cut into
rows by the segmenter, sealed datagrams sent with UDP_SEGMENT):
  seal_rows(rows, rowlen, count, out, now)
                              outbound: ``count`` inner frames back to back in ``rows``, ``rowlen`` bytes each
                              (the last may be shorter: ``len(rows)`` says). The session seals them, in order,
                              into ``out``, one datagram every ``stride`` bytes (the last maybe shorter), and
                              returns ``(stride, end)``: ``out[:end]`` leaves as one UDP_SEGMENT send of
                              ``stride``. Or HELD: it took the frames one by one, as ``seal`` would (no keys yet),
                              and hands its packets over through ``poll``; or a Drop for them all.
A codec whose sessions seal rows opens them too: ``Encapsulator.rows`` declares both, and the codec's
``open_rows`` (a keyed codec's: the datagram names its peer) judges a read's datagrams in order, each
authenticated frame written into the engine's buffer right behind the one before, so that a flow's frames lie
packed for the coalescer. Each verdict holds as ``open``'s would (drops by reason, replay, roaming only on
authenticated ones).

``authenticates``: whether an accepted ``open`` proves who sent it (a MAC or an AEAD tag checked against this
peer's keys). Only then may the engine move the peer's endpoint to the datagram's source (roaming); a codec
that does not authenticate never moves a peer, so a spoofed source can never redirect a peer's traffic.

Stateless codecs (VXLAN, GRE without sequence numbers, plugins written for the header-only contract) need none
of this: ``Encapsulator.session`` hands every peer the one ``HeaderSession``, which seals with ``encap`` and
opens with ``decap``, and the engine keeps its batched fast path for them (``Encapsulator.stateful`` is False).
"""

from __future__ import annotations

import enum
import math


class Held(enum.Enum):
    """A datagram or frame the session took without a verdict of the usual kinds (see the module docstring)."""

    HELD = "held"


HELD = Held.HELD


class Answer:
    """A keyed codec's reply to a datagram that names no peer (``Encapsulator.identify``): ``packets`` go back to
    the datagram's source as they are (WireGuard's cookie reply under load), and ``drop``, when set, is the
    reason the datagram itself is counted under."""

    __slots__ = ("packets", "drop")

    def __init__(self, packets, drop=None) -> None:
        self.packets = tuple(packets)
        self.drop = drop


class Session:
    """One peer's state in a codec; the base is stateless and refuses nothing it is not asked about."""

    __slots__ = ()
    # Whether an accepted ``open`` proves the sender holds this peer's keys (then its source may become the
    # peer's endpoint). Header-only codecs prove nothing.
    authenticates = False

    def seal(self, buf: bytearray, start: int, end: int, now: float):
        """Write the header (and trailer) around ``buf[start:end]``: ``(start, end)`` of the packet, a Drop,
        or HELD."""
        raise NotImplementedError

    def open(self, packet: memoryview, now: float):
        """Judge one datagram: ``(offset, length)`` of its inner frame, a Drop, or HELD."""
        raise NotImplementedError

    def seal_rows(self, rows: memoryview, rowlen: int, count: int, out: memoryview, now: float):
        """Seal ``count`` frames of ``rowlen`` bytes (the last maybe shorter) into ``out``: ``(stride, end)``, a
        Drop, or HELD. Asked only of a session that declares ``rows``."""
        raise NotImplementedError

    def poll(self, now: float) -> list[bytes]:
        """The codec's own packets for this peer that are due at ``now`` (a keepalive, a handshake)."""
        return []

    def deadline(self) -> float:
        """When ``poll`` next has packets (``math.inf``: never)."""
        return math.inf

    def close(self) -> None:
        """The peer left the table: forget what is kept about it (keys). A session is not used after this."""

    def set_frame_limit(self, limit: int) -> None:
        """The largest inner frame the engine sends through this session from now on (padding stays within it)."""


class HeaderSession(Session):
    """The session of a stateless codec, shared by all its peers: ``encap`` and ``decap`` as they are. It is
    also the shim that keeps plugins written for the header-only contract working unchanged."""

    __slots__ = ("_encap", "_decap")

    def __init__(self, codec) -> None:
        self._encap = codec.encap
        self._decap = codec.decap

    def seal(self, buf: bytearray, start: int, end: int, now: float):
        start = self._encap(buf, start, end)
        return start if start.__class__ is not int else (start, end)

    def open(self, packet: memoryview, now: float):
        offset = self._decap(packet)
        return offset if offset.__class__ is not int else (offset, len(packet) - offset)

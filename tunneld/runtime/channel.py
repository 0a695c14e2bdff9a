"""What the parent (worker 0) and a forked worker say to each other, and the one channel that carries it.

Messages are dataclasses, one per thing said (after h11's ``_events.py``): a reader dispatches on the type,
and a field added to a message is added in one place. Which side sends what:
  worker → parent: Ready once its engine is attached; StatsReport(seq, stats, cpu) in answer to a request;
    Learnt(entries) with the MACs its FDB learnt (workers agree on the FDB).
  parent → worker: StatsRequest(seq); Apply(...) on reload or a control request; Learnt(entries) from the
    others; Stop.

Underneath, one SOCK_SEQPACKET socketpair per worker. Both ends are this program, forked from one process, so
a message is simply pickled (pickle's trust and version questions do not arise). A pickle can be larger than
one record may be (a StatsReport of a thousand peers is ~60 KB; the kernel refuses a record larger than the
socket's send buffer), so a message travels in pieces:
  - each record is a one-byte flag (MORE: another piece of this message follows; LAST) and at most PIECE_MAX
    bytes of the pickle. One sender per end and one queue, so pieces of two messages never interleave.
  - The sender queues a message's pieces whole (all or none: nothing half-queued ever reaches the other end)
    and writes what the socket takes; the rest waits for the socket to drain (``attach``: a writer callback
    on the event loop; without a loop, the next send or receive). A full socket and the kernel's transient
    ENOBUFS mean "later", never "the worker is gone"; EMSGSIZE (a send buffer smaller than a piece) cuts the
    piece in two. Only a reset or closed socket means gone.
  - The queue is bounded: ``send`` (what must arrive: Apply, Stop) raises BlockingIOError while more than
    QUEUE_MAX bytes wait (a worker that has not read for a long time); ``offer`` (what may be lost: a
    StatsRequest, a report, Learnt) returns False, counted in ``dropped``, while more than OFFER_MAX wait, so
    best-effort messages always leave room for the ones that must arrive.
  - The reader joins the pieces, at most MESSAGE_MAX bytes per message: a larger one (or one that does not
    unpickle) is refused, counted in ``refused`` and logged, and reading resumes with the next message.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import pickle
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Union

from tunneld.datapath.peers import PeerSpec
from tunneld.datapath.stats import Stats

log = logging.getLogger("tunneld")

PIECE_MAX = 32 * 1024  # pickle bytes per record: well under the default unix send buffer (~208 KiB)
MORE, LAST = b"\x01", b"\x00"  # a record's first byte: whether another piece of the same message follows
PIECE_MIN = 512  # EMSGSIZE below this is no transient state of the socket: the peer is unusable
MESSAGE_MAX = 16 << 20  # bytes of one joined message; a StatsReport of MAX_PEERS (4096) peers is ~0.5 MB
QUEUE_MAX = 8 << 20  # bytes waiting to be written beyond which ``send`` refuses (the reader has stopped)
OFFER_MAX = 1 << 20  # ... and beyond which ``offer`` drops best-effort messages, leaving room for ``send``
DRAIN_MAX = 64  # records read per wake-up: bounded, so a chatty end cannot hold the loop
DROP_LOG_EVERY = 60.0  # seconds between log lines about dropped best-effort messages


@dataclass(frozen=True)
class Ready:
    """The worker has attached its engine: its queue and socket are served."""


@dataclass(frozen=True)
class StatsRequest:
    """Send your counters; ``seq`` numbers the request."""

    seq: int


@dataclass(frozen=True)
class StatsReport:
    """The answer to StatsRequest(seq): the worker's counters and the CPU seconds (user + system) it has used."""

    seq: int
    stats: Stats
    cpu: float


@dataclass(frozen=True)
class Apply:
    """Live changes (a reload, the control socket), already applied by worker 0; a field left None or empty
    is unchanged.

    ``peers_set``: peers added or changed, upserted by address (an unchanged peer keeps its counters and
    learnt MACs; a changed one gets its new name, routes and static MACs). ``peers_removed``: addresses whose
    peer, FDB entries and routes are flushed. ``peer``: a one-peer tunnel's peer replaced by another (a reload):
    the link's default destination changes, codec state learnt from the old peer is forgotten, and the table
    becomes that one peer, with its spec from ``peers_set``."""

    peer: str | None = None
    log_level: str | None = None
    peers_set: tuple[PeerSpec, ...] = ()
    peers_removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return (self.peer is not None or self.log_level is not None or bool(self.peers_set)
                or bool(self.peers_removed))


LEARNT_MAX = 1000  # entries per Learnt message: ~30 bytes each pickled, one PIECE_MAX record


@dataclass(frozen=True)
class Learnt:
    """MACs a worker learnt (or saw move) since its last such message: (MAC, peer address) pairs. Worker →
    parent, which learns them in worker 0 and passes them on to the other workers; worker 0's own go to every
    other worker. Sent a few times a second at most, never per packet; a full channel drops one (the frames
    to those MACs flood until the next)."""

    entries: tuple[tuple[bytes, str], ...]


@dataclass(frozen=True)
class Stop:
    """Detach and exit with status 0."""


Message = Union[Ready, StatsRequest, StatsReport, Apply, Learnt, Stop]


class Channel:
    """One end of a worker's control socket. Non-blocking once ``setblocking(False)``; never raises on receive."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.dropped = 0  # best-effort messages not queued (the queue held more than OFFER_MAX, or the end is gone)
        self.refused = 0  # messages received but refused (larger than MESSAGE_MAX, or not a message)
        self._out: deque[bytes] = deque()  # records waiting for the socket, whole messages only
        self._queued = 0  # their bytes
        self._parts: list[bytes] = []  # the pieces of the message being received
        self._size = 0  # their bytes
        self._skipping = False  # the message being received is refused: read its pieces to its LAST, keep none
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writing = False  # a writer callback is registered
        self._drop_logged = float("-inf")

    @classmethod
    def pair(cls) -> tuple["Channel", "Channel"]:
        """(parent's end, worker's end)."""
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(a), cls(b)

    def fileno(self) -> int:
        return self.sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def settimeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Write what the socket could not take as soon as it drains, from ``loop``'s writer callback."""
        self._loop = loop
        self._flush()

    def detach(self) -> None:
        if self._loop is not None and self._writing:
            self._loop.remove_writer(self.fileno())
        self._writing = False
        self._loop = None

    @property
    def queued(self) -> int:
        """Bytes waiting for the socket."""
        return self._queued

    def send(self, message: Message) -> None:
        """Queue ``message`` and write what the socket takes. Raises BlockingIOError while more than QUEUE_MAX
        bytes wait (the other end is not reading), OSError when the other end is gone."""
        if self._queued > QUEUE_MAX:
            self._flush()
            if self._queued > QUEUE_MAX:
                raise BlockingIOError(errno.EAGAIN, f"{self._queued} bytes wait for the other end to read")
        self._enqueue(message)
        if not self._flush():
            raise ConnectionResetError(errno.ECONNRESET, "the other end is gone")

    def offer(self, message: Message) -> bool:
        """``send`` for what may be lost, leaving a failure to the other side's timeouts: False (counted in
        ``dropped``) if more than OFFER_MAX bytes wait already, or the other end is gone."""
        if self._queued > OFFER_MAX:
            self._flush()
        if self._queued > OFFER_MAX:
            self._drop(message, "the other end is not reading")
            return False
        self._enqueue(message)
        if not self._flush():
            self._drop(message, "the other end is gone")
            return False
        return True

    def _drop(self, message: Message, why: str) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._drop_logged >= DROP_LOG_EVERY:  # a flood must not flood the log too
            self._drop_logged = now
            log.warning("control channel: %s not sent, %s (%d best-effort messages dropped so far)",
                        type(message).__name__, why, self.dropped)

    def _enqueue(self, message: Message) -> None:
        data = memoryview(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        pieces = range(0, len(data), PIECE_MAX) if data else [0]
        for at in pieces:
            flag = MORE if at + PIECE_MAX < len(data) else LAST
            record = flag + data[at : at + PIECE_MAX]
            self._out.append(record)
            self._queued += len(record)

    def _flush(self) -> bool:
        """Write waiting records until the socket is full; False if the other end is gone."""
        out = self._out
        while out:
            record = out[0]
            try:
                self.sock.send(record)
            except (BlockingIOError, InterruptedError, TimeoutError):
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # the kernel is short of memory for a moment: try again later
                    break
                if e.errno == errno.EMSGSIZE and len(record) > PIECE_MIN:  # a send buffer smaller than a piece
                    half = 1 + (len(record) - 1) // 2
                    out[0] = MORE + record[1:half]
                    out.insert(1, record[:1] + record[half:])
                    self._queued += 1
                    continue
                out.clear()  # gone: nothing queued will ever be read
                self._queued = 0
                self._want_writer(False)
                return False
            out.popleft()
            self._queued -= len(record)
        self._want_writer(bool(out))
        return True

    def _want_writer(self, want: bool) -> None:
        if self._loop is None or want == self._writing:
            return
        if want:
            self._loop.add_writer(self.fileno(), self._on_writable)
        else:
            self._loop.remove_writer(self.fileno())
        self._writing = want

    def _on_writable(self) -> None:
        self._flush()  # if the other end is gone, its reader sees the end (and a worker's pidfd says how)

    def receive(self) -> tuple[list[Message], bool]:
        """The messages waiting (whole ones; at most DRAIN_MAX records read), and whether the other end has
        closed (or is gone)."""
        if self._out:
            self._flush()
        got: list[Message] = []
        for _ in range(DRAIN_MAX):
            try:
                data = self.sock.recv(PIECE_MAX + 1)
            except (BlockingIOError, InterruptedError, TimeoutError):
                return got, False
            except OSError:
                data = b""
            if not data:
                return got, True
            message = self._join(data)
            if message is not None:
                got.append(message)
        return got, False

    def _join(self, record: bytes) -> Message | None:
        """Add one record to the message being received; the message once its LAST piece is in."""
        last = record[:1] != MORE
        if not self._skipping:
            self._size += len(record) - 1
            if self._size > MESSAGE_MAX:
                self._refuse(f"larger than {MESSAGE_MAX} bytes")
            else:
                self._parts.append(record[1:])
        if not last:
            return None
        if self._skipping:
            self._skipping = False
            return None
        data = b"".join(self._parts)
        self._parts, self._size = [], 0
        try:
            return pickle.loads(data)
        except Exception as e:  # not one of ours after all; the next record starts a new message
            self._refuse(f"not a message ({type(e).__name__})")
            self._skipping = False
            return None

    def _refuse(self, why: str) -> None:
        self.refused += 1
        self._parts, self._size, self._skipping = [], 0, True
        log.warning("control channel: a message was refused: %s (%d so far)", why, self.refused)

    def close(self) -> None:
        self.detach()
        self.sock.close()

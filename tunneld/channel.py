"""What the parent (worker 0) and a forked worker say to each other, and the one channel that carries it.

Messages are dataclasses, one per thing said (after h11's ``_events.py``): a reader dispatches on the type,
and a field added to a message is added in one place. Which side sends what:
  worker → parent: Ready once its engine is attached; StatsReport(seq, stats, cpu) in answer to a request;
    Learnt(entries) with the MACs its FDB learnt (workers agree on the FDB).
  parent → worker: StatsRequest(seq); Apply(...) on reload or a control request; Learnt(entries) from the
    others; Stop.

Underneath, one SOCK_SEQPACKET socketpair per worker, each message one pickled record: both ends are this
program, forked from one process, so pickle's trust and version questions do not arise, and a record
boundary per message means no framing of our own. The same ``Channel`` class is used by both ends.
"""

from __future__ import annotations

import pickle
import socket
from dataclasses import dataclass
from typing import Union

from tunneld.peers import PeerSpec
from tunneld.stats import Stats

MESSAGE_MAX = 1 << 16  # a record larger than this is cut; a Stats snapshot pickles to about 2 KB
DRAIN_MAX = 64  # records read per wake-up: bounded, so a chatty end cannot hold the loop


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


LEARNT_MAX = 1000  # entries per Learnt message: ~30 bytes each pickled, well within MESSAGE_MAX


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

    def send(self, message: Message) -> None:
        """Raises BlockingIOError when the socket is full (the other end is not reading), OSError when gone."""
        self.sock.send(pickle.dumps(message))

    def offer(self, message: Message) -> bool:
        """``send``, leaving a failure to the other side's timeouts: False if full or gone."""
        try:
            self.send(message)
        except OSError:
            return False
        return True

    def receive(self) -> tuple[list[Message], bool]:
        """The messages waiting (at most DRAIN_MAX), and whether the other end has closed (or is gone)."""
        got: list[Message] = []
        for _ in range(DRAIN_MAX):
            try:
                data = self.sock.recv(MESSAGE_MAX)
            except BlockingIOError:
                return got, False
            except OSError:
                data = b""
            if not data:
                return got, True
            got.append(pickle.loads(data))
        return got, False

    def close(self) -> None:
        self.sock.close()

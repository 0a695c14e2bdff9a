"""The forwarding database of an L2 overlay: inner MAC address → the peer behind it (Linux vxlan's FDB).

What flows through: every frame accepted from a peer teaches its source MAC (``learn``), every frame read
from the device asks for its destination MAC (``lookup``); a miss, a broadcast or a multicast is flooded to
every peer by the engine (head-end replication), as the kernel does with all-zero FDB entries.

What must stay true:
- Bounded: at most ``max_entries`` entries. Past it a new MAC is not learnt (``refused``) and frames to it
  flood; nothing is evicted to make room, so a storm of random source MACs from one peer costs one dict
  look-up per frame and no memory, and cannot push out the MACs other peers' traffic uses.
- O(1) per learn and per look-up; ageing (``expire``) walks the table from a timer, never per packet.
- Static entries (configured ``macs``) never age and are never overwritten by learning; a learnt MAC seen
  behind another peer moves (``moved``); a learnt MAC's time is the last time it was seen.
- Only unicast source MACs are learnt (a multicast or all-zero source is a forgery or a bug).

Pure: the peers are whatever objects the caller uses (the engine's live ``Peer``); no I/O, no clock (the
caller passes ``now``).
"""

from __future__ import annotations

import itertools

from typing import Generic, Hashable, Iterator, TypeVar

P = TypeVar("P", bound=Hashable)

DEFAULT_MAX_ENTRIES = 16384  # Linux vxlan has no default limit; 16384 MACs is a large L2 segment
DEFAULT_AGEING = 300.0  # seconds, Linux vxlan's default ageing
ZERO_MAC = bytes(6)


def mac_bytes(text: str) -> bytes:
    """``aa:bb:cc:dd:ee:ff`` → 6 bytes; ValueError (one line) for anything else."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"not a MAC address: {text!r}") from None


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class Entry(Generic[P]):
    __slots__ = ("peer", "seen", "static", "told")

    def __init__(self, peer: P, seen: float, static: bool, told: float = 0.0) -> None:
        self.peer = peer
        self.seen = seen  # when last learnt (for a static entry: when configured)
        self.static = static
        self.told = told  # when the other workers last heard of it (from us, or they told us)


class Counts:
    __slots__ = ("fdb_learnt", "fdb_moved", "fdb_refused")

    def __init__(self) -> None:
        self.fdb_learnt = self.fdb_moved = self.fdb_refused = 0


class Fdb(Generic[P]):
    """MAC (6 bytes) → peer. Its counters live in ``counters`` (anything with ``fdb_learnt``, ``fdb_moved``,
    ``fdb_refused``: the engine passes its Stats, so the counts travel with the others); they only grow and
    count what this FDB saw itself, not what another worker told it.

    ``fresh`` collects the MACs learnt or moved here since the last ``take_fresh`` (at most ``max_entries``):
    what a worker tells the others (workers agree on the FDB), never what it was told (``learn(remote=True)``)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, ageing: float = DEFAULT_AGEING,
                 counters=None) -> None:
        if max_entries < 1:
            raise ValueError(f"fdb_max must be at least 1, not {max_entries}")
        if ageing < 0:
            raise ValueError(f"fdb_ageing must be 0 (never) or more seconds, not {ageing}")
        self.max_entries = max_entries
        self.ageing = ageing
        self._entries: dict[bytes, Entry[P]] = {}
        self.table = self._entries  # read directly by the engine's outbound look-up (one dict get per frame)
        self.fresh: dict[bytes, P] = {}
        self.counters = counters if counters is not None else Counts()

    @property
    def learnt(self) -> int:
        return self.counters.fdb_learnt

    @property
    def moved(self) -> int:
        return self.counters.fdb_moved

    @property
    def refused(self) -> int:
        return self.counters.fdb_refused

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, mac: bytes) -> P | None:
        entry = self._entries.get(mac)
        return None if entry is None else entry.peer

    def learn(self, mac: bytes, peer: P, now: float, remote: bool = False) -> None:
        """``mac`` was seen as the source of a frame from ``peer`` at ``now``."""
        entry = self._entries.get(mac)
        if entry is not None:
            if entry.peer is peer or entry.peer == peer:
                entry.seen = now  # (a local refresh reaches the other workers from expire(), not per frame)
                if remote:
                    entry.told = now
                return
            if entry.static:
                return  # configured: a frame claiming it from elsewhere does not move it
            entry.peer = peer
            entry.seen = entry.told = now
            if not remote:
                self.counters.fdb_moved += 1
        else:
            if mac[0] & 1 or mac == ZERO_MAC:
                return  # a group or null source address is never learnt
            if len(self._entries) >= self.max_entries:
                if not remote:
                    self.counters.fdb_refused += 1
                return
            self._entries[mac] = Entry(peer, now, False, now)
            if not remote:
                self.counters.fdb_learnt += 1
        if not remote and len(self.fresh) < self.max_entries:
            self.fresh[mac] = peer

    def take_fresh(self, limit: int | None = None) -> dict[bytes, P]:
        """The MACs learnt or moved since the last take, oldest first: all of them, or the oldest ``limit``
        (the others stay for the next take)."""
        if limit is None or len(self.fresh) <= limit:
            fresh, self.fresh = self.fresh, {}
            return fresh
        macs = list(itertools.islice(self.fresh, limit))
        return {mac: self.fresh.pop(mac) for mac in macs}

    def add_static(self, mac: bytes, peer: P, now: float = 0.0) -> None:
        """A configured entry: replaces whatever the MAC had, never ages, counts towards the bound but is
        never refused (configuration is not input)."""
        self._entries[mac] = Entry(peer, now, True)

    def expire(self, now: float) -> int:
        """Remove learnt entries not seen for ``ageing`` seconds (0: never); how many went.

        Also passes on, through ``fresh``, the entries this worker refreshed since the others last heard of them,
        at most every ageing/3: a worker that only sends to a MAC (its frames from it arrive at another worker)
        would otherwise age it out while it is in use, and flood its traffic."""
        if not self.ageing:
            return 0
        limit = now - self.ageing
        retell = now - self.ageing / 3
        old = []
        fresh = self.fresh
        for mac, e in self._entries.items():
            if e.static:
                continue
            if e.seen < limit:
                old.append(mac)
            elif e.told < retell and e.seen > e.told and len(fresh) < self.max_entries:
                fresh[mac] = e.peer
                e.told = now
        for mac in old:
            del self._entries[mac]
        return len(old)

    def flush(self, peer: P, learnt: bool = True) -> int:
        """Remove ``peer``'s entries (only its static ones if not ``learnt``); how many went."""
        gone = [mac for mac, e in self._entries.items() if e.peer == peer and (learnt or e.static)]
        for mac in gone:
            del self._entries[mac]
        if learnt:  # what was learnt from it and not yet passed on goes too; its learnt entries stay otherwise
            for mac in [m for m, p in self.fresh.items() if p == peer]:
                del self.fresh[mac]
        return len(gone)

    def entries(self) -> Iterator[tuple[bytes, Entry[P]]]:
        return iter(list(self._entries.items()))

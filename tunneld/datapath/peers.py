"""Peers as configuration names them: one value per far end, whatever said so (flags, a file, the control
socket, later a registry).

A ``PeerSpec`` is what is *said* about a peer; the data path keeps its live state (counters, when it was last
heard, the FDB entries and routes that point at it) in its own tables, keyed by ``address``. Two specs with
the same address are the same peer: applying a new spec for a known address changes its name, routes or
static MACs and keeps its counters (SIGHUP, ``tunneld peer add`` of a known address).

The live side (``Peer``, ``PeerTable``) is the engine's: per peer its counters and where the link sends to;
the FDB (fdb.py) for L2 modes, the routes (routes.py) for L3 modes.

Pure: no I/O, stdlib only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tunneld.datapath.fdb import DEFAULT_AGEING, DEFAULT_MAX_ENTRIES, Fdb, mac_bytes
from tunneld.datapath.routes import Routes
from tunneld.datapath.stats import PeerStats, Stats

STATIC = "static"  # from the command line, the configuration file or the control socket
REGISTRY = "registry"  # from a membership registry (etcd)


@dataclass(frozen=True)
class PeerSpec:
    """One far end of the overlay.

    ``address``: its underlay IPv4/IPv6 address, canonical (``ipaddress`` text form), the peer's identity.
    ``name``: an operator's label for ``tunneld show``, or None.
    ``routes``: L3 modes (gre, TUN plugins): the inner prefixes reached through this peer, canonical CIDRs;
      inbound packets from it must come from one of them (WireGuard's AllowedIPs).
    ``macs``: L2 modes (vxlan, gretap, TAP plugins): static FDB entries, canonical lower-case ``aa:bb:..``.
    ``source``: who said so, STATIC or REGISTRY (shown by ``tunneld show``).
    """

    address: str
    name: str | None = None
    routes: tuple[str, ...] = ()
    macs: tuple[str, ...] = ()
    source: str = STATIC

    def label(self) -> str:
        """How logs and ``tunneld show`` name it: ``name (address)`` or the address alone."""
        return f"{self.name} ({self.address})" if self.name else self.address


# -- the live side: what the data path keeps per peer ----------------------------------------------------------

DEFAULT_ROUTES = ("0.0.0.0/0", "::/0")  # L3, one peer without routes: everything goes to it (as before issue 12)


NO_PATH_LIMIT = 65535  # a peer's max_frame until its path MTU is learnt: only the engine's own limit holds


class Peer:
    """A peer as the engine holds it: its spec, where the link sends to (``dest``, built once by the link),
    and its counters (``stats``, the ``PeerStats`` kept in the engine's Stats under its address).

    Its path, as the engine learns it while running (engine.py, "Path MTU"): ``pmtu``, the underlay path MTU
    the kernel reported towards it (0: none learnt yet), ``max_frame``, the largest inner frame that crosses
    that path (NO_PATH_LIMIT until learnt; ``Engine.segment_limit(peer)`` adds the engine's own limit), and
    ``pmtu_checked``, when the kernel was last asked."""

    __slots__ = ("spec", "address", "dest", "stats", "pmtu", "max_frame", "pmtu_checked")

    def __init__(self, spec: PeerSpec, dest: object, stats: PeerStats) -> None:
        self.spec = spec
        self.address = spec.address
        self.dest = dest
        self.stats = stats
        self.pmtu = 0
        self.max_frame = NO_PATH_LIMIT
        self.pmtu_checked = 0.0

    def __repr__(self) -> str:
        return self.spec.label()


class PeerTable:
    """The peers of one engine: by address (inbound: who sent this), the flood list, and for L2 the FDB, for
    L3 the routes. ``only`` is the peer every outbound packet goes to without a look-up: set when there is one
    peer and it would win every look-up (L2; L3 with routes covering everything), which keeps the one-peer
    path as cheap as before.

    ``destination(address)`` is the link's: it checks the address (family) and builds what its send takes.
    Changes are all-or-nothing: ``apply`` (which ``upsert``, ``remove`` and ``replace`` call) builds the final
    table once and raises ValueError (one line), changing nothing, when the link or the routes refuse it."""

    def __init__(self, *, l2: bool, stats: Stats, destination: Callable[[str], object],
                 fdb_max: int = DEFAULT_MAX_ENTRIES, fdb_ageing: float = DEFAULT_AGEING) -> None:
        self.l2 = l2
        self._stats = stats
        self._destination = destination
        self.by_address: dict[str, Peer] = {}
        self.all: tuple[Peer, ...] = ()
        self.fdb: Fdb[Peer] | None = Fdb(fdb_max, fdb_ageing, counters=stats) if l2 else None
        self.routes: Routes[Peer] = Routes()
        self.only: Peer | None = None

    def __len__(self) -> int:
        return len(self.by_address)

    def get(self, address: str) -> Peer | None:
        return self.by_address.get(address)

    def upsert(self, spec: PeerSpec, now: float = 0.0) -> Peer:
        """Add ``spec``'s peer, or give a known address its new name, routes and static MACs (its counters and
        learnt MACs stay)."""
        self.apply((spec,), (), now)
        return self.by_address[spec.address]

    def remove(self, address: str) -> Peer | None:
        """Forget the peer at ``address``: its FDB entries, routes and counters go; None if there is none."""
        peer = self.by_address.get(address)
        if peer is not None:
            self.apply((), (address,))
        return peer

    def replace(self, specs: "tuple[PeerSpec, ...] | list[PeerSpec]", now: float = 0.0) -> None:
        """Make the table hold exactly ``specs``."""
        keep = {s.address for s in specs}
        self.apply(specs, tuple(a for a in self.by_address if a not in keep), now)

    def check(self, upserts: "tuple[PeerSpec, ...] | list[PeerSpec]", removals: "tuple[str, ...]" = ()) -> None:
        """ValueError (one line) if ``apply(upserts, removals)`` would be refused; changes nothing."""
        self._plan(upserts, removals)

    def apply(self, upserts: "tuple[PeerSpec, ...] | list[PeerSpec]", removals: "tuple[str, ...]" = (),
              now: float = 0.0) -> None:
        """Removals, then upserts, as one change: judged against the final table, never an intermediate one (a
        route moving from one peer to another, or two peers swapping routes, is no conflict). ValueError (one
        line) if the final table would be refused; nothing has changed then. A known address keeps its counters
        and learnt MACs and gets its new name, routes and static MACs."""
        peers, routes, changed = self._plan(upserts, removals)
        for address in removals:  # from here on nothing raises
            gone = self.by_address.get(address)
            if gone is not None:
                self._stats.peers.pop(address, None)
                if self.fdb is not None:
                    self.fdb.flush(gone)
        for peer, spec, macs, known in changed:
            peer.spec = spec
            self._stats.peers[spec.address] = peer.stats
            if self.fdb is not None:
                if known:
                    self.fdb.flush(peer, learnt=False)  # its old static MACs; the learnt ones stay
                for mac in macs:
                    self.fdb.add_static(mac, peer, now)
        self.by_address = peers
        self.routes = routes
        self._settle()

    def _plan(self, upserts, removals):
        """The table after the change, built once: (peers by address, routes, [(peer, spec, static MACs, known)]);
        ValueError (one line) for what the link, the MAC syntax or the routes refuse."""
        peers = {a: p for a, p in self.by_address.items() if a not in removals}
        changed = []
        for spec in upserts:
            old = peers.get(spec.address)
            macs = [mac_bytes(m) for m in spec.macs] if self.l2 else []
            peer = old if old is not None else Peer(
                spec, self._destination(spec.address), self._stats.peers.get(spec.address) or PeerStats())
            peers[spec.address] = peer
            changed.append((peer, spec, macs, old is not None))
        specs = {a: p.spec for a, p in peers.items()}
        specs.update((spec.address, spec) for _, spec, _, _ in changed)
        return peers, self._routes(specs, peers), changed

    def _routes(self, specs: dict[str, PeerSpec], peers: dict[str, Peer]) -> "Routes[Peer]":
        """The routes the L3 data path uses for these peers; ValueError if two peers claim one prefix."""
        routes: Routes[Peer] = Routes()
        if self.l2:
            return routes
        if len(specs) == 1:
            (address, spec), = specs.items()
            for cidr in spec.routes or DEFAULT_ROUTES:
                routes.add(cidr, peers[address])
            return routes
        for address, spec in specs.items():
            for cidr in spec.routes:
                try:
                    routes.add(cidr, peers[address])
                except ValueError as e:
                    raise ValueError(f"peer {address}: {e}") from None
        return routes

    def _settle(self) -> None:
        self.all = tuple(self.by_address.values())
        only = None
        if len(self.all) == 1:
            peer = self.all[0]
            if self.l2 or sorted(self.routes.prefixes(peer)) == sorted(DEFAULT_ROUTES):
                only = peer
        self.only = only

    def routes_of(self, peer: Peer) -> list[str]:
        return self.routes.prefixes(peer)

"""Peers as configuration names them: one value per far end, whatever said so (flags, a file, the control
socket, later a registry).

A ``PeerSpec`` is what is *said* about a peer; the data path keeps its live state (counters, its codec
session, when it was last heard, the FDB entries and routes that point at it) in its own tables, keyed by
the peer's ``id``. Two specs with the same id are the same peer: applying a new spec for a known id changes
its name, routes or static MACs and keeps its counters and session (SIGHUP, ``tunneld peer add``).

A peer is known by who it is, not by where it is. Its id is its ``key`` where the codec names peers by a key
carried in their packets (``Encapsulator.keyed``), else its underlay address. Its ``endpoint`` (the underlay
address its packets come from and go to) and its ``port`` (None: the link's; a WireGuard peer's own) are
attributes, found through an index
(``PeerTable.by_endpoint``), and it may change: ``PeerTable.move``, which the engine calls only when the
peer's session has authenticated a packet from the new place (roaming). For address-named peers id and
endpoint are one and never move.

The live side (``Peer``, ``PeerTable``) is the engine's: per peer its counters, its codec session and where
the link sends to; the FDB (fdb.py) for L2 modes, the routes (routes.py) for L3 modes.

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

    ``address``: its underlay IPv4/IPv6 address, canonical (``ipaddress`` text form): where it is first sent
      to, and its identity unless it has a ``key``.
    ``name``: an operator's label for ``tunneld show``, or None.
    ``routes``: L3 modes (gre, TUN plugins): the inner prefixes reached through this peer, canonical CIDRs;
      inbound packets from it must come from one of them (WireGuard's AllowedIPs).
    ``macs``: L2 modes (vxlan, gretap, TAP plugins): static FDB entries, canonical lower-case ``aa:bb:..``.
    ``source``: who said so, STATIC or REGISTRY (shown by ``tunneld show``).
    ``key``: its identity for a keyed codec (the value its packets carry that names it), or None.
    ``port``: the underlay port it listens on when not the tunnel's own (WireGuard: each end picks its own
      listen port), or None: the tunnel's port.
    """

    address: str
    name: str | None = None
    routes: tuple[str, ...] = ()
    macs: tuple[str, ...] = ()
    source: str = STATIC
    key: str | None = None
    port: int | None = None

    @property
    def id(self) -> str:
        """What the peer tables key it by: its key, or its address."""
        return self.key if self.key is not None else self.address

    def label(self) -> str:
        """How logs and ``tunneld show`` name it: ``name (address)`` or the address alone."""
        return f"{self.name} ({self.address})" if self.name else self.address


# -- the live side: what the data path keeps per peer ----------------------------------------------------------

DEFAULT_ROUTES = ("0.0.0.0/0", "::/0")  # L3, one peer without routes: everything goes to it


NO_PATH_LIMIT = 65535  # a peer's max_frame until its path MTU is learnt: only the engine's own limit holds


class Peer:
    """A peer as the engine holds it: its spec, its ``id`` (the key of the tables), its ``endpoint`` (the
    underlay address it is reached at now) and ``port`` (None: the tunnel's) and where the link sends to (``dest``, built once per endpoint by
    the link), its codec ``session`` (tunneld/encap/session.py) and its counters (``stats``, the ``PeerStats``
    kept in the engine's Stats under its id).

    Its path, as the engine learns it while running (engine.py, "Path MTU"): ``pmtu``, the underlay path MTU
    the kernel reported towards it (0: none learnt yet), ``max_frame``, the largest inner frame that crosses
    that path (NO_PATH_LIMIT until learnt; ``Engine.segment_limit(peer)`` adds the engine's own limit), and
    ``pmtu_checked``, when the kernel was last asked."""

    __slots__ = ("spec", "id", "endpoint", "port", "dest", "session", "stats", "pmtu", "max_frame", "pmtu_checked")

    def __init__(self, spec: PeerSpec, dest: object, stats: PeerStats, session: object = None) -> None:
        self.spec = spec
        self.id = spec.id
        self.endpoint = spec.address
        self.port = spec.port
        self.dest = dest
        self.session = session
        self.stats = stats
        self.pmtu = 0
        self.max_frame = NO_PATH_LIMIT
        self.pmtu_checked = 0.0

    @property
    def address(self) -> str:
        """Where it is now: its endpoint's address."""
        return self.endpoint

    def __repr__(self) -> str:
        return self.spec.label()


def _no_session(peer_id: str) -> None:
    return None


class PeerTable:
    """The peers of one engine: by id, by endpoint (inbound, for codecs that do not name the peer: who sent
    this), the flood list, and for L2 the FDB, for L3 the routes. ``only`` is the peer every outbound packet
    goes to without a look-up: set when there is one peer and it would win every look-up (L2; L3 with routes
    covering everything), which keeps the one-peer path free of look-ups.

    ``destination(address, port)`` is the link's: it checks the address (family) and builds what its send takes
    (port None: the tunnel's).
    ``session(peer_id)`` is the codec's: the state it keeps per peer, made once when the peer is added.
    Changes are all-or-nothing: ``apply`` (which ``upsert``, ``remove`` and ``replace`` call) builds the final
    table once and raises ValueError (one line), changing nothing, when the link or the routes refuse it."""

    def __init__(self, *, l2: bool, stats: Stats, destination: Callable[[str, int | None], object],
                 session: Callable[[str], object] = _no_session,
                 fdb_max: int = DEFAULT_MAX_ENTRIES, fdb_ageing: float = DEFAULT_AGEING) -> None:
        self.l2 = l2
        self._stats = stats
        self._destination = destination
        self._session = session
        self.by_id: dict[str, Peer] = {}
        self.by_endpoint: dict[str, Peer] = {}
        self.all: tuple[Peer, ...] = ()
        self.fdb: Fdb[Peer] | None = Fdb(fdb_max, fdb_ageing, counters=stats) if l2 else None
        self.routes: Routes[Peer] = Routes()
        self.only: Peer | None = None

    def __len__(self) -> int:
        return len(self.by_id)

    def get(self, peer_id: str) -> Peer | None:
        return self.by_id.get(peer_id)

    def upsert(self, spec: PeerSpec, now: float = 0.0) -> Peer:
        """Add ``spec``'s peer, or give a known id its new name, routes and static MACs (its counters, session
        and learnt MACs stay)."""
        self.apply((spec,), (), now)
        return self.by_id[spec.id]

    def remove(self, peer_id: str) -> Peer | None:
        """Forget the peer ``peer_id``: its FDB entries, routes, session and counters go; None if there is none."""
        peer = self.by_id.get(peer_id)
        if peer is not None:
            self.apply((), (peer_id,))
        return peer

    def replace(self, specs: "tuple[PeerSpec, ...] | list[PeerSpec]", now: float = 0.0) -> None:
        """Make the table hold exactly ``specs``."""
        keep = {s.id for s in specs}
        self.apply(specs, tuple(i for i in self.by_id if i not in keep), now)

    def check(self, upserts: "tuple[PeerSpec, ...] | list[PeerSpec]", removals: "tuple[str, ...]" = ()) -> None:
        """ValueError (one line) if ``apply(upserts, removals)`` would be refused; changes nothing."""
        self._plan(upserts, removals)

    def apply(self, upserts: "tuple[PeerSpec, ...] | list[PeerSpec]", removals: "tuple[str, ...]" = (),
              now: float = 0.0) -> None:
        """Removals (ids), then upserts, as one change: judged against the final table, never an intermediate one
        (a route moving from one peer to another, or two peers swapping routes, is no conflict). ValueError (one
        line) if the final table would be refused; nothing has changed then. A known id keeps its counters,
        session and learnt MACs and gets its new name, routes and static MACs."""
        peers, routes, changed = self._plan(upserts, removals)
        for peer_id in removals:  # from here on nothing raises
            gone = self.by_id.get(peer_id)
            if gone is not None:
                self._stats.peers.pop(peer_id, None)
                if self.fdb is not None:
                    self.fdb.flush(gone)
                if gone.session is not None and peer_id not in peers:
                    gone.session.close()  # its keys go with it (WireGuard); a peer re-added gets a new session
        for peer, spec, macs, known, dest in changed:
            if known and dest is not None:
                peer.endpoint, peer.port, peer.dest = spec.address, spec.port, dest
            peer.spec = spec
            self._stats.peers[spec.id] = peer.stats
            if self.fdb is not None:
                if known:
                    self.fdb.flush(peer, learnt=False)  # its old static MACs; the learnt ones stay
                for mac in macs:
                    self.fdb.add_static(mac, peer, now)
        self.by_id = peers
        self.routes = routes
        self._settle()

    def move(self, peer: Peer, endpoint: str, port: int | None = None) -> bool:
        """Roaming: ``peer`` is now at ``endpoint`` and ``port`` (None: the tunnel's) (its session authenticated
        a packet from there). False when it has not moved: the link cannot send there (another IP version), or
        it is where the peer was (its port, None for the tunnel's, now named: the next packet finds it there)."""
        try:
            dest = self._destination(endpoint, port)
        except ValueError:
            return False
        if endpoint == peer.endpoint and dest == peer.dest:
            peer.port = port
            return False
        if self.by_endpoint.get(peer.endpoint) is peer:
            del self.by_endpoint[peer.endpoint]
        peer.endpoint, peer.port, peer.dest = endpoint, port, dest
        self.by_endpoint[endpoint] = peer
        return True

    def _plan(self, upserts, removals):
        """The table after the change, built once: (peers by id, routes, [(peer, spec, static MACs, known, the
        new destination of a known peer told of a new address, else None)]);
        ValueError (one line) for what the link, the MAC syntax or the routes refuse."""
        peers = {i: p for i, p in self.by_id.items() if i not in removals}
        changed = []
        for spec in upserts:
            old = peers.get(spec.id)
            macs = [mac_bytes(m) for m in spec.macs] if self.l2 else []
            # A keyed peer told of a new address is sent there from now on (as `wg set ... endpoint` does).
            # Judged against where it is now: a peer that roamed and is told its old endpoint again goes back.
            moved = old is None or (old.endpoint, old.port) != (spec.address, spec.port)
            dest = self._destination(spec.address, spec.port) if moved else None
            peer = old if old is not None else Peer(
                spec, dest, self._stats.peers.get(spec.id) or PeerStats(), self._session(spec.id))
            peers[spec.id] = peer
            changed.append((peer, spec, macs, old is not None, dest))
        specs = {i: p.spec for i, p in peers.items()}
        specs.update((spec.id, spec) for _, spec, _, _, _ in changed)
        return peers, self._routes(specs, peers), changed

    def _routes(self, specs: dict[str, PeerSpec], peers: dict[str, Peer]) -> "Routes[Peer]":
        """The routes the L3 data path uses for these peers; ValueError if two peers claim one prefix."""
        routes: Routes[Peer] = Routes()
        if self.l2:
            return routes
        if len(specs) == 1:
            (peer_id, spec), = specs.items()
            # A keyed peer's routes are its allowed IPs, which say whom it may speak for: none means none (as
            # `wg set PEER` without allowed-ips), never everything; a configuration file gives it routes.
            for cidr in spec.routes or (DEFAULT_ROUTES if spec.key is None else ()):
                routes.add(cidr, peers[peer_id])
            return routes
        for peer_id, spec in specs.items():
            for cidr in spec.routes:
                try:
                    routes.add(cidr, peers[peer_id])
                except ValueError as e:
                    raise ValueError(f"peer {spec.address}: {e}") from None
        return routes

    def _settle(self) -> None:
        self.all = tuple(self.by_id.values())
        self.by_endpoint = {p.endpoint: p for p in self.all}
        only = None
        if len(self.all) == 1:
            peer = self.all[0]
            if self.l2 or sorted(self.routes.prefixes(peer)) == sorted(DEFAULT_ROUTES):
                only = peer
        self.only = only

    def routes_of(self, peer: Peer) -> list[str]:
        return self.routes.prefixes(peer)

"""The bridge between the etcd registry and the running tunnel: our record out, the others' records in as peers.

Flow:
  1. ``start`` (on the data path's loop, after any fork) writes our ``Record`` through control/etcd.Registry,
     whose thread watches the other hosts' records and judges them (control/registry.Membership).
  2. The thread hands each change to this loop (``deliver``); the changes queue here, in etcd's order, and
     at most REGISTRY_CHUNK are applied per turn of the loop, so a resync of a thousand hosts does not hold
     the data path.
  3. ``changes`` applies them through the control handlers (control/handlers.PeerControl), so that a host
     from etcd meets the rules a peer from a file or the control socket meets.

What must stay true: a static peer (flags, file, control socket) wins over a record for its address (and, in
a keyed mode, its key); a peer the tunnel refuses is logged and counted (``refused``), and the other hosts
still apply.

In a keyed mode (wireguard) our record carries our public key and listen port, never the private key (the codec
holds its bytes; nothing here reads them), and each peer is known by its key: removals are by id, and a
record's allowed IPs must not overlap any other peer's (WireGuard would split the traffic by longest prefix;
the registry does not let a record take part of a host's addresses).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

from tunneld import __version__
from tunneld.config.checks import check_disjoint
from tunneld.config.schema import ConfigError
from tunneld.control.handlers import PeerControl, Running
from tunneld.control.registry import Membership, Record, owner_id
from tunneld.datapath.peers import REGISTRY, PeerSpec
from tunneld.encap.wireguard import key_to_base64
from tunneld.io import SetupError
from tunneld.runtime.channel import Apply

log = logging.getLogger("tunneld")

# Registry peer changes applied per turn of the event loop. Each is one live Apply, whose checks and table build
# are linear in the peers: at 1,000 peers one costs ~0.6 ms (measured, 2-core machine), so 8 hold the data path
# ~5 ms, and a resync of a thousand hosts is spread over 125 turns.
REGISTRY_CHUNK = 8


class RegistryBridge:
    """Membership through etcd for one tunnel: ``start`` it once, on the data path's loop."""

    def __init__(self, tunnel: Running, peers: PeerControl) -> None:
        self.tunnel = tunnel
        self.peers = peers
        self.registry = None  # control/etcd.Registry, once started

    def start(self, loop: asyncio.AbstractEventLoop):
        """Register this host and follow the others (call on the data path's loop, after any fork)."""
        from tunneld.control.etcd import Registry

        tunnel = self.tunnel
        cfg, plan = tunnel.cfg, tunnel.plan
        l2 = tunnel.worker.engine.peers.l2
        public_key, port = self.identity()
        record = Record(cfg.local, cfg.mode, plan.vni, plan.mac if l2 else None, cfg.addresses, __version__,
                        round(time.time(), 3), owner_id(cfg.dev), public_key=public_key, port=port)
        membership = Membership(cfg.registry.hosts_prefix(), cfg.local, l2=l2, mode=cfg.mode, vni=plan.vni,
                                stats=tunnel.registry_stats, public_key=public_key, port=port)
        pending: collections.deque = collections.deque()  # (upserts, removals), in the order etcd said them

        def drain() -> None:
            # At most REGISTRY_CHUNK peer changes per turn of the loop: a resync of a thousand hosts must not hold
            # the data path for the whole of it. One queue keeps etcd's order (a join, then its leave).
            done = 0
            try:
                while pending and done < REGISTRY_CHUNK:
                    upserts, removals = pending.popleft()
                    self.changes(upserts, removals)
                    done += len(upserts) + len(removals)
            finally:  # whatever one change raised, the others still come (deliver only calls drain when idle)
                if pending:
                    loop.call_soon(drain)

        def deliver(upserts: tuple[PeerSpec, ...], removals: tuple[str, ...]) -> None:
            idle = not pending
            pending.extend(((), (address,)) for address in removals)
            pending.extend(((spec,), ()) for spec in upserts)
            if idle:
                drain()

        self.registry = Registry(cfg.registry, record, membership, loop=loop, deliver=deliver,
                                 stats=tunnel.registry_stats)
        log.info("registry: %s as %s", cfg.registry.describe(), cfg.local)
        self.registry.start()
        return self.registry

    def identity(self) -> tuple[str | None, int | None]:
        """(our public key in base64, our listen port) for a keyed codec's record, else (None, None). A keyed
        tunnel without a private key has nothing to register: ValueError, one line (serve stops with it)."""
        codec = self.tunnel.plan.codec
        if not getattr(codec, "keyed", False):
            return None, None
        public = getattr(getattr(codec, "wg", None), "public_key", None)
        if public is None:
            raise ValueError(f"mode {self.tunnel.cfg.mode} registers its public key: give it a private key "
                             "(--private-key FILE or tunnel.private_key)")
        return key_to_base64(public), self.tunnel.plan.port

    def changes(self, upserts: tuple[PeerSpec, ...], removals: tuple[str, ...]) -> None:
        """Hosts that joined, changed or left, as peers (``removals``: their ids). A static peer (flags, file,
        control socket) wins over a record for its address or key: the record is not applied, and its leaving
        does not remove the static peer. A peer the tunnel refuses is logged and counted (``refused``); the
        others still apply."""
        tunnel = self.tunnel
        stats = tunnel.registry_stats
        static = {spec.address for spec in tunnel.cfg.peers} | {spec.id for spec in tunnel.cfg.peers}
        table = tunnel.worker.engine.peers
        for peer_id in removals:
            peer = table.get(peer_id)
            if peer is not None and peer.spec.source == REGISTRY and peer_id not in static:
                # by id, through the same Apply as `tunneld peer remove`: a keyed peer's session is closed and
                # its keys zeroed (PeerTable.apply); registry peers are not in cfg.peers, so nothing else changes
                tunnel.apply(Apply(peers_removed=(peer.id,)))
                log.info("registry: host %s left", peer.spec.address)
        for spec in upserts:
            if spec.address in static or spec.id in static:
                continue
            known = table.get(spec.id) is not None
            try:
                if spec.key is not None:
                    check_disjoint(tuple(p.spec for p in table.all if p.id != spec.id), spec)
                self.peers.add_peer(spec)
            except (ConfigError, SetupError) as e:
                log.warning("registry: host %s not made a peer: %s", spec.address, e)
                stats.invalid["refused"] += 1
                continue
            except Exception:  # noqa: BLE001 - a bug here must cost one host, not the registry for good
                log.exception("registry: host %s not made a peer", spec.address)
                stats.invalid["refused"] += 1
                continue
            if not known:
                log.info("registry: host %s joined", spec.address)
        stats.peers = sum(1 for p in table.all if p.spec.source == REGISTRY)

"""What the control socket asks of a running tunnel: ``show``, ``peer add``, ``peer remove``.

``PeerControl`` is the handler that control/server.py serves (its ``Handler`` protocol) on worker 0's loop, and
the door the registry bridge (control/membership.py) goes through too, so that a peer from etcd meets the
same checks as one from an operator. It holds no state of its own: it reads the tunnel's tables and
counters, and changes them only through ``Running.apply`` (every worker, worker 0 first).

What must stay true:
  - A refused request changes nothing and raises ConfigError with one line: the same rules a configuration
    file gets (config/checks.py: ``check_joining``, ``check_on_host``), in the same words.
  - ``cfg`` (the running configuration) keeps the peers that came from a file, flags or this socket, never
    the registry's: a SIGHUP's diff is taken against it (runtime/service.py).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import time
from typing import Any, Protocol

from tunneld.config.schema import ConfigError, TunnelConfig
from tunneld.config.checks import check_fits, check_joining, check_on_host
from tunneld.control.registry import RegistryStats
from tunneld.control.server import Rows
from tunneld.datapath.fdb import mac_text
from tunneld.datapath.peers import REGISTRY, PeerSpec
from tunneld.datapath.stats import PeerStats, Stats
from tunneld.io import netlink
from tunneld.io.udp import UdpLink
from tunneld.observe.watch import WATCH_INTERVAL
from tunneld.runtime.channel import Apply

log = logging.getLogger("tunneld")

# ``tunneld show``: a peer is "up" when a valid packet from it arrived within this many seconds, "silent" when
# one arrived longer ago, "never" when none has. Three watch intervals: one lost look is not yet silence.
PEER_UP_WITHIN = 3 * WATCH_INTERVAL


class Running(Protocol):
    """What the handlers need of the tunnel (runtime/daemon.Tunnel; tests build one over fakes)."""

    cfg: TunnelConfig  # the running configuration: peer add/remove replace it
    plan: Any  # runtime/plan.Plan: vni, mtu, codec
    workers: int
    worker: Any  # runtime/worker.Worker, worker 0: its engine's peer table, link and codec
    registry_stats: RegistryStats | None

    def totals(self) -> Stats: ...

    def apply(self, changes: Apply) -> None: ...


def _endpoint(address: str, port: int | None) -> str:
    """``192.0.2.2:51820``, ``[2001:db8::2]:51820``: as ``wg show`` writes an endpoint."""
    if port is None:
        return address
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _wireguard_fields(peer, core, routes: list[str], port: int | None, now: float) -> dict:
    """What ``wg show`` says of a peer, from the WireGuard core (plain values, read now) and the peer table: its
    public key (the peer's id; public by design: no private or preshared key is ever read here), its endpoint as
    it is now (after roaming; ``port``: the peer's own, else the link's), the latest handshake, the transfer as WireGuard counts it
    (whole messages), its allowed IPs (the routes the data path checks) and the persistent keepalive."""
    handshake = core.last_handshake_wall
    return {
        "public_key": peer.id,
        "endpoint": _endpoint(peer.endpoint, port),
        "latest_handshake": handshake,
        "latest_handshake_age_s": None if handshake is None else round(max(0.0, now - handshake), 3),
        "transfer_rx_bytes": core.rx_bytes,
        "transfer_tx_bytes": core.tx_bytes,
        "allowed_ips": list(routes),
        "persistent_keepalive": core.persistent_keepalive,
        "handshakes": dict(core.handshakes),
    }


class PeerControl:
    """The control socket's handler over a running tunnel."""

    def __init__(self, tunnel: Running) -> None:
        self.tunnel = tunnel

    def show(self) -> dict:
        """What ``tunneld show --json`` prints (README "Many hosts"): the tunnel, each peer with its counters
        summed over the workers, and (L2 modes) the FDB as worker 0 holds it (all workers agree within 1 s).
        The peers and the FDB are ``Rows``: snapshots taken now, made into JSON objects a slice at a time as
        the control socket writes them, so that a full FDB never holds the data path's loop."""
        tunnel = self.tunnel
        cfg = tunnel.cfg
        table = tunnel.worker.engine.peers
        stats = tunnel.totals()
        now = time.time()

        def peer_row(peer) -> dict:
            spec = peer.spec
            ps = stats.peers.get(peer.id) or PeerStats()  # by id: a roaming peer's address moves
            age = max(0.0, now - ps.last_rx) if ps.last_rx else None
            entry = {
                "address": peer.address,
                "name": spec.name,
                "source": spec.source,
                "state": "never" if age is None else "up" if age <= PEER_UP_WITHIN else "silent",
                "last_rx_age_s": None if age is None else round(age, 3),
                "tx_packets": ps.tx_packets,
                "rx_packets": ps.rx_packets,
                "tx_bytes": ps.tx_bytes,
                "rx_bytes": ps.rx_bytes,
                "dropped": ps.dropped,
            }
            if not table.l2:
                entry["routes"] = table.routes_of(peer)  # as the data path uses them (one peer: everything)
            entry["macs"] = list(spec.macs)
            core = getattr(peer.session, "peer", None)  # WireGuard: the core's peer (encap/wireguard/peer.py)
            if core is not None:
                entry.update(_wireguard_fields(peer, core, entry["routes"], port if peer.port is None else peer.port,
                                               now))
            return entry

        def fdb_row(item) -> dict:
            mac, e = item
            return {"mac": mac_text(mac), "peer": e.peer.address, "static": e.static,
                    "age_s": round(max(0.0, now - e.seen), 3)}

        link = tunnel.worker.link
        port = link.port if isinstance(link, UdpLink) else None
        out = {
            "device": cfg.dev,
            "mode": cfg.mode,
            "vni": tunnel.plan.vni,
            "mtu": tunnel.plan.mtu,
            "listen_port": port,
            "workers": tunnel.workers,
            "peers": Rows(table.all, peer_row),  # table.all is a tuple: replaced, never changed in place
        }
        if table.fdb is not None:
            out["fdb"] = Rows(list(table.fdb.entries()), fdb_row)
            out["fdb_max"] = table.fdb.max_entries
        else:
            out["fdb_max"] = cfg.fdb_max
        out.update(fdb_learnt_total=stats.fdb_learnt, fdb_moved_total=stats.fdb_moved,
                   fdb_refused_total=stats.fdb_refused, flooded_packets_total=stats.flooded)
        rs = getattr(tunnel, "registry_stats", None)  # (tests build bare tunnels)
        if rs is not None:
            out["registry"] = {"endpoints": list(cfg.registry.endpoints), "prefix": cfg.registry.prefix,
                               "ttl": cfg.registry.ttl, "up": rs.up, "peers": rs.peers,
                               "invalid_records": dict(rs.invalid)}
        return out

    def add_peer(self, spec: PeerSpec) -> str | None:
        """Add a peer, or change a known one (its counters and learnt MACs stay). ConfigError (one line), and
        nothing changed, for what a configuration file would be refused for too (config/checks.py: check_fits,
        check_joining, check_on_host): routes in an L2 mode, MACs in an L3 mode, more than MAX_PEERS, an address,
        name, route or static MAC another peer has, another IP version, one of this host's own addresses. Returns a
        warning (one line, also logged) when the peer's path MTU is smaller than the device's MTU assumes:
        the device MTU is not changed live (every flow's MSS depends on it), so larger frames to that peer
        will not get through until a restart or a smaller ``mtu``."""
        tunnel = self.tunnel
        table = tunnel.worker.engine.peers
        check_fits(spec, not table.l2, tunnel.cfg.mode)
        others = tuple(p.spec for p in table.all if p.address != spec.address)  # registry peers included
        spec = check_joining(others, spec)
        check_on_host(spec.address, None, netlink.address_kind, netlink.is_own_address)
        warning = self._path_mtu_warning(spec.address)
        tunnel.apply(Apply(peers_set=(spec,)))
        if warning:
            log.warning("%s", warning)
        if spec.source != REGISTRY:  # the registry's peers are not the file's: a reload's diff leaves them alone
            # The running configuration says what runs, so that a SIGHUP's diff is taken against it: a reload
            # makes the peers what the file says (as `wg syncconf` does), whether or not they came through here.
            kept = tuple(p for p in tunnel.cfg.peers if p.address != spec.address)
            tunnel.cfg = dataclasses.replace(tunnel.cfg, peers=(*kept, spec))
        return warning

    def _path_mtu_warning(self, address: str) -> str | None:
        """A line when the underlay path towards ``address`` carries less than the device MTU plus overhead."""
        plan = self.tunnel.plan
        path_mtu = netlink.path_mtu(address)
        if path_mtu is None:
            return None  # no route yet: nothing known to compare (the start-up plan assumes the default too)
        inner = path_mtu - plan.codec.overhead(ipaddress.ip_address(address).version == 6)
        if inner >= plan.mtu:
            return None
        return (f"peer {address}: its path MTU {path_mtu} carries inner packets of at most {inner} "
                f"bytes, less than {self.tunnel.cfg.dev}'s MTU {plan.mtu}: larger ones to it will not get through; "
                "the device MTU is not changed live (restart, or set mtu)")

    def remove_peer(self, address: str) -> None:
        """Remove a peer: its FDB entries, routes and counters go; ConfigError (one line) for an unknown one. A
        keyed peer (WireGuard: known by its public key) is named by its address, as `tunneld show` lists it: the
        one configured or the one it roamed to."""
        tunnel = self.tunnel
        try:
            canonical = str(ipaddress.ip_address(address))
        except ValueError:
            raise ConfigError(f"not an IP address: {address!r}") from None
        peers = tunnel.worker.engine.peers
        peer = peers.get(canonical) or next(
            (p for p in peers.all if canonical in (p.endpoint, p.spec.address)), None)
        if peer is None:
            raise ConfigError(f"no peer {canonical} on {tunnel.cfg.dev}")
        tunnel.apply(Apply(peers_removed=(peer.id,)))
        tunnel.cfg = dataclasses.replace(tunnel.cfg, peers=tuple(p for p in tunnel.cfg.peers if p.id != peer.id))

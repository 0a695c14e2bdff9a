"""The control handler of a one-peer tunnel: ``tunneld show`` for today's data path, until the many-peers data
path (daemon.Tunnel's own ``show``/``add_peer``/``remove_peer``) replaces it.

Interim by design: the lead drops this module when daemon.Tunnel implements control.Handler. ``show()`` reads
what the one-peer data path has: the totals of every worker (as /metrics does), the peer, when it was last
heard. There is no FDB yet (L2 modes show an empty one and zero FDB counters) and no live peer changes:
``add_peer``/``remove_peer`` refuse in one line.
"""

from __future__ import annotations

import time

from tunneld.config import ConfigError
from tunneld.io.udp import UdpLink
from tunneld.peers import STATIC, PeerSpec
from tunneld.watch import SILENT_AFTER

FDB_MAX = 16384  # the many-peers default (SPEC12: TunnelConfig.fdb_max); shown until the FDB exists


class OnePeerHandler:
    """control.Handler over a daemon.Tunnel with one peer."""

    def __init__(self, tunnel) -> None:
        self.tunnel = tunnel

    def show(self) -> dict:
        tunnel, plan = self.tunnel, self.tunnel.plan
        stats = tunnel.totals()
        link = tunnel.resources.unit(0)[1]
        last = stats.peer_last_rx
        age = max(0.0, time.time() - last) if last else None
        peer = {
            "address": tunnel.worker.peer, "name": None, "source": STATIC,
            "state": "never" if age is None else "up" if age < SILENT_AFTER else "silent",
            "last_rx_age_s": None if age is None else round(age, 3),
            "tx_packets": stats.tx_packets, "rx_packets": stats.rx_packets,
            "tx_bytes": stats.tx_bytes, "rx_bytes": stats.rx_bytes, "dropped": stats.dropped,
        }
        l2 = plan.codec.device.value == "tap"
        peer["macs" if l2 else "routes"] = [] if l2 else ["0.0.0.0/0", "::/0"]
        out = {
            "device": tunnel.cfg.dev, "mode": tunnel.cfg.mode, "vni": plan.vni, "mtu": plan.mtu,
            "listen_port": link.port if isinstance(link, UdpLink) else None, "workers": plan.workers,
            "peers": [peer],
        }
        if l2:
            out["fdb"] = []
        out.update({"fdb_max": getattr(tunnel.cfg, "fdb_max", FDB_MAX), "fdb_learnt_total": 0,
                    "fdb_moved_total": 0, "fdb_refused_total": 0, "flooded_packets_total": 0})
        return out

    def add_peer(self, spec: PeerSpec) -> None:
        raise ConfigError("peer-add: this tunneld carries one peer; adding peers needs the many-peers data path")

    def remove_peer(self, address: str) -> None:
        raise ConfigError("peer-remove: this tunneld carries one peer; change it in the file and reload (SIGHUP)")

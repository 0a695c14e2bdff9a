"""The running ``--mode wireguard`` tunnel as WireGuard's userspace API sees it (``tunneld.control.wgapi.WgDevice``):
so that the stock ``wg show DEV`` (and ``wg showconf``) reach tunneld at /var/run/wireguard/DEV.sock.

What is read, at each ``get``: the codec's WireGuard core (its static key; per peer the preshared key, the
persistent keepalive, the latest handshake and the bytes it counted) and the engine's peer table (each peer's
endpoint as it is now, after roaming, and its routes: the allowed IPs). Nothing is copied ahead of time, so a
``get`` always reports the data path as it is.

``set`` is not served yet: ``commit`` refuses with EPERM and changes nothing (the configuration file and a
reload are the way to change a tunnel today).
"""

from __future__ import annotations

import errno
import ipaddress

from tunneld.control.wgapi import (
    Endpoint,
    InterfaceConfig,
    Key,
    PeerConfig,
    PeerStats,
    PrivateKey,
    UapiError,
    parse_allowed_ip,
)
from tunneld.encap.wireguard import key_from_base64


class EngineWgDevice:
    """``WgDevice`` over a WireGuard codec and the engine that carries it (one worker: the codec does not spread)."""

    def __init__(self, codec, engine, port: int) -> None:
        self.codec = codec
        self.engine = engine
        self.port = port

    def _endpoint(self, address: str, port: int | None) -> Endpoint:
        return Endpoint(ipaddress.ip_address(address), self.port if port is None else port)

    @property
    def config(self) -> InterfaceConfig:
        core = self.codec.wg
        private = None if core.static is None else PrivateKey(core.static.private_bytes())
        peers = {}
        for peer in self.engine.peers.all:
            wg = getattr(peer.session, "peer", None)
            if wg is None:
                continue
            key = Key(key_from_base64(peer.spec.id))
            psk = Key(wg.keys.preshared_key) if wg.has_preshared_key else None
            peers[key] = PeerConfig(public_key=key, preshared_key=psk, endpoint=self._endpoint(peer.endpoint, peer.port),
                                    persistent_keepalive=wg.persistent_keepalive,
                                    allowed_ips=tuple(parse_allowed_ip(r) for r in peer.spec.routes))
        return InterfaceConfig(private_key=private, listen_port=self.port, peers=peers)

    def commit(self, config: InterfaceConfig) -> None:
        raise UapiError(errno.EPERM, "set is not served yet: change the tunnel's configuration file and reload")

    def peer_stats(self, public_key: Key) -> PeerStats:
        wg = self.codec.wg.peers.get(public_key.raw)
        if wg is None:
            return PeerStats()
        engine_peer = next((p for p in self.engine.peers.all if getattr(p.session, "peer", None) is wg), None)
        handshake = wg.last_handshake_wall
        return PeerStats(last_handshake_ns=0 if handshake is None else int(handshake * 1e9),
                         rx_bytes=wg.rx_bytes, tx_bytes=wg.tx_bytes,
                         endpoint=None if engine_peer is None else self._endpoint(engine_peer.endpoint,
                                                                                  engine_peer.port))

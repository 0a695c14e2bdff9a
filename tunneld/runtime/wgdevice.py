"""The running ``--mode wireguard`` tunnel as WireGuard's userspace API sees it (``tunneld.control.wgapi.WgDevice``):
so that the stock ``wg show``, ``wg set``, ``wg setconf``, ``wg addconf`` and ``wg showconf`` reach tunneld at
/var/run/wireguard/DEV.sock, as they reach wireguard-go.

What is read, at each ``get``: the codec's WireGuard core (its static key; per peer the preshared key, the
persistent keepalive, the latest handshake and the bytes it counted), the engine's peer table (each peer's endpoint
as it is now, after roaming, and its routes: the allowed IPs) and the link (the port it listens on, its fwmark).
Nothing is copied ahead of time, so a ``get`` always reports the data path as it is.

What ``commit`` does with a ``set`` (wgapi.py has parsed it and applied it to a copy of ``config``: ``new`` is the
whole configuration wanted), in this order, so that a refusal comes before anything has changed:
  1. check: every peer as the engine's peer it becomes (``PeerSpec``: id = public key, address and port = its
     endpoint, routes = its allowed IPs) through the rules every other door uses (config/checks.py: the
     endpoint's address, ``check_on_host``; ``PeerTable.check``: routes, the socket's IP version). A refusal is
     UapiError EINVAL with that one line: ``wg`` prints it as its error, and nothing has changed;
  2. the link: fwmark (SO_MARK), then listen_port (the new socket is bound before the old one closes: a port in
     use is EADDRINUSE, nothing changed; 0: the kernel picks one, which ``get`` then reports);
  3. the private key (``Device.set_private_key``): a new key ends every session and handshake (their keys are
     zeroed), as wireguard-go does; the peer with our own new public key is gone from ``new`` already;
  4. the peers, through the one path the control socket and the registry use (``Tunnel.apply``:
     ``PeerTable.apply``, all or nothing): removed peers' sessions are closed and their keys zeroed; added and
     changed ones get their routes, endpoint, preshared key and persistent keepalive.
A peer without an endpoint is kept at the unspecified address with port 0: nothing is ever sent there (its
session has no endpoint: it starts no handshake) until the peer makes itself known with a handshake, which
moves it (roaming, on authenticated packets only), as in wireguard-go.

Keys never reach an error or a log line: refusals name a peer by its position in the request, not its key.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import time
from typing import Callable, Sequence

from tunneld.config.checks import check_on_host, check_peer, check_route
from tunneld.config.schema import ConfigError
from tunneld.control.wgapi import (
    ConfigDiff,
    Endpoint,
    InterfaceConfig,
    Key,
    PeerConfig,
    PeerStats,
    PrivateKey,
    UapiError,
    diff,
    network_text,
    parse_allowed_ip,
)
from tunneld.datapath.peers import PeerSpec
from tunneld.encap.wireguard import key_from_base64
from tunneld.io import LinkError, netlink

log = logging.getLogger("tunneld")

NO_ENDPOINT_PORT = 0  # a peer added without an endpoint: sent nowhere (sendto port 0 fails) until it roams

Apply = Callable[[Sequence[PeerSpec], Sequence[str]], None]  # upserts, removed ids; ValueError (one line) refuses


class EngineWgDevice:
    """``WgDevice`` over a WireGuard codec and the engine that carries it (one worker: the codec does not spread).

    ``apply(upserts, removals)`` changes the peers (the daemon's: ``Tunnel.apply``, every worker; without one,
    the engine's table directly); ``on_host(address)`` refuses an endpoint that is this host's own (ConfigError;
    the daemon's asks the kernel, tests may pass ``None``)."""

    def __init__(self, codec, engine, port: int, *, apply: Apply | None = None,
                 on_host: Callable[[str], None] | None = None, clock: Callable[[], float] = time.time,
                 published: bool = False) -> None:
        self.codec = codec
        self.engine = engine
        self._port = port
        # With a registry our record names our public key and listen port, written at start: a `set` may not
        # change them under it (the other hosts would keep sending to the old ones).
        self._published = published
        self._clock = clock
        self._apply = apply or (lambda upserts, removals: engine.peers.apply(tuple(upserts), tuple(removals),
                                                                             clock()))
        self._on_host = on_host

    @property
    def port(self) -> int:
        """The port the link listens on now (a ``wg set listen-port`` moves it)."""
        return getattr(self.engine.link, "port", self._port)

    def _endpoint(self, address: str, port: int | None) -> Endpoint | None:
        """A peer's endpoint as the UAPI writes it (``port`` None: the link's); None for a peer that has none
        yet."""
        endpoint = Endpoint(ipaddress.ip_address(address), self.port if port is None else port)
        if endpoint.port == NO_ENDPOINT_PORT and endpoint.address.is_unspecified:
            return None
        return endpoint

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
        return InterfaceConfig(private_key=private, listen_port=self.port,
                               fwmark=getattr(self.engine.link, "mark", 0), peers=peers)

    # -- set ---------------------------------------------------------------------------------------------------

    def commit(self, config: InterfaceConfig) -> None:
        old = self.config
        change = diff(old, config)
        upserts = [self._spec(config, key, n) for n, key in enumerate(config.peers, 1)
                   if key in change.added or key in change.changed]
        removals = [k.base64() for k in change.removed]
        try:
            self.engine.peers.check(upserts, removals)
        except ValueError as e:
            raise UapiError(errno.EINVAL, _without_keys(str(e), config)) from None
        if self._published and (change.private_key or (change.listen_port and config.listen_port != self.port)):
            raise UapiError(errno.EPERM, "private_key, listen_port: the registry publishes them; change the "
                                         "configuration and restart")
        self._link(config, change)
        if change.private_key:
            self.codec.wg.set_private_key(None if config.private_key is None else config.private_key.raw)
            log.info("wireguard: %s; every session starts again", self.codec.describe())  # the public key only
        if upserts or removals:
            try:
                self._apply(upserts, removals)
            except ValueError as e:  # checked above: only a worker's own refusal gets here
                raise UapiError(errno.EINVAL, _without_keys(str(e), config)) from None
        now = self._clock()
        for key in (*change.added, *change.changed):
            self._session_options(config.peers[key], key in change.added, now)
        if upserts or removals or change.private_key:
            self.engine.run_timers()  # a keepalive turned on leaves now; the timer is armed for what is next

    def _spec(self, config: InterfaceConfig, key: Key, n: int) -> PeerSpec:
        """Peer ``n`` of ``config`` as the engine's peer, checked by the rules every door uses (ConfigError ->
        UapiError EINVAL; the peer named by its position, never its key)."""
        peer = config.peers[key]
        what = f"peer {n}"
        try:
            routes = tuple(check_route(network_text(net), f"{what}: allowed_ip") for net in peer.allowed_ips)
            if peer.endpoint is None:
                unspecified = "::" if getattr(self.engine.link, "family", None) == socket.AF_INET6 else "0.0.0.0"
                return PeerSpec(unspecified, routes=routes, key=key.base64(), port=NO_ENDPOINT_PORT)
            address = check_peer(str(peer.endpoint.address), f"{what}: endpoint")
            if peer.endpoint.port == 0:
                raise ConfigError(f"{what}: endpoint: port 0 is no peer's port")
            if self._on_host is not None:
                self._on_host(address)
        except ConfigError as e:
            raise UapiError(errno.EINVAL, str(e)) from None
        return PeerSpec(address, routes=routes, key=key.base64(), port=peer.endpoint.port)

    def _link(self, config: InterfaceConfig, change: ConfigDiff) -> None:
        link = self.engine.link
        if change.fwmark:
            try:
                link.set_mark(config.fwmark)
            except (AttributeError, OSError) as e:
                raise UapiError(errno.EPERM, f"fwmark: {getattr(e, 'strerror', None) or 'not on this link'}") \
                    from None
        if change.listen_port and config.listen_port != self.port:
            if not hasattr(link, "rebind"):
                raise UapiError(errno.EOPNOTSUPP, "listen_port: this link cannot move")
            loop = asyncio.get_running_loop()
            self.engine.detach()  # the old socket's descriptor off the loop; the timer is armed again below
            try:
                port = link.rebind(config.listen_port)
            except LinkError as e:
                raise UapiError(errno.EADDRINUSE, str(e).partition("; pick")[0]) from None
            finally:
                self.engine.attach(loop)
            log.info("wireguard: listening on udp/%d", port)

    def _session_options(self, peer: PeerConfig, added: bool, now: float) -> None:
        """The preshared key, persistent keepalive and (for a peer that had none) the endpoint, on the peer's
        WireGuard session."""
        engine_peer = self.engine.peers.get(peer.public_key.base64())
        wg = getattr(getattr(engine_peer, "session", None), "peer", None)
        if wg is None:
            return
        wg.set_preshared_key(None if peer.preshared_key is None else peer.preshared_key.raw)
        if peer.endpoint is None:
            if added:
                wg.endpoint = None  # no initiation until it makes itself known
        elif wg.endpoint is None:
            wg.endpoint = engine_peer.id  # the engine sends to the peer's own endpoint; the core needs "somewhere"
        was = wg.persistent_keepalive
        wg.persistent_keepalive = peer.persistent_keepalive
        if not peer.persistent_keepalive:
            wg.persistent_keepalive_at = None
        elif not was and wg.endpoint is not None:
            wg.persistent_keepalive_at = now  # turning it on sends one at once, as wireguard-go does

    def peer_stats(self, public_key: Key) -> PeerStats:
        wg = self.codec.wg.peers.get(public_key.raw)
        if wg is None:
            return PeerStats()
        engine_peer = self.engine.peers.get(public_key.base64())
        handshake = wg.last_handshake_wall
        return PeerStats(last_handshake_ns=0 if handshake is None else int(handshake * 1e9),
                         rx_bytes=wg.rx_bytes, tx_bytes=wg.tx_bytes,
                         endpoint=None if engine_peer is None else self._endpoint(engine_peer.endpoint,
                                                                                  engine_peer.port))


def _without_keys(text: str, config: InterfaceConfig) -> str:
    """An engine's refusal names a peer by address; a keyed peer's id is its public key, which a line may carry:
    replaced by the peer's position (keys never reach an error, public ones included: one rule is easier)."""
    for n, key in enumerate(config.peers, 1):
        text = text.replace(key.base64(), f"peer {n}")
    return text


def host_check(address: str) -> None:
    """``check_on_host`` for an endpoint address, against this host's own addresses (ConfigError)."""
    check_on_host(address, None, netlink.address_kind, netlink.is_own_address)

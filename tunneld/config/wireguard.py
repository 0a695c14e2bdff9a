"""The wireguard mode's configuration from a tunnel's file and flags: the same model ``wg set`` edits.

What is read (the names follow ``wg set``'s ``private-key FILE`` and ``preshared-key FILE``):

    [tunnel]
    mode = "wireguard"
    private_key = "/etc/tunneld/wg0.key"       # a file holding the key as `wg genkey` prints it; mode 0600
    port = 51820                               # tunneld's key for the listen port (`wg set listen-port`)

    [[peer]]
    public_key = "base64 (44 characters)"      # required
    endpoint = "192.0.2.7:51820"               # optional; [2001:db8::7]:51820 for IPv6; numeric only
    allowed_ips = ["10.78.0.2/32", "fd78::2/128"]
    preshared_key = "/etc/tunneld/wg0-b.psk"   # optional: a file, mode 0600, as the private key
    persistent_keepalive = 25                  # optional; seconds, 0 or absent: off

(``fwmark`` is `wg set`'s alone: a tunnel's file refuses it. ``parse_interface`` also reads wg's own
``listen_port`` and ``fwmark``: the interface model of ``tunneld.control.wgapi``, which its tests build from
tables; the daemon reads a file through ``peer_specs`` and ``with_keys``.)

Everything here is pure parsing and checking (no socket, no device): a file's TOML tables in, an
``InterfaceConfig`` (``tunneld.control.wgapi``) out, or one ConfigError line. A key file whose mode lets its
group or others read it is refused, as is a key that is not one: a key is secret even when it is malformed, so
no error line quotes a key file's content. Checked here and not left to ``apply`` (which moves an allowed IP to
the last peer that claims it, as ``wg set`` does): in a file, a prefix given to two peers, a public key given
twice or the interface's own public key as a peer's are mistakes, and are refused.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from tunneld.config.schema import ConfigError
from tunneld.control.wgapi import (
    MAX_ALLOWED_IPS,
    MAX_PEERS,
    Endpoint,
    InterfaceConfig,
    Key,
    Network,
    PeerConfig,
    PrivateKey,
    UapiError,
    parse_allowed_ip,
)
from tunneld.datapath.peers import PeerSpec

MAX_KEY_FILE = 256  # bytes: a key file holds 44 characters and a newline
PEER_KEYS = frozenset({"public_key", "endpoint", "allowed_ips", "preshared_key", "persistent_keepalive"})
TUNNEL_KEYS = frozenset({"private_key", "listen_port", "fwmark"})  # the wireguard keys of [tunnel]


UNIT_CONFIG_DIR = "/etc/tunneld"  # where systemd/tunneld@.service finds NAME.toml, and the key files it hands over


def _credential(path: str) -> str | None:
    """The copy of key file ``path`` that systemd handed this process ($CREDENTIALS_DIRECTORY, LoadCredential=),
    if ``path`` lies in UNIT_CONFIG_DIR and a credential of the file's name holds more than the unit's default
    (a lone newline: no such file at start). The unit runs the daemon as a transient user, which may not open
    root's 0600 key files; systemd reads them as root and gives it copies only its user may read."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory or os.path.dirname(os.path.abspath(path)) != UNIT_CONFIG_DIR:
        return None
    copy = os.path.join(directory, os.path.basename(path))
    try:
        return copy if os.stat(copy).st_size > 1 else None
    except OSError:
        return None


def read_key_file(path: str, what: str = "private_key") -> Key:
    """The key in ``path`` (base64, as ``wg genkey`` writes it), refused unless only its owner may read it.
    A file we may not open is read from systemd's copy (``_credential``) when the unit passed one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except PermissionError as e:
        if (copy := _credential(path)) is None:
            hint = ""
            if os.environ.get("CREDENTIALS_DIRECTORY"):  # under systemd: say which files the unit hands over
                hint = (f" (the unit hands the daemon {UNIT_CONFIG_DIR}/NAME.key, and a file named in a "
                        "LoadCredential= of a drop-in, as credentials: docs/systemd.md)")
            raise ConfigError(f"{what}: {path}: {e.strerror}{hint}") from None
        try:
            fd = os.open(copy, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as e:
            raise ConfigError(f"{what}: {path} (systemd's credential {copy}): {e.strerror}") from None
    except OSError as e:
        raise ConfigError(f"{what}: {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)  # the file opened (a symlink's target), not a name looked at before: no swap in between
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what}: {path}: not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise ConfigError(f"{what}: {path} is mode {mode:04o}; a key file must be mode 0600 "
                              f"(chmod 600 {path})")
        data = os.read(fd, MAX_KEY_FILE + 1)
    finally:
        os.close(fd)
    try:
        if len(data) > MAX_KEY_FILE:
            raise ValueError
        return Key.from_base64(data.decode("ascii"), what)
    except ValueError:
        raise ConfigError(f"{what}: {path}: not a key (44 base64 characters, as `wg genkey` prints)") from None


def read_private_key(path: str) -> PrivateKey:
    return PrivateKey(read_key_file(path, "private_key").raw)


def _resolve(path: Any, base_dir: str, what: str) -> str:
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{what}: a file name, as a string")
    return os.path.join(base_dir, path)  # relative to the config file's directory; an absolute path stays


def _int(value: Any, bits: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise ConfigError(f"{what}: an integer from 0 to {(1 << bits) - 1}")
    return value


def parse_peer(table: Mapping[str, Any], base_dir: str = ".", what: str = "peer") -> PeerConfig:
    """One ``[[peer]]`` table of a wireguard tunnel."""
    unknown = sorted(set(table) - PEER_KEYS)
    if unknown:
        raise ConfigError(f"{what}: unknown key {unknown[0]!r} (a wireguard peer has {', '.join(sorted(PEER_KEYS))})")
    text = table.get("public_key")
    if not isinstance(text, str):
        raise ConfigError(f"{what}: public_key is required (base64, as `wg pubkey` prints)")
    try:
        public_key = Key.from_base64(text, f"{what}: public_key")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    endpoint = None
    if "endpoint" in table:
        if not isinstance(table["endpoint"], str):
            raise ConfigError(f"{what}: endpoint: ADDRESS:PORT or [IPV6]:PORT, as a string")
        try:
            endpoint = Endpoint.parse(table["endpoint"])
        except UapiError:
            raise ConfigError(f"{what}: endpoint {table['endpoint'][:80]!r}: not ADDRESS:PORT or [IPV6]:PORT "
                              "(numeric addresses only)") from None
    allowed = table.get("allowed_ips", [])
    if not isinstance(allowed, list) or not all(isinstance(a, str) for a in allowed):
        raise ConfigError(f"{what}: allowed_ips: a list of prefixes, e.g. [\"10.78.0.2/32\"]")
    if len(allowed) > MAX_ALLOWED_IPS:
        raise ConfigError(f"{what}: {len(allowed)} allowed_ips, more than {MAX_ALLOWED_IPS}")
    nets: list[Network] = []
    for a in allowed:
        try:
            net = parse_allowed_ip(a)
        except UapiError:
            raise ConfigError(f"{what}: allowed_ips: {a[:80]!r} is not ADDRESS/PREFIXLEN") from None
        if net in nets:
            raise ConfigError(f"{what}: allowed_ips: {net} given twice")
        nets.append(net)
    psk = None
    if "preshared_key" in table:
        psk = read_key_file(_resolve(table["preshared_key"], base_dir, f"{what}: preshared_key"),
                            f"{what}: preshared_key")
    keepalive = _int(table.get("persistent_keepalive", 0), 16, f"{what}: persistent_keepalive")
    return PeerConfig(public_key=public_key, preshared_key=psk, endpoint=endpoint,
                      persistent_keepalive=keepalive, allowed_ips=tuple(nets))


def parse_interface(tunnel: Mapping[str, Any], peers: Sequence[Mapping[str, Any]],
                    base_dir: str = ".") -> InterfaceConfig:
    """A wireguard tunnel's ``[tunnel]`` keys (only TUNNEL_KEYS are read; the rest are the tunnel's) and its
    ``[[peer]]`` tables. A tunnel may have no key and no peer yet: ``wg set`` gives them later."""
    private_key = None
    if "private_key" in tunnel:
        private_key = read_private_key(_resolve(tunnel["private_key"], base_dir, "private_key"))
    listen_port = _int(tunnel.get("listen_port", 0), 16, "listen_port")
    fwmark = _int(tunnel.get("fwmark", 0), 32, "fwmark")
    if len(peers) > MAX_PEERS:
        raise ConfigError(f"peer: {len(peers)} peers, more than {MAX_PEERS}")
    own = None if private_key is None else private_key.public_key()
    by_key: dict[Key, PeerConfig] = {}
    owner: dict[Network, int] = {}
    for n, table in enumerate(peers, 1):
        what = f"peer {n}"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{what}: a [[peer]] table")
        peer = parse_peer(table, base_dir, what)
        if peer.public_key == own:
            raise ConfigError(f"{what}: public_key is this interface's own (from private_key)")
        if peer.public_key in by_key:
            raise ConfigError(f"{what}: public_key is also peer {list(by_key).index(peer.public_key) + 1}'s")
        for net in peer.allowed_ips:
            if net in owner:
                raise ConfigError(f"{what}: allowed_ips: {net} is also peer {owner[net]}'s")
            owner[net] = n
        by_key[peer.public_key] = peer
    return InterfaceConfig(private_key=private_key, listen_port=listen_port, fwmark=fwmark, peers=by_key)


# -- ``--mode wireguard`` of tunneld: the [[peer]] tables as the engine's peers, the key files as the codec's --


def peer_specs(tables: Any, base_dir: str, port: int) -> tuple[tuple[PeerSpec, ...], dict[str, tuple]]:
    """A wireguard tunnel's [[peer]] tables as the engine's peers (id: the public key in base64; address: the
    endpoint's; routes: the allowed IPs, checked both ways by the engine) and the codec's per-peer options
    (``wg_peers``: public key -> (preshared key bytes or None, persistent keepalive)). ConfigError, one line.

    Each peer is sent to its endpoint (address and port, ``PeerSpec.port``). A file's peers need an endpoint;
    peers that wait to be contacted are added at run time with ``wg set`` (runtime/wgdevice.py). ``port``, the
    tunnel's own, is no longer a peer's constraint (kept for the callers)."""
    if not isinstance(tables, list) or not all(isinstance(t, Mapping) for t in tables):
        raise ConfigError("peer: [[peer]] tables, one per peer")
    if len(tables) > MAX_PEERS:
        raise ConfigError(f"peer: {len(tables)} peers, more than {MAX_PEERS}")
    specs: list[PeerSpec] = []
    options: dict[str, tuple] = {}
    for n, table in enumerate(tables, 1):
        what = f"peer[{n}]"
        peer = parse_peer(table, base_dir, what)
        public = peer.public_key.base64()
        if public in options:
            raise ConfigError(f"{what}: public_key is also another peer's")
        if peer.endpoint is None:
            raise ConfigError(f"{what}: endpoint is required (ADDRESS:PORT): tunneld does not yet wait for a "
                              "peer to make itself known")
        if peer.endpoint.port == 0:
            raise ConfigError(f"{what}: endpoint port 0 is no peer's port")
        specs.append(PeerSpec(str(peer.endpoint.address), routes=tuple(str(net) for net in peer.allowed_ips),
                              key=public, port=peer.endpoint.port))
        options[public] = (None if peer.preshared_key is None else peer.preshared_key.raw,
                           peer.persistent_keepalive)
    return tuple(specs), options


def with_keys(cfg):
    """``cfg`` (a wireguard TunnelConfig) with its private key file read: the codec gets the key's bytes, never
    a path or a text. ConfigError (one line, never the key) for a file that is missing, readable by others or
    not a key."""
    path = cfg.extra.get("private_key")
    if path is None or isinstance(path, bytes):
        return cfg
    key = read_private_key(str(path))
    return replace(cfg, extra={**cfg.extra, "private_key": key.raw})

"""WireGuard's cross-platform userspace API: what the stock ``wg`` speaks to a userspace WireGuard.

Theory of operation (the protocol: wireguard.com/xplatform; the reference: wireguard-go ``device/uapi.go``):
  - One unix stream socket per interface, ``/var/run/wireguard/NAME.sock``. ``wg`` finds an interface by that
    file alone: it stats it, connects (a connection that closes without a request: ``wg show interfaces`` and
    every ``wg show NAME`` make one first) and, if nothing listens, unlinks it. No netlink device is needed.
  - A connection carries operations, one after another. Each is an ``op=1`` line, ``key=value`` lines and a
    blank line; each reply is ``key=value`` lines ending ``errno=N`` and a blank line. N is 0 or a negated
    errno, as wireguard-go writes it (``errno=-22``: EINVAL for any bad key or value, ``-71``: EPROTO for a
    line with no ``=``). An unknown operation closes the connection without a reply, as wireguard-go does.
  - ``get=1``: the interface (``private_key``, ``listen_port``, ``fwmark``: each only when set) then per peer
    ``public_key``, ``preshared_key`` (zeros when none), ``protocol_version=1``, ``endpoint`` (when known),
    ``last_handshake_time_sec/nsec``, ``tx_bytes``, ``rx_bytes``, ``persistent_keepalive_interval`` and an
    ``allowed_ip`` per prefix. Keys are 32 bytes in lower-case hex. The live values (handshake, bytes, a
    roamed endpoint) come from the device (``WgDevice.peer_stats``).
  - ``set=1``: interface lines (``private_key``, ``listen_port``, ``fwmark``, ``replace_peers=true``), then a
    section per peer opened by its ``public_key`` (``remove``, ``update_only``, ``preshared_key``,
    ``endpoint``, ``persistent_keepalive_interval``, ``replace_allowed_ips``, ``allowed_ip``,
    ``protocol_version``). All of it is parsed and checked first (``SetParser`` -> ``SetRequest``), then
    applied to a copy of the model (``apply``) and handed to the device (``WgDevice.commit``) in one step: a
    request is taken whole or not at all. That is stricter than wireguard-go, which applies each line as it
    reads it and keeps what came before a bad one.
  - What ``apply`` keeps true, as wireguard-go and the kernel do: an allowed IP belongs to one peer (adding it
    to another moves it); private keys are clamped (Curve25519) when set; a peer with the interface's own
    public key is ignored, and setting a private key removes the peer that has its public key; an all-zero
    private or preshared key clears it.
  - Bounds, so that input cannot grow without limit: a line is at most MAX_LINE bytes, an operation at most
    MAX_REQUEST bytes (both refused with EMSGSIZE, then the connection is closed: nothing after it can be
    trusted to be in step), at most MAX_PEERS peers, MAX_ALLOWED_IPS prefixes per peer and MAX_TOTAL_ALLOWED_IPS in all (ENOSPC; wireguard-go
    stops at 2^16 peers with EINVAL). The server (``UapiServer``) serves at most MAX_CLIENTS connections and
    drops one that has not completed an operation within IDLE_TIMEOUT of connecting or of its previous one.
    Parsing a large ``set`` is spread over the reads (each read's lines are parsed before the next read is
    awaited); applying it and rendering a ``get`` are one step each (~0.2 s at the bounds, on this machine).
  - A key never reaches a log line, an exception's text or a repr (``Key.__repr__`` hides it); only ``get``
    replies carry them, on a socket only root (mode 0700 under umask 077, as wireguard-go) can open.

The module is sans-IO up to ``UapiSession`` (bytes in, reply bytes out, ``closed`` when the connection must end);
``UapiServer`` puts it on an asyncio unix socket. The same model is built from a tunnel's config file by
``tunneld.config.wireguard`` (a private-key file, ``[[peer]]`` tables).
"""

from __future__ import annotations

import asyncio
import binascii
import errno
import hmac
import ipaddress
import logging
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tunneld.io import unix

log = logging.getLogger("tunneld")

KEY_LEN = 32  # Curve25519 keys and preshared keys, in bytes
SOCKET_DIR = "/var/run/wireguard"  # where wireguard-tools looks (its RUNSTATEDIR); shared by all namespaces
MAX_LINE = 512  # bytes in a request line, newline included; the longest valid one (a scoped IPv6 endpoint) is < 100
MAX_REQUEST = 4 << 20  # bytes in one operation: ~60 000 allowed_ip lines
MAX_PEERS = 4096  # peers of one interface (tunneld's peer table holds as many); wireguard-go allows 2^16
MAX_ALLOWED_IPS = 1024  # prefixes per peer (tunneld's routes per peer)
MAX_TOTAL_ALLOWED_IPS = 65536  # prefixes of all peers together: a get reply stays ~3 MB, ~0.15 s to render
MAX_CLIENTS = 16  # connections served at once; one more is closed at once (`wg` makes one at a time)
IDLE_TIMEOUT = 10.0  # seconds a connection has to complete each operation (a trickle cannot hold a slot)
WRITE_TIMEOUT = 5.0  # seconds a reply may wait for a client that does not read
IFNAMSIZ = 16  # Linux's limit on an interface name, its NUL included

EINVAL, EPROTO, EMSGSIZE, ENOSPC, EIO = errno.EINVAL, errno.EPROTO, errno.EMSGSIZE, errno.ENOSPC, errno.EIO
EADDRINUSE = errno.EADDRINUSE  # a device's answer when it cannot bind the new listen_port


class UapiError(Exception):
    """A refused operation: ``errno`` (positive; the wire carries it negated) and a one-line reason that never
    contains a key."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code


# -- values ------------------------------------------------------------------------------------------------------

class Key:
    """32 bytes of key material: a public key, a preshared key or (``PrivateKey``) a private one. Compared in
    constant time; its repr and str never show it (public keys included: one rule is easier to keep)."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_LEN:
            raise ValueError(f"a key is {KEY_LEN} bytes, not {len(raw)}")
        self.raw = bytes(raw)

    @classmethod
    def from_hex(cls, text: str, what: str = "key") -> Key:
        if len(text) != 2 * KEY_LEN:
            raise UapiError(EINVAL, f"{what}: not {2 * KEY_LEN} hex digits")
        try:
            return cls(bytes.fromhex(text))
        except ValueError:
            raise UapiError(EINVAL, f"{what}: not {2 * KEY_LEN} hex digits") from None

    @classmethod
    def from_base64(cls, text: str, what: str = "key") -> Key:
        """The form ``wg genkey``/``wg pubkey`` print and wg config files hold (44 characters)."""
        text = text.strip()
        try:
            raw = binascii.a2b_base64(text.encode("ascii"), strict_mode=True) if len(text) == 44 else b""
        except (binascii.Error, UnicodeEncodeError):
            raw = b""
        if len(raw) != KEY_LEN:
            raise ValueError(f"{what}: not a base64 key of {KEY_LEN} bytes (as `wg genkey` prints)")
        return cls(raw)

    def hex(self) -> str:
        return self.raw.hex()

    def base64(self) -> str:
        return binascii.b2a_base64(self.raw, newline=False).decode("ascii")

    def is_zero(self) -> bool:
        return not any(self.raw)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and hmac.compare_digest(self.raw, other.raw)

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<hidden>)"

    __str__ = __repr__


class PrivateKey(Key):
    """A Curve25519 private key, clamped as the kernel and wireguard-go store it (what ``get`` shows)."""

    __slots__ = ()

    def __init__(self, raw: bytes) -> None:
        super().__init__(raw)
        clamped = bytearray(self.raw)
        clamped[0] &= 248
        clamped[31] = (clamped[31] & 127) | 64
        self.raw = bytes(clamped)

    def public_key(self) -> Key:
        return Key(X25519PrivateKey.from_private_bytes(self.raw).public_key().public_bytes_raw())


Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _addr_text(addr: Address) -> str:
    """An address as Go's netip prints it: IPv4-mapped IPv6 keeps its dotted quad (Python 3.11 does not)."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return f"::ffff:{addr.ipv4_mapped}" + (f"%{addr.scope_id}" if addr.scope_id else "")
    return str(addr)


@dataclass(frozen=True)
class Endpoint:
    """A peer's underlay address and UDP port: ``192.0.2.1:51820`` or ``[2001:db8::1]:51820`` on the wire."""

    address: Address
    port: int

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Go's ``netip.ParseAddrPort``, which wireguard-go uses: numeric only, IPv6 in brackets."""
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not port.isascii() or len(port) > 5 or int(port) > 0xFFFF:
            raise UapiError(EINVAL, "endpoint: not ADDRESS:PORT or [IPV6]:PORT")
        try:
            if host.startswith("[") and host.endswith("]"):
                address: Address = ipaddress.IPv6Address(host[1:-1])
            else:
                address = ipaddress.IPv4Address(host)
        except ValueError:
            raise UapiError(EINVAL, "endpoint: not ADDRESS:PORT or [IPV6]:PORT") from None
        return cls(address, int(port))

    def __str__(self) -> str:
        if self.address.version == 6:
            return f"[{_addr_text(self.address)}]:{self.port}"
        return f"{self.address}:{self.port}"


_PREFIX_LEN = re.compile(r"[0-9]{1,3}")


def parse_allowed_ip(text: str) -> Network:
    """``10.0.0.0/24`` or ``fd00::/64``; host bits are cleared, as the kernel's and wireguard-go's tries do."""
    addr, sep, bits = text.partition("/")
    if not sep or "%" in addr or not _PREFIX_LEN.fullmatch(bits):
        raise UapiError(EINVAL, "allowed_ip: not ADDRESS/PREFIXLEN")
    try:
        return ipaddress.ip_network((ipaddress.ip_address(addr), int(bits)), strict=False)
    except ValueError:
        raise UapiError(EINVAL, "allowed_ip: not ADDRESS/PREFIXLEN") from None


def network_text(net: Network) -> str:
    return f"{_addr_text(net.network_address)}/{net.prefixlen}"


# -- the model ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PeerConfig:
    public_key: Key
    preshared_key: Key | None = None
    endpoint: Endpoint | None = None
    persistent_keepalive: int = 0  # seconds; 0: off
    allowed_ips: tuple[Network, ...] = ()


@dataclass(frozen=True)
class InterfaceConfig:
    """One WireGuard interface's configuration. Never changed in place: ``apply`` returns a new one (so a
    device may keep the one it runs with while a request is being checked)."""

    private_key: PrivateKey | None = None
    listen_port: int = 0  # 0: none chosen (the device picks one)
    fwmark: int = 0  # 0: off
    peers: Mapping[Key, PeerConfig] = field(default_factory=dict)  # by public key, in the order they came

    @property
    def public_key(self) -> Key | None:
        return None if self.private_key is None else self.private_key.public_key()


@dataclass(frozen=True)
class PeerStats:
    """What the data path knows of a peer: the latest handshake (ns since the epoch, 0: none), bytes, and the
    endpoint it last heard the peer from (None: the configured one)."""

    last_handshake_ns: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    endpoint: Endpoint | None = None


NO_STATS = PeerStats()


class WgDevice(Protocol):
    """What the UAPI drives: the engine's WireGuard device, or ``MemoryDevice`` in tests."""

    @property
    def config(self) -> InterfaceConfig: ...

    def commit(self, config: InterfaceConfig) -> None: ...  # take it whole, or raise UapiError and keep the old

    def peer_stats(self, public_key: Key) -> PeerStats: ...


class MemoryDevice:
    """A device that is only its configuration: for tests, and for a tunnel before its data path exists."""

    def __init__(self, config: InterfaceConfig | None = None,
                 stats: Callable[[Key], PeerStats] | None = None) -> None:
        self.config = config or InterfaceConfig()
        self._stats = stats
        self.commits = 0

    def commit(self, config: InterfaceConfig) -> None:
        self.config = config
        self.commits += 1

    def peer_stats(self, public_key: Key) -> PeerStats:
        return self._stats(public_key) if self._stats else NO_STATS


# -- set=1 ---------------------------------------------------------------------------------------------------------

@dataclass
class PeerChange:
    """One peer section of a ``set``, checked; None: the line was absent (leave as is)."""

    public_key: Key
    remove: bool = False
    update_only: bool = False
    preshared_key: Key | None = None  # all zeros: clear
    endpoint: Endpoint | None = None
    persistent_keepalive: int | None = None
    replace_allowed_ips: bool = False
    allowed_ips: list[Network] = field(default_factory=list)


@dataclass
class SetRequest:
    private_key: Key | None = None  # a PrivateKey, or all zeros: clear
    listen_port: int | None = None
    fwmark: int | None = None
    replace_peers: bool = False
    peers: list[PeerChange] = field(default_factory=list)


def _uint(text: str, bits: int, what: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 10 or int(text) >= 1 << bits:
        raise UapiError(EINVAL, f"{what}: not an integer from 0 to {(1 << bits) - 1}")
    return int(text)


def _true(text: str, what: str) -> bool:
    if text != "true":  # wireguard-go takes "true" only; it is how `wg` says it
        raise UapiError(EINVAL, f"{what}: only 'true' is accepted")
    return True


_NAME = re.compile(r"[a-z0-9_]{1,32}")


def _shown(name: str) -> str:
    """A line's key *name* for an error or log line: only when it looks like one (a value sent as a name, a
    key in hex for one, must not reach the log)."""
    return repr(name) if _NAME.fullmatch(name) and not re.search(r"[0-9a-f]{16}", name) else f"({len(name)} characters)"


class SetParser:
    """A ``set=1`` operation's lines, fed one by one (without their newline); ``result()`` after the blank line.
    The first bad line decides the errno; the lines after it are still read (so the connection stays in step)
    but no longer checked."""

    def __init__(self) -> None:
        self.request = SetRequest()
        self.error: UapiError | None = None
        self._peer: PeerChange | None = None
        self._allowed_ips = 0

    def feed(self, line: str) -> None:
        if self.error is not None:
            return
        try:
            self._line(line)
        except UapiError as e:
            self.error = e

    def result(self) -> SetRequest:
        if self.error is not None:
            raise self.error
        return self.request

    def _line(self, line: str) -> None:
        key, sep, value = line.partition("=")
        if not sep:
            raise UapiError(EPROTO, "a line without '='")
        if key == "public_key":
            if len(self.request.peers) >= MAX_PEERS:
                raise UapiError(ENOSPC, f"more than {MAX_PEERS} peers in one request")
            self._peer = PeerChange(Key.from_hex(value, "public_key"))
            self.request.peers.append(self._peer)
        elif self._peer is None:
            self._interface_line(key, value)
        else:
            self._peer_line(self._peer, key, value)

    def _interface_line(self, key: str, value: str) -> None:
        req = self.request
        if key == "private_key":
            key = Key.from_hex(value, "private_key")
            req.private_key = key if key.is_zero() else PrivateKey(key.raw)  # zero: clear (before clamping)
        elif key == "listen_port":
            req.listen_port = _uint(value, 16, "listen_port")
        elif key == "fwmark":
            req.fwmark = _uint(value, 32, "fwmark")
        elif key == "replace_peers":
            req.replace_peers = _true(value, "replace_peers")
        else:
            raise UapiError(EINVAL, f"unknown interface key {_shown(key)}")

    def _peer_line(self, peer: PeerChange, key: str, value: str) -> None:
        if key == "remove":
            peer.remove = _true(value, "remove")
        elif key == "update_only":
            peer.update_only = _true(value, "update_only")
        elif key == "preshared_key":
            peer.preshared_key = Key.from_hex(value, "preshared_key")
        elif key == "endpoint":
            peer.endpoint = Endpoint.parse(value)
        elif key == "persistent_keepalive_interval":
            peer.persistent_keepalive = _uint(value, 16, "persistent_keepalive_interval")
        elif key == "replace_allowed_ips":
            peer.replace_allowed_ips = _true(value, "replace_allowed_ips")
            peer.allowed_ips.clear()  # replacing removes what this section added before, too
        elif key == "allowed_ip":
            self._allowed_ips += 1
            if self._allowed_ips > MAX_TOTAL_ALLOWED_IPS:
                raise UapiError(ENOSPC, f"more than {MAX_TOTAL_ALLOWED_IPS} allowed IPs in one request")
            peer.allowed_ips.append(parse_allowed_ip(value))
        elif key == "protocol_version":
            if value != "1":
                raise UapiError(EINVAL, "protocol_version: only 1 is known")
        else:
            raise UapiError(EINVAL, f"unknown peer key {_shown(key)}")


def parse_set(text: str) -> SetRequest:
    """The lines of a ``set=1`` operation (after ``set=1``, up to the blank line) as one checked request."""
    parser = SetParser()
    for line in text.split("\n"):
        if line == "":
            break
        parser.feed(line)
    return parser.result()


def apply(config: InterfaceConfig, req: SetRequest) -> InterfaceConfig:
    """The configuration after ``req``, in wireguard-go's order of effects; UapiError (ENOSPC) if it would
    exceed a bound, and then nothing of it is taken."""
    private_key, listen_port, fwmark = config.private_key, config.listen_port, config.fwmark
    peers: dict[Key, PeerConfig] = dict(config.peers)
    if req.private_key is not None:
        private_key = req.private_key if isinstance(req.private_key, PrivateKey) else None
    own = None if private_key is None else private_key.public_key()
    if own is not None:
        peers.pop(own, None)  # a peer with our own key could never complete a handshake: dropped, as wireguard-go
    if req.listen_port is not None:
        listen_port = req.listen_port
    if req.fwmark is not None:
        fwmark = req.fwmark
    if req.replace_peers:
        peers.clear()
    owner: dict[Network, Key] = {net: key for key, p in peers.items() for net in p.allowed_ips}

    for change in req.peers:
        key = change.public_key
        if own is not None and key == own:
            continue
        old = peers.get(key)
        if change.remove:
            if old is not None:
                del peers[key]
                for net in old.allowed_ips:
                    owner.pop(net, None)
            continue
        if old is None:
            if change.update_only:
                continue
            if len(peers) >= MAX_PEERS:
                raise UapiError(ENOSPC, f"an interface has at most {MAX_PEERS} peers")
            old = PeerConfig(key)
        psk = old.preshared_key
        if change.preshared_key is not None:
            psk = None if change.preshared_key.is_zero() else change.preshared_key
        ips = list(old.allowed_ips)
        if change.replace_allowed_ips:
            for net in ips:
                owner.pop(net, None)
            ips = []
        held = set(ips)
        for net in change.allowed_ips:
            if net in held:
                continue
            holder = owner.get(net)
            if holder is not None and holder != key:  # an allowed IP has one peer: it moves, as in the trie
                other = peers[holder]
                peers[holder] = replace(other, allowed_ips=tuple(n for n in other.allowed_ips if n != net))
            owner[net] = key
            ips.append(net)
            held.add(net)
        if len(ips) > MAX_ALLOWED_IPS:
            raise UapiError(ENOSPC, f"a peer has at most {MAX_ALLOWED_IPS} allowed IPs")
        if len(owner) > MAX_TOTAL_ALLOWED_IPS:
            raise UapiError(ENOSPC, f"an interface has at most {MAX_TOTAL_ALLOWED_IPS} allowed IPs")
        peers[key] = PeerConfig(
            public_key=key,
            preshared_key=psk,
            endpoint=change.endpoint if change.endpoint is not None else old.endpoint,
            persistent_keepalive=(change.persistent_keepalive if change.persistent_keepalive is not None
                                  else old.persistent_keepalive),
            allowed_ips=tuple(ips),
        )
    return InterfaceConfig(private_key=private_key, listen_port=listen_port, fwmark=fwmark, peers=peers)


# -- get=1 ---------------------------------------------------------------------------------------------------------

ZERO_KEY_HEX = "0" * (2 * KEY_LEN)


def render_get(config: InterfaceConfig, stats: Callable[[Key], PeerStats] = lambda key: NO_STATS) -> str:
    """The body of a ``get=1`` reply, in wireguard-go's order (its ``errno=0`` line and blank line not included)."""
    out: list[str] = []
    if config.private_key is not None:
        out.append(f"private_key={config.private_key.hex()}")
    if config.listen_port:
        out.append(f"listen_port={config.listen_port}")
    if config.fwmark:
        out.append(f"fwmark={config.fwmark}")
    for peer in config.peers.values():
        live = stats(peer.public_key)
        endpoint = live.endpoint or peer.endpoint
        out.append(f"public_key={peer.public_key.hex()}")
        out.append(f"preshared_key={peer.preshared_key.hex() if peer.preshared_key else ZERO_KEY_HEX}")
        out.append("protocol_version=1")
        if endpoint is not None:
            out.append(f"endpoint={endpoint}")
        sec, nsec = divmod(live.last_handshake_ns, 1_000_000_000)
        out.append(f"last_handshake_time_sec={sec}")
        out.append(f"last_handshake_time_nsec={nsec}")
        out.append(f"tx_bytes={live.tx_bytes}")
        out.append(f"rx_bytes={live.rx_bytes}")
        out.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
        out.extend(f"allowed_ip={network_text(net)}" for net in peer.allowed_ips)
    return "".join(line + "\n" for line in out)


def status(code: int) -> bytes:
    """A reply's last line and the blank line after it; ``code`` is a positive errno (0: success)."""
    return f"errno={-code}\n\n".encode()


# -- a connection, sans IO -----------------------------------------------------------------------------------------

class UapiSession:
    """One client connection's protocol: ``receive(data)`` returns the reply bytes to send (maybe none yet);
    ``eof()`` at the end of input; ``closed`` when the connection must be closed (after an unknown operation or
    an over-long line, as nothing after it can be trusted to be in step)."""

    def __init__(self, device: WgDevice) -> None:
        self.device = device
        self.closed = False
        self.operations = 0
        self._buf = bytearray()
        self._op: str | None = None  # "get" or "set" while one is being read
        self._set: SetParser | None = None
        self._size = 0

    def receive(self, data: bytes) -> bytes:
        if self.closed:
            return b""
        self._buf += data
        out = bytearray()
        while not self.closed:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) >= MAX_LINE:
                    out += self._refuse(UapiError(EMSGSIZE, f"a line longer than {MAX_LINE} bytes"))
                break
            if end + 1 > MAX_LINE:
                out += self._refuse(UapiError(EMSGSIZE, f"a line longer than {MAX_LINE} bytes"))
                break
            line = self._buf[:end].decode("latin-1")  # never fails; anything not ASCII fails its own check
            del self._buf[:end + 1]
            out += self._line(line, end + 1)
        return bytes(out)

    def eof(self) -> bytes:
        """The client shut its side: a ``set`` without its blank line is applied (as wireguard-go does at EOF)."""
        out = b""
        if not self.closed and self._op == "set":
            if self._buf:  # a last line without its newline (it fits MAX_LINE: receive() checked)
                self._set.feed(self._buf.decode("latin-1"))
                self._buf.clear()
            out = self._finish_set()
        self.closed = True
        return out

    def _refuse(self, error: UapiError) -> bytes:
        log.warning("wireguard uapi: refused: %s", error)
        self.closed = True
        return status(error.errno)

    def _line(self, line: str, size: int) -> bytes:
        if self._op is None:
            if line == "set=1":
                self._op, self._set, self._size = "set", SetParser(), 0
            elif line == "get=1":
                self._op = "get"
            else:
                log.warning("wireguard uapi: unknown operation %s; connection closed", _shown(line))
                self.closed = True
            return b""
        if self._op == "get":
            self._op = None
            self.operations += 1
            if line != "":
                return self._refuse(UapiError(EINVAL, "get=1 takes no arguments"))
            return self._get()
        self._size += size
        if self._size > MAX_REQUEST:
            return self._refuse(UapiError(EMSGSIZE, f"a set request longer than {MAX_REQUEST} bytes"))
        if line:
            self._set.feed(line)
            return b""
        return self._finish_set()

    def _get(self) -> bytes:
        try:
            return render_get(self.device.config, self.device.peer_stats).encode() + status(0)
        except Exception:  # a bug behind the device: this reply fails, the daemon stays
            log.exception("wireguard uapi: get failed")
            return status(EIO)

    def _finish_set(self) -> bytes:
        parser, self._op, self._set = self._set, None, None
        self.operations += 1
        try:
            old = self.device.config
            new = apply(old, parser.result())
            self.device.commit(new)
            log.debug("wireguard uapi: set: %s", change_summary(old, new))
        except UapiError as e:
            log.warning("wireguard uapi: set refused: %s", e)
            return status(e.errno)
        except Exception:
            log.exception("wireguard uapi: set failed")
            return status(EIO)
        return status(0)


# -- the socket ----------------------------------------------------------------------------------------------------

_IFNAME = re.compile(r"[A-Za-z0-9_=+.-]{1,15}")


def check_ifname(name: str) -> str:
    """An interface name Linux would take (IFNAMSIZ) that is also a safe file name."""
    if not _IFNAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"interface name {name[:40]!r}: 1 to {IFNAMSIZ - 1} of A-Z a-z 0-9 _ = + . -")
    return name


def socket_path(name: str, directory: str = SOCKET_DIR) -> str:
    return os.path.join(directory, f"{check_ifname(name)}.sock")


def _answers(path: str) -> bool:
    """Whether a process listens on the unix socket at ``path``. A connect to a unix socket never waits: the
    kernel answers at once (ECONNREFUSED: a file with no listener, left by a process that died)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    except ConnectionRefusedError:
        return False
    except OSError as e:
        return e.errno in (errno.EAGAIN, errno.EACCES, errno.EPERM)  # a full backlog is a live listener too
    finally:
        probe.close()


class UapiSocketError(Exception):
    """The socket cannot be had; the text is one line for the operator."""


def bind_uapi_socket(path: str) -> socket.socket:
    """A listening socket at ``path`` made under umask 077 (as wireguard-go: srwx------) in a directory made 0755,
    replacing a file left by a process that died; UapiSocketError if a live one answers there."""
    try:
        return unix.listen(path, umask=0o077, backlog=MAX_CLIENTS, live=_answers)
    except unix.NotASocket:
        raise UapiSocketError(f"WireGuard UAPI socket {path}: exists and is not a socket; remove it") from None
    except unix.Taken:
        raise UapiSocketError(f"WireGuard UAPI socket {path} is in use: another WireGuard serves this name") \
            from None
    except OSError as e:
        raise UapiSocketError(f"WireGuard UAPI socket {path}: {e.strerror}") from None


class UapiServer:
    """``/var/run/wireguard/NAME.sock`` for one device, served on the running event loop."""

    def __init__(self, name: str, device: WgDevice, *, directory: str = SOCKET_DIR,
                 max_clients: int = MAX_CLIENTS, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.path = socket_path(name, directory)
        self.device = device
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self.clients = 0
        self.refused = 0  # connections closed at once: MAX_CLIENTS were open
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        sock = bind_uapi_socket(self.path)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        try:
            self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        except BaseException:
            sock.close()
            self._unlink()
            raise
        log.debug("wireguard uapi socket at %s", self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._unlink()

    async def __aenter__(self) -> UapiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _unlink(self) -> None:
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:  # never remove a socket another process made since
                os.unlink(self.path)
        except OSError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.clients += 1
        try:
            if self.clients > self.max_clients:
                self.refused += 1
                return
            session = UapiSession(self.device)
            loop = asyncio.get_running_loop()
            done, deadline = 0, loop.time() + self.idle_timeout
            while not session.closed:
                if session.operations != done:  # an operation completed: the next one has its own time
                    done, deadline = session.operations, loop.time() + self.idle_timeout
                data = await asyncio.wait_for(reader.read(64 * 1024), max(0.0, deadline - loop.time()))
                reply = session.receive(data) if data else session.eof()
                if reply:
                    writer.write(reply)
                    await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (ConnectionError, asyncio.TimeoutError, asyncio.CancelledError):
            pass  # `wg show interfaces` connects and hangs up; a stuck client times out: both are ordinary
        except Exception:  # a bug of ours costs this one client, never the daemon
            log.exception("wireguard uapi: client dropped")
        finally:
            self.clients -= 1
            self._tasks.discard(task)
            writer.transport.abort() if writer.transport.get_write_buffer_size() else writer.close()


@dataclass(frozen=True)
class ConfigDiff:
    """What a commit changes, for a device to act on only that: a new private key (every session and the
    cookie secrets are stale), a new listen port or fwmark (rebind), and peers added, removed or changed
    (by public key; ``changed``: a preshared key, endpoint, keepalive or allowed IPs differ)."""

    private_key: bool
    listen_port: bool
    fwmark: bool
    added: tuple[Key, ...]
    removed: tuple[Key, ...]
    changed: tuple[Key, ...]


def diff(old: InterfaceConfig, new: InterfaceConfig) -> ConfigDiff:
    return ConfigDiff(
        private_key=old.private_key != new.private_key,
        listen_port=old.listen_port != new.listen_port,
        fwmark=old.fwmark != new.fwmark,
        added=tuple(k for k in new.peers if k not in old.peers),
        removed=tuple(k for k in old.peers if k not in new.peers),
        changed=tuple(k for k, p in new.peers.items() if k in old.peers and old.peers[k] != p),
    )


def change_summary(old: InterfaceConfig, new: InterfaceConfig) -> str:
    """A log line for a commit, with counts only (keys never reach a log)."""
    d = diff(old, new)
    return (f"peers {len(new.peers)} (+{len(d.added)} -{len(d.removed)} ~{len(d.changed)}), "
            f"private key {'changed' if d.private_key else 'kept'}, listen_port {new.listen_port}, "
            f"fwmark {new.fwmark}")


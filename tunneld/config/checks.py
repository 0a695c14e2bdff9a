"""The checks: one function per rule, each raising ConfigError with one line, "what: what is wrong; what is
allowed". A rule is stated here once and called from every place a value arrives: the configuration file
(config/loading.py), the command line (cli.py), the control socket (control/server.py) and the etcd registry's
records (control/registry.py), so that a value one of them refuses is refused by all, in the same words.

The peer rules: ``check_peer`` (an underlay address), ``check_name``, ``check_route``, ``check_static_mac``,
``check_public_key`` (ready for keyed modes), and ``check_spec`` for one peer whole; ``check_peers`` and
``check_joining`` for what involves several.

Everything that can be checked without touching the kernel is checked here, so that a bad value is reported
before any device or socket exists; ``check_on_host`` is the one that asks the running host.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
from dataclasses import replace
from typing import Callable

from tunneld.config.schema import (
    DEFAULT_DEV,
    DEFAULT_ROUTES,
    DEFAULT_RUNTIME_DIR,
    DF_CHOICES,
    IFNAMSIZ,
    MAX_FDB_AGEING,
    MAX_MACS_PER_PEER,
    MAX_NAME,
    MAX_PEERS,
    MAX_ROUTES_PER_PEER,
    MAX_WORKERS,
    SUN_PATH_MAX,
    ConfigError,
    TunnelConfig,
)
from tunneld.datapath.peers import PeerSpec
from tunneld.encap.base import DeviceKind

_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")  # fullmatch: "$" would let a trailing newline by
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


def check_ip(value: str, what: str) -> str:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(f"{what}: {value!r} is not an IPv4 or IPv6 address") from None
    if getattr(ip, "scope_id", None):
        raise ConfigError(f"{what}: {value!r} has a zone (%...); scoped link-local underlays are not supported, "
                          "use a global or unique-local address")
    return ip.compressed


def check_peer(value: str, what: str = "peer") -> str:
    """``peer``: an address that can be a remote host. What the address alone tells is checked here; whether it
    is one of this host's own is checked at start-up (``check_on_host``), where the interfaces can be read.

    Link-local IPv6 (fe80::/10) is refused with or without a zone: it means nothing without an interface, and
    the underlay sockets send to and compare peers by address alone."""
    peer = check_ip(value, what)
    ip = ipaddress.ip_address(peer)
    if ip.is_unspecified:
        raise ConfigError(f"{what}: {peer} is the unspecified address; name the far end's underlay address")
    if ip.is_loopback:
        raise ConfigError(f"{what}: {peer} is a loopback address: the tunnel would lead back to this host")
    if ip == ipaddress.IPv4Address("255.255.255.255"):
        raise ConfigError(f"{what}: {peer} is the broadcast address; name the far end's own address")
    if ip.is_multicast:
        raise ConfigError(f"{what}: {peer} is a multicast address; tunneld has no multicast mode, name one peer")
    _check_not_link_local(ip, what)
    return peer


def check_local(value: str, what: str = "local") -> str:
    """``local``: an address this host can send from (0.0.0.0 and :: mean "any", as leaving it out does).
    That it is one of this host's own is checked at start-up (``check_on_host``)."""
    local = check_ip(value, what)
    ip = ipaddress.ip_address(local)
    if ip.is_loopback:
        raise ConfigError(f"{what}: {local} is a loopback address: no remote peer can be reached from it")
    if ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise ConfigError(f"{what}: {local} is not a unicast address; name one of this host's addresses")
    _check_not_link_local(ip, what)
    return local


def _check_not_link_local(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, what: str) -> None:
    if ip.version == 6 and ip.is_link_local:
        raise ConfigError(f"{what}: {ip} is link-local (fe80::/10), which needs an interface; link-local "
                          "underlays are not supported: use a global or unique-local address")
    if ip.version == 6 and ip.ipv4_mapped is not None:
        raise ConfigError(f"{what}: {ip} is an IPv4-mapped address: write it as IPv4, {ip.ipv4_mapped}")


def check_on_host(peer: str, local: str | None, address_kind: Callable[[str], str | None],
                  is_own: Callable[[str], bool]) -> None:
    """What only the running host can tell: ``peer`` is not one of its own (or a broadcast) address, and
    ``local``, when given, is. ``address_kind(addr)`` is "local", "broadcast", "unicast" or None (no route),
    ``is_own(addr)`` whether this host has ``addr`` (tunneld.io.netlink.address_kind, is_own_address)."""
    kind = address_kind(peer)
    if kind == "local":
        raise ConfigError(f"peer: {peer} is an address of this host: the tunnel would lead back to itself")
    if kind == "broadcast":
        raise ConfigError(f"peer: {peer} is a broadcast address on this host's network; name the far end's address")
    if local is not None and not ipaddress.ip_address(local).is_unspecified and (
            not is_own(local) or address_kind(local) == "broadcast"):  # a broadcast address can be bound
        raise ConfigError(f"local: {local} is not an address of this host (see ip address); leave local out to "
                          "let the kernel choose")


def check_cidr(value: str) -> str:
    if "/" not in value:
        raise ConfigError(f"address: {value!r} needs a prefix length, e.g. 192.168.100.1/24 or fd00::1/64")
    try:
        return str(ipaddress.ip_interface(value))
    except ValueError:
        raise ConfigError(f"address: {value!r} is not an IPv4 or IPv6 address with a prefix length") from None


def check_dev(value: str) -> str:
    if not value or len(value.encode()) >= IFNAMSIZ or "/" in value or any(c.isspace() for c in value):
        raise ConfigError(
            f"dev: {value!r} is not a valid interface name (1-{IFNAMSIZ - 1} characters, no '/' or spaces)"
        )
    return value


def check_mac(value: str) -> str:
    if not _MAC.fullmatch(value):
        raise ConfigError(f"mac: {value!r} is not a MAC address like 02:00:00:00:00:01")
    if int(value[:2], 16) & 0x01:
        raise ConfigError(f"mac: {value!r} is a multicast address; an interface needs a unicast one")
    return value.lower()


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` or ``[IPv6]:PORT`` into (host, port); HOST is an IP address or a host name."""
    example = "e.g. 127.0.0.1:9477 or [::1]:9477, or an empty value to disable metrics"
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        try:
            if not sep or ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise ConfigError(f"metrics-listen: {value!r} is not [IPv6]:PORT ({example})") from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise ConfigError(f"metrics-listen: {value!r} is not HOST:PORT ({example})")
        if not host:
            raise ConfigError(
                f"metrics-listen: {value!r} names no address (every address: 0.0.0.0:{port_text} or [::]:{port_text})"
            )
        if ":" in host:
            raise ConfigError(f"metrics-listen: write an IPv6 address in brackets, e.g. [{host}]:{port_text}")
        if not _HOSTNAME.match(host):
            raise ConfigError(f"metrics-listen: {host!r} is not an IP address or a host name ({example})")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"metrics-listen: port {port_text!r} is not a number between 1 and 65535 ({example})")
    return host, int(port_text)


def check_listen(value: str) -> str:
    """Validate a ``metrics_listen`` value; return it normalised ("" stays "": metrics disabled)."""
    if not value:
        return ""
    host, port = parse_listen(value.strip())
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"{host}:{port}"
    return f"[{ip.compressed}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def check_range(value: int, what: str, low: int, high: int) -> int:
    if not low <= value <= high:
        raise ConfigError(f"{what}: {value} is out of range ({low}-{high})")
    return value


def check_choice(value: str, what: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{what}: {value!r} is not one of {', '.join(choices)}")
    return value


def check_df(value: str) -> str:
    return check_choice(value, "df", DF_CHOICES)


def check_workers(value: int | str) -> int | str:
    """``workers``: "auto" or a whole number of processes, 1-MAX_WORKERS."""
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ConfigError(f"workers: {value!r} is not 'auto' or a number of processes between 1 and {MAX_WORKERS}")
    return value


# -- a peer's rules ---------------------------------------------------------------------------------------------
#
# Each is called by every path a peer arrives by: a [[peer]] table or tunnel.peer (loading.py), --peer (cli.py),
# the control socket's peer-add (control/server.py) and a host's record in etcd (control/registry.py). ``what``
# is how the caller names the field; the text after it is the rule's, the same everywhere. The address's rule,
# ``check_peer``, sits above with the other address rules.

_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:@-]{{0,{MAX_NAME - 1}}}")
WG_KEY_BYTES = 32  # a Curve25519 public key (WireGuard's whitepaper, section 5.4)
WG_KEY_TEXT = 44  # its standard base64: 43 characters and one "="


def check_route(value: str, what: str = "routes") -> str:
    """An inner prefix routed to a peer (L3 modes): canonical, as ``ip route`` wants it (no host bits set)."""
    try:
        if "/" not in value:
            raise ValueError
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(f"{what}: {value!r} is not a prefix like 192.168.2.0/24 or fd00:2::/64 (one host: "
                          "192.168.2.7/32)") from None
    if net.network_address != ipaddress.ip_interface(value).ip:
        raise ConfigError(f"{what}: {value} has host bits set; the prefix is {net}")
    return str(net)


def check_static_mac(value: str, what: str = "macs") -> str:
    """A static FDB entry (L2 modes): one host's unicast MAC, lower case."""
    if not _MAC.fullmatch(value):
        raise ConfigError(f"{what}: {value!r} is not a MAC address like 02:00:00:00:00:01")
    if int(value[:2], 16) & 0x01 or value == "00:00:00:00:00:00":
        raise ConfigError(f"{what}: {value} is not a unicast address; broadcast, multicast and unknown MACs go "
                          "to every peer anyway")
    return value.lower()


def check_name(value: str, what: str = "name") -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ConfigError(f"{what}: {value!r} is not a peer name (1-{MAX_NAME} letters, digits and ._:@-, "
                          "starting with a letter or digit)")
    return value


def check_public_key(value: str, what: str = "public_key") -> str:
    """A WireGuard public key: the standard base64 of 32 bytes, as ``wg pubkey`` prints it, kept as given.

    The value is never repeated in the error: a private key pasted into the wrong field must not reach a log.
    Only the canonical text is taken (the last character's spare bits zero), so one key has one spelling and
    two peers with the same key are seen to be the same. All zeros is refused: no private key gives it, and a
    handshake with it would derive an all-zero shared secret."""
    rule = (f"{what}: not a WireGuard public key (the base64 of {WG_KEY_BYTES} bytes: {WG_KEY_TEXT} characters "
            "ending in '=', as wg pubkey prints it)")
    if not isinstance(value, str) or len(value) != WG_KEY_TEXT or not value.isascii():
        raise ConfigError(rule)
    try:
        raw = base64.b64decode(value, validate=True)
    except binascii.Error:
        raise ConfigError(rule) from None
    if len(raw) != WG_KEY_BYTES or base64.b64encode(raw).decode() != value:
        raise ConfigError(rule)
    if not any(raw):
        raise ConfigError(f"{what}: all zeros, which is no one's public key")
    return value


def check_fits(spec: PeerSpec, layer3: bool, mode: str) -> PeerSpec:
    """A peer against the mode's device: ``routes`` are for L3 modes (TUN), ``macs`` for L2 modes (TAP)."""
    if layer3 and spec.macs:
        raise ConfigError(f"peer {spec.address}: macs are static FDB entries of L2 modes; mode {mode!r} is L3 "
                          "(TUN): give the peer routes instead")
    if not layer3 and spec.routes:
        raise ConfigError(f"peer {spec.address}: routes are for L3 modes; mode {mode!r} is L2 (TAP), whose peers "
                          "are found by MAC (learnt, or static macs)")
    return spec


def check_spec(spec: PeerSpec, what: str = "peer") -> PeerSpec:
    """One peer on its own, canonical: its address (``check_peer``), name, routes and MACs, each list bounded
    and without repeats. What involves other peers is ``check_peers``'s."""
    address = check_peer(spec.address, what)
    where = f"peer {address}"
    name = check_name(spec.name, f"{where}: name") if spec.name is not None else None
    lists = []
    for key, check, cap in (("routes", check_route, MAX_ROUTES_PER_PEER),
                            ("macs", check_static_mac, MAX_MACS_PER_PEER)):
        items = getattr(spec, key)
        if len(items) > cap:
            raise ConfigError(f"{where}: {key}: {len(items)} given, at most {cap} per peer")
        done = tuple(check(item, f"{where}: {key}") for item in items)
        if len(set(done)) != len(done):
            twice = next(x for x in done if done.count(x) > 1)
            raise ConfigError(f"{where}: {key}: {twice} is given twice")
        lists.append(done)
    return PeerSpec(address, name, lists[0], lists[1], spec.source, spec.key, spec.port)  # a keyed peer keeps its id


def check_peers(peers: tuple[PeerSpec, ...], what: str = "peer") -> tuple[PeerSpec, ...]:
    """The peer list: each peer checked (``check_spec``), at most MAX_PEERS, no address, name, prefix or MAC
    given twice, and one address family (one underlay socket carries them all). The order is kept: the first
    peer names the tunnel where one name is needed (the stable MAC)."""
    if len(peers) > MAX_PEERS:
        raise ConfigError(f"{what}: {len(peers)} peers, more than {MAX_PEERS}")
    checked = tuple(check_spec(spec, what) for spec in peers)
    seen: dict[tuple[str, str], str] = {}  # (kind, value) -> the address of the peer that has it
    for spec in checked:
        if ("address", spec.address) in seen:
            raise ConfigError(f"{what}: {spec.address} is given twice")
        seen["address", spec.address] = spec.address
        _same_version(spec, checked[0].address, what)
        for claim in _claims(spec):
            if claim in seen:
                raise _taken(spec, claim, seen[claim])
            seen[claim] = spec.address
    return checked


def check_joining(others: tuple[PeerSpec, ...], spec: PeerSpec, what: str = "peer") -> PeerSpec:
    """``spec`` joining ``others`` (a live table's peers, each checked when it joined, none with spec's
    address): what check_peers would say of the whole list, for one peer's checks and one pass of look-ups
    over the others' names, routes and MACs. A live change (the control socket, the registry) pays this per
    peer; check_peers over the whole table per join made a registry's resync of N hosts cost N²."""
    if len(others) >= MAX_PEERS:
        raise ConfigError(f"{what}: {len(others) + 1} peers, more than {MAX_PEERS}")
    spec = check_spec(spec, what)
    if others:
        _same_version(spec, others[0].address, what)
    routes, macs = set(spec.routes), set(spec.macs)
    for other in others:  # plain attribute tests: at a thousand peers, a registry's resync does this a thousand times
        if ((spec.name and other.name == spec.name) or not routes.isdisjoint(other.routes)
                or not macs.isdisjoint(other.macs)):
            claim = next(c for c in _claims(spec) if c in set(_claims(other)))
            raise _taken(spec, claim, other.address)
    return spec


def _claims(spec: PeerSpec):
    """What a peer holds that no other may: its name, its routes, its static MACs, as (kind, value)."""
    if spec.name:
        yield "name", spec.name
    for route in spec.routes:
        yield "routes", route
    for mac in spec.macs:
        yield "macs", mac


def _taken(spec: PeerSpec, claim: tuple[str, str], holder: str) -> ConfigError:
    kind, value = claim
    return ConfigError(f"peer {spec.address}: {kind}: {value} is already given to peer {holder}")


def _same_version(spec: PeerSpec, first: str, what: str) -> None:
    if ipaddress.ip_address(spec.address).version != ipaddress.ip_address(first).version:
        raise ConfigError(f"{what}: {spec.address} and {first} are of different IP versions; one underlay "
                          "socket carries every peer: all IPv4 or all IPv6")


def fit_to_device(cfg: TunnelConfig, device: DeviceKind) -> TunnelConfig:
    """The peers against the mode's device: ``routes`` are for L3 modes (TUN), ``macs`` for L2 modes (TAP).
    One L3 peer without routes gets DEFAULT_ROUTES: everything goes to it and anything from it is accepted,
    so a point-to-point tunnel needs no routes. Raises ConfigError (one line)."""
    layer3 = device is DeviceKind.TUN
    for spec in cfg.peers:
        check_fits(spec, layer3, cfg.mode)
    if layer3 and len(cfg.peers) == 1 and not cfg.peers[0].routes:
        return replace(cfg, peers=(replace(cfg.peers[0], routes=DEFAULT_ROUTES),))
    return cfg


def check_ageing(value: float, what: str = "fdb-ageing") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            value == 0 or 1 <= value <= MAX_FDB_AGEING):
        raise ConfigError(f"{what}: {value!r} is not 0 (never) or a number of seconds from 1 to {MAX_FDB_AGEING:.0f}")
    return float(value)


def check_runtime_dir(value: str, dev: str = DEFAULT_DEV, what: str = "runtime-dir") -> str:
    """An absolute directory path that leaves room in a unix socket address for ``DEV.sock``."""
    if not value.startswith("/") or "\0" in value:
        raise ConfigError(f"{what}: {value!r} is not an absolute path, e.g. {DEFAULT_RUNTIME_DIR}")
    path = os.path.normpath(value)
    path = "/" + path.lstrip("/")  # normpath keeps a leading "//"
    room = SUN_PATH_MAX - len(f"/{dev}.sock".encode())
    if len(path.encode()) > room:
        raise ConfigError(f"{what}: {value!r} is too long for a unix socket path with {dev}.sock in it "
                          f"(at most {room} bytes)")
    return path


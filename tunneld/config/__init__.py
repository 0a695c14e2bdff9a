"""The tunnel's configuration: one frozen dataclass, and the validation that gives each problem one clear line.

Everything that can be checked without touching the kernel is checked here, so that a bad value is reported
before any device or socket exists.
"""

from __future__ import annotations

import codecs
import ipaddress
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping

from tunneld.encap.base import DeviceKind, Option, declared
from tunneld.encap.base import describe_value as _describe  # shared with Option's messages
from tunneld.datapath.peers import PeerSpec
from tunneld.encap.plugins import discover
from tunneld.control.registry import RegistryConfig, RegistryError, check_registry, parse_url
from tunneld.control.client import DEFAULT_RUNTIME_DIR  # the control socket's: declared where the light client reads it

DEFAULT_DEV = "tunneld0"
DEFAULT_MODE = "vxlan"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9477"  # loopback only: exposing metrics further is the operator's choice
IFNAMSIZ = 16  # including the terminating NUL
LOG_LEVELS = ("debug", "info", "warning", "error")
MIN_MTU = 68  # RFC 791's minimum
IPV6_MIN_MTU = 1280  # RFC 8200: an interface carrying IPv6 needs at least this

# Peers and what they carry: every list that a file can grow has a bound (a file is at most MAX_CONFIG_BYTES).
MAX_PEERS = 4096  # one device and one socket carry them all; the data path keeps a table entry per peer
MAX_ROUTES_PER_PEER = 1024  # L3 modes: inner prefixes per peer
MAX_MACS_PER_PEER = 1024  # L2 modes: static FDB entries per peer
MAX_NAME = 64  # a peer's label, shown by `tunneld show`
DEFAULT_ROUTES = ("0.0.0.0/0", "::/0")  # one L3 peer without routes reaches everything (as before many peers)
DEFAULT_FDB_MAX = 16384  # L2 modes: FDB entries, learnt and static (Linux vxlan's `limit` is unbounded by default)
MAX_FDB_MAX = 1_000_000
DEFAULT_FDB_AGEING = 300.0  # seconds a learnt MAC lives unheard, as Linux bridges and vxlan; 0 = never
MAX_FDB_AGEING = 1_000_000.0
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the terminating NUL
# Outer "don't fragment": "set" (the default) as RFC 7348 asks of a VTEP; a frame too big for the path is
# answered with ICMP so the inner sender shrinks it. "unset": the kernel and the path's routers fragment outer
# packets, for paths that drop ICMP (the kernel's VXLAN defaults to that). io/udp.py says how, per IP version.
DF_CHOICES = ("set", "unset")
DEFAULT_DF = "set"
DF_HELP = ("outer 'don't fragment': 'set' (default: a VTEP must not fragment, RFC 7348; a frame too big for the "
           "path is answered with ICMP frag-needed/packet-too-big so its sender shrinks it) or 'unset' (the "
           "kernel and the routers fragment outer packets, for paths that drop ICMP; IPv6 routers never do)")

_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


class ConfigError(ValueError):
    """One problem with the configuration; str() is the line shown to the operator."""


@dataclass(frozen=True)
class TunnelConfig:
    """One tunnel. ``peers``: the far ends in the order given (canonical addresses, no duplicates once
    validated). ``TunnelConfig(peer="ADDR", ...)`` (and ``dataclasses.replace(cfg, peer=ADDR)``) is the
    one-peer shorthand: it sets ``peers`` to that one peer; ``cfg.peer`` reads the first peer's address."""

    peers: tuple[PeerSpec, ...] = ()
    mode: str = DEFAULT_MODE
    local: str | None = None
    dev: str = DEFAULT_DEV
    addresses: tuple[str, ...] = ()
    port: int | None = None  # None: the mode's default UDP port (VXLAN: 4789); only for modes over UDP
    mtu: int | None = None  # None: underlay MTU minus the encapsulation overhead
    mac: str | None = None  # None: a stable address derived from the machine, the device name and the peer
    log_level: str = "info"
    offload: bool = True  # TUN/TAP TSO + UDP GSO/GRO (tunneld/offload); False: the plain per-packet path
    # Who cuts super-frames of UDP codecs with a constant header (VXLAN): the kernel through an egress TAP
    # (tunneld/io/egress.py), or tunneld. "auto": the kernel where it can and it is safe; "on": the kernel or
    # fail to start; "off": tunneld. Command line only (--kernel-gso) for now: a file takes the default.
    kernel_gso: str = "auto"
    df: str = DEFAULT_DF  # outer "don't fragment": "set" or "unset" (DF_HELP)
    workers: int | str = "auto"  # data-path processes (tunneld/runtime/workers.py); "auto": decided from the CPUs
    metrics_listen: str = DEFAULT_METRICS_LISTEN  # HOST:PORT or [IPv6]:PORT of the /metrics endpoint; "" = off
    fdb_max: int = DEFAULT_FDB_MAX  # L2 modes: at most this many FDB entries; past it MACs are not learnt
    fdb_ageing: float = DEFAULT_FDB_AGEING  # L2 modes: seconds before an unheard learnt MAC expires; 0 = never
    runtime_dir: str = DEFAULT_RUNTIME_DIR  # where the control socket DEV.sock lives
    registry: RegistryConfig | None = None  # membership through etcd (tunneld/control/registry.py); None: static peers only
    # The mode's options (vxlan: vni; gre: key, seq, csum; a plugin's: its own), as given: typed from a config
    # file or a flag, strings from --opt. The mode's declarations judge them (tunneld.runtime.modes.build_codec).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def peer(self) -> str:
        """The first peer's address ("" when there is none): for the one-peer paths that need one name (the
        stable MAC, a status line); code that carries traffic iterates ``peers``."""
        return self.peers[0].address if self.peers else ""

    def options(self) -> dict[str, Any]:
        """What the encapsulator is built from: the mode's options, and ``port`` for plugins that read it."""
        return {"port": self.port, **self.extra}

    def changed(self, other: "TunnelConfig") -> list[str]:
        """The settings that differ from ``other``: field names, and each mode option by its own name."""
        names = []
        for f in fields(self):
            if f.name == "extra":
                names += [k for k in {**other.extra, **self.extra} if self.extra.get(k) != other.extra.get(k)]
            elif getattr(self, f.name) != getattr(other, f.name):
                names.append(f.name)
        return names


_dataclass_init = TunnelConfig.__init__


def _init(self: TunnelConfig, *args: Any, peer: str | None = None, **kwargs: Any) -> None:
    # ``peer=`` is not a field (it is a view of ``peers``), so the generated __init__ would refuse it; it stays
    # accepted because every one-peer caller (tests, plugins' helpers, a file's [tunnel] peer) says it that way.
    if peer is not None:
        kwargs["peers"] = (PeerSpec(peer),)
    _dataclass_init(self, *args, **kwargs)


TunnelConfig.__init__ = _init  # type: ignore[method-assign]


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
    if not _MAC.match(value):
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


KERNEL_GSO_CHOICES = ("auto", "on", "off")  # see TunnelConfig.kernel_gso


def check_choice(value: str, what: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{what}: {value!r} is not one of {', '.join(choices)}")
    return value


def check_df(value: str) -> str:
    return check_choice(value, "df", DF_CHOICES)


MAX_WORKERS = 64  # processes; one TUN queue each (the kernel allows 256) and ~50 MB of Python each


def check_workers(value: int | str) -> int | str:
    """``workers``: "auto" or a whole number of processes, 1-MAX_WORKERS."""
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ConfigError(f"workers: {value!r} is not 'auto' or a number of processes between 1 and {MAX_WORKERS}")
    return value


_NAME = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._:@-]{{0,{MAX_NAME - 1}}}$")


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
    if not _MAC.match(value):
        raise ConfigError(f"{what}: {value!r} is not a MAC address like 02:00:00:00:00:01")
    if int(value[:2], 16) & 0x01 or value == "00:00:00:00:00:00":
        raise ConfigError(f"{what}: {value} is not a unicast address; broadcast, multicast and unknown MACs go "
                          "to every peer anyway")
    return value.lower()


def check_name(value: str, what: str = "name") -> str:
    if not _NAME.match(value):
        raise ConfigError(f"{what}: {value!r} is not a peer name (1-{MAX_NAME} letters, digits and ._:@-, "
                          "starting with a letter or digit)")
    return value


def check_spec(spec: PeerSpec, what: str = "peer") -> PeerSpec:
    """One peer on its own, canonical: its address (``check_peer``), name, routes and MACs, each list bounded
    and without repeats. What involves other peers is ``check_peers``'s."""
    address = check_peer(spec.address, what)
    where = f"peer {address}"
    name = check_name(spec.name, f"{where}: name") if spec.name is not None else None
    lists = []
    for key, check, cap in (("routes", check_route, MAX_ROUTES_PER_PEER), ("macs", check_static_mac, MAX_MACS_PER_PEER)):
        items = getattr(spec, key)
        if len(items) > cap:
            raise ConfigError(f"{where}: {key}: {len(items)} given, at most {cap} per peer")
        done = tuple(check(item, f"{where}: {key}") for item in items)
        if len(set(done)) != len(done):
            twice = next(x for x in done if done.count(x) > 1)
            raise ConfigError(f"{where}: {key}: {twice} is given twice")
        lists.append(done)
    return PeerSpec(address, name, lists[0], lists[1], spec.source)


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
    as before there were many peers. Raises ConfigError (one line)."""
    layer3 = device is DeviceKind.TUN
    for spec in cfg.peers:
        if layer3 and spec.macs:
            raise ConfigError(f"peer {spec.address}: macs are static FDB entries of L2 modes; mode {cfg.mode!r} "
                              "is L3 (TUN): give the peer routes instead")
        if not layer3 and spec.routes:
            raise ConfigError(f"peer {spec.address}: routes are for L3 modes; mode {cfg.mode!r} is L2 (TAP), "
                              "whose peers are found by MAC (learnt, or static macs)")
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


def validate(cfg: TunnelConfig) -> TunnelConfig:
    """Check every field; raise ConfigError on the first problem. Returns the config, normalised."""
    if not cfg.peers and cfg.registry is None:
        raise ConfigError("peer: missing; required: the underlay address of the far end (or a registry)")
    peers = check_peers(cfg.peers) if cfg.peers else ()
    try:
        registry = check_registry(cfg.registry) if cfg.registry is not None else None
    except RegistryError as e:
        raise ConfigError(str(e)) from None
    local = check_local(cfg.local) if cfg.local else None
    if local and peers and ipaddress.ip_address(local).version != ipaddress.ip_address(peers[0].address).version:
        raise ConfigError(f"local: {local} and peer {peers[0].address} must be of the same IP version")
    addresses = tuple(check_cidr(a) for a in cfg.addresses)
    if cfg.mtu is not None:
        check_range(cfg.mtu, "mtu", MIN_MTU, 65535)
        if cfg.mtu < IPV6_MIN_MTU and any(ipaddress.ip_interface(a).version == 6 for a in addresses):
            raise ConfigError(f"mtu: {cfg.mtu} is below {IPV6_MIN_MTU}, the minimum for an interface with IPv6")
    if cfg.port is not None:
        check_range(cfg.port, "port", 1, 65535)
    if cfg.log_level not in LOG_LEVELS:
        raise ConfigError(f"log-level: {cfg.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    dev = check_dev(cfg.dev)
    return TunnelConfig(
        peers=peers,
        mode=cfg.mode,
        local=local,
        dev=dev,
        addresses=addresses,
        port=cfg.port,
        mtu=cfg.mtu,
        mac=check_mac(cfg.mac) if cfg.mac else None,
        log_level=cfg.log_level,
        offload=cfg.offload,
        kernel_gso=check_choice(cfg.kernel_gso, "kernel-gso", KERNEL_GSO_CHOICES),
        df=check_df(cfg.df),
        workers=check_workers(cfg.workers),
        metrics_listen=check_listen(cfg.metrics_listen),
        fdb_max=check_range(cfg.fdb_max, "fdb-max", 1, MAX_FDB_MAX),
        fdb_ageing=check_ageing(cfg.fdb_ageing),
        runtime_dir=check_runtime_dir(cfg.runtime_dir, dev),
        registry=registry,
        extra=dict(cfg.extra),
    )


# -- configuration files ---------------------------------------------------------------------------------------
#
# One TOML file per tunnel instance (systemd's tunneld@NAME reads /etc/tunneld/NAME.toml):
#
#   [tunnel]  mode, peer, local, dev, address, port, mtu, mac, offload (true/false), df ("set"/"unset"),
#             workers ("auto" or N),
#             and the options the mode's encapsulator declares (``tunneld --list-modes``; vxlan: vni,
#             gre/gretap: key, seq, csum), each checked by its declaration (``Option.check``)
#   [[peer]]  one table per peer, instead of tunnel.peer (not both): address, name, routes = [CIDR, ...] (L3
#             modes), macs = [MAC, ...] (L2 modes: static FDB entries)
#   [fdb]     max (entries, 1-MAX_FDB_MAX), ageing (seconds; 0 = never): the L2 modes' FDB
#   [control] runtime_dir: where the control socket DEV.sock lives
#   [metrics] listen = "HOST:PORT"
#   [log]     level
#   [registry] endpoints = ["HOST:PORT", ...] (or "etcd://HOST:PORT,.../PREFIX"), prefix, ttl, ca, cert, key,
#             user, password: membership through etcd (tunneld/control/registry.py); --registry overrides it
#
# Every problem is reported, one line each, as "FILE: SECTION.KEY: what is wrong; what is allowed". Unknown
# sections and keys are errors: a typo must not silently fall back to a default.

EX_CONFIG = 78  # sysexits.h EX_CONFIG: the exit status of a configuration error; systemd must not restart on it

COMMON_TUNNEL_KEYS = ("mode", "peer", "local", "dev", "address", "port", "mtu", "mac", "offload", "df", "workers")
PEER_KEYS = ("address", "name", "routes", "macs")
REGISTRY_KEYS = ("endpoints", "prefix", "ttl", "ca", "cert", "key", "user", "password")
SECTIONS = {"tunnel": COMMON_TUNNEL_KEYS, "peer": PEER_KEYS, "fdb": ("max", "ageing"), "control": ("runtime_dir",),
            "metrics": ("listen",), "log": ("level",), "registry": REGISTRY_KEYS}
ARRAYS = ("peer",)  # written [[peer]]: an array of tables
# The file's key of a TunnelConfig field that lives outside [tunnel] or is named otherwise there (the others are
# tunnel.FIELD): for the lines that name a setting, at start-up and on a reload.
FILE_KEYS = {"log_level": "log.level", "metrics_listen": "metrics.listen", "addresses": "tunnel.address",
             "extra": "tunnel (mode options)", "fdb_max": "fdb.max", "fdb_ageing": "fdb.ageing",
             "runtime_dir": "control.runtime_dir", "registry": "registry", "registry_ttl": "registry.ttl"}


class ConfigFileError(Exception):
    """One or more problems with a configuration file; ``problems`` holds one operator-facing line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


MAX_CONFIG_BYTES = 1 << 20  # a tunnel's file is a few hundred bytes; anything near this is not one


def read_text(path: str) -> str:
    """The text of the configuration file at ``path``; raises ConfigFileError (one line) if it cannot be one.

    Only a regular file is read: a FIFO or a device (/dev/zero) would block or never end, so the file is
    opened non-blocking and judged by fstat before a byte is read. It must be at most MAX_CONFIG_BYTES and
    UTF-8, as TOML requires (a UTF-8 byte-order mark, which some editors write, is skipped)."""
    def refuse(text: str) -> ConfigFileError:
        return ConfigFileError([f"{path}: {text}"])

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise refuse(f"cannot read: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a regular file")
            raise refuse(f"cannot read: {kind}, not a regular file")
        if st.st_size > MAX_CONFIG_BYTES:
            raise refuse(f"cannot read: {st.st_size} bytes, more than a configuration file's {MAX_CONFIG_BYTES}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)  # the size may have grown since fstat
    except OSError as e:
        raise refuse(f"cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_CONFIG_BYTES:
        raise refuse(f"cannot read: more than a configuration file's {MAX_CONFIG_BYTES} bytes")
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise refuse("is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8, as TOML requires")
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise refuse(f"is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); TOML files are "
                     "UTF-8") from None


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def load_file(path: str, modes: Mapping[str, type] | None = None) -> dict[str, Any]:
    """Read and check one TOML file. Returns TunnelConfig field values (only those the file sets) plus
    ``metrics_listen``; raises ConfigFileError listing every problem found.

    ``modes`` are the available encapsulators (name → class; default: the installed ones): ``mode`` must be
    one of them, and the options it declares are the keys allowed beside the common ones, each value checked
    by its declaration. Cross-field rules (peer and local of one IP version, ...) are left to ``validate``,
    which sees the file merged with the command line.
    """
    problems: list[str] = []
    text = read_text(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError([f"{path}: not valid TOML: {e}"]) from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise ConfigFileError([f"{path}: not valid TOML: arrays or tables nested too deeply"]) from None

    def problem(key: str, text: str) -> None:
        problems.append(f"{path}: {key}: {text}")

    for section, table in data.items():
        if section not in SECTIONS:
            allowed = ', '.join(f'[[{s}]]' if s in ARRAYS else f'[{s}]' for s in SECTIONS)
            problem(section, f"unknown section; allowed: {allowed}")
        elif section in ARRAYS:
            pass  # read below
        elif not isinstance(table, dict):
            problem(section, f"must be a table [{section}], got {_describe(table)}")
    tunnel = data.get("tunnel") if isinstance(data.get("tunnel"), dict) else {}
    out: dict[str, Any] = {}

    # The mode first: its encapsulator's declarations decide which option keys are allowed.
    if modes is None:
        modes = discover()[0]
    mode = tunnel.get("mode", DEFAULT_MODE)
    if not isinstance(mode, str):
        problem("tunnel.mode", f"expected a string, got {_describe(mode)}")
        mode = None
    elif mode not in modes:
        problem("tunnel.mode", f"{mode!r} is not an available mode; available: {', '.join(modes)}")
        mode = None
    elif "mode" in tunnel:
        out["mode"] = mode
    takes: Mapping[str, Option] = declared(modes[mode]) if mode is not None else {}
    owners = {}  # option name -> the modes that declare it
    for name, cls in modes.items():
        for option_name in declared(cls):
            owners.setdefault(option_name, []).append(name)

    def expect(key: str, value: Any, kinds: tuple[type, ...], allowed: str) -> bool:
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            problem(f"tunnel.{key}", f"expected {allowed}, got {_describe(value)}")
            return False
        return True

    def checked(key: str, fn, *args) -> Any:
        try:
            return fn(*args)
        except ConfigError as e:
            # check_* say "what: problem"; restate it under the file's own key name.
            problem(f"tunnel.{key}", str(e).split(": ", 1)[-1])
            return None

    extra: dict[str, Any] = {}
    for key, value in tunnel.items():
        if key == "mode":
            continue
        if key in ("peer", "local"):
            if expect(key, value, (str,), "an IPv4 or IPv6 address string"):
                if (v := checked(key, check_peer if key == "peer" else check_local, value, key)) is not None:
                    out[key] = v
        elif key == "dev":
            if expect(key, value, (str,), f"an interface name string (1-{IFNAMSIZ - 1} characters)"):
                if (v := checked(key, check_dev, value)) is not None:
                    out["dev"] = v
        elif key == "address":
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(a, str) for a in items):
                problem("tunnel.address", f"expected a CIDR string or an array of them, got {_describe(value)}")
                continue
            addrs = [checked(key, check_cidr, a) for a in items]
            if None not in addrs:
                out["addresses"] = tuple(addrs)
        elif key == "port":
            if expect(key, value, (int,), "an integer UDP port (1-65535)"):
                if checked(key, check_range, value, key, 1, 65535) is not None:
                    out["port"] = value
        elif key == "mtu":
            if expect(key, value, (int,), f"an integer MTU ({MIN_MTU}-65535)"):
                if checked(key, check_range, value, key, MIN_MTU, 65535) is not None:
                    out["mtu"] = value
        elif key == "mac":
            if expect(key, value, (str,), "a MAC address string like 02:00:00:00:00:01"):
                if (v := checked(key, check_mac, value)) is not None:
                    out["mac"] = v
        elif key == "offload":
            if expect(key, value, (bool,), "true or false"):
                out["offload"] = value
        elif key == "df":
            if expect(key, value, (str,), " or ".join(f'"{c}"' for c in DF_CHOICES)):
                if (v := checked(key, check_df, value)) is not None:
                    out["df"] = v
        elif key == "workers":
            if expect(key, value, (int, str), f'"auto" or an integer number of processes (1-{MAX_WORKERS})'):
                if (v := checked(key, check_workers, value)) is not None:
                    out["workers"] = v
        elif key in takes:
            try:
                extra[key] = takes[key].check(value)
            except ValueError as e:
                problem(f"tunnel.{key}", str(e))
        elif key in owners and mode is not None:
            problem(f"tunnel.{key}", f"only for mode {'/'.join(owners[key])}, not {mode!r}; mode {mode!r} takes: "
                                     f"{', '.join(takes) or 'no options'}")
        elif mode is not None:
            problem(f"tunnel.{key}", f"unknown key; allowed in [tunnel]: {', '.join((*COMMON_TUNNEL_KEYS, *takes))}")
    if extra:
        out["extra"] = extra

    if "peer" in data:
        if "peer" in tunnel:
            problem("peer", "[[peer]] tables and tunnel.peer both given; name one peer as tunnel.peer or every "
                            "peer in a [[peer]] table")
        elif (peers := _peer_tables(data["peer"], problem)) is not None:
            out["peers"] = peers

    fdb = data.get("fdb") if isinstance(data.get("fdb"), dict) else {}
    for key, value in fdb.items():
        if key == "max":
            if isinstance(value, bool) or not isinstance(value, int):
                problem("fdb.max", f"expected an integer number of entries (1-{MAX_FDB_MAX}), got {_describe(value)}")
            elif not 1 <= value <= MAX_FDB_MAX:
                problem("fdb.max", f"{value} is out of range (1-{MAX_FDB_MAX})")
            else:
                out["fdb_max"] = value
        elif key == "ageing":
            try:
                out["fdb_ageing"] = check_ageing(value)
            except ConfigError as e:
                problem("fdb.ageing", str(e).split(": ", 1)[-1])
        else:
            problem(f"fdb.{key}", "unknown key; allowed in [fdb]: max, ageing")

    def one_string(section: str, key: str, expected: str, check: Callable[[str], str], field_name: str) -> None:
        """A table of one string key ([control], [metrics]), its value checked by ``check``."""
        table = data.get(section) if isinstance(data.get(section), dict) else {}
        for k, value in table.items():
            if k != key:
                problem(f"{section}.{k}", f"unknown key; allowed in [{section}]: {key}")
            elif not isinstance(value, str):
                problem(f"{section}.{key}", f"expected {expected}, got {_describe(value)}")
            else:
                try:
                    out[field_name] = check(value)
                except ConfigError as e:
                    problem(f"{section}.{key}", str(e).split(": ", 1)[-1])

    # The room runtime_dir leaves for DEV.sock is judged by validate(), which knows the device's name.
    one_string("control", "runtime_dir", "a directory path string", lambda v: check_runtime_dir(v, ""), "runtime_dir")
    one_string("metrics", "listen", "a \"HOST:PORT\" string (\"\" to disable)", check_listen, "metrics_listen")

    if isinstance(data.get("registry"), dict):
        if (registry := _registry_table(data["registry"], problem)) is not None:
            out["registry"] = registry

    log = data.get("log") if isinstance(data.get("log"), dict) else {}
    for key, value in log.items():
        if key != "level":
            problem(f"log.{key}", "unknown key; allowed in [log]: level")
        elif value not in LOG_LEVELS:
            problem("log.level", f"{value!r} is not a log level; allowed: {', '.join(LOG_LEVELS)}")
        else:
            out["log_level"] = value

    if problems:
        raise ConfigFileError(problems)
    return out


def _peer_tables(tables: Any, problem: Callable[[str, str], None]) -> tuple[PeerSpec, ...] | None:
    """The [[peer]] tables as PeerSpecs, each checked on its own (``check_spec``); None if any has a problem
    (each reported through ``problem``, keyed ``peer[N].KEY``, N counting from 1). What involves several
    peers (an address or a prefix given twice, mixed IP versions) is ``validate``'s, after the flags."""
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        problem("peer", f"expected [[peer]] tables, one per peer (keys: {', '.join(PEER_KEYS)}), got "
                        f"{_describe(tables)}")
        return None
    if len(tables) > MAX_PEERS:
        problem("peer", f"{len(tables)} [[peer]] tables, more than {MAX_PEERS}")
        return None
    specs = []
    ok = True
    for n, table in enumerate(tables, 1):
        where = f"peer[{n}]"
        bad = False

        def say(key: str, text: str) -> None:
            nonlocal bad
            problem(f"{where}.{key}" if key else where, text)
            bad = True

        for key in table:
            if key not in PEER_KEYS:
                say(key, f"unknown key; allowed in [[peer]]: {', '.join(PEER_KEYS)}")
        address = table.get("address")
        if address is None:
            say("address", "missing; required: the peer's underlay IPv4 or IPv6 address")
        elif not isinstance(address, str):
            say("address", f"expected an IPv4 or IPv6 address string, got {_describe(address)}")
        name = table.get("name")
        if name is not None and not isinstance(name, str):
            say("name", f"expected a string, got {_describe(name)}")
        lists = {}
        for key, example in (("routes", '["192.168.2.0/24"]'), ("macs", '["02:00:00:00:00:02"]')):
            items = table.get(key, [])
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                say(key, f"expected an array of strings like {example}, got {_describe(items)}")
            lists[key] = tuple(items) if isinstance(items, list) else ()
        if bad:
            ok = False
            continue
        try:
            specs.append(check_spec(PeerSpec(address, name, lists["routes"], lists["macs"])))
        except ConfigError as e:
            what, _, text = str(e).partition(": ")  # "peer: PROBLEM" or "peer ADDR: KEY: PROBLEM"
            key = "address"
            if what != "peer":
                key, _, text = text.partition(": ")
            say(key, text)
            ok = False
    return tuple(specs) if ok else None


def _registry_table(table: dict, problem: Callable[[str, str], None]) -> RegistryConfig | None:
    """[registry]: ``endpoints`` (an array of "HOST:PORT", or one "etcd://HOST:PORT,.../PREFIX" string),
    ``prefix``, ``ttl``, TLS ``ca``/``cert``/``key`` (file paths), ``user``/``password``; None if any has a
    problem (each reported through ``problem``). The files are looked at by ``validate`` (check_registry)."""
    values: dict[str, Any] = {}
    bad = False
    for key, value in table.items():
        if key not in REGISTRY_KEYS:
            problem(f"registry.{key}", f"unknown key; allowed in [registry]: {', '.join(REGISTRY_KEYS)}")
            bad = True
        elif key == "ttl":
            if isinstance(value, bool) or not isinstance(value, int):
                problem("registry.ttl", f"expected an integer number of seconds, got {_describe(value)}")
                bad = True
            else:
                values["ttl"] = value
        elif key == "endpoints":
            try:
                if isinstance(value, str):
                    values["endpoints"], prefix = parse_url(value, "endpoints")
                    values.setdefault("prefix", prefix)
                elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                    values["endpoints"] = tuple(value)
                else:
                    problem("registry.endpoints", f'expected an array of "HOST:PORT" strings, got {_describe(value)}')
                    bad = True
            except RegistryError as e:
                problem("registry.endpoints", str(e).split(": ", 1)[-1])
                bad = True
        elif not isinstance(value, str):
            problem(f"registry.{key}", f"expected a string, got {_describe(value)}")
            bad = True
        else:
            values[key] = value
    if "endpoints" not in values:
        if not bad:
            problem("registry.endpoints", 'missing; required: the etcd members, e.g. ["10.0.0.1:2379"]')
        return None
    if bad:
        return None
    try:
        return check_registry(RegistryConfig(**values))
    except RegistryError as e:
        what, _, text = str(e).partition(": ")
        problem(what if what.startswith("registry.") else "registry", text)
        return None

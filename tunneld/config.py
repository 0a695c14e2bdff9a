"""The tunnel's configuration: one frozen dataclass, and the validation that gives each problem one clear line.

Everything that can be checked without touching the kernel is checked here, so that a bad value is reported
before any device or socket exists.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

DEFAULT_DEV = "tunneld0"
DEFAULT_MODE = "vxlan"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9477"  # loopback only: exposing metrics further is the operator's choice
IFNAMSIZ = 16  # including the terminating NUL
LOG_LEVELS = ("debug", "info", "warning", "error")
MIN_MTU = 68  # RFC 791's minimum
IPV6_MIN_MTU = 1280  # RFC 8200: an interface carrying IPv6 needs at least this

_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


class ConfigError(ValueError):
    """One problem with the configuration; str() is the line shown to the operator."""


@dataclass(frozen=True)
class TunnelConfig:
    peer: str
    mode: str = DEFAULT_MODE
    local: str | None = None
    dev: str = DEFAULT_DEV
    addresses: tuple[str, ...] = ()
    vni: int = 1
    port: int | None = None  # None: the mode's default (VXLAN: 4789)
    mtu: int | None = None  # None: underlay MTU minus the encapsulation overhead
    mac: str | None = None  # None: a stable address derived from the machine, the device name and the peer
    log_level: str = "info"
    metrics_listen: str = DEFAULT_METRICS_LISTEN  # HOST:PORT or [IPv6]:PORT of the /metrics endpoint; "" = off
    extra: dict[str, Any] = field(default_factory=dict)  # options of plugin modes

    def options(self) -> dict[str, Any]:
        """What the encapsulator is built from."""
        return {"vni": self.vni, "port": self.port, **self.extra}


def check_ip(value: str, what: str) -> str:
    try:
        return ipaddress.ip_address(value).compressed
    except ValueError:
        raise ConfigError(f"{what}: {value!r} is not an IPv4 or IPv6 address") from None


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


def validate(cfg: TunnelConfig) -> TunnelConfig:
    """Check every field; raise ConfigError on the first problem. Returns the config, normalised."""
    peer = check_ip(cfg.peer, "peer")
    local = check_ip(cfg.local, "local") if cfg.local else None
    if local and ipaddress.ip_address(local).version != ipaddress.ip_address(peer).version:
        raise ConfigError(f"local: {local} and peer {peer} must be of the same IP version")
    addresses = tuple(check_cidr(a) for a in cfg.addresses)
    if cfg.mtu is not None:
        check_range(cfg.mtu, "mtu", MIN_MTU, 65535)
        if cfg.mtu < IPV6_MIN_MTU and any(ipaddress.ip_interface(a).version == 6 for a in addresses):
            raise ConfigError(f"mtu: {cfg.mtu} is below {IPV6_MIN_MTU}, the minimum for an interface with IPv6")
    if cfg.port is not None:
        check_range(cfg.port, "port", 1, 65535)
    if cfg.log_level not in LOG_LEVELS:
        raise ConfigError(f"log-level: {cfg.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    return TunnelConfig(
        peer=peer,
        mode=cfg.mode,
        local=local,
        dev=check_dev(cfg.dev),
        addresses=addresses,
        vni=cfg.vni,
        port=cfg.port,
        mtu=cfg.mtu,
        mac=check_mac(cfg.mac) if cfg.mac else None,
        log_level=cfg.log_level,
        metrics_listen=check_listen(cfg.metrics_listen),
        extra=dict(cfg.extra),
    )

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
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

from tunneld.encap.base import Option, declared
from tunneld.encap.base import describe_value as _describe  # shared with Option's messages
from tunneld.plugins import discover

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
    port: int | None = None  # None: the mode's default UDP port (VXLAN: 4789); only for modes over UDP
    mtu: int | None = None  # None: underlay MTU minus the encapsulation overhead
    mac: str | None = None  # None: a stable address derived from the machine, the device name and the peer
    log_level: str = "info"
    offload: bool = True  # TUN/TAP TSO + UDP GSO/GRO (tunneld/offload); False: the plain per-packet path
    workers: int | str = "auto"  # data-path processes (tunneld/workers.py); "auto": decided from the CPUs
    metrics_listen: str = DEFAULT_METRICS_LISTEN  # HOST:PORT or [IPv6]:PORT of the /metrics endpoint; "" = off
    runtime_dir: str = "/run/tunneld"  # the control socket's directory (control.py); peerconf's, interim here
    # The mode's options (vxlan: vni; gre: key, seq, csum; a plugin's: its own), as given: typed from a config
    # file or a flag, strings from --opt. The mode's declarations judge them (tunneld.modes.build_codec).
    extra: dict[str, Any] = field(default_factory=dict)

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


MAX_WORKERS = 64  # processes; one TUN queue each (the kernel allows 256) and ~50 MB of Python each


def check_workers(value: int | str) -> int | str:
    """``workers``: "auto" or a whole number of processes, 1-MAX_WORKERS."""
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ConfigError(f"workers: {value!r} is not 'auto' or a number of processes between 1 and {MAX_WORKERS}")
    return value


def validate(cfg: TunnelConfig) -> TunnelConfig:
    """Check every field; raise ConfigError on the first problem. Returns the config, normalised."""
    peer = check_peer(cfg.peer)
    local = check_local(cfg.local) if cfg.local else None
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
        port=cfg.port,
        mtu=cfg.mtu,
        mac=check_mac(cfg.mac) if cfg.mac else None,
        log_level=cfg.log_level,
        offload=cfg.offload,
        workers=check_workers(cfg.workers),
        metrics_listen=check_listen(cfg.metrics_listen),
        runtime_dir=cfg.runtime_dir,
        extra=dict(cfg.extra),
    )


# -- configuration files ---------------------------------------------------------------------------------------
#
# One TOML file per tunnel instance (systemd's tunneld@NAME reads /etc/tunneld/NAME.toml):
#
#   [tunnel]  mode, peer, local, dev, address, port, mtu, mac, offload (true/false), workers ("auto" or N),
#             and the options the mode's encapsulator declares (``tunneld --list-modes``; vxlan: vni,
#             gre/gretap: key, seq, csum), each checked by its declaration (``Option.check``)
#   [metrics] listen = "HOST:PORT"
#   [log]     level
#
# Every problem is reported, one line each, as "FILE: SECTION.KEY: what is wrong; what is allowed". Unknown
# sections and keys are errors: a typo must not silently fall back to a default.

EX_CONFIG = 78  # sysexits.h EX_CONFIG: the exit status of a configuration error; systemd must not restart on it

COMMON_TUNNEL_KEYS = ("mode", "peer", "local", "dev", "address", "port", "mtu", "mac", "offload", "workers")
SECTIONS = {"tunnel": COMMON_TUNNEL_KEYS, "metrics": ("listen",), "log": ("level",)}


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
            problem(section, f"unknown section; allowed: {', '.join(f'[{s}]' for s in SECTIONS)}")
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

    metrics = data.get("metrics") if isinstance(data.get("metrics"), dict) else {}
    for key, value in metrics.items():
        if key != "listen":
            problem(f"metrics.{key}", "unknown key; allowed in [metrics]: listen")
        elif not isinstance(value, str):
            problem("metrics.listen", f"expected a \"HOST:PORT\" string (\"\" to disable), got {_describe(value)}")
        else:
            try:
                out["metrics_listen"] = check_listen(value)
            except ConfigError as e:
                problem("metrics.listen", str(e).split(": ", 1)[-1])

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

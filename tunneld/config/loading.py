"""From a file and the command line to one checked ``TunnelConfig``: the TOML file's sections and keys, the
file keys that name each setting in log lines, and ``validate``, the last step after the flags are merged.

One TOML file per tunnel instance (systemd's tunneld@NAME reads /etc/tunneld/NAME.toml):

  [tunnel]  mode, peer, local, dev, address, port, mtu, mac, offload (true/false), df ("set"/"unset"),
            workers ("auto" or N),
            and the options the mode's encapsulator declares (``tunneld --list-modes``; vxlan: vni,
            gre/gretap: key, seq, csum), each checked by its declaration (``Option.check``)
  [[peer]]  one table per peer, instead of tunnel.peer (not both): address, name, routes = [CIDR, ...] (L3
            modes), macs = [MAC, ...] (L2 modes: static FDB entries)
  [fdb]     max (entries, 1-MAX_FDB_MAX), ageing (seconds; 0 = never): the L2 modes' FDB
  [control] runtime_dir: where the control socket DEV.sock lives
  [metrics] listen = "HOST:PORT"
  [log]     level
  [registry] endpoints = ["HOST:PORT", ...] (or "etcd://HOST:PORT,.../PREFIX"), prefix, ttl, ca, cert, key,
            user, password: membership through etcd (tunneld/control/registry.py); --registry overrides it

Every problem is reported, one line each, as "FILE: SECTION.KEY: what is wrong; what is allowed". Unknown
sections and keys are errors: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import codecs
import ipaddress
import os
import stat
import tomllib
from typing import Any, Callable, Mapping

from tunneld.config.checks import (
    check_ageing,
    check_cidr,
    check_choice,
    check_dev,
    check_df,
    check_listen,
    check_local,
    check_mac,
    check_peer,
    check_peers,
    check_range,
    check_runtime_dir,
    check_spec,
    check_workers,
)
from tunneld.config import wireguard
from tunneld.config.schema import (
    DEFAULT_MODE,
    DF_CHOICES,
    IFNAMSIZ,
    IPV6_MIN_MTU,
    KERNEL_GSO_CHOICES,
    LOG_LEVELS,
    MAX_FDB_MAX,
    MAX_PEERS,
    MAX_WORKERS,
    MIN_MTU,
    ConfigError,
    TunnelConfig,
)
from tunneld.control.registry import RegistryConfig, RegistryError, check_registry, parse_url
from tunneld.datapath.peers import PeerSpec
from tunneld.encap.base import Option, declared
from tunneld.encap.base import describe_value as _describe  # shared with Option's messages
from tunneld.encap.plugins import discover

def validate(cfg: TunnelConfig) -> TunnelConfig:
    """Check every field; raise ConfigError on the first problem. Returns the config, normalised."""
    if not cfg.peers and cfg.registry is None and cfg.mode != "wireguard":  # wireguard: `wg set` adds them live
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
    if mode == "wireguard" and "wg_peers" in tunnel:
        problem("tunnel.wg_peers", "set by the [[peer]] tables, not here")
        extra.pop("wg_peers", None)
    if mode == "wireguard" and isinstance(extra.get("private_key"), str):  # relative to the file, as its peers' keys
        extra["private_key"] = os.path.join(os.path.dirname(path), extra["private_key"])
    if extra:
        out["extra"] = extra

    if "peer" in data:
        if "peer" in tunnel:
            problem("peer", "[[peer]] tables and tunnel.peer both given; name one peer as tunnel.peer or every "
                            "peer in a [[peer]] table")
        elif mode == "wireguard":  # public_key, endpoint, allowed_ips, ...: tunneld/config/wireguard.py
            port = tunnel.get("port", modes[mode].transport.number)
            try:
                out["peers"], extra["wg_peers"] = wireguard.peer_specs(data["peer"], os.path.dirname(path), port)
                out["extra"] = extra
            except ConfigError as e:
                problem("peer", str(e))
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
    one_string("control", "runtime_dir", "a directory path string", lambda v: check_runtime_dir(v, None), "runtime_dir")
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

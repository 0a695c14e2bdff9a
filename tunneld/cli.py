"""Command line: parse, validate, compose, run. The only module that knows every other one."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import os
import socket
import sys
from typing import Mapping, Sequence

from tunneld import __version__
from tunneld.config.schema import (
    DEFAULT_DEV,
    DEFAULT_FDB_AGEING,
    DEFAULT_FDB_MAX,
    DEFAULT_METRICS_LISTEN,
    DEFAULT_MODE,
    DEFAULT_RUNTIME_DIR,
    DF_CHOICES,
    DF_HELP,
    EX_CONFIG,
    KERNEL_GSO_CHOICES,
    LOG_LEVELS,
    MAX_FDB_AGEING,
    MAX_FDB_MAX,
    MAX_PEERS,
    MAX_WORKERS,
    ConfigError,
    TunnelConfig,
)
from tunneld.config.checks import check_ageing, check_on_host, fit_to_device
from tunneld.config.loading import FILE_KEYS, ConfigFileError, load_file, validate
from tunneld.config.wireguard import with_keys as wireguard_keys
from tunneld.control.client import CONTROL_COMMANDS, _Parser, build_control_parser
from tunneld.control.client import main as control_main
from tunneld.runtime.daemon import StartupError, run
from tunneld.encap.base import DeviceKind, Encapsulator, Option, declared, is_legacy
from tunneld.runtime.modes import EncapsulatorFailed, ModeOptionError, build_codec
from tunneld.io.netlink import address_kind, is_own_address
from tunneld.datapath.peers import PeerSpec
from tunneld.encap.plugins import discover
from tunneld.control.registry import DEFAULT_TTL, MAX_TTL, MIN_TTL, RegistryConfig, RegistryError, parse_url
from tunneld.runtime.workers import AUTO_RULE

log = logging.getLogger("tunneld")

DESCRIPTION = """\
Link this host to its peers with a userspace tunnel. tunneld creates a TAP (or TUN) interface, carries every
frame the kernel sends into it to a peer inside an encapsulation over the underlay network, and writes
what the peers send back into the interface. Run it on every host, each naming the others with --peer.
"""

EPILOG = f"""\
examples:
  host A (underlay 10.0.0.1):  tunneld --mode vxlan --peer 10.0.0.2 --address 192.168.100.1/24
  host B (underlay 10.0.0.2):  tunneld --mode vxlan --peer 10.0.0.1 --address 192.168.100.2/24
  then from A:                 ping 192.168.100.2
  from a file (config/):       tunneld --config /etc/tunneld/demo.toml [--check]
  a running tunnel:            tunneld show tunneld0 [--json]; tunneld peer add|remove ... (tunneld show --help)
  hosts found through etcd:    tunneld --mode vxlan --registry etcd://10.0.0.9:2379/overlay1 --address 192.168.100.1/24

  It interoperates with the Linux kernel's own VXLAN on the far end:
    ip link add vx0 type vxlan id 1 remote 10.0.0.1 dstport 4789 dev eth0

  three hosts on one segment (underlay 10.0.0.1-3), on host A:
    tunneld --mode vxlan --peer 10.0.0.2 --peer 10.0.0.3 --address 192.168.100.1/24
  and the same on B and C, each naming the other two. One device and one socket reach every peer (at most
  {MAX_PEERS}; all IPv4 or all IPv6). L2 modes learn which peer has which MAC and send broadcast and unknown
  unicast to every peer; L3 modes route by each peer's routes, given in a config file's [[peer]] tables
  (config/gre-hub.toml). --peer given on the command line replaces the file's whole peer list.

defaults:
  The MTU is the underlay route's MTU minus the encapsulation overhead (VXLAN over IPv4: 50 bytes, so 1450
  on a 1500-byte underlay); with several peers, the smallest route MTU towards any of them decides (the
  log names that peer). Frames too big to cross without fragmenting are dropped and counted. The TAP
  interface gets a stable MAC address derived from this machine, the device name and the (first) peer, so a
  restarted tunneld looks like the same interface to its neighbours. SIGINT or SIGTERM stop it cleanly
  (exit 0) and the interface is removed.

workers:
  --workers N opens the interface with N queues (IFF_MULTI_QUEUE) and N UDP sockets sharing the port
  (SO_REUSEPORT); the kernel spreads flows over them by their hash, so N processes carry different flows at
  once (one TCP flow always stays on one worker). Each worker needs a CPU of its own, and the kernel needs
  CPU too (softirq, the TCP endpoints), so 'auto' picks:
    {AUTO_RULE}.
  CPUs available: its affinity (taskset, cpuset), capped by its cgroup CPU quota (cpu.max, rounded up).
  Raw-IP modes always run 1: every raw socket receives every packet. Metrics are the sum over the workers;
  if a worker dies the daemon stops (exit status 1) rather than run a half-working tunnel. What one worker
  and several carry, measured: bench/results/latest.md in the source tree.

mode options:
  Each mode declares its own options (tunneld --list-modes: ranges, defaults, flags). Any of them can be given
  by its flag, as --opt NAME=VALUE, or as the key NAME in a config file's [tunnel] table; an option the chosen
  mode does not declare is refused.

exit status:
  0 stopped cleanly, 1 runtime failure (port in use, device exists, ...), 2 bad arguments,
  77 missing privileges (CAP_NET_ADMIN), 78 configuration error.
"""


def _int_in(low: int, high: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be between {low} and {high}, got {value}")
        return value

    parse.__name__ = what
    return parse


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'auto' or a number") from None
    if not 1 <= value <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"workers must be 'auto' or between 1 and {MAX_WORKERS}, got {value}")
    return value


_workers.__name__ = "workers"


def _ageing(text: str) -> float:
    try:
        return check_ageing(float(text))
    except ValueError as e:  # ConfigError is one too
        raise argparse.ArgumentTypeError(str(e) if isinstance(e, ConfigError) else f"{text!r} is not a number "
                                         f"of seconds (0 = never, up to {MAX_FDB_AGEING:.0f})") from None


_ageing.__name__ = "fdb-ageing"

OPTION_DEST = "mode option {}"  # the argparse dest of a mode option's flag: never an attribute name of ours
OPTION_FLAGS = "mode option flags"  # dest of {option name: its flag}, as build_parser made them


def option_flags(modes: Mapping[str, type[Encapsulator]]) -> dict[str, tuple[Option, list[str]]]:
    """The mode options that get a flag of their own (``--vni``, ``--key``, ``--seq``, ...): each name with its
    declaration and the modes that declare it. An untyped option, or one that two modes declare differently,
    gets none: it is given as --opt NAME=VALUE (which reaches every option of every mode)."""
    seen: dict[str, tuple[Option, list[str]]] = {}
    clash: set[str] = set()
    for mode, cls in modes.items():
        for name, option in declared(cls).items():
            if name in seen and seen[name][0] != option:
                clash.add(name)
            seen.setdefault(name, (option, []))[1].append(mode)
    return {name: v for name, v in seen.items() if name not in clash and v[0].kind is not None}


def _add_option_flag(p: argparse._ArgumentGroup, option: Option, owners: list[str]) -> str | None:
    """Add the flag of one mode option; return it, or None when its name is a core flag's."""
    flag = "--" + option.name.replace("_", "-")
    where = f"({'/'.join(owners)}; {option.summary()})"
    dest = OPTION_DEST.format(option.name)
    try:
        if option.kind is bool:
            if option.default:
                flag = "--no-" + flag[2:]
                p.add_argument(flag, dest=dest, action="store_false", default=None,
                               help=f"turn off: {option.help} {where}")
            else:
                p.add_argument(flag, dest=dest, action="store_true", default=None, help=f"{option.help} {where}")
            return flag

        def parse(text: str):
            try:
                return option.parse(text)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None

        parse.__name__ = option.label
        p.add_argument(flag, dest=dest, type=parse, metavar="N" if option.kind is int else "VALUE",
                       help=f"{option.help} {where}")
        return flag
    except argparse.ArgumentError:
        return None  # the name is a core flag's (a plugin's "port", say): --opt NAME=VALUE still reaches it


def build_parser(modes: Mapping[str, type[Encapsulator]] | Sequence[str]) -> argparse.ArgumentParser:
    """The command line. ``modes`` are the encapsulators (name → class), whose options become flags; a list of
    names alone gives the --mode choices without them."""
    p = _Parser(
        prog="tunneld",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    classes = modes if isinstance(modes, Mapping) else {}
    ports = ", ".join(f"{m} {c.transport.number}" for m, c in classes.items() if c.transport.kind == "udp")
    # Flags that a --config file may also set default to None here, so that "given on the command line"
    # (which overrides the file) can be told from "left at the default"; the defaults are applied in merge().
    p.add_argument("--config", metavar="FILE", help="read the tunnel from a TOML file (see config/); flags override it")
    p.add_argument("--check", action="store_true", help="validate the configuration and exit: 0 if good, 78 if not")
    p.add_argument("--mode", choices=list(modes), help=f"encapsulation (default: {DEFAULT_MODE}); see --list-modes")
    p.add_argument("--peer", metavar="ADDR", action="append",
                   help="underlay IPv4/IPv6 address of a far end (required); repeat for more peers")
    p.add_argument("--local", metavar="ADDR", help="underlay address to bind and send from (default: the kernel chooses)")
    p.add_argument("--dev", metavar="NAME", help=f"interface to create (default: {DEFAULT_DEV})")
    p.add_argument(
        "--address", metavar="CIDR", action="append", default=[],
        help="address to put on the interface, e.g. 192.168.100.1/24 or fd00::1/64; repeat for more",
    )
    p.add_argument("--port", type=_int_in(1, 65535, "port"),
                   help=f"UDP port to listen on and send to, modes over UDP only (default: the mode's"
                   f"{': ' * bool(ports)}{ports})")
    p.add_argument(
        "--opt", metavar="NAME=VALUE", action="append", default=[],
        help="any option of the chosen mode by its name, also one without a flag of its own (see --list-modes); "
        "repeat for more",
    )
    p.add_argument("--mtu", type=_int_in(68, 65535, "MTU"), help="interface MTU (default: underlay MTU minus the overhead)")
    p.add_argument("--mac", metavar="MAC", help="interface MAC address (default: stable, derived from machine, device and peer)")
    p.add_argument(
        "--no-offload", dest="offload", action="store_false", default=None,
        help="move one packet per system call: no TUN/TAP segmentation offload, no UDP GSO/GRO, no sendmmsg/recvmmsg "
        "(for debugging and comparison)",
    )
    p.add_argument("--df", choices=DF_CHOICES, help=DF_HELP)
    p.add_argument(
        "--kernel-gso", choices=KERNEL_GSO_CHOICES, default=None,
        help="who cuts VXLAN super-frames into datagrams: the kernel, through an egress TAP DEV-gso that it "
        "forwards from (Linux 6.17+; 'on': or fail to start), or tunneld ('off'). Default 'auto': the kernel "
        "where it can and where it is safe; the start-up log says which and why",
    )
    p.add_argument(
        "--workers", metavar="N", type=_workers,
        help=f"data-path processes, each with its own TAP queue and UDP socket (modes over UDP; raw-IP modes use 1). "
        f"Default 'auto': {AUTO_RULE}; see workers below",
    )
    p.add_argument(
        "--metrics-listen", metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics; [::1]:PORT for IPv6, '' to disable "
        f"(default: {DEFAULT_METRICS_LISTEN})",
    )
    p.add_argument("--fdb-max", metavar="N", type=_int_in(1, MAX_FDB_MAX, "fdb-max"),
                   help=f"L2 modes: at most N MAC entries; past it new MACs are not learnt and their frames go to "
                   f"every peer (default: {DEFAULT_FDB_MAX})")
    p.add_argument("--fdb-ageing", metavar="SECONDS", type=_ageing,
                   help=f"L2 modes: a learnt MAC not heard from for this long is forgotten; 0 = never "
                   f"(default: {DEFAULT_FDB_AGEING:.0f})")
    p.add_argument("--runtime-dir", metavar="DIR",
                   help=f"directory of the control socket DIR/DEV.sock (default: $RUNTIME_DIRECTORY if systemd "
                   f"sets it, else {DEFAULT_RUNTIME_DIR})")
    p.add_argument("--registry", metavar="etcd://HOST:PORT[,HOST:PORT...]/PREFIX",
                   help="find the other hosts through etcd: register this host under PREFIX/hosts/ and make every "
                   "registered host of the same mode and VNI a peer; --peer becomes optional (see docs/registry.md)")
    p.add_argument("--registry-ttl", metavar="SECONDS", type=_int_in(MIN_TTL, MAX_TTL, "registry-ttl"),
                   help=f"the registration's lease: a host that dies unannounced is forgotten after this "
                   f"(default: {DEFAULT_TTL})")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="(default: info)")
    p.add_argument("--list-modes", action="store_true", help="list the available encapsulations and exit")
    p.add_argument("--version", action="version", version=f"tunneld {__version__}")
    group = p.add_argument_group("mode options", "declared by each mode's encapsulator; given to another mode, refused")
    flags = {name: _add_option_flag(group, option, owners) for name, (option, owners) in option_flags(classes).items()}
    p.set_defaults(**{OPTION_FLAGS: {name: flag for name, flag in flags.items() if flag}})
    return p


def manpage_parser() -> argparse.ArgumentParser:
    """The whole command line as one parser, for the tunneld(8) page (``make man``, argparse-manpage): the
    daemon's flags with the built-in modes' options (installed plugins left out, so the page is the same on
    every machine), and the client commands (show, peer) as sub-commands. Only read, never used to parse."""
    modes, _ = discover()
    p = build_parser({name: cls for name, cls in modes.items() if cls.__module__.startswith("tunneld.")})
    p.man_short_description = "userspace tunnelling daemon: TAP/TUN devices over VXLAN, GRE or plugins"
    # The client commands are the control parser's own (help, usage, epilog), not a copy: its sub-command action
    # is listed in a group of this parser, so the page shows them; the daemon's usage line stays without them.
    control = build_control_parser()
    commands = next(a for a in control._actions if isinstance(a, argparse._SubParsersAction))
    p.add_argument_group("commands")._group_actions.append(commands)
    return p


def given_options(args: argparse.Namespace, item_error) -> dict[str, object]:
    """The mode options given on the command line: each option flag given, then --opt NAME=VALUE (strings)."""
    given = {name: getattr(args, OPTION_DEST.format(name)) for name in getattr(args, OPTION_FLAGS, {})
             if getattr(args, OPTION_DEST.format(name)) is not None}
    for item in args.opt:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            item_error(f"--opt {item!r}: expected NAME=VALUE")
        given[name.strip()] = value
    return given


def list_modes(modes: Mapping[str, type[Encapsulator]], flags: Mapping[str, str]) -> str:
    """--list-modes: one line per mode, then one per option it declares (``flags``: name → its flag)."""
    lines = []
    for name, cls in modes.items():
        lines.append(f"{name:<10} {cls.device.value.upper()}  {str(cls.transport):<12} {cls.description}")
        for option in declared(cls).values():
            flag = flags.get(option.name) or f"--opt {option.name}=..."
            lines.append(f"{'':<10} option {option.name}: {option.help} ({option.summary()}; {flag})")
    return "\n".join(lines)


class _JournalFormatter(logging.Formatter):
    """Prefix each line with its syslog priority ("<3>" error ... "<7>" debug): journald's stream transport
    reads it (SyslogLevelPrefix=, on by default) so `journalctl -p warning` works on our lines."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITY.get(record.levelno, 6)}>" + super().format(record)


def _stderr_is_journal() -> bool:
    """$JOURNAL_STREAM is "DEV:INODE" of the journal stream; it is inherited, so check stderr is still it."""
    try:
        dev, ino = (int(x) for x in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(level: str) -> None:
    # journald timestamps every line itself; elsewhere we do.
    handler = logging.StreamHandler(sys.stderr)
    if _stderr_is_journal():
        handler.setFormatter(_JournalFormatter("%(message)s"))
    elif os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# Command-line flag → TunnelConfig field; a flag given on the command line overrides the config file.
FLAG_FIELDS = ("mode", "local", "dev", "port", "mtu", "mac", "log_level", "metrics_listen", "offload", "kernel_gso", "df",
               "workers", "fdb_max", "fdb_ageing", "runtime_dir")


def merge(args: argparse.Namespace, file_values: dict, flag_options: dict | None = None) -> TunnelConfig:
    """The file's values overridden by the flags given (``flag_options``: --vni, --key, --opt, ...), validated.

    Raises ConfigError naming the problem (prefixed with the file when there is one)."""
    values = dict(file_values)
    values.update({f: getattr(args, f) for f in FLAG_FIELDS if getattr(args, f) is not None})
    if "runtime_dir" not in values and os.environ.get("RUNTIME_DIRECTORY"):
        # Neither flag nor file says: systemd's RuntimeDirectory= (the unit's own /run/tunneld/NAME) does.
        values["runtime_dir"] = os.environ["RUNTIME_DIRECTORY"].split(":")[0]
    tables = "peers" in values and not args.peer  # the peers come from the file's [[peer]] tables
    if args.peer:  # the flags' peers replace the file's list as a whole
        values.pop("peer", None)
        values["peers"] = tuple(PeerSpec(address) for address in args.peer)
    if args.address:
        values["addresses"] = tuple(args.address)
    if flag_options:
        values["extra"] = {**values.get("extra", {}), **flag_options}
    where = f"{args.config}: " if args.config else ""
    if args.registry or args.registry_ttl is not None:  # the flags override the file's [registry] table
        try:
            registry = values.get("registry")
            if args.registry:
                endpoints, prefix = parse_url(args.registry)
                registry = RegistryConfig(endpoints, prefix) if registry is None else dataclasses.replace(
                    registry, endpoints=endpoints, prefix=prefix)
            if registry is None:
                raise RegistryError("registry-ttl: without a registry (--registry or a [registry] table)")
            if args.registry_ttl is not None:
                registry = dataclasses.replace(registry, ttl=args.registry_ttl)
        except RegistryError as e:
            raise ConfigError(f"{where}{e}") from None
        values["registry"] = registry
    if ("peer" not in values and not values.get("peers") and values.get("registry") is None
            and values.get("mode") != "wireguard"):  # WireGuard: `wg set` gives it peers once it runs
        key = "tunnel.peer" if args.config else "--peer"
        raise ConfigError(f"{where}{key}: missing; required: the underlay address of the far end")
    try:
        cfg = validate(TunnelConfig(**values))
    except ConfigError as e:
        if args.config:  # validate() names flags ("log-level: ..."); name the file's key instead
            what, _, rest = str(e).partition(": ")
            if tables and what.startswith("peer"):
                key = what  # "peer" or "peer ADDR": the [[peer]] tables
            else:
                key = FILE_KEYS.get(what.replace("-", "_"), f"tunnel.{what}")
            raise ConfigError(f"{where}{key}: {rest}") from None
        raise
    return cfg


class HostError(ConfigError):
    """The configuration does not fit this host (the peer is one of its own addresses, ...): exit 78."""


def on_host(cfg: TunnelConfig, where: str) -> None:
    """Every peer and the local address checked against this host's own addresses; raises HostError."""
    try:
        for spec in cfg.peers:
            check_on_host(spec.address, cfg.local, address_kind, is_own_address)
    except ConfigError as e:
        raise HostError(f"{where}tunnel.{e}" if where else str(e)) from None


def registry_local(cfg: TunnelConfig, where: str = "") -> str:
    """The underlay address this host registers: ``local`` if given, else the source address the kernel picks
    towards the first etcd member it can route to (asked by connecting a UDP socket: nothing is sent). It must
    be of the static peers' IP version, as the one socket carrying them all is."""
    local = cfg.local
    if local is None or ipaddress.ip_address(local).is_unspecified:
        for endpoint in cfg.registry.endpoints:
            host, _, port = endpoint.rpartition(":")
            try:
                info = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_DGRAM)[0]
                with socket.socket(info[0], socket.SOCK_DGRAM) as s:
                    s.connect(info[4])
                    local = s.getsockname()[0]
                break
            except OSError:
                continue
        else:
            raise HostError(f"{where}registry: cannot tell this host's underlay address (no route to any etcd "
                            "member): give --local ADDR, the address the other hosts reach this one at")
        ip = ipaddress.ip_address(local)
        if ip.is_loopback:
            raise HostError(f"{where}registry: the etcd members are reached over loopback ({local}): give --local "
                            "ADDR, the address the other hosts reach this one at")
        if cfg.peers and ip.version != ipaddress.ip_address(cfg.peer).version:
            raise HostError(f"{where}registry: the address towards etcd ({local}) is not of the static peers' IP "
                            "version: give --local ADDR")
    return local


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in CONTROL_COMMANDS:
        return control_main(argv)  # (the console script sends them to tunneld.control.client without importing this module)
    modes, broken = discover()
    parser = build_parser(modes)
    args = parser.parse_args(argv)
    setup_logging(args.log_level or "info")
    for plugin in broken:
        log.warning("encapsulator plugin %r (%s) skipped: %s", plugin.name, plugin.target, plugin.problem)
    for name, cls in modes.items():
        if is_legacy(cls):
            log.warning("encapsulator plugin %r declares its options as name -> help text, which is deprecated: "
                        "declare tunneld.encap.base.Option(NAME, TYPE, HELP, ...) instead (until then its values "
                        "reach from_options unchecked, and get no flags of their own)", name)
    flags = getattr(args, OPTION_FLAGS)
    if args.list_modes:
        print(list_modes(modes, flags))
        return 0
    if not args.config and not args.peer and not args.registry and args.mode != "wireguard":
        parser.error("--peer is required: the underlay address of the far end (or give --config FILE or --registry)")
    flag_options = given_options(args, parser.error)  # they override the file's

    def load() -> TunnelConfig:
        """The configuration from the file and the flags; raises ConfigFileError or ConfigError. Also the reload."""
        cfg = merge(args, load_file(args.config, modes) if args.config else {}, flag_options)
        takes = declared(modes[cfg.mode]) if cfg.mode in modes else {}
        for name, flag in flags.items():  # a flag of another mode's option; --opt names are build_codec's to judge
            if getattr(args, OPTION_DEST.format(name)) is not None and name not in takes:
                owners = "/".join(option_flags(modes)[name][1])
                raise ModeOptionError(f"only for mode {owners}, not {cfg.mode!r}", flag)
        if cfg.mode == "wireguard" and args.peer:
            raise ConfigError("--peer: a wireguard peer is named by its public key: give it in a [[peer]] table "
                              "(public_key, endpoint, allowed_ips) of a --config file")
        if cfg.mode == "wireguard":  # the key file read here, once: the codec gets bytes, never a path
            try:
                cfg = wireguard_keys(cfg)
            except ConfigError as e:
                raise ConfigError(f"{args.config}: {e}" if args.config else str(e).replace("private_key", "--private-key", 1)) from None
        try:
            codec = build_codec(cfg, modes)  # the mode's options, checked once, by its declarations, without the kernel
        except ModeOptionError as e:
            if e.key in ("port", "mode"):  # name the setting as the operator wrote it: the flag, else the file's key
                from_file = args.config and getattr(args, e.key) is None
                raise ModeOptionError(e.text, f"{args.config}: tunnel.{e.key}" if from_file else f"--{e.key}") from None
            if args.config:
                raise ModeOptionError(f"{args.config}: {e}") from None
            raise
        try:
            cfg = fit_to_device(cfg, codec.device)  # routes for L3 modes, macs for L2; one L3 peer routes all
        except ConfigError as e:
            raise ConfigError(f"{args.config}: {e}" if args.config else str(e)) from None
        if codec.device is DeviceKind.TUN and len(cfg.peers) > 1:
            for spec in cfg.peers:
                if not spec.routes:
                    log.warning("peer %s has no routes: it reaches nothing (give it routes = [...])", spec.label())
        if not args.check:  # --check may run on another machine; a start or a reload runs here
            on_host(cfg, f"{args.config}: " if args.config else "")
            if cfg.registry is not None:  # the address registered, found once the host can be asked
                cfg = dataclasses.replace(cfg, local=registry_local(cfg, f"{args.config}: " if args.config else ""))
        return cfg

    try:
        cfg = load()
    except ConfigFileError as e:
        for line in e.problems:
            print(f"tunneld: {line}", file=sys.stderr)
        return EX_CONFIG
    except EncapsulatorFailed as e:
        print(f"tunneld: error: {e}", file=sys.stderr)
        return e.code
    except (ModeOptionError, HostError) as e:
        print(f"tunneld: {e}" if args.config else f"tunneld: error: {e}", file=sys.stderr)
        return EX_CONFIG
    except ConfigError as e:
        if not args.config:  # a bad flag: exit 2, as argparse does for the others; the line says it all
            print(f"tunneld: error: {e}", file=sys.stderr)
            return 2
        print(f"tunneld: {e}", file=sys.stderr)
        return EX_CONFIG
    if args.check:
        to = (f"peer {cfg.peer}" if len(cfg.peers) == 1 else f"{len(cfg.peers)} peers ({cfg.peer}, ...)" if cfg.peers
              else "no peers yet (wg set gives them)")
        if cfg.registry:
            to = (f"{to} and " if cfg.peers else "") + f"the hosts in {cfg.registry.describe()}"
        print(f"{args.config or 'command line'}: ok: {cfg.mode} to {to} on {cfg.dev}")
        return 0
    setup_logging(cfg.log_level)
    try:
        return run(cfg, modes, reload=load if args.config else None)
    except StartupError as e:
        print(f"tunneld: error: {e}", file=sys.stderr)
        return e.code

"""Command line: parse, validate, compose, run. The only module that knows every other one."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from tunneld import __version__
from tunneld.config import DEFAULT_DEV, DEFAULT_METRICS_LISTEN, LOG_LEVELS, ConfigError, TunnelConfig, validate
from tunneld.daemon import StartupError, run
from tunneld.plugins import discover

log = logging.getLogger("tunneld")

DESCRIPTION = """\
Link this host to a peer with a userspace tunnel. tunneld creates a TAP (or TUN) interface, carries every
frame the kernel sends into it to the peer inside an encapsulation over the underlay network, and writes
what the peer sends back into the interface. Run the same command on both hosts, each naming the other
as --peer.
"""

EPILOG = """\
examples:
  host A (underlay 10.0.0.1):  tunneld --mode vxlan --peer 10.0.0.2 --address 192.168.100.1/24
  host B (underlay 10.0.0.2):  tunneld --mode vxlan --peer 10.0.0.1 --address 192.168.100.2/24
  then from A:                 ping 192.168.100.2

  It interoperates with the Linux kernel's own VXLAN on the far end:
    ip link add vx0 type vxlan id 1 remote 10.0.0.1 dstport 4789 dev eth0

defaults:
  The MTU is the underlay route's MTU minus the encapsulation overhead (VXLAN over IPv4: 50 bytes, so 1450
  on a 1500-byte underlay); frames too big to cross without fragmenting are dropped and counted. The TAP
  interface gets a stable MAC address derived from this machine, the device name and the peer, so a
  restarted tunneld looks like the same interface to its neighbours. SIGINT or SIGTERM stop it cleanly
  (exit 0) and the interface is removed.

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


def build_parser(modes: Sequence[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tunneld",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--mode", choices=modes, default="vxlan", help="encapsulation (default: %(default)s); see --list-modes")
    p.add_argument("--peer", metavar="ADDR", help="underlay IPv4/IPv6 address of the far end (required)")
    p.add_argument("--local", metavar="ADDR", help="underlay address to bind and send from (default: the kernel chooses)")
    p.add_argument("--dev", metavar="NAME", default=DEFAULT_DEV, help="interface to create (default: %(default)s)")
    p.add_argument(
        "--address", metavar="CIDR", action="append", default=[],
        help="address to put on the interface, e.g. 192.168.100.1/24 or fd00::1/64; repeat for more",
    )
    p.add_argument("--vni", type=_int_in(0, (1 << 24) - 1, "VNI"), default=1, help="VXLAN network identifier (default: %(default)s)")
    p.add_argument("--port", type=_int_in(1, 65535, "port"), help="UDP port to listen on and send to (VXLAN default: 4789, IANA)")
    p.add_argument("--key", type=_int_in(0, (1 << 32) - 1, "key"), help="GRE key (RFC 2890), sent and required (gre, gretap)")
    p.add_argument("--seq", action="store_true", help="GRE sequence numbers: send them, drop late/duplicate packets (gre, gretap)")
    p.add_argument("--csum", action="store_true", help="GRE checksums: compute on send, require and verify on receipt (gre, gretap)")
    p.add_argument(
        "--opt", metavar="NAME=VALUE", action="append", default=[],
        help="an option of the chosen mode, for plugin modes (see --list-modes); repeat for more",
    )
    p.add_argument("--mtu", type=_int_in(68, 65535, "MTU"), help="interface MTU (default: underlay MTU minus the overhead)")
    p.add_argument("--mac", metavar="MAC", help="interface MAC address (default: stable, derived from machine, device and peer)")
    p.add_argument(
        "--metrics-listen", metavar="HOST:PORT", default=DEFAULT_METRICS_LISTEN,
        help="serve Prometheus metrics at http://HOST:PORT/metrics; [::1]:PORT for IPv6, '' to disable "
        "(default: %(default)s)",
    )
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="(default: %(default)s)")
    p.add_argument("--list-modes", action="store_true", help="list the available encapsulations and exit")
    p.add_argument("--version", action="version", version=f"tunneld {__version__}")
    return p


def setup_logging(level: str) -> None:
    # journald timestamps every line itself; elsewhere we do.
    fmt = "%(levelname)s %(message)s" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    modes, broken = discover()
    parser = build_parser(list(modes))
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    for plugin in broken:
        log.warning("encapsulator plugin %r (%s) skipped: %s", plugin.name, plugin.target, plugin.problem)
    if args.list_modes:
        for name, cls in modes.items():
            print(f"{name:<10} {cls.device.value.upper()}  {str(cls.transport):<12} {cls.description}")
            for option, text in cls.options.items():
                print(f"{'':<10} option {option}: {text}")
        return 0
    if not args.peer:
        parser.error("--peer is required: the underlay address of the far end")
    extra: dict[str, object] = {}
    for item in args.opt:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--opt {item!r}: expected NAME=VALUE")
        extra[name.strip()] = value
    if args.key is not None:
        extra["key"] = args.key
    if args.seq:
        extra["seq"] = True
    if args.csum:
        extra["csum"] = True
    try:
        cfg = validate(
            TunnelConfig(
                peer=args.peer,
                mode=args.mode,
                local=args.local,
                dev=args.dev,
                addresses=tuple(args.address),
                vni=args.vni,
                port=args.port,
                mtu=args.mtu,
                mac=args.mac,
                log_level=args.log_level,
                extra=extra,
                metrics_listen=args.metrics_listen,
            )
        )
    except ConfigError as e:
        parser.error(str(e))
    try:
        return run(cfg, modes)
    except StartupError as e:
        print(f"tunneld: error: {e}", file=sys.stderr)
        return e.code

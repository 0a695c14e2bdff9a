"""The client commands, ``tunneld show`` and ``tunneld peer add|remove``: one request to a running daemon's
control socket (tunneld/control/server.py), its answer printed.

A module of its own, light to import (no NumPy, uvloop or pyroute2: the daemon's modules are not loaded), so
that asking a daemon costs a fraction of a second, not the daemon's start-up: the console script
(``tunneld.__main__``) sends these commands here before anything else is imported.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from tunneld.control import server as control
from tunneld.config.schema import DEFAULT_RUNTIME_DIR


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line with a pointer to --help, as the README promises, not argparse's usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


CONTROL_COMMANDS = ("show", "peer")  # the client sub-commands; anything else is the daemon's command line

CONTROL_EPILOG = f"""\
The daemon serves its control socket at RUNTIME_DIR/DEV.sock (mode 0600; root and the daemon's own user
only); RUNTIME_DIR is {DEFAULT_RUNTIME_DIR} unless --runtime-dir (the daemon's too) says otherwise. Without
RUNTIME_DIR/DEV.sock, the one RUNTIME_DIR/*/DEV.sock is used (the systemd unit's /run/tunneld/NAME).

exit status:
  0 done, {control.EX_FAILURE} the daemon refused (its one-line reason is printed), 2 bad arguments,
  {control.EX_UNAVAILABLE} no daemon answers at the socket, {control.EX_NOPERM} not allowed to use it.
"""


def build_control_parser() -> argparse.ArgumentParser:
    """`tunneld show` and `tunneld peer add|remove`: clients of a running daemon's control socket."""
    p = _Parser(prog="tunneld", description="Ask a running tunneld what it carries, or change its peers live.",
                epilog=CONTROL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("dev", metavar="DEV", help="the tunnel's interface name (its --dev)")
    where.add_argument("--runtime-dir", metavar="DIR", default=DEFAULT_RUNTIME_DIR,
                       help=f"where the daemon's socket is (default: {DEFAULT_RUNTIME_DIR})")
    show = sub.add_parser("show", parents=[where], help="the device, its peers and counters, the FDB",
                          epilog=CONTROL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("--json", action="store_true", help="print one JSON object (schema: docs/control-socket.md)")
    peer = sub.add_parser("peer", help="add or remove a peer, live")
    what = peer.add_subparsers(dest="action", metavar="add|remove", required=True)
    add = what.add_parser("add", parents=[where], help="add a peer, or change a known one (its counters stay)",
                          epilog=CONTROL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add.add_argument("address", metavar="ADDR", help="the peer's underlay IPv4/IPv6 address")
    add.add_argument("--name", help="a label for `tunneld show`")
    add.add_argument("--route", metavar="CIDR", action="append", default=[],
                     help="L3 modes: a prefix reached through this peer (repeat for more)")
    add.add_argument("--mac", metavar="MAC", action="append", default=[],
                     help="L2 modes: a static FDB entry for a MAC behind this peer (repeat for more)")
    remove = what.add_parser("remove", parents=[where], help="remove a peer, its FDB entries and routes",
                             epilog=CONTROL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    remove.add_argument("address", metavar="ADDR", help="the peer's underlay address")
    return p


def control_request(args: argparse.Namespace) -> dict:
    """The request object a parsed control command sends (control/server.py's protocol)."""
    if args.command == "show":
        return {"command": "show"}
    if args.action == "remove":
        return {"command": "peer-remove", "address": args.address}
    request = {"command": "peer-add", "address": args.address, "routes": args.route, "macs": args.mac}
    if args.name is not None:
        request["name"] = args.name
    return request


def main(argv: Sequence[str]) -> int:
    """`tunneld show ...` / `tunneld peer ...`: one request to the daemon, its answer printed."""
    args = build_control_parser().parse_args(argv)
    try:
        path = control.find_socket(args.runtime_dir, args.dev)
        reply = control.call(path, control_request(args))
    except control.ControlError as e:
        print(f"tunneld: {e}", file=sys.stderr)
        return e.code
    if reply.get("warning"):
        print(f"tunneld: warning: {reply['warning']}", file=sys.stderr)
    if args.command == "show":
        result = reply.get("result", {})
        print(json.dumps(result, indent=None, sort_keys=True) if args.json else control.render_show(result))
    return 0



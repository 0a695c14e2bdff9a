"""The client commands, ``tunneld show`` and ``tunneld peer add|remove``: one request to a running daemon's
control socket (tunneld/control/server.py), its answer printed.

Light to import, and kept so by tests/test_control_client.py: the standard library only (no NumPy, uvloop,
pyroute2, prometheus_client or aetcd, and none of tunneld's other modules), so that asking a daemon costs its
request, not the daemon's start-up. A monitoring loop may run ``tunneld show`` every few seconds beside a busy
tunnel. The console script (``tunneld.__main__``) sends these commands here before anything else is imported;
the server imports what both ends share from here (where the socket is, the exit statuses, ``ControlError``).

Where the socket is (``socket_path``): ``RUNTIME_DIR/DEV.sock`` in the host's network namespace;
``RUNTIME_DIR/DEV:netINODE.sock`` in any other, INODE being the namespace's own (``lsns -t net``, ``readlink
/proc/self/ns/net``). Namespaces share ``/run``, and a device name is only unique within its namespace: two
tunnelds serving ``tunneld0`` in two namespaces (how one machine tests a link) each have their socket, and
``tunneld show tunneld0`` typed in a namespace reaches that namespace's daemon. The host's namespace is the
one whose inode is NET_NS_INIT_INO (kernels from 6.18 give it that fixed number), or PID 1's. When neither
tells (an older kernel, and ``/proc/1`` hidden: the systemd unit's ProtectProc=invisible hides it from the
daemon, and some sandboxes from root), the daemon takes the tagged name, which is never ambiguous, and a
client that cannot tell either tries the tagged name, then the plain one. So the unit's socket stays
``/run/tunneld/NAME/DEV.sock`` on recent kernels (``DEV:netINODE.sock`` in the same directory on older ones),
and root's ``tunneld show DEV`` finds it either way. As a last check the client asks the kernel who listens
(SO_PEERCRED) and refuses a daemon it can see is in another network namespace, so that a command never acts
on another namespace's tunnel unawares.

Busy: a daemon serves MAX_CLIENTS connections and closes the one that has waited longest for a request to make
room for a new one (server.py), so an operator's command gets through idle and hostile clients alike. A full
connection queue (``connect`` says EAGAIN) or a ``busy`` reply (every connection mid-reply) is retried until
the call's deadline; then the command fails saying so (EX_TEMPFAIL), never "no tunneld answers".
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import socket
import struct
import sys
import time
from typing import Sequence

DEFAULT_RUNTIME_DIR = "/run/tunneld"  # the control socket is RUNTIME_DIR/DEV.sock (tunneld.config's default too)
NETNS = "/proc/{}/ns/net"  # a process's network namespace, as a file whose inode names it
NET_NS_INIT_INO = 0xEFFFFFF9  # the host's network namespace's inode where the kernel fixes it (linux/nsfs.h)
BUSY_RETRIES = (0.05, 0.1, 0.2, 0.4, 0.8)  # a client's first pauses (s) before it asks a busy daemon again
BUSY_PAUSE = 1.0  # ... and every later one, until the call's deadline
CALL_TIMEOUT = 10.0  # seconds a client command waits for its answer, retries included

# Client exit statuses (sysexits(3)), documented in the README and `tunneld show --help`.
EX_FAILURE = 1  # the daemon answered with an error
EX_UNAVAILABLE = 69  # no daemon answers at that socket
EX_TEMPFAIL = 75  # a daemon is there but too busy to answer before the deadline
EX_NOPERM = 77  # not allowed to talk to it

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ControlError(Exception):
    """The control socket cannot be served (start-up) or reached (client); ``str()`` is one line."""

    def __init__(self, message: str, code: int = EX_FAILURE) -> None:
        super().__init__(message)
        self.code = code


# -- where the socket is -----------------------------------------------------------------------------------------


def netns_of(pid: int | str = "self") -> tuple[int, int] | None:
    """The network namespace of process ``pid`` as (device, inode) of its nsfs file; None if it cannot be seen."""
    try:
        st = os.stat(NETNS.format(pid))
    except OSError:
        return None
    return st.st_dev, st.st_ino


def in_host_netns(pid: int | str = "self") -> bool | None:
    """Whether process ``pid`` is in the host's network namespace; None when that cannot be told."""
    own = netns_of(pid)
    if own is None:
        return None
    if own[1] == NET_NS_INIT_INO:
        return True
    host = netns_of(1)
    return None if host is None else own == host


def netns_tag(pid: int | str = "self") -> str:
    """What a socket's name carries for the network namespace of process ``pid``: "" in the host's (or without
    /proc at all), else ``:netINODE``, also when it cannot be told whether it is the host's."""
    own = netns_of(pid)
    if own is None or in_host_netns(pid):
        return ""
    return f":net{own[1]}"


def socket_path(directory: str, dev: str, tag: str | None = None) -> str:
    """The control socket of ``dev`` in ``directory`` for this process's network namespace (or ``tag``'s)."""
    return os.path.join(directory, f"{dev}{netns_tag() if tag is None else tag}.sock")


def find_socket(directory: str, dev: str) -> str:
    """The client's socket for ``dev`` in this network namespace: ``DIR/DEV.sock`` (tagged outside the host's
    namespace; both names when this cannot be told); failing that, the one ``DIR/*/`` socket of that name (the
    systemd unit gives each instance its own ``/run/tunneld/NAME``). ControlError when several instances
    serve DEV."""
    own, host = netns_of(), in_host_netns()
    plain, tagged = f"{dev}.sock", None if own is None else f"{dev}:net{own[1]}.sock"
    if host:  # then tagged: a daemon here that could not tell (the unit, on a kernel without the fixed inode)
        names = [plain, tagged]
    elif host is None:  # then plain: maybe the host's (elsewhere() refuses it if it is not)
        names = [tagged, plain]
    else:
        names = [tagged]
    names = [name for name in names if name is not None]
    for name in names:
        path = os.path.join(directory, name)
        if os.path.lexists(path):
            return path
        try:
            found = sorted(os.path.join(entry.path, name) for entry in os.scandir(directory)
                           if entry.is_dir(follow_symlinks=False) and os.path.lexists(os.path.join(entry.path, name)))
        except OSError:
            continue
        if len(found) > 1:
            raise ControlError(f"{len(found)} sockets for {dev}: {', '.join(found)}; say which with --runtime-dir",
                               EX_UNAVAILABLE)
        if found:
            return found[0]
    return os.path.join(directory, names[0])


def listener(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process on the other end of a connected unix socket, as the kernel recorded them
    (SO_PEERCRED: for the client, the daemon when it called listen()). pid 0: in a pid namespace we cannot see."""
    pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid


def elsewhere(pid: int) -> str | None:
    """Why the daemon ``pid`` is not this network namespace's, in words; None when it is, or when it cannot be
    told (its /proc entry hidden or another user's)."""
    theirs, ours = (netns_of(pid) if pid > 0 else None), netns_of()
    if theirs is None or ours is None or theirs == ours:
        return None
    return f"tunneld pid {pid} in another network namespace (net:[{theirs[1]}]; this is net:[{ours[1]}])"


# -- the call ----------------------------------------------------------------------------------------------------


class _Busy(Exception):
    """This attempt met a busy daemon (a full connection queue, a ``busy`` reply); the last words are kept."""


def call(path: str, request: dict, timeout: float = CALL_TIMEOUT) -> dict:
    """Send one request to the daemon at ``path`` and return its reply object; ControlError (with the exit
    status for the command line) when there is no daemon, no permission, no sensible answer, or a daemon too
    busy for us until ``timeout``."""
    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        try:
            reply = _call_once(path, request, max(0.1, deadline - time.monotonic()))
            break
        except _Busy as e:
            pause = BUSY_RETRIES[attempt] if attempt < len(BUSY_RETRIES) else BUSY_PAUSE
            pause *= 0.5 + random.random()  # jittered, so that a crowd does not return all at once
            attempt += 1
            if time.monotonic() + pause >= deadline:
                raise ControlError(f"{path}: {e} (tried {attempt} times in {timeout:g} s)", EX_TEMPFAIL) from None
            time.sleep(pause)
    if not reply["ok"]:
        raise ControlError(str(reply.get("error", "refused")), EX_NOPERM if reply.get("denied") else EX_FAILURE)
    return reply


def _call_once(path: str, request: dict, timeout: float) -> dict:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"no tunneld answers at {path} (is the tunnel running in this network namespace? "
                               "--runtime-dir?)", EX_UNAVAILABLE) from None
        except PermissionError:
            raise ControlError(f"{path}: permission denied (run as root or as the daemon's user)",
                               EX_NOPERM) from None
        except BlockingIOError:  # EAGAIN: the daemon's queue of connections not yet accepted is full
            raise _Busy("a tunneld is there but its connection queue stays full; try again") from None
        except OSError as e:
            raise ControlError(f"{path}: {e.strerror or e}", EX_UNAVAILABLE) from None
        other = elsewhere(listener(sock)[0])
        if other is not None:
            raise ControlError(f"{path} is served by {other}: not this namespace's tunnel; run the command in "
                               "that namespace, or give its daemon and this command a --runtime-dir of their own",
                               EX_UNAVAILABLE)
        try:
            try:
                sock.sendall(json.dumps(request, separators=(",", ":")).encode() + b"\n")
                sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # it answered (refused: busy, another uid) and closed before reading us: read that answer
            data = bytearray()
            while chunk := sock.recv(1 << 16):
                data += chunk
        except socket.timeout:
            raise ControlError(f"{path}: no reply within {timeout:g} s", EX_TEMPFAIL) from None
        except ConnectionResetError:
            data = bytearray()  # closed on us before a reply (made room for others): as busy, below
        except OSError as e:
            raise ControlError(f"{path}: {e.strerror or e}") from None
    finally:
        sock.close()
    if not data:
        raise _Busy("the tunneld there closed the connection without a reply (too many clients?)")
    try:
        reply = json.loads(data.split(b"\n", 1)[0])
        assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool)
    except (ValueError, AssertionError):
        raise ControlError(f"{path}: not a tunneld reply") from None
    if reply["ok"] is False and reply.get("busy"):
        raise _Busy(f"the tunneld there says: {reply.get('error', 'busy')}")
    return reply


# -- tunneld show ----------------------------------------------------------------------------------------------


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.1f} s ago"
    minutes, s = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours} h " if hours else "") + f"{minutes} min {s} s ago"


def render_show(d: dict) -> str:
    """``tunneld show``'s human text, after ``wg show``: the device, each peer, the FDB."""
    out = [f"device: {d['device']}"]
    for key, label in (("mode", "mode"), ("vni", "vni"), ("listen_port", "listen port"), ("mtu", "mtu"),
                       ("workers", "workers")):
        if d.get(key) is not None:
            out.append(f"  {label}: {d[key]}")
    if "fdb" in d:
        counts = ", ".join(f"{what} {d.get(f'fdb_{what}_total', 0)}" for what in ("learnt", "moved", "refused"))
        out.append(f"  fdb: {len(d['fdb'])} entries (max {d.get('fdb_max', '?')}), {counts}; "
                   f"flooded {d.get('flooded_packets_total', 0)} packets")
    for p in d.get("peers", []):
        name = f" ({p['name']})" if p.get("name") else ""
        wireguard = "public_key" in p
        inner = "transfer"
        if wireguard:  # as `wg show` lists a peer, then tunneld's own lines
            out += ["", f"peer: {p['public_key']}{name}", f"  endpoint: {p.get('endpoint')}",
                    f"  allowed ips: {', '.join(p.get('allowed_ips') or []) or '(none)'}"]
            if p.get("latest_handshake_age_s") is not None:
                out.append(f"  latest handshake: {_age(p['latest_handshake_age_s'])}")
            out.append(f"  transfer: {_bytes(p.get('transfer_rx_bytes', 0))} received, "
                       f"{_bytes(p.get('transfer_tx_bytes', 0))} sent")
            if p.get("persistent_keepalive"):
                out.append(f"  persistent keepalive: every {p['persistent_keepalive']} seconds")
            inner = "inner"
        else:
            out += ["", f"peer: {p['address']}{name}"]
        out.append(f"  source: {p.get('source', '?')}")
        out.append(f"  state: {p.get('state', '?')}, last heard: {_age(p.get('last_rx_age_s'))}")
        out.append(f"  {inner}: {p['rx_packets']} packets / {_bytes(p['rx_bytes'])} received, "
                   f"{p['tx_packets']} packets / {_bytes(p['tx_bytes'])} sent")
        out.append(f"  dropped: {p.get('dropped', 0)}")
        for key in ("macs",) if wireguard else ("routes", "macs"):
            if p.get(key):
                out.append(f"  {key}: {', '.join(p[key])}")
    if d.get("fdb"):
        width = max(len(e["peer"]) for e in d["fdb"])
        out += ["", "fdb:", f"  {'MAC':<17}  {'PEER':<{width}}  {'TYPE':<6}  AGE"]
        for e in d["fdb"]:
            kind = "static" if e["static"] else "learnt"
            age = "-" if e["static"] else f"{e['age_s']:.0f} s"
            out.append(f"  {e['mac']:<17}  {e['peer']:<{width}}  {kind:<6}  {age}")
    return "\n".join(out)


# -- the command line --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line with a pointer to --help, as the README promises, not argparse's usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


CONTROL_COMMANDS = ("show", "peer")  # the client sub-commands; anything else is the daemon's command line

CONTROL_EPILOG = f"""\
The daemon serves its control socket at RUNTIME_DIR/DEV.sock (mode 0600; root and the daemon's own user
only); RUNTIME_DIR is {DEFAULT_RUNTIME_DIR} unless --runtime-dir (the daemon's too) says otherwise. In a network
namespace other than the host's the name carries the namespace's inode, RUNTIME_DIR/DEV:netINODE.sock, so that
daemons for one DEV in several namespaces each have theirs and a command reaches its own namespace's daemon.
Without that socket, the one RUNTIME_DIR/*/ socket of that name is used (the systemd unit's /run/tunneld/NAME).

exit status:
  0 done, {EX_FAILURE} the daemon refused (its one-line reason is printed), 2 bad arguments,
  {EX_UNAVAILABLE} no daemon answers at the socket (in this network namespace), {EX_TEMPFAIL} the daemon stayed too busy
  to answer, {EX_NOPERM} not allowed to use it.
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
        path = find_socket(args.runtime_dir, args.dev)
        reply = call(path, control_request(args))
    except ControlError as e:
        print(f"tunneld: {e}", file=sys.stderr)
        return e.code
    if reply.get("warning"):
        print(f"tunneld: warning: {reply['warning']}", file=sys.stderr)
    if args.command == "show":
        result = reply.get("result", {})
        print(json.dumps(result, indent=None, sort_keys=True) if args.json else render_show(result))
    return 0

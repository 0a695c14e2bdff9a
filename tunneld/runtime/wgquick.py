"""``tunneld-wg-quick IFACE``: tunneld as wg-quick's userspace WireGuard (``WG_QUICK_USERSPACE_IMPLEMENTATION``).

What wg-quick expects of it (read /usr/bin/wg-quick, ``add_if``): when ``ip link add IFACE type wireguard`` fails
(no kernel module, as here) it runs ``$WG_QUICK_USERSPACE_IMPLEMENTATION IFACE`` and, once that returns 0, drives
the interface like a kernel one: ``wg setconf IFACE`` (key, listen port, peers: through the UAPI socket),
``ip address add``, ``ip link set mtu N up``, routes. wireguard-go meets that by forking into the background and
returning once its interface and socket exist. So does this:
  1. starts ``tunneld --mode wireguard --dev IFACE --port PORT`` in a session of its own (no key, no peers:
     ``wg setconf`` gives them), PORT one the kernel picks (as wireguard-go, where the file names no ListenPort;
     ``ListenPort =`` moves it, live);
  2. returns 0 once IFACE exists and /var/run/wireguard/IFACE.sock answers; otherwise stops the daemon and
     exits 1 with one line (the daemon's own, when it said why).
``wg-quick down`` deletes the interface: the daemon sees its device go and stops, removing its socket (as
wireguard-go does).

The daemon's log: TUNNELD_WG_LOG=FILE appends it there; otherwise it goes to this command's stderr until the
interface is up and is dropped after (wireguard-go, in the background, keeps none either).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Sequence

from tunneld.control.wgapi import check_ifname, socket_path
from tunneld.io import netlink

START_TIMEOUT = 20.0  # seconds for the interface and its socket to appear
POLL = 0.05
LOG_ENV = "TUNNELD_WG_LOG"


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _free_port() -> int:
    """A UDP port nothing here listens on, as the kernel picks one (the daemon binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: tunneld-wg-quick IFACE  (as wg-quick's WG_QUICK_USERSPACE_IMPLEMENTATION)", file=sys.stderr)
        return 2
    try:
        name = check_ifname(argv[0])
    except ValueError as e:
        print(f"tunneld-wg-quick: {e}", file=sys.stderr)
        return 1
    path = socket_path(name)
    log_file = os.environ.get(LOG_ENV)
    out = open(log_file, "ab") if log_file else subprocess.PIPE  # noqa: SIM115 - the child's, closed below
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "tunneld", "--mode", "wireguard", "--dev", name, "--port", str(_free_port()),
             "--metrics-listen", ""],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out, start_new_session=True, close_fds=True)
    except OSError as e:
        print(f"tunneld-wg-quick: cannot start tunneld: {e.strerror}", file=sys.stderr)
        return 1
    finally:
        if log_file:
            out.close()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if child.poll() is not None:
            said = child.stderr.read().decode(errors="replace") if child.stderr else ""
            if log_file:
                with open(log_file, errors="replace") as f:
                    said = f.read()[-4096:]
            why = _last_line(said) or f"tunneld exited with status {child.returncode}"
            print(f"tunneld-wg-quick: {name}: {why}", file=sys.stderr)
            return 1
        if netlink.link_exists(name) and _answers(path):
            if child.stderr is not None:
                child.stderr.close()  # the daemon's later lines are dropped (TUNNELD_WG_LOG keeps them)
            return 0
        time.sleep(POLL)
    child.terminate()
    try:
        child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        child.kill()
    print(f"tunneld-wg-quick: {name}: not up within {START_TIMEOUT:.0f} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

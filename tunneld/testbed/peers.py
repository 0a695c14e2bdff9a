"""The tunnel ends a testbed's hosts run: tunneld itself, started as the user would, and the Linux kernel's
own VXLAN device, the reference implementation.

A ``Tunneld`` is a real process (the installed ``tunneld`` script) inside a host; the constructor returns once
its interface is up, or kills the process and raises with its own output. ``features()`` is ethtool's view of
that interface's offloads; ``drops()`` reads the drop counters out of the summary line tunneld logs when it
shuts down.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from tunneld.testbed.netns import OVERLAY_V4, OVERLAY_V6, RUNTIME_DIR, Host
from tunneld.testbed.procfs import children_of

VENV_BIN = Path(sys.executable).parent
TUNNELD = str(VENV_BIN / "tunneld") if (VENV_BIN / "tunneld").exists() else shutil.which("tunneld") or "tunneld"
DEV = "tunneld0"  # the interface a Tunneld creates unless told otherwise


class Tunneld:
    """A tunneld process in a host; ``stop()`` sends SIGTERM and returns the exit status."""

    def __init__(self, host: Host, *args: str, dev: str = DEV, wait: bool = True, timeout: float = 15,
                 runtime_dir: str | None = None, env: dict[str, str] | None = None):
        self.host = host
        self.dev = dev
        self.args = args
        # Daemons in different namespaces share one filesystem: each gets its own control-socket directory
        # (the segment's per-host one, else one named after the host).
        self.runtime_dir = runtime_dir or host.runtime_dir or f"{RUNTIME_DIR}/{host.name}"
        self.proc = host.popen(TUNNELD, "--dev", dev, "--runtime-dir", self.runtime_dir, *args,
                               env=None if env is None else {**os.environ, **env})  # env: what it adds
        if wait:
            try:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"tunneld exited with {self.proc.returncode}: {self.output()}")
                    if host.link_state(dev) == "UP":
                        break
                    time.sleep(0.05)
                else:
                    raise TimeoutError(f"{host.name}: tunneld did not bring {dev} up within {timeout}s")
            except BaseException:
                self.kill()
                raise

    def client(self, *cmd: str, check: bool = False, timeout: float = 30) -> subprocess.CompletedProcess:
        """A client command against this daemon's control socket, run in its host: ``client("show",
        "--json")`` runs ``tunneld show DEV --json --runtime-dir DIR``; ``client("peer", "add", ADDR)`` runs
        ``tunneld peer add DEV ADDR --runtime-dir DIR``."""
        words = [*cmd[:2], self.dev, *cmd[2:]] if cmd[0] == "peer" else [cmd[0], self.dev, *cmd[1:]]
        return self.host.run(TUNNELD, *words, "--runtime-dir", self.runtime_dir, check=check, timeout=timeout)

    def show(self, timeout: float = 30) -> dict:
        """``tunneld show DEV --json``, parsed; raises RuntimeError with the client's own words if it fails."""
        r = self.client("show", "--json", timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"tunneld show exited with {r.returncode}: {r.stderr.strip()}")
        return json.loads(r.stdout)

    def socket_path(self) -> str:
        """The daemon's control socket: tagged with its network namespace (tunneld/control/client.py)."""
        from tunneld.control.client import netns_tag, socket_path

        return socket_path(self.runtime_dir, self.dev, netns_tag(self.proc.pid))

    def pids(self, workers: int = 1) -> list[int]:
        """The daemon and its forked workers (``workers`` > 1), for CPU and memory accounting."""
        return [self.proc.pid, *children_of([self.proc.pid], workers - 1)]

    def output(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stdout.read() if self.proc.stdout else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)


def kernel_vxlan(host: Host, peer: str | Sequence[str], *, dev: str = "vx0", vni: int = 1, port: int = 4789,
                 address: str | None = None, learning: bool = True, extra: Sequence[str] = ()) -> None:
    """The Linux kernel's own VXLAN device on ``host``, pointing at ``peer``: the reference implementation.

    ``peer`` is one address (the device's ``remote``: point to point) or several: then the device has no
    remote and gets one all-zero FDB entry per peer (``bridge fdb append 00:00:00:00:00:00 dev DEV dst IP``),
    the kernel's head-end replication of broadcast, multicast and unknown unicast. With ``learning`` (the
    kernel's default) it maps inner source MACs to the outer source address and sends known unicast to that
    one peer; ``learning=False`` adds ``nolearning``.

    The host's veth gets transmit checksumming turned off, so that it behaves like a real wire. veth lets a
    packet cross namespaces still CHECKSUM_PARTIAL: the kernel's VXLAN would hand the far end inner TCP
    segments whose checksum field holds only the pseudo-header sum, to be "completed by the NIC". No
    physical NIC puts such a packet on the wire, and a userspace VTEP receiving it through a UDP socket has
    no way to know it was partial (the kernel↔kernel case works only because the skb's metadata survives).
    """
    peers = [peer] if isinstance(peer, str) else list(peer)
    host.run("ethtool", "-K", host.ifname, "tx", "off")
    target = ["remote", peers[0]] if len(peers) == 1 else ["local", host.underlay]
    host.run("ip", "link", "add", dev, "type", "vxlan", "id", str(vni), *target, "dstport", str(port),
             "dev", host.ifname, *(() if learning else ("nolearning",)), *extra)
    if len(peers) > 1:
        for dst in peers:
            host.run("bridge", "fdb", "append", "00:00:00:00:00:00", "dev", dev, "dst", dst)
    if address:
        host.run("ip", "addr", "add", address, "dev", dev)
    host.run("ip", "link", "set", dev, "up")


def kernel_fdb(host: Host, dev: str = "vx0") -> list[dict]:
    """The kernel VXLAN device's FDB as iproute2's JSON (``mac``, ``dst``, ``state``, ...)."""
    return json.loads(host.run("bridge", "-j", "fdb", "show", "dev", dev).stdout or "[]")


def features(host: Host, dev: str = DEV) -> dict[str, str]:
    """ethtool's view of a device's offloads, e.g. ``{"tcp-segmentation-offload": "on", ...}``: a reading of
    what the kernel made of tunneld's TUNSETOFFLOAD that does not go through tunneld's own code."""
    out = host.run("ethtool", "-k", dev).stdout
    return {k.strip(): v.split()[0] for k, v in (line.split(":", 1) for line in out.splitlines()[1:] if ":" in line)}


def start_pair(a: Host, b: Host, mode: str, *opts: str, underlay6: bool = False) -> tuple[Tunneld, Tunneld]:
    """tunneld in ``mode`` on both hosts, each the other's peer, with the overlay's IPv4 /24 and IPv6 /64."""
    peer_of_a, peer_of_b = (b.underlay6, a.underlay6) if underlay6 else (b.underlay, a.underlay)
    ta = Tunneld(a, "--mode", mode, "--peer", peer_of_a, "--address", f"{OVERLAY_V4[0]}/24",
                 "--address", f"{OVERLAY_V6[0]}/64", *opts)
    try:
        tb = Tunneld(b, "--mode", mode, "--peer", peer_of_b, "--address", f"{OVERLAY_V4[1]}/24",
                     "--address", f"{OVERLAY_V6[1]}/64", *opts)
    except BaseException:
        ta.kill()
        raise
    return ta, tb


_DROPPED = re.compile(r"dropped \d+ \(([^)]*)\)")


def drops(line: str) -> dict[str, int]:
    """``{reason: count}`` from a summary line's "dropped N (reason n, reason n)"; empty when nothing dropped."""
    found = _DROPPED.search(line)
    if not found:
        return {}
    return {reason: int(n) for reason, n in (item.rsplit(" ", 1) for item in found.group(1).split(", "))}

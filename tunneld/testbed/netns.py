"""Two "hosts" in network namespaces joined by a veth pair, and a TCP transfer between them.

Everything created here is removed on exit, also when the caller fails or the run is interrupted: processes
started through a ``Host`` are killed, then the namespaces are deleted (which deletes their interfaces).
Every wait is bounded. Addresses live only inside the namespaces: the underlay on the veth pair, the overlay
for whatever tunnel a caller puts between the hosts (one address plan, so every tunnel is compared alike).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

# Where ``tunneld`` is imported from (a checkout, or site-packages). Helper programs run inside a namespace
# as ``python -m tunneld.testbed.NAME`` with this as their working directory, so they find the same tunneld
# as the caller whatever the caller's own working directory is.
IMPORT_ROOT = Path(__file__).resolve().parents[2]

UNDERLAY_V4 = ("10.231.0.1", "10.231.0.2")
UNDERLAY_V6 = ("fd00:231::1", "fd00:231::2")
OVERLAY_V4 = ("192.168.231.1", "192.168.231.2")
OVERLAY_V6 = ("fd00:232::1", "fd00:232::2")


def is_root() -> bool:
    return os.geteuid() == 0


def sh(*cmd: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, timeout=timeout, capture_output=True, text=True, **kw)


@dataclass
class Host:
    name: str  # the namespace
    underlay: str  # this host's underlay address
    underlay6: str
    ifname: str  # its veth end
    procs: list[subprocess.Popen] = field(default_factory=list)
    overlay: str = ""  # the overlay address the testbed's plan gives it (segment(); "" for the pair)
    runtime_dir: str = ""  # its own directory for control sockets

    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return sh(*self.argv(*cmd), check=check, timeout=timeout, **kw)

    def popen(self, *cmd: str, **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.STDOUT)
        kw.setdefault("text", True)
        proc = subprocess.Popen(self.argv(*cmd), start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def link_state(self, dev: str) -> str | None:
        """'UP', 'DOWN', ... or None when the interface does not exist."""
        r = self.run("ip", "-o", "link", "show", "dev", dev, check=False)
        if r.returncode != 0:
            return None
        return "UP" if ",UP" in r.stdout or "<UP" in r.stdout else "DOWN"

    def wait_link(self, dev: str, present: bool = True, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.link_state(dev)
            if (state == "UP") if present else (state is None):
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name}: {dev} did not {'come up' if present else 'go away'} in {timeout}s")

    def ping(self, dst: str, count: int = 3, timeout: float = 10, interval: float = 0.2) -> bool:
        r = self.run(
            "ping", "-c", str(count), "-i", str(interval), "-W", "1", "-w", str(int(timeout)), dst,
            check=False, timeout=timeout + 5,
        )
        return r.returncode == 0

    def wait_ping(self, dst: str, timeout: float = 10) -> float:
        """Ping once per 0.2 s until a reply; return the seconds it took. Raises TimeoutError."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            r = self.run("ping", "-c", "1", "-W", "1", dst, check=False, timeout=5)
            if r.returncode == 0:
                return time.monotonic() - start
            time.sleep(0.2)
        raise TimeoutError(f"{self.name}: no reply from {dst} within {timeout}s")

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        self.procs.clear()


def tcpdump(host: Host, path: Path | str, bpf: str, *options: str, timeout: float = 10) -> subprocess.Popen:
    """tcpdump on the host's veth end writing to ``path``, returned once it listens (or ``timeout`` passed).

    Stop it with SIGINT so that it flushes the file. --immediate-mode hands each packet over at once rather
    than when a ring block fills or times out, so that what was sent just before the capture stops is in the
    file, and -U writes it out packet by packet. ``options`` go to tcpdump too; with a -B buffer size packets
    are handed over in blocks instead (bulk captures, where packet-by-packet writing loses many).
    """
    mode = ("--immediate-mode", "-U") if "-B" not in options else ()
    proc = host.popen("tcpdump", "-i", host.ifname, *mode, *options, "-n", "-w", str(path), bpf,
                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # tcpdump says "listening on" once the capture runs
        line = proc.stderr.readline()
        if "listening on" in line or not line:
            break
    return proc


NETNS_PREFIX = "td-"
RUNTIME_DIR = "/run/tunneld-testbed"  # hosts share /run: each host's control sockets go in a directory of its own


def remove_stale_namespaces() -> list[str]:
    """Delete testbed namespaces whose creating process is gone (a run that was SIGKILLed leaves them)."""
    removed = []
    for path in Path("/run/netns").glob(f"{NETNS_PREFIX}*"):
        parts = path.name.split("-")  # td, PID, TAG, a|b (or sw|hN: segment.py)
        if len(parts) == 4 and parts[1].isdigit() and not Path(f"/proc/{parts[1]}").exists():
            if sh("ip", "netns", "del", path.name, check=False).returncode == 0:
                removed.append(path.name)
    return removed


@contextlib.contextmanager
def testbed(mtu: int = 1500) -> Iterator[tuple[Host, Host]]:
    """Two fresh namespaces A and B joined by veth, with IPv4 and IPv6 underlay addresses and loopback up.

    Names carry the creating pid (td-PID-TAG-a), so a later run can tell leftovers from live testbeds.
    """
    remove_stale_namespaces()
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    a, b = (Host(f"{NETNS_PREFIX}{tag}-{x}", UNDERLAY_V4[i], UNDERLAY_V6[i], f"veth-{x}",
                 runtime_dir=f"{RUNTIME_DIR}/{NETNS_PREFIX}{tag}-{x}") for i, x in enumerate("ab"))
    created: list[str] = []
    try:
        for h in (a, b):
            sh("ip", "netns", "add", h.name)
            created.append(h.name)
        sh("ip", "link", "add", a.ifname, "netns", a.name, "type", "veth", "peer", "name", b.ifname, "netns", b.name)
        for h in (a, b):
            h.run("ip", "link", "set", "lo", "up")
            h.run("ip", "link", "set", h.ifname, "mtu", str(mtu), "up")
            h.run("ip", "addr", "add", f"{h.underlay}/24", "dev", h.ifname)
            h.run("ip", "addr", "add", f"{h.underlay6}/64", "dev", h.ifname, "nodad")
        yield a, b
    finally:
        for h in (a, b):
            h.kill_all()
        for name in created:
            sh("ip", "netns", "del", name, check=False)
        for h in (a, b):
            shutil.rmtree(h.runtime_dir, ignore_errors=True)


# What a veth does that a NIC's wire does not: hand UDP-tunnel super-packets and partial checksums to the other
# namespace as they are (tunneld/io/egress.py underlay_hazard). Off, it segments and checksums as a NIC would;
# GRO on (which gives a veth a NAPI context) lets the far end coalesce what arrives, as a NIC's driver does.
WIRE_FEATURES = ("tx-udp_tnl-segmentation", "off", "tx-udp_tnl-csum-segmentation", "off", "tx", "off", "gro", "on")


def like_a_wire(*hosts: Host) -> None:
    """Make each host's veth deliver and receive what a NIC would (see WIRE_FEATURES)."""
    for host in hosts:
        host.run("ethtool", "-K", host.ifname, *WIRE_FEATURES)


# Not a test, whatever a test runner's name patterns make of "testbed" when a test module imports it.
testbed.__test__ = False  # type: ignore[attr-defined]


def transfer(src: Host, dst: Host, dst_addr: str, nbytes: int = 8 << 20, port: int = 5201,
             timeout: float = 60) -> tuple[str, str]:
    """Send ``nbytes`` over TCP from ``src`` to ``dst_addr`` (on ``dst``); return (sent, received) as
    "<bytes> <sha256>" lines, so a caller can assert they are equal."""
    py = sys.executable
    receiver = dst.popen(py, "-m", "tunneld.testbed.xfer", "recv", str(port), str(timeout), cwd=IMPORT_ROOT)
    try:
        assert receiver.stdout is not None
        line = receiver.stdout.readline().strip()  # "listening", or the error that prevented it
        if line != "listening":
            raise RuntimeError(f"receiver failed: {line} {receiver.stdout.read()}")
        sent = src.run(py, "-m", "tunneld.testbed.xfer", "send", dst_addr, str(port), str(nbytes), "7",
                       timeout=timeout, cwd=IMPORT_ROOT).stdout.strip()
        out, _ = receiver.communicate(timeout=timeout)
        return sent, out.strip()
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait(timeout=5)

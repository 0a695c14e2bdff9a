"""The systems under test: how each one links host A to host B, and whether it can run here.

Each system is brought up inside a fresh two-namespace testbed (tunneld.testbed) and torn down with it. The
overlay is the same for every tunnel (192.168.231.0/24, A = .1, B = .2), so only the tunnel differs. Inner
MTUs are each system's own default (tunneld and the kernel derive it from the 1500-byte underlay), except
for the userspace C peers, which are given 1450 like VXLAN so no outer packet needs fragmenting.

tunneld-wireguard and wireguard-go (issue 21): encrypted, side by side. wireguard-go runs in the foreground at
both ends (``-f``: the PID started is the one that carries the data, all its threads counted), its MTU set to
1440 rather than its default 1420; tunneld keeps its own default, the same 1440 (start_tunneld_wireguard).
Each end's interface name is new per run: /var/run/wireguard/NAME.sock is one file for every namespace.

A system reports the processes that carry its data path in userspace (``pids``), so the bench can charge
their CPU time and memory; kernel systems have none. With --workers a tunneld is several processes: its
forked workers are found in /proc and charged too.

tunneld-vxlan runs with tunneld's default --workers auto (1 worker on a machine with 2 CPUs or fewer);
tunneld-vxlan-workers2 forces 2 worker processes per end, to show in the same run what the second one buys.
The TCP figure with 4 parallel streams is the one where several workers can help: one TCP flow always
stays on one worker.

tunneld-vxlan-100peers (issue 12): each end has 100 configured peers — the real far end and 99 addresses on
the testbed's underlay /24 that no host owns (10.231.0.100-198: the kernel ARPs for them on the veth, gets no
answer and drops what it queued, all inside the namespaces) — each absent peer with static MACs, so the FDB
is nearly full (990 of --fdb-max 1024). Its TCP figures sit beside tunneld-vxlan's in the same run; the rows
with ``flood_peers`` also measure what one flooded broadcast costs (bench.run: flood_cost).

tunneld-vxlan-kernelgso (issue 14): the kernel cuts the super-frames (--kernel-gso on, io/egress.py). Its veths
are made to behave like a wire first (testbed.netns.like_a_wire: no tunnel segmentation or checksum offload
handed across, GRO on), as a NIC would: over a default veth the kernel hands the super-packet to the far
namespace whole and `auto` refuses the path (docs/performance.md, "The kernel segments"). So this row pays for
software segmentation and checksums that the other rows' veths skip; it is the path a host with a real NIC runs.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tunneld.testbed import OVERLAY_V4, TUNNELD, UNDERLAY_V4, Host, Tunneld, kernel_vxlan
from tunneld.testbed.netns import like_a_wire
from tunneld.testbed.procfs import children_of

PREFIX = 24
USERSPACE_PEER_MTU = 1450  # same inner MTU as VXLAN over a 1500-byte IPv4 underlay
OPENVPN_PORT = 1194
SOCAT_PORT = 5555


@dataclass
class Running:
    """A system that is up: where A sends to, which processes carry the data, and how to stop them."""

    dst: str  # B's address as A sees it through the system
    dev: str | None  # A's interface for this system
    pids: list[int] = field(default_factory=list)
    stop: Callable[[], list[str]] = lambda: []  # graceful stop; returns problems worth reporting


@dataclass(frozen=True)
class System:
    name: str
    kind: str  # "kernel", "tunneld", "userspace-c" or "userspace-go": what the chart groups by
    available: Callable[[], str | None]  # None, or why it cannot run here
    start: Callable[[Host, Host], Running]
    flood_peers: int = 0  # >0: also measure the CPU cost of flooding a broadcast to this many peers


def _mtu(host: Host, dev: str) -> int:
    out = host.run("cat", f"/sys/class/net/{dev}/mtu").stdout
    return int(out.strip())


def _always() -> str | None:
    return None


# -- no tunnel, and the kernel's VXLAN ----------------------------------------------------------------------


def start_veth(a: Host, b: Host) -> Running:
    return Running(dst=b.underlay, dev=a.ifname)


def start_kernel_vxlan(a: Host, b: Host) -> Running:
    for host, peer, addr in ((a, b.underlay, OVERLAY_V4[0]), (b, a.underlay, OVERLAY_V4[1])):
        kernel_vxlan(host, peer, dev="vx0", address=f"{addr}/{PREFIX}")
        # kernel_vxlan() turns the veth's transmit checksumming off, for tests where a *userspace* VTEP receives
        # what the kernel sent. Kernel to kernel the partial checksums are safe, and a real NIC offloads
        # checksums and segmentation, so the reference keeps veth's defaults like every other system here
        # (with tx off, TSO goes too, and the reference drops to under half its throughput on this machine).
        host.run("ethtool", "-K", host.ifname, "tx", "on")
    return Running(dst=OVERLAY_V4[1], dev="vx0")


# -- tunneld --------------------------------------------------------------------------------------------------


def tunneld_modes() -> tuple[set[str], str | None]:
    """The modes ``tunneld --list-modes`` offers (first column), or why it could not be asked."""
    try:
        r = subprocess.run([TUNNELD, "--list-modes"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return set(), f"tunneld --list-modes failed: {e}"
    if r.returncode != 0:
        return set(), f"tunneld --list-modes exited with {r.returncode}: {r.stderr.strip()[:200]}"
    # One mode per line, name first; indented lines under it describe the mode's options.
    return {line.split()[0] for line in r.stdout.splitlines() if line.strip() and not line[0].isspace()}, None


def _tunneld_available(mode: str) -> Callable[[], str | None]:
    def check() -> str | None:
        modes, problem = tunneld_modes()
        if problem:
            return problem
        if mode not in modes:
            return f"tunneld --list-modes does not offer '{mode}' yet (has: {', '.join(sorted(modes)) or 'none'})"
        return None

    return check


def _stop_and_tidy(halt: Callable[[], list[str]], tidy: Callable[[], None]) -> Callable[[], list[str]]:
    """A system's ``stop``: ``halt`` its processes (returning the errors it met), then ``tidy`` what they leave
    on disk, whatever happened. A failed start calls ``tidy`` itself after killing what it had started."""

    def stop() -> list[str]:
        try:
            return halt()
        finally:
            tidy()

    return stop


def _stop_tunnelds(ends: list[Tunneld]) -> list[str]:
    """SIGTERM each end; what went wrong (ignored SIGTERM, a non-zero exit), for the row's errors."""
    problems = []
    for end in ends:
        try:
            code = end.stop()
        except subprocess.TimeoutExpired:
            problems.append(f"tunneld in {end.host.name} ignored SIGTERM; killed")
            continue
        if code != 0:
            problems.append(f"tunneld in {end.host.name} exited with {code}")
    return problems


def _tunneld_start(mode: str, *extra: str) -> Callable[[Host, Host], Running]:
    def start(a: Host, b: Host) -> Running:
        ends: list[Tunneld] = []
        try:
            for host, peer, addr in ((a, b.underlay, OVERLAY_V4[0]), (b, a.underlay, OVERLAY_V4[1])):
                ends.append(Tunneld(host, "--mode", mode, "--peer", peer, "--address", f"{addr}/{PREFIX}", *extra))
        except BaseException:
            for end in ends:
                end.kill()
            raise

        def stop() -> list[str]:
            return _stop_tunnelds(ends)

        pids = [e.proc.pid for e in ends]
        workers = int(extra[extra.index("--workers") + 1]) if "--workers" in extra else 1
        return Running(dst=OVERLAY_V4[1], dev=ends[0].dev, pids=pids + children_of(pids, (workers - 1) * 2),
                       stop=stop)

    return start


def _over_a_wire(start: Callable[[Host, Host], Running]) -> Callable[[Host, Host], Running]:
    """``start`` on a testbed whose veths segment and checksum as a wire would (see the module docstring)."""

    def wired(a: Host, b: Host) -> Running:
        like_a_wire(a, b)
        return start(a, b)

    return wired


# -- tunneld with many peers (issue 12) ----------------------------------------------------------------------

MANY_PEERS = 100
MACS_PER_ABSENT_PEER = 10
MANY_FDB_MAX = 1024


def absent_peers(n: int = MANY_PEERS - 1) -> list[str]:
    """``n`` addresses on the two-host testbed's underlay /24 that no host owns (from .100 up): reachable by no
    one, so whatever is sent to them is dropped by the sending namespace's own neighbour table."""
    net = ipaddress.ip_interface(f"{UNDERLAY_V4[0]}/24").network
    return [str(net.network_address + 100 + i) for i in range(n)]


def many_peers_config(mode: str, real_peer: str, address: str) -> str:
    """A config file: the real far end first, then the absent peers, each with static MACs."""
    lines = ["[tunnel]", f'mode = "{mode}"', f'address = ["{address}"]', "", "[[peer]]", f'address = "{real_peer}"',
             'name = "far-end"', ""]
    for i, peer in enumerate(absent_peers()):
        macs = ", ".join(f'"02:aa:{i >> 8:02x}:{i & 0xFF:02x}:00:{m:02x}"' for m in range(MACS_PER_ABSENT_PEER))
        lines += ["[[peer]]", f'address = "{peer}"', f'name = "absent-{i + 1}"', f"macs = [{macs}]", ""]
    return "\n".join(lines)


def start_tunneld_many_peers(a: Host, b: Host) -> Running:
    workdir = Path(tempfile.mkdtemp(prefix="bench-many-peers-"))
    tidy = lambda: shutil.rmtree(workdir, ignore_errors=True)  # noqa: E731
    ends: list[Tunneld] = []
    try:
        for host, peer, addr in ((a, b.underlay, OVERLAY_V4[0]), (b, a.underlay, OVERLAY_V4[1])):
            config = workdir / f"{host.name}.toml"
            config.write_text(many_peers_config("vxlan", peer, f"{addr}/{PREFIX}"))
            rundir = workdir / host.name
            rundir.mkdir(mode=0o700)
            ends.append(Tunneld(host, "--config", str(config), "--fdb-max", str(MANY_FDB_MAX),
                                runtime_dir=str(rundir)))
    except BaseException:
        for end in ends:
            end.kill()
        tidy()
        raise
    stop = _stop_and_tidy(lambda: _stop_tunnelds(ends), tidy)
    return Running(dst=OVERLAY_V4[1], dev=ends[0].dev, pids=[e.proc.pid for e in ends], stop=stop)


# -- userspace C peers ----------------------------------------------------------------------------------------


def _installed(tool: str) -> Callable[[], str | None]:
    def check() -> str | None:
        return None if shutil.which(tool) else f"{tool} is not installed (make setup installs it)"

    return check


def _installed_all(*tools: str) -> Callable[[], str | None]:
    def check() -> str | None:
        missing = [tool for tool in tools if not shutil.which(tool)]
        return f"{', '.join(missing)} not installed (make setup installs it)" if missing else None

    return check


def _popen_logged(host: Host, *argv: str) -> subprocess.Popen:
    """Start a peer with its output in an unnamed temporary file: a pipe nobody reads could fill and stall it."""
    log = tempfile.TemporaryFile(mode="w+")
    proc = host.popen(*argv, stdout=log, stderr=subprocess.STDOUT)
    proc.log = log  # type: ignore[attr-defined]  # read back if it fails to come up
    return proc


def _wait_for(hosts: list[Host], procs: list[subprocess.Popen], what: str, ready: Callable[[Host], bool],
              timeout: float = 15) -> None:
    """Wait until ``ready(host)`` for each process's host; fail at once if one of the processes exits."""
    deadline = time.monotonic() + timeout
    for host, proc in zip(hosts, procs):
        while proc.poll() is None and not ready(host) and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None and ready(host):
            continue
        proc.log.seek(0)  # type: ignore[attr-defined]
        out = " ".join(proc.log.read().split())[-300:]  # type: ignore[attr-defined]
        state = f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready after {timeout}s"
        raise RuntimeError(f"{what} did not come up in {host.name} ({argv0(proc)} {state}): {out}")


def argv0(proc: subprocess.Popen) -> str:
    args = proc.args if isinstance(proc.args, list) else [str(proc.args)]
    return args[4] if len(args) > 4 and args[:3] == ["ip", "netns", "exec"] else args[0]


def start_openvpn(a: Host, b: Host) -> Running:
    """OpenVPN 2.6 peer-to-peer over UDP with no TLS, no key, no cipher and no auth: a plain C TUN↔UDP relay.

    Without ``--secret`` or ``--tls-*`` 2.6 runs the cleartext p2p mode; ``--cipher none --auth none`` say so
    explicitly, and ``--disable-dco`` keeps the data path in the userspace process (the DCO kernel module
    would otherwise be tried first). 2.6 prints a deprecation: 2.7 drops TLS-less mode, and this peer will then
    need ``--peer-fingerprint`` with TLS and a null data cipher instead.
    """
    dev = "ovpn0"
    procs = []
    for host, peer, addr, other in ((a, b, OVERLAY_V4[0], OVERLAY_V4[1]), (b, a, OVERLAY_V4[1], OVERLAY_V4[0])):
        procs.append(_popen_logged(
            host,
            "openvpn", "--dev", dev, "--dev-type", "tun", "--proto", "udp",
            "--local", host.underlay, "--remote", peer.underlay, "--port", str(OPENVPN_PORT),
            "--ifconfig", addr, other, "--tun-mtu", str(USERSPACE_PEER_MTU),
            "--cipher", "none", "--auth", "none", "--disable-dco", "--verb", "1",
        ))
    _wait_for([a, b], procs, dev, lambda h: h.link_state(dev) == "UP")
    return Running(dst=OVERLAY_V4[1], dev=dev, pids=[p.pid for p in procs])


def start_socat(a: Host, b: Host) -> Running:
    """socat relaying a TUN device to a connected UDP socket, one datagram per packet.

    The devices are brought up only once both sockets exist: the kernel sends router solicitations the moment
    a device is up, and a connected UDP socket whose peer is not listening yet gets ECONNREFUSED on its next
    read, on which socat exits.
    """
    dev = "soc0"
    procs = []
    for host, peer, addr in ((a, b, OVERLAY_V4[0]), (b, a, OVERLAY_V4[1])):
        procs.append(_popen_logged(
            host,
            "socat", "-b", "65536",
            f"TUN:{addr}/{PREFIX},tun-name={dev},tun-type=tun,iff-no-pi",
            f"UDP:{peer.underlay}:{SOCAT_PORT},bind={host.underlay}:{SOCAT_PORT}",
        ))
    _wait_for([a, b], procs, dev, lambda h: bool(h.run("ss", "-Huan", f"sport = :{SOCAT_PORT}").stdout.strip()))
    for host in (a, b):
        host.run("ip", "link", "set", dev, "mtu", str(USERSPACE_PEER_MTU), "up")
    return Running(dst=OVERLAY_V4[1], dev=dev, pids=[p.pid for p in procs])


# -- WireGuard: tunneld's mode and Debian's wireguard-go (issue 21) ------------------------------------------

WG_PORT = 51820
WG_MTU = 1440  # 1500 - 60 (outer IPv4 20, UDP 8, WireGuard header 16, tag 16); padding to 16 never passes it
WG_SOCKET_DIR = Path("/var/run/wireguard")  # UAPI sockets: one directory for every namespace


def _wg_names(prefix: str) -> tuple[str, str]:
    """A's and B's interface names, unique per run: the UAPI socket NAME.sock is shared by all namespaces."""
    run = uuid.uuid4().hex[:8]
    return f"{prefix}a{run}", f"{prefix}b{run}"


def _wg_keypair(path: Path) -> str:
    """A new private key written to ``path`` (mode 0600, base64 as `wg genkey` prints it); its public key."""
    private = X25519PrivateKey.generate()
    raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(raw).decode() + "\n")
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(public).decode()


def _wg_ends(a: Host, b: Host, workdir: Path) -> list[tuple[Host, Host, str, str, Path, str]]:
    """Per end: (host, peer host, own overlay address, peer's overlay address, own key file, peer's public key)."""
    keys = [workdir / "a.key", workdir / "b.key"]
    publics = [_wg_keypair(k) for k in keys]
    return [(a, b, OVERLAY_V4[0], OVERLAY_V4[1], keys[0], publics[1]),
            (b, a, OVERLAY_V4[1], OVERLAY_V4[0], keys[1], publics[0])]


def start_tunneld_wireguard(a: Host, b: Host) -> Running:
    """tunneld --mode wireguard at both ends, each from a TOML file with a 0600 key file and one [[peer]].

    Its MTU is its own default, like every tunneld row: 1440 on a 1500-byte underlay, WireGuard's 60 bytes
    (outer IPv4 and UDP, the 16-byte header and the tag): padding to 16 never passes the MTU, as
    wireguard-go's, so it costs nothing."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-wireguard-"))
    names = _wg_names("tw")

    def tidy() -> None:
        for dev in names:  # a killed tunneld leaves its UAPI socket file behind
            (WG_SOCKET_DIR / f"{dev}.sock").unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)

    ends: list[Tunneld] = []
    try:
        for (host, peer, addr, peer_addr, key, peer_public), dev in zip(_wg_ends(a, b, workdir), names):
            config = workdir / f"{host.name}.toml"
            config.write_text(f"""[tunnel]
mode = "wireguard"
private_key = "{key}"
port = {WG_PORT}
address = "{addr}/{PREFIX}"

[[peer]]
public_key = "{peer_public}"
endpoint = "{peer.underlay}:{WG_PORT}"
allowed_ips = ["{peer_addr}/32"]
""")
            ends.append(Tunneld(host, "--config", str(config), dev=dev))
    except BaseException:
        for end in ends:
            end.kill()
        tidy()
        raise
    stop = _stop_and_tidy(lambda: _stop_tunnelds(ends), tidy)
    return Running(dst=OVERLAY_V4[1], dev=ends[0].dev, pids=[e.proc.pid for e in ends], stop=stop)


def _stop_wireguard_go(procs: list[tuple[Host, str, subprocess.Popen]]) -> list[str]:
    """SIGTERM each wireguard-go (it removes its device and UAPI socket); kill what ignores it; remove what a
    killed one left behind. Returns what went wrong, for the row's errors."""
    problems = []
    for host, dev, proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
                problems.append(f"wireguard-go in {host.name} ignored SIGTERM; killed")
            else:
                if proc.returncode != 0:
                    problems.append(f"wireguard-go in {host.name} exited with {proc.returncode}")
        else:
            problems.append(f"wireguard-go in {host.name} had already exited with {proc.returncode}")
        sock = WG_SOCKET_DIR / f"{dev}.sock"
        if sock.exists():
            sock.unlink(missing_ok=True)
            problems.append(f"wireguard-go in {host.name} left {sock} behind; removed")
    return problems


def start_wireguard_go(a: Host, b: Host) -> Running:
    """Debian's wireguard-go (0.0.20220316: no offloads) at both ends, in the foreground (``-f``: its PID is the
    data path's), configured with the stock ``wg set``, then ``ip addr``, the MTU and ``ip link up``.

    wireguard-go's own default MTU is 1420 (room for an IPv6 underlay); it is set to 1440 here, what a 1500-byte
    IPv4 underlay carries, as tunneld-wireguard gets, so that both carry the same inner packets."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-wireguard-go-"))
    tidy = lambda: shutil.rmtree(workdir, ignore_errors=True)  # noqa: E731
    names = _wg_names("wg")
    procs: list[tuple[Host, str, subprocess.Popen]] = []
    try:
        ends = _wg_ends(a, b, workdir)
        for (host, *_), dev in zip(ends, names):
            procs.append((host, dev, _popen_logged(host, "wireguard-go", "-f", dev)))
        for (host, dev, proc) in procs:
            _wait_for([host], [proc], dev,
                      lambda h, dev=dev: h.link_state(dev) is not None and (WG_SOCKET_DIR / f"{dev}.sock").exists())
        for (host, peer, addr, peer_addr, key, peer_public), dev in zip(ends, names):
            host.run("wg", "set", dev, "private-key", str(key), "listen-port", str(WG_PORT),
                     "peer", peer_public, "endpoint", f"{peer.underlay}:{WG_PORT}", "allowed-ips", f"{peer_addr}/32")
            host.run("ip", "addr", "add", f"{addr}/{PREFIX}", "dev", dev)
            host.run("ip", "link", "set", dev, "mtu", str(WG_MTU), "up")
    except BaseException:
        _stop_wireguard_go(procs)
        tidy()
        raise
    stop = _stop_and_tidy(lambda: _stop_wireguard_go(procs), tidy)
    return Running(dst=OVERLAY_V4[1], dev=names[0], pids=[p.pid for _, _, p in procs], stop=stop)


SYSTEMS: dict[str, System] = {
    s.name: s
    for s in (
        System("veth", "kernel", _always, start_veth),
        System("kernel-vxlan", "kernel", _always, start_kernel_vxlan),
        System("tunneld-vxlan", "tunneld", _tunneld_available("vxlan"), _tunneld_start("vxlan"), flood_peers=1),
        # issue 12: 100 configured peers (99 absent, each with static MACs) and a nearly full FDB
        System("tunneld-vxlan-100peers", "tunneld", _tunneld_available("vxlan"), start_tunneld_many_peers,
               flood_peers=MANY_PEERS),
        # the plain per-packet path, to show what the kernel offloads (issue 7) buy in the same run
        System("tunneld-vxlan-nooffload", "tunneld", _tunneld_available("vxlan"),
               _tunneld_start("vxlan", "--no-offload")),
        # two worker processes per end (--workers 2): multi-queue TAP + SO_REUSEPORT; helps parallel flows only
        System("tunneld-vxlan-workers2", "tunneld", _tunneld_available("vxlan"),
               _tunneld_start("vxlan", "--workers", "2")),
        # issue 14: the kernel segments VXLAN super-frames (an egress TAP), over veths that behave like a wire
        System("tunneld-vxlan-kernelgso", "tunneld", _tunneld_available("vxlan"),
               _over_a_wire(_tunneld_start("vxlan", "--kernel-gso", "on"))),
        System("tunneld-gre", "tunneld", _tunneld_available("gre"), _tunneld_start("gre")),
        System("tunneld-gretap", "tunneld", _tunneld_available("gretap"), _tunneld_start("gretap")),
        System("openvpn", "userspace-c", _installed("openvpn"), start_openvpn),
        System("socat", "userspace-c", _installed("socat"), start_socat),
        # issue 21: tunneld's encrypted mode and the userspace WireGuard it interoperates with
        System("tunneld-wireguard", "tunneld", _tunneld_available("wireguard"), start_tunneld_wireguard),
        System("wireguard-go", "userspace-go", _installed_all("wireguard-go", "wg"), start_wireguard_go),
    )
}
REFERENCE = "kernel-vxlan"


def device_mtu(host: Host, running: Running) -> int | None:
    return _mtu(host, running.dev) if running.dev else None

"""Bringing a tunnel up and down: the order of the steps, and what each failure means to the operator.

Start-up order, chosen so that a failure leaves nothing behind:
  1. build the codec (option errors are configuration errors);
  2. find the underlay MTU towards the peer, derive the device MTU;
  3. bind the underlay socket and the metrics endpoint (a busy port fails before any device exists);
  4. create the device, set its MAC, MTU and addresses, bring it up;
  5. with --workers N > 1: the device has N queues and the port N sockets, all opened in steps 3-4; fork
     the N-1 other workers (tunneld/workers.py) before any event loop exists;
  6. attach the engine to the event loop (and, with workers, wait until every worker has attached its own).
Shutdown undoes it in reverse; closing the device fd removes the interface (with workers: the last queue's).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
import signal
import time
from pathlib import Path

from tunneld import __version__
from tunneld.config import TunnelConfig
from tunneld.encap.base import DeviceKind, Encapsulator
from tunneld.engine import Engine, make_engine, offload_supported
from tunneld.io import netlink
from tunneld.io import SetupError
from tunneld.io.device import Device
from tunneld.io.raw import RawLink
from tunneld.io.udp import GSO_MAX_BYTES, GSO_MAX_SEGMENTS, UdpLink, open_group
from tunneld.metrics import MetricsError, MetricsServer
from tunneld.service import Loader, Service
from tunneld.stats import Stats, total
from tunneld.watch import Watch
from tunneld.workers import STOP_SIGNALS, Pool, fork_workers, resolve

log = logging.getLogger("tunneld")

WATCH_INTERVAL = 1.0  # seconds between looks at the counters for the log (watch.py)

SUPERFRAME_HEADERS = 14 + 40 + 32  # Ethernet, IPv6, TCP with timestamps: the usual headers of a segment

EX_SOFTWARE = 1
EX_NOPERM = 77
EX_CONFIG = 78


class StartupError(Exception):
    """The tunnel cannot start; ``str()`` is one line for the operator, ``code`` the exit status."""

    def __init__(self, message: str, code: int = EX_SOFTWARE) -> None:
        super().__init__(message)
        self.code = code


def _machine_id() -> bytes:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            return Path(path).read_bytes().strip()
        except OSError:
            continue
    return b""


def stable_mac(*parts: object) -> str:
    """A locally administered unicast MAC derived from the machine and the tunnel's identity.

    A TAP device otherwise gets a random MAC each time it is created, and after a restart the neighbours'
    ARP/ND caches (and a kernel VXLAN peer's FDB) would point at the old one until they expire. Deriving it
    like systemd's MACAddressPolicy=persistent keeps a restarted daemon looking like the same interface.
    The peer is part of the identity so that two ends on one machine (namespaces) never collide.
    """
    digest = hashlib.sha256(b"tunneld\0" + _machine_id() + b"\0" + "\0".join(map(str, parts)).encode()).digest()
    first = (digest[0] & 0xFE) | 0x02  # unicast, locally administered
    return ":".join(f"{b:02x}" for b in (first, *digest[1:6]))


class Tunnel:
    """A running tunnel: device, link and engine, built from a validated config."""

    def __init__(self, cfg: TunnelConfig, modes: dict[str, type[Encapsulator]]) -> None:
        self.cfg = cfg
        try:
            codec_cls = modes[cfg.mode]
        except KeyError:
            raise StartupError(f"mode: unknown mode {cfg.mode!r} (known: {', '.join(modes)})", EX_CONFIG) from None
        unknown = sorted(set(cfg.extra) - set(codec_cls.options))
        if unknown:
            takes = ", ".join(codec_cls.options) or "none"
            raise StartupError(f"{cfg.mode}: does not take option {', '.join(unknown)} (it takes: {takes})", EX_CONFIG)
        try:
            self.codec = codec_cls.from_options(cfg.options())
        except (ValueError, TypeError) as e:
            raise StartupError(f"{cfg.mode}: {e}", EX_CONFIG) from None
        except Exception as e:  # a plugin's bug must read as such, not as a traceback
            raise StartupError(f"{cfg.mode}: the encapsulator failed to start: {type(e).__name__}: {e}") from None
        underlay_v6 = ipaddress.ip_address(cfg.peer).version == 6
        self.underlay_mtu, underlay_dev = netlink.underlay_mtu(cfg.peer)
        if underlay_dev is None:
            log.warning("no route to peer %s yet; assuming an underlay MTU of %d", cfg.peer, self.underlay_mtu)
        default_mtu = self.underlay_mtu - self.codec.overhead(underlay_v6)
        self.mtu = cfg.mtu or default_mtu
        if self.mtu > default_mtu:
            log.warning(
                "mtu %d exceeds what the underlay carries (%d - %d overhead = %d): larger frames will be dropped",
                self.mtu, self.underlay_mtu, self.codec.overhead(underlay_v6), default_mtu,
            )
        if self.mtu < 68:
            raise StartupError(f"the underlay MTU {self.underlay_mtu} leaves no room for a tunnel", EX_CONFIG)
        self.max_frame = self.underlay_mtu - self.codec.outer_overhead(underlay_v6)
        self.underlay_dev = underlay_dev
        self.device: Device | None = None
        self.link: UdpLink | RawLink | None = None
        self.engine: Engine | None = None
        self.metrics: MetricsServer | None = None
        self.workers = 1  # decided in open()
        self.pool: Pool | None = None  # the other workers, once forked (workers.py)
        self._spare: list[tuple[Device, UdpLink]] = []  # their device queues and links until the fork

    def open(self) -> None:
        cfg = self.cfg
        if self.codec.transport.kind not in ("udp", "ip"):
            raise StartupError(f"{cfg.mode}: transport {self.codec.transport} is not supported")
        if netlink.link_exists(cfg.dev):
            raise StartupError(
                f"interface {cfg.dev} already exists: pick another --dev, or remove it (ip link del {cfg.dev})"
            )
        port = cfg.port or self.codec.transport.number
        # Offloads need a header that is the same for every frame (VXLAN, GRE without checksums or sequence numbers).
        self.offload = cfg.offload and offload_supported(self.codec)
        self.workers, note = resolve(cfg.workers, self.codec.transport.kind)
        if note:
            (log.warning if cfg.workers != "auto" else log.info)("%s", note)
        try:
            if self.codec.transport.kind == "ip":
                self.link = RawLink(cfg.peer, self.codec.transport.number, cfg.local)
            elif self.workers > 1:
                self.link, *links = open_group(cfg.peer, port, cfg.local, self.workers)
                self._spare = [(None, link) for link in links]  # type: ignore[misc]
            else:
                self.link = UdpLink(cfg.peer, port, cfg.local)
            if cfg.metrics_listen:
                self.metrics = MetricsServer(cfg.metrics_listen)
            multi = self.workers > 1
            self.device = Device(cfg.dev, self.codec.device, offload=self.offload, multi_queue=multi)
            for i, (_, link) in enumerate(self._spare):
                self._spare[i] = (Device(cfg.dev, self.codec.device, offload=self.offload, multi_queue=True), link)
        except (SetupError, MetricsError) as e:
            self.close()
            code = EX_NOPERM if isinstance(e, SetupError) and e.missing_privilege else EX_SOFTWARE
            raise StartupError(str(e), code) from None
        mac = None
        if self.codec.device is DeviceKind.TAP:
            mac = cfg.mac or stable_mac(cfg.dev, cfg.mode, cfg.peer, cfg.vni)
        self.mac = mac
        try:
            netlink.configure(cfg.dev, mac=mac, mtu=self.mtu, addresses=cfg.addresses)
        except netlink.NetlinkConfigError as e:
            self.close()
            raise StartupError(str(e)) from None
        if self.offload:
            self._cap_superframes()
        self.engine = self.make_engine(self.device, self.link)
        if self.metrics is not None:
            self.metrics.watch(self.engine, dev=cfg.dev, mtu=self.mtu, vni=getattr(self.codec, "vni", None),
                               others=self.worker_stats if self.workers > 1 else None, cpu=self.worker_cpu)

    def make_engine(self, device: Device, link: UdpLink | RawLink) -> Engine:
        return make_engine(device, link, self.codec, max_frame=self.max_frame, offload=self.offload)

    # -- several workers (workers.py) ------------------------------------------------------------------------

    def fork(self) -> None:
        """Start the other workers, each with one of the spare queues and links (which the parent then closes)."""
        spare, self._spare = self._spare, []
        try:
            self.pool = fork_workers(self, spare)
        except OSError as e:
            raise StartupError(f"cannot start {len(spare)} worker process(es): {e.strerror or e}") from None

    def forget_in_child(self) -> None:
        """In a freshly forked worker: close worker 0's queue and link and the metrics listener (the parent's)."""
        self.device.close()
        self.link.close()
        if self.metrics is not None:
            self.metrics.close_in_child()
        self.metrics = None
        self.engine = None

    def worker_stats(self) -> list[Stats]:
        """The other workers' counters, asked for now (from the metrics thread)."""
        return self.pool.snapshot_threadsafe() if self.pool is not None else []

    def worker_cpu(self) -> list[float]:
        """CPU seconds used by each worker process, the main one (worker 0) first; the others' as of the last
        worker_stats() (the exporter calls the two in that order, so they describe the same moment)."""
        times = os.times()
        return [times.user + times.system, *(self.pool.last_cpu() if self.pool is not None else ())]

    def totals(self) -> Stats:
        """Every worker's counters added up, the others' as of their last report (at most a second old)."""
        if self.pool is None:
            return self.engine.stats
        return total([self.engine.stats, *self.pool.last()])

    def workers_alive(self) -> bool:
        return self.pool is None or self.pool.alive()

    def forward(self, applied: dict) -> None:
        """A reload applied in the parent: the same to every other worker (the peer, the log level)."""
        changes = {k: v for k, v in applied.items() if k in ("peer", "log_level")}
        if self.pool is not None and changes:
            self.pool.broadcast(("apply", changes))

    def _cap_superframes(self) -> None:
        """Keep a TCP super-frame within what ONE UDP_SEGMENT sendmsg carries (≤ 64 datagrams, ≤ ~64 KB of
        them): 64 KiB frames would leave as 44 + 3 datagrams, costing the receiver a second read and write."""
        row = self.max_frame + self.codec.header_len
        rows = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // row)
        size = rows * (self.max_frame - SUPERFRAME_HEADERS)
        if size > 0 and not netlink.set_gso_max_size(self.cfg.dev, size):
            log.debug("could not set gso_max_size %d on %s; super-frames may take two sends", size, self.cfg.dev)

    def describe(self) -> str:
        cfg = self.cfg
        parts = [
            f"{cfg.mode} on {cfg.dev}",
            f"mtu {self.mtu}",
            *([f"mac {self.mac}"] if self.mac else []),
            *([f"vni {cfg.vni}"] if cfg.mode == "vxlan" else []),
            *([self.codec.describe()] if self.codec.describe() else []),
            f"peer {cfg.peer} " + (
                f"udp/{self.link.port}" if isinstance(self.link, UdpLink) else str(self.codec.transport)
            ),
            f"local {cfg.local or 'any'}",
            *([f"workers {self.workers}"] if self.workers > 1 else []),
            "offload " + (
                f"{self.codec.device.value} 0x{self.device.offloads:02x}, "
                + ("udp gso/gro" if isinstance(self.link, UdpLink) else "sendmmsg/recvmmsg")
                if self.offload and self.device else "off"
            ),
            f"underlay {self.underlay_dev or '?'} mtu {self.underlay_mtu}",
            f"metrics {'http://' + cfg.metrics_listen + '/metrics' if cfg.metrics_listen else 'off'}",
        ]
        if cfg.addresses:
            parts.append("addresses " + " ".join(cfg.addresses))
        return ", ".join(parts)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.stop()
            self.pool = None
        for device, link in self._spare:
            if device is not None:
                device.close()
            link.close()
        self._spare = []
        if self.engine is not None:
            self.engine.detach()
        if self.device is not None:
            self.device.close()  # the kernel removes the interface with its last fd
            self.device = None
        if self.link is not None:
            self.link.close()
            self.link = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None


async def serve(tunnel: Tunnel, reload: Loader | None = None) -> int:
    """Run until SIGINT or SIGTERM (exit status 0); SIGHUP reloads the configuration (see service.py).

    If the interface is deleted under us (``ip link del``), there is nothing left to carry: stop with exit
    status 1, so that a supervisor (systemd's Restart=on-failure) brings the tunnel back whole."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    status = 0
    service = Service(tunnel, reload)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, service.reload)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by run(); one that came meanwhile lands now
    assert tunnel.engine is not None

    def device_gone() -> None:
        nonlocal status
        log.error("interface %s was deleted while running; stopping (exit status 1)", tunnel.cfg.dev)
        status = 1
        stop.set()

    def worker_died() -> None:
        nonlocal status
        status = 1
        stop.set()

    tunnel.engine.on_device_gone = device_gone
    tunnel.engine.attach(loop)
    if tunnel.metrics is not None:
        tunnel.metrics.start(loop)
    if tunnel.pool is not None:
        tunnel.pool.attach(loop, worker_died)
        if not await tunnel.pool.started(stop) and not stop.is_set():  # a SIGTERM meanwhile is a clean stop
            status = 1
            stop.set()
    watcher = None
    if not stop.is_set():
        log.info("tunneld %s up: %s", __version__, tunnel.describe())
        service.ready()  # the interface is up and the sockets are bound (every worker's)
        watcher = loop.create_task(_watch(tunnel))
    try:
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        service.stopping()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if tunnel.metrics is not None:
            tunnel.metrics.stop()
    if tunnel.pool is not None:
        await tunnel.pool.snapshot()  # the final counters of every worker, for the line below
        tunnel.pool.detach()
    log.info("shutting down: %s", tunnel.totals().summary())
    return status


async def _watch(tunnel: Tunnel) -> None:
    """Log what happened on the data path (see watch.py), once a second; the peer is read each time."""
    watch = Watch(tunnel.totals(), tunnel.engine.link.peer)
    while True:
        await asyncio.sleep(WATCH_INTERVAL)
        if tunnel.pool is not None:
            tunnel.pool.request()  # the answers refresh the totals, and show that every worker is alive
            watch.stats = tunnel.totals()
        watch.peer = tunnel.engine.link.peer
        for line in watch.tick(time.time()):
            log.info("%s", line)


def run(cfg: TunnelConfig, modes: dict[str, type[Encapsulator]], *, reload: Loader | None = None) -> int:
    """Start the tunnel, serve until asked to stop, take it down. Raises StartupError on failure to start."""
    import uvloop

    # INT/TERM/HUP wait (blocked) from here until serve() has its handlers: one arriving while the interface
    # is being made or the workers forked would otherwise kill us with no clean-up. The children inherit the
    # mask and unblock after setting their own dispositions (workers.py).
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        tunnel = Tunnel(cfg, modes)
        tunnel.open()
        try:
            if tunnel.workers > 1:
                tunnel.fork()  # before any event loop exists; the children never return from it
            status = uvloop.run(serve(tunnel, reload))
        finally:
            tunnel.close()
            log.info("removed interface %s", cfg.dev)
    finally:
        _unblock_stop_signals()
    return status


def _unblock_stop_signals() -> None:
    """Unblock INT/TERM/HUP, first discarding any still pending: we are stopping anyway (a failed start),
    and their default action would turn a clean exit into death by signal."""
    for sig in signal.sigpending() & set(STOP_SIGNALS):
        signal.sigtimedwait([sig], 0)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

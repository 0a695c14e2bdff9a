"""Bringing a tunnel up and down: the order of the steps, and what each failure means to the operator.

Each decision and each resource has one home; this module puts them together:
  plan.py       config + modes → codec, MTUs, workers, offload (pure; StartupError before anything opens);
  resources.py  the open descriptors: device queues, links, the metrics listener (opened in order, closed
                in reverse; a failure leaves nothing behind);
  worker.py     one worker's data path, the same in the parent (worker 0) and in every child;
  workers.py    the supervisor: the parent's view of the other workers (fork, ready, stats, liveness, stop);
  service.py    systemd: readiness, watchdog, reload; it sees a ``Tunnel`` through service.Tunnel.

Start-up order, chosen so that a failure leaves nothing behind:
  1. build the codec (option errors are configuration errors);
  2. find the underlay MTU towards the peer, derive the device MTU;
  3. bind the underlay socket and the metrics endpoint (a busy port fails before any device exists);
  4. create the device, set its MAC, MTU and addresses, bring it up;
  5. with --workers N > 1: the device has N queues and the port N sockets, all opened in steps 3-4; fork
     the N-1 other workers (tunneld/runtime/workers.py) before any event loop exists;
  6. attach the engine to the event loop (and, with workers, wait until every worker has attached its own).
Shutdown undoes it in reverse; closing the device fd removes the interface (with workers: the last queue's).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Callable

from tunneld import __version__
from tunneld.runtime.channel import Apply, Channel
from tunneld.config.schema import ConfigError, TunnelConfig
from tunneld.control.handlers import PeerControl
from tunneld.control.membership import RegistryBridge
from tunneld.control.server import ControlError, ControlServer, runtime_dir, socket_path
from tunneld.control.wgapi import UapiServer, UapiSocketError
from tunneld.control.registry import RegistryStats
from tunneld.encap.base import Encapsulator
from tunneld.errors import EX_CONFIG, EX_NOPERM, EX_SOFTWARE, StartupError
from tunneld.io import netlink
from tunneld.runtime.wgdevice import EngineWgDevice, host_check
from tunneld.io.egress import Unsupported as EgressUnsupported, choose as egress_choose
from tunneld.io.udp import UdpLink
from tunneld.observe.metrics import MetricsError, MetricsServer
from tunneld.runtime.plan import Plan, make_plan, stable_mac
from tunneld.io.device import Device
from tunneld.runtime.resources import Link, Resources
from tunneld.runtime.service import Loader, Service
from tunneld.datapath.stats import Stats, total
from tunneld.observe.watch import WATCH_INTERVAL, Watch
from tunneld.runtime.worker import Worker, cpu_seconds
from tunneld.runtime.workers import STOP_SIGNALS, Supervisor

__all__ = ["EX_CONFIG", "EX_NOPERM", "EX_SOFTWARE", "StartupError", "Tunnel", "describe", "run", "serve", "stable_mac"]

log = logging.getLogger("tunneld")

REGISTRY_START_WAIT = 5.0  # seconds serve() waits for the first registration before going on without it


class Tunnel:
    """A tunnel put together: its plan, its descriptors, worker 0 and the supervisor of the others. It is
    what the service layer drives (service.Tunnel): totals, liveness, live changes, the metrics endpoint.
    ``control`` answers the control socket (control/handlers.py); ``membership`` bridges the etcd registry
    (control/membership.py), with --registry only."""

    def __init__(self, cfg: TunnelConfig, modes: dict[str, type[Encapsulator]], *,
                 underlay_mtu: Callable[[str], tuple[int, str | None]] | None = None, cpus: int | None = None) -> None:
        self.plan: Plan = make_plan(cfg, modes, underlay_mtu=underlay_mtu, cpus=cpus)  # the look-ups: make_plan
        self.cfg = cfg  # the running configuration: a reload replaces it (service.py), the plan keeps the first
        self.workers = self.plan.workers
        self.resources = Resources(self.plan)
        self.supervisor = Supervisor()
        self.worker: Worker | None = None  # worker 0, once open
        self.control = PeerControl(self)
        # Membership through etcd, started by serve() after the fork; its counters exist from the start so that
        # the metrics endpoint can export them whenever it is (re)made.
        self.registry_stats = RegistryStats() if cfg.registry is not None else None
        self.membership = RegistryBridge(self, self.control) if cfg.registry is not None else None
        self.kernel_gso = False  # whether worker 0 got an egress device: the kernel segments (io/egress.py)

    def open(self) -> None:
        plan = self.plan
        if plan.workers_note:
            (log.warning if self.cfg.workers != "auto" else log.info)("%s", plan.workers_note)
        self.resources.open()
        try:
            self.worker = self._worker(0, *self.resources.unit(0))
        except ValueError as e:  # a codec the engine cannot carry (a header beyond its headroom): one line
            self.resources.close()
            raise StartupError(str(e)) from None
        except BaseException:  # the interface must not outlive the failure
            self.resources.close()
            raise
        metrics = self.resources.metrics
        if metrics is not None:
            self._watch(metrics)

    def _worker(self, index: int, device, link) -> Worker:
        plan, cfg = self.plan, self.plan.cfg
        egress = self._egress(index, link)
        try:
            worker = Worker(index, device, link, plan.codec, dev=cfg.dev, max_frame=plan.max_frame,
                            offload=plan.offload, peers=cfg.peers, fdb_max=cfg.fdb_max, fdb_ageing=cfg.fdb_ageing,
                            egress=egress)
        except BaseException:  # the egress device is this worker's alone until the worker owns it
            if egress is not None:
                egress.close()
            raise
        if index == 0:  # MACs learnt here go to every child; a child's come to this worker (and the others)
            worker.share = self.supervisor.share
            self.supervisor.on_learnt = worker.learn
        return worker

    def _egress(self, index: int, link):
        """Worker ``index``'s egress device queue where the kernel segments super-frames (io/egress.py), or
        None. Worker 0 decides, and logs which path runs and why; the others follow (a queue each)."""
        plan, cfg = self.plan, self.plan.cfg
        if index > 0 and not self.kernel_gso:
            return None
        try:
            egress, why = egress_choose(
                cfg.kernel_gso, dev=cfg.dev, codec=plan.codec, link=link, underlay_dev=plan.underlay_dev,
                offload=plan.offload, multi_queue=plan.workers > 1)
        except EgressUnsupported as e:
            raise StartupError(f"--kernel-gso on: {e}") from None
        if index == 0:
            self.kernel_gso = egress is not None
            log.info("kernel segmentation %s", why)
            # Through the egress device one UDP_SEGMENT send does not bound a super-frame (plan.superframe_cap):
            # the IPv4 length field does.
            if egress is not None and not netlink.set_gso_max_size(cfg.dev, egress.superframe_cap):
                log.debug("could not set gso_max_size %d on %s", egress.superframe_cap, cfg.dev)
        return egress

    def _watch(self, metrics: MetricsServer) -> None:
        metrics.watch(self.worker.engine, dev=self.cfg.dev, mtu=self.plan.mtu, vni=self.plan.vni,
                      others=self.supervisor.snapshot_threadsafe if self.workers > 1 else None,
                      cpu=self.worker_cpu)
        if self.registry_stats is not None:
            metrics.watch_registry(self.registry_stats)

    def fork(self) -> None:
        """Start workers 1 to N-1, each with its own queue and link (which the parent then closes)."""
        try:
            self.supervisor.fork(self.workers - 1, self._child)
        except OSError as e:
            raise StartupError(f"cannot start {self.workers - 1} worker process(es): {e.strerror or e}") from None
        finally:
            self.resources.release_others()

    def _child(self, index: int, channel: Channel) -> int:
        """Worker ``index``, in its freshly forked process: keep only its own descriptors, serve until stopped."""
        import uvloop

        unit = self.resources.keep_only(index)
        if self.worker is not None and self.worker.egress is not None:
            self.worker.egress.close()  # worker 0's egress queue is the parent's; this worker opens its own
        self.worker = None  # the parent's worker 0: its queue and link are closed now
        worker = self._worker(index, *unit)
        return uvloop.run(worker.serve_channel(channel))

    # -- service.Tunnel ----------------------------------------------------------------------------------------

    def totals(self) -> Stats:
        """Every worker's counters added up, the others' as of their last report (at most a second old)."""
        if not self.supervisor.children:
            return self.worker.stats
        return total([self.worker.stats, *self.supervisor.last()])

    def worker_cpu(self) -> list[float]:
        """CPU seconds used by each worker process, the main one (worker 0) first; the others' as of the last
        snapshot (the exporter asks for the counters first, so the two describe the same moment)."""
        return [cpu_seconds(), *self.supervisor.last_cpu()]

    def workers_alive(self) -> bool:
        return self.supervisor.alive()

    def apply(self, changes: Apply) -> None:
        """Live changes: in worker 0 first (which may refuse them: SetupError for a peer the link cannot take,
        ConfigError, one line, for a peer diff the tables refuse; nothing changed then), then the same to the
        others."""
        try:
            self.worker.apply(changes)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if changes:
            self.supervisor.broadcast(changes)

    def move_metrics(self, listen: str) -> bool:
        """Serve /metrics at ``listen`` ("" = off) instead; False (old endpoint kept) if it cannot bind."""
        loop = asyncio.get_running_loop()
        new = None
        if listen:
            try:
                new = MetricsServer(listen)  # binds now: a busy port refuses the change, the old one stays
            except MetricsError as e:
                log.error("reload: %s; still serving metrics at %s", e, self.cfg.metrics_listen or "off")
                return False
            self._watch(new)
            new.start(loop)
        old = self.resources.replace_metrics(new)
        if old is not None:
            old.stop()
            loop.run_in_executor(None, old.close)  # close() waits up to 0.5 s for its thread: not on the loop
        return True

    def close(self) -> None:
        self.supervisor.stop()
        if self.worker is not None:
            self.worker.close()
        self.resources.close()


def describe(plan: Plan, device: Device, link: Link) -> str:
    """The tunnel in one log line, as started: the plan, and what the kernel granted (offloads, the port)."""
    cfg, codec = plan.cfg, plan.codec
    parts = [
        f"{cfg.mode} on {cfg.dev}",
        f"mtu {plan.mtu}",
        *([f"mac {plan.mac}"] if plan.mac else []),
        *([codec.describe()] if codec.describe() else []),
        (f"peer {cfg.peer} " if cfg.peers else "no static peers, ")
        + (f"udp/{link.port}" if isinstance(link, UdpLink) else str(codec.transport)),
        f"local {cfg.local or 'any'}",
        *([f"workers {plan.workers}"] if plan.workers > 1 else []),
        "offload " + (
            f"{codec.device.value} 0x{device.offloads:02x}, "
            + ("udp gso/gro" if isinstance(link, UdpLink) else "sendmmsg/recvmmsg")
            if plan.offload else "off"
        ),
        f"underlay {plan.underlay_dev or '?'} mtu {plan.underlay_mtu}",
        f"metrics {'http://' + cfg.metrics_listen + '/metrics' if cfg.metrics_listen else 'off'}",
    ]
    if cfg.addresses:
        parts.append("addresses " + " ".join(cfg.addresses))
    return ", ".join(parts)


async def serve(tunnel: Tunnel, reload: Loader | None = None) -> int:
    """Run until SIGINT or SIGTERM (exit status 0); SIGHUP reloads the configuration (see service.py).

    If the interface is deleted under us (``ip link del``), there is nothing left to carry: stop with exit
    status 1, so that a supervisor (systemd's Restart=on-failure) brings the tunnel back whole. So does a
    worker that dies, or does not start."""
    loop = asyncio.get_running_loop()
    worker, supervisor = tunnel.worker, tunnel.supervisor
    assert worker is not None
    service = Service(tunnel, reload)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, worker.stop)
    loop.add_signal_handler(signal.SIGHUP, service.reload)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by run(); one that came meanwhile lands now
    worker.start(loop)
    metrics = tunnel.resources.metrics
    if metrics is not None:
        metrics.start(loop)
    if supervisor.children:
        supervisor.attach(loop, lambda: worker.stop(1))
        # a SIGTERM meanwhile is a clean stop
        if not await supervisor.started(worker.stopped) and not worker.stopped.is_set():
            worker.stop(1)
    control = ControlServer(socket_path(runtime_dir(tunnel.cfg), tunnel.cfg.dev), tunnel.control)
    if not worker.stopped.is_set():
        try:
            await control.start()  # `tunneld show`; a second daemon for this device stops here
        except ControlError as e:
            log.error("%s; stopping (exit status 1)", e)
            worker.stop(1)
    uapi = None
    if not worker.stopped.is_set() and tunnel.plan.codec.name == "wireguard":
        # `wg show DEV`, `wg set DEV ...` reach us at /var/run/wireguard/DEV.sock (runtime/wgdevice.py); peers
        # change through tunnel.apply, as the control socket's and the registry's do
        uapi = UapiServer(tunnel.cfg.dev, EngineWgDevice(
            tunnel.plan.codec, worker.engine, tunnel.plan.port, on_host=host_check,
            published=tunnel.membership is not None,
            apply=lambda upserts, removals: tunnel.apply(Apply(peers_set=tuple(upserts), peers_removed=tuple(removals)))))
        try:
            await uapi.start()
        except (UapiSocketError, OSError) as e:
            log.error("wireguard userspace API: %s; stopping (exit status 1)", e)
            uapi = None
            worker.stop(1)
    registry = None
    if not worker.stopped.is_set() and tunnel.membership is not None:
        try:
            registry = tunnel.membership.start(loop)
        except Exception as e:  # noqa: BLE001 - e.g. the etcd client missing: one line, and the clean stop below
            log.error("registry: cannot start: %s; stopping (exit status 1)", e)
            worker.stop(1)
    if registry is not None:
        # A duplicate address or refused credentials stop us here; an etcd that does not answer does not: the
        # tunnel runs with its static peers and the registry keeps trying.
        if not await registry.first(REGISTRY_START_WAIT, give_up=worker.stopped.is_set):
            log.error("%s; stopping (exit status 1)", registry.refused)
            worker.stop(1)
    watcher = None
    if not worker.stopped.is_set():
        log.info("tunneld %s up: %s", __version__, describe(tunnel.plan, *tunnel.resources.unit(0)))
        service.ready()  # the interface is up and the sockets are bound (every worker's)
        watcher = loop.create_task(_watch(tunnel))
    try:
        status = await worker.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        service.stopping()
        if registry is not None:
            await loop.run_in_executor(None, registry.stop)  # revokes the lease: the others forget us now
        await control.stop()
        if uapi is not None:
            await uapi.close()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        metrics = tunnel.resources.metrics  # a reload may have moved it
        if metrics is not None:
            metrics.stop()
    if supervisor.children:
        await supervisor.snapshot()  # the final counters of every worker, for the line below
        supervisor.detach()
    log.info("shutting down: %s", tunnel.totals().summary())
    return status


async def _watch(tunnel: Tunnel) -> None:
    """Log what happened on the data path (see watch.py), once a second; the peer is read each time."""
    worker, supervisor = tunnel.worker, tunnel.supervisor
    watch = Watch(tunnel.totals(), worker.peer)
    while True:
        await asyncio.sleep(WATCH_INTERVAL)
        if supervisor.children:
            supervisor.request()  # the answers refresh the totals, and show that every worker is alive
            watch.stats = tunnel.totals()
        watch.peer = worker.peer
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

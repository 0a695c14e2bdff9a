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
import collections
import dataclasses
import ipaddress
import logging
import signal
import time
from typing import Callable

from tunneld import __version__
from tunneld.runtime.channel import Apply, Channel
from tunneld.config import ConfigError, TunnelConfig, check_joining, check_on_host
from tunneld.control.server import ControlError, ControlServer, Rows, runtime_dir, socket_path
from tunneld.datapath.fdb import mac_text
from tunneld.datapath.peers import REGISTRY, PeerSpec
from tunneld.control.registry import Membership, Record, RegistryStats, owner_id
from tunneld.encap.base import Encapsulator
from tunneld.io import SetupError
from tunneld.errors import EX_CONFIG, EX_NOPERM, EX_SOFTWARE, StartupError
from tunneld.io import netlink
from tunneld.io.egress import Unsupported as EgressUnsupported, choose as egress_choose
from tunneld.io.udp import UdpLink
from tunneld.observe.metrics import MetricsError, MetricsServer
from tunneld.runtime.plan import Plan, make_plan, stable_mac
from tunneld.io.device import Device
from tunneld.runtime.resources import Link, Resources
from tunneld.runtime.service import Loader, Service
from tunneld.datapath.stats import PeerStats, Stats, total
from tunneld.observe.watch import Watch
from tunneld.runtime.worker import Worker, cpu_seconds
from tunneld.runtime.workers import STOP_SIGNALS, Supervisor

__all__ = ["EX_CONFIG", "EX_NOPERM", "EX_SOFTWARE", "StartupError", "Tunnel", "describe", "run", "serve", "stable_mac"]

log = logging.getLogger("tunneld")

WATCH_INTERVAL = 1.0  # seconds between looks at the counters for the log (watch.py)
# ``tunneld show``: a peer is "up" when a valid packet from it arrived within this many seconds, "silent" when
# one arrived longer ago, "never" when none has. Three watch intervals: one lost look is not yet silence.
PEER_UP_WITHIN = 3 * WATCH_INTERVAL
REGISTRY_START_WAIT = 5.0  # seconds serve() waits for the first registration before going on without it
# Registry peer changes applied per turn of the event loop. Each is one live Apply, whose checks and table build
# are linear in the peers: at 1,000 peers one costs ~0.6 ms (measured, 2-core machine), so 8 hold the data path
# ~5 ms, and a resync of a thousand hosts is spread over 125 turns.
REGISTRY_CHUNK = 8


class Tunnel:
    """A tunnel put together: its plan, its descriptors, worker 0 and the supervisor of the others. It is
    what the service layer drives (service.Tunnel): totals, liveness, live changes, the metrics endpoint."""

    def __init__(self, cfg: TunnelConfig, modes: dict[str, type[Encapsulator]], *,
                 underlay_mtu: Callable[[str], tuple[int, str | None]] | None = None, cpus: int | None = None) -> None:
        self.plan: Plan = make_plan(cfg, modes, underlay_mtu=underlay_mtu, cpus=cpus)  # the look-ups: make_plan
        self.cfg = cfg  # the running configuration: a reload replaces it (service.py), the plan keeps the first
        self.workers = self.plan.workers
        self.resources = Resources(self.plan)
        self.supervisor = Supervisor()
        self.worker: Worker | None = None  # worker 0, once open
        # Membership through etcd (registry_client.py), started by serve() after the fork; its counters exist
        # from the start so that the metrics endpoint can export them whenever it is (re)made.
        self.registry_stats = RegistryStats() if cfg.registry is not None else None
        self.registry = None
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
            # One UDP_SEGMENT send no longer bounds a super-frame (plan.superframe_cap): the IPv4 length field does.
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

    # -- the control handler (control.py serves it on worker 0's loop) ---------------------------------------

    def show(self) -> dict:
        """What ``tunneld show --json`` prints (README "Many hosts"): the tunnel, each peer with its counters
        summed over the workers, and (L2 modes) the FDB as worker 0 holds it (all workers agree within 1 s).
        The peers and the FDB are ``control.Rows``: snapshots taken now, made into JSON objects a slice at a
        time as the control socket writes them, so that a full FDB never holds the data path's loop."""
        engine = self.worker.engine
        table = engine.peers
        stats = self.totals()
        now = time.time()

        def peer_row(peer) -> dict:
            spec = peer.spec
            ps = stats.peers.get(peer.address) or PeerStats()
            age = max(0.0, now - ps.last_rx) if ps.last_rx else None
            entry = {
                "address": peer.address,
                "name": spec.name,
                "source": spec.source,
                "state": "never" if age is None else "up" if age <= PEER_UP_WITHIN else "silent",
                "last_rx_age_s": None if age is None else round(age, 3),
                "tx_packets": ps.tx_packets,
                "rx_packets": ps.rx_packets,
                "tx_bytes": ps.tx_bytes,
                "rx_bytes": ps.rx_bytes,
                "dropped": ps.dropped,
            }
            if not table.l2:
                entry["routes"] = table.routes_of(peer)  # as the data path uses them (one peer: everything)
            entry["macs"] = list(spec.macs)
            return entry

        def fdb_row(item) -> dict:
            mac, e = item
            return {"mac": mac_text(mac), "peer": e.peer.address, "static": e.static,
                    "age_s": round(max(0.0, now - e.seen), 3)}

        link = self.worker.link
        out = {
            "device": self.cfg.dev,
            "mode": self.cfg.mode,
            "vni": self.plan.vni,
            "mtu": self.plan.mtu,
            "listen_port": link.port if isinstance(link, UdpLink) else None,
            "workers": self.workers,
            "peers": Rows(table.all, peer_row),  # table.all is a tuple: replaced, never changed in place
        }
        if table.fdb is not None:
            out["fdb"] = Rows(list(table.fdb.entries()), fdb_row)
            out["fdb_max"] = table.fdb.max_entries
        else:
            out["fdb_max"] = self.cfg.fdb_max
        out.update(fdb_learnt_total=stats.fdb_learnt, fdb_moved_total=stats.fdb_moved,
                   fdb_refused_total=stats.fdb_refused, flooded_packets_total=stats.flooded)
        rs = getattr(self, "registry_stats", None)  # (tests build bare Tunnels)
        if rs is not None:
            out["registry"] = {"endpoints": list(self.cfg.registry.endpoints), "prefix": self.cfg.registry.prefix,
                               "ttl": self.cfg.registry.ttl, "up": rs.up, "peers": rs.peers,
                               "invalid_records": dict(rs.invalid)}
        return out

    def add_peer(self, spec: PeerSpec) -> str | None:
        """Add a peer, or change a known one (its counters and learnt MACs stay). ConfigError (one line), and
        nothing changed, for what a configuration file would be refused for too (config.check_peers,
        check_on_host): routes in an L2 mode, MACs in an L3 mode, more than MAX_PEERS, an address, name, route
        or static MAC another peer has, another IP version, one of this host's own addresses. Returns a
        warning (one line, also logged) when the peer's path MTU is smaller than the device's MTU assumes:
        the device MTU is not changed live (every flow's MSS depends on it), so larger frames to that peer
        will not get through until a restart or a smaller ``mtu``."""
        table = self.worker.engine.peers
        l2 = table.l2
        if l2 and spec.routes:
            raise ConfigError(f"peer {spec.address}: routes are for L3 modes; {self.cfg.mode} learns MACs")
        if not l2 and spec.macs:
            raise ConfigError(f"peer {spec.address}: macs are for L2 modes; {self.cfg.mode} takes routes")
        others = tuple(p.spec for p in table.all if p.address != spec.address)  # registry peers included
        spec = check_joining(others, spec)
        check_on_host(spec.address, None, netlink.address_kind, netlink.is_own_address)
        warning = self._path_mtu_warning(spec.address)
        self.apply(Apply(peers_set=(spec,)))
        if warning:
            log.warning("%s", warning)
        if spec.source != REGISTRY:  # the registry's peers are not the file's: a reload's diff leaves them alone
            # The running configuration says what runs, so that a SIGHUP's diff is taken against it: a reload
            # makes the peers what the file says (as `wg syncconf` does), whether or not they came through here.
            kept = tuple(p for p in self.cfg.peers if p.address != spec.address)
            self.cfg = dataclasses.replace(self.cfg, peers=(*kept, spec))
        return warning

    def _path_mtu_warning(self, address: str) -> str | None:
        """A line when the underlay path towards ``address`` carries less than the device MTU plus overhead."""
        path_mtu = netlink.path_mtu(address)
        if path_mtu is None:
            return None  # no route yet: nothing known to compare (the start-up plan assumes the default too)
        inner = path_mtu - self.plan.codec.overhead(ipaddress.ip_address(address).version == 6)
        if inner >= self.plan.mtu:
            return None
        return (f"peer {address}: its path MTU {path_mtu} carries inner packets of at most {inner} "
                f"bytes, less than {self.cfg.dev}'s MTU {self.plan.mtu}: larger ones to it will not get through; "
                "the device MTU is not changed live (restart, or set mtu)")

    def remove_peer(self, address: str) -> None:
        """Remove a peer: its FDB entries, routes and counters go; ConfigError (one line) for an unknown one."""
        try:
            canonical = str(ipaddress.ip_address(address))
        except ValueError:
            raise ConfigError(f"not an IP address: {address!r}") from None
        if self.worker.engine.peers.get(canonical) is None:
            raise ConfigError(f"no peer {canonical} on {self.cfg.dev}")
        self.apply(Apply(peers_removed=(canonical,)))
        self.cfg = dataclasses.replace(self.cfg, peers=tuple(p for p in self.cfg.peers if p.address != canonical))

    # -- the registry (registry_client.py): its thread hands changes to this loop ----------------------------

    def start_registry(self, loop: asyncio.AbstractEventLoop):
        """Register this host and follow the others (call on the data path's loop, after any fork)."""
        from tunneld.control.etcd import Registry

        cfg, plan = self.cfg, self.plan
        l2 = self.worker.engine.peers.l2
        record = Record(cfg.local, cfg.mode, plan.vni, plan.mac if l2 else None, cfg.addresses, __version__,
                        round(time.time(), 3), owner_id(cfg.dev))
        membership = Membership(cfg.registry.hosts_prefix(), cfg.local, l2=l2, mode=cfg.mode, vni=plan.vni,
                                stats=self.registry_stats)
        pending: collections.deque = collections.deque()  # (upserts, removals), in the order etcd said them

        def drain() -> None:
            # At most REGISTRY_CHUNK peer changes per turn of the loop: a resync of a thousand hosts must not hold
            # the data path for the whole of it. One queue keeps etcd's order (a join, then its leave).
            done = 0
            try:
                while pending and done < REGISTRY_CHUNK:
                    upserts, removals = pending.popleft()
                    self.registry_changes(upserts, removals)
                    done += len(upserts) + len(removals)
            finally:  # whatever one change raised, the others still come (deliver only calls drain when idle)
                if pending:
                    loop.call_soon(drain)

        def deliver(upserts: tuple[PeerSpec, ...], removals: tuple[str, ...]) -> None:
            idle = not pending
            pending.extend(((), (address,)) for address in removals)
            pending.extend(((spec,), ()) for spec in upserts)
            if idle:
                drain()

        self.registry = Registry(cfg.registry, record, membership, loop=loop, deliver=deliver,
                                 stats=self.registry_stats)
        log.info("registry: %s as %s", cfg.registry.describe(), cfg.local)
        self.registry.start()
        return self.registry

    def registry_changes(self, upserts: tuple[PeerSpec, ...], removals: tuple[str, ...]) -> None:
        """Hosts that joined, changed or left, as peers. A static peer (flags, file, control socket) wins over a
        record for its address: the record is not applied, and its leaving does not remove the static peer. A
        peer the tunnel refuses is logged and counted (``refused``); the others still apply."""
        static = {spec.address for spec in self.cfg.peers}
        table = self.worker.engine.peers
        for address in removals:
            peer = table.get(address)
            if peer is not None and peer.spec.source == REGISTRY and address not in static:
                self.remove_peer(address)
                log.info("registry: host %s left", address)
        for spec in upserts:
            if spec.address in static:
                continue
            known = table.get(spec.address) is not None
            try:
                self.add_peer(spec)
            except (ConfigError, SetupError) as e:
                log.warning("registry: host %s not made a peer: %s", spec.address, e)
                self.registry_stats.invalid["refused"] += 1
                continue
            except Exception:  # noqa: BLE001 - a bug here must cost one host, not the registry for good
                log.exception("registry: host %s not made a peer", spec.address)
                self.registry_stats.invalid["refused"] += 1
                continue
            if not known:
                log.info("registry: host %s joined", spec.address)
        self.registry_stats.peers = sum(1 for p in table.all if p.spec.source == REGISTRY)

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
    control = ControlServer(socket_path(runtime_dir(tunnel.cfg), tunnel.cfg.dev), tunnel)
    if not worker.stopped.is_set():
        try:
            await control.start()  # `tunneld show`; a second daemon for this device stops here
        except ControlError as e:
            log.error("%s; stopping (exit status 1)", e)
            worker.stop(1)
    registry = None
    if not worker.stopped.is_set() and tunnel.cfg.registry is not None:
        try:
            registry = tunnel.start_registry(loop)
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

"""Living under systemd: readiness, watchdog, status, reload and stop, over the sd_notify protocol.

The protocol (sd_notify(3)): the service manager passes ``$NOTIFY_SOCKET``, an AF_UNIX datagram socket given
as a path, or as an abstract name when it starts with "@" (the "@" stands for the leading NUL byte). Each
datagram is newline-separated ``KEY=VALUE`` lines. Without ``$NOTIFY_SOCKET`` every call here is a no-op,
so the daemon behaves the same in a terminal.

What we tell the manager, and when:
  READY=1        once the interface is up and the sockets are bound (Type=notify: only then is the unit
                 "active", and units ordered after it start);
  STATUS=...     one line: peer and packets each way; shown by `systemctl status`;
  WATCHDOG=1     from a task on the event loop every half of ``$WATCHDOG_USEC``: if the loop is stuck, the
                 pings stop and systemd kills and restarts us (WatchdogSec=);
  RELOADING=1    on SIGHUP, then READY=1 when the new configuration is applied or refused;
  STOPPING=1     when shutting down.

Reload: the file is read again (with the same command-line overrides). What can change on a running tunnel
changes in place: the peers, the log level, the metrics endpoint (the new one is bound before the old one
closes). The peers travel as a diff (``peer_diff``): the peers added or changed (name, routes, static MACs)
and the addresses removed; an unchanged peer is in neither, so it keeps its counters and learnt MACs. The
first peer's address also goes as ``Apply.peer``, the one-peer link's send address and receive filter. A
diff the tunnel refuses (a route another peer owns, another IP version) is logged in one line and the running
peers stay. Everything else is part of the interface, the sockets or the tables' sizes (fdb.max, fdb.ageing,
control.runtime_dir); a change there is reported as needing a restart and the running values stay. A new
file that does not validate is refused with one log line per problem, and the tunnel keeps running unchanged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from typing import Callable, Mapping, Protocol

from tunneld.runtime.channel import Apply
from tunneld.config.schema import ConfigError, TunnelConfig
from tunneld.config.loading import FILE_KEYS, ConfigFileError
from tunneld.io import SetupError
from tunneld.datapath.peers import PeerSpec
from tunneld.datapath.stats import Stats

log = logging.getLogger("tunneld")

STATUS_INTERVAL = 5.0  # seconds between STATUS= updates when there is no watchdog to piggyback on
LIVE = ("peers", "log_level", "metrics_listen")  # TunnelConfig fields a reload applies in place


def peer_diff(old: tuple[PeerSpec, ...], new: tuple[PeerSpec, ...]) -> tuple[tuple[PeerSpec, ...], tuple[str, ...]]:
    """(the specs of ``new`` that are added or changed, in its order; the addresses of ``old`` not in ``new``)."""
    before = {spec.address: spec for spec in old}
    after = {spec.address for spec in new}
    return (tuple(spec for spec in new if before.get(spec.address) != spec),
            tuple(spec.address for spec in old if spec.address not in after))


class Notifier:
    """Sends sd_notify datagrams to ``$NOTIFY_SOCKET``; does nothing when it is unset. Never raises."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        self.sock: socket.socket | None = None
        if path.startswith("@"):
            self.address = b"\0" + path[1:].encode()  # abstract namespace
        elif path.startswith("/"):
            self.address = path
        elif path:
            log.warning("NOTIFY_SOCKET=%r is neither a path nor an @abstract name; not notifying", path)
        if self.address is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_interval = self._watchdog_interval(env)
        self._warned = False

    @staticmethod
    def _watchdog_interval(env: Mapping[str, str]) -> float | None:
        """Half of $WATCHDOG_USEC in seconds, if the watchdog is meant for this process (sd_watchdog_enabled)."""
        try:
            usec = int(env.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        pid = env.get("WATCHDOG_PID")
        if usec <= 0 or (pid and pid != str(os.getpid())):
            return None
        return usec / 2e6

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def notify(self, *fields: str) -> bool:
        if self.sock is None:
            return False
        try:
            self.sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as e:
            if not self._warned:  # the manager went away, or a bad socket: say it once, keep running
                log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), e.strerror or e)
                self._warned = True
            return False
        return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _monotonic_usec() -> str:
    # systemd ≥ 253 (Type=notify-reload) wants RELOADING=1 stamped with CLOCK_MONOTONIC; older ones ignore it.
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


Loader = Callable[[], TunnelConfig]


class Tunnel(Protocol):
    """What the service layer needs of a running tunnel (daemon.Tunnel; tests pass small fakes)."""

    cfg: TunnelConfig  # the running configuration; a reload replaces it with what it applied
    workers: int  # processes carrying the tunnel; with more than one, their liveness is looked at every tick

    def totals(self) -> Stats:
        """Every worker's counters added up."""

    def workers_alive(self) -> bool:
        """Whether every worker answers (logs one that does not); True with a single worker."""

    def apply(self, changes: Apply) -> None:
        """Apply live changes in every worker; raises SetupError (nothing changed) if the link refuses a peer."""

    def move_metrics(self, listen: str) -> bool:
        """Serve /metrics at ``listen`` ("" = off) instead; False (logged, old endpoint kept) if it cannot."""


class Service:
    """The daemon's side of the service manager: notifications, the watchdog task and reloads."""

    def __init__(self, tunnel: Tunnel, reload: Loader | None = None, notifier: Notifier | None = None) -> None:
        self.tunnel = tunnel
        self.loader = reload
        self.notifier = notifier or Notifier()
        self._task: asyncio.Task | None = None
        self._last_status = ""

    def status_line(self) -> str:
        s = self.tunnel.totals()
        peers = self.tunnel.cfg.peers
        who = f"peer {self.tunnel.cfg.peer}" if len(peers) == 1 else f"{len(peers)} peers"
        registry = getattr(self.tunnel, "registry_stats", None)  # with --registry (daemon.Tunnel)
        if registry is not None:
            who += f" + {registry.peers} from etcd" + ("" if registry.up else " (etcd unreachable)")
        line = f"{who}: sent {s.tx_packets} packets, received {s.rx_packets}"
        return line + (f", dropped {s.dropped}" if s.dropped else "")

    def ready(self) -> None:
        self._last_status = self.status_line()
        self.notifier.notify("READY=1", f"STATUS={self._last_status}")
        workers = self.tunnel.workers > 1  # their liveness is looked at on every tick
        if (self.notifier.enabled or workers) and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._heartbeat())

    async def _heartbeat(self) -> None:
        interval = self.notifier.watchdog_interval
        while True:
            await asyncio.sleep(interval or STATUS_INTERVAL)
            ok = self.tunnel.workers_alive()  # logs a stalled worker, and its recovery, watchdog or not
            if interval and ok:  # a wedged worker withholds the ping: systemd restarts us
                self.notifier.notify("WATCHDOG=1")
            status = self.status_line()
            if status != self._last_status:
                self._last_status = status
                self.notifier.notify(f"STATUS={status}")

    def stopping(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.notifier.notify("STOPPING=1", f"STATUS=stopping; {self.status_line()}")

    def reload(self) -> None:
        """SIGHUP: read the configuration again and apply what can be applied live."""
        if self.loader is None:
            log.warning("SIGHUP: no --config file to reload; ignored")
            return
        self.notifier.notify("RELOADING=1", _monotonic_usec(), "STATUS=reloading the configuration")
        try:
            try:
                new = self.loader()
            except ConfigFileError as e:
                for line in e.problems:
                    log.error("reload refused, keeping the running configuration: %s", line)
                return
            except ConfigError as e:
                log.error("reload refused, keeping the running configuration: %s", e)
                return
            self.apply(new)
        finally:
            self.notifier.notify("READY=1", f"STATUS={self.status_line()}")

    def apply(self, new: TunnelConfig) -> None:
        old = self.tunnel.cfg
        applied: dict[str, object] = {}
        peers_set, peers_removed = peer_diff(old.peers, new.peers)
        if peers_set or peers_removed or new.peer != old.peer:  # a reorder moves the first peer
            # (not with a registry: the table holds its peers too, which a one-peer swap would drop)
            if len(old.peers) == len(new.peers) == 1 and new.peer != old.peer and old.registry is None:
                # one peer for another: the link's own check of the new address, with the new peer's whole spec
                changes = Apply(peer=new.peer, peers_set=new.peers)
            else:
                changes = Apply(peers_set=peers_set, peers_removed=peers_removed)
            try:
                self.tunnel.apply(changes)
            except SetupError as e:  # LinkError: another IP version needs a new socket
                log.error("reload: peer %s cannot be applied live (%s); restart to apply it", new.peer, e)
            except ConfigError as e:  # the tables refuse a spec (a route another peer already owns, ...)
                log.error("reload: peers refused, keeping the running ones: %s", e)
            else:
                applied["peers"] = new.peers
                if len(old.peers) == len(new.peers) == 1:
                    log.info("reload: peer %s -> %s", old.peer, new.peer)
                else:
                    log.info("reload: peers: %s", _describe_diff(old.peers, peers_set, peers_removed))
        if new.log_level != old.log_level:
            self.tunnel.apply(Apply(log_level=new.log_level))
            applied["log_level"] = new.log_level
            log.info("reload: log level %s -> %s", old.log_level, new.log_level)
        if new.metrics_listen != old.metrics_listen and self.tunnel.move_metrics(new.metrics_listen):
            applied["metrics_listen"] = new.metrics_listen
            log.info("reload: metrics %s -> %s", old.metrics_listen or "off", new.metrics_listen or "off")
        restart = [name for name in new.changed(old) if name not in LIVE]
        if restart:
            keys = ", ".join(FILE_KEYS.get(name, f"tunnel.{name}") for name in restart)
            log.warning("reload: %s changed; needs a restart (systemctl restart), running with the old values", keys)
        if applied:
            self.tunnel.cfg = dataclasses.replace(old, **applied)
        elif not restart and new == old:
            log.info("reload: configuration unchanged")


def _describe_diff(old: tuple[PeerSpec, ...], peers_set: tuple[PeerSpec, ...], removed: tuple[str, ...]) -> str:
    known = {spec.address for spec in old}
    parts = [f"{verb} {', '.join(names)}" for verb, names in (
        ("added", [spec.label() for spec in peers_set if spec.address not in known]),
        ("changed", [spec.label() for spec in peers_set if spec.address in known]),
        ("removed", list(removed))) if names]
    return "; ".join(parts) or "reordered"

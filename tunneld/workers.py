"""Several processes on one tunnel: ``--workers N``.

Theory of operation:
- One Python process carries a few Gbit/s before its CPU is full. With N workers the interface has N queues
  (IFF_MULTI_QUEUE, io/device.py) and the tunnel port N receive sockets (SO_REUSEPORT, io/udp.py
  ``open_group``). The kernel picks the queue of each frame it transmits into the interface, and the socket of
  each datagram that arrives, by flow hash: a flow stays with one worker (no reordering) and different flows
  run in parallel. The peer's outer source port carries its inner flow hash (RFC 7348 §5), which is what
  spreads its flows over our receive sockets.
- The parent opens everything as root before any fork: every queue, every socket, the metrics listener. It
  then forks N-1 children before any event loop exists (an event loop must not cross a fork). Worker 0 is
  the parent itself: the same engine as a single-process tunneld, plus the supervision below.
- A child keeps only its own queue and link (it closes the others' and the metrics listener), asks the
  kernel to SIGKILL it if the parent dies (PR_SET_PDEATHSIG), and ignores SIGINT, SIGTERM and SIGHUP: the
  parent decides. (systemd's stop sends SIGTERM to every process of the unit at once; a child that obeyed
  would look to the parent like a worker that died.) It runs its engine on its own uvloop until the parent
  says stop or closes the control socket, or the interface is deleted (exit status 1).
- Parent and child talk over one SOCK_SEQPACKET socketpair per child, pickled tuples (both ends are this
  program, forked from one process):
    child → parent: ("ready",) once its engine is attached; ("stats", seq, Stats, cpu seconds) in answer
                    to a request (the CPU time the worker has used: os.times(), user + system).
    parent → child: ("stats", seq); ("apply", {"peer": ..., "log_level": ...}) on reload; ("stop",).
- A child that exits unasked is fatal: the parent learns it from the child's pidfd, logs how it died, and
  stops with status 1, so that systemd restarts the whole unit with every worker. Its flows are not lost
  meanwhile: closing its queue's fd detaches the queue (the device has one queue fewer and the kernel
  re-steers), and its closed socket leaves the SO_REUSEPORT group; the tunnel would only run short of a
  worker. What does lose flows is a worker that is alive but wedged: its queue and socket stay attached and
  the kernel keeps steering flows into them. That is what the liveness check below is for.
- Metrics stay exact and scrape-time: each process counts with plain ints as a single worker does, and a
  scrape asks every child for a snapshot of its Stats (with a timeout; a late child's last snapshot stands in,
  so that counters never go backwards) and adds them to the parent's own. Nothing is added per packet.
- A child has at most one ("stats", seq) request outstanding: while it has not answered, further asks skip
  it and a scrape waits for that answer (or, at its timeout, uses the last one). So a stalled child's socket
  never fills with requests, and a reload's ("apply", ...) always fits; should one still not fit (a child
  that has not read for hundreds of reloads), the parent stops with status 1, naming the worker, rather than
  leave it sending to the old peer.
- Liveness: the parent asks every child for a snapshot once a second (the same message), and looks at the
  answers on every heartbeat tick (service.py; with or without a systemd watchdog). A child that has not
  answered for LATE_AFTER seconds is logged (once, and again when it answers) and, under a watchdog, the
  ping is withheld, so a wedged worker gets the unit restarted.
- Raw IP transports (GRE, gretap): every raw socket receives its own copy of every packet (there is no
  SO_REUSEPORT for raw IP), so N workers would deliver each packet N times; and with GRE sequence numbers
  the peer must see one sender. They run with one worker (``resolve``). A design where only worker 0
  receives and the others only send was considered: it spreads only the sending half while every packet
  still enters through one process, and it would break --seq, so it is not worth a second code path.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import pickle
import signal
import socket
import time
from typing import Callable

from tunneld.stats import Stats

log = logging.getLogger("tunneld")

AUTO_CAP = 8  # "auto" never picks more workers than this
# auto_workers() in words, for --help and the README's readers: keep it true when the rule changes.
AUTO_RULE = f"1 with 2 CPUs available to the process or fewer, else half of them, at most {AUTO_CAP}"
READY_TIMEOUT = 15.0  # seconds for every child to attach its engine
SNAPSHOT_TIMEOUT = 1.0  # seconds a scrape waits for the children's counters
LATE_AFTER = 5.0  # seconds without an answer after which a child counts as wedged
STOP_TIMEOUT = 5.0  # seconds the children get to stop before SIGKILL
LATE_WARN_EVERY = 60.0  # seconds between log lines about a worker late with its counters
MESSAGE_MAX = 1 << 16
PR_SET_PDEATHSIG = 1  # include/uapi/linux/prctl.h
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # blocked from before open() until handled


def usable_cpus() -> int:
    """The CPUs available to this process, not the machine's total: those it may run on (its affinity:
    taskset, a cgroup cpuset), and no more than a cgroup CPU quota pays for (a container given 2 CPUs' worth
    of time on a 32-CPU host has 2)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return cpus if quota is None else min(cpus, quota)


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup", self_cgroup: str = "/proc/self/cgroup") -> int | None:
    """The CPUs a cgroup v2 CPU quota allows this process, rounded up: ``cpu.max`` ("QUOTA PERIOD", or "max
    PERIOD" for none) of its cgroup (the "0::PATH" line of /proc/self/cgroup) and of every ancestor up to
    ``root``, the tightest; None when there is no quota, or no cgroup v2 to read it from."""
    try:
        with open(self_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    path = next((line[3:] for line in lines if line.startswith("0::")), None)
    if path is None:
        return None
    top = os.path.normpath(root)
    where = os.path.normpath(os.path.join(top, path.lstrip("/")))
    if os.path.commonpath([top, where]) != top:
        return None
    limit = None
    while True:
        try:
            with open(os.path.join(where, "cpu.max")) as f:
                quota, period = f.read().split()[:2]
            if quota != "max":
                cpus = max(1, -(-int(quota) // int(period)))  # ceil
                limit = cpus if limit is None else min(limit, cpus)
        except (OSError, ValueError):
            pass  # no cpu controller here (or a file we do not understand): no quota from this level
        if where == top:
            return limit
        where = os.path.dirname(where)


def auto_workers(cpus: int) -> int:
    """The rule behind --workers auto. Each worker is a process that keeps one CPU busy under load, and the
    kernel needs CPU time of its own for the same packets (softirq, the TUN queues, the endpoints' TCP). On 2
    CPUs one worker already leaves the second CPU to the kernel, and a second worker only competes with it.
    Measured on the 2-vCPU CI machine (bench/, tunneld-vxlan vs tunneld-vxlan-workers2, five same-run pairs):
    TCP with 4 streams 1.75/3.74/2.26/3.17/3.37 Gbit/s with one worker, 1.56/3.49/2.75/2.61/3.23 with two,
    and 5-15 % more CPU per GB. From 3 CPUs on, half of them, at most AUTO_CAP (a guess, not a measurement)."""
    return 1 if cpus <= 2 else min(cpus // 2, AUTO_CAP)


def resolve(requested: int | str, transport_kind: str, cpus: int | None = None) -> tuple[int, str | None]:
    """How many workers to run, and a line for the log when that is not simply what was asked."""
    if requested == "auto":
        cpus = usable_cpus() if cpus is None else cpus
        n = auto_workers(cpus)
        note = f"workers auto: {n} for {cpus} CPU{'s' * (cpus != 1)}"
    else:
        n, note = int(requested), None
    if n > 1 and transport_kind != "udp":
        return 1, (f"workers {requested}: using 1; over raw IP every socket receives every packet, so a second "
                   "worker would deliver each packet twice")
    return n, note


def _set_pdeathsig(sig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def _send(sock: socket.socket, message: tuple) -> bool:
    """A child's answer, or the parent's last ("stop",): a failure is left to the other side's timeouts."""
    try:
        sock.send(pickle.dumps(message))
    except OSError:  # full (the other end is not reading) or gone
        return False
    return True


def _describe_exit(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


class Child:
    """The parent's handle on one worker process."""

    def __init__(self, index: int, pid: int, ctl: socket.socket) -> None:
        self.index = index
        self.pid = pid
        self.ctl = ctl
        self.pidfd = os.pidfd_open(pid)  # readable once the process has exited
        self.ready = False
        self.stats: Stats | None = None  # the last snapshot it sent
        self.cpu = 0.0  # the CPU seconds it had used at that snapshot
        self.answered = time.monotonic()  # when it last answered
        self.asked = False  # a ("stats", seq) request is outstanding: at most one is, however often we ask
        self.exited: int | None = None  # its wait status, once reaped


class Pool:
    """The children of the parent (worker 0), from the parent's side."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.children: list[Child] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_death: Callable[[], None] = lambda: None
        self._stopping = False
        self._seq = 0
        self._waiting: dict[int, tuple[asyncio.Future, set[int]]] = {}
        self._changed: asyncio.Event | None = None  # set whenever a child becomes ready or dies
        self._late_logged: set[int] = set()
        self._late_warned = float("-inf")

    # -- on the parent's event loop ------------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop, on_death: Callable[[], None]) -> None:
        self._loop = loop
        self._on_death = on_death
        self._changed = asyncio.Event()
        for child in self.children:
            child.ctl.setblocking(False)
            loop.add_reader(child.ctl.fileno(), self._on_message, child)
            loop.add_reader(child.pidfd, self._on_exit, child)

    def detach(self) -> None:
        if self._loop is None:
            return
        for child in self.children:
            self._loop.remove_reader(child.ctl.fileno())
            self._loop.remove_reader(child.pidfd)
        for future, _ in self._waiting.values():
            future.cancel()
        self._waiting.clear()
        self._loop = None

    async def started(self, stop: asyncio.Event, timeout: float = READY_TIMEOUT) -> bool:
        """Wait until every child has attached its engine; False (logged) if one died or took too long, or
        at once if ``stop`` is set (SIGTERM during start-up)."""
        assert self._changed is not None
        deadline = time.monotonic() + timeout
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not all(c.ready for c in self.children):
                if any(c.exited is not None for c in self.children):
                    return False  # _on_exit has said which
                if stop.is_set():
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    slow = ", ".join(str(c.index) for c in self.children if not c.ready)
                    log.error("worker %s did not start within %.0f s; stopping (exit status 1)", slow, timeout)
                    return False
                self._changed.clear()
                changed = asyncio.ensure_future(self._changed.wait())
                await asyncio.wait((changed, stopping), timeout=left, return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
            return True
        finally:
            stopping.cancel()

    def _on_message(self, child: Child) -> None:
        for _ in range(64):  # bounded: a child sends one answer per request
            try:
                data = child.ctl.recv(MESSAGE_MAX)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # the child is gone; its pidfd tells how
                assert self._loop is not None
                self._loop.remove_reader(child.ctl.fileno())
                return
            message = pickle.loads(data)
            kind = message[0]
            if kind == "ready":
                child.ready = True
                child.answered = time.monotonic()
                if self._changed is not None:
                    self._changed.set()
            elif kind == "stats":
                _, seq, stats, cpu = message
                child.stats, child.cpu = stats, cpu
                child.asked = False
                child.answered = time.monotonic()
                for future, pending in self._waiting.values():  # its one answer serves every waiting scrape
                    pending.discard(child.index)
                    if not pending and not future.done():
                        future.set_result(None)

    def _on_exit(self, child: Child) -> None:
        assert self._loop is not None
        self._loop.remove_reader(child.pidfd)
        try:
            pid, status = os.waitpid(child.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = child.pid, 0
        if pid == 0:
            return  # not yet (a spurious wake-up); the reader is gone, so the next look is at shutdown
        child.exited = status
        if self._changed is not None:
            self._changed.set()
        if not self._stopping:
            log.error("worker %d (pid %d) %s; stopping the tunnel (exit status 1) rather than run it without "
                      "that worker's queue and socket", child.index, child.pid, _describe_exit(status))
            self._on_death()

    def request(self) -> int:
        """Ask every child for a snapshot of its counters, unless it has yet to answer the last request (a
        stalled child must not find hundreds of requests queued, filling the socket so that a reload's
        ("apply", ...) no longer fits); returns the request's number."""
        self._seq += 1
        for child in self.children:
            if child.exited is None and not child.asked:
                child.asked = self._deliver(child, ("stats", self._seq))
        return self._seq

    async def snapshot(self, timeout: float = SNAPSHOT_TIMEOUT) -> list[Stats]:
        """Every child's counters, fresh if it answers within ``timeout``, else the last it sent."""
        assert self._loop is not None
        future = self._loop.create_future()
        seq = self.request()
        self._waiting[seq] = (future, {c.index for c in self.children if c.exited is None and c.asked})
        if not self._waiting[seq][1]:
            future.set_result(None)
        try:
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            if time.monotonic() - self._late_warned >= LATE_WARN_EVERY:  # not once per scrape
                self._late_warned = time.monotonic()
                late = ", ".join(str(c.index) for c in self.children if c.index in self._waiting[seq][1])
                log.warning("metrics: worker %s did not report its counters within %.1f s; using its last report",
                            late, timeout)
        finally:
            self._waiting.pop(seq, None)
        return self.last()

    def snapshot_threadsafe(self, timeout: float = SNAPSHOT_TIMEOUT) -> list[Stats]:
        """``snapshot`` from another thread (the metrics server's), through the parent's event loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return self.last()
        try:
            return asyncio.run_coroutine_threadsafe(self.snapshot(timeout), loop).result(timeout + 1.0)
        except Exception:  # the loop is stopping, or is itself stuck: the last reports, never a failed scrape
            return self.last()

    def last(self) -> list[Stats]:
        """The last snapshot of every child (zeros for one that has not sent any yet)."""
        return [c.stats if c.stats is not None else Stats(self.batch) for c in self.children]

    def last_cpu(self) -> list[float]:
        """Every child's CPU seconds as of its last snapshot."""
        return [c.cpu for c in self.children]

    def alive(self) -> bool:
        """Whether every child answered within LATE_AFTER seconds (the watchdog ping waits on it). A child
        that has not is logged once, and again once it answers."""
        now = time.monotonic()
        ok = True
        for child in self.children:
            if child.exited is not None:
                continue  # _on_exit has said how, and is stopping the daemon
            if now - child.answered > LATE_AFTER:
                ok = False
                if child.index not in self._late_logged:
                    self._late_logged.add(child.index)
                    log.error("worker %d (pid %d) has not answered for %.0f s: stalled, the flows the kernel "
                              "steers to it go unserved (with a systemd watchdog, the ping is withheld)",
                              child.index, child.pid, now - child.answered)
            elif child.index in self._late_logged:
                self._late_logged.discard(child.index)
                log.warning("worker %d (pid %d) answers again", child.index, child.pid)
        return ok

    def broadcast(self, message: tuple) -> None:
        """Send every child ``message`` (a reload's ("apply", ...)); one that cannot take it stops the daemon."""
        for child in self.children:
            if child.exited is None:
                self._deliver(child, message)

    def _deliver(self, child: Child, message: tuple) -> bool:
        """Queue ``message`` on the child's control socket. With at most one stats request outstanding the
        socket holds hundreds of messages, so a full one means a child that has not read for a long time; a
        reload it would miss must not pass silently (it would keep sending to the old peer): stop, status 1."""
        try:
            child.ctl.send(pickle.dumps(message))
        except BlockingIOError:
            if not self._stopping:
                log.error("worker %d (pid %d) does not read its control socket (full); cannot deliver %r; "
                          "stopping the tunnel (exit status 1)", child.index, child.pid, message[0])
                self._on_death()
            return False
        except OSError:  # gone: its pidfd says how, and that stops the daemon
            return False
        return True

    # -- after the parent's loop has ended -----------------------------------------------------------------

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Tell every child to stop, wait for them (bounded), SIGKILL the ones that do not, reap them all."""
        self._stopping = True
        self.detach()
        for child in self.children:
            if child.exited is None:
                child.ctl.setblocking(True)
                child.ctl.settimeout(0.5)
                _send(child.ctl, ("stop",))
            child.ctl.close()  # a child that missed the message sees the end of the socket and stops too
        deadline = time.monotonic() + timeout
        for child in self.children:
            while child.exited is None:
                pid, status = os.waitpid(child.pid, os.WNOHANG)
                if pid:
                    child.exited = status
                    if os.waitstatus_to_exitcode(status) != 0:
                        log.warning("worker %d (pid %d) %s while stopping", child.index, child.pid,
                                    _describe_exit(status))
                    break
                if time.monotonic() > deadline:
                    log.error("worker %d (pid %d) did not stop within %.0f s; killing it", child.index, child.pid,
                              timeout)
                    os.kill(child.pid, signal.SIGKILL)
                    _, child.exited = os.waitpid(child.pid, 0)
                    break
                time.sleep(0.01)
            os.close(child.pidfd)


# -- forking ----------------------------------------------------------------------------------------------------


def fork_workers(tunnel, units: list) -> Pool:
    """Fork one child per (device queue, link) in ``units``: worker 1, 2, ... The parent keeps none of them.

    ``tunnel`` is the parent's daemon.Tunnel, fully open; a child calls ``tunnel.forget_in_child()`` to close
    what is not its own, and ``tunnel.make_engine(device, link)`` to build its data path. A child never
    returns from here: it leaves with os._exit, so that nothing of the parent's (its finally clauses, its
    atexit handlers, the interface's teardown) runs twice.
    """
    pool = Pool(tunnel.engine.batch)
    parent_pid = os.getpid()
    try:
        _fork_each(pool, parent_pid, tunnel, units)
    except OSError:  # EAGAIN, ENOMEM: stop the children already started; the caller reports it
        pool.stop()
        raise
    finally:
        for device, link in units:  # the children's now; the parent must not keep their queues attached
            device.close()
            link.close()
    return pool


def _fork_each(pool: Pool, parent_pid: int, tunnel, units: list) -> None:
    for index, (device, link) in enumerate(units, start=1):
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError:
            parent_end.close()
            child_end.close()
            raise
        if pid == 0:
            code = 1
            try:
                parent_end.close()
                for child in pool.children:
                    child.ctl.close()
                    os.close(child.pidfd)
                for other, (d, l) in enumerate(units, start=1):
                    if other != index:
                        d.close()
                        l.close()
                tunnel.forget_in_child()
                code = _child_main(index, parent_pid, tunnel, device, link, child_end)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                os._exit(code)
        child_end.close()
        try:
            pool.children.append(Child(index, pid, parent_end))
        except OSError:  # pidfd_open: EMFILE, ENOSYS (before Linux 5.3), EPERM (seccomp): a child we cannot track
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            parent_end.close()
            raise


def _child_main(index: int, parent_pid: int, tunnel, device, link, ctl: socket.socket) -> int:
    _set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the prctl: nobody to work for
        return 0
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by the parent since before open()
    import uvloop

    return uvloop.run(_child_serve(index, tunnel, device, link, ctl))


async def _child_serve(index: int, tunnel, device, link, ctl: socket.socket) -> int:
    from tunneld.metrics import LoopLagProbe

    loop = asyncio.get_running_loop()
    engine = tunnel.make_engine(device, link)
    stop = asyncio.Event()
    status = 0

    def device_gone() -> None:
        nonlocal status
        log.error("worker %d: interface %s was deleted while running; stopping", index, tunnel.cfg.dev)
        status = 1
        stop.set()

    def apply(changes: dict) -> None:
        if "peer" in changes:
            link.set_peer(changes["peer"])
            tunnel.codec.peer_changed()
        if "log_level" in changes:
            logging.getLogger().setLevel(changes["log_level"].upper())

    def on_ctl() -> None:
        for _ in range(64):
            try:
                data = ctl.recv(MESSAGE_MAX)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # the parent closed its end, or is gone
                loop.remove_reader(ctl.fileno())
                stop.set()
                return
            message = pickle.loads(data)
            kind = message[0]
            if kind == "stats":
                times = os.times()
                _send(ctl, ("stats", message[1], engine.stats, times.user + times.system))
            elif kind == "apply":
                try:
                    apply(message[1])
                except Exception as e:  # the parent applied the same change; say so, keep carrying packets
                    log.error("worker %d: reload: %s", index, e)
            elif kind == "stop":
                stop.set()

    engine.on_device_gone = device_gone
    engine.attach(loop)
    probe = LoopLagProbe(engine.stats)
    probe.start(loop)
    ctl.setblocking(False)
    loop.add_reader(ctl.fileno(), on_ctl)
    _send(ctl, ("ready",))
    log.debug("worker %d (pid %d) up", index, os.getpid())
    try:
        await stop.wait()
    finally:
        probe.stop()
        engine.detach()
        loop.remove_reader(ctl.fileno())
    log.debug("worker %d: %s", index, engine.stats.summary())
    return status

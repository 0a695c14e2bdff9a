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
- Every worker, the parent's worker 0 included, is the same ``worker.Worker``: an engine over its queue and
  link, live changes, counters. The parent's view of the others is the ``Supervisor`` below.
- Parent and child talk over one SOCK_SEQPACKET socketpair per child, typed messages of any size
  (channel.py: pickled, in records of at most 32 KiB; both ends are this program, forked from one process):
    child → parent: Ready once its engine is attached; StatsReport(seq, Stats, cpu seconds) in answer to a
                    request (the CPU time the worker has used: os.times(), user + system).
    parent → child: StatsRequest(seq); Apply(...) on reload or a control request; Learnt(entries) from the
    others (child → parent too: the MACs it learnt; the parent learns them and passes them on); Stop.
- A child that exits unasked is fatal: the parent learns it from the child's pidfd, logs how it died, and
  stops with status 1, so that systemd restarts the whole unit with every worker. Its flows are not lost
  meanwhile: closing its queue's fd detaches the queue (the device has one queue fewer and the kernel
  re-steers), and its closed socket leaves the SO_REUSEPORT group; the tunnel would only run short of a
  worker. What does lose flows is a worker that is alive but wedged: its queue and socket stay attached and
  the kernel keeps steering flows into them. That is what the liveness check below is for.
- Metrics stay exact and scrape-time: each process counts with plain ints as a single worker does, and a
  scrape asks every child for a snapshot of its Stats (with a timeout; a late child's last snapshot stands in,
  so that counters never go backwards) and adds them to the parent's own. Nothing is added per packet.
- A child has at most one StatsRequest outstanding: while it has not answered, further asks skip
  it and a scrape waits for that answer (or, at its timeout, uses the last one). So a stalled child's socket
  never fills with requests, and a reload's Apply always fits; should one still not fit (a child
  that has not read for hundreds of reloads), the parent stops with status 1, naming the worker, rather than
  leave it sending to the old peer. Requests, reports and Learnt are best-effort (channel.py ``offer``: a
  full channel drops them, counted); a request that got no answer (its report was dropped) is asked again
  after ASK_AGAIN seconds, doubling up to ASK_AGAIN_MAX while the child stays silent, so one lost message
  never wedges the liveness check and a stalled child still finds only a few requests queued.
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
import signal
import time
from typing import Callable

from tunneld.runtime.channel import Channel, Learnt, Message, Ready, StatsReport, StatsRequest, Stop
from tunneld.datapath.stats import Stats

log = logging.getLogger("tunneld")

AUTO_CAP = 8  # "auto" never picks more workers than this
# auto_workers() in words, for --help and the README's readers: keep it true when the rule changes.
AUTO_RULE = f"1 with 2 CPUs available to the process or fewer, else half of them, at most {AUTO_CAP}"


def _seconds(name: str, default: float) -> float:
    """A timer the tests shorten through the environment (TUNNELD_LATE_AFTER, TUNNELD_SNAPSHOT_TIMEOUT) rather
    than wait out; the default when unset or not a positive number of seconds."""
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


READY_TIMEOUT = 15.0  # seconds for every child to attach its engine
SNAPSHOT_TIMEOUT = _seconds("TUNNELD_SNAPSHOT_TIMEOUT", 1.0)  # seconds a scrape waits for the children's counters
LATE_AFTER = _seconds("TUNNELD_LATE_AFTER", 5.0)  # seconds without an answer after which a child counts as wedged
ASK_AGAIN = 2.0  # seconds after which an unanswered StatsRequest is sent again (its answer may have been lost)
ASK_AGAIN_MAX = 60.0  # ... doubling while the child stays silent, up to this
STOP_TIMEOUT = 5.0  # seconds the children get to stop before SIGKILL
LATE_WARN_EVERY = 60.0  # seconds between log lines about a worker late with its counters
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


def resolve(requested: int | str, transport_kind: str, cpus: int | None = None, *,
            spreads: bool = True) -> tuple[int, str | None]:
    """How many workers to run, and a line for the log when that is not simply what was asked. ``spreads``: the
    codec's declaration (``Encapsulator.spreads``) that its per-peer sessions may live in several processes."""
    if requested == "auto":
        cpus = usable_cpus() if cpus is None else cpus
        n = auto_workers(cpus)
        note = f"workers auto: {n} for {cpus} CPU{'s' * (cpus != 1)}"
    else:
        n, note = int(requested), None
    if n > 1 and transport_kind != "udp":
        return 1, (f"workers {requested}: using 1; over raw IP every socket receives every packet, so a second "
                   "worker would deliver each packet twice")
    if n > 1 and not spreads:
        return 1, (f"workers {requested}: using 1; this mode keeps per-peer sessions (counters, keys, replay "
                   "windows) that one process must hold")
    return n, note


def _set_pdeathsig(sig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def _describe_exit(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


class Child:
    """The parent's handle on one worker process."""

    def __init__(self, index: int, pid: int, channel: Channel) -> None:
        self.index = index
        self.pid = pid
        self.channel = channel
        self.pidfd = os.pidfd_open(pid)  # readable once the process has exited
        self.ready = False
        self.stats: Stats | None = None  # the last snapshot it sent
        self.cpu = 0.0  # the CPU seconds it had used at that snapshot
        self.answered = time.monotonic()  # when it last answered
        self.asked = False  # a StatsRequest is outstanding: at most one is, however often we ask
        self.ask_again = 0.0  # when an unanswered request is sent again (time.monotonic())
        self.ask_every = ASK_AGAIN  # the pause before that, doubled while the child stays silent
        self.exited: int | None = None  # its wait status, once reaped

    def close(self) -> None:
        self.channel.close()
        os.close(self.pidfd)


class Supervisor:
    """The parent's view of the other workers (1, 2, ...): fork them, wait until they are ready, ask for their
    counters, watch that they live and answer, pass reloads on, stop them. Worker 0 is the parent's own
    (worker.py), not one of these."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_death: Callable[[], None] = lambda: None
        self._stopping = False
        self._seq = 0
        self._waiting: dict[int, tuple[asyncio.Future, set[int]]] = {}
        self._changed: asyncio.Event | None = None  # set whenever a child becomes ready or dies
        self._late_logged: set[int] = set()
        self._late_warned = float("-inf")
        # MACs a child learnt: for worker 0 (the daemon sets this) and, through ``share``, the other children.
        self.on_learnt: Callable[[Learnt], None] | None = None

    # -- before any event loop: forking ------------------------------------------------------------------------

    def fork(self, count: int, entry: Callable[[int, Channel], int]) -> None:
        """Fork workers 1 to ``count``. In worker i, ``entry(i, channel)`` runs the worker (closing first what
        is not its own) and returns its exit status; the child leaves with os._exit, so that nothing of the
        parent's (its finally clauses, its atexit handlers, the interface's teardown) runs twice. Raises
        OSError (EAGAIN, ENOMEM, a pidfd refused) after stopping the children already started."""
        parent_pid = os.getpid()
        try:
            for index in range(1, count + 1):
                self._fork_one(index, parent_pid, entry)
        except OSError:
            self.stop()
            raise

    def _fork_one(self, index: int, parent_pid: int, entry: Callable[[int, Channel], int]) -> None:
        parent_end, child_end = Channel.pair()
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
                for child in self.children:  # the parent's handles on the workers forked before this one
                    child.close()
                code = _child_main(index, parent_pid, entry, child_end)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                os._exit(code)
        child_end.close()
        try:
            self.children.append(Child(index, pid, parent_end))
        except OSError:  # pidfd_open: EMFILE, ENOSYS (before Linux 5.3), EPERM (seccomp): a child we cannot track
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            parent_end.close()
            raise

    # -- on the parent's event loop ----------------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop, on_death: Callable[[], None]) -> None:
        self._loop = loop
        self._on_death = on_death
        self._changed = asyncio.Event()
        for child in self.children:
            child.channel.setblocking(False)
            child.channel.attach(loop)
            loop.add_reader(child.channel.fileno(), self._on_message, child)
            loop.add_reader(child.pidfd, self._on_exit, child)

    def detach(self) -> None:
        if self._loop is None:
            return
        for child in self.children:
            child.channel.detach()
            self._loop.remove_reader(child.channel.fileno())
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
        messages, closed = child.channel.receive()  # bounded: a child sends one answer per request
        for message in messages:
            match message:
                case Ready():
                    child.ready = True
                    child.answered = time.monotonic()
                    if self._changed is not None:
                        self._changed.set()
                case StatsReport(stats=stats, cpu=cpu):
                    child.stats, child.cpu = stats, cpu
                    child.asked = False
                    child.ask_every = ASK_AGAIN
                    child.answered = time.monotonic()
                    for future, pending in self._waiting.values():  # its one answer serves every waiting scrape
                        pending.discard(child.index)
                        if not pending and not future.done():
                            future.set_result(None)
                case Learnt():
                    if self.on_learnt is not None:
                        self.on_learnt(message)
                    self.share(message, skip=child.index)
                case _:
                    log.warning("worker %d: unexpected control message %r; ignored", child.index, message)
        if closed and self._loop is not None:  # the child is gone; its pidfd tells how
            self._loop.remove_reader(child.channel.fileno())

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
        Apply no longer fits) and that request is younger than ``ask_every`` (it or its answer may have been
        dropped: best-effort both ways); returns the request's number."""
        self._seq += 1
        now = time.monotonic()
        for child in self.children:
            if child.exited is not None:
                continue
            if child.asked:
                if now < child.ask_again:
                    continue
                child.ask_every = min(2 * child.ask_every, ASK_AGAIN_MAX)  # silent since: ask less often
            if child.channel.offer(StatsRequest(self._seq)):
                child.asked, child.ask_again = True, now + child.ask_every
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
        return [c.stats if c.stats is not None else Stats() for c in self.children]

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

    def broadcast(self, message: Message) -> None:
        """Send every child ``message`` (a reload's Apply); one that cannot take it stops the daemon."""
        for child in self.children:
            if child.exited is None:
                self._deliver(child, message)

    def share(self, message: Learnt, skip: int | None = None) -> None:
        """Pass learnt MACs to every child but ``skip`` (who learnt them). Unlike an Apply, one that does not fit
        a full channel is dropped: the frames to those MACs flood until that child hears of them again."""
        for child in self.children:
            if child.exited is None and child.index != skip:
                child.channel.offer(message)

    def _deliver(self, child: Child, message: Message) -> bool:
        """Queue ``message`` on the child's channel. Best-effort messages leave room for this one (channel.py),
        so a full channel means a child that has not read for a long time; a reload it would miss must not
        pass silently (it would keep sending to the old peer): stop, status 1."""
        try:
            child.channel.send(message)
        except BlockingIOError:
            if not self._stopping:
                log.error("worker %d (pid %d) does not read its control socket (full); cannot deliver %s; "
                          "stopping the tunnel (exit status 1)", child.index, child.pid, type(message).__name__)
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
                child.channel.setblocking(True)
                child.channel.settimeout(0.5)
                child.channel.offer(Stop())
            child.channel.close()  # a child that missed the message sees the end of the socket and stops too
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
        self.children = []


def _child_main(index: int, parent_pid: int, entry: Callable[[int, Channel], int], channel: Channel) -> int:
    """A freshly forked worker: die with the parent, leave the stop signals to it, then run ``entry``."""
    _set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the prctl: nobody to work for
        return 0
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by the parent since before open()
    return entry(index, channel)

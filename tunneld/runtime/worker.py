"""One worker: the data path of one process, the same in worker 0 (the parent) and in every forked child.

A worker owns an engine over one device queue and one link (its unit, resources.py) and the codec it was
given. It attaches the engine to the running event loop, applies live changes (the peer table, the log
level), reports its counters, keeps its FDB in step with the other workers' (a timer sends what it learnt as
``Learnt`` a few times a second, and ages its entries), and stops with a status: 0 when asked, 1 when its interface is deleted under it
(there is nothing left to carry; systemd's Restart=on-failure brings the tunnel back whole).

Worker 0 runs inside the parent's ``daemon.serve``, next to the service layer and the supervisor; its changes
come from a reload there. A child runs ``serve_channel``: the same worker, with its orders (typed messages,
channel.py) coming from the parent over its control socket, and a loop-lag probe of its own (the parent's is
the metrics server's).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Callable, Sequence

from tunneld.runtime.channel import LEARNT_MAX, Apply, Channel, Learnt, Message, Ready, StatsReport, StatsRequest, Stop
from tunneld.encap.base import Encapsulator
from tunneld.datapath.engine import Engine, make_engine
from tunneld.datapath.fdb import DEFAULT_AGEING, DEFAULT_MAX_ENTRIES
from tunneld.datapath.peers import PeerSpec
from tunneld.datapath.stats import Stats

log = logging.getLogger("tunneld")

# How often a worker tells the others the MACs it learnt (they use them within 1 s), and ages its FDB.
FDB_SYNC_INTERVAL = 0.25
# Learnt entries sent per tick, at most: a MAC flood must not fill the channels (8000 MACs a second; a full
# FDB of 16384 reaches the others in ~2 s). The rest waits in the FDB's ``fresh`` for the next tick rather
# than being dropped: a dropped MAC would flood at the other workers until retold (ageing/3 later), and
# ``fresh`` is bounded by the FDB's size already.
LEARNT_PER_TICK = 2 * LEARNT_MAX
FDB_EXPIRE_INTERVAL = 1.0


def cpu_seconds() -> float:
    """CPU time (user + system) this process has used."""
    times = os.times()
    return times.user + times.system


class Worker:
    def __init__(self, index: int, device, link, codec: Encapsulator, *, dev: str, max_frame: int,
                 offload: bool, peers: Sequence[PeerSpec] | None = None, fdb_max: int = DEFAULT_MAX_ENTRIES,
                 fdb_ageing: float = DEFAULT_AGEING, clock: Callable[[], float] = time.time, egress=None) -> None:
        self.index = index
        self.dev = dev  # the interface's name, for the log
        self.link = link
        self.codec = codec
        self.egress = egress  # where the kernel segments super-frames (io/egress.py), closed with the worker
        self.engine = make_engine(device, link, codec, max_frame=max_frame, offload=offload, peers=peers,
                                  fdb_max=fdb_max, fdb_ageing=fdb_ageing, egress=egress)
        self.status = 0
        self.stopped = asyncio.Event()  # bound to the running loop on first wait (Python ≥ 3.10)
        self.clock = clock
        # Where this worker's Learnt messages go: its channel (a child), the supervisor (worker 0); None alone.
        self.share: Callable[[Learnt], object] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._expired = 0.0

    @property
    def stats(self) -> Stats:
        return self.engine.stats

    @property
    def peer(self) -> str:
        return self.link.peer

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.engine.on_device_gone = self._device_gone
        self.engine.attach(loop)
        if self.engine.peers.fdb is not None:
            self._timer = loop.call_later(FDB_SYNC_INTERVAL, self._fdb_tick, loop)

    def _fdb_tick(self, loop: asyncio.AbstractEventLoop) -> None:
        """Tell the others what this FDB learnt, and (every FDB_EXPIRE_INTERVAL) age it: never per packet."""
        self._timer = loop.call_later(FDB_SYNC_INTERVAL, self._fdb_tick, loop)
        fdb = self.engine.peers.fdb
        now = self.clock()
        if now - self._expired >= FDB_EXPIRE_INTERVAL:
            self._expired = now
            fdb.expire(now)
        fresh = fdb.take_fresh(LEARNT_PER_TICK if self.share is not None else None)
        if fresh and self.share is not None:
            items = [(mac, peer.address) for mac, peer in fresh.items()]
            for at in range(0, len(items), LEARNT_MAX):
                self.share(Learnt(tuple(items[at : at + LEARNT_MAX])))

    def learn(self, message: Learnt) -> None:
        """MACs another worker learnt: used here from now on (a MAC of a peer removed meanwhile is skipped)."""
        peers = self.engine.peers
        if peers.fdb is None:
            return
        now = self.clock()
        for mac, address in message.entries:
            peer = peers.get(address)
            if peer is not None:
                peers.fdb.learn(mac, peer, now, remote=True)

    def stop(self, status: int = 0) -> None:
        """Make ``wait`` return; a failure (status 1) is not undone by a later clean stop."""
        self.status = max(self.status, status)
        self.stopped.set()

    async def wait(self) -> int:
        await self.stopped.wait()
        return self.status

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.engine.detach()
        if self.egress is not None:
            self.egress.close()
            self.egress = None

    def _device_gone(self) -> None:
        if self.index == 0:
            log.error("interface %s was deleted while running; stopping (exit status 1)", self.dev)
        else:
            log.error("worker %d: interface %s was deleted while running; stopping", self.index, self.dev)
        self.stop(1)

    def apply(self, changes: Apply) -> None:
        """Apply live changes. Raises SetupError (io.SetupError) if the link cannot take the new peer (another
        IP version needs a new socket), ValueError (one line) for a peer diff the tables refuse (a route another
        peer owns, an address of the other IP version); nothing of the peers has changed then."""
        peers = self.engine.peers
        if changes.peer is not None:  # one peer for another: the table is that peer alone, as configured
            self.link.set_peer(changes.peer)  # the default destination
            specs = [s for s in changes.peers_set if s.address == self.link.peer] or [PeerSpec(self.link.peer)]
            peers.replace(specs, self.clock())
        elif changes.peers_set or changes.peers_removed:
            peers.apply(changes.peers_set, changes.peers_removed, self.clock())  # all or nothing
            if len(peers.all) == 1 and peers.all[0].address != self.link.peer:
                self.link.set_peer(peers.all[0].address)  # the one peer left names the tunnel (metrics, logs)
        if changes.log_level is not None:
            logging.getLogger().setLevel(changes.log_level.upper())

    def report(self, seq: int) -> StatsReport:
        return StatsReport(seq, self.engine.stats, cpu_seconds())

    # -- in a forked child -------------------------------------------------------------------------------------

    async def serve_channel(self, channel: Channel) -> int:
        """Run until the parent says Stop or closes the channel, or the interface goes; the exit status."""
        from tunneld.observe.metrics import LoopLagProbe  # prometheus_client is loaded in the parent already

        loop = asyncio.get_running_loop()
        self.start(loop)
        probe = LoopLagProbe(self.engine.stats)
        probe.start(loop)
        channel.setblocking(False)
        channel.attach(loop)
        self.share = channel.offer  # a full channel loses one batch: those MACs flood until the next
        loop.add_reader(channel.fileno(), self._on_channel, channel)
        channel.offer(Ready())
        log.debug("worker %d (pid %d) up", self.index, os.getpid())
        try:
            await self.wait()
        finally:
            probe.stop()
            self.close()
            loop.remove_reader(channel.fileno())
            channel.detach()
        log.debug("worker %d: %s", self.index, self.engine.stats.summary())
        return self.status

    def _on_channel(self, channel: Channel) -> None:
        messages, closed = channel.receive()
        for message in messages:
            self.handle(message, channel)
        if closed:  # the parent closed its end, or is gone
            asyncio.get_running_loop().remove_reader(channel.fileno())
            self.stop()

    def handle(self, message: Message, channel: Channel) -> None:
        match message:
            case StatsRequest(seq=seq):
                channel.offer(self.report(seq))
            case Learnt():
                self.learn(message)
            case Apply():
                try:
                    self.apply(message)
                except Exception as e:  # the parent applied the same change; say so, keep carrying packets
                    log.error("worker %d: reload: %s", self.index, e)
            case Stop():
                self.stop()
            case _:
                log.warning("worker %d: unexpected control message %r; ignored", self.index, message)

"""The parent–worker channel (tunneld/runtime/channel.py) under load, without root: messages of any size the daemon
produces arrive whole; a full or briefly short socket delays, never loses a must-arrive message nor looks like
a dead worker; the reader's memory is bounded; a lost stats answer is asked again; a MAC flood never stops
the daemon (tests/test_overlay_control.py: it is passed on in bounded batches)."""

from __future__ import annotations

import asyncio
import errno
import os
import select

import pytest

from tunneld.runtime import channel as channel_module
from tunneld.runtime.channel import OFFER_MAX, Apply, Channel, Learnt, StatsReport, StatsRequest
from tunneld.datapath.stats import PeerStats, Stats
from tunneld.runtime.workers import ASK_AGAIN, Child, Supervisor

B = "192.0.2.3"



def _big_stats(peers: int) -> Stats:
    stats = Stats()
    for i in range(peers):
        ps = PeerStats()
        ps.tx_packets, ps.rx_bytes, ps.last_rx = 1000 + i, 10**9 + i, 1.7e9 + i
        stats.peers[f"10.{i >> 8 & 255}.{i & 255}.1"] = ps
    return stats


def _pump(sender: Channel, receiver: Channel, rounds: int = 200) -> list:
    """Read on ``receiver`` and let ``sender`` write what waits, until nothing moves (no event loop)."""
    got: list = []
    for _ in range(rounds):
        messages, closed = receiver.receive()
        assert not closed
        got += messages
        sender.receive()  # a loop-less sender writes its queue on its next send or receive
        if not sender.queued and not select.select([receiver], [], [], 0)[0]:
            break
    return got


def test_a_stats_report_of_a_thousand_peers_and_more_crosses_the_channel_whole():
    """Before: one record per message, read with a 64 KiB buffer: a report of ~900 peers was cut (and the
    parent's unpickling raised)."""
    parent, child = Channel.pair()
    try:
        parent.setblocking(False), child.setblocking(False)
        for peers in (1000, 4096):
            report = StatsReport(peers, _big_stats(peers), 2.5)
            child.offer(report)
            got = _pump(child, parent)
            assert len(got) == 1 and got[0].seq == peers and len(got[0].stats.peers) == peers
            assert got[0].stats.peers["10.0.7.1"].rx_bytes == 10**9 + 7
    finally:
        parent.close(), child.close()


def test_the_supervisor_takes_a_large_report_and_asks_again():
    """The parent's side of the same: a report of 2000 peers clears the outstanding request."""
    pool, theirs = _pool()
    try:
        pool.request()
        assert [type(m) for m in _pump(pool.children[0].channel, theirs)] == [StatsRequest]
        theirs.send(StatsReport(1, _big_stats(2000), 1.0))
        for _ in range(100):
            pool._on_message(pool.children[0])
            theirs.receive()
            if not pool.children[0].asked:
                break
        assert not pool.children[0].asked and len(pool.children[0].stats.peers) == 2000
    finally:
        theirs.close(), pool.children[0].close()


def test_a_large_message_is_written_as_the_socket_drains_on_an_event_loop():
    async def run() -> list:
        parent, child = Channel.pair()
        loop = asyncio.get_running_loop()
        got: list = []
        arrived = asyncio.Event()

        def readable() -> None:
            messages, _ = parent.receive()
            got.extend(messages)
            if messages:
                arrived.set()

        try:
            parent.setblocking(False), child.setblocking(False)
            child.attach(loop)
            loop.add_reader(parent.fileno(), readable)
            child.send(StatsReport(1, _big_stats(4096), 0.0))  # ~0.5 MB: more than the socket holds
            child.send(Apply(log_level="debug"))
            assert child.queued > 0
            while len(got) < 2:
                arrived.clear()
                await asyncio.wait_for(arrived.wait(), 5)
            loop.remove_reader(parent.fileno())
            return got
        finally:
            parent.close(), child.close()

    got = asyncio.run(run())
    assert [type(m) for m in got] == [StatsReport, Apply] and len(got[0].stats.peers) == 4096


class _Flaky:
    """A socket whose send fails with ``errno`` ``times`` times, or (EMSGSIZE) for records over ``limit``."""

    def __init__(self, sock, err: int, times: int = 0, limit: int | None = None) -> None:
        self.sock, self.err, self.times, self.limit = sock, err, times, limit

    def send(self, data) -> int:
        if self.times > 0 or (self.limit is not None and len(data) > self.limit):
            self.times -= 1
            raise OSError(self.err, os.strerror(self.err))
        return self.sock.send(data)

    def __getattr__(self, name):
        return getattr(self.sock, name)


@pytest.mark.parametrize("err,times,limit", [(errno.ENOBUFS, 3, None), (errno.EMSGSIZE, 0, 3000)])
def test_enobufs_and_emsgsize_mean_later_not_a_dead_worker(err, times, limit):
    """Before: any OSError on send but EAGAIN counted as "the worker is gone" and the message was lost."""
    parent, child = Channel.pair()
    try:
        parent.setblocking(False), child.setblocking(False)
        child.sock = _Flaky(child.sock, err, times, limit)
        report = StatsReport(9, _big_stats(300), 0.5)
        assert child.offer(report) and child.dropped == 0
        got = _pump(child, parent)
        assert len(got) == 1 and got[0].seq == 9 and len(got[0].stats.peers) == 300
    finally:
        parent.close(), child.sock.sock.close()


def test_a_message_larger_than_the_reader_takes_is_refused_counted_and_the_next_one_arrives(monkeypatch, caplog):
    monkeypatch.setattr(channel_module, "MESSAGE_MAX", 100_000)
    parent, child = Channel.pair()
    try:
        parent.setblocking(False), child.setblocking(False)
        child.send(Learnt(((b"x" * 300_000, B),)))
        child.send(StatsRequest(5))
        got = _pump(child, parent)
        assert got == [StatsRequest(5)] and parent.refused == 1
        assert "refused: larger than 100000 bytes" in caplog.text
    finally:
        parent.close(), child.close()


# -- the supervisor: lost answers, floods -----------------------------------------------------------------------


def _pool():
    ours, theirs = Channel.pair()
    pool = Supervisor()
    pool.children.append(Child(1, os.getpid(), ours))  # pidfd of ourselves: never readable while we run
    ours.setblocking(False), theirs.setblocking(False)
    return pool, theirs


def test_a_request_whose_answer_was_lost_is_asked_again_less_and_less_often(monkeypatch):
    """Before: ``asked`` stayed set until a report came; one lost report meant no request ever again, the
    child counted as wedged, and the watchdog restarted the daemon."""
    from tunneld.runtime import workers

    now = [100.0]
    monkeypatch.setattr(workers.time, "monotonic", lambda: now[0])
    pool, theirs = _pool()
    try:
        pool.request()
        assert [type(m) for m in theirs.receive()[0]] == [StatsRequest]  # ... whose answer is lost
        pool.request()
        assert theirs.receive()[0] == []  # not yet: one outstanding
        now[0] += ASK_AGAIN + 0.1
        seq = pool.request()
        assert theirs.receive()[0] == [StatsRequest(seq)]
        now[0] += ASK_AGAIN + 0.1  # still silent: the next ask waits twice as long
        pool.request()
        assert theirs.receive()[0] == []
        now[0] += ASK_AGAIN
        seq = pool.request()
        assert theirs.receive()[0] == [StatsRequest(seq)]
        theirs.send(StatsReport(seq, Stats(), 0.0))
        pool._on_message(pool.children[0])
        assert not pool.children[0].asked and pool.children[0].answered == now[0]
    finally:
        theirs.close(), pool.children[0].close()


def test_a_flood_of_learnt_macs_never_stops_the_daemon_and_a_reload_still_arrives(caplog):
    """Before: the flood filled a child's socket, the next StatsRequest met BlockingIOError, and the parent
    stopped the tunnel (exit status 1)."""
    pool, theirs = _pool()
    died = []
    pool._on_death = lambda: died.append(True)
    try:
        flood = Learnt(tuple((i.to_bytes(6, "big"), B) for i in range(1000)))
        for _ in range(300):  # ~9 MB, far more than the socket and OFFER_MAX hold
            pool.share(flood)
        pool.request()
        channel = pool.children[0].channel
        assert channel.dropped > 0 and channel.queued <= OFFER_MAX + 64 * 1024
        pool.broadcast(Apply(log_level="debug"))
        assert died == [] and "does not read its control socket" not in caplog.text
        assert caplog.text.count("Learnt not sent, the other end is not reading") == 1  # once a minute at most
        got = _pump(channel, theirs, rounds=5000)
        assert got[-1] == Apply(log_level="debug") and all(isinstance(m, Learnt) for m in got[:-1])
    finally:
        theirs.close(), pool.children[0].close()

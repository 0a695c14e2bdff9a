"""The standing-queue bookkeeper (tunneld/offload/queue.py) and the engine's use of it: times are passed in,
so nothing here depends on how fast the machine is."""

from __future__ import annotations

from math import sqrt

from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether

from tests.frames import payload, tcp_super
from tunneld import engine as engine_module
from tunneld.encap.base import Drop
from tunneld.encap.vxlan import Vxlan
from tunneld.engine import make_engine
from tunneld.offload.queue import INTERVAL, MIN_WAKEUPS, StandingQueue
from tunneld.offload.vnet import F_NEEDS_CSUM, GSO_TCPV4, HDR
from tunneld.testing import FakeGsoLink, FakeVnetDevice

PEER = "192.0.2.2"


def stood(q: StandingQueue, start: float, wakeups: int = MIN_WAKEUPS) -> None:
    for i in range(wakeups):
        q.standing(start + i * 1e-4)


def test_a_queue_that_drains_is_never_dropped_from():
    q = StandingQueue()
    for i in range(1000):
        now = i * 0.001
        q.standing(now)
        assert not q.drop(now + 0.0005)
        q.empty(now + 0.0009)  # drained within every millisecond: no standing queue


def test_the_first_drop_comes_once_the_queue_has_stood_for_an_interval():
    q = StandingQueue()
    stood(q, 1.0)
    assert not q.drop(1.0 + INTERVAL * 0.9)
    assert q.drop(1.0 + INTERVAL * 1.01)
    assert q.dropping and q.count == 1


def test_one_long_wakeup_is_not_a_standing_queue():
    q = StandingQueue()
    q.standing(1.0)  # one wake-up that ended with frames behind it, then a long pause of the process
    assert not q.drop(1.0 + 10 * INTERVAL)


def test_drops_come_closer_together_while_the_queue_keeps_standing():
    q = StandingQueue()
    stood(q, 0.0)
    now = INTERVAL
    assert q.drop(now)
    times = [now]
    while len(times) < 5:
        now += 1e-5
        if q.drop(now):
            times.append(now)
    gaps = [b - a for a, b in zip(times, times[1:])]
    for count, gap in enumerate(gaps, start=1):  # interval / sqrt(count) after the count-th drop
        assert abs(gap - INTERVAL / sqrt(count)) < 2e-5
    assert gaps == sorted(gaps, reverse=True)


def test_draining_ends_the_drop_state_and_a_quick_return_resumes_near_its_rate():
    q = StandingQueue()
    stood(q, 0.0)
    now = INTERVAL
    drops = 0
    while drops < 6:
        drops += q.drop(now)
        now += 1e-4
    q.empty(now)
    assert not q.dropping and q.since is None
    assert not q.drop(now)  # nothing stands now
    stood(q, now)
    assert q.drop(now + INTERVAL * 1.01)
    assert q.count == 6 - 2  # back within RECENT: resumes near the last rate (RFC 8289 §5.6)


# -- the engine ---------------------------------------------------------------------------------------------


def test_the_engine_drops_super_frames_not_sparse_packets_from_a_standing_device_queue(monkeypatch):
    dev, link = FakeVnetDevice(), FakeGsoLink(PEER)
    eng = make_engine(dev, link, Vxlan(vni=7), max_frame=1464, offload=True)
    clock = [100.0]
    monkeypatch.setattr(engine_module.time, "monotonic", lambda: clock[0])
    superframe = HDR.pack(F_NEEDS_CSUM, GSO_TCPV4, 66, 1398, 34, 16) + tcp_super(payload(1398 * 40))
    assert len(superframe) > engine_module.WAKEUP_BYTES // 2  # one or two per wake-up: the budget ends each
    # a ping between the super-frames: a plain frame behind an empty vnet header
    ping = bytes(HDR.size) + bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                                   / IP(src="10.1.0.1", dst="10.1.0.2") / ICMP() / payload(56))
    wakeups = 3 * MIN_WAKEUPS
    for _ in range(wakeups):  # a queue that stands, wake-up after wake-up, for longer than INTERVAL
        dev.inject(ping, superframe, ping, superframe, superframe)
        eng.on_device_readable()
        clock[0] += INTERVAL / 2
    while dev.pending:  # and then drains
        eng.on_device_readable()
    assert eng.stats.drops[Drop.QUEUE] > 0
    assert eng.stats.drops[Drop.QUEUE] % 40 == 0  # whole super-frames: every segment of one
    assert eng.stats.dropped == eng.stats.drops[Drop.QUEUE]
    pings = [p for p, _ in link.sent if len(p) == len(ping) - HDR.size + 8]  # behind the 8-byte VXLAN header
    assert len(pings) == 2 * wakeups  # no sparse packet was dropped
    assert eng._queue.since is None  # drained: nothing stands any more

"""The data-path log lines: peer heard / silent / heard again, and drop summaries at most once a minute."""

from __future__ import annotations

from tunneld.encap.base import Drop
from tunneld.datapath.stats import Stats
from tunneld.observe.watch import DROP_REPORT_EVERY, SILENT_AFTER, Watch


def test_peer_heard_silent_and_heard_again():
    stats = Stats()
    w = Watch(stats, "10.0.0.2")
    assert w.tick(100.0) == []  # never heard, nothing to say
    stats.peer_last_rx = 100.5
    assert w.tick(101.0) == ["peer 10.0.0.2 heard: first valid packet received"]
    assert w.tick(102.0) == []
    assert w.tick(100.5 + SILENT_AFTER - 1) == []
    assert w.tick(100.5 + SILENT_AFTER) == [f"peer 10.0.0.2 silent: no valid packet for {SILENT_AFTER:.0f} s"]
    assert w.tick(100.5 + SILENT_AFTER + 10) == []  # said once
    stats.peer_last_rx = 200.5
    assert w.tick(201.0) == ["peer 10.0.0.2 heard again after 100 s of silence"]


def test_traffic_without_a_silence_says_nothing_more():
    stats = Stats()
    w = Watch(stats, "10.0.0.2")
    stats.peer_last_rx = 1.0
    w.tick(1.0)
    for t in range(2, 100):
        stats.peer_last_rx = float(t)
        assert w.tick(float(t)) == []


def test_drops_are_summarised_at_most_once_a_minute_and_only_new_ones():
    stats = Stats()
    w = Watch(stats, "p")
    stats.drops[Drop.UNKNOWN_PEER] += 3
    assert w.tick(10.0) == ["dropped 3 packets since the last report: unknown_peer 3"]
    stats.drops[Drop.UNKNOWN_PEER] += 1
    stats.drops[Drop.TOO_BIG] += 2
    assert w.tick(11.0) == []  # too soon
    assert w.tick(10.0 + DROP_REPORT_EVERY) == [
        "dropped 3 packets since the last report: too_big 2, unknown_peer 1"
    ]
    assert w.tick(10.0 + 3 * DROP_REPORT_EVERY) == []  # nothing new

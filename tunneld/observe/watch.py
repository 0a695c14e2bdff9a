"""What the log says happened on the data path: the peer heard or gone quiet, and drops as they occur.

The engine only counts. ``Watch.tick()`` runs once a second from the event loop, compares the counters with
what it saw last, and returns the log lines worth writing, so an operator reading the journal sees
"peer heard", "silent for 30 s", "heard again", and a summary of new drops at most once a minute, without
a line per packet. It is pure (no clock, no logger) so it can be tested with made-up times.
"""

from __future__ import annotations

from collections import Counter

from tunneld.datapath.stats import Stats

SILENT_AFTER = 30.0  # seconds without a valid packet before the log says so (VXLAN/GRE have no keepalive:
#                      an idle tunnel is silent too, so this is an observation, not an error)
DROP_REPORT_EVERY = 60.0  # at most one drop summary per this many seconds
WATCH_INTERVAL = 1.0  # seconds between two ticks (runtime/daemon.py); the other workers' counters refresh as often


class Watch:
    def __init__(self, stats: Stats, peer: str) -> None:
        self.stats = stats
        self.peer = peer
        self._heard_at = 0.0  # peer_last_rx when we last looked
        self._silent = False
        self._drops_seen: Counter = Counter()
        self._drops_reported_at = float("-inf")

    def tick(self, now: float) -> list[str]:
        lines: list[str] = []
        last = self.stats.peer_last_rx
        if last != self._heard_at:
            if self._heard_at == 0.0:
                lines.append(f"peer {self.peer} heard: first valid packet received")
            elif self._silent:
                lines.append(f"peer {self.peer} heard again after {last - self._heard_at:.0f} s of silence")
            self._heard_at = last
            self._silent = False
        elif last and not self._silent and now - last >= SILENT_AFTER:
            self._silent = True
            lines.append(f"peer {self.peer} silent: no valid packet for {now - last:.0f} s")
        if now - self._drops_reported_at >= DROP_REPORT_EVERY:
            new = Counter(self.stats.drops)
            new.subtract(self._drops_seen)
            new = +new  # keep the reasons that grew
            if new:
                reasons = ", ".join(f"{reason.value} {n}" for reason, n in sorted(new.items()))
                lines.append(f"dropped {sum(new.values())} packets since the last report: {reasons}")
                self._drops_seen = Counter(self.stats.drops)
                self._drops_reported_at = now
        return lines

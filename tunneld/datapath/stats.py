"""Plain integer counters, written by the engine on the hot path and read by whoever wants them.

No locks and no dependencies: incrementing an int attribute is the cheapest thing Python can count with.
The metrics exporter turns these into metric families only when scraped.

Byte counts are inner bytes: the frame (TAP) or packet (TUN) as the device sees it, without the
encapsulation, outer UDP or outer IP headers.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter

from tunneld.encap.base import Drop
from tunneld.datapath.pmtu import Icmp

ICMP_KINDS = tuple(Icmp)  # icmp_sent[i] counts ICMP_KINDS[i]

# The most reads one wake-up can count: the frames-per-wake-up histograms have a slot for every count up to it,
# whatever batch the engine runs with, so Stats (and the metrics' buckets) never depend on the engine's batch.
# An engine must not read more than this per wake-up (its count would fall outside the list).
MAX_BATCH = 128

# Upper bounds, in seconds, of the event-loop lag histogram's buckets (the last bucket, +Inf, is implicit).
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class PeerStats:
    """One peer's counters, kept by the engine in ``Stats.peers`` under the peer's address."""

    __slots__ = ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "dropped", "last_rx")

    def __init__(self) -> None:
        self.tx_packets = self.tx_bytes = self.rx_packets = self.rx_bytes = self.dropped = 0
        self.last_rx = 0.0  # wall-clock time a valid packet from this peer last arrived; 0 = never

    def add(self, other: "PeerStats") -> None:
        for name in ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "dropped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.last_rx = max(self.last_rx, other.last_rx)


class Stats:
    __slots__ = (
        "peers",
        "flooded",
        "fdb_learnt",
        "fdb_moved",
        "fdb_refused",
        "tx_packets",
        "tx_bytes",
        "rx_packets",
        "rx_bytes",
        "drops",
        "peer_last_rx",
        "tx_batches",
        "rx_batches",
        "loop_lag",
        "loop_lag_sum",
        "offload_fallbacks",
        "kernel_gso_frames",
        "icmp_sent",
        "icmp_limited",
        "pmtu_changes",
        "endpoint_changes",
        "codec_packets",
    )

    def __init__(self) -> None:
        # The histograms have MAX_BATCH + 1 slots whatever an engine's batch (the engine refuses a larger one),
        # so that snapshots of differently batched workers add up slot by slot.
        self.peers: dict[str, PeerStats] = {}  # per peer, by id (the engine's peer table adds and removes)
        self.flooded = 0  # frames sent to every peer (broadcast, multicast, unknown unicast): once per frame
        self.fdb_learnt = self.fdb_moved = self.fdb_refused = 0  # the FDB's (fdb.py), counted where it learns
        self.tx_packets = 0  # frames read from the device and sent to the peer
        self.tx_bytes = 0
        self.rx_packets = 0  # frames received from the peer and written to the device
        self.rx_bytes = 0
        self.drops: Counter[Drop] = Counter()
        self.peer_last_rx = 0.0  # wall-clock time a valid packet from the peer last arrived; 0 = never
        # Wake-ups by how many reads they made: tx_batches[n] counts the device wake-ups that read n times (one
        # frame per read on the plain path; with offloads a read is a super-frame or a batch of datagrams). A
        # list indexed by the count costs the hot path one index and one add, as a per-batch list did.
        self.tx_batches = [0] * (MAX_BATCH + 1)
        self.rx_batches = [0] * (MAX_BATCH + 1)
        # How late a periodic timer on the event loop fired: loop_lag[i] counts observations that fell into
        # LOOP_LAG_BUCKETS[i] (not cumulative); the last slot is beyond the largest bound.
        self.loop_lag = [0] * (len(LOOP_LAG_BUCKETS) + 1)
        self.loop_lag_sum = 0.0
        # Super-frames the offload path could not cut that fit one packet and took the plain path instead.
        self.offload_fallbacks = 0
        # Super-frames handed whole to the kernel to segment (the egress device, io/egress.py).
        self.kernel_gso_frames = 0
        # ICMP errors written back into the device (tunneld/datapath/pmtu.py), by kind, in ICMP_KINDS order; those the rate
        # limit held back; and how often a peer's path MTU changed as the kernel reported it.
        self.icmp_sent = [0] * len(ICMP_KINDS)
        self.icmp_limited = 0
        self.pmtu_changes = 0
        # Stateful codecs (tunneld/encap/session.py): how often a peer's endpoint moved to where an authenticated
        # datagram came from (roaming), and the codec's own packets sent (keepalives, handshakes).
        self.endpoint_changes = 0
        self.codec_packets = 0

    def observe_loop_lag(self, seconds: float) -> None:
        self.loop_lag[bisect_left(LOOP_LAG_BUCKETS, seconds)] += 1
        self.loop_lag_sum += seconds

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())

    def summary(self) -> str:
        line = f"tx {self.tx_packets} packets/{self.tx_bytes} bytes, rx {self.rx_packets} packets/{self.rx_bytes} bytes"
        if self.drops:
            reasons = ", ".join(f"{reason.value} {n}" for reason, n in sorted(self.drops.items()))
            line += f", dropped {self.dropped} ({reasons})"
        return line


def total(parts: "list[Stats]") -> Stats:
    """The counters of several workers (tunneld/runtime/workers.py) added up, as one Stats: what crossed the tunnel.

    Every field is summed (histograms are counts per slot, so they add up too) except ``peer_last_rx``, where
    the latest wins. It goes by ``__slots__``, so a counter added to Stats later is summed without a change here."""
    out = Stats()
    for s in parts:
        for name in Stats.__slots__:
            mine, theirs = getattr(out, name), getattr(s, name)
            if name == "peers":
                for address, peer in list(theirs.items()):
                    mine.setdefault(address, PeerStats()).add(peer)
            elif name == "peer_last_rx":
                setattr(out, name, max(mine, theirs))
            elif isinstance(mine, Counter):
                for reason in Drop:  # looked up, never iterated: the engine may add a reason while we read
                    if n := theirs.get(reason, 0):
                        mine[reason] += n
            elif isinstance(mine, list):
                for i, n in enumerate(list(theirs)):
                    mine[i] += n
            else:
                setattr(out, name, mine + theirs)
    return out

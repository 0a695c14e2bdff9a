"""Prometheus exporter: the only module that imports prometheus_client.

Theory of operation:
- The engine counts with plain ints (tunneld.datapath.stats.Stats); nothing here runs per packet. ``TunnelCollector``
  turns those ints into metric families when Prometheus scrapes, so the hot path pays nothing for metrics.
- The HTTP server (tunneld/observe/httpd.py) runs prometheus_client's WSGI app on one daemon thread, whatever the
  number of connections, with a cap on them and read and idle timeouts. A scrape reads the engine's ints from
  that thread: reading an int or copying a short list is atomic under the GIL, and the collector never iterates
  a dict the engine may be growing (it looks every ``Drop`` reason up by name), so no lock is needed.
- The ``peer`` and ``mode`` labels are read at scrape time from the engine, so a peer changed while running
  shows up on the next scrape. With several peers, the traffic series (tx/rx packets and bytes, last heard,
  drops per peer) have one series per configured peer; series about the whole tunnel carry ``peer=""``. Counters are per process: after a peer change the same running totals carry
  the new ``peer`` label (the old series goes stale), they do not restart from zero.
- Event-loop lag is measured by a timer on the loop itself (``LoopLagProbe``): every ``interval`` seconds it
  notes how late it fired. A loop blocked by a slow callback shows up as lateness, whatever blocked it.
- With several workers (workers.py) the engine's counters are those of worker 0, and ``others`` returns the
  other workers' counters, asked for at scrape time: every exported counter is the sum over the workers,
  and ``tunneld_worker_packets_total`` alone says how the packets were shared among them.
- Process metrics (CPU, memory, fds, start time) and Python's GC and platform info come from the client's
  default collectors, registered in a private registry so that tests can build as many exporters as they like.
"""

from __future__ import annotations

import asyncio
import errno
from bisect import bisect_left
import socket
import time
from typing import TYPE_CHECKING, Callable, Iterator

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, make_wsgi_app
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from tunneld import __version__
from tunneld.config.checks import parse_listen
from tunneld.encap.base import Drop
from tunneld.encap.wireguard.codec import WireGuard
from tunneld.encap.wireguard.results import HANDSHAKE_RESULTS
from tunneld.observe.httpd import HttpServer
from tunneld.control.registry import INVALID_REASONS, RegistryStats
from tunneld.datapath.pmtu import ICMP_BURST, ICMP_RATE
from tunneld.datapath.stats import ICMP_KINDS, LOOP_LAG_BUCKETS, MAX_BATCH, Stats, total

if TYPE_CHECKING:
    from tunneld.datapath.engine import Engine

LABELS = ("peer", "mode")
LAG_PROBE_INTERVAL = 0.25  # seconds; four timer callbacks a second cost nothing measurable

INNER_BYTES = (
    "Bytes are inner bytes: the frame as the device sees it (Ethernet header included on TAP, the IP packet on "
    "TUN), without the encapsulation header or the outer UDP/IP headers."
)


def _dropped_help() -> str:
    """The help of tunneld_dropped_packets_total, from the one declaration of the reasons (encap.base.Drop)."""
    return ("Packets discarded, by reason (" + ", ".join(reason.value for reason in Drop) + "). Every reason is "
            "exported from start-up, at 0.")


DROPPED_HELP = _dropped_help()

FDB_COUNTERS = (
    ("tunneld_fdb_learnt", "fdb_learnt", "MAC addresses learnt from the source of frames from a peer (L2 modes)."),
    ("tunneld_fdb_moved", "fdb_moved", "Learnt MAC addresses seen behind another peer, and moved to it."),
    ("tunneld_fdb_refused", "fdb_refused",
     "New source MAC addresses not learnt because the FDB held fdb_max entries; frames to them are flooded."),
    ("tunneld_flooded_packets", "flooded",
     "Frames sent to every peer (head-end replication): broadcast, multicast and unknown unicast; once per frame."),
)

# Plain per-tunnel counters: (metric name, Stats field, help).
COUNTERS = (
    ("tunneld_offload_fallbacks", "offload_fallbacks",
     "Super-frames the offload path could not cut (headers it does not parse) that fit one packet and were "
     "handed to the plain path instead (and counted there like any frame); larger ones are dropped as "
     "offload_unsupported."),
    ("tunneld_kernel_gso_frames", "kernel_gso_frames",
     "Super-frames handed whole to the kernel to segment (--kernel-gso); their datagrams count in "
     "tunneld_tx_packets_total as if tunneld had cut them."),
    ("tunneld_icmp_ratelimited", "icmp_limited",
     f"ICMP errors not written back because the budget ({ICMP_RATE:.0f}/s, bursts of {ICMP_BURST}, as the "
     "kernel's) was spent."),
    ("tunneld_pmtu_changes", "pmtu_changes",
     "Times a peer's path MTU, as the kernel learnt it, was found changed (asked after a too-big send fails)."),
    ("tunneld_endpoint_changes", "endpoint_changes",
     "Times a peer's endpoint moved to the source of a datagram its session authenticated (roaming; modes "
     "whose sessions authenticate only)."),
    ("tunneld_codec_packets", "codec_packets",
     "Packets of the mode's own sent to peers (keepalives, handshakes; modes with per-peer sessions only)."),
)


class MetricsError(Exception):
    """The metrics endpoint cannot be served; ``str()`` is one line for the operator."""


# Bucket bounds for frames per wake-up: 0 (a wake-up that moved nothing), then powers of two up to MAX_BATCH.
# Fixed, not derived from the engine's batch: the series keep their buckets whatever batch the engine runs.
BATCH_BOUNDS = (0, *(1 << i for i in range(MAX_BATCH.bit_length())))
# slot n (a wake-up that moved n frames) → index of the first bound >= n
_BATCH_BUCKET = tuple(bisect_left(BATCH_BOUNDS, n) for n in range(MAX_BATCH + 1))


def _histogram(counts: list[int], bounds: list[float] | tuple[float, ...], bucket_of: Callable[[int], int]):
    """Cumulative (le, count) pairs from per-slot counts; ``bucket_of(slot)`` is the index of its bound."""
    per_bucket = [0] * (len(bounds) + 1)
    for slot, n in enumerate(counts):
        per_bucket[bucket_of(slot)] += n
    buckets, running = [], 0
    for bound, n in zip(bounds, per_bucket):
        running += n
        buckets.append((str(float(bound)), running))
    buckets.append(("+Inf", running + per_bucket[-1]))
    return buckets


class TunnelCollector(Collector):
    """Builds tunneld's metric families from one engine's counters, at scrape time."""

    def __init__(self, engine: Engine, *, dev: str, mtu: int, vni: int | None = None,
                 others: Callable[[], list[Stats]] | None = None, cpu: Callable[[], list[float]] | None = None) -> None:
        self.engine = engine
        self.others = others
        self.cpu = cpu
        self.dev = dev
        self.mtu = mtu
        self.vni = vni

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        # One copy of this process's live counters (the engine keeps counting while we read), so that every series
        # of one scrape describes the same moment: the per-worker rows then add up to the totals.
        per_worker = [total([engine.stats]), *(self.others() if self.others is not None else ())]
        stats = per_worker[0] if len(per_worker) == 1 else total(per_worker)
        mode = engine.codec.name
        peers = list(engine.peers.by_id)  # the configured peers, in order, by id (an address-named peer: its address)
        # Series about the whole tunnel carry the peer label too: the one peer's address (a point-to-point
        # tunnel's series name its far end), or "" when there are several; the per-peer series below carry
        # each peer's own. A keyed mode names a peer by its id, not its address, which roams (WireGuard: the
        # public key in base64, public by design).
        one = (peers[0] if engine.codec.keyed else engine.link.peer) if len(peers) == 1 else ""
        labels = [one, mode]
        per_peer = [([peer_id, mode], stats.peers.get(peer_id)) for peer_id in peers]
        if len(per_peer) == 1:
            per_peer = [(labels, per_peer[0][1])]

        build = InfoMetricFamily("tunneld_build", "tunneld's version (value is always 1).")
        build.add_metric([], {"version": __version__})
        yield build

        segmentation = InfoMetricFamily(
            "tunneld_segmentation",
            "Who cuts super-frames into datagrams (value is always 1): \"kernel\" (an egress device the kernel "
            "forwards from and segments, --kernel-gso), \"tunneld\" (offloads on), \"none\" (offloads off).",
        )
        port = engine.port
        segmentation.add_metric([], {"by": "kernel" if getattr(port, "egress", None) is not None
                                     else "tunneld" if port.vnet_len else "none"})
        yield segmentation

        info = GaugeMetricFamily(
            "tunneld_info",
            "The tunnel's configuration (value is always 1): interface, its MTU, and the VNI where the mode has one.",
            labels=[*LABELS, "dev", "mtu", "vni"],
        )
        info.add_metric([*labels, self.dev, str(self.mtu), "" if self.vni is None else str(self.vni)], 1)
        yield info

        for direction, verb in (("tx", "read from the device and sent to the peer"),
                                ("rx", "received from the peer and written to the device")):
            packets = CounterMetricFamily(
                f"tunneld_{direction}_packets", f"Frames {verb}.", labels=LABELS
            )
            nbytes = CounterMetricFamily(
                f"tunneld_{direction}_bytes", f"Bytes of the frames {verb}. {INNER_BYTES}", labels=LABELS
            )
            if len(per_peer) == 1:  # one peer: the tunnel's own counters, exactly
                packets.add_metric(per_peer[0][0], getattr(stats, f"{direction}_packets"))
                nbytes.add_metric(per_peer[0][0], getattr(stats, f"{direction}_bytes"))
            else:  # one series per peer (cardinality: the number of peers); a flooded frame counts at each
                for peer_labels, ps in per_peer:
                    packets.add_metric(peer_labels, getattr(ps, f"{direction}_packets") if ps else 0)
                    nbytes.add_metric(peer_labels, getattr(ps, f"{direction}_bytes") if ps else 0)
            yield packets
            yield nbytes

        workers = CounterMetricFamily(
            "tunneld_worker_packets",
            "Frames carried by each worker process (--workers), by direction: how the kernel spread the flows "
            "over the workers. The sum over workers is tunneld_tx_packets_total / tunneld_rx_packets_total.",
            labels=[*LABELS, "worker", "direction"],
        )
        for index, part in enumerate(per_worker):
            workers.add_metric([*labels, str(index), "tx"], part.tx_packets)
            workers.add_metric([*labels, str(index), "rx"], part.rx_packets)
        yield workers

        if self.cpu is not None:
            cpu = CounterMetricFamily(
                "tunneld_worker_cpu_seconds",
                "CPU time (user + system) used by each worker process (--workers); process_cpu_seconds_total is "
                "the main process's (worker 0) alone. A worker near 1 CPU second per second is saturated.",
                labels=[*LABELS, "worker"],
            )
            for index, seconds in enumerate(self.cpu()):
                cpu.add_metric([*labels, str(index)], seconds)
            yield cpu

        dropped = CounterMetricFamily(
            "tunneld_dropped_packets",
            DROPPED_HELP,
            labels=[*LABELS, "reason"],
        )
        drops = stats.drops
        for reason in Drop:
            dropped.add_metric([*labels, reason.value], drops.get(reason, 0))
        yield dropped

        icmp = CounterMetricFamily(
            "tunneld_icmp_sent",
            "ICMP errors written back into the device to the sender of a frame the path to its peer cannot carry, "
            "by type (" + ", ".join(kind.value for kind in ICMP_KINDS) + "); at most the kernel's ICMP budget.",
            labels=[*LABELS, "type"],
        )
        for kind, n in zip(ICMP_KINDS, stats.icmp_sent):
            icmp.add_metric([*labels, kind.value], n)
        yield icmp
        for name, field, text in COUNTERS:
            family = CounterMetricFamily(name, text, labels=LABELS)
            family.add_metric(labels, getattr(stats, field))
            yield family

        last_rx = GaugeMetricFamily(
            "tunneld_peer_last_rx_timestamp_seconds",
            "Unix time at which a valid packet from the peer last arrived; 0 if none has yet.",
            labels=LABELS,
        )
        if len(per_peer) == 1:
            last_rx.add_metric(per_peer[0][0], stats.peer_last_rx)
        else:
            for peer_labels, ps in per_peer:
                last_rx.add_metric(peer_labels, ps.last_rx if ps else 0.0)
        yield last_rx

        peer_dropped = CounterMetricFamily(
            "tunneld_peer_dropped_packets",
            "Packets from or to each peer that were discarded (the codec's refusals, source_not_allowed, failed "
            "sends); tunneld_dropped_packets_total has them by reason.",
            labels=LABELS,
        )
        for peer_labels, ps in per_peer:
            peer_dropped.add_metric(peer_labels, ps.dropped if ps else 0)
        yield peer_dropped

        if isinstance(engine.codec, WireGuard):
            yield from _wireguard_families(engine, mode)

        fdb = engine.peers.fdb
        entries = GaugeMetricFamily(
            "tunneld_fdb_entries",
            "MAC addresses in the forwarding database (L2 modes; at most fdb_max), static ones included. Every "
            "worker holds the same table; this is worker 0's.",
            labels=["mode"],
        )
        entries.add_metric([mode], len(fdb) if fdb is not None else 0)
        yield entries
        for name, field, text in FDB_COUNTERS:
            family = CounterMetricFamily(name, text, labels=["mode"])
            family.add_metric([mode], getattr(stats, field))
            yield family

        wakeups = HistogramMetricFamily(
            "tunneld_frames_per_wakeup",
            "Reads per event-loop wake-up, by direction (at most the engine's batch): device reads (tx) or socket "
            "reads (rx), dropped frames included. Without offloads a read is one frame; with offloads it may be a "
            "super-frame or a batch of coalesced datagrams. le=0 counts wake-ups that found nothing to read.",
            labels=[*LABELS, "direction"],
        )
        bucket_of = _BATCH_BUCKET.__getitem__
        for direction, counts in (("tx", list(stats.tx_batches)), ("rx", list(stats.rx_batches))):
            wakeups.add_metric(
                [*labels, direction],
                _histogram(counts, BATCH_BOUNDS, bucket_of),
                sum_value=sum(n * c for n, c in enumerate(counts)),
            )
        yield wakeups

        lag = HistogramMetricFamily(
            "tunneld_event_loop_lag_seconds",
            f"How late a timer on the event loop fired, sampled every {LAG_PROBE_INTERVAL} s; a loop blocked for "
            "a long time shows as one large sample.",
            labels=LABELS,
        )
        lag.add_metric(labels, _histogram(list(stats.loop_lag), LOOP_LAG_BUCKETS, int), sum_value=stats.loop_lag_sum)
        yield lag


def _wireguard_families(engine: Engine, mode: str) -> Iterator[Metric]:
    """Per peer, what the WireGuard core counts (tunneld/encap/wireguard/peer.py: plain ints, read here), as
    WireGuard exporters show it: the latest handshake, handshakes by result, and the bytes ``wg show`` reports.
    The ``peer`` label is the public key (base64): the private key is never read here. One series per peer in the
    table now: a removed peer's series go with it. WireGuard runs one worker, so worker 0's core is the whole."""
    latest = GaugeMetricFamily(
        "tunneld_wireguard_latest_handshake_seconds",
        "Unix time of the latest completed handshake with the peer (as `wg show`'s latest handshake); 0 if none.",
        labels=LABELS)
    wire = {direction: CounterMetricFamily(
        f"tunneld_wireguard_{direction}_bytes",
        f"Bytes of WireGuard messages {verb} the peer as `wg show` counts them (transfer): transport data with "
        "its header, padding and tag, handshakes and keepalives; without the UDP and IP headers.",
        labels=LABELS) for direction, verb in (("received", "received from"), ("sent", "sent to"))}
    handshakes = CounterMetricFamily(
        "tunneld_wireguard_handshakes",
        "Handshakes with the peer by result: " + "; ".join(f"{k}: {v}" for k, v in HANDSHAKE_RESULTS.items()) + ".",
        labels=[*LABELS, "result"])
    for peer in engine.peers.all:  # a tuple, replaced (never changed) when the table changes
        core = getattr(peer.session, "peer", None)
        if core is None:
            continue
        labels = [peer.id, mode]
        latest.add_metric(labels, core.last_handshake_wall or 0.0)
        wire["received"].add_metric(labels, core.rx_bytes)
        wire["sent"].add_metric(labels, core.tx_bytes)
        counts = core.handshakes
        for result in HANDSHAKE_RESULTS:
            handshakes.add_metric([*labels, result], counts[result])
    yield latest
    yield wire["received"]
    yield wire["sent"]
    yield handshakes


class LoopLagProbe:
    """A timer that re-arms itself every ``interval`` seconds and records how late each firing was.

    Lateness is measured on the monotonic clock rather than ``loop.time()``: uvloop's loop time is libuv's
    millisecond clock cached at the start of an iteration, too coarse and too stale for this.
    """

    def __init__(self, stats: Stats, interval: float = LAG_PROBE_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stats = stats
        self.interval = interval
        self._clock = clock
        self._due = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | asyncio.Handle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._arm()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._loop = None

    def _arm(self) -> None:
        assert self._loop is not None
        self._due = self._clock() + self.interval
        self._handle = self._loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        # A timer may fire up to a millisecond early (libuv rounds to whole milliseconds): that is no lag.
        self.stats.observe_loop_lag(max(0.0, self._clock() - self._due))
        if self._loop is not None:
            self._arm()  # from now, not from the due time: a long stall gives one sample, not a burst


class RegistryCollector(Collector):
    """The etcd registry's state (tunneld/control/etcd.py), read at scrape time from its plain values."""

    def __init__(self, stats: RegistryStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        up = GaugeMetricFamily("tunneld_registry_up", "1 while this host is registered in etcd and watching the "
                               "others; 0 while etcd is unreachable (the last known peers are kept).")
        up.add_metric([], 1 if stats.up else 0)
        yield up
        peers = GaugeMetricFamily("tunneld_registry_peers", "Peers that came from the registry (static ones not "
                                  "counted).")
        peers.add_metric([], stats.peers)
        yield peers
        invalid = CounterMetricFamily(
            "tunneld_registry_invalid_records",
            "Records under PREFIX/hosts/ not made peers, by reason: "
            + "; ".join(f"{reason}: {text}" for reason, text in INVALID_REASONS.items()) + ".",
            labels=["reason"])
        for reason in INVALID_REASONS:
            invalid.add_metric([reason], stats.invalid.get(reason, 0))
        yield invalid


def _bind(host: str, port: int, registry: CollectorRegistry) -> HttpServer:
    """An HTTP server for ``registry`` bound to host:port (IPv4 or IPv6), not yet serving (tunneld/observe/httpd.py:
    one thread, a cap on connections, read and idle timeouts)."""
    return HttpServer(host, port, make_wsgi_app(registry))


class MetricsServer:
    """``/metrics`` over HTTP at ``listen`` (``HOST:PORT`` or ``[IPv6]:PORT``); binds on construction, serves
    from ``start``.

    Binding first and attaching the tunnel later lets the daemon fail on a busy port before it creates any
    device. Serving only from ``start`` (in the event loop, after any fork of workers) means no serving thread,
    and no scrape's connection or lock, exists when a worker is forked; a scrape that comes earlier waits in
    the listen backlog.
    """

    def __init__(self, listen: str) -> None:
        host, port = parse_listen(listen)
        self.listen = listen
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        try:
            self._httpd = _bind(host, port, self.registry)
        except socket.gaierror as e:
            raise MetricsError(f"metrics-listen {listen}: cannot resolve {host!r}: {e.strerror}") from None
        except OSError as e:
            hint = ""
            if e.errno == errno.EADDRINUSE:
                hint = " (another tunneld? choose another --metrics-listen, or '' to disable)"
            raise MetricsError(f"metrics-listen {listen}: cannot listen: {e.strerror or e}{hint}") from None
        self.port = self._httpd.server_address[1]
        self._collector: TunnelCollector | None = None
        self._probe: LoopLagProbe | None = None

    def watch(self, engine: Engine, *, dev: str, mtu: int, vni: int | None = None,
              others: Callable[[], list[Stats]] | None = None, cpu: Callable[[], list[float]] | None = None) -> None:
        """Export ``engine``'s counters (plus the ``others()``, other workers' counters, and ``cpu()``, the
        workers' CPU seconds) from now on."""
        self._collector = TunnelCollector(engine, dev=dev, mtu=mtu, vni=vni, others=others, cpu=cpu)
        self.registry.register(self._collector)
        self._probe = LoopLagProbe(engine.stats)

    def watch_registry(self, stats: RegistryStats) -> None:
        """Export the registry's state too (tunneld_registry_*)."""
        self.registry.register(RegistryCollector(stats))

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start answering scrapes, and measuring the loop's lag (call from the loop that runs the engine)."""
        self._httpd.start()
        if self._probe is not None:
            self._probe.start(loop)

    def stop(self) -> None:
        if self._probe is not None:
            self._probe.stop()

    def close_in_child(self) -> None:
        """In a forked worker: let go of the listening socket (nothing serves from it before ``start``)."""
        self._httpd.close_listener()

    def close(self) -> None:
        self.stop()
        self._httpd.close()  # wakes the serving thread and waits for it

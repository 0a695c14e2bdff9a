"""The exporter without root: the collector over an engine driven through fakes, the lag probe, the HTTP
endpoint on loopback, and --metrics-listen validation. The netns tests prove it against a real Prometheus."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from tunneld import __version__
from tunneld.config.schema import ConfigError
from tunneld.config.checks import check_listen
from tunneld.encap.base import Drop
from tunneld.encap.vxlan import Vxlan
from tunneld.datapath.engine import Engine
from tunneld.observe.metrics import LoopLagProbe, MetricsError, MetricsServer, TunnelCollector, BATCH_BOUNDS
from tunneld.datapath.stats import LOOP_LAG_BUCKETS, MAX_BATCH, Stats
from tunneld.testbed.prom import PROMTOOL
from tunneld.testing import FakeDevice, FakeLink

PEER = "192.0.2.2"


def frame(size: int) -> bytes:
    pkt = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="10.1.0.1", dst="10.1.0.2") / UDP()
    return bytes(pkt / (b"p" * (size - len(pkt))))


def make(batch: int = 32):
    dev, link = FakeDevice(), FakeLink(PEER)
    eng = Engine(dev, link, Vxlan(7), max_frame=1472, batch=batch, clock=lambda: 1700000000.5)
    registry = CollectorRegistry()
    registry.register(TunnelCollector(eng, dev="td0", mtu=1450, vni=7))
    return eng, dev, link, registry


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value}, parsed back from the text exposition."""
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def L(**labels: str) -> frozenset:
    return frozenset({"peer": PEER, "mode": "vxlan", **labels}.items())


def test_counters_follow_the_engine_exactly():
    eng, dev, link, registry = make()
    sent = [frame(60), frame(100), frame(1000)]
    dev.inject(*sent)
    eng.on_device_readable()
    received = frame(300)
    link.deliver(bytes(VXLAN(flags=8, vni=7) / Ether(received)))
    link.deliver(b"\x08\x00")  # truncated
    link.deliver(bytes(VXLAN(flags=8, vni=8) / Ether(received)))  # another VNI
    link.deliver(bytes(VXLAN(flags=8, vni=7) / Ether(received)), source="192.0.2.99")
    eng.on_link_readable()

    got = samples(registry)
    assert got[("tunneld_tx_packets_total", L())] == 3
    assert got[("tunneld_tx_bytes_total", L())] == 1160  # inner frames: 60 + 100 + 1000
    assert got[("tunneld_rx_packets_total", L())] == 1
    assert got[("tunneld_rx_bytes_total", L())] == 300  # the inner frame, not the 308-byte VXLAN payload
    assert got[("tunneld_peer_last_rx_timestamp_seconds", L())] == 1700000000.5
    drops = {dict(lbl)["reason"]: v for (name, lbl), v in got.items() if name == "tunneld_dropped_packets_total"}
    assert drops == {d.value: 0 for d in Drop} | {"truncated": 1, "vni_mismatch": 1, "unknown_peer": 1}
    assert got[("tunneld_build_info", frozenset({"version": __version__}.items()))] == 1
    assert got[("tunneld_info", L(dev="td0", mtu="1450", vni="7"))] == 1


def test_every_drop_reason_is_exported_at_zero_before_any_traffic():
    _, _, _, registry = make()
    got = samples(registry)
    assert {dict(lbl)["reason"]: v for (name, lbl), v in got.items() if name == "tunneld_dropped_packets_total"} == {
        d.value: 0 for d in Drop
    }
    assert got[("tunneld_peer_last_rx_timestamp_seconds", L())] == 0


def test_peer_label_is_read_at_scrape_time():
    eng, dev, link, registry = make()
    dev.inject(frame(80))
    eng.on_device_readable()
    link.peer = "192.0.2.3"
    got = samples(registry)
    assert got[("tunneld_tx_packets_total", frozenset({"peer": "192.0.2.3", "mode": "vxlan"}.items()))] == 1
    assert not any(dict(lbl).get("peer") == PEER for _, lbl in got)


def test_frames_per_wakeup_histogram():
    eng, dev, link, registry = make(batch=4)
    dev.inject(*[frame(64) for _ in range(10)])
    for _ in range(4):  # wake-ups moving 4, 4, 2 and then 0 frames
        eng.on_device_readable()
    got = samples(registry)
    tx = {dict(lbl)["le"]: v for (name, lbl), v in got.items()
          if name == "tunneld_frames_per_wakeup_bucket" and dict(lbl)["direction"] == "tx"}
    # fixed buckets (independent of the batch): the bounds above 4 hold the same cumulative 4
    assert tx == {"0.0": 1, "1.0": 1, "2.0": 2, "4.0": 4, "8.0": 4, "16.0": 4, "32.0": 4, "64.0": 4, "128.0": 4,
                  "+Inf": 4}
    assert got[("tunneld_frames_per_wakeup_sum", L(direction="tx"))] == 10
    assert got[("tunneld_frames_per_wakeup_count", L(direction="tx"))] == 4
    assert got[("tunneld_frames_per_wakeup_count", L(direction="rx"))] == 0


def test_batch_bounds_are_powers_of_two_up_to_the_largest_batch_whatever_the_engine_batch():
    assert BATCH_BOUNDS == (0, 1, 2, 4, 8, 16, 32, 64, 128) and BATCH_BOUNDS[-1] == MAX_BATCH


@pytest.mark.parametrize("batch", [1, 4, 32, 48, 64])
def test_the_histogram_has_the_same_buckets_whatever_the_engine_batch(batch):
    eng, dev, link, registry = make(batch=batch)
    dev.inject(*[frame(64) for _ in range(batch)])
    eng.on_device_readable()  # one wake-up moving a whole batch
    got = samples(registry)
    tx = {float(dict(lbl)["le"]): v for (name, lbl), v in got.items()
          if name == "tunneld_frames_per_wakeup_bucket" and dict(lbl)["direction"] == "tx"}
    assert sorted(tx)[:-1] == [float(b) for b in BATCH_BOUNDS]
    assert tx[float("inf")] == 1 and all(v == (1 if bound >= batch else 0) for bound, v in tx.items())
    assert len(eng.stats.tx_batches) == MAX_BATCH + 1  # one slot per read count, whatever the batch


def test_loop_lag_buckets_are_inclusive_upper_bounds():
    stats = Stats()
    for seconds in (0.0, 0.001, 0.0011, 0.3, 99.0):
        stats.observe_loop_lag(seconds)
    registry = CollectorRegistry()
    eng = Engine(FakeDevice(), FakeLink(PEER), Vxlan(7), max_frame=1472)
    eng.stats = stats
    registry.register(TunnelCollector(eng, dev="td0", mtu=1450))
    got = samples(registry)
    lag = {float(dict(lbl)["le"]): v for (name, lbl), v in got.items()
           if name == "tunneld_event_loop_lag_seconds_bucket"}
    assert lag[0.001] == 2 and lag[0.0025] == 3 and lag[0.25] == 3 and lag[0.5] == 4 and lag[2.5] == 4
    assert lag[float("inf")] == 5
    assert sorted(lag)[:-1] == list(LOOP_LAG_BUCKETS)
    assert got[("tunneld_event_loop_lag_seconds_sum", L())] == pytest.approx(99.3021)
    assert got[("tunneld_info", L(dev="td0", mtu="1450", vni=""))] == 1


def test_lag_probe_sees_a_blocked_loop():
    stats = Stats()

    async def main():
        probe = LoopLagProbe(stats, interval=0.05)
        probe.start(asyncio.get_running_loop())
        await asyncio.sleep(0.12)
        time.sleep(0.3)  # a callback hogging the loop: the probe's next firing is late by at least ~0.25 s
        await asyncio.sleep(0.12)
        probe.stop()

    asyncio.run(main())
    late = sum(stats.loop_lag[LOOP_LAG_BUCKETS.index(0.1) + 1:])
    assert late >= 1, stats.loop_lag
    assert stats.loop_lag_sum >= 0.2


@pytest.mark.skipif(not os.path.exists(PROMTOOL), reason="promtool not installed (make setup installs it)")
def test_promtool_accepts_the_whole_exposition_with_default_collectors():
    server = MetricsServer(f"127.0.0.1:{free_port()}")
    try:
        eng, dev, link, _ = make()
        dev.inject(frame(64))
        eng.on_device_readable()
        server.watch(eng, dev="td0", mtu=1450, vni=7)
        text = generate_latest(server.registry).decode()
    finally:
        server.close()
    assert "process_cpu_seconds_total" in text and "python_gc_objects_collected_total" in text
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def free_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("family,host,listen", [
    (socket.AF_INET, "127.0.0.1", "127.0.0.1:{}"),
    (socket.AF_INET6, "::1", "[::1]:{}"),
])
def test_server_serves_metrics_over_http(family, host, listen):
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        port = free_port(family, host)
    except OSError:
        pytest.skip(f"{host} not available")
    server = MetricsServer(listen.format(port))
    loop = asyncio.new_event_loop()
    try:
        eng, dev, link, _ = make()
        server.watch(eng, dev="td0", mtu=1450, vni=7)
        server.start(loop)
        dev.inject(frame(64), frame(64))
        eng.on_device_readable()
        url = f"http://{listen.format(port)}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = r.read().decode()
    finally:
        server.close()
        loop.close()
    assert f'tunneld_tx_packets_total{{mode="vxlan",peer="{PEER}"}} 2.0' in body


def test_nothing_serves_before_start_so_a_fork_inherits_no_scrape():
    """Workers are forked between binding and start: no serving thread, no scrape connection must exist yet."""
    before = {t.ident for t in threading.enumerate()}
    server = MetricsServer(f"127.0.0.1:{free_port()}")
    try:
        assert {t.ident for t in threading.enumerate()} == before
        port = server.port
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:  # queued in the backlog...
            c.settimeout(0.3)
            c.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            with pytest.raises(TimeoutError):
                c.recv(1)  # ...and not answered
    finally:
        server.close()


def test_one_scrape_is_one_moment_the_worker_rows_add_up_to_the_totals():
    eng, dev, link, _ = make()
    other = Stats()
    other.tx_packets = 5
    eng.stats.tx_packets = 10
    families = {}
    for family in TunnelCollector(eng, dev="td0", mtu=1450, others=lambda: [other]).collect():
        families[family.name] = family
        eng.stats.tx_packets += 1  # the engine keeps counting between two families of one scrape
    total = families["tunneld_tx_packets"].samples[0].value
    rows = [s.value for s in families["tunneld_worker_packets"].samples if s.labels["direction"] == "tx"]
    assert total == sum(rows) == 15 and rows == [10, 5]


def test_busy_port_is_one_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsError, match=rf"^metrics-listen 127.0.0.1:{port}: cannot listen: .*in use"):
            MetricsServer(f"127.0.0.1:{port}")


@pytest.mark.parametrize("value,normal", [
    ("127.0.0.1:9477", "127.0.0.1:9477"),
    ("[::1]:9477", "[::1]:9477"),
    ("[0:0::1]:80", "[::1]:80"),
    ("0.0.0.0:1", "0.0.0.0:1"),
    ("localhost:9477", "localhost:9477"),
    ("", ""),
])
def test_listen_values_accepted(value, normal):
    assert check_listen(value) == normal


@pytest.mark.parametrize("value,message", [
    ("127.0.0.1", "is not HOST:PORT"),
    ("::1:9477", "in brackets"),
    ("[::1]", "is not [IPv6]:PORT"),
    ("[127.0.0.1]:80", "is not [IPv6]:PORT"),
    (":9477", "names no address"),
    ("127.0.0.1:0", "between 1 and 65535"),
    ("127.0.0.1:65536", "between 1 and 65535"),
    ("127.0.0.1:http", "between 1 and 65535"),
    ("bad host:80", "not an IP address or a host name"),
])
def test_listen_values_rejected(value, message):
    with pytest.raises(ConfigError, match=r"^metrics-listen: .*" + message.replace("[", r"\[").replace("]", r"\]")):
        check_listen(value)


def test_cli_rejects_a_bad_listen_value_in_one_line():
    r = subprocess.run([sys.executable, "-m", "tunneld", "--peer", "192.0.2.1", "--metrics-listen", "::1:9477"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "tunneld: error: metrics-listen: write an IPv6 address in brackets, e.g. [::1]:9477"
    )

"""The exporter against real tools: promtool lints the exposition, a real Prometheus scrapes two tunnelds.

One testbed for the module: tunneld on A and B, and a Prometheus server inside A that scrapes A on its
loopback and B across the underlay every second. Every test measures deltas around its own traffic, so the
tests do not depend on their order.

To make packet counts exact, the tunnel carries nothing but the test's traffic: IPv6 is off on the tunnel
interfaces (no router solicitations, MLD or DAD frames) and the neighbours are static (no ARP). The kernel's
own counters on A's TAP device are checked too, as an independent witness of how many frames crossed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from tunneld.encap.base import Drop

from tests.support import REPO
from tunneld.testbed import OVERLAY_V4, Host, Tunneld
from tunneld.testbed import testbed as make_testbed
from tunneld.testbed.prom import PROMTOOL, Prometheus, prometheus

pytestmark = pytest.mark.netns

MAC_A, MAC_B = "02:00:00:00:e4:01", "02:00:00:00:e4:02"
METRICS_A = "127.0.0.1:9477"  # A: the default, on A's loopback
METRICS_B = "10.231.0.2:9477"  # B: on its underlay address, so that the Prometheus in A reaches it
VNI = 42
DASHBOARD = REPO / "config" / "grafana" / "tunneld.json"

RECEIVER = """
import socket, sys, time
n, timeout = int(sys.argv[1]), float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9999))
print("ready", flush=True)
got, deadline = 0, time.monotonic() + timeout
while got < n and time.monotonic() < deadline:
    s.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        s.recv(65535)
    except TimeoutError:
        break
    got += 1
print(got, flush=True)
"""

SENDER = """
import socket, sys, time
dst, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
payloads = [bytes.fromhex(h) for h in sys.argv[4:]]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(n):
    for p in payloads:
        s.sendto(p, (dst, port))
    time.sleep(0.001)  # gentle: the TAP queue must not overflow, or the kernel, not tunneld, drops
"""


def tap_counters(host: Host, dev: str) -> dict:
    """The kernel's own counters for ``dev`` (for a TAP, tx = frames handed to tunneld, rx = frames it wrote)."""
    info = json.loads(host.run("ip", "-j", "-s", "link", "show", "dev", dev).stdout)[0]
    return info["stats64"]


@pytest.fixture(scope="module")
def bed():
    with make_testbed() as (a, b):
        for h in (a, b):
            # New interfaces (the TAP) get no IPv6: no RS, MLD or DAD frames to muddle the counts.
            h.run("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
        ta = Tunneld(a, "--peer", b.underlay, "--address", f"{OVERLAY_V4[0]}/24", "--mac", MAC_A,
                     "--vni", str(VNI))
        tb = Tunneld(b, "--peer", a.underlay, "--address", f"{OVERLAY_V4[1]}/24", "--mac", MAC_B,
                     "--vni", str(VNI), "--metrics-listen", METRICS_B)
        a.run("ip", "neigh", "replace", OVERLAY_V4[1], "lladdr", MAC_B, "dev", "tunneld0", "nud", "permanent")
        b.run("ip", "neigh", "replace", OVERLAY_V4[0], "lladdr", MAC_A, "dev", "tunneld0", "nud", "permanent")
        with prometheus(a, [METRICS_A, METRICS_B], interval=1.0) as prom:
            yield a, b, prom
        for t in (ta, tb):
            assert t.stop() == 0, t.output()


def metric(name: str, instance: str, **labels: str) -> str:
    sel = ",".join([f'instance="{instance}"', *(f'{k}="{v}"' for k, v in labels.items())])
    return f"{name}{{{sel}}}"


def scrape_values(prom: Prometheus, after: float, queries: dict[str, str]) -> dict[str, float]:
    prom.wait_scraped_after(after, [METRICS_A, METRICS_B])
    return {k: prom.value(q) for k, q in queries.items()}


def now_in(host: Host) -> float:
    return float(host.run(sys.executable, "-c", "import time; print(time.time())").stdout)


def test_promtool_finds_nothing_to_report_on_the_live_exposition(bed):
    a, _, prom = bed
    exposition = prom.host.run(sys.executable, "-m", "tunneld.testbed.prom", "get", f"http://{METRICS_A}/metrics",
                               cwd=REPO).stdout
    assert "tunneld_tx_bytes_total{" in exposition and "process_cpu_seconds_total" in exposition
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_prometheus_sees_exactly_the_datagrams_sent(bed):
    a, b, prom = bed
    n, size = 100, 200
    frame_len = len(Ether() / IP() / UDP() / (b"x" * size))  # scapy's idea of the inner frame: 242 bytes
    queries = {
        "a_tx_packets": metric("tunneld_tx_packets_total", METRICS_A),
        "a_tx_bytes": metric("tunneld_tx_bytes_total", METRICS_A),
        "a_rx_packets": metric("tunneld_rx_packets_total", METRICS_A),
        "b_rx_packets": metric("tunneld_rx_packets_total", METRICS_B),
        "b_rx_bytes": metric("tunneld_rx_bytes_total", METRICS_B),
        "b_tx_packets": metric("tunneld_tx_packets_total", METRICS_B),
        "a_drops": f"sum({metric('tunneld_dropped_packets_total', METRICS_A)})",
        "b_drops": f"sum({metric('tunneld_dropped_packets_total', METRICS_B)})",
    }
    kernel_before = tap_counters(a, "tunneld0")["tx"]
    before = scrape_values(prom, now_in(a), queries)

    receiver = b.popen(sys.executable, "-c", RECEIVER, str(n), "20")
    assert receiver.stdout.readline().strip() == "ready"
    a.run(sys.executable, "-c", SENDER, OVERLAY_V4[1], "9999", str(n), (b"x" * size).hex(), timeout=30)
    out, _ = receiver.communicate(timeout=30)
    assert out.strip() == str(n), "the receiver in B did not get every datagram"
    kernel_after = tap_counters(a, "tunneld0")["tx"]
    after = scrape_values(prom, now_in(a) + 0.2, queries)

    delta = {k: after[k] - before[k] for k in queries}
    assert kernel_after["packets"] - kernel_before["packets"] == n  # the kernel handed tunneld exactly n frames
    assert kernel_after["bytes"] - kernel_before["bytes"] == n * frame_len
    assert delta == {
        "a_tx_packets": n,
        "a_tx_bytes": n * frame_len,
        "a_rx_packets": 0,
        "b_rx_packets": n,
        "b_rx_bytes": n * frame_len,
        "b_tx_packets": 0,
        "a_drops": 0,
        "b_drops": 0,
    }


def test_malformed_datagrams_are_counted_by_reason(bed):
    a, b, prom = bed
    inner = Ether(src=MAC_B, dst=MAC_A) / IP(src=OVERLAY_V4[1], dst=OVERLAY_V4[0]) / UDP(dport=9)
    bad = {  # built by scapy, sent from B's underlay address (the peer's) to A's VXLAN port
        "truncated": b"\x08\x00\x00",
        "bad_flags": bytes(VXLAN(flags=0x00, vni=VNI) / inner),
        "reserved_bits": bytes(VXLAN(flags=0x08, vni=VNI, reserved2=1) / inner),
        "vni_mismatch": bytes(VXLAN(flags=0x08, vni=VNI + 1) / inner),
        "runt_frame": bytes(VXLAN(flags=0x08, vni=VNI)) + b"\x02\x00\x00",
    }
    repeats = 3
    reasons = sorted(d.value for d in Drop)
    query = metric("tunneld_dropped_packets_total", METRICS_A)

    def by_reason() -> dict[str, float]:
        return {s["metric"]["reason"]: float(s["value"][1]) for s in prom.query(query)}

    prom.wait_scraped_after(now_in(a), [METRICS_A])
    before = by_reason()
    assert sorted(before) == reasons  # every reason is there from the start, even those never seen
    b.run(sys.executable, "-c", SENDER, a.underlay, "4789", str(repeats), *(p.hex() for p in bad.values()))
    # and one well-formed packet from an address that is not the peer: A sends to its own VXLAN port
    a.run(sys.executable, "-c", SENDER, a.underlay, "4789", "1", bytes(VXLAN(flags=0x08, vni=VNI) / inner).hex())
    prom.wait_scraped_after(now_in(a) + 0.2, [METRICS_A])
    after = by_reason()
    expected = {r: 0.0 for r in reasons} | {r: float(repeats) for r in bad} | {"unknown_peer": 1.0}
    assert {r: after[r] - before[r] for r in reasons} == expected


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) for every query target of every panel, rows included."""
    found = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                found.append((panel["title"], target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return found


def grafana_interpolate(expr: str) -> str:
    """What Grafana would send with "All" instances selected and a short scrape interval."""
    for var, value in (("$__rate_interval", "10s"), ("$instance", ".*"), ("$job", ".*")):
        expr = expr.replace(var, value)
    leftover = re.findall(r"\$\{?\w+", expr)
    assert not leftover, f"variables the test does not know how to interpolate: {leftover} in {expr}"
    return expr


def test_every_dashboard_query_returns_data(bed):
    a, b, prom = bed
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = dashboard_exprs(dashboard)
    titles = {title.lower() for title, _ in exprs}
    for must in ("throughput", "packet rate", "drops", "peer last seen", "event-loop lag"):
        assert any(must in t for t in titles), f"no panel about {must!r}: {sorted(titles)}"
    # Traffic both ways, so that both peers have been heard from and every rate has something to show.
    assert a.ping(OVERLAY_V4[1], count=5, interval=0.2)
    prom.wait_scraped_after(now_in(a) + 2, [METRICS_A, METRICS_B])  # a few samples inside the rate window
    empty = [(title, expr) for title, expr in exprs if not prom.query(grafana_interpolate(expr))]
    assert not empty, f"dashboard queries without data: {empty}"


def test_busy_metrics_port_fails_cleanly_before_the_device_exists(bed):
    a, _, _ = bed
    r = a.run(sys.executable, "-m", "tunneld", "--peer", "10.231.0.2", "--dev", "tdbusy", "--port", "4790",
              "--metrics-listen", METRICS_A, check=False, timeout=30)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"tunneld: error: metrics-listen {METRICS_A}: ")
    assert "in use" in r.stderr
    assert a.link_state("tdbusy") is None

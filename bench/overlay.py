"""Throughput of one peer while the overlay around it is disturbed: a MAC storm from another peer, and live
peer changes on the daemon's control socket. Two rows, each a stream's rate during the disturbance over the
mean of the same stream before and after it (so that a drift of the machine's load counts neither way).

    python -m bench.overlay                  # both rows, printed; --json PATH writes them too

These ratios were bounds inside tests/test_overlay_netns.py (0.5 under the storm, 0.75 under peer changes); on
a shared 2-CPU machine they measured the neighbours as much as tunneld, so they are figures here, and the tests
keep what holds on any machine: nothing lost, no second without traffic, the FDB's bound, the counters.

The scenarios' pieces (the three hosts' tunnels, the storm) live here and the tests use them, so that the
bench and the tests disturb the overlay the same way. Nothing here judges the figures: a benchmark reports.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from bench import measure
from tunneld.testbed import Host, Tunneld, is_root, segment

VNI = 42
DEV = "tunneld0"
FDB_MAX = 1024
STORM_MACS = 100_000
STORM_SECONDS = 12
STREAM_S = 12
CHANGE_WINDOW_S = 8  # peers are added and removed during the first 8 s of a stream
CHANGE_PAUSE_S = 1.5  # between changes: on 2 cores the clients a change starts (tunneld peer, ping) take CPU too


def host_mac(host: Host) -> str:
    """A MAC of the host's own. tunneld derives its MAC from /etc/machine-id, the device, the mode, the first
    peer and the VNI; namespaces share one machine-id, so two hosts whose first peer is the same (b and c both
    peering with a) would get the same MAC here, which distinct machines never do."""
    return "02:74:" + ":".join(f"{int(octet):02x}" for octet in host.underlay.split("."))


def vxlan_tunneld(host: Host, peers: list[Host], *extra: str) -> Tunneld:
    peer_args = [arg for p in peers for arg in ("--peer", p.underlay)]
    return Tunneld(host, "--mode", "vxlan", "--vni", str(VNI), *peer_args, "--address", f"{host.overlay}/24",
                   "--mac", host_mac(host), *extra, runtime_dir=host.runtime_dir)


STORM = r"""
import random, socket, struct, sys, time
dev, dst, n, seconds = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", "")), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((dev, 0))
rng = random.Random(12)
body = struct.pack("!H", 0x88B5) + bytes(46)  # IEEE local experimental EtherType: the receiver's kernel drops it
burst = 500
start = time.monotonic()
sent = 0
while sent < n:
    for _ in range(min(burst, n - sent)):
        src = bytes([(rng.getrandbits(8) & 0xFC) | 0x02]) + rng.randbytes(5)  # locally administered unicast
        try:
            s.send(dst + src + body)
            sent += 1
        except BlockingIOError:
            pass
    ahead = start + seconds * sent / n - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
print(sent, flush=True)
"""


def storm(src: Host, dst_mac: str, macs: int = STORM_MACS, seconds: float = STORM_SECONDS) -> subprocess.Popen:
    """``macs`` frames from as many random source MACs, out of ``src``'s tunnel device towards ``dst_mac``,
    paced over ``seconds``; it prints how many it sent."""
    return src.popen(sys.executable, "-c", STORM, DEV, dst_mac, str(macs), str(seconds))


def iperf_stream(src: Host, dst_addr: str, seconds: int) -> subprocess.Popen:
    return src.popen(*measure.iperf_argv(dst_addr, seconds), stderr=subprocess.DEVNULL)


def stream_report(proc: subprocess.Popen, seconds: int) -> dict:
    """The stream's iperf3 JSON report; raises MeasureError when the stream broke."""
    out, _ = proc.communicate(timeout=seconds + measure.SLACK_S)
    measure.parse_iperf(out)
    return json.loads(out)


def gbps(report: dict) -> float:
    return report["end"]["sum_received"]["bits_per_second"] / 1e9


def stalls(report: dict) -> list[float]:
    """The starts (s) of the stream's one-second intervals that carried nothing."""
    return [i["sum"]["start"] for i in report["intervals"] if i["sum"]["bytes"] == 0]


def peer_changes(a: Host, ta: Tunneld, b: Host, c: Host, check: Any = None) -> dict[str, Any]:
    """A stream from A to B for STREAM_S while C is added to and removed from A's peers over the control socket
    (``check(added: bool)`` runs after each change, if given). The stream's report and how many changes fit."""
    started = time.monotonic()
    stream = iperf_stream(a, b.overlay, STREAM_S)
    time.sleep(1)  # the stream runs before the first change
    changes = 0
    while time.monotonic() < started + CHANGE_WINDOW_S:
        r = ta.client("peer", "add", c.underlay, "--name", "c")
        if r.returncode != 0:
            raise RuntimeError(f"peer add: {r.stderr.strip()}")
        a.wait_ping(c.overlay, timeout=5)
        if check:
            check(True)
        r = ta.client("peer", "remove", c.underlay)
        if r.returncode != 0:
            raise RuntimeError(f"peer remove: {r.stderr.strip()}")
        if check:
            check(False)
        changes += 1
        time.sleep(CHANGE_PAUSE_S)
    last_change = time.monotonic() - started
    return {"report": stream_report(stream, STREAM_S), "changes": changes, "last_change_s": last_change}


def ratio_row(name: str, before: float, during: float, after: float, **extra: Any) -> dict[str, Any]:
    baseline = (before + after) / 2
    return {"name": name, "before_gbps": round(before, 3), "during_gbps": round(during, 3),
            "after_gbps": round(after, 3), "ratio": round(during / baseline, 3) if baseline else None, **extra}


def bench_peer_changes() -> dict[str, Any]:
    with segment(3) as (a, b, c):
        ta = vxlan_tunneld(a, [b])
        vxlan_tunneld(b, [a])
        vxlan_tunneld(c, [a])
        a.wait_ping(b.overlay, timeout=15)
        server = measure.IperfServer(b)
        try:
            before = gbps(stream_report(iperf_stream(a, b.overlay, STREAM_S), STREAM_S))
            server.restart()
            changed = peer_changes(a, ta, b, c)
            server.restart()
            after = gbps(stream_report(iperf_stream(a, b.overlay, STREAM_S), STREAM_S))
        finally:
            server.stop()
    return ratio_row("live peer changes", before, gbps(changed["report"]), after, changes=changed["changes"])


def bench_mac_storm(seconds: int = 5) -> dict[str, Any]:
    with segment(3) as (a, b, c):  # b storms a; c streams to a
        vxlan_tunneld(a, [b, c], "--fdb-max", str(FDB_MAX))
        vxlan_tunneld(b, [a])
        vxlan_tunneld(c, [a])
        c.wait_ping(a.overlay, timeout=15)
        b.wait_ping(a.overlay, timeout=15)
        mac_a = a.run("cat", f"/sys/class/net/{DEV}/address").stdout.strip()
        server = measure.IperfServer(a)
        try:
            before = gbps(stream_report(iperf_stream(c, a.overlay, seconds), seconds))
            server.restart()
            stormer = storm(b, mac_a, seconds=seconds + 3)
            time.sleep(1)
            during = gbps(stream_report(iperf_stream(c, a.overlay, seconds), seconds))
            stormer.communicate(timeout=60)
            server.restart()
            after = gbps(stream_report(iperf_stream(c, a.overlay, seconds), seconds))
        finally:
            server.stop()
    return ratio_row("MAC storm from another peer", before, during, after, storm_macs=STORM_MACS)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overlay", description="One peer's throughput under a MAC "
                                     "storm from another peer and under live peer changes, against before and after.")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if not is_root():
        print("bench: needs root to create network namespaces", file=sys.stderr)
        return 77
    rows = [bench_mac_storm(), bench_peer_changes()]
    for row in rows:
        print(f"{row['name']}: {row['during_gbps']:.3f} Gbit/s during, {row['before_gbps']:.3f} before, "
              f"{row['after_gbps']:.3f} after: {row['ratio']}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
